"""Flashcard data: load, clean, split, tokenize, collate.

Rows follow the Medical Meadow schema: instruction, input (the question), output (the answer).
Sources: the hub dataset id (`medalpaca/medical_meadow_medical_flashcards`), a local
.json/.jsonl/.csv/.parquet file with those columns, or `bundled` for the sample the project ships.
Cleaning skips rows with an empty question or answer and drops exact duplicates (a duplicated row
would be one person's record counted twice, which weakens example-level DP). The split is a keyed
hash of each row's own content (SplitSpec): no per-row record is stored anywhere, and evaluation
recomputes the held-out rows from the data and the public spec.
"""

import csv
import dataclasses
import hashlib
import hmac
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.prompt import DEFAULT_INSTRUCTION, IGNORE_INDEX, encode_example
from utils.cli import UserError

HUB_DATASET = "medalpaca/medical_meadow_medical_flashcards"
BUNDLED_DATASET = "bundled"
BUNDLED_PATH = Path(__file__).resolve().parent.parent / "data" / "medical_flashcards.jsonl"
COLUMNS = ("instruction", "input", "output")
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class DataError(UserError):
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
        return datasets.load_dataset(
            dataset_id, split="train", download_mode="reuse_dataset_if_exists"
        ).to_list()
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
            f"{source}: missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}, found "
            f"{', '.join(sorted(map(str, present)))}"
        )
    return rows


def _as_text(value) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN from CSV/parquet
        return ""
    return str(value).strip()


def clean_rows(rows: list[dict], user_column: str | None = None) -> tuple[list[dict], dict]:
    """Rows with non-empty question and answer, exact duplicates dropped; counts of what was skipped.

    With `user_column` each kept card also carries that column's value (stripped text) under the same
    name; a row whose user id is empty is skipped and counted (`skipped_no_user`), and duplicates are
    only those of the same user (dropping user B's copy of user A's row would make removing A bring
    B's row back: more than A's rows would change).
    """
    kept, seen = [], set()
    skipped_empty = duplicates = skipped_no_user = 0
    for row in rows:
        card = {
            "instruction": _as_text(row.get("instruction")) or DEFAULT_INSTRUCTION,
            "input": _as_text(row.get("input")),
            "output": _as_text(row.get("output")),
        }
        if not card["input"] or not card["output"]:
            skipped_empty += 1
            continue
        if user_column is not None:
            card[user_column] = _as_text(row.get(user_column))
            if not card[user_column]:
                skipped_no_user += 1
                continue
        key = (card[user_column], row_hash(card)) if user_column is not None else row_hash(card)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append(card)
    counts = {"rows_read": len(rows), "skipped_empty": skipped_empty, "duplicates_dropped": duplicates}
    if user_column is not None:
        counts["skipped_no_user"] = skipped_no_user
    return kept, counts


def check_user_column(source: str, rows: list[dict], user_column: str) -> None:
    """One line naming the columns found when `user_column` is in no row."""
    if user_column in COLUMNS:
        raise DataError(f"--user_column {user_column!r} is a flashcard column; name the column of user ids")
    present = set().union(*(row.keys() for row in rows))
    if user_column not in present:
        raise DataError(
            f"{source}: no column {user_column!r} (--user_column); found {', '.join(sorted(map(str, present)))}"
        )


def group_by_user(items: list[dict], key: str) -> list[list[int]]:
    """Indices of each user's items (item[key] is the user id), users in order of first appearance."""
    users: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        users.setdefault(item[key], []).append(index)
    return list(users.values())


def row_hash(card: dict) -> str:
    """Exact identity of a cleaned row (duplicate detection, and the private run's fingerprint)."""
    return hashlib.sha256(json.dumps([card[c] for c in COLUMNS], ensure_ascii=False).encode()).hexdigest()


def fingerprint(cards: list[dict]) -> str:
    """One hash over every row: private (it decides membership for anyone holding a candidate dataset)."""
    digest = hashlib.sha256()
    for card in cards:
        digest.update(row_hash(card).encode())
    return digest.hexdigest()


