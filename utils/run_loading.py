"""Load a base model with a run's adapters for inference, and say what privacy guarantee they carry.

load_for_inference() takes --adapters as OUT, OUT/adapter or a checkpoint directory (utils/run_dir.py
find_adapters), loads the base model named by --model, else by the run's args.json when the private
record is at hand, else by adapter_config.json, with utils.model_loading (the same resolution as
training), attaches the adapters, checks that every saved tensor found its place (shape mismatches
and missing/unexpected keys raise AdapterError), and optionally merges them. The guarantee comes
from the bundle's own privacy_report.json, so a bundle shared alone says the same as in its run.
"""

import warnings
from pathlib import Path

import torch

from utils.cli import UserError
from utils.run_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RunDirError, find_adapters, read_json


class AdapterError(UserError):
    """A one-line, user-facing problem with --adapters."""


def describe_privacy(report: dict | None) -> str:
    """One line: the guarantee the adapters carry, rounded up, with its relation and threat model."""
    from utils.privacy_record import PrivacyRecord

    if report is None:
        return "privacy unknown (no privacy_report.json in the adapter directory)"
    try:
        return PrivacyRecord.from_json(report).guarantee_line()
    except TypeError:
        return "privacy unknown (privacy_report.json is not a report this project wrote)"


# -----------------------------------------------------------------------------
# loading


def _base_model_name(found, model: str | None) -> tuple[str, str]:
    """(base model, where the name came from): --model, else args.json, else adapter_config.json."""
    if model:
        return model, "--model"
    if found is None:
        from utils.model_loading import DEFAULT_MODEL

        return DEFAULT_MODEL, "default"
    saved = ((found.args or {}).get("model") or {}).get("model")
    if saved:
        return saved, "args.json"
    try:
        saved = read_json(found.adapter_dir / ADAPTER_CONFIG).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise AdapterError(f"cannot read {found.adapter_dir / ADAPTER_CONFIG}: {error}") from None
    if saved:
        return saved, ADAPTER_CONFIG
    raise AdapterError(f"{found.adapter_dir} does not name its base model; pass --model")


def _attach_adapters(base_model, adapter_dir: Path, base_name: str):
    """PeftModel over base_model, raising AdapterError unless every saved tensor fits exactly."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    misfit = (
        f"the adapters in {adapter_dir} do not fit base model {base_name!r} "
        "(trained on another model? pass the right --model)"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # missing keys are checked below, exactly
            model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    except RuntimeError as error:
        if "size mismatch" in str(error):
            first = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), "")
            raise AdapterError(f"{misfit}: {first}") from None
        raise
    except (ValueError, KeyError) as error:  # e.g. "Target modules {...} not found in the base model"
        raise AdapterError(
            f"{misfit}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as saved:
        saved_keys = set(saved.keys())
    model_keys = set(get_peft_model_state_dict(model).keys())
    if saved_keys != model_keys:
        unplaced, uncovered = sorted(saved_keys - model_keys), sorted(model_keys - saved_keys)
        detail = (
            f"{len(unplaced)} saved tensors have no place in it (e.g. {unplaced[0]})"
            if unplaced
            else f"{len(uncovered)} adapter tensors of the model were not saved (e.g. {uncovered[0]})"
        )
        raise AdapterError(f"{misfit}: {detail}")
    return model


def load_for_inference(
    adapters: str | None,
    model: str | None = None,
    *,
    load_in_4bit: bool = False,
    merge: bool = False,
    device=None,
):
    """(model, tokenizer, info) ready for generate_answers: eval mode, left-padding tokenizer.

    adapters=None answers with the base model alone (default model: --model or DEFAULT_MODEL).
    merge=True folds the adapters into the (non-quantized) base weights for faster generation.
    info: base_model, base_model_from, adapter_dir, run_dir, privacy_report (the bundle's), privacy (one line),
    merged, load_in_4bit, device, trained_in_4bit.
    Raises AdapterError (bad --adapters) or utils.model_loading.ModelLoadError (model unreachable).
    """
    from utils.model_loading import ModelLoadError, load_base_model, load_tokenizer

    if merge and load_in_4bit:
        raise AdapterError("--merge needs a non-quantized base; drop --load_in_4bit or --merge")
    if merge and not adapters:
        raise AdapterError("--merge needs --adapters")
    try:
        found = find_adapters(adapters) if adapters else None
    except RunDirError as error:
        raise AdapterError(str(error)) from None
    base_name, base_from = _base_model_name(found, model)
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )

    try:
        tokenizer = load_tokenizer(base_name)
        base_model = load_base_model(base_name, load_in_4bit=load_in_4bit, device=device)
    except ModelLoadError as error:
        if base_from in ("--model", "default"):
            raise
        raise ModelLoadError(
            f"{error} (base model named by the {base_from} of {adapters}; pass --model to override)"
        ) from None
    tokenizer.padding_side = "left"  # prompts end where generation starts, for every row of a batch
    if len(tokenizer) > base_model.get_input_embeddings().weight.shape[0]:
        raise ModelLoadError(
            f"tokenizer of {base_name!r} has {len(tokenizer)} tokens but the model only "
            f"{base_model.get_input_embeddings().weight.shape[0]}"
        )
    net = base_model
    if found:
        net = _attach_adapters(base_model, found.adapter_dir, base_name)
        if merge:
            net = net.merge_and_unload()
    net.eval()
    saved_model_args = ((found.args if found else None) or {}).get("model") or {}
    report = found.public_report if found else None
    info = {
        "base_model": base_name,
        "base_model_from": base_from,
        "adapter_dir": str(found.adapter_dir) if found else None,
        "run_dir": str(found.run_dir) if found and found.run_dir else None,
        "privacy_report": report,
        "privacy": describe_privacy(report)
        if found
        else "base model only (no adapters; no fine-tuning, so no DP claim applies)",
        "merged": bool(found) and merge,
        "load_in_4bit": load_in_4bit,
        "trained_in_4bit": bool(saved_model_args.get("load_in_4bit")),
        "device": str(device),
    }
    return net, tokenizer, info
