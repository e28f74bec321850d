"""The one prompt template shared by training, inference and evaluation.

A flashcard (instruction, input, output) becomes

    <bos>{instruction}\n\nQuestion: {input}\nAnswer: {output}<eos>

Training sees the prompt part (everything up to and including "Answer:") masked out of the loss and
learns the answer plus EOS; inference feeds exactly the same prompt and stops at EOS. The prompt and
the answer are tokenized separately and concatenated, so the prompt's token ids are identical at
training and at inference time.
"""

DEFAULT_INSTRUCTION = "Answer this question truthfully"
IGNORE_INDEX = -100  # label value the loss skips
QUESTION_MARKER = "\nQuestion:"  # a base model that runs past EOS starts a new question here


def build_prompt(question: str, instruction: str | None = None) -> str:
    instruction = (instruction or DEFAULT_INSTRUCTION).strip()
    return f"{instruction}\n\nQuestion: {question.strip()}\nAnswer:"


def build_answer(answer: str) -> str:
    return " " + answer.strip()


def encode_prompt(tokenizer, question: str, instruction: str | None = None) -> list[int]:
    """Token ids of the prompt: BOS + template, no EOS."""
    ids = tokenizer(build_prompt(question, instruction), add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id] + ids


def encode_example(tokenizer, question: str, answer: str, instruction: str | None = None) -> dict:
    """input_ids and labels of one training example: prompt masked, answer + EOS learned."""
    prompt_ids = encode_prompt(tokenizer, question, instruction)
    answer_ids = tokenizer(build_answer(answer), add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def clean_answer(text: str) -> str:
    """Cut a generated continuation at the next question a base model may start, and trim it."""
    cut = text.find(QUESTION_MARKER)
    if cut == -1:
        cut = text.find("Question:")
    if cut != -1:
        text = text[:cut]
    return text.strip()
