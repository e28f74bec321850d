"""Flashcard data: load, clean, split, tokenize, collate.

Rows follow the Medical Meadow schema: instruction, input (the question), output (the answer).
Sources: the hub dataset id (`medalpaca/medical_meadow_medical_flashcards`), a local
.json/.jsonl/.csv/.parquet file with those columns, or `bundled` for the sample the project ships.
Cleaning skips rows with an empty question or answer and drops exact duplicates (a duplicated row
would be one person's record counted twice, which weakens example-level DP). The split is a seeded
permutation; `split.json` records row indices and hashes, never the text, so an output directory
holds no raw private data.
"""

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import torch

from utils.prompt import DEFAULT_INSTRUCTION, IGNORE_INDEX, encode_example

HUB_DATASET = "medalpaca/medical_meadow_medical_flashcards"
BUNDLED_DATASET = "bundled"
BUNDLED_PATH = Path(__file__).resolve().parent.parent / "data" / "medical_flashcards.jsonl"
COLUMNS = ("instruction", "input", "output")
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class DataError(ValueError):
    """A one-line, user-facing problem with the data."""


def resolve_dataset_path(source: str) -> str:
    return str(BUNDLED_PATH) if source == BUNDLED_DATASET else source


def is_local_source(source: str) -> bool:
    source = resolve_dataset_path(source)
    return os.path.exists(source) or source.endswith(LOCAL_SUFFIXES)


def _read_text(path: str) -> str:
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start}); re-encode it as UTF-8") from None


def _read_local(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise DataError(f"dataset file not found: {path}")
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several types for a bad file
            raise DataError(f"{path} is not a readable parquet file: {error}") from None
    text = _read_text(path)
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    if suffix == ".jsonl":
        rows = []
        for line_number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        return data
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")


def _read_hub(dataset_id: str) -> list[dict]:
    from utils.model_loading import hub_unreachable_reason

    import datasets

    try:
        # a cached copy works offline
        return datasets.load_dataset(dataset_id, split="train", download_mode="reuse_dataset_if_exists").to_list()
    except Exception as cached_error:  # noqa: BLE001 - the cause is reported below
        reason = hub_unreachable_reason()
        if reason:
            raise DataError(
                f"dataset {dataset_id!r} is not cached and the Hugging Face hub is unreachable ({reason}); "
                f"use --dataset {BUNDLED_DATASET} (the flashcards shipped with this project) or a local file"
            ) from None
        raise DataError(f"could not load dataset {dataset_id!r}: {cached_error}") from None


def read_rows(source: str) -> list[dict]:
    """Raw rows from a local file, `bundled`, or a hub dataset id; checks the columns."""
    path = resolve_dataset_path(source)
    rows = _read_local(path) if is_local_source(source) else _read_hub(source)
    if not rows:
        raise DataError(f"{source}: no rows")
    if not all(isinstance(row, dict) for row in rows):
        raise DataError(f"{source}: every row must be an object with columns {', '.join(COLUMNS)}")
    present = set().union(*(row.keys() for row in rows))
    missing = [c for c in ("input", "output") if c not in present]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}, found {', '.join(sorted(map(str, present)))}"
        )
    return rows


def _as_text(value) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN from CSV/parquet
        return ""
    return str(value).strip()


def clean_rows(rows: list[dict]) -> tuple[list[dict], dict]:
    """Rows with non-empty question and answer, exact duplicates dropped; counts of what was skipped."""
    kept, seen = [], set()
    skipped_empty = duplicates = 0
    for row in rows:
        card = {
            "instruction": _as_text(row.get("instruction")) or DEFAULT_INSTRUCTION,
            "input": _as_text(row.get("input")),
            "output": _as_text(row.get("output")),
        }
        if not card["input"] or not card["output"]:
            skipped_empty += 1
            continue
        key = row_hash(card)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append(card)
    return kept, {"rows_read": len(rows), "skipped_empty": skipped_empty, "duplicates_dropped": duplicates}


def row_hash(card: dict) -> str:
    return hashlib.sha256(json.dumps([card[c] for c in COLUMNS], ensure_ascii=False).encode()).hexdigest()


def fingerprint(cards: list[dict]) -> str:
    digest = hashlib.sha256()
    for card in cards:
        digest.update(row_hash(card).encode())
    return digest.hexdigest()


def split_rows(n_rows: int, validation_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Seeded permutation of row indices into train / validation / test."""
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = int(round(n_rows * test_fraction))
    n_val = int(round(n_rows * validation_fraction))
    return {
        "test": sorted(order[:n_test]),
        "validation": sorted(order[n_test:n_test + n_val]),
        "train": sorted(order[n_test + n_val:]),
    }


def split_record(source: str, cards: list[dict], split: dict[str, list[int]], seed: int, stats: dict) -> dict:
    """What split.json holds: where the data came from, and each split's row indices and hashes."""
    return {
        "dataset": source,
        "dataset_fingerprint": fingerprint(cards),
        "n_rows_clean": len(cards),
        "seed": seed,
        "cleaning": stats,
        "splits": {name: {"indices": idx, "hashes": [row_hash(cards[i]) for i in idx]} for name, idx in split.items()},
    }


def load_split(split_path: str, name: str, dataset: str | None = None) -> tuple[list[dict], dict]:
    """Rows of one split of a finished run, re-read from the recorded source and checked against its hashes."""
    with open(split_path, encoding="utf-8") as handle:
        record = json.load(handle)
    cards, _ = clean_rows(read_rows(dataset or record["dataset"]))
    if fingerprint(cards) != record["dataset_fingerprint"]:
        raise DataError(f"dataset {dataset or record['dataset']!r} differs from the one the run in {split_path} was trained on")
    part = record["splits"][name]
    return [cards[i] for i in part["indices"]], record


def tokenize_cards(tokenizer, cards: list[dict], max_seq_length: int) -> tuple[list[dict], int]:
    """Training examples; a card longer than max_seq_length is skipped (truncation would drop its EOS)."""
    examples, too_long = [], 0
    for card in cards:
        example = encode_example(tokenizer, card["input"], card["output"], card["instruction"])
        if len(example["input_ids"]) > max_seq_length:
            too_long += 1
            continue
        examples.append(example)
    return examples, too_long


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked in attention and in the labels, the prompt mask is kept."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
