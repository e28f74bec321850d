"""Experiment tracking through Accelerate's trackers; W&B offline when there is no key.

W&B is imported only when it is the chosen tracker. Without an API key (WANDB_API_KEY or a netrc
login) the run is logged offline under the output directory and the sync command is printed: it
never prompts and never waits on the network.
"""

import netrc
import os


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    # the file W&B itself reads: $NETRC, else ~/.netrc; an explicit path skips Python's permission check,
    # which W&B does not make either
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        hosts = netrc.netrc(path).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def prepare_wandb_environment() -> str:
    """Set W&B's environment before it is imported; returns 'online', 'offline' or 'disabled'."""
    os.environ.setdefault("WANDB_SILENT", "true")
    if os.environ.get("WANDB_MODE") not in ("offline", "disabled", "dryrun") and not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
    mode = os.environ.get("WANDB_MODE")
    return "disabled" if mode == "disabled" else "offline" if mode in ("offline", "dryrun") else "online"


def tracker_init_kwargs(report_to: str, output_dir: str, **wandb_kwargs) -> dict:
    """Per-tracker init arguments: a W&B run lives under the run's own output directory."""
    if report_to != "wandb":
        return {}
    return {"wandb": {"dir": os.path.abspath(output_dir), **wandb_kwargs}}


def tracker_names(report_to: str) -> list[str]:
    return [] if report_to == "none" else [report_to]


def wandb_run_dir(accelerator) -> str | None:
    """Directory of the active W&B run (what `wandb sync` takes), if W&B is tracking."""
    try:
        run = accelerator.get_tracker("wandb", unwrap=True)
    except (ValueError, KeyError):
        return None
    run_dir = getattr(run, "dir", None)
    return os.path.dirname(run_dir) if run_dir else None


def flatten_config(resolved: dict) -> dict:
    """Resolved argument groups as one flat dict of scalars (what trackers accept as hyperparameters)."""
    flat = {}
    for group, values in resolved.items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[key] = (
                    value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
                )
        elif values is not None:
            flat[group] = values if isinstance(values, (int, float, str, bool)) else str(values)
    return {k: ("" if v is None else v) for k, v in flat.items()}
