"""Fine-tune a Gemma-family causal LM (VaultGemma by default) on medical flashcards with LoRA under
example-level (epsilon, delta) differential privacy.

Privacy contract
- Privacy unit: one flashcard (one row of the cleaned training split). Exact duplicate rows are
  dropped first; validation and test rows never enter training.
- Sampling: Poisson. Every optimizer step includes each training row independently with probability
  q = logical_batch_size / N; the draw may be empty and still counts as a (noise-only) step. A drawn
  logical batch is split into physical batches only for memory. With several processes (accelerate
  launch) every rank takes the same global draw and processes a disjoint share of it, so q and
  epsilon do not depend on the number of processes (utils/distributed.py).
- Per step: each row's loss is the mean over its own answer tokens; its gradient (LoRA parameters
  only; base weights are frozen) is clipped to --max_grad_norm C; the clipped gradients are summed,
  Gaussian noise N(0, (sigma C)^2) is added once (on rank 0 only), and the result is divided by the expected batch size.
- Accounting: sigma is calibrated with the chosen accountant (PRV default, or RDP) so that epsilon
  after exactly the planned number of steps at this q is <= --epsilon at --delta (< 1/N). The
  accountant is stepped once per optimizer step and its history is kept across resume; the loop
  never takes a step that would push epsilon past the target.
- Epsilon covers the released adapters (any function of them). It does not cover the logged
  training loss or a checkpoint chosen by --save_loss_threshold (both computed from private data,
  and marked as such), nor the base model's own pre-training data. LOGGED_METRICS lists every
  tracked metric and which ones are computed from private data.

Run
    accelerate launch train_dp_lora.py --epsilon 3                                  # VaultGemma 1B, hub data
    python train_dp_lora.py --model gemma3-270m --dataset bundled --max_steps 20 \\
        --logical_batch_size 16 --per_device_train_batch_size 4 --report_to none    # offline demo
    python train_dp_lora.py --resume_from_checkpoint latest --output_dir outputs/dp_lora
    accelerate launch --config_file configs/accelerate_multi_gpu.yaml --num_processes 4 train_dp_lora.py --epsilon 3
"""

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils import checkpoint as ckpt
from utils import cli, distributed, privacy, tracking, training
from utils.training import LoraArguments, backward_examples, make_schedule
from utils.data import BUNDLED_DATASET, HUB_DATASET, DataError, is_local_source, clean_rows, collate, read_rows, split_record, split_rows, tokenize_cards
from utils.model_loading import DEFAULT_MODEL, ModelLoadError, load_tokenizer

# Every metric sent to the tracker, and what it is computed from. Epsilon covers none of the
# data-dependent ones (they are outside the released adapters); N, and so q and the default delta,
# is treated as public, as DP-SGD accounting does. The realised Poisson batch size is deliberately
# not logged: the mechanism the accountant covers releases only the noisy gradient sum.
LOGGED_METRICS = {
    "train/loss": "private: mean loss of the step's Poisson-sampled training rows",
    "train/lr": "public: the learning-rate schedule at this step",
    "privacy/epsilon": "public: the accountant's epsilon so far (function of q, sigma, steps, delta)",
    "privacy/delta": "public: the target delta",
    "eval/loss": "private: mean loss on the validation rows, which no DP guarantee covers",
}

@dataclass
class ModelArguments:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "hub id, local dir, kaggle:<handle>, a .gguf file, or 'gemma3-270m' (embedded, offline)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "NF4 + double quantization base (bitsandbytes)"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype; auto = float32 on CPU, bfloat16 on GPU", "choices": list(training.DTYPES)})


@dataclass
class DataArguments:
    dataset: str = field(default=HUB_DATASET, metadata={"help": "hub dataset id, a local .json/.jsonl/.csv/.parquet, or 'bundled' (shipped sample)"})
    max_seq_length: int = field(default=256, metadata={"help": "longer flashcards are skipped (and counted), not truncated"})
    validation_fraction: float = field(default=0.05, metadata={"help": "share of rows held out for validation loss"})
    test_fraction: float = field(default=0.05, metadata={"help": "share of rows held out for evaluate_qa.py"})
    max_train_samples: int = field(default=0, metadata={"help": "use only the first K training rows (0 = all); N is then K"})


