"""A kill -9 never corrupts a run: real training processes are SIGKILLed mid-step, mid-checkpoint-write and
between the final writes; what they leave on disk is complete and self-consistent, and `--resume_from_checkpoint
latest` ends with adapters bitwise equal to an uninterrupted run's, at the same epsilon.

The kills are deterministic: the process kills itself at a named crash point (DP_LORA_TEST_KILL_AT, read by
utils/run_dir.py crash_point; test-only). The killed runs are subprocesses (`python train_dp_lora.py ...`, two at a
time, while the reference runs here); the resumes and the reference run in-process on one thread, like the
subprocesses (OMP_NUM_THREADS=1), so that all of them compute with the same kernels.
"""

import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import train_dp_lora
from conftest import REPO, bundled_cards, write_cards
from utils import privacy
from utils.run_dir import RunDir

STEPS, SAVE_STEPS = (
    4,
    2,
)  # checkpoints at steps 2 and 4; step 4 is written twice (by the loop, then by finish)
BUNDLE_FILES = [
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "NOTICE",
    "privacy_report.json",
    "README.md",
]
CHECKPOINT_FILES = ["training_state.pt", "privacy_record.json", "run_identity.json", "counters.json"]

# name: (crash point, the latest complete checkpoint the kill leaves, the hidden temporaries it leaves, bundle left?)
SCENARIOS = {
    "first_checkpoint_write": (
        "step_000002/privacy_record.json:before_rename",
        None,
        [r"private_run_record/checkpoints/\.step_000002\.tmp-.*"],
        False,
    ),
    "mid_step": ("step_3:mid", 2, [], False),
    "checkpoint_write": (
        "step_000004/privacy_record.json:before_rename",
        2,
        [r"private_run_record/checkpoints/\.step_000004\.tmp-.*"],
        False,
    ),
    "checkpoint_replace": (
        "step_000004:old_moved",
        2,
        [
            r"private_run_record/checkpoints/\.step_000004\.old-.*",
            r"private_run_record/checkpoints/\.step_000004\.tmp-.*",
        ],
        False,
    ),
    "bundle_write": ("adapter:before_rename", 4, [r"\.adapter\.tmp-.*"], False),
    "results_write": (
        "private_run_record/results.json:before_rename",
        4,
        [r"private_run_record/\.results\.json\.tmp-.*"],
        True,
    ),
}


def run_args(model_dir, cards, out, *extra):
    return [
        "--model",
        model_dir,
        "--dataset",
        cards,
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--logical_batch_size",
        "8",
        "--per_device_train_batch_size",
        "4",
        "--eval_steps",
        "0",
        "--accountant",
        "rdp",
        "--max_steps",
        str(STEPS),
        "--save_steps",
        str(SAVE_STEPS),
        *extra,
    ]


def run_in_process(argv) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed subprocesses: the same kernels, hence the same bits
    try:
        return train_dp_lora.cli_main(argv)
    finally:
        torch.set_num_threads(threads)


def run_killed(argv, kill_at: str, log: Path) -> int:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        DP_LORA_TEST_KILL_AT=kill_at,
    )
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "train_dp_lora.py", *argv],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        return process.wait(timeout=300)


def adapter_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def assert_bundle(directory: Path) -> None:
    for name in BUNDLE_FILES:
        assert (directory / name).is_file(), f"{directory} lacks {name}"
    assert "epsilon" in json.loads((directory / "privacy_report.json").read_text())
    assert adapter_tensors(directory), f"{directory}: no tensors"


def assert_consistent(out: Path) -> list[str]:
    """Every non-hidden file and directory is complete; return the hidden temporaries (relative paths)."""
    temporaries = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        hidden = [part for part in rel.parts if part.startswith(".")]
        if hidden:
            if hidden == [rel.name]:  # the top of a hidden tree: only what the next start removes
                assert re.match(r"^\..+\.(tmp|old)-", rel.name), f"unexpected hidden entry {rel}"
                temporaries.append(rel.as_posix())
            continue
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))  # raises on a half-written file
    run = RunDir(out)
    for entry in sorted(run.checkpoints.iterdir()) if run.checkpoints.is_dir() else []:
        if entry.name.startswith("."):
            continue
        match = re.fullmatch(r"step_(\d{6})", entry.name)
        assert match and entry.is_dir(), f"unexpected entry {entry}"
        for name in CHECKPOINT_FILES:
            assert (entry / name).is_file(), f"{entry} lacks {name}"
        assert_bundle(entry / "adapter")
        step = int(match.group(1))
        assert torch.load(entry / "training_state.pt", weights_only=False)["step"] == step
        assert json.loads((entry / "privacy_record.json").read_text())["steps_taken"] == step
    if run.bundle.exists():
        assert_bundle(run.bundle)
    return temporaries


