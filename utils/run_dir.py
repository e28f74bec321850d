"""The only code that knows a training run's directory layout, for writing and for reading.

    OUT/
      adapter/                      THE RELEASE BUNDLE: the one thing to share. Every file is a
                                    function of the released weights and public parameters:
        adapter_model.safetensors   PEFT adapters (PeftModel.from_pretrained(base, "OUT/adapter"))
        adapter_config.json
        tokenizer files
        NOTICE                      the Gemma Terms of Use notice (adapters are Model Derivatives)
        privacy_report.json         the public PrivacyRecord (utils/privacy_record.py)
        README.md                   the Hugging Face model card
      private_run_record/           PRIVATE: derived from the training data; never needed to load or
                                    use the adapters, and not covered by epsilon
        README.txt                  says so
        args.json                   the resolved arguments (dataset path, noise seed)
        data_summary.json           cleaning and split counts (no per-row data)
        results.json                final losses, counts, timings
        checkpoints/step_000100/    adapter/ (a bundle as of that step), training_state.pt,
                                    privacy_record.json, run_identity.json (what resume must match)
        tracking/                   W&B / TensorBoard logs

Every file and directory is written atomically (temporary name, fsync, rename), so a kill -9 at any
moment leaves each one either complete or absent; leftover temporaries start with "." and are
removed at the next start.
"""

import json
import os
import re
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from utils.cli import UserError

BUNDLE = "adapter"
PRIVATE = "private_run_record"
CHECKPOINTS = "checkpoints"
PUBLIC_REPORT = "privacy_report.json"
MODEL_CARD = "README.md"
NOTICE = "NOTICE"
CHECKPOINT_RECORD = "privacy_record.json"
RUN_IDENTITY = "run_identity.json"
TRAINING_STATE = "training_state.pt"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Adapters are Model Derivatives under the Gemma Terms of Use, which require this notice with every copy.
GEMMA_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n"
)
PRIVATE_README = """PRIVATE RUN RECORD - do not share.

Everything in this directory is derived from the private training data or from the randomness that
protects it: the resolved arguments (with the noise seed), cleaning and split counts, losses,
checkpoints and tracker logs. The differential-privacy guarantee (epsilon, delta) does NOT cover it.
The adapters in ../adapter/ do not need any of it to load or to answer questions.
"""
_STEP_DIR = re.compile(r"^step_(\d+)$")


class RunDirError(UserError):
    """A one-line, user-facing problem with a run directory."""


# -----------------------------------------------------------------------------
# test-only crash points

# TEST ONLY (tests/test_kill_recovery.py): when DP_LORA_TEST_KILL_AT names a crash point, the process
# kills itself with SIGKILL there, to check that a kill -9 at that moment leaves a consistent run.
# Read once at import; unset (always, outside that test) each crash point is one comparison with None.
_KILL_AT = os.environ.get("DP_LORA_TEST_KILL_AT") or None


def crash_point(name: str) -> None:
    """Test-only: kill -9 this process if DP_LORA_TEST_KILL_AT == name; otherwise nothing."""
    if _KILL_AT is not None and name == _KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def _crash_name(path: Path) -> str:
    """`step_000004/privacy_record.json`: a file and its directory, an atomic directory's temporary named as it."""
    parent = path.parent.name
    if parent.startswith(".") and ".tmp-" in parent:
        parent = parent[1:].split(".tmp-")[0]
    return f"{parent}/{path.name}"


