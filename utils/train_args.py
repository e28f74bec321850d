"""train_dp_lora.py's arguments: the dataclass groups, parsing, and the up-front validation.

Shared by the training script and by audit_privacy.py, which validates the training arguments it is
given before it trains (in a separate process).
"""

import math
from dataclasses import dataclass, field

from utils import cli, privacy
from utils.data import HUB_DATASET
from utils.model_loading import DEFAULT_MODEL
from utils.recipe import RECIPES
from utils.training import DTYPES, OPTIMIZERS, LoraArguments

DESCRIPTION = (
    "Fine-tune a Gemma-family causal LM (VaultGemma by default) on medical flashcards with LoRA "
    "under example-level (epsilon, delta) differential privacy."
)


@dataclass
class ModelArguments:
    model: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "help": "hub id, local dir, kaggle:<handle>, a .gguf file, or 'gemma3-270m' (embedded, offline)"
        },
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "NF4 + double quantization base (bitsandbytes)"}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "compute dtype; auto = float32 on CPU, bfloat16 on GPU", "choices": list(DTYPES)},
    )


@dataclass
class DataArguments:
    dataset: str = field(
        default=HUB_DATASET,
        metadata={
            "help": "hub dataset id, a local .json/.jsonl/.csv/.parquet, or 'bundled' (shipped sample)"
        },
    )
    max_seq_length: int = field(
        default=256, metadata={"help": "longer flashcards are skipped (and counted), not truncated"}
    )
    validation_fraction: float = field(
        default=0.05, metadata={"help": "expected share of rows held out for validation loss"}
    )
    test_fraction: float = field(
        default=0.05, metadata={"help": "expected share of rows held out for evaluate_qa.py"}
    )
    train_sample_fraction: float = field(
        default=1.0,
        metadata={
            "help": "keep each training row with this probability (a keyed hash of the row: one row never "
            "moves another)"
        },
    )
    split_seed: int = field(
        default=0, metadata={"help": "key of the row -> split hash; public (written into the release bundle)"}
    )


@dataclass
class PrivacyArguments:
    epsilon: float = field(default=3.0, metadata={"help": "target epsilon for the whole run"})
    delta: float | None = field(
        default=None, metadata={"help": "target delta; default min(1e-5, 1/(10N)); must be < 1/N"}
    )
    max_grad_norm: float | None = field(
        default=None, metadata={"help": "per-example clipping norm C; unset: the recipe chooses"}
    )
    accountant: str = field(
        default="prv", metadata={"help": "privacy accountant", "choices": list(privacy.ACCOUNTANTS)}
    )
    grad_sample_mode: str = field(
        default=privacy.DEFAULT_GRAD_SAMPLE_MODE,
        metadata={
            "help": "how per-sample gradients are computed (all exact; speed: README, Benchmarks)",
            "choices": list(privacy.GRAD_SAMPLE_MODES),
        },
    )
    secure_mode: bool = field(
        default=False,
        metadata={
            "help": "sampling and noise from the OS CSPRNG (for adapters you release; slower, not reproducible)"
        },
    )
    disable_dp: bool = field(
        default=False, metadata={"help": "non-private baseline: same sampling and loss, no clipping or noise"}
    )
    privacy_unit: str = field(
        default="example",
        metadata={
            "help": "what epsilon protects: one row, or one user (every row sharing --user_column)",
            "choices": ["example", "user"],
        },
    )
    user_column: str | None = field(
        default=None,
        metadata={
            "help": "column of user ids: the split holds out whole users; needed by --privacy_unit user; "
            "with example also reports group privacy"
        },
    )
    max_examples_per_user: int = field(
        default=4,
        metadata={
            "help": "user level: at most K of a sampled user's rows per step (K <= per-device batch size)"
        },
    )
    accept_forked_resume: bool = field(
        default=False,
        metadata={
            "help": "allow resuming a secure-mode checkpoint a second time; the composed epsilon is reported"
        },
    )