@pytest.fixture(scope="module", autouse=True)
def memoized_accounting():
    """In this process, each epsilon is computed once (pure functions of the history and delta): the in-process
    runs calibrate and account exactly as the subprocesses do, without paying seconds of accountant time each."""

    def memoize(function, key):
        cache = {}
        return (
            lambda *args: cache[key(*args)]
            if key(*args) in cache
            else cache.setdefault(key(*args), function(*args))
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            privacy,
            "accountant_epsilon",
            memoize(
                privacy.accountant_epsilon,
                lambda acc, delta: (acc.mechanism(), tuple(tuple(h) for h in acc.history), delta),
            ),
        )
        patch.setattr(
            train_dp_lora,
            "replace_one_epsilon",
            memoize(
                train_dp_lora.replace_one_epsilon,
                lambda history, delta: (tuple(tuple(h) for h in history), delta),
            ),
        )
        yield


@pytest.fixture(scope="module")
def cards(tmp_path_factory) -> str:
    return write_cards(tmp_path_factory.mktemp("cards") / "cards.jsonl", bundled_cards()[:60])


@pytest.fixture(scope="module")
def runs(request, tiny_model_dir, cards, tmp_path_factory):
    """The selected scenarios' killed runs (two subprocesses at a time) and, meanwhile, the uninterrupted reference."""
    selected = [
        name
        for name in SCENARIOS
        if any(
            item.module is request.module
            and getattr(item, "callspec", None)
            and item.callspec.params.get("name") == name
            for item in request.session.items
        )
    ]
    root = tmp_path_factory.mktemp("kills")
    outs = {name: root / name for name in selected}
    with ThreadPoolExecutor(max_workers=2) as pool:
        codes = {
            name: pool.submit(
                run_killed,
                run_args(tiny_model_dir, cards, outs[name]),
                SCENARIOS[name][0],
                root / f"{name}.log",
            )
            for name in selected
        }
        reference = root / "reference"
        assert run_in_process(run_args(tiny_model_dir, cards, reference)) == 0
        codes = {name: future.result() for name, future in codes.items()}
    logs = {name: (root / f"{name}.log").read_text(errors="replace")[-3000:] for name in selected}
    return reference, outs, codes, logs


def assert_same_as_reference(out: Path, reference: Path) -> None:
    assert assert_consistent(out) == [], "a finished run keeps no temporaries"
    assert [p for p in out.rglob(".*")] == []
    expected, actual = adapter_tensors(reference / "adapter"), adapter_tensors(out / "adapter")
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), f"{key} differs from the uninterrupted run"
    report = json.loads((out / "adapter" / "privacy_report.json").read_text())
    assert (
        report["epsilon"]
        == json.loads((reference / "adapter" / "privacy_report.json").read_text())["epsilon"]
    )
    assert report["steps_taken"] == STEPS
    assert json.loads(RunDir(out).results_file.read_text())["steps"] == STEPS


# The replace window of a checkpoint and the kill after the bundle add ~25 s of CPU: with the slow tests (-m slow).
EXTRA = {"checkpoint_replace", "results_write"}


@pytest.mark.numerics  # a bitwise resume check (torch.equal of the adapters)
@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[pytest.mark.slow] if name in EXTRA else []) for name in SCENARIOS]
)
def test_kill_leaves_a_consistent_run_that_resumes_to_the_same_adapters(
    name, runs, tiny_model_dir, cards, capsys
):
    reference, outs, codes, logs = runs
    kill_at, latest, temporaries, bundle = SCENARIOS[name]
    out = outs[name]
    assert codes[name] == -signal.SIGKILL, f"the run was not killed at {kill_at}:\n{logs[name]}"

    left = assert_consistent(out)
    assert len(left) == len(temporaries) and all(
        any(re.fullmatch(p, t) for t in left) for p in temporaries
    ), left
    found = RunDir(out).latest_checkpoint()
    assert (int(found.name.split("_")[1]) if found else None) == latest
    assert RunDir(out).bundle.exists() == bundle
    assert not RunDir(out).results_file.exists()
    capsys.readouterr()

    argv = run_args(tiny_model_dir, cards, out, "--resume_from_checkpoint", "latest")
    if latest is None:  # killed before any checkpoint existed: resume says so; the run must be started afresh
        assert run_in_process(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: no checkpoint under"), err
        assert assert_consistent(out) == left  # the refusal wrote and removed nothing
        assert (
            run_in_process(run_args(tiny_model_dir, cards, out)) == 2
        )  # nor does a fresh run replace it unasked
        assert "--overwrite_output_dir" in capsys.readouterr().err
        argv = run_args(tiny_model_dir, cards, out, "--overwrite_output_dir")
    assert run_in_process(argv) == 0
    assert_same_as_reference(out, reference)
