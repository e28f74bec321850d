"""Every mistake a user can make ends in one line on stderr ("error: ..."), exit code 2, and nothing left behind:
--output_dir is not created. A bug (any other exception) is not swallowed: it propagates with its traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate_qa
import infer
import train_dp_lora
from conftest import REPO, bundled_cards, write_cards

COMMON = [
    "--report_to",
    "none",
    "--logical_batch_size",
    "8",
    "--per_device_train_batch_size",
    "4",
    "--eval_steps",
    "0",
    "--max_steps",
    "2",
]


@pytest.fixture(scope="module")
def cards(tmp_path_factory) -> str:
    return write_cards(tmp_path_factory.mktemp("cards") / "cards.jsonl", bundled_cards()[:60])


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].strip() != "error:", captured.err
    return lines[0]


def train_fails(capsys, model_dir, dataset, out: Path, *extra) -> str:
    """Run train_dp_lora's command line in-process; it must fail with one line and code 2, writing nothing."""
    assert not out.exists()
    code = train_dp_lora.cli_main(
        ["--model", model_dir, "--dataset", dataset, "--output_dir", str(out), *COMMON, *extra]
    )
    line = one_error_line(capsys)
    assert code == 2, line
    assert not out.exists(), f"--output_dir was created: {sorted(p.name for p in out.rglob('*'))}"
    return line


def test_unreachable_epsilon_names_the_smallest_reachable_one(tiny_model_dir, cards, tmp_path, capsys):
    line = train_fails(
        capsys, tiny_model_dir, cards, tmp_path / "out", "--epsilon", "0.001", "--accountant", "rdp"
    )
    assert "--epsilon 0.001 is below the smallest epsilon" in line
    floor = float(line.split("raise --epsilon to at least ")[1].split()[0])
    assert 0.001 < floor < 1


def test_delta_not_below_one_over_n(tiny_model_dir, cards, tmp_path, capsys):
    line = train_fails(capsys, tiny_model_dir, cards, tmp_path / "out", "--delta", "0.5")
    assert "--delta 0.5 must be in (0, 1/N)" in line and "training rows" in line


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--momentum", "0.5"], "--momentum applies to --optimizer sgd only, not adamw"),
        (["--optimizer", "sgd", "--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    ],
)
def test_momentum_is_refused_without_sgd_and_outside_0_to_1(
    tiny_model_dir, cards, tmp_path, capsys, flags, message
):
    assert message in train_fails(capsys, tiny_model_dir, cards, tmp_path / "out", *flags)


def test_missing_dataset_file(tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "no_such_cards.jsonl"
    line = train_fails(capsys, tiny_model_dir, str(missing), tmp_path / "out")
    assert line == f"error: dataset file not found: {missing}"


def test_dataset_with_invalid_json(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(bundled_cards()[0]) + "\n{not json\n", encoding="utf-8")
    line = train_fails(capsys, tiny_model_dir, str(bad), tmp_path / "out")
    assert f"{bad}:2: not valid JSON" in line


def test_dataset_without_the_needed_columns(tiny_model_dir, tmp_path, capsys):
    bad = write_cards(
        tmp_path / "bad.jsonl",
        [{"question": c["input"], "answer": c["output"]} for c in bundled_cards()[:20]],
    )
    line = train_fails(capsys, tiny_model_dir, bad, tmp_path / "out")
    assert "missing column(s) input, output" in line and "found answer, question" in line


def test_rows_longer_than_max_seq_length(tiny_model_dir, cards, tmp_path, capsys):
    line = train_fails(capsys, tiny_model_dir, cards, tmp_path / "out", "--max_seq_length", "8")
    assert "training rows are longer than --max_seq_length 8 tokens" in line
    lengths = line.split("(lengths: ")[1].split(",")[:3]
    assert [part.split()[0] for part in lengths] == ["min", "median", "max"]
    assert all(int(part.split()[1]) > 8 for part in lengths), line
    assert "raise --max_seq_length" in line


def test_existing_run_is_not_replaced_without_overwrite(tiny_model_dir, cards, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "private_run_record").mkdir(parents=True)
    (out / "private_run_record" / "args.json").write_text("{}\n", encoding="utf-8")
    (out / "adapter").mkdir()
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    code = train_dp_lora.cli_main(
        ["--model", tiny_model_dir, "--dataset", cards, "--output_dir", str(out), *COMMON]
    )
    line = one_error_line(capsys)
    assert code == 2 and "already holds a run" in line and "--overwrite_output_dir" in line
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_resume_without_a_checkpoint(tiny_model_dir, cards, tmp_path, capsys):
    line = train_fails(capsys, tiny_model_dir, cards, tmp_path / "out", "--resume_from_checkpoint", "latest")
    assert line.startswith("error: no checkpoint under") and line.endswith("to resume from")


def test_resume_from_a_directory_that_is_not_a_checkpoint(tiny_model_dir, cards, tmp_path, capsys):
    line = train_fails(
        capsys, tiny_model_dir, cards, tmp_path / "out", "--resume_from_checkpoint", str(tmp_path)
    )
    assert "is not a checkpoint directory" in line


def test_an_internal_error_is_not_swallowed(tiny_model_dir, cards, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(train_dp_lora, "prepare_data", broken)
    with pytest.raises(RuntimeError, match="a bug, not a user error"):
        train_dp_lora.cli_main(
            ["--model", tiny_model_dir, "--dataset", cards, "--output_dir", str(tmp_path / "out"), *COMMON]
        )
    assert "error:" not in capsys.readouterr().err


def test_infer_with_a_missing_adapters_directory(tmp_path, capsys):
    missing = tmp_path / "no_run"
    code = infer.cli_main(["--adapters", str(missing), "--question", "What causes gout?"])
    assert code == 2 and one_error_line(capsys) == f"error: --adapters {missing}: no such directory"


def test_evaluate_qa_with_a_missing_adapters_directory(tmp_path, capsys):
    missing, out = tmp_path / "no_run", tmp_path / "eval"
    code = evaluate_qa.cli_main(["--adapters", str(missing), "--output_dir", str(out), "--report_to", "none"])
    assert code == 2 and one_error_line(capsys) == f"error: --adapters {missing}: no such directory"
    assert not out.exists()


def test_the_real_command_line_prints_nothing_but_the_error(tiny_model_dir, cards, tmp_path):
    """In a fresh process (real stderr, no capture): no log line or progress bar before the one error line,
    for a mistake found only after the tokenizer and the data were loaded."""
    out = tmp_path / "out"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    result = subprocess.run(
        [
            sys.executable,
            "train_dp_lora.py",
            "--model",
            tiny_model_dir,
            "--dataset",
            cards,
            "--output_dir",
            str(out),
            *COMMON,
            "--delta",
            "0.5",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --delta 0.5 must be in (0, 1/N)"), result.stderr
    assert result.stdout == "" and not out.exists()