EXAMPLE_METHOD = "hmac-sha256 of the lowercased, whitespace-collapsed question and answer"
USER_METHOD = "hmac-sha256 of the user id (the user_column value, stripped): every row of a user in one split"


@dataclass(frozen=True)
class SplitSpec:
    """How rows are assigned to splits: public parameters, written into the release bundle.

    Each row's split follows from a keyed hash (HMAC-SHA256, key from `seed`) of its own normalised
    question and answer alone, never from its position or the other rows: adding or removing one row
    of the file changes the training set by at most that row, and anyone holding the data and this
    spec can recompute which rows were held out. Training rows are further kept with probability
    `train_sample_fraction`, from a second, independent keyed hash.

    With `user_column` (any run given --user_column) both hashes are of the card's user id instead, so
    all of a user's rows go to the same split and are kept or left out together: adding or removing one
    user changes the training set by at most that user's rows, and one row by at most that row. Cards
    must then carry the column (clean_rows(rows, user_column)).
    """

    seed: int
    validation_fraction: float
    test_fraction: float
    train_sample_fraction: float = 1.0
    method: str = EXAMPLE_METHOD
    user_column: str | None = None  # set: the hash is of the user id, so a user's rows share a split

    def __post_init__(self):
        if self.user_column is not None and self.method == EXAMPLE_METHOD:
            object.__setattr__(self, "method", USER_METHOD)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if self.user_column is None:  # example-level specs keep exactly their earlier form
            del data["user_column"]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "SplitSpec":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def _normalised(card: dict) -> bytes:
    return json.dumps(
        [" ".join(card[c].lower().split()) for c in ("input", "output")], ensure_ascii=False
    ).encode()


def _keyed_uniform(purpose: str, seed: int, card: dict, user_column: str | None = None) -> float:
    """A uniform in [0, 1) from HMAC(key = purpose and seed, message = the row's normalised content,
    or with `user_column` the card's user id)."""
    if user_column is None:
        message = _normalised(card)
    else:
        if user_column not in card:
            raise DataError(
                f"the split is by user column {user_column!r}, which this card lacks; "
                f"read the cards with clean_rows(rows, user_column={user_column!r})"
            )
        message = json.dumps(["user", str(card[user_column])], ensure_ascii=False).encode()
    mac = hmac.new(f"{purpose}:{seed}".encode(), message, hashlib.sha256).digest()
    return int.from_bytes(mac[:8], "little") / 2.0**64


def assign_split(card: dict, spec: SplitSpec) -> str:
    """ "test", "validation", "train", or "unsampled" (a training row left out by train_sample_fraction);
    by the card's user id when the spec has a user_column."""
    u = _keyed_uniform("split", spec.seed, card, spec.user_column)
    if u < spec.test_fraction:
        return "test"
    if u < spec.test_fraction + spec.validation_fraction:
        return "validation"
    if _keyed_uniform("train-sample", spec.seed, card, spec.user_column) < spec.train_sample_fraction:
        return "train"
    return "unsampled"


def split_cards(cards: list[dict], spec: SplitSpec) -> dict[str, list[int]]:
    """Row indices of each split, in file order."""
    split = {"train": [], "validation": [], "test": [], "unsampled": []}
    for index, card in enumerate(cards):
        split[assign_split(card, spec)].append(index)
    return split


def tokenize_cards(
    tokenizer, cards: list[dict], max_seq_length: int, user_column: str | None = None
) -> tuple[list[dict], int]:
    """Training examples; a card longer than max_seq_length is skipped (truncation would drop its EOS).

    With `user_column` each example also carries its card's user id as example["user"].
    """
    examples, too_long = [], 0
    for card in cards:
        example = encode_example(tokenizer, card["input"], card["output"], card["instruction"])
        if len(example["input_ids"]) > max_seq_length:
            too_long += 1
            continue
        if user_column is not None:
            example["user"] = card[user_column]
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
