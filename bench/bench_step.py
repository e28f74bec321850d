"""What one DP-LoRA training step costs next to a non-private LoRA step and the public notebook's path.

Contract
- One process, one model (utils.training.build_lora_model with the default LoraArguments and
  compute_dtype: the training script's LoRA setup, dtype and device; A trained, as --lora_freeze_a
  false, so every arm does the full adapter's work: the DP recipe freezes A and skips its gradients),
  one synthetic batch per sequence length: B rows of T tokens, the first (1 - answer_fraction) of
  each row a masked prompt and the rest answer tokens (no padding: the worst case for memory).
- Arms, each with its own optimizer over the same LoRA weights, measured round-robin (the order
  rotates every round) so that load from other processes hits them alike:
    nonprivate   utils.training.backward_examples (per-example loss, (sum / B).backward()), AdamW
                 step: train_dp_lora.py with --disable_dp;
    dp_<mode>    what train_dp_lora.py runs per step with --grad_sample_mode <mode>:
                 privacy.attach_per_sample_hooks (unwrapped), utils.training.backward_examples (the
                 loop's own function), privacy.make_dp_optimizer over AdamW with the
                 accountant's step hook (clip, noise, step);
    notebook     the public notebook's path: Opacus GradSampleModule (wrapped, default hooks,
                 loss_reduction="mean") around the model, the Hugging Face loss model(labels=...)
                 (full B x T x V logits, token mean over the batch), and a DPOptimizer as
                 PrivacyEngine.make_private builds it, with the same accountant hook;
    hf_nonprivate  the plain Hugging Face non-private path: model(input_ids, attention_mask,
                 labels=...).loss (full B x T' x V logits, token mean over the batch), AdamW step,
                 each row right-padded to T' = max(T, --hf_pad_to) (the notebook pads every row to
                 128; pads masked and unlabelled). Ratios dp_<mode>/hf_nonprivate are per step at
                 the same B (--skip_hf_nonprivate leaves it out).
- Time: wall-clock seconds of --steps measured rounds per arm (CUDA synchronised), after
  --warmup_steps unmeasured ones and one memory step. A time ratio is the median over rounds of the
  two arms' ratio within the round; the ratio of the median times is reported beside it.
- Memory: the peak of memory allocated during one step above what was allocated when it started
  (activations, logits, per-sample gradients, noise; not the weights or optimizer state all arms
  share). CUDA: torch.cuda.max_memory_allocated (also reported as an absolute peak). CPU: the
  running sum of the allocation and free events of torch's CPU allocator recorded by
  torch.profiler(profile_memory=True) during the step; allocations outside torch's allocator
  (oneDNN/BLAS scratch space) are not seen.
- The accountant's get_epsilon, which train_dp_lora.py calls once per --epsilon_log_steps, is timed separately
  (epsilon_ms in the JSON).
- Output: a table on stdout and JSON (--output) with every time, peak, ratio and the machine.
  Timings on a shared CPU are noisy; the ratios within one run are what count.

Run
    OMP_NUM_THREADS=1 python bench/bench_step.py   # VaultGemma config, real 256k vocabulary, T=128 and 512
    python bench/bench_step.py --grad_sample_modes ew hooks functorch --vocab_size 2000 --skip_notebook
    python bench/bench_step.py --model gemma3-270m --seq_lens 128 --tokens_per_batch 512   # Gemma 3 270M (slow)
"""