@dataclass
class PrivacyArguments:
    epsilon: float = field(default=3.0, metadata={"help": "target epsilon for the whole run"})
    delta: float | None = field(default=None, metadata={"help": "target delta; default min(1e-5, 1/(10N)); must be < 1/N"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "per-example clipping norm C"})
    accountant: str = field(default="prv", metadata={"help": "privacy accountant", "choices": list(privacy.ACCOUNTANTS)})
    grad_sample_mode: str = field(default=privacy.DEFAULT_GRAD_SAMPLE_MODE, metadata={"help": "how per-sample gradients are computed (all exact; speed: README, Benchmarks)", "choices": list(privacy.GRAD_SAMPLE_MODES)})
    secure_mode: bool = field(default=False, metadata={"help": "cryptographically random sampling and noise (slower, not reproducible)"})
    disable_dp: bool = field(default=False, metadata={"help": "non-private baseline: same sampling and loss, no clipping or noise"})


@dataclass
class TrainingArguments:
    output_dir: str = field(default="outputs/dp_lora", metadata={"help": "where adapters, checkpoints and reports go"})
    logical_batch_size: int = field(default=64, metadata={"help": "expected rows per optimizer step (q = this / N)"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "rows per forward/backward (memory only)"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "planned steps = epochs * N / logical_batch_size"})
    max_steps: int = field(default=0, metadata={"help": "if > 0, the planned number of steps (overrides epochs)"})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of steps with linear warmup before the cosine decay"})
    eval_steps: int = field(default=50, metadata={"help": "validation loss every K steps (0 = only at the end)"})
    save_steps: int = field(default=100, metadata={"help": "checkpoint every K steps (0 = only at the end)"})
    epsilon_log_steps: int = field(default=10, metadata={"help": "exact epsilon every K steps and at the end; logged in between: epsilon at the next exact step (an upper bound)"})
    save_loss_threshold: float | None = field(default=None, metadata={"help": "also checkpoint when the step's training loss is below this (marked as selected on private data)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint dir, or 'latest' in --output_dir"})
    seed: int = field(default=42, metadata={"help": "seeds data split, sampling, noise, dropout and LoRA init"})
    report_to: str = field(default="wandb", metadata={"help": "experiment tracker", "choices": ["wandb", "tensorboard", "none"]})
    project_name: str = field(default="vaultgemma-dp-lora", metadata={"help": "tracker project"})


GROUPS = {"model": ModelArguments, "lora": LoraArguments, "data": DataArguments, "privacy": PrivacyArguments, "training": TrainingArguments}


def parse_args(argv=None):
    parser = cli.build_parser(__doc__.split("\n\n")[0], GROUPS)
    return cli.parse_into(parser, GROUPS, argv)