@dataclass
class TrainingArguments:
    output_dir: str = field(
        default="outputs/dp_lora",
        metadata={"help": "OUT: OUT/adapter is the release bundle, OUT/private_run_record the rest"},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "replace a finished or partial run already in --output_dir"}
    )
    recipe: str = field(
        default="auto",
        metadata={
            "help": "fills the unset levers (batch, epochs, lr, warmup, clip, frozen A): auto from N and epsilon "
            "(utils/recipe.py, chosen on public data), fixed the first version's constants",
            "choices": list(RECIPES),
        },
    )
    logical_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "expected rows per optimizer step (q = this / N; expected users at user level); "
            "unset: the recipe chooses"
        },
    )
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "rows per forward/backward (memory only)"}
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata={"help": "planned steps = epochs * N / logical_batch_size; unset: the recipe chooses"},
    )
    max_steps: int = field(
        default=0, metadata={"help": "if > 0, the planned number of steps (overrides epochs)"}
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "peak learning rate; unset: the recipe chooses"}
    )
    optimizer: str = field(
        default="adamw",
        metadata={
            "help": "the update the DP gradient feeds (the privacy step is the same)",
            "choices": list(OPTIMIZERS),
        },
    )
    momentum: float | None = field(
        default=None, metadata={"help": "SGD heavy-ball momentum (--optimizer sgd only); unset: 0.9"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    warmup_ratio: float | None = field(
        default=None,
        metadata={
            "help": "share of steps with linear warmup before the cosine decay; unset: the recipe chooses"
        },
    )
    eval_steps: int = field(
        default=50, metadata={"help": "validation loss every K steps (0 = only at the end)"}
    )
    save_steps: int = field(default=100, metadata={"help": "checkpoint every K steps (0 = only at the end)"})
    epsilon_log_steps: int = field(
        default=10,
        metadata={
            "help": "exact epsilon every K steps and at the end; logged in between: epsilon at the next "
            "exact step (an upper bound)"
        },
    )
    loss_window: int = field(
        default=10, metadata={"help": "the summary's train loss is the mean over the last K steps"}
    )
    save_loss_threshold: float | None = field(
        default=None,
        metadata={
            "help": "also checkpoint when the step's training loss is below this (marked as selected on private data)"
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "a checkpoint dir, or 'latest' in --output_dir"}
    )
    seed: int = field(
        default=42,
        metadata={
            "help": "seeds sampling, noise, dropout and LoRA init (private: kept out of the release bundle)"
        },
    )
    report_to: str = field(
        default="wandb", metadata={"help": "experiment tracker", "choices": ["wandb", "tensorboard", "none"]}
    )
    project_name: str = field(default="vaultgemma-dp-lora", metadata={"help": "tracker project"})


GROUPS = {
    "model": ModelArguments,
    "lora": LoraArguments,
    "data": DataArguments,
    "privacy": PrivacyArguments,
    "training": TrainingArguments,
}


def parse_args(argv=None):
    return cli.parse_into(cli.build_parser(DESCRIPTION, GROUPS), GROUPS, argv)


def validate_args(args) -> None:
    """Raise one error listing every problem that the arguments alone show."""
    m, lora, d, p, t = args.model, args.lora, args.data, args.privacy, args.training
    problems = []
    if not p.disable_dp and not (p.epsilon > 0 and math.isfinite(p.epsilon)):
        problems.append(f"--epsilon must be a positive finite number, got {p.epsilon}")
    if p.delta is not None and not 0 < p.delta < 1:
        problems.append(f"--delta must be in (0, 1), got {p.delta}")
    if p.max_grad_norm is not None and not p.max_grad_norm > 0:
        problems.append(f"--max_grad_norm must be > 0, got {p.max_grad_norm}")
    if p.privacy_unit == "user" and not p.user_column:
        problems.append("--privacy_unit user needs --user_column (the column of user ids)")
    if p.max_examples_per_user < 1:
        problems.append(f"--max_examples_per_user must be >= 1, got {p.max_examples_per_user}")
    elif p.privacy_unit == "user" and p.max_examples_per_user > t.per_device_train_batch_size > 0:
        problems.append(
            f"--max_examples_per_user {p.max_examples_per_user} must be <= --per_device_train_batch_size "
            f"{t.per_device_train_batch_size}: a user's rows are clipped together, so they share one physical batch"
        )
    if p.secure_mode and p.disable_dp:
        problems.append("--secure_mode has no meaning with --disable_dp")
    if lora.lora_r <= 0 or lora.lora_alpha <= 0:
        problems.append("--lora_r and --lora_alpha must be > 0")
    if not 0 <= lora.lora_dropout < 1:
        problems.append(f"--lora_dropout must be in [0, 1), got {lora.lora_dropout}")
    if d.max_seq_length < 8:
        problems.append(f"--max_seq_length must be >= 8, got {d.max_seq_length}")
    if not (
        0 <= d.validation_fraction < 1
        and 0 <= d.test_fraction < 1
        and d.validation_fraction + d.test_fraction < 1
    ):
        problems.append("--validation_fraction and --test_fraction must be in [0, 1) and sum to < 1")
    if not 0 < d.train_sample_fraction <= 1:
        problems.append(f"--train_sample_fraction must be in (0, 1], got {d.train_sample_fraction}")
    if (t.logical_batch_size is not None and t.logical_batch_size <= 0) or t.per_device_train_batch_size <= 0:
        problems.append("--logical_batch_size and --per_device_train_batch_size must be > 0")
    if t.max_steps <= 0 and t.num_train_epochs is not None and not t.num_train_epochs > 0:
        problems.append("set --num_train_epochs > 0 or --max_steps > 0")
    if t.learning_rate is not None and t.learning_rate <= 0:
        problems.append(f"--learning_rate must be > 0, got {t.learning_rate}")
    if t.momentum is not None and t.optimizer != "sgd":
        problems.append(f"--momentum applies to --optimizer sgd only, not {t.optimizer}")
    elif t.momentum is not None and not 0 <= t.momentum < 1:
        problems.append(f"--momentum must be in [0, 1), got {t.momentum}")
    if t.warmup_ratio is not None and not 0 <= t.warmup_ratio < 1:
        problems.append(f"--warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.eval_steps < 0 or t.save_steps < 0:
        problems.append("--eval_steps and --save_steps must be >= 0")
    if t.epsilon_log_steps < 1 or t.loss_window < 1:
        problems.append("--epsilon_log_steps and --loss_window must be >= 1")
    if t.resume_from_checkpoint and t.overwrite_output_dir:
        problems.append(
            "--resume_from_checkpoint continues the run in --output_dir; --overwrite_output_dir would delete it"
        )
    if m.load_in_4bit and m.model.endswith(".gguf"):
        problems.append(
            "--load_in_4bit needs a safetensors model, not a .gguf file (use the embedded name gemma3-270m)"
        )
    if problems:
        raise cli.ArgumentErrors(problems)


def validate_against_data(args, n_train: int) -> None:
    """The checks that need N, the number of training units (rows, or users with --privacy_unit user)."""
    p, t = args.privacy, args.training
    units = "users" if p.privacy_unit == "user" else "rows"
    problems = []
    if n_train < 2:
        problems.append(f"only {n_train} training {units} after cleaning and splitting")
    elif t.logical_batch_size >= n_train:
        problems.append(
            f"--logical_batch_size {t.logical_batch_size} must be < N = {n_train} training {units} (q < 1)"
        )
    if (
        n_train >= 2
        and p.delta is not None
        and not p.disable_dp
        and (error := privacy.check_delta(p.delta, n_train, units))
    ):
        problems.append(error)
    if problems:
        raise cli.ArgumentErrors(problems)