import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/bench_step.py` from anywhere
    sys.path.insert(0, str(REPO))

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the memory profiler's start/stop chatter
import torch  # noqa: E402

from utils import cli, privacy, training  # noqa: E402
from utils.prompt import IGNORE_INDEX  # noqa: E402

SYNTHETIC_MODEL = "vaultgemma-config"
DEFAULT_GRAD_SAMPLE_MODE = privacy.DEFAULT_GRAD_SAMPLE_MODE  # train_dp_lora.py's --grad_sample_mode default
HF_PAD_TO = 128  # the public notebook pads every row to max_length=128
NOISE_MULTIPLIER, MAX_GRAD_NORM, LEARNING_RATE = 1.0, 1.0, 1e-4


@dataclass
class ModelArguments:
    model: str = field(
        default=SYNTHETIC_MODEL,
        metadata={
            "help": f"'{SYNTHETIC_MODEL}' (a random VaultGemma of the sizes below), or any "
            "train_dp_lora.py --model (e.g. gemma3-270m)"
        },
    )
    vocab_size: int = field(
        default=256000, metadata={"help": f"{SYNTHETIC_MODEL} only: vocabulary (VaultGemma's is 256000)"}
    )
    hidden_size: int = field(default=256, metadata={"help": f"{SYNTHETIC_MODEL} only"})
    intermediate_size: int = field(default=1024, metadata={"help": f"{SYNTHETIC_MODEL} only"})
    num_hidden_layers: int = field(default=4, metadata={"help": f"{SYNTHETIC_MODEL} only"})
    num_attention_heads: int = field(
        default=4, metadata={"help": f"{SYNTHETIC_MODEL} only (one key-value head, as VaultGemma 1B)"}
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, ...; auto = cuda if available"})


@dataclass
class BenchArguments:
    seq_lens: list[int] = field(default_factory=lambda: [128, 512], metadata={"help": "sequence lengths T"})
    tokens_per_batch: int = field(default=1024, metadata={"help": "B = max(1, this // T) rows per step"})
    answer_fraction: float = field(
        default=0.5, metadata={"help": "share of each row that is answer (labelled) tokens"}
    )
    warmup_steps: int = field(default=1, metadata={"help": "unmeasured steps per arm first"})
    steps: int = field(default=3, metadata={"help": "measured steps per arm (median reported)"})
    grad_sample_modes: list[str] = field(
        default_factory=lambda: [DEFAULT_GRAD_SAMPLE_MODE],
        metadata={
            "help": "per-sample gradient modes of this project's DP path",
            "choices": list(privacy.GRAD_SAMPLE_MODES),
        },
    )
    skip_notebook: bool = field(default=False, metadata={"help": "leave out the notebook arm (the slowest)"})
    skip_hf_nonprivate: bool = field(
        default=False, metadata={"help": "leave out the plain Hugging Face non-private arm"}
    )
    hf_pad_to: int = field(
        default=HF_PAD_TO,
        metadata={"help": "hf_nonprivate pads each row to max(T, this) tokens, as the notebook does"},
    )
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = torch's default"})
    seed: int = field(default=0, metadata={"help": "seeds the synthetic model, batches, dropout and noise"})
    output: str = field(default="outputs/bench/bench_step.json", metadata={"help": "JSON results"})


GROUPS = {"model": ModelArguments, "bench": BenchArguments}


def parse_args(argv=None):
    parser = cli.build_parser(__doc__.split("\n\n")[0], GROUPS, config_flag=False)
    return cli.parse_into(parser, GROUPS, argv)


def validate_args(args) -> None:
    m, b = args.model, args.bench
    problems = []
    if min(b.seq_lens) < 4:
        problems.append("--seq_lens must all be >= 4")
    if b.tokens_per_batch < 1:
        problems.append("--tokens_per_batch must be >= 1")
    if b.hf_pad_to < 1:
        problems.append("--hf_pad_to must be >= 1")
    if not 0 < b.answer_fraction < 1:
        problems.append(f"--answer_fraction must be in (0, 1), got {b.answer_fraction}")
    if b.steps < 1 or b.warmup_steps < 0:
        problems.append("--steps must be >= 1 and --warmup_steps >= 0")
    if (
        m.model == SYNTHETIC_MODEL
        and min(m.vocab_size, m.hidden_size, m.intermediate_size, m.num_hidden_layers, m.num_attention_heads)
        < 1
    ):
        problems.append("model sizes must be >= 1")
    if m.model == SYNTHETIC_MODEL and m.hidden_size % m.num_attention_heads:
        problems.append("--hidden_size must be a multiple of --num_attention_heads")
    if problems:
        raise cli.ArgumentErrors(problems)


# -----------------------------------------------------------------------------
# the model, the batch, the machine


def synthetic_vaultgemma_dir(
    m: ModelArguments, max_len: int, seed: int, directory: str, max_positions: int = 0
) -> str:
    """A randomly initialised VaultGemma of the requested sizes, saved where --model can load it."""
    from transformers import VaultGemmaConfig, VaultGemmaForCausalLM

    head_dim = m.hidden_size // m.num_attention_heads
    config = VaultGemmaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=1,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        max_position_embeddings=max(max_len, max_positions, 8),
        sliding_window=max(max_len // 2, 4),
        layer_types=["sliding_attention", "full_attention"] * (m.num_hidden_layers // 2)
        + ["sliding_attention"] * (m.num_hidden_layers % 2),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(seed)
    VaultGemmaForCausalLM(config).save_pretrained(directory)
    return directory


def build_bench_model(m: ModelArguments, b: BenchArguments, device, directory: str):
    """(the LoRA model train_dp_lora.py builds with its default LoRA settings and dtype, the --model string used)."""
    max_positions = 0 if b.skip_hf_nonprivate else b.hf_pad_to
    model_name = (
        synthetic_vaultgemma_dir(m, max(b.seq_lens), b.seed, directory, max_positions)
        if m.model == SYNTHETIC_MODEL
        else m.model
    )
    if m.model == SYNTHETIC_MODEL:
        vocabulary = range(
            m.vocab_size
        )  # no tokenizer needed: build_lora_model only checks len(tokenizer) against the embeddings
    else:
        from utils.model_loading import load_tokenizer

        vocabulary = load_tokenizer(model_name)
    torch.manual_seed(b.seed)
    dtype = training.compute_dtype(
        "auto", "no", device
    )  # train_dp_lora.py's --dtype auto, no Accelerate mixed precision
    return training.build_lora_model(
        model_name, training.LoraArguments(), vocabulary, device, dtype=dtype
    ), model_name


def synthetic_batch(
    batch_size: int, seq_len: int, vocab_size: int, answer_fraction: float, seed: int, device
) -> dict:
    """Random tokens; labels only on the last answer_fraction of each row (BOS first, no padding)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=generator)
    input_ids[:, 0] = 2
    labels = input_ids.clone()
    labels[:, : seq_len - max(1, int(round(answer_fraction * seq_len)))] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def machine_info(device) -> dict:
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    import opacus
    import transformers

    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "opacus": opacus.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -----------------------------------------------------------------------------
# measuring


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device) -> float:
    _sync(device)
    started = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - started


def step_peak_memory(step, device) -> dict:
    """Peak bytes allocated during step() above the level at its start (see the module docstring)."""
    if device.type == "cuda":
        _sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": peak - start, "peak_total_bytes": peak}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return {"peak_bytes": peak}


MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during the step minus memory_allocated at its start",
    "cpu": "peak running sum of torch CPU-allocator alloc/free events (torch.profiler, "
    "profile_memory=True) during the step",
}


@dataclass
class Arm:
    name: str
    step: Callable
    enter: Callable = lambda: None  # attach this arm's per-sample machinery (outside the measured time)
    leave: Callable = lambda: None


def nonprivate_arm(model, params, batch_size: int) -> Arm:
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)

    def step(batch):
        training.backward_examples(model, batch, params, False, batch_size)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Arm("nonprivate", step)


def project_dp_arm(model, params, batch_size: int, mode: str, device, seed: int) -> Arm:
    optimizer = privacy.make_dp_optimizer(
        torch.optim.AdamW(params, lr=LEARNING_RATE),
        NOISE_MULTIPLIER,
        MAX_GRAD_NORM,
        batch_size,
        torch.Generator(device=device).manual_seed(seed),
    )
    accountant = privacy.make_accountant("prv")
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=0.01))
    attached = []

    def step(batch):
        training.backward_examples(model, batch, params, True, batch_size)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Arm(
        f"dp_{mode}",
        step,
        enter=lambda: attached.append(privacy.attach_per_sample_hooks(model, mode)),
        leave=lambda: attached.pop().remove_hooks(),
    )


def notebook_arm(model, params, batch_size: int, device, seed: int) -> Arm:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    optimizer = DPOptimizer(
        torch.optim.AdamW(params, lr=LEARNING_RATE),
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM,
        expected_batch_size=batch_size,
        loss_reduction="mean",
        generator=torch.Generator(device=device).manual_seed(seed),
    )
    accountant = privacy.make_accountant("prv")
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=0.01))
    wrapped = []

    def step(batch):
        wrapped[0](**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Arm(
        "notebook",
        step,
        enter=lambda: wrapped.append(GradSampleModule(model, batch_first=True, loss_reduction="mean")),
        leave=lambda: wrapped.pop().remove_hooks(),
    )


def pad_rows(batch: dict, length: int, pad_token_id: int = 0) -> dict:
    """Each row right-padded to `length` tokens: pad ids, attention 0, labels IGNORE_INDEX."""
    extra = length - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    pad = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {k: torch.nn.functional.pad(v, (0, extra), value=pad[k]) for k, v in batch.items()}


def hf_nonprivate_arm(model, params, pad_to: int, pad_token_id: int = 0) -> Arm:
    """The plain Hugging Face step: model(..., labels=...).loss over full logits, rows padded to max(T, pad_to)."""
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    padded = []  # (the batch given, its padded copy): padded once, outside the measured steps' first call

    def step(batch):
        if not padded or padded[0][0] is not batch:
            padded[:] = [(batch, pad_rows(batch, max(batch["input_ids"].shape[1], pad_to), pad_token_id))]
        rows = padded[0][1]
        model(
            input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], labels=rows["labels"]
        ).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Arm("hf_nonprivate", step)


def run_arm(arm: Arm, batch, measure):
    arm.enter()
    try:
        return measure(lambda: arm.step(batch))
    finally:
        arm.leave()


def bench_seq_len(model, params, b: BenchArguments, seq_len: int, vocab_size: int, device) -> dict:
    batch_size = max(1, b.tokens_per_batch // seq_len)
    batch = synthetic_batch(batch_size, seq_len, vocab_size, b.answer_fraction, b.seed + seq_len, device)
    arms = [nonprivate_arm(model, params, batch_size)]
    arms += [project_dp_arm(model, params, batch_size, mode, device, b.seed) for mode in b.grad_sample_modes]
    if not b.skip_notebook:
        arms.append(notebook_arm(model, params, batch_size, device, b.seed))
    if not b.skip_hf_nonprivate:
        arms.append(hf_nonprivate_arm(model, params, b.hf_pad_to))
    for _ in range(b.warmup_steps):
        for arm in arms:
            run_arm(arm, batch, lambda step: step())
    memory = {arm.name: run_arm(arm, batch, lambda step: step_peak_memory(step, device)) for arm in arms}
    times = {arm.name: [] for arm in arms}
    for round_ in range(b.steps):
        for k in range(len(arms)):
            arm = arms[(round_ + k) % len(arms)]
            times[arm.name].append(run_arm(arm, batch, lambda step: timed(step, device)))
    result = {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "answer_tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        "hf_padded_len": None if b.skip_hf_nonprivate else max(seq_len, b.hf_pad_to),
        "arms": {},
    }
    for arm in arms:
        result["arms"][arm.name] = {
            "median_s": statistics.median(times[arm.name]),
            "times_s": times[arm.name],
            **memory[arm.name],
        }
    result["ratios"] = ratios(result["arms"], b.grad_sample_modes)
    return result


def ratios(arms: dict, modes: list[str]) -> dict:
    """time: the median over rounds of the ratio of two arms' times in the same round (load from other
    processes changes slowly next to one round, so pairing cancels most of it); memory: ratio of peaks."""

    def paired(a: str, b: str) -> dict:
        per_round = [x / y for x, y in zip(arms[a]["times_s"], arms[b]["times_s"])]
        return {
            "time": statistics.median(per_round),
            "time_of_medians": arms[a]["median_s"] / arms[b]["median_s"],
            "memory": arms[a]["peak_bytes"] / arms[b]["peak_bytes"],
        }

    out = {}
    for mode in modes:
        out[f"dp_{mode}/nonprivate"] = paired(f"dp_{mode}", "nonprivate")
        if "notebook" in arms:
            out[f"notebook/dp_{mode}"] = paired("notebook", f"dp_{mode}")
        if "hf_nonprivate" in arms:
            out[f"dp_{mode}/hf_nonprivate"] = paired(f"dp_{mode}", "hf_nonprivate")
    return out


def epsilon_ms(repeats: int = 3) -> float:
    """Median ms of the PRV accountant's get_epsilon after 1000 steps (train_dp_lora.py calls it every step)."""
    accountant = privacy.make_accountant("prv")
    accountant.history = [(NOISE_MULTIPLIER, 0.01, 1000)]
    durations = []
    for _ in range(repeats):
        started = time.perf_counter()
        accountant.get_epsilon(1e-5)
        durations.append(1000 * (time.perf_counter() - started))
    return statistics.median(durations)


def format_table(results: list[dict]) -> str:
    lines = [f"{'T':>5} {'B':>3} {'answer tok':>10}  {'arm':<14} {'median s':>9} {'peak MiB':>9}"]
    for r in results:
        for name, arm in r["arms"].items():
            lines.append(
                f"{r['seq_len']:>5} {r['batch_size']:>3} {r['answer_tokens']:>10}  {name:<14} "
                f"{arm['median_s']:>9.3f} {arm['peak_bytes'] / 2**20:>9.1f}"
            )
    lines.append("")
    lines.append(f"{'T':>5}  {'ratio (time: median of per-round ratios)':<42} {'time':>7} {'memory':>7}")
    for r in results:
        for name, ratio in r["ratios"].items():
            lines.append(f"{r['seq_len']:>5}  {name:<42} {ratio['time']:>6.2f}x {ratio['memory']:>6.2f}x")
    return "\n".join(lines)


def main(args) -> dict:
    validate_args(args)
    m, b = args.model, args.bench
    if b.threads:
        torch.set_num_threads(b.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if m.device == "auto" else m.device
    )
    with tempfile.TemporaryDirectory(
        prefix="bench_step_model_"
    ) as directory:  # kept while the weights may be memory-mapped from it
        model, _ = build_bench_model(m, b, device, directory)
        model.train()  # as in training: LoRA dropout on
        params = [p for p in model.parameters() if p.requires_grad]
        vocab_size = model.get_input_embeddings().weight.shape[0]
        results = [bench_seq_len(model, params, b, seq_len, vocab_size, device) for seq_len in b.seq_lens]
        report = {
            "command": " ".join(["python"] + sys.argv),
            "args": cli.to_dict(args),
            "machine": machine_info(device),
            "memory_method": MEMORY_METHOD[device.type],
            "model": {
                "model": m.model,
                "vocab_size": vocab_size,
                "parameters": sum(p.numel() for p in model.parameters()),
                "trainable_parameters": sum(p.numel() for p in params),
                "dtype": str(next(model.parameters()).dtype),
            },
            "results": results,
            "epsilon_ms": epsilon_ms(),
        }
    output = Path(b.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    info = report["machine"]
    print(
        f"{m.model} (vocab {vocab_size}, {report['model']['parameters']:,} parameters, "
        f"{report['model']['trainable_parameters']:,} trainable) "
        f"on {info['device']} ({info['cpu']}, {info['cpu_count']} CPUs, {info['torch_threads']} torch threads)"
    )
    print(format_table(results))
    print(f"accountant get_epsilon (PRV, once per training step): {report['epsilon_ms']:.0f} ms")
    print(f"memory: {report['memory_method']}\nwritten: {output}")
    return report


def quiet() -> None:
    """No weight-loading progress bars or library deprecation notices between the results."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings(
        "ignore", message="Full backward hook is firing"
    )  # Opacus hooks on a layer whose input needs no grad: expected
    warnings.filterwarnings("ignore", category=FutureWarning)


if __name__ == "__main__":
    quiet()
    sys.exit(cli.run_main(main, parse_args))