def validate_args(args, n_train: int | None = None) -> None:
    """Raise one error listing every problem; data-dependent checks run once N is known."""
    m, lora, d, p, t = args.model, args.lora, args.data, args.privacy, args.training
    problems = []
    if not p.disable_dp and not (p.epsilon > 0 and math.isfinite(p.epsilon)):
        problems.append(f"--epsilon must be a positive finite number, got {p.epsilon}")
    if p.delta is not None and not 0 < p.delta < 1:
        problems.append(f"--delta must be in (0, 1), got {p.delta}")
    if not p.max_grad_norm > 0:
        problems.append(f"--max_grad_norm must be > 0, got {p.max_grad_norm}")
    if p.secure_mode and p.disable_dp:
        problems.append("--secure_mode has no meaning with --disable_dp")
    if lora.lora_r <= 0 or lora.lora_alpha <= 0:
        problems.append("--lora_r and --lora_alpha must be > 0")
    if not 0 <= lora.lora_dropout < 1:
        problems.append(f"--lora_dropout must be in [0, 1), got {lora.lora_dropout}")
    if d.max_seq_length < 8:
        problems.append(f"--max_seq_length must be >= 8, got {d.max_seq_length}")
    if not (0 <= d.validation_fraction < 1 and 0 <= d.test_fraction < 1 and d.validation_fraction + d.test_fraction < 1):
        problems.append("--validation_fraction and --test_fraction must be in [0, 1) and sum to < 1")
    if t.logical_batch_size <= 0 or t.per_device_train_batch_size <= 0:
        problems.append("--logical_batch_size and --per_device_train_batch_size must be > 0")
    if t.max_steps <= 0 and not t.num_train_epochs > 0:
        problems.append("set --num_train_epochs > 0 or --max_steps > 0")
    if t.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0, got {t.learning_rate}")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"--warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.eval_steps < 0 or t.save_steps < 0:
        problems.append("--eval_steps and --save_steps must be >= 0")
    if t.epsilon_log_steps < 1:
        problems.append(f"--epsilon_log_steps must be >= 1, got {t.epsilon_log_steps}")
    if m.load_in_4bit and m.model.endswith(".gguf"):
        problems.append("--load_in_4bit needs a safetensors model, not a .gguf file (use the embedded name gemma3-270m)")
    if n_train is not None:
        if n_train < 2:
            problems.append(f"only {n_train} training rows after cleaning and splitting")
        elif t.logical_batch_size >= n_train:
            problems.append(f"--logical_batch_size {t.logical_batch_size} must be < N = {n_train} training rows (q < 1)")
        if n_train >= 2 and p.delta is not None and not p.disable_dp and (error := privacy.check_delta(p.delta, n_train)):
            problems.append(error)
    if problems:
        raise cli.ArgumentErrors(problems)


def prepare_data(args, tokenizer):
    """Read, clean, split and tokenize; returns (train examples, validation examples, split record, stats)."""
    d, t = args.data, args.training
    cards, stats = clean_rows(read_rows(d.dataset))
    split = split_rows(len(cards), d.validation_fraction, d.test_fraction, t.seed)
    if d.max_train_samples > 0:
        split["train"] = split["train"][: d.max_train_samples]
    source = os.path.abspath(d.dataset) if d.dataset != BUNDLED_DATASET and is_local_source(d.dataset) else d.dataset
    record = split_record(source, cards, split, t.seed, stats)  # an absolute path, so evaluation finds it from anywhere
    train, too_long_train = tokenize_cards(tokenizer, [cards[i] for i in split["train"]], d.max_seq_length)
    validation, too_long_val = tokenize_cards(tokenizer, [cards[i] for i in split["validation"]], d.max_seq_length)
    stats = dict(stats, skipped_too_long=too_long_train + too_long_val, n_train=len(train), n_validation=len(validation), n_test=len(split["test"]))
    return train, validation, record, stats


def build_model(args, tokenizer, device, mixed_precision="no"):
    """The LoRA model the arguments describe (utils/training.py)."""
    dtype = training.compute_dtype(args.model.dtype, mixed_precision, device)
    return training.build_lora_model(args.model.model, args.lora, tokenizer, device, dtype=dtype, load_in_4bit=args.model.load_in_4bit)


def evaluate_loss(model, examples, batch_size, pad_id, device, rank=0, world_size=1) -> float:
    """Mean per-example answer loss over held-out examples (with several processes each evaluates a share)."""
    losses = training.answer_nll(model, distributed.shard(examples, rank, world_size), batch_size, pad_id)
    mean = sum(losses) / len(losses) if losses else float("nan")
    return mean if world_size == 1 else distributed.mean_across_ranks(mean, len(losses), device)


