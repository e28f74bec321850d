"""utils/prompt.py: the one template, and identical prompt tokens at training and at inference time."""

import pytest

from utils.prompt import (
    DEFAULT_INSTRUCTION,
    IGNORE_INDEX,
    QUESTION_MARKER,
    build_answer,
    build_prompt,
    clean_answer,
    encode_example,
    encode_prompt,
)

CASES = [
    ("What does insulin do?", "It lowers blood glucose.", None),
    ("  Which organ makes bile?\n", "  The liver. ", "Answer briefly"),
    (
        "What is the normal adult resting heart rate?",
        "60 to 100 beats per minute",
        "  Answer this question truthfully  ",
    ),
]


# --- the template as text ----------------------------------------------------------------------------------


def test_build_prompt_is_instruction_blank_line_question_and_answer_marker():
    assert build_prompt("What is X?", "Be brief") == "Be brief\n\nQuestion: What is X?\nAnswer:"


def test_build_prompt_uses_the_default_instruction_when_none_or_empty():
    expected = f"{DEFAULT_INSTRUCTION}\n\nQuestion: What is X?\nAnswer:"
    assert (
        build_prompt("What is X?")
        == build_prompt("What is X?", None)
        == build_prompt("What is X?", "")
        == expected
    )


def test_build_prompt_strips_question_and_instruction():
    assert build_prompt("  What is X? \n", "\n Be brief  ") == "Be brief\n\nQuestion: What is X?\nAnswer:"


def test_build_answer_is_one_space_then_the_stripped_answer():
    assert build_answer("  It lowers glucose.\n") == " It lowers glucose."
    assert (build_prompt("Q?") + build_answer("A.")).endswith("\nAnswer: A.")


# --- tokens -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("question, answer, instruction", CASES)
def test_encode_example_masks_exactly_the_prompt_tokens_and_ends_with_eos(
    tiny_tokenizer, question, answer, instruction
):
    example = encode_example(tiny_tokenizer, question, answer, instruction)
    prompt_ids = encode_prompt(tiny_tokenizer, question, instruction)
    n = len(prompt_ids)
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels) > n
    assert labels[:n] == [IGNORE_INDEX] * n
    assert IGNORE_INDEX not in labels[n:]  # every answer token (and EOS) is learned
    assert labels[n:] == ids[n:]
    assert ids[-1] == labels[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.eos_token_id not in ids[:-1]


@pytest.mark.parametrize("question, answer, instruction", CASES)
def test_training_prompt_ids_equal_the_inference_prompt_ids(tiny_tokenizer, question, answer, instruction):
    example = encode_example(tiny_tokenizer, question, answer, instruction)
    prompt_ids = encode_prompt(tiny_tokenizer, question, instruction)
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids


def test_prompt_ids_do_not_depend_on_the_answer(tiny_tokenizer):
    """The prompt is tokenized on its own: no answer text can merge with "Answer:" into other tokens."""
    prefixes = {
        tuple(
            encode_example(tiny_tokenizer, "What is X?", answer)["input_ids"][
                : len(encode_prompt(tiny_tokenizer, "What is X?"))
            ]
        )
        for answer in ["A.", ":)", "Answer", "  spaced", "x" * 40]
    }
    assert prefixes == {tuple(encode_prompt(tiny_tokenizer, "What is X?"))}


def test_encode_prompt_is_bos_then_the_template_without_eos(tiny_tokenizer):
    ids = encode_prompt(tiny_tokenizer, "What does insulin do?")
    assert ids[0] == tiny_tokenizer.bos_token_id and ids.count(tiny_tokenizer.bos_token_id) == 1
    assert tiny_tokenizer.eos_token_id not in ids and tiny_tokenizer.pad_token_id not in ids
    assert tiny_tokenizer.decode(ids[1:]) == build_prompt("What does insulin do?")


def test_answer_tokens_decode_to_the_answer(tiny_tokenizer):
    example = encode_example(tiny_tokenizer, "What does insulin do?", "  It lowers blood glucose. ")
    n = len(encode_prompt(tiny_tokenizer, "What does insulin do?"))
    assert tiny_tokenizer.decode(example["input_ids"][n:-1]) == " It lowers blood glucose."


def test_the_instruction_changes_the_prompt_tokens(tiny_tokenizer):
    assert encode_prompt(tiny_tokenizer, "Q?", "Answer briefly") != encode_prompt(tiny_tokenizer, "Q?")
    assert encode_prompt(tiny_tokenizer, "Q?", None) == encode_prompt(
        tiny_tokenizer, "Q?", DEFAULT_INSTRUCTION
    )


# --- clean_answer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "generated, cleaned",
    [
        (
            " Insulin lowers glucose.\nQuestion: What is glucagon?\nAnswer: It raises it.",
            "Insulin lowers glucose.",
        ),
        (
            " Insulin lowers glucose. Question: What is glucagon?",
            "Insulin lowers glucose.",
        ),  # without the newline too
        ("  Insulin lowers glucose.  \n", "Insulin lowers glucose."),  # no new question: only trimmed
        ("\nQuestion: What is glucagon?", ""),
        ("", ""),
        (" A.\nQuestion: B?\nQuestion: C?", "A."),  # cut at the first
    ],
)
def test_clean_answer_cuts_at_a_new_question_and_trims(generated, cleaned):
    assert clean_answer(generated) == cleaned


def test_clean_answer_prefers_the_newline_marker_over_an_earlier_inline_question():
    text = " See the Question: field.\nQuestion: next?"
    assert QUESTION_MARKER == "\nQuestion:"
    assert clean_answer(text) == "See the Question: field."


def test_clean_answer_keeps_words_like_questions_without_the_colon():
    assert clean_answer(" Questions remain open.") == "Questions remain open."
