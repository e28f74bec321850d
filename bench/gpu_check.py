"""The prepared GPU check: the real-scale DP-LoRA path proven correct and timed in one run.

Contract
- One command, one process (plus three subprocesses in part 4). Models are built here from a config
  with random weights at VaultGemma 1B's shapes (--vocab_size ... --max_position_embeddings; the real
  weights are too big to carry) and saved once, with a tokenizer made offline (bench/offline_model.py),
  to a temporary --model directory that every part and script loads.
- Start-up: every needed import and version is checked before anything runs; each missing thing is
  one line on stdout ("missing: ..."), the JSON says which, and the exit status is 2.
- Parts, in order; each stops at its own time limit (--correctness_s, --step_s, --generate_s,
  --end_to_end_s) and at --time_budget_s for the whole run, and the JSON and Markdown are rewritten
  after each part (and each sequence length), so a run cut short still returns what it measured.
  1 correctness (bf16 base on --device, LoRA weights fp32):
      per-sample gradients of every --grad_sample_modes mode (hooks unwrapped, utils.training.backward_examples)
        against a brute-force loop of one unpadded row at a time; budget in bf16 ulps (eps = 2**-7)
        of each tensor's largest entry, derivation at GRAD_BUDGET_ULPS; the floor (plain batched
        gradient of the sum against the loop's sum, both exact) is reported beside it;
      the chunked answer-only head (utils.loss.per_example_loss) against the full-logits loss
        (utils.loss.per_example_loss_from_logits over model(...).logits): losses and gradients;
      the DP optimizer (privacy.make_dp_optimizer, seeded and --secure_mode noise): noise 0 gives
        exactly the hand-clipped mean (fp32 budget); the residual p.grad - clipped mean has std
        sigma*C/B and mean 0 within --noise_margin_se standard errors (1/sqrt(2n) and 1/sqrt(n) for n coordinates);
      a 4-bit NF4 base trains (DP path, noise 0) if bitsandbytes imports, else
        "skipped: bitsandbytes wheel is N MiB" (N from bench/gpu_wheels.txt).
  2 step cost at each --seq_lens T, round-robin in one process (bench/bench_step.py's arms and
      measurement): nonprivate, dp_<mode>, notebook (the public notebook's Opacus GradSampleModule +
      HF loss), hf_nonprivate (model(input_ids, attention_mask, labels=...), full logits, rows padded
      to max(T, --hf_pad_to)). The largest physical batch each arm fits is searched (two probes, a
      linear fit of peak memory in B, the prediction tried, bisection if it does not fit; kept below
      --memory_fraction of the GPU; on CPU below --cpu_memory_mib). Measured groups: A = nonprivate +
      every dp_<mode> at the largest B all of them fit; B = nonprivate, dp_<default>, notebook,
      hf_nonprivate at the largest B all four fit. Per arm: seconds per step (median of --steps
      rounds), examples/s, tokens/s (B*T), peak memory (torch.cuda.max_memory_allocated, total and
      above the step's start) and MFU, the model FLOPs below over time over --peak_tflops. For the
      default DP step at group A: a phase split (body forward, head, backward, optimizer step) and a
      bare bf16 matmul's TFLOP/s, i.e. what limits its MFU.
      Model FLOPs of one frozen-base LoRA training step (B rows of T tokens, M answer tokens):
        4 * N_body * B * T          forward 2*N*T + backward 2*N*T (activation gradients only: the base
                                    is frozen, and LoRA weight gradients, ~0.7% of N, are left out)
        + 12 * L * (n_heads * head_dim) * B * T**2   attention scores and values, forward 4 and backward 8
                                    (PaLM's count: full T x T, not halved for the causal mask)
        + 4 * V * H * M             the LM head forward and input-gradient, at answer positions only
      N_body = weights of the decoder layers (embeddings excluded), L layers, V vocabulary, H hidden.
      The same useful FLOPs are counted for every arm, so an arm that computes more (full logits,
      padding) shows a lower MFU; 6*N*T would count the frozen weights' gradients nobody computes.
  3 generation (bench/bench_generate.py's measure: utils' load_for_inference + generate_answers,
      greedy, KV cache): answer tokens/s at each --gen_batch_sizes, adapters attached and merged; each
      configuration answers max(batch, --gen_min_questions) bundled questions, --gen_max_new_tokens each.
  4 end to end, as subprocesses: python train_dp_lora.py (the saved model, --dataset bundled,
      --report_to none, --max_steps sized from part 2's DP step time to take about --e2e_train_s, or
      --e2e_max_steps), then infer.py --adapters OUT --question ..., then evaluate_qa.py --adapters OUT
      --max_samples K --no_base. Epsilon: OUT/adapter/privacy_report.json, else OUT/privacy_report.json,
      else the training stdout line starting with "Done:". If `evaluate` does not import,
      evaluate_qa.py runs with bench/gpu_shims on PYTHONPATH (utils.metrics behind evaluate's API), and
      the report says so.
- Goals (report["goals"], each with its value and whether it is met): DP step <= 1.05x non-private
  in time and peak memory at each T; DP step <= 0.6x the plain HF non-private step (group B, same
  B); batched generation at batch 16 >= 8x the answer tokens/s of batch 1; the DP step's MFU.
- Output in --output_dir: gpu_check.json (everything) and gpu_check.md (the tables); a one-screen
  summary on stdout at the end.
- --tiny: tiny shapes and sizes for CPU (every part in well under a minute); it changes only flags not
  given on the command line (TINY_PRESET). tests/test_gpu_check.py runs that in-process.

Run
    # on the GPU machine, from the repository root (bench/GPU_CHECK.md: the exact one-call command)
    pip install --no-index --no-deps --target /tmp/whl .whl/*.whl
    PYTHONPATH=/tmp/whl:. python3 bench/gpu_check.py --output_dir $OUT --time_budget_s 450
    # here, on CPU, at tiny sizes
    python bench/gpu_check.py --device cpu --tiny --output_dir outputs/gpu_check_tiny
"""