def privacy_state(plan, accountant, steps_taken) -> dict:
    """What resume must match and restore: the sampling and noise parameters and the accountant."""
    return dict(plan, steps_taken=steps_taken, accountant_history=[list(h) for h in accountant.history] if accountant else [])


def privacy_report(plan, accountant, steps_taken, counters, selected=None) -> dict:
    spent = accountant.get_epsilon(plan["delta"]) if accountant and accountant.history else (0.0 if plan["dp_enabled"] else float("inf"))
    report = dict(plan, epsilon=spent, steps=steps_taken, **counters)
    if plan["dp_enabled"]:  # the exact mechanism accounted for, so any accountant can recompute epsilon
        report["dp_event"] = privacy.dp_event(accountant.history if accountant else [])
    if plan["dp_enabled"] and steps_taken:
        report["epsilon_rdp"] = privacy.epsilon_after(steps_taken, plan["noise_multiplier"], plan["sample_rate"], plan["delta"], "rdp")
    report["selected_on_private_data"] = selected is not None
    if selected is not None:
        report["selection"] = selected
    return report


def save_checkpoint(path, model, tokenizer, optimizer, scheduler, noise_generator, step, state, report, resolved, rng_per_rank=None):
    def write(tmp):
        ckpt.save_adapter(model, tokenizer, tmp / "adapter")
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": ckpt.rng_state(noise_generator), **({"rng_per_rank": rng_per_rank} if rng_per_rank else {})},
                   tmp / "training_state.pt")
        ckpt.write_json(tmp / "privacy_state.json", state)
        ckpt.write_json(tmp / "privacy_report.json", report)
        ckpt.write_json(tmp / "args.json", resolved)

    return ckpt.atomic_directory(path, write)


