"""utils/run_dir.py and the release bundle: what a user shares holds nothing derived from the private data."""

import json
import re
from pathlib import Path

import pytest

from utils import run_dir
from utils.privacy_record import NOT_COVERED, RELATION

NOISE_SEED = "98765"  # an unusual value, so finding it in a file means the seed leaked
BUNDLE_FILES = {
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "NOTICE",
    "privacy_report.json",
    "README.md",
}
PRIVATE_KEYS = {
    "dataset_fingerprint",
    "hashes",
    "indices",
    "examples_drawn",
    "examples_processed",
    "nonfinite_examples",
    "empty_steps",
    "skipped_empty",
    "skipped_too_long",
    "duplicates_dropped",
    "rows_read",
    "train/loss",
    "eval/loss",
    "dataset",
    "counters",
}


@pytest.fixture(scope="module")
def released(train_run):
    return train_run("--seed", NOISE_SEED, "--save_loss_threshold", "1e9")


def keys_of(value, prefix=""):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield f"{prefix}{key}"
            yield from keys_of(inner, f"{prefix}{key}.")
    elif isinstance(value, list):
        for inner in value:
            yield from keys_of(inner, prefix)


def test_bundle_holds_exactly_the_adapters_tokenizer_notice_public_report_and_model_card(released):
    assert {p.name for p in (released / "adapter").iterdir()} == BUNDLE_FILES
    assert sorted(p.name for p in released.iterdir()) == ["adapter", "private_run_record"]


def test_no_bundle_file_holds_a_row_hash_fingerprint_loss_count_or_the_noise_seed(released):
    from conftest import bundled_cards
    from utils.data import clean_rows, row_hash

    private = released / "private_run_record"
    identity = json.loads((private / "checkpoints" / "step_000002" / "run_identity.json").read_text())
    results = json.loads((private / "results.json").read_text())
    summary = json.loads((private / "data_summary.json").read_text())
    cards, _ = clean_rows(bundled_cards()[:60])
    secrets = {
        identity["dataset_fingerprint"],
        *(row_hash(c) for c in cards),
        summary["dataset"],
        repr(results["train/loss"]),
        repr(results["eval/loss"]),
        f"{results['train/loss']:.4f}",
        f"{results['eval/loss']:.4f}",
    }
    for path in (released / "adapter").iterdir():
        text = path.read_bytes().decode("utf-8", errors="replace")
        for secret in secrets:
            assert secret not in text, (path.name, secret)
        assert not re.search(rf"(?<!\d){NOISE_SEED}(?!\d)", text), path.name
    report = json.loads((released / "adapter" / "privacy_report.json").read_text())
    assert not {k.split(".")[-1] for k in keys_of(report)} & PRIVATE_KEYS
    assert (
        "seed" not in report and report["split"]["seed"] == 0
    )  # the split key is public; the noise seed is not


def test_private_record_says_what_it_is_and_holds_the_seed_and_losses(released):
    private = released / "private_run_record"
    assert (
        "PRIVATE RUN RECORD" in (private / "README.txt").read_text()
        and "NOT cover" in (private / "README.txt").read_text()
    )
    assert json.loads((private / "args.json").read_text())["training"]["seed"] == int(NOISE_SEED)
    assert "eval/loss" in json.loads((private / "results.json").read_text())


def test_model_card_loads_with_huggingface_hub_and_states_relation_threat_model_and_not_covered(released):
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard.load(released / "adapter" / "README.md")
    metadata = card.data.to_dict()
    assert metadata["library_name"] == "peft" and metadata["license"] == "gemma"
    assert (
        "differential-privacy" in metadata["tags"] and "base_model" not in metadata
    )  # a local base has no hub id
    assert (
        ModelCardData(**metadata).to_dict() == metadata
    )  # the metadata is what the hub's schema object accepts
    text = " ".join(card.text.split())
    report = json.loads((released / "adapter" / "privacy_report.json").read_text())
    assert RELATION in text and "does not know the seed" in text
    for item in NOT_COVERED:
        assert " ".join(item.split()) in text
    assert "epsilon and delta rounded up" in text and report["guarantee"].split("epsilon <= ")[1][:4] in text


def test_model_card_names_a_hub_base_model():
    from utils.model_card import hub_base_model

    assert hub_base_model("google/vaultgemma-1b") == "google/vaultgemma-1b"
    assert hub_base_model("gemma3-270m") == "google/gemma-3-270m"
    assert hub_base_model("kaggle:google/vaultgemma/transformers/1b") == "google/vaultgemma-1b"
    assert hub_base_model("/tmp/model") is None and hub_base_model("model.gguf") is None


def test_readme_privacy_section_states_the_same_relation_and_not_covered_list_as_the_model_card():
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert RELATION in readme and "does not know the seed" in readme
    for item in NOT_COVERED:
        assert " ".join(item.split()) in readme, item


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "bundle"
    run_dir.atomic_directory(target, lambda d: (d / "a").write_text("1"))

    def failing(directory):
        (directory / "a").write_text("2")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        run_dir.atomic_directory(target, failing)
    assert (target / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_find_adapters_explains_a_run_dir_without_a_bundle(tmp_path):
    (tmp_path / "private_run_record" / "checkpoints" / "step_000003").mkdir(parents=True)
    (tmp_path / "private_run_record" / "checkpoints" / "step_000003" / "training_state.pt").write_bytes(b"")
    with pytest.raises(run_dir.RunDirError, match="latest checkpoint is .*step_000003"):
        run_dir.find_adapters(str(tmp_path))
