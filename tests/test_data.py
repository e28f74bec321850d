"""Data loading, cleaning, splitting, the prompt template and collation."""

import json

import pytest
import torch

from conftest import bundled_cards, write_cards
from utils import data
from utils.prompt import IGNORE_INDEX, build_prompt, clean_answer, encode_example, encode_prompt


def test_bundled_sample_has_at_least_400_distinct_complete_flashcards():
    cards = bundled_cards()
    assert len(cards) >= 400
    assert all(
        set(c) == {"instruction", "input", "output"} and c["input"].strip() and c["output"].strip()
        for c in cards
    )
    clean, stats = data.clean_rows(data.read_rows(data.BUNDLED_DATASET))
    assert len(clean) == len(cards) and stats["duplicates_dropped"] == 0 and stats["skipped_empty"] == 0


def test_clean_rows_skips_empty_and_drops_exact_duplicates_and_counts_both():
    rows = [
        {"instruction": "i", "input": "Q1?", "output": "A1."},
        {"instruction": "i", "input": "Q1?", "output": "A1."},  # exact duplicate
        {"instruction": "i", "input": "Q1?", "output": "A different answer."},  # not a duplicate
        {"instruction": "i", "input": "  ", "output": "A."},
        {"instruction": "i", "input": "Q3?", "output": None},
        {"input": "Q4?", "output": "A4."},  # missing instruction gets the default
    ]
    clean, stats = data.clean_rows(rows)
    assert [c["input"] for c in clean] == ["Q1?", "Q1?", "Q4?"]
    assert stats == {"rows_read": 6, "skipped_empty": 2, "duplicates_dropped": 1}
    assert clean[2]["instruction"] == "Answer this question truthfully"


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_local_format_reads_the_same_rows(tmp_path, suffix):
    cards = bundled_cards()[:5]
    path = tmp_path / f"cards{suffix}"
    if suffix == ".jsonl":
        write_cards(path, cards)
    elif suffix == ".json":
        path.write_text(json.dumps(cards), encoding="utf-8")
    elif suffix == ".csv":
        import pandas as pd

        pd.DataFrame(cards).to_csv(path, index=False)
    else:
        import pandas as pd

        pd.DataFrame(cards).to_parquet(path)
    clean, _ = data.clean_rows(data.read_rows(str(path)))
    assert clean == cards


def test_wrong_columns_stop_with_one_line_error(tmp_path):
    path = write_cards(tmp_path / "bad.jsonl", [{"question": "Q?", "answer": "A."}])
    with pytest.raises(data.DataError) as error:
        data.read_rows(path)
    assert "missing column(s) input, output" in str(error.value) and "\n" not in str(error.value)


def test_non_utf8_file_stops_with_one_line_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps({"input": "Fieber über 38 °C?", "output": "Ja."}, ensure_ascii=False).encode("latin-1")
    )
    with pytest.raises(data.DataError, match="not UTF-8") as error:
        data.read_rows(str(path))
    assert "\n" not in str(error.value)