import contextlib
import dataclasses
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/gpu_check.py` from anywhere
    sys.path.insert(0, str(REPO))
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # before torch: the CPU memory profiler's start/stop chatter
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench import offline_model  # noqa: E402  (stdlib only at import)
from utils import cli  # noqa: E402  (stdlib only at import)

PARTS = ("correctness", "step", "generate", "end_to_end")
GRAD_SAMPLE_MODES = (
    "ew",
    "hooks",
    "functorch",
)  # checked against utils.privacy.GRAD_SAMPLE_MODES at start-up
WHEELS_FILE = REPO / "bench" / "gpu_wheels.txt"
SHIMS_DIR = REPO / "bench" / "gpu_shims"
JSON_NAME, MARKDOWN_NAME = "gpu_check.json", "gpu_check.md"
H200_BF16_DENSE_TFLOPS = 989.0

BF16_EPS = 2.0**-7  # bf16 keeps 8 significant bits: machine epsilon 2**-7, unit roundoff 2**-8
FP32_EPS = 2.0**-23
# Per-sample gradient budget, in bf16 ulps (BF16_EPS) of each gradient tensor's largest entry. Both
# methods are exact; they differ only in rounding. The base runs in bf16: the batched and the one-row
# computations feed its matmuls different shapes (other blocking, other accumulation order), so a
# bf16 activation or activation gradient may round to the neighbouring value: a relative change of
# at most one unit roundoff (2**-8 = BF16_EPS / 2) per rounding. Counting ~4 such roundings per layer and
# direction (attention projections and scores, MLP, norm), forward and backward through 26 layers,
# with independent signs: sqrt(4 * 2 * 26) * 2**-8 ~ 0.056 relative, 7.2 ulps. Budget: 8 ulps (6.25%).
# Real bugs are orders larger: another row's gradient, a factor B, a mean instead of a sum, or a
# layer left out are ~100% errors. The LoRA path itself (weights, gradients) is fp32 throughout.
GRAD_BUDGET_ULPS = 8.0
# Losses: the chunked head rounds its logits to bf16 once (the matmul output) and softcaps in fp32;
# the full-logits path also softcaps in bf16 (three more roundings of values |s| <= 30). An
# answer-token NLL moves by at most ~2 max|ds| and a row's loss is their mean: 2 ulps of the largest
# loss bounds it with room to spare. Gradients through the two heads: GRAD_BUDGET_ULPS.
LOSS_BUDGET_ULPS = 2.0
# Noise 0: p.grad is the clipped mean the hand computation gives; both in fp32 from the same per-sample
# gradients, differing in summation order over B rows and the norm's reduction: 64 fp32 ulps.
CLIP_BUDGET_ULPS = 64.0
SEARCH_SHARE = 0.4  # of each sequence length's time in part 2 that the batch search may take


@dataclass
class CheckArguments:
    output_dir: str = field(
        default="outputs/gpu_check", metadata={"help": f"where {JSON_NAME} and {MARKDOWN_NAME} go"}
    )
    device: str = field(default="auto", metadata={"help": "cuda, cuda:1, cpu; auto = cuda if available"})
    dtype: str = field(
        default="bfloat16",
        metadata={
            "help": "dtype of the base model in every in-process part",
            "choices": ["bfloat16", "float32"],
        },
    )
    tiny: bool = field(default=False, metadata={"help": "tiny shapes and sizes for a CPU run (TINY_PRESET)"})
    parts: list[str] = field(
        default_factory=lambda: list(PARTS), metadata={"help": "parts to run", "choices": list(PARTS)}
    )
    time_budget_s: float = field(
        default=450.0, metadata={"help": "the whole run stops starting work after this many seconds"}
    )
    threads: int = field(
        default=0,
        metadata={
            "help": "torch CPU threads here and OMP_NUM_THREADS of the subprocesses; 0 = torch's default"
        },
    )
    seed: int = field(default=0, metadata={"help": "seeds the model, batches, dropout and noise"})


@dataclass
class LimitArguments:
    correctness_s: float = field(default=45.0, metadata={"help": "time limit of part 1"})
    step_s: float = field(
        default=200.0, metadata={"help": "time limit of part 2 (shared equally by the --seq_lens)"}
    )
    generate_s: float = field(default=55.0, metadata={"help": "time limit of part 3"})
    end_to_end_s: float = field(default=120.0, metadata={"help": "time limit of part 4"})


@dataclass
class ModelArguments:  # defaults: google/vaultgemma-1b's shapes
    vocab_size: int = field(
        default=offline_model.VAULTGEMMA_1B.vocab_size,
        metadata={"help": "vocabulary (the tokenizer is filled up to it)"},
    )
    hidden_size: int = field(
        default=offline_model.VAULTGEMMA_1B.hidden_size, metadata={"help": "model shape (see --tiny)"}
    )
    intermediate_size: int = field(
        default=offline_model.VAULTGEMMA_1B.intermediate_size, metadata={"help": "model shape (see --tiny)"}
    )
    num_hidden_layers: int = field(
        default=offline_model.VAULTGEMMA_1B.num_hidden_layers, metadata={"help": "model shape (see --tiny)"}
    )
    num_attention_heads: int = field(
        default=offline_model.VAULTGEMMA_1B.num_attention_heads, metadata={"help": "model shape (see --tiny)"}
    )
    num_key_value_heads: int = field(
        default=offline_model.VAULTGEMMA_1B.num_key_value_heads, metadata={"help": "model shape (see --tiny)"}
    )
    head_dim: int = field(
        default=offline_model.VAULTGEMMA_1B.head_dim, metadata={"help": "model shape (see --tiny)"}
    )
    sliding_window: int = field(
        default=offline_model.VAULTGEMMA_1B.sliding_window,
        metadata={"help": "of the sliding-attention layers (every other one)"},
    )
    max_position_embeddings: int = field(
        default=offline_model.VAULTGEMMA_1B.max_position_embeddings,
        metadata={"help": "model shape (see --tiny)"},
    )
    tokenizer_vocab_size: int = field(
        default=2000, metadata={"help": "BPE pieces trained on the bundled flashcards (the rest is filler)"}
    )


@dataclass
class CorrectnessArguments:
    rows: int = field(default=4, metadata={"help": "flashcards in the checked batch (right-padded)"})
    max_row_tokens: int = field(default=128, metadata={"help": "only flashcards at most this long are used"})
    grad_budget_ulps: float = field(
        default=GRAD_BUDGET_ULPS,
        metadata={
            "help": "per-sample and head gradient budget, bf16 ulps of each tensor's max (derivation in the source)"
        },
    )
    loss_budget_ulps: float = field(
        default=LOSS_BUDGET_ULPS,
        metadata={"help": "chunked vs full-logits loss budget, bf16 ulps of the largest loss"},
    )
    noise_multiplier: float = field(default=1.0, metadata={"help": "sigma of the noise check"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "C of the noise and clipping checks"})
    noise_margin_se: float = field(
        default=5.0, metadata={"help": "the noise std and mean may be off by this many standard errors"}
    )
    fourbit_steps: int = field(
        default=8, metadata={"help": "DP steps (noise 0) the NF4 base must lower the loss in"}
    )


@dataclass
class StepArguments:
    seq_lens: list[int] = field(default_factory=lambda: [128, 512], metadata={"help": "sequence lengths T"})
    grad_sample_modes: list[str] = field(
        default_factory=lambda: list(GRAD_SAMPLE_MODES),
        metadata={"help": "dp_<mode> arms", "choices": list(GRAD_SAMPLE_MODES)},
    )
    answer_fraction: float = field(
        default=0.5, metadata={"help": "share of each row that is answer (labelled) tokens"}
    )
    warmup_steps: int = field(default=1, metadata={"help": "unmeasured steps per arm first"})
    steps: int = field(default=3, metadata={"help": "measured round-robin rounds"})
    search_start_tokens: int = field(
        default=8192, metadata={"help": "the batch search starts at B = this // T"}
    )
    max_batch_size: int = field(default=1024, metadata={"help": "the batch search never goes above this"})
    memory_fraction: float = field(
        default=0.9, metadata={"help": "CUDA: a step's peak must stay below this share of the GPU's memory"}
    )
    cpu_memory_mib: float = field(
        default=4096.0, metadata={"help": "CPU: the step memory (above its start) the batch search may fill"}
    )
    hf_pad_to: int = field(
        default=128,
        metadata={"help": "hf_nonprivate pads each row to max(T, this), as the notebook pads to 128"},
    )
    peak_tflops: float = field(
        default=H200_BF16_DENSE_TFLOPS, metadata={"help": "the device's bf16 dense peak for MFU (H200 SXM)"}
    )


@dataclass
class GenerateArguments:
    gen_batch_sizes: list[int] = field(
        default_factory=lambda: [1, 16, 64], metadata={"help": "questions per generate call"}
    )
    gen_min_questions: int = field(
        default=8, metadata={"help": "each configuration answers max(batch, this) questions"}
    )
    gen_max_new_tokens: int = field(default=32, metadata={"help": "most tokens per answer"})


@dataclass
class EndToEndArguments:
    e2e_train_s: float = field(
        default=60.0,
        metadata={"help": "the training subprocess should take about this long (sizes --max_steps)"},
    )
    e2e_max_steps: int = field(
        default=0, metadata={"help": "if > 0, --max_steps of the training run (else sized from part 2)"}
    )
    e2e_logical_batch_size: int = field(
        default=64, metadata={"help": "--logical_batch_size of the training run"}
    )
    e2e_per_device_batch_size: int = field(
        default=32, metadata={"help": "--per_device_train_batch_size of the training run"}
    )
    e2e_epsilon: float = field(default=8.0, metadata={"help": "--epsilon of the training run"})
    e2e_eval_samples: int = field(default=8, metadata={"help": "evaluate_qa.py --max_samples"})
    e2e_max_new_tokens: int = field(
        default=32, metadata={"help": "--max_new_tokens of infer.py and evaluate_qa.py"}
    )
    e2e_question: str = field(
        default="What are the symptoms of diabetes?", metadata={"help": "infer.py --question"}
    )
    e2e_concurrent: bool = field(
        default=False,
        metadata={"help": "run infer.py and evaluate_qa.py at the same time (their wall times then overlap)"},
    )


GROUPS = {
    "check": CheckArguments,
    "limits": LimitArguments,
    "model": ModelArguments,
    "correctness": CorrectnessArguments,
    "step": StepArguments,
    "generate": GenerateArguments,
    "end_to_end": EndToEndArguments,
}

# --tiny: (group, field) -> value, applied where the flag is still at its default
TINY_PRESET = {
    ("check", "dtype"): "float32",  # bf16 matmuls are slow on CPU; the tolerances hold a fortiori in fp32
    ("check", "threads"): 1,  # tiny matrices: more threads only wait for each other on a shared CPU
    **{("model", k): v for k, v in offline_model.TINY.as_dict().items()},
    ("model", "tokenizer_vocab_size"): offline_model.TINY.vocab_size,
    ("correctness", "rows"): 3,
    ("correctness", "max_row_tokens"): 64,
    ("correctness", "fourbit_steps"): 4,
    ("step", "seq_lens"): [16],
    ("step", "warmup_steps"): 0,
    ("step", "steps"): 1,
    ("step", "search_start_tokens"): 32,
    ("step", "max_batch_size"): 4,
    ("step", "cpu_memory_mib"): 4.0,
    ("generate", "gen_batch_sizes"): [1, 4],
    ("generate", "gen_min_questions"): 4,
    ("generate", "gen_max_new_tokens"): 4,
    ("end_to_end", "e2e_max_steps"): 2,
    ("end_to_end", "e2e_logical_batch_size"): 8,
    ("end_to_end", "e2e_per_device_batch_size"): 4,
    ("end_to_end", "e2e_eval_samples"): 2,
    ("end_to_end", "e2e_max_new_tokens"): 4,
    ("end_to_end", "e2e_concurrent"): True,
}


class CheckError(cli.UserError):
    """The environment cannot run the check (a missing package, no CUDA device): one line per problem."""


def parse_args(argv=None):
    parser = cli.build_parser(__doc__.split("\n\n")[0], GROUPS, config_flag=False)
    args = cli.parse_into(parser, GROUPS, argv)
    tokens = sys.argv[1:] if argv is None else list(argv)
    args.given = sorted(
        {t[2:].split("=", 1)[0] for t in tokens if t.startswith("--")}
    )  # flags --tiny must not change
    return args


def _default(group_cls, name):
    f = next(f for f in dataclasses.fields(group_cls) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def apply_tiny(args) -> None:
    if not args.check.tiny:
        return
    given = set(getattr(args, "given", ()))
    for (group, name), value in TINY_PRESET.items():
        holder = getattr(args, group)
        if name not in given and getattr(holder, name) == _default(type(holder), name):
            setattr(holder, name, value)


def validate_args(args) -> None:
    c, lim, m, k, s, g, e = (
        args.check,
        args.limits,
        args.model,
        args.correctness,
        args.step,
        args.generate,
        args.end_to_end,
    )
    problems = []
    if not c.parts:
        problems.append("--parts: name at least one part")
    if c.time_budget_s <= 0 or min(lim.correctness_s, lim.step_s, lim.generate_s, lim.end_to_end_s) <= 0:
        problems.append("--time_budget_s and every part's limit must be > 0")
    if (
        min(
            m.vocab_size,
            m.hidden_size,
            m.intermediate_size,
            m.num_hidden_layers,
            m.num_attention_heads,
            m.num_key_value_heads,
            m.head_dim,
            m.sliding_window,
            m.max_position_embeddings,
        )
        < 1
    ):
        problems.append("model sizes must be >= 1")
    if m.num_attention_heads % m.num_key_value_heads:
        problems.append("--num_attention_heads must be a multiple of --num_key_value_heads")
    if m.tokenizer_vocab_size < 300:
        problems.append("--tokenizer_vocab_size must be >= 300 (261 specials and bytes, then merges)")
    if k.rows < 2:
        problems.append("--rows must be >= 2")
    if s.seq_lens and min(s.seq_lens) < 4:
        problems.append("--seq_lens must all be >= 4")
    if (
        max(s.seq_lens + [0]) > m.max_position_embeddings
        or max(s.seq_lens + [s.hf_pad_to]) > m.max_position_embeddings
    ):
        problems.append("--seq_lens and --hf_pad_to must be <= --max_position_embeddings")
    if not 0 < s.answer_fraction < 1:
        problems.append("--answer_fraction must be in (0, 1)")
    if s.steps < 1 or s.warmup_steps < 0 or s.max_batch_size < 1:
        problems.append("--steps and --max_batch_size must be >= 1, --warmup_steps >= 0")
    if not 0 < s.memory_fraction <= 1:
        problems.append("--memory_fraction must be in (0, 1]")
    if not g.gen_batch_sizes or min(g.gen_batch_sizes) < 1 or g.gen_max_new_tokens < 1:
        problems.append("--gen_batch_sizes and --gen_max_new_tokens must be >= 1")
    if e.e2e_logical_batch_size < 2 or e.e2e_per_device_batch_size < 1 or e.e2e_eval_samples < 1:
        problems.append(
            "--e2e_logical_batch_size must be >= 2, --e2e_per_device_batch_size and --e2e_eval_samples >= 1"
        )
    if problems:
        raise cli.ArgumentErrors(problems)


# -----------------------------------------------------------------------------
# start-up: what this machine has

# (import name, distribution, minimum version or None, why)
REQUIRED = [
    ("torch", "torch", "2.6", "everything"),
    ("numpy", "numpy", None, "everything"),
    ("transformers", "transformers", "4.56", "VaultGemma"),
    ("tokenizers", "tokenizers", None, "the offline tokenizer"),
    ("safetensors", "safetensors", None, "saving the model"),
    ("peft", "peft", None, "LoRA"),
    ("accelerate", "accelerate", None, "train_dp_lora.py"),
    ("scipy", "scipy", None, "Opacus's accountants"),
    ("opacus", "opacus", "1.5", "per-sample gradients, the DP optimizer and accountant"),
]
OPTIONAL = [
    ("dp_accounting", "dp-accounting", "train_dp_lora.py's replace-one epsilon and the accounting tests"),
    ("rouge_score", "rouge-score", "evaluate_qa.py's ROUGE-L"),
    ("nltk", "nltk", "rouge_score"),
    ("evaluate", "evaluate", "evaluate_qa.py's metric loader (else bench/gpu_shims stands in)"),
    ("bitsandbytes", "bitsandbytes", "the 4-bit NF4 check"),
]


def _version_tuple(text: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def wheel_sizes() -> dict:
    """{distribution: (version, bytes, carried)} from bench/gpu_wheels.txt."""
    sizes = {}
    if not WHEELS_FILE.exists():
        return sizes
    for line in WHEELS_FILE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\s*(#\s*not carried:\s*)?([A-Za-z0-9_.-]+)==(\S+).*?#\s*([0-9]+) bytes", line)
        if match:
            sizes[match.group(2).lower().replace("_", "-")] = (
                match.group(3),
                int(match.group(4)),
                match.group(1) is None,
            )
    return sizes


def check_environment(device_flag: str) -> dict:
    """Import everything needed, once, here; one printed line per missing thing."""
    found, missing, optional_missing = {}, [], {}
    for module, dist, minimum, why in REQUIRED:
        try:
            imported = importlib.import_module(module)
        except Exception as error:  # ImportError, or a broken binary wheel
            missing.append(
                f"missing: {dist} (needed for {why}): {type(error).__name__}: {error}".splitlines()[0]
            )
            continue
        version = getattr(imported, "__version__", "?")
        found[dist] = version
        if minimum and version != "?" and _version_tuple(version) < _version_tuple(minimum):
            missing.append(f"missing: {dist} >= {minimum} (needed for {why}); found {version}")
    for (
        module,
        dist,
        why,
    ) in OPTIONAL:  # found, not imported: each is imported where it is used, and its part reports a failure
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            optional_missing[dist] = f"{dist} (for {why}): not installed"
            continue
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "?"
    if "transformers" in found:
        try:
            from transformers import VaultGemmaConfig, VaultGemmaForCausalLM  # noqa: F401
        except ImportError as error:
            missing.append(
                f"missing: transformers with VaultGemma (found {found['transformers']}): {_one_line(error)}"
            )
    if "torch" in found:
        import torch

        try:
            from torch.nn.utils._per_sample_grad import call_for_per_sample_grads  # noqa: F401
        except ImportError:
            missing.append(
                "missing: torch.nn.utils._per_sample_grad.call_for_per_sample_grads (grad_sample_mode ew; "
                f"torch {found['torch']})"
            )
        wanted = device_flag if device_flag != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if wanted.startswith("cuda") and not torch.cuda.is_available():
            missing.append(
                f"missing: a CUDA device (torch {found['torch']}: torch.cuda.is_available() is False; "
                "--device cpu runs on CPU)"
            )
        found["device"] = wanted
        if wanted.startswith("cuda") and torch.cuda.is_available():
            found["gpu"] = torch.cuda.get_device_name(torch.device(wanted))
            found["cuda"] = torch.version.cuda
            found["bf16_supported"] = torch.cuda.is_bf16_supported()
    try:
        from utils import privacy

        unknown = set(GRAD_SAMPLE_MODES) ^ set(privacy.GRAD_SAMPLE_MODES)
        if unknown:
            missing.append(
                "missing: agreement on grad_sample_modes: utils.privacy has "
                f"{list(privacy.GRAD_SAMPLE_MODES)}, gpu_check {list(GRAD_SAMPLE_MODES)}"
            )
    except Exception as error:
        missing.append(f"missing: utils.privacy imports ({type(error).__name__}: {error})".splitlines()[0])
    for line in missing:
        print(line, flush=True)
    for dist, text in optional_missing.items():
        print(f"optional, missing: {text}", flush=True)
    return {
        "found": found,
        "missing": missing,
        "optional_missing": optional_missing,
        "python": sys.version.split()[0],
    }


# -----------------------------------------------------------------------------
# shared state, clocks, writing


class Clock:
    def __init__(self, limit_s: float):
        self.started, self.limit_s = time.perf_counter(), limit_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.limit_s - self.elapsed()

    def expired(self, reserve_s: float = 0.0) -> bool:
        return self.left() <= reserve_s


class Context:
    """What the parts share: the device, the saved model and tokenizer, the LoRA model once built."""

    def __init__(self, args, work_dir: Path, report: dict, write):
        import torch

        self.args, self.work, self.report, self.write = args, work_dir, report, write
        flag = args.check.device
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if flag == "auto" else flag
        )
        self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.check.dtype]
        m = args.model
        self.shape = offline_model.ModelShape(
            m.vocab_size,
            m.hidden_size,
            m.intermediate_size,
            m.num_hidden_layers,
            m.num_attention_heads,
            m.num_key_value_heads,
            m.head_dim,
            m.sliding_window,
            m.max_position_embeddings,
        )
        self.cards = offline_model.bundled_cards()
        self.base_dir = None
        self.tokenizer = None
        self._model = None
        self.notes = {}  # what a later part uses from an earlier one

    def setup(self) -> dict:
        import torch

        started = time.perf_counter()
        texts = [c["input"] + " " + c["output"] for c in self.cards]
        self.tokenizer = offline_model.build_gemma_style_tokenizer(
            texts,
            min(self.args.model.tokenizer_vocab_size, self.shape.vocab_size),
            pad_to_size=self.shape.vocab_size,
        )
        tokenizer_s = time.perf_counter() - started
        self.base_dir = str(self.work / "base_model")
        offline_model.save_random_model(
            self.base_dir, self.shape, self.tokenizer, self.dtype, self.device, self.args.check.seed
        )
        self.empty_cache()
        size = sum(f.stat().st_size for f in Path(self.base_dir).iterdir())
        return {
            "tokenizer_s": tokenizer_s,
            "model_saved_s": time.perf_counter() - started - tokenizer_s,
            "tokenizer_size": len(self.tokenizer),
            "model_dir_bytes": size,
            "parameters": parameter_counts(self.shape),
            "dtype": str(self.dtype).replace("torch.", ""),
            "torch_threads": torch.get_num_threads(),
        }

    def model(self):
        """The LoRA model train_dp_lora.py builds over the saved base, on the device, with A trained (default
        LoraArguments, as --lora_freeze_a false): the DP recipe freezes A, so its step does less backward work
        than the one measured here, and every check also covers A's per-example gradients."""
        if self._model is None:
            import torch

            from utils import training

            torch.manual_seed(self.args.check.seed)
            self._model = training.build_lora_model(
                self.base_dir, training.LoraArguments(), self.tokenizer, self.device, dtype=self.dtype
            )
        return self._model

    def release(self) -> None:
        self._model = None
        self.empty_cache()

    def empty_cache(self) -> None:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def parameter_counts(shape) -> dict:
    q = shape.hidden_size * shape.num_attention_heads * shape.head_dim
    kv = 2 * shape.hidden_size * shape.num_key_value_heads * shape.head_dim
    o = shape.num_attention_heads * shape.head_dim * shape.hidden_size
    mlp = 3 * shape.hidden_size * shape.intermediate_size
    body = shape.num_hidden_layers * (q + kv + o + mlp)
    head = shape.vocab_size * shape.hidden_size
    return {"body": body, "embedding_head": head, "total": body + head}


def model_flops(shape, batch_size: int, seq_len: int, answer_tokens: int) -> float:
    """Useful FLOPs of one frozen-base LoRA training step (the module docstring's formula)."""
    n_body = parameter_counts(shape)["body"]
    attention = (
        12 * shape.num_hidden_layers * shape.num_attention_heads * shape.head_dim * batch_size * seq_len**2
    )
    return (
        4.0 * n_body * batch_size * seq_len
        + attention
        + 4.0 * shape.vocab_size * shape.hidden_size * answer_tokens
    )


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0][:500] if text else type(error).__name__


def is_oom(error: BaseException) -> bool:
    import torch

    if isinstance(error, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and (
        "out of memory" in str(error) or "CUBLAS_STATUS_ALLOC_FAILED" in str(error)
    )


def clear_training_state(model, params) -> None:
    """Forget gradients, per-sample gradients and activations an interrupted step left behind."""
    for p in params:
        p.grad = None
        for name in ("grad_sample", "summed_grad", "_current_grad_sample"):
            if hasattr(p, name):
                setattr(p, name, None)
    for module in model.modules():
        for name in ("activations", "max_batch_len"):
            if name in module.__dict__:
                delattr(module, name)


# -----------------------------------------------------------------------------
# part 1: correctness


def scaled_error(actual, expected, eps: float) -> float:
    """max|actual - expected| / (eps * max|expected|), worst over paired tensors (tests/conftest.py's measure)."""
    import torch

    if isinstance(actual, (list, tuple)):
        return max((scaled_error(a, e, eps) for a, e in zip(actual, expected, strict=True)), default=0.0)
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    if (
        actual.shape != expected.shape
        or not torch.isfinite(actual).all()
        or not torch.isfinite(expected).all()
    ):
        return float("inf")
    difference = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    if difference == 0.0:
        return 0.0
    return difference / (eps * scale) if scale > 0 else float("inf")


def card_batch(ctx, rows: int, max_tokens: int):
    """(right-padded batch of `rows` bundled flashcards, the same rows unpadded one by one).

    Rows are cut to at most max_tokens - 3 * i tokens (row i), so their lengths differ and padding is
    exercised; a row keeps at least two answer tokens.
    """
    from utils.data import collate
    from utils.prompt import IGNORE_INDEX, encode_example

    examples = []
    for card in ctx.cards:
        example = encode_example(ctx.tokenizer, card["input"], card["output"], card.get("instruction"))
        n = min(len(example["input_ids"]), max_tokens - 3 * len(examples))
        example = {k: v[:n] for k, v in example.items()}
        if sum(label != IGNORE_INDEX for label in example["labels"][1:]) >= 2:
            examples.append(example)
        if len(examples) == rows:
            break
    if len(examples) < 2:
        raise ValueError(
            f"fewer than 2 flashcards have an answer within {max_tokens} tokens: raise --max_row_tokens"
        )
    pad = ctx.tokenizer.pad_token_id

    def to_device(batch):
        return {k: v.to(ctx.device) for k, v in batch.items()}

    return to_device(collate(examples, pad)), [to_device(collate([e], pad)) for e in examples]


class dropout_off:
    """LoRA (and any) dropout p = 0 inside, the model in train mode (Opacus hooks record only then)."""

    def __init__(self, model):
        import torch

        self.model, self.saved = model, [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]

    def __enter__(self):
        self.was_training = self.model.training
        for module, _ in self.saved:
            module.p = 0.0
        self.model.train()
        return self.model

    def __exit__(self, *exc):
        for module, p in self.saved:
            module.p = p
        self.model.train(self.was_training)


def _grads(params):
    return [p.grad.detach().clone() if p.grad is not None else None for p in params]


def part_correctness(ctx, clock) -> dict:
    import torch

    from utils import privacy, training
    from utils.loss import per_example_loss, per_example_loss_from_logits

    k = ctx.args.correctness
    model = ctx.model()
    params = [p for p in model.parameters() if p.requires_grad]
    checks = {}
    result = {
        "checks": checks,
        "rows": k.rows,
        "dtype": str(ctx.dtype).replace("torch.", ""),
        "budgets": {
            "per_sample_grad_ulps": k.grad_budget_ulps,
            "loss_ulps": k.loss_budget_ulps,
            "clip_fp32_ulps": CLIP_BUDGET_ULPS,
            "noise_margin_se": k.noise_margin_se,
            "bf16_eps": BF16_EPS,
        },
    }
    lora_b = [p for name, p in model.named_parameters() if p.requires_grad and "lora_B" in name]
    saved_b = [p.detach().clone() for p in lora_b]
    generator = torch.Generator(device="cpu").manual_seed(ctx.args.check.seed)
    # LoRA B starts at 0, which makes every lora_A gradient exactly 0: give both a signal
    with torch.no_grad():
        for p in lora_b:
            p.copy_(torch.randn(p.shape, generator=generator).to(p) * 1e-2)
    try:
        with dropout_off(model):
            batch, singles = card_batch(ctx, k.rows, k.max_row_tokens)
            B = batch["input_ids"].shape[0]
            result["rows"] = B
            result["row_lengths"] = [int(s["input_ids"].shape[1]) for s in singles]
            loop = []
            for single in singles:  # the brute-force reference: one unpadded row at a time, no hooks
                clear_training_state(model, params)
                per_example_loss(model, single).sum().backward()
                loop.append(_grads(params))
            clear_training_state(model, params)
            per_example_loss(model, batch).sum().backward()
            batched_sum = _grads(params)
            loop_sum = [torch.stack([g[j] for g in loop]).sum(0) for j in range(len(params))]
            floor = scaled_error(batched_sum, loop_sum, BF16_EPS)
            result["floor_ulps"] = floor
            for mode in ctx.args.step.grad_sample_modes:
                if clock.expired():
                    checks[f"per_sample_grads_{mode}"] = {"status": "skipped: time limit"}
                    continue
                clear_training_state(model, params)
                hooks = privacy.attach_per_sample_hooks(model, mode)
                try:
                    training.backward_examples(model, batch, params, True, B)
                    samples = [p.grad_sample.detach().clone() for p in params]
                finally:
                    hooks.remove_hooks()
                    clear_training_state(model, params)
                per_row = [scaled_error([s[i] for s in samples], loop[i], BF16_EPS) for i in range(B)]
                summed = scaled_error([s.sum(0) for s in samples], batched_sum, BF16_EPS)
                checks[f"per_sample_grads_{mode}"] = {
                    "passed": max(per_row) <= k.grad_budget_ulps,
                    "error_ulps": max(per_row),
                    "per_row_error_ulps": per_row,
                    "sum_vs_batched_gradient_ulps": summed,
                    "floor_ulps": floor,
                    "budget_ulps": k.grad_budget_ulps,
                    "what": "grad_sample[i] vs the gradient of row i alone (unpadded), every LoRA tensor",
                }
                ctx.write()
            # the chunked answer-only head against the full logits
            clear_training_state(model, params)
            chunked = per_example_loss(model, batch)
            chunked.sum().backward()
            chunked_grads = _grads(params)
            clear_training_state(model, params)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=None
            ).logits  # right-padded: as utils.loss runs the body
            full = per_example_loss_from_logits(logits, batch["labels"])
            full.sum().backward()
            full_grads = _grads(params)
            del logits
            clear_training_state(model, params)
            loss_error = scaled_error(chunked.detach(), full.detach(), BF16_EPS)
            grad_error = scaled_error(chunked_grads, full_grads, BF16_EPS)
            checks["chunked_head_vs_full_logits"] = {
                "passed": loss_error <= k.loss_budget_ulps and grad_error <= k.grad_budget_ulps,
                "loss_error_ulps": loss_error,
                "grad_error_ulps": grad_error,
                "loss_budget_ulps": k.loss_budget_ulps,
                "grad_budget_ulps": k.grad_budget_ulps,
                "losses_chunked": chunked.detach().float().cpu().tolist(),
                "losses_full": full.detach().float().cpu().tolist(),
            }
            ctx.write()
            for secure in (False, True):
                name = "dp_noise_secure" if secure else "dp_noise_seeded"
                if clock.expired():
                    checks[name] = {"status": "skipped: time limit"}
                    continue
                checks[name] = noise_check(ctx, model, params, batch, secure)
                ctx.write()
    finally:
        with torch.no_grad():
            for p, saved in zip(lora_b, saved_b):
                p.copy_(saved)
        clear_training_state(model, params)
    checks["nf4_base_trains"] = fourbit_check(ctx, clock, batch)
    result["passed"] = all(c.get("passed", True) for c in checks.values())
    return result


def noise_check(ctx, model, params, batch, secure: bool) -> dict:
    """Noise 0: p.grad == the hand-clipped mean. Noise sigma: residual std sigma*C/B, mean 0."""
    import torch

    from utils import privacy, training

    k = ctx.args.correctness
    B = batch["input_ids"].shape[0]
    sigma, C = k.noise_multiplier, k.max_grad_norm
    out = {"noise_multiplier": sigma, "max_grad_norm": C, "expected_batch_size": B, "secure_mode": secure}
    for noise in (0.0, sigma):
        clear_training_state(model, params)
        hooks = privacy.attach_per_sample_hooks(model, privacy.DEFAULT_GRAD_SAMPLE_MODE)
        try:
            generator = (
                None if secure else torch.Generator(device=ctx.device).manual_seed(ctx.args.check.seed + 1)
            )
            optimizer = privacy.make_dp_optimizer(
                torch.optim.SGD(params, lr=0.0), noise, C, B, generator, secure_mode=secure
            )
            training.backward_examples(model, batch, params, True, B)
            samples = [p.grad_sample.detach().clone() for p in params]
            optimizer.step()  # clip, sum, noise, / B; lr 0 leaves the weights as they are
            got = [p.grad.detach().clone() for p in params]
            optimizer.zero_grad(set_to_none=True)
        finally:
            hooks.remove_hooks()
            clear_training_state(model, params)
        norms = torch.stack([s.reshape(B, -1).norm(dim=1) for s in samples]).norm(dim=0)
        factor = (C / (norms + 1e-6)).clamp(max=1.0)  # Opacus's clipping factor
        expected = [torch.einsum("i,i...->...", factor.to(s.dtype), s) / B for s in samples]
        if noise == 0.0:
            error = scaled_error(got, expected, FP32_EPS)
            out["clip_error_fp32_ulps"] = error
            out["clip_passed"] = error <= CLIP_BUDGET_ULPS
            out["per_example_norms"] = norms.float().cpu().tolist()
        else:
            residual = torch.cat([(g - e).flatten().double() for g, e in zip(got, expected)])
            n = residual.numel()
            want = sigma * C / B
            std, mean = residual.std().item(), residual.mean().item()
            std_margin = k.noise_margin_se / math.sqrt(2 * n)
            mean_margin = k.noise_margin_se * want / math.sqrt(n)
            out.update(
                {
                    "coordinates": n,
                    "expected_std": want,
                    "std": std,
                    "std_ratio": std / want,
                    "std_margin": std_margin,
                    "mean": mean,
                    "mean_margin": mean_margin,
                    "noise_passed": abs(std / want - 1) <= std_margin and abs(mean) <= mean_margin,
                }
            )
    out["passed"] = bool(out.get("clip_passed") and out.get("noise_passed"))
    return out


def fourbit_check(ctx, clock, batch) -> dict:
    """A 4-bit NF4 base trains on the DP path: hooks, clipping, AdamW; noise 0 so a few steps show it."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:
        dist = wheel_sizes().get("bitsandbytes")
        size = f"bitsandbytes wheel is {dist[1] / 2**20:.1f} MiB" if dist else "bitsandbytes does not import"
        return {"status": f"skipped: {size}", "passed": None, "import_error": _one_line(error)}
    if clock.expired():
        return {"status": "skipped: time limit", "passed": None}
    import torch

    from utils import privacy, training
    from utils.loss import per_example_loss

    k = ctx.args.correctness
    started = time.perf_counter()
    model = params = None
    try:
        torch.manual_seed(ctx.args.check.seed)
        model = training.build_lora_model(
            ctx.base_dir,
            training.LoraArguments(),
            ctx.tokenizer,
            ctx.device,
            dtype=ctx.dtype,
            load_in_4bit=True,
        )
        params = [p for p in model.parameters() if p.requires_grad]
        B = batch["input_ids"].shape[0]
        hooks = privacy.attach_per_sample_hooks(model, privacy.DEFAULT_GRAD_SAMPLE_MODE)
        optimizer = privacy.make_dp_optimizer(
            torch.optim.AdamW(params, lr=1e-2),
            0.0,
            k.max_grad_norm,
            B,
            torch.Generator(device=ctx.device).manual_seed(ctx.args.check.seed),
        )
        losses = []
        with dropout_off(model):
            for _ in range(k.fourbit_steps):
                example_losses, _ = training.backward_examples(model, batch, params, True, B)
                losses.append(float(example_losses.mean()))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            hooks.remove_hooks()
            with torch.no_grad():
                losses.append(float(per_example_loss(model, batch).mean()))
        passed = all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
        return {
            "status": "ok",
            "passed": passed,
            "losses": losses,
            "seconds": time.perf_counter() - started,
            "what": f"{k.fourbit_steps} DP steps (noise 0) on one batch; the loss after them must be below the first",
        }
    except Exception as error:
        return {
            "status": f"error: {_one_line(error)}",
            "passed": False,
            "traceback": traceback.format_exc()[-3000:],
        }
    finally:
        if params is not None:
            clear_training_state(model, params)
        del model, params
        ctx.empty_cache()


# -----------------------------------------------------------------------------
# part 2: step cost


def make_arm(name: str, model, params, batch_size: int, ctx):
    from bench import bench_step

    seed = ctx.args.check.seed
    if name == "nonprivate":
        return bench_step.nonprivate_arm(model, params, batch_size)
    if name.startswith("dp_"):
        return bench_step.project_dp_arm(model, params, batch_size, name[3:], ctx.device, seed)
    if name == "notebook":
        return bench_step.notebook_arm(model, params, batch_size, ctx.device, seed)
    if name == "hf_nonprivate":
        return bench_step.hf_nonprivate_arm(
            model, params, ctx.args.step.hf_pad_to, ctx.tokenizer.pad_token_id
        )
    raise ValueError(name)


def free_bytes(ctx) -> int:
    import torch

    if ctx.device.type == "cuda":
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        return int(total * ctx.args.step.memory_fraction) - torch.cuda.memory_allocated(ctx.device)
    return int(ctx.args.step.cpu_memory_mib * 2**20)


def probe(ctx, model, params, name: str, batch_size: int, seq_len: int):
    """Peak bytes (above the step's start) of one step of arm `name` at B rows, or None if it ran out of memory."""
    from bench import bench_step

    vocab = ctx.shape.vocab_size
    arm, peak, oom = None, None, False
    try:
        arm = make_arm(name, model, params, batch_size, ctx)
        batch = bench_step.synthetic_batch(
            batch_size, seq_len, vocab, ctx.args.step.answer_fraction, ctx.args.check.seed, ctx.device
        )
        peak = bench_step.run_arm(arm, batch, lambda step: bench_step.step_peak_memory(step, ctx.device))[
            "peak_bytes"
        ]
    except Exception as error:
        if not is_oom(error):
            raise
        oom = True
    del arm
    clear_training_state(model, params)
    ctx.empty_cache()
    return None if oom else peak


def _round_batch(b: int) -> int:
    return b - b % 8 if b >= 16 else max(1, b)


def search_batch(ctx, model, params, name: str, seq_len: int, clock) -> dict:
    """The largest B whose step fits: two probes, a linear fit of peak(B), the prediction tried, then bisection
    below it."""
    s = ctx.args.step
    probes = []

    def attempt(b):
        room = free_bytes(ctx)
        peak = probe(ctx, model, params, name, b, seq_len)
        fits = peak is not None and peak <= room
        probes.append({"batch_size": b, "peak_bytes": peak, "room_bytes": room, "fits": fits})
        return fits, peak

    b1 = max(1, min(s.search_start_tokens // seq_len, s.max_batch_size))
    fits, p1 = attempt(b1)
    while not fits and b1 > 1 and not clock.expired():
        b1 = max(1, b1 // 2)
        fits, p1 = attempt(b1)
    if not fits:
        return {"max_batch_size": 0, "probes": probes}
    best, predicted = b1, None
    if b1 < s.max_batch_size and not clock.expired():
        b2 = min(2 * b1, s.max_batch_size)
        fits2, p2 = attempt(b2)
        if fits2:
            best = b2
            slope = max((p2 - p1) / (b2 - b1), 1.0)
            predicted = _round_batch(min(s.max_batch_size, b2 + int((free_bytes(ctx) - p2) / slope)))
            lo, hi, candidate = best, None, predicted  # lo fits; hi (once known) does not
            for _ in range(5):
                if candidate <= lo or clock.expired():
                    break
                ok, _ = attempt(candidate)
                # the prediction itself fits: peak memory is linear in B, so that is the limit
                if ok and hi is None:
                    lo = candidate
                    break
                lo, hi = (candidate, hi) if ok else (lo, candidate)
                if hi - lo <= max(8, lo // 20):
                    break
                candidate = _round_batch((lo + hi) // 2)
            best = lo
    return {"max_batch_size": best, "predicted": predicted, "probes": probes}


def part_step(ctx, clock) -> dict:
    from utils import privacy

    s = ctx.args.step
    model = ctx.model()
    model.train()  # as in training: LoRA dropout on
    params = [p for p in model.parameters() if p.requires_grad]
    default = privacy.DEFAULT_GRAD_SAMPLE_MODE
    modes = list(dict.fromkeys([default] + list(s.grad_sample_modes)))
    project_arms = ["nonprivate"] + [f"dp_{m}" for m in modes]
    reference_arms = ["notebook", "hf_nonprivate"]
    out = {
        "default_grad_sample_mode": default,
        "peak_tflops": s.peak_tflops,
        "memory_method": "",
        "results": [],
        "flops_formula": "4*N_body*B*T + 12*L*n_heads*head_dim*B*T^2 + 4*V*H*M (module docstring)",
    }
    from bench import bench_step

    out["memory_method"] = bench_step.MEMORY_METHOD[ctx.device.type]
    out["matmul_ceiling"] = matmul_ceiling(ctx)
    ctx.write()
    for index, seq_len in enumerate(s.seq_lens):
        share = Clock(clock.left() / (len(s.seq_lens) - index))  # this T's share of the time left
        search_clock = Clock(share.limit_s * SEARCH_SHARE)
        entry = {"seq_len": seq_len, "time_share_s": share.limit_s, "batch_search": {}, "groups": {}}
        out["results"].append(entry)
        # the arms every goal needs first, so a search cut short still leaves both groups something to measure
        order = ["nonprivate", f"dp_{default}"] + reference_arms + [f"dp_{m}" for m in modes if m != default]
        for name in order:
            if search_clock.expired():
                entry["batch_search"][name] = {"status": "skipped: time limit", "max_batch_size": 0}
                continue
            entry["batch_search"][name] = search_batch(ctx, model, params, name, seq_len, search_clock)
            ctx.write()
        found = {n: r.get("max_batch_size", 0) for n, r in entry["batch_search"].items()}
        arms_a = [n for n in project_arms if found.get(n, 0) >= 1]
        arms_b = [n for n in ["nonprivate", f"dp_{default}"] + reference_arms if found.get(n, 0) >= 1]
        b_a = min((found[n] for n in arms_a), default=0)
        b_b = min([b_a] + [found[n] for n in arms_b])
        groups = (
            ("A", arms_a, [m for m in modes if f"dp_{m}" in arms_a], b_a),
            ("B", arms_b, [default] if f"dp_{default}" in arms_b else [], b_b),
        )
        for group, names, group_modes, batch_size in groups:
            if share.expired() or batch_size < 1 or "nonprivate" not in names or not group_modes:
                entry["groups"][group] = {
                    "status": "skipped: time limit"
                    if share.expired()
                    else "skipped: too few arms fit a batch"
                }
                continue
            entry["groups"][group] = measure_group(
                ctx, model, params, names, group_modes, batch_size, seq_len, share
            )
            ctx.write()
        group_a = entry["groups"].get("A", {})
        if group_a.get("arms") and f"dp_{default}" in group_a["arms"] and not share.expired():
            entry["dp_phases"] = phases(ctx, model, params, group_a["batch_size"], seq_len, default)
            entry["mfu_limits"] = mfu_limits(entry, out["matmul_ceiling"], s.peak_tflops, default)
            if "dp_step_s_per_example" not in ctx.notes:
                ctx.notes["dp_step_s_per_example"] = (
                    group_a["arms"][f"dp_{default}"]["median_s"] / group_a["batch_size"]
                )
                ctx.notes["dp_batch_size"] = group_a["batch_size"]
        ctx.write()
    out["status"] = (
        "ok"
        if all(g.get("arms") for r in out["results"] for g in r["groups"].values())
        and len(out["results"]) == len(s.seq_lens)
        else "partial"
    )
    return out


def measure_group(
    ctx, model, params, names: list[str], modes: list[str], batch_size: int, seq_len: int, clock
) -> dict:
    """bench_step.bench_seq_len over these arms at B rows; backs off 15% once if an arm runs out of memory."""
    from bench import bench_step

    s = ctx.args.step
    for attempt in range(2):
        b = dataclasses.replace(
            bench_step.BenchArguments(),
            seq_lens=[seq_len],
            tokens_per_batch=batch_size * seq_len,
            answer_fraction=s.answer_fraction,
            warmup_steps=s.warmup_steps,
            steps=s.steps,
            grad_sample_modes=modes,
            skip_notebook="notebook" not in names,
            skip_hf_nonprivate="hf_nonprivate" not in names,
            hf_pad_to=s.hf_pad_to,
            seed=ctx.args.check.seed,
        )
        try:
            result = bench_step.bench_seq_len(model, params, b, seq_len, ctx.shape.vocab_size, ctx.device)
            break
        except Exception as error:
            if not is_oom(error) or attempt:
                raise
        clear_training_state(model, params)
        ctx.empty_cache()
        batch_size = _round_batch(int(batch_size * 0.85))
    clear_training_state(model, params)
    ctx.empty_cache()
    flops = model_flops(ctx.shape, batch_size, seq_len, result["answer_tokens"])
    for arm in result["arms"].values():
        arm["examples_per_s"] = batch_size / arm["median_s"]
        arm["tokens_per_s"] = batch_size * seq_len / arm["median_s"]
        arm["tflops_per_s"] = flops / arm["median_s"] / 1e12
        arm["mfu"] = arm["tflops_per_s"] / s.peak_tflops
    if "nonprivate" in result["arms"]:
        base = result["arms"]["nonprivate"]
        for mode in modes:
            arm = result["arms"].get(f"dp_{mode}")
            ratio = result["ratios"].get(f"dp_{mode}/nonprivate")
            if arm and ratio is not None and "peak_total_bytes" in arm:
                ratio["memory_total"] = arm["peak_total_bytes"] / base["peak_total_bytes"]
    result.update({"batch_size": batch_size, "model_flops": flops})
    return result


def phases(ctx, model, params, batch_size: int, seq_len: int, mode: str) -> dict:
    """One DP step and one non-private step split into body forward, head, backward and optimizer step."""
    import torch

    from bench import bench_step
    from utils import privacy, training
    from utils.loss import answer_hidden_states, per_example_loss

    batch = bench_step.synthetic_batch(
        batch_size,
        seq_len,
        ctx.shape.vocab_size,
        ctx.args.step.answer_fraction,
        ctx.args.check.seed,
        ctx.device,
    )
    out = {"batch_size": batch_size}
    for dp in (True, False):
        hooks = privacy.attach_per_sample_hooks(model, mode) if dp else None
        try:
            optimizer = torch.optim.AdamW(params, lr=bench_step.LEARNING_RATE)
            if dp:
                optimizer = privacy.make_dp_optimizer(
                    optimizer,
                    bench_step.NOISE_MULTIPLIER,
                    bench_step.MAX_GRAD_NORM,
                    batch_size,
                    torch.Generator(device=ctx.device).manual_seed(ctx.args.check.seed),
                )

            def timed(fn):
                ctx.sync()
                started = time.perf_counter()
                value = fn()
                ctx.sync()
                return time.perf_counter() - started, value

            for _ in range(2):  # the first round warms up
                body_s, hidden = timed(
                    lambda: answer_hidden_states(
                        model, batch["input_ids"], batch["attention_mask"], batch["labels"]
                    )
                )
                del hidden
                clear_training_state(model, params)  # the hooks saw a forward with no backward
                forward_s, losses = timed(lambda: per_example_loss(model, batch))
                del losses
                clear_training_state(model, params)
                full_s, _ = timed(lambda: training.backward_examples(model, batch, params, dp, batch_size))
                step_s, _ = timed(optimizer.step)
                optimizer.zero_grad(set_to_none=True)
                clear_training_state(model, params)
        finally:
            if hooks is not None:
                hooks.remove_hooks()
            clear_training_state(model, params)
        total = full_s + step_s
        out["dp" if dp else "nonprivate"] = {
            "body_forward_s": body_s,
            "head_forward_s": max(forward_s - body_s, 0.0),
            "backward_s": max(full_s - forward_s, 0.0),
            "optimizer_step_s": step_s,
            "step_s": total,
            "shares": {
                "body_forward": body_s / total,
                "head_forward": max(forward_s - body_s, 0.0) / total,
                "backward": max(full_s - forward_s, 0.0) / total,
                "optimizer_step": step_s / total,
            },
        }
    ctx.empty_cache()
    return out


def matmul_ceiling(ctx) -> dict:
    """TFLOP/s of a bare square matmul in the check's dtype: what the device reaches outside the model."""
    import torch

    n = 8192 if ctx.device.type == "cuda" else 256
    a = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    for _ in range(3):
        a @ b
    ctx.sync()
    repeats = 20 if ctx.device.type == "cuda" else 3
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    ctx.sync()
    seconds = (time.perf_counter() - started) / repeats
    del a, b
    ctx.empty_cache()
    return {"n": n, "dtype": str(ctx.dtype).replace("torch.", ""), "tflops_per_s": 2 * n**3 / seconds / 1e12}


def mfu_limits(entry: dict, ceiling: dict, peak_tflops: float, mode: str) -> str:
    """What holds the DP step's MFU down, in words made from this run's numbers."""
    arms = entry["groups"]["A"]["arms"]
    dp, base = arms.get(f"dp_{mode}"), arms.get("nonprivate")
    split = entry.get("dp_phases", {}).get("dp", {}).get("shares", {})
    parts = [f"MFU {dp['mfu']:.1%} (dp_{mode}) vs {base['mfu']:.1%} non-private" if dp and base else ""]
    parts.append(
        f"a bare {ceiling['n']}^3 matmul reaches {ceiling['tflops_per_s'] / peak_tflops:.0%} of the "
        f"{peak_tflops:g} TFLOP/s peak"
    )
    if split:
        largest = sorted(split.items(), key=lambda kv: -kv[1])
        parts.append("DP step time: " + ", ".join(f"{name} {share:.0%}" for name, share in largest))
    return "; ".join(p for p in parts if p)


# -----------------------------------------------------------------------------
# part 3: generation


def save_adapters(ctx) -> str:
    """Adapters of the default LoRA shape over the saved base, written as a run writes them."""
    directory = ctx.work / "fresh_adapters"
    if not directory.exists():
        ctx.model().save_pretrained(str(directory))
    return str(directory)


def part_generate(ctx, clock) -> dict:
    from bench import bench_generate

    g = ctx.args.generate
    adapters = save_adapters(ctx)
    ctx.release()
    questions = [c["input"] for c in ctx.cards]
    settings = dataclasses.replace(
        bench_generate.BenchArguments(),
        model=ctx.base_dir,
        max_new_tokens=g.gen_max_new_tokens,
        device=str(ctx.device),
    )
    runs = []
    out = {"runs": runs, "max_new_tokens": g.gen_max_new_tokens}
    for batch_size in g.gen_batch_sizes:
        for merged in (False, True):
            if clock.expired():
                runs.append({"batch_size": batch_size, "merged": merged, "status": "skipped: time limit"})
                continue
            n = max(batch_size, g.gen_min_questions)
            name = f"batch{batch_size}_{'merged' if merged else 'attached'}"
            run = bench_generate.measure(
                name, adapters, settings, questions[:n], batch_size, merged, str(ctx.device)
            )
            run["questions"] = n
            runs.append(run)
            ctx.empty_cache()
            ctx.write()
    measured = [r for r in runs if "answers" in r]
    for merged in (False, True):
        ones = [r for r in measured if r["merged"] == merged and r["batch_size"] == 1]
        for run in (r for r in measured if r["merged"] == merged):
            if ones and ones[0]["answer_tokens_per_s"]:
                run["speedup_vs_batch1"] = run["answer_tokens_per_s"] / ones[0]["answer_tokens_per_s"]
                common = min(len(run["answers"]), len(ones[0]["answers"]))
                run["same_answers_as_batch1"] = run["answers"][:common] == ones[0]["answers"][:common]
    for run in measured:
        run["answers"] = run["answers"][:2]  # two examples are enough in the report
    out["status"] = "ok" if len(measured) == len(runs) else "partial"
    return out


# -----------------------------------------------------------------------------
# part 4: end to end, as subprocesses


def run_command(cmd: list[str], env: dict, timeout_s: float) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen(
        cmd,
        cwd=str(REPO),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=max(timeout_s, 1.0))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        timed_out = True
    return {
        "command": shlex.join(cmd),
        "rc": process.returncode,
        "timed_out": timed_out,
        "wall_s": time.perf_counter() - started,
        "stdout": stdout,
        "stderr": stderr,
    }


def _tail(text: str, n: int = 2500) -> str:
    return text[-n:] if text else ""


def read_epsilon(run_dir: Path, stdout: str) -> dict:
    """Epsilon of a finished run: the public report in the release bundle, the older layout's, or the 'Done:' line."""
    for path in (run_dir / "adapter" / "privacy_report.json", run_dir / "privacy_report.json"):
        if path.exists():
            try:
                report = json.loads(path.read_text(encoding="utf-8"))
                value = report.get("epsilon")
                return {
                    "epsilon": float(value) if value is not None else None,
                    "source": str(path.relative_to(run_dir)),
                    "delta": report.get("delta"),
                    "steps": report.get("steps_taken", report.get("steps")),
                }
            except (ValueError, TypeError, AttributeError):
                continue
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("Done:"):
            for following in lines[i : i + 4]:  # the line itself, or the guarantee printed under it
                match = re.search(r"epsilon\s*(?:=|<=|≤)\s*([0-9.eE+-]+|inf)", following)
                if match:
                    return {"epsilon": float(match.group(1)), "source": "stdout, at the Done: line"}
    return {"epsilon": None, "source": None}


def subprocess_env(ctx, with_shims: bool) -> dict:
    env = dict(os.environ)
    path = [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if with_shims:
        path.insert(0, str(SHIMS_DIR))
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(dict.fromkeys(path)),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "disabled",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if ctx.args.check.threads:
        env["OMP_NUM_THREADS"] = str(ctx.args.check.threads)
    if ctx.device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif ctx.device.index is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(ctx.device.index)
    return env


def part_end_to_end(ctx, clock) -> dict:
    e = ctx.args.end_to_end
    ctx.release()
    run_dir = ctx.work / "e2e_run"
    per_example = ctx.notes.get("dp_step_s_per_example")
    if e.e2e_max_steps > 0:
        steps, sized = e.e2e_max_steps, "--e2e_max_steps"
    elif per_example:
        # half the target for the steps themselves: start-up, noise calibration, evaluation and saving take the rest
        steps = int(min(300, max(3, 0.5 * e.e2e_train_s / (per_example * e.e2e_logical_batch_size))))
        sized = f"from part 2: {per_example * 1e3:.2f} ms per example"
    else:
        steps, sized = 20, "default (part 2 did not run)"
    per_device = min(
        e.e2e_per_device_batch_size, max(1, ctx.notes.get("dp_batch_size", e.e2e_per_device_batch_size))
    )
    python = sys.executable or "python3"
    train_cmd = [
        python,
        "train_dp_lora.py",
        "--model",
        ctx.base_dir,
        "--dataset",
        "bundled",
        "--report_to",
        "none",
        "--output_dir",
        str(run_dir),
        "--max_steps",
        str(steps),
        "--logical_batch_size",
        str(e.e2e_logical_batch_size),
        "--per_device_train_batch_size",
        str(per_device),
        "--epsilon",
        str(e.e2e_epsilon),
        "--eval_steps",
        "0",
        "--save_steps",
        "0",
        "--epsilon_log_steps",
        str(max(1, steps // 4)),
        "--seed",
        str(ctx.args.check.seed),
    ]
    out = {"max_steps": steps, "max_steps_sized": sized, "per_device_train_batch_size": per_device}
    reserve = min(0.4 * clock.limit_s, 60.0)  # kept for infer.py and evaluate_qa.py
    train = run_command(train_cmd, subprocess_env(ctx, False), clock.left() - reserve)
    out["train"] = {k: v for k, v in train.items() if k not in ("stdout", "stderr")}
    out["train"].update({"stdout_tail": _tail(train["stdout"]), "stderr_tail": _tail(train["stderr"])})
    out["train"].update(read_epsilon(run_dir, train["stdout"]))
    done = [line for line in train["stdout"].splitlines() if line.strip().startswith("Done:")]
    out["train"]["done_line"] = done[-1].strip() if done else None
    ctx.write()
    if train["rc"] != 0:
        out["status"] = "failed: train_dp_lora.py " + (
            "timed out" if train["timed_out"] else f"exited {train['rc']}"
        )
        return out
    infer_cmd = [
        python,
        "infer.py",
        "--adapters",
        str(run_dir),
        "--question",
        e.e2e_question,
        "--max_new_tokens",
        str(e.e2e_max_new_tokens),
    ]
    shim = any(
        importlib.util.find_spec(name) is None for name in ("evaluate", "datasets", "pyarrow", "pandas")
    )  # what `import evaluate` needs
    eval_dir = ctx.work / "e2e_eval"
    eval_cmd = [
        python,
        "evaluate_qa.py",
        "--adapters",
        str(run_dir),
        "--max_samples",
        str(e.e2e_eval_samples),
        "--no_base",
        "--report_to",
        "none",
        "--output_dir",
        str(eval_dir),
        "--max_new_tokens",
        str(e.e2e_max_new_tokens),
    ]
    if e.e2e_concurrent:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            pending = [
                pool.submit(run_command, infer_cmd, subprocess_env(ctx, False), clock.left()),
                pool.submit(run_command, eval_cmd, subprocess_env(ctx, shim), clock.left()),
            ]
            infer, evaluation = (f.result() for f in pending)
    else:
        infer = run_command(infer_cmd, subprocess_env(ctx, False), clock.left() - reserve / 2)
        evaluation = run_command(eval_cmd, subprocess_env(ctx, shim), clock.left())
    out["concurrent"] = e.e2e_concurrent
    out["infer"] = {k: v for k, v in infer.items() if k not in ("stdout", "stderr")}
    out["infer"].update({"stdout_tail": _tail(infer["stdout"], 1500), "stderr_tail": _tail(infer["stderr"])})
    out["evaluate"] = {k: v for k, v in evaluation.items() if k not in ("stdout", "stderr")}
    out["evaluate"].update(
        {
            "stdout_tail": _tail(evaluation["stdout"], 1500),
            "stderr_tail": _tail(evaluation["stderr"]),
            "metric_module": "bench/gpu_shims/evaluate (utils.metrics; `evaluate` does not import here)"
            if shim
            else "evaluate",
        }
    )
    results_file = (
        next(iter(sorted(eval_dir.glob("**/eval_results.json"))), None) if eval_dir.exists() else None
    )
    if results_file:
        try:
            results = json.loads(results_file.read_text(encoding="utf-8"))
            out["evaluate"]["results"] = (
                results.get("models", results) if isinstance(results, dict) else results
            )
        except ValueError:
            pass
    failed = [name for name in ("infer", "evaluate") if out[name]["rc"] != 0]
    out["status"] = (
        "ok" if not failed else "failed: " + ", ".join(f"{n} exited {out[n]['rc']}" for n in failed)
    )
    return out


# -----------------------------------------------------------------------------
# goals, tables, summary


def goals(report: dict) -> dict:
    out = {}
    step = report["parts"].get("step", {})
    default = step.get("default_grad_sample_mode")
    for entry in step.get("results", []):
        T = entry["seq_len"]
        a, b = entry["groups"].get("A", {}), entry["groups"].get("B", {})
        ratio = a.get("ratios", {}).get(f"dp_{default}/nonprivate")
        if ratio:
            out[f"dp_vs_nonprivate_time_T{T}"] = {
                "value": ratio["time"],
                "target": "<= 1.05",
                "met": ratio["time"] <= 1.05,
            }
            memory = ratio.get("memory_total", ratio["memory"])
            out[f"dp_vs_nonprivate_memory_T{T}"] = {
                "value": memory,
                "target": "<= 1.05",
                "met": memory <= 1.05,
            }
        ratio = b.get("ratios", {}).get(f"dp_{default}/hf_nonprivate")
        if ratio:
            out[f"dp_vs_hf_nonprivate_time_T{T}"] = {
                "value": ratio["time"],
                "target": "<= 0.6",
                "met": ratio["time"] <= 0.6,
                "batch_size": b.get("batch_size"),
            }
        arm = a.get("arms", {}).get(f"dp_{default}")
        if arm:
            out[f"dp_mfu_T{T}"] = {
                "value": arm["mfu"],
                "target": "reported",
                "met": None,
                "limits": entry.get("mfu_limits"),
            }
    for run in report["parts"].get("generate", {}).get("runs", []):
        if run.get("batch_size") == 16 and "speedup_vs_batch1" in run:
            key = "generation_batch16_vs_batch1_" + ("merged" if run["merged"] else "attached")
            out[key] = {
                "value": run["speedup_vs_batch1"],
                "target": ">= 8",
                "met": run["speedup_vs_batch1"] >= 8,
            }
    return out


def _fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def markdown(report: dict) -> str:
    env = report.get("environment", {}).get("found", {})
    lines = [
        f"# GPU check: {env.get('gpu') or env.get('device', '?')}",
        "",
        f"torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, opacus {env.get('opacus', '?')}, "
        f"peft {env.get('peft', '?')}; python {report.get('environment', {}).get('python', '?')}; "
        f"model {report.get('model_shape', {})}; wall {_fmt(report.get('wall_s'), '.0f')} s",
        "",
    ]
    missing = report.get("environment", {}).get("missing")
    if missing:
        lines += ["## Missing", ""] + [f"- {m}" for m in missing] + [""]
    lines += ["## Parts", "", "| part | status | seconds |", "| --- | --- | --- |"]
    for name, part in report.get("parts", {}).items():
        lines.append(f"| {name} | {part.get('status', '?')} | {_fmt(part.get('wall_s'), '.1f')} |")
    correctness = report.get("parts", {}).get("correctness", {})
    if correctness.get("checks"):
        lines += [
            "",
            "## Correctness",
            "",
            "| check | passed | measured | budget |",
            "| --- | --- | --- | --- |",
        ]
        for name, check in correctness["checks"].items():
            if name.startswith("per_sample"):
                measured, budget = (
                    f"{_fmt(check.get('error_ulps'))} ulps (floor {_fmt(check.get('floor_ulps'))})",
                    f"{_fmt(check.get('budget_ulps'))} ulps",
                )
            elif name.startswith("chunked"):
                measured = f"loss {_fmt(check.get('loss_error_ulps'))}, grad {_fmt(check.get('grad_error_ulps'))} ulps"
                budget = f"{_fmt(check.get('loss_budget_ulps'))} / {_fmt(check.get('grad_budget_ulps'))} ulps"
            elif name.startswith("dp_noise"):
                measured = (
                    f"std/expected {_fmt(check.get('std_ratio'), '.5f')}, mean {_fmt(check.get('mean'))}, "
                    f"clip {_fmt(check.get('clip_error_fp32_ulps'))} fp32 ulps"
                )
                std_margin, mean_margin = (
                    _fmt(check.get("std_margin"), ".2g"),
                    _fmt(check.get("mean_margin"), ".2g"),
                )
                budget = f"+-{std_margin}, +-{mean_margin}, {CLIP_BUDGET_ULPS:g}"
            else:
                measured, budget = check.get("status", ""), ""
                if check.get("losses"):
                    measured += f"; loss {check['losses'][0]:.3f} -> {check['losses'][-1]:.3f}"
            lines.append(f"| {name} | {_fmt(check.get('passed'))} | {measured} | {budget} |")
    step = report.get("parts", {}).get("step", {})
    if step.get("results"):
        lines += [
            "",
            "## Step cost",
            "",
            f"memory: {step.get('memory_method')}; MFU against {step.get('peak_tflops')} TFLOP/s; "
            f"bare matmul {_fmt(step.get('matmul_ceiling', {}).get('tflops_per_s'), '.0f')} TFLOP/s; FLOPs "
            f"{step.get('flops_formula')}",
            "",
            "| T | group | B | arm | s/step | examples/s | tokens/s | peak GiB | above start GiB | MFU |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for entry in step["results"]:
            for group, result in entry["groups"].items():
                for name, arm in result.get("arms", {}).items():
                    total = arm.get("peak_total_bytes")
                    lines.append(
                        f"| {entry['seq_len']} | {group} | {result['batch_size']} | {name} | {arm['median_s']:.4f} | "
                        f"{arm['examples_per_s']:.1f} | {arm['tokens_per_s']:.0f} | "
                        f"{_fmt(total / 2**30 if total else None, '.2f')} | "
                        f"{arm['peak_bytes'] / 2**30:.3f} | {arm['mfu']:.1%} |"
                    )
        lines += [
            "",
            "| T | group | ratio | time | memory (above start) | memory (total peak) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for entry in step["results"]:
            for group, result in entry["groups"].items():
                for name, ratio in result.get("ratios", {}).items():
                    lines.append(
                        f"| {entry['seq_len']} | {group} | {name} | {ratio['time']:.3f} | "
                        f"{ratio['memory']:.3f} | {_fmt(ratio.get('memory_total'), '.3f')} |"
                    )
        lines += ["", "| T | largest batch found per arm |", "| --- | --- |"]
        for entry in step["results"]:
            lines.append(
                f"| {entry['seq_len']} | "
                + ", ".join(f"{n} {r.get('max_batch_size', '-')}" for n, r in entry["batch_search"].items())
                + " |"
            )
        for entry in step["results"]:
            if entry.get("mfu_limits"):
                lines.append(f"\nT={entry['seq_len']}: {entry['mfu_limits']}")
    generate = report.get("parts", {}).get("generate", {})
    if generate.get("runs"):
        lines += [
            "",
            "## Generation",
            "",
            "| batch | adapters | questions | seconds | answer tokens/s | speedup vs batch 1 | same answers |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for run in generate["runs"]:
            lines.append(
                f"| {run['batch_size']} | {'merged' if run['merged'] else 'attached'} | {run.get('questions', '-')} | "
                f"{_fmt(run.get('seconds'), '.2f')} | {_fmt(run.get('answer_tokens_per_s'), '.1f')} | "
                f"{_fmt(run.get('speedup_vs_batch1'), '.2f')} | {_fmt(run.get('same_answers_as_batch1'))} |"
            )
    e2e = report.get("parts", {}).get("end_to_end", {})
    if e2e.get("train"):
        lines += [
            "",
            "## End to end",
            "",
            "| script | exit | seconds | note |",
            "| --- | --- | --- | --- |",
            f"| train_dp_lora.py ({e2e.get('max_steps')} steps) | {e2e['train']['rc']} | "
            f"{e2e['train']['wall_s']:.1f} | "
            f"epsilon {_fmt(e2e['train'].get('epsilon'), '.4g')} ({e2e['train'].get('source')}) |",
        ]
        for name in ("infer", "evaluate"):
            if name in e2e:
                note = e2e[name].get("metric_module", "") if name == "evaluate" else ""
                lines.append(f"| {name} | {e2e[name]['rc']} | {e2e[name]['wall_s']:.1f} | {note} |")
    if report.get("goals"):
        lines += ["", "## Goals", "", "| goal | value | target | met |", "| --- | --- | --- | --- |"]
        for name, goal in report["goals"].items():
            lines.append(
                f"| {name} | {_fmt(goal['value'], '.3f')} | {goal['target']} | {_fmt(goal['met'])} |"
            )
    return "\n".join(lines) + "\n"


def summary(report: dict) -> str:
    env = report.get("environment", {}).get("found", {})
    lines = [
        f"GPU check on {env.get('gpu') or env.get('device')} (torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}, "
        f"opacus {env.get('opacus')}): {_fmt(report.get('wall_s'), '.0f')} s"
    ]
    for name, part in report.get("parts", {}).items():
        lines.append(f"  {name:<12} {part.get('status', '?')} ({_fmt(part.get('wall_s'), '.0f')} s)")
    for name, check in report.get("parts", {}).get("correctness", {}).get("checks", {}).items():
        verdict = "passed" if check.get("passed") else "FAILED"
        if check.get("passed") is None:
            verdict = check.get("status", "FAILED")
        lines.append(f"    {name:<30} {verdict}")
    step = report.get("parts", {}).get("step", {})
    for entry in step.get("results", []):
        for group, result in entry["groups"].items():
            arms = result.get("arms", {})
            if arms:
                lines.append(
                    f"    T={entry['seq_len']} {group} B={result['batch_size']}: "
                    + ", ".join(
                        f"{n} {a['median_s'] * 1e3:.0f} ms/{a.get('mfu', 0):.0%}" for n, a in arms.items()
                    )
                )
    for run in report.get("parts", {}).get("generate", {}).get("runs", []):
        if "answer_tokens_per_s" in run:
            lines.append(
                f"    generate batch {run['batch_size']:>3} {'merged  ' if run['merged'] else 'attached'}: "
                f"{run['answer_tokens_per_s']:.1f} answer tok/s"
            )
    e2e = report.get("parts", {}).get("end_to_end", {})
    if e2e.get("train"):
        lines.append(
            f"    train {e2e['train']['wall_s']:.0f} s (epsilon {_fmt(e2e['train'].get('epsilon'), '.4g')}), "
            + ", ".join(
                f"{n} {e2e[n]['wall_s']:.0f} s (exit {e2e[n]['rc']})"
                for n in ("infer", "evaluate")
                if n in e2e
            )
        )
    for name, goal in report.get("goals", {}).items():
        lines.append(
            f"  goal {name:<38} {_fmt(goal['value'], '.3f'):>8} {goal['target']:<9} {_fmt(goal['met'])}"
        )
    lines.append(f"  written: {report.get('files')}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------

PART_FUNCTIONS = {
    "correctness": part_correctness,
    "step": part_step,
    "generate": part_generate,
    "end_to_end": part_end_to_end,
}


def main(args) -> dict:
    started = time.perf_counter()
    apply_tiny(args)
    validate_args(args)
    c = args.check
    output = Path(c.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    files = [str(output / JSON_NAME), str(output / MARKDOWN_NAME)]
    report = {
        "command": " ".join(["python"] + sys.argv),
        "args": cli.to_dict(args),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "files": files,
        "parts": {},
    }

    def write():
        report["wall_s"] = time.perf_counter() - started
        report["goals"] = goals(report)
        Path(files[0]).write_text(json.dumps(_json_safe(report), indent=2) + "\n", encoding="utf-8")
        Path(files[1]).write_text(markdown(report), encoding="utf-8")

    report["environment"] = check_environment(c.device)
    if report["environment"]["missing"]:
        report["status"] = "environment incomplete"
        write()
        raise CheckError("; ".join(report["environment"]["missing"]))
    import torch

    threads_before = torch.get_num_threads()
    if c.threads:
        torch.set_num_threads(c.threads)
    try:
        with quiet():
            run_parts(args, report, write, started)
    finally:
        torch.set_num_threads(threads_before)
    report["status"] = "done"
    write()
    print(summary(report), flush=True)
    return report


def run_parts(args, report: dict, write, started: float) -> None:
    import torch

    c = args.check
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        ctx = Context(args, Path(work), report, write)
        report["model_shape"] = ctx.shape.as_dict()
        report["setup"] = ctx.setup()
        write()
        print(
            f"setup: model saved in {report['setup']['model_saved_s']:.1f} s "
            f"({report['setup']['parameters']['total']:,} parameters, "
            f"{ctx.device}, {report['setup']['dtype']})",
            flush=True,
        )
        for name in PARTS:
            if name not in c.parts:
                continue
            left_overall = c.time_budget_s - (time.perf_counter() - started)
            limit = min(getattr(args.limits, f"{name}_s"), left_overall)
            if limit <= 0:
                report["parts"][name] = {"status": "skipped: --time_budget_s spent"}
                write()
                continue
            clock = Clock(limit)
            print(f"part {name} (limit {limit:.0f} s) ...", flush=True)
            try:
                result = PART_FUNCTIONS[name](ctx, clock)
                result.setdefault("status", "ok")
                if name == "correctness":
                    result["status"] = "passed" if result.get("passed") else "FAILED"
            except Exception as error:
                result = {"status": f"error: {_one_line(error)}", "traceback": traceback.format_exc()[-4000:]}
            result["wall_s"] = clock.elapsed()
            result["limit_s"] = limit
            report["parts"][name] = result
            if name in ("correctness", "step") and ctx._model is not None and "generate" in c.parts:
                try:
                    save_adapters(ctx)  # from the model in memory: part 3 need not load it again
                except Exception as error:
                    result["adapters_error"] = _one_line(error)
            if name == "step":
                ctx.release()
            ctx.empty_cache()
            if ctx.device.type == "cuda":
                result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(ctx.device)
            write()
            print(f"part {name}: {result['status']} ({result['wall_s']:.1f} s)", flush=True)
        ctx.release()


@contextlib.contextmanager
def quiet():
    """No progress bars or library notices between the results (restored afterwards: main may run inside pytest)."""
    import logging
    import warnings

    import transformers

    verbosity = transformers.utils.logging.get_verbosity()
    absl = logging.getLogger("absl")
    absl_level = absl.level
    with warnings.catch_warnings():
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        absl.setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        try:
            yield
        finally:
            transformers.utils.logging.set_verbosity(verbosity)
            transformers.utils.logging.enable_progress_bar()
            absl.setLevel(absl_level)


if __name__ == "__main__":
    sys.exit(cli.run_main(main, parse_args))
