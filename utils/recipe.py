"""The training recipe: the levers a run leaves unset, chosen from N and epsilon (pure, cheap).

`--recipe auto` (the default) fills each of --logical_batch_size, --num_train_epochs, --learning_rate,
--warmup_ratio, --max_grad_norm and --lora_freeze_a that the command line leaves unset; a value given
explicitly always wins. `--recipe fixed` fills them with the first version's constants instead. N is
the number of training units (rows, or users with --privacy_unit user); it is public here as it is for
the accountant, whose sample rate q = logical batch / N the release bundle already states. The rule was
chosen on the bundled, public flashcards (bench/utility_study.py, README "Privacy-utility trade-off"):
choosing it spent no privacy. Tuning it again on private data would, and no epsilon this project prints
covers that.
"""

import math

LEVERS = (
    "logical_batch_size",
    "num_train_epochs",
    "learning_rate",
    "warmup_ratio",
    "max_grad_norm",
    "lora_freeze_a",
)
FIXED = {
    "logical_batch_size": 64,
    "num_train_epochs": 1.0,
    "learning_rate": 2e-3,
    "warmup_ratio": 0.05,
    "max_grad_norm": 1.0,
    "lora_freeze_a": False,
}
RECIPES = ("auto", "fixed")

MIN_BATCH, MAX_BATCH = 16, 1024


def power_of_two_near(x: float) -> int:
    return 2 ** round(math.log2(max(x, 1.0)))


def auto_levers(n: int, epsilon: float | None) -> dict:
    """The auto recipe at N training units and target epsilon (None: a non-private run)."""
    if epsilon is None:  # without noise small batches and many steps win
        return {
            "logical_batch_size": 16,
            "num_train_epochs": 1.0,
            "learning_rate": 2e-3,
            "warmup_ratio": 0.05,
            "max_grad_norm": 1.0,
            "lora_freeze_a": False,
        }
    # the noise-batch ratio: batch ~ 16 sqrt(N) over 8 epochs is sqrt(N) / 2 steps, each averaging the noise
    # over eight times the rows that 2 sqrt(N) over one epoch would; A frozen at its random init halves the
    # noised dimension and keeps the function class B spans; a warmup over the first 30% of the steps keeps
    # AdamW's first, noise-dominated moment estimates from taking full-size steps. Where a cap holds the batch
    # (MAX_BATCH from N of about 8,200, or N itself), 8 epochs are more steps instead: not measured here; at
    # small q the calibrated noise grows far slower than sqrt(steps) (README, "How it scales")
    batch = min(MAX_BATCH, max(MIN_BATCH, power_of_two_near(16 * math.sqrt(n))))
    return {
        "logical_batch_size": batch,
        "num_train_epochs": 8.0,
        "learning_rate": 5e-3,
        "warmup_ratio": 0.3,
        "max_grad_norm": 1.0,
        "lora_freeze_a": True,
    }


def batch_below(n: int, batch: int) -> int:
    """The largest of `batch` and smaller powers of two that keeps q = batch / N below 1 (tiny data)."""
    while batch >= n and batch > 1:
        batch //= 2
    return batch


def resolve(recipe: str, given: dict, n: int, epsilon: float | None) -> dict:
    """{lever: value} for every lever: `given` where set (not None), else the recipe's choice."""
    chosen = auto_levers(n, epsilon) if recipe == "auto" else dict(FIXED)
    if given.get("logical_batch_size") is None:
        chosen["logical_batch_size"] = batch_below(n, chosen["logical_batch_size"])
    return {lever: given[lever] if given.get(lever) is not None else chosen[lever] for lever in LEVERS}


def describe(recipe: str, given: dict, resolved: dict) -> str:
    """One line: which levers the recipe chose and which the command line set."""

    def shown(value) -> str:
        return str(value).lower() if isinstance(value, bool) else f"{value:g}"

    parts = [
        f"{lever} {shown(resolved[lever])}" + ("" if given.get(lever) is None else " (given)")
        for lever in LEVERS
    ]
    return f"recipe {recipe}: " + ", ".join(parts)


def apply(args, n: int) -> str:
    """Fill the unset levers of parsed train_dp_lora.py arguments in place; the line to print."""
    p, t = args.privacy, args.training
    owners = {
        "max_grad_norm": p,
        "logical_batch_size": t,
        "num_train_epochs": t,
        "learning_rate": t,
        "warmup_ratio": t,
        "lora_freeze_a": args.lora,
    }
    given = {lever: getattr(owner, lever) for lever, owner in owners.items()}
    resolved = resolve(t.recipe, given, n, None if p.disable_dp else p.epsilon)
    for lever, owner in owners.items():
        setattr(owner, lever, resolved[lever])
    return describe(t.recipe, given, resolved)