# -----------------------------------------------------------------------------
# atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path, data) -> None:
    """Write JSON to a temporary file in the same directory, fsync it, and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make a shared bundle unreadable to others
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if _KILL_AT is not None:
            crash_point(f"{_crash_name(path)}:before_rename")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(directory))


def atomic_directory(final_path, write) -> Path:
    """Call write(tmp_dir), fsync it, and rename it to final_path (replacing an older one)."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_path.name}.tmp-", dir=final_path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        write(tmp)
        _fsync_tree(tmp)
        crash_point(f"{final_path.name}:before_rename")
        if final_path.exists():
            old = final_path.with_name(f".{final_path.name}.old-{os.getpid()}")
            os.replace(final_path, old)  # a kill here leaves no final_path: readers fall back to a checkpoint
            crash_point(f"{final_path.name}:old_moved")
            os.replace(tmp, final_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final_path)
        _fsync_dir(final_path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_path


def remove_stale_temporaries(directory) -> None:
    """Delete what a killed writer left behind (".NAME.tmp-*", ".NAME.old-*")."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# the layout


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root):
        object.__setattr__(self, "root", Path(root))

    @property
    def bundle(self) -> Path:
        return self.root / BUNDLE

    @property
    def private(self) -> Path:
        return self.root / PRIVATE

    @property
    def checkpoints(self) -> Path:
        return self.private / CHECKPOINTS

    @property
    def args_file(self) -> Path:
        return self.private / "args.json"

    @property
    def data_summary_file(self) -> Path:
        return self.private / "data_summary.json"

    @property
    def results_file(self) -> Path:
        return self.private / "results.json"

    @property
    def tracking_dir(self) -> Path:
        return self.private / "tracking"

    @property
    def public_report(self) -> Path:
        return self.bundle / PUBLIC_REPORT

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_dir_name(step)

    def holds_a_run(self) -> bool:
        return self.bundle.exists() or self.private.exists()

    def start(self, overwrite: bool) -> None:
        """Make the private record for a new run; an old run here is removed only with overwrite."""
        if self.holds_a_run():
            if not overwrite:
                raise RunDirError(
                    f"{self.root} already holds a run; pass --overwrite_output_dir to replace it, "
                    "or --resume_from_checkpoint latest to continue it"
                )
            shutil.rmtree(self.bundle, ignore_errors=True)
            shutil.rmtree(self.private, ignore_errors=True)
        self.open_private()

    def open_private(self) -> None:
        self.private.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.root)
        remove_stale_temporaries(self.private)
        remove_stale_temporaries(self.checkpoints)
        if not (self.private / "README.txt").exists():
            (self.private / "README.txt").write_text(PRIVATE_README, encoding="utf-8")

    def latest_checkpoint(self) -> Path | None:
        steps = sorted(
            (int(m.group(1)), p)
            for p in (self.checkpoints.iterdir() if self.checkpoints.is_dir() else [])
            if (m := _STEP_DIR.match(p.name)) and (p / TRAINING_STATE).is_file()
        )
        return steps[-1][1] if steps else None

    def find_checkpoint(self, which: str) -> Path:
        """`latest` -> the highest complete step_* of this run; otherwise the given checkpoint path."""
        if which != "latest":
            path = Path(which)
            if not (path / TRAINING_STATE).is_file():
                raise RunDirError(f"{path} is not a checkpoint directory (no {TRAINING_STATE})")
            return path
        latest = self.latest_checkpoint()
        if latest is None:
            raise RunDirError(f"no checkpoint under {self.checkpoints} to resume from")
        return latest


def write_bundle_contents(directory, model, tokenizer, public_report: dict, model_card: str) -> None:
    """A release bundle's files into `directory` (for atomic_directory)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / NOTICE).write_text(GEMMA_NOTICE, encoding="utf-8")
    (directory / PUBLIC_REPORT).write_text(json.dumps(public_report, indent=2) + "\n", encoding="utf-8")
    (directory / MODEL_CARD).write_text(model_card, encoding="utf-8")


# -----------------------------------------------------------------------------
# reading a run for inference and evaluation


@dataclass
class FoundAdapters:
    adapter_dir: Path
    run_dir: Path | None  # OUT, when the adapters are OUT/adapter or one of OUT's checkpoints
    public_report: dict | None
    args: dict | None  # the private record's args.json, when it is at hand (never required)


def find_adapters(path: str) -> FoundAdapters:
    """Accept OUT, OUT/adapter, or a checkpoint directory (holding adapter/)."""
    given = Path(path).expanduser()
    if not given.exists():
        raise RunDirError(f"--adapters {path}: no such directory")
    if not given.is_dir():
        raise RunDirError(f"--adapters {path} is a file, not an adapter directory")
    if (given / ADAPTER_CONFIG).is_file():
        adapter_dir = given
    elif (given / BUNDLE / ADAPTER_CONFIG).is_file():
        adapter_dir = given / BUNDLE
    else:
        latest = RunDir(given).latest_checkpoint()
        hint = f"; its latest checkpoint is {latest}" if latest else ""
        raise RunDirError(
            f"--adapters {path} is not an adapter directory (no {ADAPTER_CONFIG} in it or in its "
            f"{BUNDLE}/){hint}"
        )
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise RunDirError(f"{adapter_dir} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    report = _read_optional(adapter_dir / PUBLIC_REPORT)
    run_dir = _owning_run(adapter_dir)
    args = _read_optional(RunDir(run_dir).args_file) if run_dir else None
    return FoundAdapters(adapter_dir=adapter_dir, run_dir=run_dir, public_report=report, args=args)


def _owning_run(adapter_dir: Path) -> Path | None:
    """OUT for OUT/adapter and for OUT/private_run_record/checkpoints/step_N/adapter."""
    parent = adapter_dir.parent
    if adapter_dir.name == BUNDLE and (parent / PRIVATE).is_dir():
        return parent
    if (
        _STEP_DIR.match(parent.name)
        and parent.parent.name == CHECKPOINTS
        and parent.parent.parent.name == PRIVATE
    ):
        return parent.parent.parent.parent
    return None


def _read_optional(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RunDirError(f"cannot read {path}: {error}") from None
