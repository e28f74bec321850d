"""Step-numbered checkpoints written atomically, holding everything a resume needs.

    checkpoints/step_000100/
        adapter/               PEFT adapters (PeftModel.from_pretrained loads them) + tokenizer
        training_state.pt      optimizer, scheduler, RNG states, step
        privacy_state.json     accountant history and the sampling/noise parameters it is valid for
        privacy_report.json    the report as of this step
        args.json              the resolved arguments

A checkpoint is written to a temporary directory and renamed into place, so a killed run never
leaves a half-written checkpoint that `--resume_from_checkpoint latest` could pick up.
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

CHECKPOINT_DIR = "checkpoints"
# Adapters are Model Derivatives under the Gemma Terms of Use, which require this notice with every copy.
GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def write_json(path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def atomic_directory(final_path: str | Path, write) -> Path:
    """Call write(tmp_dir) and rename tmp_dir to final_path (replacing an older one)."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_path.name}.tmp-", dir=final_path.parent))
    try:
        write(tmp)
        if final_path.exists():
            old = final_path.with_name(f".{final_path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final_path, old)
            os.replace(tmp, final_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_path


def save_adapter(model, tokenizer, directory) -> None:
    """PEFT adapters + tokenizer + the Gemma NOTICE, in one directory."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    Path(directory, "NOTICE").write_text(GEMMA_NOTICE, encoding="utf-8")


def rng_state(noise_generator: torch.Generator | None) -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if noise_generator is not None:
        state["noise_generator"] = noise_generator.get_state()
    return state


def restore_rng_state(state: dict, noise_generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if noise_generator is not None and "noise_generator" in state:
        noise_generator.set_state(state["noise_generator"])


def find_checkpoint(output_dir: str, which: str) -> Path:
    """`latest` -> the highest step_* under output_dir/checkpoints; otherwise the given path."""
    if which != "latest":
        path = Path(which)
        if not (path / "training_state.pt").exists():
            raise FileNotFoundError(f"{path} is not a checkpoint directory (no training_state.pt)")
        return path
    root = Path(output_dir) / CHECKPOINT_DIR
    steps = sorted(
        (int(m.group(1)), p) for p in (root.iterdir() if root.exists() else []) if (m := _STEP_DIR.match(p.name))
    )
    if not steps:
        raise FileNotFoundError(f"no checkpoint under {root} to resume from")
    return steps[-1][1]