def resume(path, model, optimizer, scheduler, noise_generator, plan, accountant, rank=0, world_size=1) -> int:
    """Restore a checkpoint after checking it was made with the same privacy parameters; returns its step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = ckpt.read_json(Path(path) / "privacy_state.json")
    keys = ("dp_enabled", "sample_rate", "noise_multiplier", "max_grad_norm", "delta", "n_train", "expected_batch_size", "accountant", "dataset_fingerprint", "seed", "planned_steps")
    mismatched = [f"{k}: checkpoint {saved.get(k)!r} vs now {plan[k]!r}" for k in keys if saved.get(k) != plan[k]]
    if mismatched:
        raise cli.ArgumentErrors([f"cannot resume from {path}: privacy parameters differ ({'; '.join(mismatched)})"])
    set_peft_model_state_dict(model, load_file(str(Path(path) / "adapter" / "adapter_model.safetensors")))
    state = torch.load(Path(path) / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ckpt.restore_rng_state(distributed.rng_state_for_rank(state, rank, world_size), noise_generator)
    if accountant is not None:
        accountant.history = [tuple(h) for h in saved["accountant_history"]]
    return state["step"]


def gather_run_state(noise_generator, counters, world_size, device):
    """(every rank's RNG state or None, counters summed over ranks) for a checkpoint or the report; collective."""
    if world_size == 1:
        return None, counters
    nonfinite, = distributed.sum_across_ranks([counters["nonfinite_examples"]], device)  # per rank; the rest are global
    return distributed.gather_rng_states(ckpt.rng_state(noise_generator)), dict(counters, nonfinite_examples=int(nonfinite))


def main(args):
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    validate_args(args)
    m, d, p, t = args.model, args.data, args.privacy, args.training
    if t.report_to == "wandb":
        wandb_mode = tracking.prepare_wandb_environment()
    accelerator = Accelerator(log_with=tracking.tracker_names(t.report_to) or None, project_dir=t.output_dir,
                              cpu=distributed.needs_cpu_backend())
    distributed.check_launch(accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index  # utils/distributed.py: how W processes share a step
    if accelerator.is_main_process:  # only rank 0 writes
        os.makedirs(t.output_dir, exist_ok=True)
    set_seed(t.seed, device_specific=True)  # rank r: seed + r (dropout); LoRA init comes from rank 0
    device = accelerator.device
    say = print if accelerator.is_main_process else (lambda *a, **k: None)  # global rank 0 only, also across nodes

    tokenizer = load_tokenizer(m.model)
    train, validation, split_info, data_stats = prepare_data(args, tokenizer)
    n_train = len(train)
    validate_args(args, n_train)
    q = t.logical_batch_size / n_train
    steps = privacy.planned_steps(n_train, t.logical_batch_size, t.num_train_epochs, t.max_steps)
    delta = p.delta if p.delta is not None else privacy.default_delta(n_train)
    dp = not p.disable_dp
    sigma = privacy.calibrate_noise(p.epsilon, delta, q, steps, p.accountant) if dp else 0.0
    budget = privacy.step_budget(p.epsilon, delta, sigma, q, p.accountant, steps) if dp else steps
    plan = {"privacy_unit": "one flashcard (training row)", "sampling": "poisson", "dp_enabled": dp,
            "target_epsilon": p.epsilon if dp else None, "delta": delta, "noise_multiplier": sigma, "sample_rate": q,
            "max_grad_norm": p.max_grad_norm if dp else None, "expected_batch_size": t.logical_batch_size,
            "planned_steps": steps, "accountant": p.accountant, "n_train": n_train, "secure_mode": p.secure_mode,
            "dataset": d.dataset, "dataset_fingerprint": split_info["dataset_fingerprint"], "seed": t.seed,
            "world_size": world, "draw_split": distributed.DRAW_SPLIT}
    if world > 1:  # e.g. nodes reading different copies of the data would draw different rows
        distributed.check_same_on_all_ranks("the privacy plan", plan, device)

    model = build_model(args, tokenizer, device, accelerator.mixed_precision)
    params = [q_ for q_ in model.parameters() if q_.requires_grad]
    if world > 1:
        distributed.broadcast_trainable_parameters(params)
    n_trainable, n_total = sum(x.numel() for x in params), sum(x.numel() for x in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = make_schedule(optimizer, steps, t.warmup_ratio)
    noise_generator, accountant = None, None
    if dp:
        privacy.attach_per_sample_hooks(model, p.grad_sample_mode)
        if not p.secure_mode:
            noise_generator = torch.Generator(device=device).manual_seed(t.seed + 1)
        # with several processes: noise once, on rank 0; the all-reduced gradient is divided by the logical batch once
        optimizer = privacy.make_dp_optimizer(optimizer, sigma, p.max_grad_norm, t.logical_batch_size, noise_generator, p.secure_mode, world)
        accountant = privacy.make_accountant(p.accountant)
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
        logged_epsilon = privacy.LoggedEpsilon(accountant, p.accountant, delta, t.epsilon_log_steps, min(steps, budget))
    start_step = 0
    if t.resume_from_checkpoint:
        resume_path = ckpt.find_checkpoint(t.output_dir, t.resume_from_checkpoint)
        start_step = resume(resume_path, model, optimizer, scheduler, noise_generator, plan, accountant, rank, world)
        say(f"Resumed from {resume_path} at step {start_step}")

    resolved = cli.to_dict(args)
    if accelerator.is_main_process:
        ckpt.write_json(Path(t.output_dir) / "args.json", resolved)
        ckpt.write_json(Path(t.output_dir) / "split.json", split_info)
    accelerator.init_trackers(t.project_name, config=tracking.flatten_config(resolved), init_kwargs=tracking.tracker_init_kwargs(t.report_to, t.output_dir))
    say(
        f"***** Running {'DP' if dp else 'NON-PRIVATE'} LoRA training *****\n"
        f"  model {m.model} on {device}" + (f" and {world - 1} more processes" if world > 1 else "") + f"; trainable {n_trainable:,} of {n_total:,} parameters ({100 * n_trainable / n_total:.3f}%)\n"
        f"  N (training rows) = {n_train}; validation {len(validation)}; test {data_stats['n_test']}\n"
        f"  skipped rows: {data_stats['skipped_empty']} empty, {data_stats['duplicates_dropped']} duplicates, {data_stats['skipped_too_long']} too long\n"
        f"  logical batch (expected) = {t.logical_batch_size}, physical batch = {t.per_device_train_batch_size}, sample rate q = {q:.5f}\n"
        f"  steps = {steps} (from step {start_step})" + (f", step budget = {budget}\n" if dp else "\n")
        + (f"  target (epsilon, delta) = ({p.epsilon}, {delta:.3g}); noise multiplier = {sigma:.4f}; clip norm = {p.max_grad_norm}; accountant = {p.accountant}"
           if dp else "  NO privacy guarantee: --disable_dp")
    )
    if t.report_to == "wandb":
        say(f"  W&B: {wandb_mode}" + (f", run stored in {tracking.wandb_run_dir(accelerator)}; sync it later with `wandb sync <that dir>`" if wandb_mode == "offline" else ""))

    sampler = privacy.PoissonSampler(n_train, q, t.seed, secure_mode=p.secure_mode)
    lengths = [len(e["input_ids"]) for e in train]
    counters = {"empty_steps": 0, "nonfinite_examples": 0, "stopped_by_budget": False}
    step, train_loss, started = start_step, float("nan"), time.time()
    examples = {"drawn": 0, "processed": 0}  # over the whole run, all ranks
    model.train()
    progress = tqdm(range(start_step, steps), disable=not accelerator.is_main_process, desc="train")
    for step in range(start_step, steps):
        if step >= budget:
            counters["stopped_by_budget"] = True
            say(f"Stopping before step {step + 1}: it would take epsilon past the target {p.epsilon}")
            break
        drawn = distributed.global_draw(sampler, step, device, world)
        batches = privacy.physical_batches(distributed.split_draw(drawn, lengths, rank, world), lengths, t.per_device_train_batch_size)
        losses = []
        for i, rows in enumerate(batches):
            batch = {k: v.to(device) for k, v in collate([train[r] for r in rows], tokenizer.pad_token_id).items()}
            example_losses, nonfinite = backward_examples(model, batch, params, dp, t.logical_batch_size)
            losses.append(example_losses)
            counters["nonfinite_examples"] += nonfinite
            if dp and i < len(batches) - 1:  # clip and accumulate this physical batch; noise once per logical batch
                optimizer.signal_skip_step(do_skip=True)
                optimizer.step()
                optimizer.zero_grad()
        if not batches:  # an empty draw, or an empty share of it: this rank still steps and joins the all-reduce
            counters["empty_steps"] += int(not drawn)
            privacy.prepare_empty_step(params, dp)
        if world > 1 and not dp:
            distributed.sum_gradients(params)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_losses = torch.cat(losses) if losses else torch.empty(0)
        if world == 1:
            train_loss = step_losses[torch.isfinite(step_losses)].mean().item() if len(step_losses) else float("nan")
            n_processed = len(step_losses)
        else:  # the whole step's loss, and a check that the ranks processed exactly the draw
            train_loss, n_processed = distributed.step_totals(step_losses, len(drawn), device)
        examples["drawn"] += len(drawn)
        examples["processed"] += n_processed
        epsilon = logged_epsilon.after(step + 1) if dp else float("inf")
        metrics = {"train/loss": train_loss, "train/lr": scheduler.get_last_lr()[0],
                   "privacy/epsilon": epsilon, "privacy/delta": delta}
        if t.eval_steps and (step + 1) % t.eval_steps == 0 and validation:
            metrics["eval/loss"] = evaluate_loss(model, validation, t.per_device_train_batch_size, tokenizer.pad_token_id, device, rank, world)
        accelerator.log(metrics, step=step + 1)
        progress.update(1)
        progress.set_postfix(loss=f"{train_loss:.3f}", eps=f"{epsilon:.3f}" if dp else "inf")
        selected = t.save_loss_threshold is not None and math.isfinite(train_loss) and train_loss < t.save_loss_threshold
        if (t.save_steps and (step + 1) % t.save_steps == 0) or selected:  # the same decision on every rank (global loss)
            rng_per_rank, run_counters = gather_run_state(noise_generator, counters, world, device)
            selection = {"rule": f"training loss {train_loss:.4f} < --save_loss_threshold {t.save_loss_threshold}", "step": step + 1} if selected else None
            if accelerator.is_main_process:
                save_checkpoint(Path(t.output_dir) / ckpt.CHECKPOINT_DIR / ckpt.step_dir_name(step + 1), model, tokenizer, optimizer, scheduler, noise_generator,
                                step + 1, privacy_state(plan, accountant, step + 1), privacy_report(plan, accountant, step + 1, run_counters, selection), resolved, rng_per_rank)
    else:
        step = steps
    progress.close()
    steps_taken = step if counters["stopped_by_budget"] else steps

    eval_loss = evaluate_loss(model, validation, t.per_device_train_batch_size, tokenizer.pad_token_id, device, rank, world) if validation else float("nan")
    rng_per_rank, counters = gather_run_state(noise_generator, counters, world, device)
    distributed.assert_not_wrapped(model)
    parallel = dict(world_size=world, draw_split=distributed.DRAW_SPLIT, model_class=type(model).__name__,
                    examples_drawn=examples["drawn"], examples_processed=examples["processed"])
    if world > 1:
        parallel["replicas_identical"] = distributed.replicas_identical(params)
        if not parallel["replicas_identical"]:
            say("WARNING: ranks ended with different LoRA weights; the saved adapters are rank 0's")
    report = privacy_report(plan, accountant, steps_taken, counters)
    results = {"train/loss": train_loss, "eval/loss": eval_loss, "privacy/epsilon": report["epsilon"], "privacy/delta": delta,
               "steps": steps_taken, "train_seconds": time.time() - started, "trainable_parameters": n_trainable, "data": data_stats,
               "distributed": parallel}
    accelerator.log({"eval/loss": eval_loss}, step=steps_taken)
    if accelerator.is_main_process:
        out = Path(t.output_dir)
        save_checkpoint(out / ckpt.CHECKPOINT_DIR / ckpt.step_dir_name(steps_taken), model, tokenizer, optimizer, scheduler,
                        noise_generator, steps_taken, privacy_state(plan, accountant, steps_taken), report, resolved, rng_per_rank)
        ckpt.atomic_directory(out / "adapter", lambda tmp: ckpt.save_adapter(model, tokenizer, tmp))
        ckpt.write_json(out / "privacy_report.json", report)
        ckpt.write_json(out / "all_results.json", results)
    accelerator.wait_for_everyone()  # every rank returns only once the outputs exist
    run_dir = tracking.wandb_run_dir(accelerator) if t.report_to == "wandb" else None
    accelerator.end_training()
    say(
        f"Done: {steps_taken} steps, train loss {train_loss:.4f}, eval loss {eval_loss:.4f}; "
        + (f"epsilon = {report['epsilon']:.4f} (target {p.epsilon}), delta = {delta:.3g}" if dp else "no privacy guarantee (--disable_dp)")
        + f"\n  adapters: {Path(t.output_dir) / 'adapter'}; report: {Path(t.output_dir) / 'privacy_report.json'}"
        + (f"\n  W&B offline run: {run_dir}; upload with `wandb sync {run_dir}`" if run_dir and os.environ.get("WANDB_MODE") == "offline" else "")
        + (f"\n  {counters['empty_steps']} empty Poisson draws (noise-only steps), {counters['nonfinite_examples']} examples with a NaN/inf loss or gradient left out"
           if counters["empty_steps"] or counters["nonfinite_examples"] else "")
    )
    return results


def cli_main(argv=None) -> int:
    return cli.run_main(main, parse_args, argv, (cli.ArgumentErrors, DataError, ModelLoadError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(cli_main())
