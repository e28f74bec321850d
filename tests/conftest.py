"""Shared fixtures: a tiny VaultGemma built from a config, a Gemma-style tokenizer made offline,
and small flashcard files. Everything runs offline on CPU."""

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "data" / "medical_flashcards.jsonl"
# the tiny tokenizers are trained on the first version's 520 cards (the bundle's first rows): every tuned
# threshold in the suite was measured with that tokenizer, and the bundle has grown since
TOKENIZER_CARDS = 520

# Never reach for the network from a test, and never prompt.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: needs the real embedded Gemma 3 270M or minutes of CPU; run with -m slow"
    )
    config.addinivalue_line(
        "markers",
        "numerics: the result depends on floating-point kernels or seeded statistics; "
        "CI reruns `pytest -m numerics` under other OMP_NUM_THREADS",
    )


# -----------------------------------------------------------------------------
# tolerances stated as an error budget
#
# A budget is in ulps of the expected tensor's largest entry: |actual - expected| <= budget * eps * max|expected|,
# with eps the machine epsilon (2**-52 = 2.2e-16 for fp64, 2**-23 = 1.2e-7 for fp32) of the precision that limits
# the computation. Note: VaultGemma's RMSNorm (x.float()) and eager softmax (dtype=torch.float32) run in fp32 even
# in an .double() model, forward and backward, so gradients through the body are fp32-limited: two runs whose fp64
# inputs differ in the last bit (another matmul blocking for another batch shape, another thread count) round
# differently there and differ by ~1 fp32 ulp of the largest gradient entry, never by fp64 ulps.

FP64_EPS = 2.0**-52
FP32_EPS = 2.0**-23


def scaled_error(actual, expected, eps: float) -> float:
    """max|actual - expected| / (eps * max|expected|): the difference in ulps of the largest expected entry.

    Sequences of tensors are compared pairwise, each on its own scale, and the worst pair is returned.
    inf for a NaN, a shape mismatch, or any difference from an all-zero expected tensor.
    """
    import torch

    if isinstance(actual, (list, tuple)):
        assert len(actual) == len(expected), (len(actual), len(expected))
        return max((scaled_error(a, e, eps) for a, e in zip(actual, expected)), default=0.0)
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if actual.shape != expected.shape or torch.isnan(actual).any() or torch.isnan(expected).any():
        return float("inf")
    difference = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    if difference == 0.0:
        return 0.0
    return difference / (eps * scale) if scale > 0 else float("inf")


def assert_close_scaled(actual, expected, budget_ulps: float, *, eps: float, why: str) -> float:
    """Assert actual == expected within budget_ulps ulps (of eps) of max|expected|; return the error in those ulps.

    why: the error budget in words (where honest code can differ, by how much); shown on failure.
    """
    error = scaled_error(actual, expected, eps)
    assert error <= budget_ulps, (
        f"difference {error:.3g} ulps (eps {eps:.3g}) of max|expected| exceeds the budget of "
        f"{budget_ulps} ulps: {why}"
    )
    return error


def logical_step_grad(optimizer, params, physical_backwards):
    """The flat p.grad a DP optimizer hands its inner optimizer for one logical batch whose physical batches
    run the `physical_backwards` callables in order: exactly train_dp_lora's path, a skipped step after
    every physical batch but the last."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    for i, backward in enumerate(physical_backwards):
        backward()
        if i < len(physical_backwards) - 1:
            optimizer.signal_skip_step(do_skip=True)
            optimizer.step()
            optimizer.zero_grad()
    optimizer.step()
    grad = torch.cat([p.grad.reshape(-1) for p in params]).clone()
    optimizer.zero_grad(set_to_none=True)
    return grad


def bundled_cards() -> list[dict]:
    return [json.loads(line) for line in BUNDLED.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_gemma_style_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A byte-fallback BPE trained here, wrapped as a GemmaTokenizer (bench/offline_model.py: the GPU check
    builds the same tokenizer without pytest)."""
    from bench.offline_model import build_gemma_style_tokenizer as build

    return build(texts, vocab_size)


def build_tiny_vaultgemma(vocab_size: int, seed: int = 0, **overrides):
    import torch
    from transformers import VaultGemmaConfig, VaultGemmaForCausalLM

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=512,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    config = VaultGemmaConfig(**settings)
    config._attn_implementation = "eager"
    return VaultGemmaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny VaultGemma + its tokenizer: what `--model DIR` loads."""
    out = tmp_path_factory.mktemp("tiny_vaultgemma")
    texts = [c["input"] + " " + c["output"] for c in bundled_cards()[:TOKENIZER_CARDS]]
    tokenizer = build_gemma_style_tokenizer(texts)
    model = build_tiny_vaultgemma(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from utils.model_loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def write_cards(path: Path, cards: list[dict]) -> str:
    path.write_text("".join(json.dumps(c) + "\n" for c in cards), encoding="utf-8")
    return str(path)


@pytest.fixture
def small_cards_file(tmp_path) -> str:
    """60 short bundled flashcards as JSONL."""
    return write_cards(tmp_path / "cards.jsonl", bundled_cards()[:60])


TINY_RUN = [
    "--logical_batch_size",
    "8",
    "--per_device_train_batch_size",
    "8",
    "--eval_steps",
    "0",
    "--report_to",
    "none",
    "--epsilon",
    "3",
    "--max_steps",
    "2",
    "--save_steps",
    "1",
]


@pytest.fixture(scope="session")
def train_run(tiny_model_dir, tmp_path_factory):
    """Factory: train_dp_lora.main on the tiny model from overrides (later flags win); returns OUT.

    Runs are cached per (dataset, overrides) for the session, so tests that only read a run share it.
    Defaults: 60 bundled cards, 2 DP steps at epsilon 3, a checkpoint every step, no tracker.
    """
    import train_dp_lora

    cache = {}

    def make(*overrides, dataset=None):
        key = (dataset, overrides)
        if key not in cache:
            root = tmp_path_factory.mktemp("run")
            source = dataset or write_cards(root / "cards.jsonl", bundled_cards()[:60])
            out = root / "out"
            train_dp_lora.main(
                train_dp_lora.parse_args(
                    [
                        "--model",
                        tiny_model_dir,
                        "--dataset",
                        source,
                        "--output_dir",
                        str(out),
                        *TINY_RUN,
                        *overrides,
                    ]
                )
            )
            cache[key] = out
        return cache[key]

    return make
