"""utils/model_loading.py: every --model source, tokenizer settings, 4-bit on CPU, and failing fast offline.

Offline and on CPU with tiny random models (conftest's tiny_model_dir, a tiny GGUF written here); only the
slow test touches the real embedded Gemma 3 270M.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils.model_loading import (
    DEFAULT_MODEL,
    EMBEDDED_MODEL,
    ModelLoadError,
    default_compute_dtype,
    hub_unreachable_reason,
    load_base_model,
    load_tokenizer,
    resolve_model_source,
)

REPO = Path(__file__).resolve().parent.parent
UNCACHED_HUB_ID = "dp-lora-tests/never-cached-model"  # no such repo anywhere, so never in a HF cache
UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"  # discard port: nothing listens, connect is refused at once
FAST_FAILURE_S = 10.0


def write_tiny_llama_gguf(
    path: Path, vocab_size: int = 300, hidden: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    """A random-weight llama GGUF (f32) with a byte-fallback tokenizer, written with the gguf package."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    heads, kv_heads, ffn = 4, 2, 64
    kv_dim = kv_heads * hidden // heads
    specials = ["<pad>", "</s>", "<s>", "<unk>"]  # pad 0, eos 1, bos 2, unk 3 as in Gemma
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    words = [f"\u2581w{i}" for i in range(vocab_size - len(specials) - len(byte_pieces))]
    tokens = specials + byte_pieces + words
    token_types = [3, 3, 3, 2] + [6] * len(byte_pieces) + [1] * len(words)  # control, unknown, byte, normal

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(token_types)
    writer.add_pad_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_bos_token_id(2)
    writer.add_unk_token_id(3)
    shapes = {
        "token_embd.weight": (vocab_size, hidden),
        "output_norm.weight": (hidden,),
        "output.weight": (vocab_size, hidden),
    }
    for i in range(layers):
        shapes.update(
            {
                f"blk.{i}.attn_norm.weight": (hidden,),
                f"blk.{i}.ffn_norm.weight": (hidden,),
                f"blk.{i}.attn_q.weight": (hidden, hidden),
                f"blk.{i}.attn_k.weight": (kv_dim, hidden),
                f"blk.{i}.attn_v.weight": (kv_dim, hidden),
                f"blk.{i}.attn_output.weight": (hidden, hidden),
                f"blk.{i}.ffn_gate.weight": (ffn, hidden),
                f"blk.{i}.ffn_up.weight": (ffn, hidden),
                f"blk.{i}.ffn_down.weight": (hidden, ffn),
            }
        )
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_frozen_eager_eval(model):
    assert model.config._attn_implementation == "eager"
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_resolve_model_source_classifies_hub_local_kaggle_gguf_and_embedded(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("DP_LORA_CACHE", str(tmp_path / "cache"))
    gguf_path = tmp_path / "weights" / "model.gguf"
    gguf_path.parent.mkdir()
    gguf_path.write_bytes(b"")

    hub = resolve_model_source(DEFAULT_MODEL)
    assert hub == {"kind": "hub", "path": DEFAULT_MODEL, "gguf_file": None, "name": DEFAULT_MODEL}
    local = resolve_model_source(tiny_model_dir)
    assert (local["kind"], Path(local["path"])) == ("local", Path(tiny_model_dir).resolve())
    kaggle = resolve_model_source("kaggle:google/vaultgemma/transformers/1b/2")
    assert (kaggle["kind"], kaggle["path"]) == ("kaggle", "google/vaultgemma/transformers/1b/2")
    assert (
        resolve_model_source("kaggle:google/vaultgemma/transformers/1b")["path"]
        == "google/vaultgemma/transformers/1b"
    )
    gguf = resolve_model_source(str(gguf_path))
    assert (gguf["kind"], gguf["path"], gguf["gguf_file"]) == (
        "gguf",
        str(gguf_path.parent.resolve()),
        "model.gguf",
    )
    embedded = resolve_model_source(EMBEDDED_MODEL)
    assert (embedded["kind"], embedded["path"]) == ("embedded", str(tmp_path / "cache" / EMBEDDED_MODEL))

    for bad in [
        "kaggle:google/vaultgemma",
        "kaggle:google/vaultgemma/transformers/1b/latest",
        str(tmp_path / "missing.gguf"),
        str(tmp_path / "no_such_dir"),
        str(tmp_path),
    ]:  # tmp_path exists but has no config.json
        with pytest.raises(ModelLoadError):
            resolve_model_source(bad)


def test_local_directory_loads_eager_frozen_model(tiny_model_dir):
    model = load_base_model(tiny_model_dir, device="cpu")
    assert type(model).__name__ == "VaultGemmaForCausalLM"
    assert_frozen_eager_eval(model)
    assert model.dtype == torch.float32
    logits = model(torch.tensor([[2, 10, 11, 12]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()


def test_dtype_argument_sets_parameter_dtype(tiny_model_dir):
    model = load_base_model(tiny_model_dir, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_tokenizer_pads_right_adds_bos_and_pad_differs_from_eos(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 0  # Gemma's own pad: nothing added
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    batch = tokenizer(["short", "a longer second text"], padding=True)
    assert all(ids[0] == tokenizer.bos_token_id for ids in batch["input_ids"])
    assert batch["input_ids"][0][-1] == tokenizer.pad_token_id and batch["attention_mask"][0][-1] == 0
    assert tokenizer.eos_token_id not in batch["input_ids"][1]


def test_tokenizer_without_distinct_pad_gets_one_and_bos_back(tiny_model_dir, tmp_path):
    # a tokenizer saved with left padding, no BOS and pad == eos is repaired on load
    broken_dir = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken_dir)
    tokenizer = load_tokenizer(str(broken_dir))
    tokenizer.padding_side = "left"
    tokenizer.add_bos_token = False
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(broken_dir)

    repaired = load_tokenizer(str(broken_dir))
    assert repaired.padding_side == "right"
    assert repaired("x").input_ids[0] == repaired.bos_token_id
    assert repaired.pad_token == "<pad>" and repaired.pad_token_id != repaired.eos_token_id
    assert len(repaired) == len(tokenizer)  # "<pad>" was already in the vocab: reused, not added


def run_loaders_in_fresh_process(models: list[str], env: dict, warm_up: str) -> list[tuple[str, float]]:
    """load_tokenizer + load_base_model per model in a new interpreter, so env vars count from import time as in a
    real run (HF_HUB_OFFLINE unset unless env sets it). Returns (LOADED or "ERROR <message>", seconds) per model.
    The local model `warm_up` is loaded first, off the clock: the seconds then time the hub resolution and the
    load, not transformers' lazy imports and first model set-up, which take over 10 s on a loaded 2-core machine."""
    script = (
        "import sys, time\n"
        "from utils.model_loading import ModelLoadError, load_base_model, load_tokenizer\n"
        "load_tokenizer(sys.argv[1]); load_base_model(sys.argv[1], device='cpu')\n"
        "for model in sys.argv[2:]:\n"
        "    started = time.monotonic()\n"
        "    try:\n"
        "        load_tokenizer(model); load_base_model(model, device='cpu'); result = 'LOADED'\n"
        "    except ModelLoadError as error:\n"
        "        result = f'ERROR {error}'\n"
        "    print(f'RESULT {time.monotonic() - started:.3f} {result}')\n"
    )
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    full_env.update(PYTHONPATH=str(REPO), **env)
    done = subprocess.run(
        [sys.executable, "-c", script, warm_up, *models],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    results = [line.split(" ", 2)[1:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and len(results) == len(models), done.stderr[-2000:]
    return [(result, float(seconds)) for seconds, result in results]


def test_hub_model_loads_from_cache_or_fails_fast_offline_naming_the_alternative(tiny_model_dir, tmp_path):
    # no internet looks like this: HF_HUB_OFFLINE unset and the endpoint unreachable. Unbounded, the hub
    # client retries ~23 s per file, even with local_files_only=True (transformers' PEFT-adapter probe).
    # A cached model must load without touching the network; an uncached one must fail within seconds.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = tmp_path / "models--dp-lora-tests--tiny-vaultgemma"  # the layout huggingface_hub writes
    shutil.copytree(tiny_model_dir, repo_cache / "snapshots" / commit)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(commit)
    (cached, cached_s), (uncached, uncached_s) = run_loaders_in_fresh_process(
        ["dp-lora-tests/tiny-vaultgemma", UNCACHED_HUB_ID],
        {"HF_ENDPOINT": UNREACHABLE_ENDPOINT, "HF_HUB_CACHE": str(tmp_path)},
        warm_up=tiny_model_dir,  # a local directory: no hub, no probe
    )
    assert cached == "LOADED" and cached_s < FAST_FAILURE_S
    assert uncached.startswith("ERROR") and EMBEDDED_MODEL in uncached and UNCACHED_HUB_ID in uncached
    assert uncached_s < FAST_FAILURE_S


def test_uncached_hub_model_fails_fast_with_hf_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # conftest also sets it before transformers is imported
    for load in (load_tokenizer, load_base_model):
        started = time.monotonic()
        with pytest.raises(ModelLoadError) as error:
            load(UNCACHED_HUB_ID)
        assert time.monotonic() - started < FAST_FAILURE_S
        assert (
            EMBEDDED_MODEL in str(error.value)
            and "HF_HUB_OFFLINE" in str(error.value)
            and "\n" not in str(error.value)
        )


def test_hub_unreachable_reason_names_offline_flag_or_endpoint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_unreachable_reason() == "HF_HUB_OFFLINE=1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE_ENDPOINT)
    assert UNREACHABLE_ENDPOINT in hub_unreachable_reason()


@pytest.mark.parametrize(
    "handle", ["kaggle:google/vaultgemma/transformers/1b", "kaggle:google/vaultgemma/transformers/1b/2"]
)
def test_uncached_kaggle_handle_fails_fast_offline(monkeypatch, tmp_path, handle):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setenv(
        "KAGGLE_API_ENVIRONMENT", "TEST"
    )  # kagglesdk's localhost:7777 endpoint: never the internet
    for load in (load_tokenizer, load_base_model):
        started = time.monotonic()
        with pytest.raises(ModelLoadError) as error:
            load(handle)
        assert time.monotonic() - started < FAST_FAILURE_S
        assert EMBEDDED_MODEL in str(error.value) and "\n" not in str(error.value)


def test_cached_kaggle_handle_loads_offline(tiny_model_dir, monkeypatch, tmp_path):
    # the layout kagglehub 1.0.3 writes: <cache>/models/<owner>/<model>/<framework>/<variation>/<version>/ +
    # <version>.complete
    cache = tmp_path / "kagglehub"
    variation = cache / "models" / "google" / "vaultgemma" / "transformers" / "tiny"
    shutil.copytree(tiny_model_dir, variation / "3")
    (variation / "3.complete").touch()
    shutil.copytree(tiny_model_dir, variation / "4")  # a download that never completed: no marker, ignored
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")

    for handle in (
        "kaggle:google/vaultgemma/transformers/tiny/3",
        "kaggle:google/vaultgemma/transformers/tiny",
    ):
        tokenizer = load_tokenizer(handle)
        model = load_base_model(handle, device="cpu")
        assert_frozen_eager_eval(model)
        assert len(tokenizer) == model.config.vocab_size
        assert Path(model.name_or_path) == variation / "3"
    with pytest.raises(ModelLoadError):
        load_base_model("kaggle:google/vaultgemma/transformers/tiny/4")


def test_gguf_file_loads_dense_frozen_model_and_its_tokenizer(tmp_path):
    gguf_path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    tokenizer = load_tokenizer(str(gguf_path))
    model = load_base_model(str(gguf_path), device="cpu")
    assert_frozen_eager_eval(model)
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert tokenizer.padding_side == "right" and tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    ids = tokenizer("\u2581w1\u2581w2", return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id
    assert torch.isfinite(model(ids).logits).all()
    with pytest.raises(ModelLoadError):
        load_base_model(str(gguf_path), load_in_4bit=True)


def test_load_in_4bit_quantizes_linear_layers_on_cpu(tiny_model_dir):
    import bitsandbytes as bnb

    model = load_base_model(tiny_model_dir, load_in_4bit=True, device="cpu")
    assert_frozen_eager_eval(model)
    quantized = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert model.config.quantization_config.bnb_4bit_compute_dtype == torch.float32  # fp32 on CPU
    logits = model(torch.tensor([[2, 10, 11, 12]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_default_compute_dtype_is_fp32_on_cpu():
    assert default_compute_dtype("cpu") == torch.float32
    assert default_compute_dtype(torch.device("cpu")) == torch.float32


def test_incomplete_embedded_cache_is_reported_not_used(monkeypatch, tmp_path):
    monkeypatch.setenv("DP_LORA_CACHE", str(tmp_path))
    (tmp_path / EMBEDDED_MODEL).mkdir()
    (tmp_path / EMBEDDED_MODEL / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="delete it"):
        load_base_model(EMBEDDED_MODEL, device="cpu")


@pytest.mark.slow
def test_embedded_gemma3_270m_converts_once_and_answers_greedily():
    # uses the real cache ($DP_LORA_CACHE or ~/.cache/vaultgemma_dp_lora): ~75 s the first time, seconds after
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    model = load_base_model(EMBEDDED_MODEL, device="cpu")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert_frozen_eager_eval(model)
    assert len(tokenizer) > 200_000 and len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    prompt = tokenizer("Question: What is the function of insulin?\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    assert answer.strip()


def test_reachability_probe_gives_up_in_time_when_connect_or_dns_hangs(monkeypatch):
    import socket
    import threading

    import utils.model_loading as model_loading

    released = threading.Event()

    def hanging_connect(*args, **kwargs):  # like a black-holed route or a resolver that never answers
        released.wait(30)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hanging_connect)
    monkeypatch.setattr(model_loading, "PROBE_TIMEOUT_S", 0.5)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    try:
        started = time.monotonic()
        assert "no connection" in hub_unreachable_reason()
        with pytest.raises(ModelLoadError, match=EMBEDDED_MODEL):
            load_base_model(UNCACHED_HUB_ID)
        assert time.monotonic() - started < 3.0
    finally:
        released.set()