def test_uncached_hub_dataset_fails_fast_offline_naming_the_bundled_sample(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(data.DataError, match="--dataset bundled"):
        data.read_rows("medalpaca/medical_meadow_medical_flashcards")
    assert time.time() - start < 15


def test_split_is_deterministic_disjoint_complete_and_near_its_fractions():
    cards, _ = data.clean_rows(bundled_cards())
    spec = data.SplitSpec(seed=7, validation_fraction=0.1, test_fraction=0.2)
    first = data.split_cards(cards, spec)
    assert first == data.split_cards(cards, spec)
    assert first != data.split_cards(
        cards, data.SplitSpec(seed=8, validation_fraction=0.1, test_fraction=0.2)
    )
    assert sorted(first["test"] + first["validation"] + first["train"] + first["unsampled"]) == list(
        range(len(cards))
    )
    assert first["unsampled"] == []
    # each row is an independent keyed-hash coin: counts are Binomial(n, p). The bound is 5 standard
    # deviations (false failure < 1e-6 for any honest hash); a hash that ignored the fraction misses by ~n p.
    n = len(cards)
    for name, p in (("test", 0.2), ("validation", 0.1), ("train", 0.7)):
        assert abs(len(first[name]) - n * p) <= 5 * (n * p * (1 - p)) ** 0.5, name


SPLIT_FLAGS = {
    "defaults": dict(seed=0, validation_fraction=0.05, test_fraction=0.05),
    "validation_fraction": dict(seed=0, validation_fraction=0.3, test_fraction=0.05),
    "test_fraction": dict(seed=0, validation_fraction=0.05, test_fraction=0.4),
    "no_held_out": dict(seed=0, validation_fraction=0.0, test_fraction=0.0),
    "train_sample_fraction": dict(
        seed=0, validation_fraction=0.05, test_fraction=0.05, train_sample_fraction=0.5
    ),
    "split_seed": dict(seed=123, validation_fraction=0.1, test_fraction=0.1),
}


def training_set(path, spec) -> set:
    cards, _ = data.clean_rows(data.read_rows(path))
    return {data.row_hash(cards[i]) for i in data.split_cards(cards, spec)["train"]}


@pytest.mark.parametrize("flags", list(SPLIT_FLAGS))
def test_adding_or_removing_one_source_row_changes_the_training_set_by_at_most_that_row(tmp_path, flags):
    spec = data.SplitSpec(**SPLIT_FLAGS[flags])
    rows = bundled_cards()[:120]
    original = training_set(write_cards(tmp_path / "d.jsonl", rows), spec)
    new_row = {
        "instruction": "Answer this question truthfully",
        "input": "What does the tricuspid valve separate?",
        "output": "The right atrium from the right ventricle.",
    }
    for position in (0, 37, 119):
        removed = rows[position]
        without = training_set(
            write_cards(tmp_path / "d.jsonl", rows[:position] + rows[position + 1 :]), spec
        )
        assert original - without <= {data.row_hash(removed)} and without <= original, (flags, position)
        with_new = training_set(
            write_cards(tmp_path / "d.jsonl", rows[:position] + [new_row] + rows[position:]), spec
        )
        assert with_new - original <= {data.row_hash(new_row)} and original <= with_new, (flags, position)
    # the old positional split (a seeded permutation of row indices) fails this by tens of rows: the property
    # is not vacuous
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    order_without = torch.randperm(len(rows) - 1, generator=torch.Generator().manual_seed(0)).tolist()
    positional = {data.row_hash(rows[i]) for i in order[12:]}
    positional_without = {data.row_hash((rows[:37] + rows[38:])[i]) for i in order_without[12:]}
    assert len(positional - positional_without) > 1


def test_split_follows_the_normalised_content_not_case_or_spacing():
    spec = data.SplitSpec(seed=0, validation_fraction=0.3, test_fraction=0.3)
    card = {"instruction": "x", "input": "What is insulin?", "output": "A hormone."}
    variant = {"instruction": "y", "input": "what  is INSULIN?", "output": "a hormone."}
    assert data.assign_split(card, spec) == data.assign_split(variant, spec)


def test_labels_mask_the_prompt_and_end_with_eos(tiny_tokenizer):
    example = encode_example(tiny_tokenizer, "What does insulin do?", "It lowers blood glucose.")
    prompt_ids = encode_prompt(tiny_tokenizer, "What does insulin do?")
    n_prompt = len(prompt_ids)
    assert example["input_ids"][:n_prompt] == prompt_ids and prompt_ids[0] == tiny_tokenizer.bos_token_id
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert example["labels"][-1] == tiny_tokenizer.eos_token_id
    answer = tiny_tokenizer.decode(example["input_ids"][n_prompt:-1])
    assert answer.strip() == "It lowers blood glucose."


def test_collate_pads_right_with_pad_not_eos_and_keeps_the_prompt_mask(tiny_tokenizer):
    examples = [
        encode_example(tiny_tokenizer, "Q?", "A short one."),
        encode_example(tiny_tokenizer, "A longer question here?", "A longer answer here."),
    ]
    pad = tiny_tokenizer.pad_token_id
    assert pad != tiny_tokenizer.eos_token_id and tiny_tokenizer.padding_side == "right"
    batch = data.collate(examples, pad)
    short = len(examples[0]["input_ids"])
    assert batch["input_ids"][0, short:].eq(pad).all() and batch["attention_mask"][0, short:].eq(0).all()
    assert batch["labels"][0, short:].eq(IGNORE_INDEX).all()
    assert batch["labels"][0, :short].tolist() == examples[0]["labels"]
    assert (batch["labels"] == tiny_tokenizer.eos_token_id).sum() == 2


def test_overlong_cards_are_skipped_not_truncated(tiny_tokenizer):
    cards = [
        {"instruction": "i", "input": "Q?", "output": "A."},
        {"instruction": "i", "input": "Q?", "output": "word " * 200},
    ]
    examples, too_long = data.tokenize_cards(tiny_tokenizer, cards, max_seq_length=64)
    assert too_long == 1 and len(examples) == 1 and examples[0]["labels"][-1] == tiny_tokenizer.eos_token_id


def test_clean_answer_cuts_a_new_question_and_the_prompt_is_the_template():
    assert clean_answer(" Insulin lowers glucose.\nQuestion: What is glucagon?") == "Insulin lowers glucose."
    assert build_prompt("What is X?") == "Answer this question truthfully\n\nQuestion: What is X?\nAnswer:"


def test_row_hash_depends_on_every_column():
    card = {"instruction": "i", "input": "q", "output": "a"}
    assert (
        len(
            {
                data.row_hash(card),
                data.row_hash(dict(card, instruction="j")),
                data.row_hash(dict(card, output="b")),
            }
        )
        == 3
    )
