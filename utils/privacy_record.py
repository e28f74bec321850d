"""The one typed record of a run's privacy facts, and the one way epsilon is printed.

PrivacyRecord holds only public parameters of the mechanism and what the accountant made of them:
it is what the release bundle's privacy_report.json says, what every checkpoint carries, and what
resume checks. Everything derived from the private data (split membership, fingerprints, losses,
counts) lives in the private run record instead (utils/run_dir.py).

Neighbouring relation: add or remove one row of the dataset file passed to --dataset. The split and
the optional training subsample assign each row from a keyed hash of its own content (utils/data.py),
so such a change alters the training set by at most that row. q = L / N, the default delta and so
sigma are functions of N, which the report states: N itself is released exactly and is outside
epsilon under add/remove; a reader who treats N as public uses the replace-one epsilon, also given.

format_epsilon rounds UP, and guarantee_line adds the threat model: with seeded randomness the
guarantee holds only against someone who does not know the seed.
"""

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field

RELATION = "add or remove one row of the dataset file passed to --dataset"
EXAMPLE_UNIT = "example: one row (flashcard) of the training split"
USER_FIELDS = ("user_column", "n_users", "max_examples_per_user")


def user_unit(column: str) -> str:
    return f"one user: every row sharing `{column}`"


def user_relation(column: str) -> str:
    return f"add or remove one user (all rows sharing `{column}`) of the dataset file passed to --dataset"


USER_NOT_COVERED = (
    "the exact training-user count N and row count, released through q, n_users and n_train (covered instead "
    "by epsilon_replace_one, under which N is public)"
)
SEEDED_CAVEAT = "seeded: holds only against someone who does not know the seed"
SECURE_NOTE = "secure randomness (OS CSPRNG)"
NOT_COVERED = (
    "the exact training-row count N, released through q and n_train (covered instead by epsilon_replace_one, "
    "under which N is public)",
    "the base model's own pre-training data",
    "everything in the private run record: split membership, dataset fingerprints, losses, skipped/duplicate/"
    "too-long/non-finite/empty-draw counts, checkpoints, tracker logs and the noise seed",
    "any choice of hyperparameters or checkpoint made by looking at the private data",
)


def format_epsilon(value: float | None, decimals: int = 2) -> str:
    """epsilon rounded UP to `decimals` places: a printed bound stays a bound (2.99392 -> 3.00)."""
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return "?"
    if math.isinf(value):
        return "inf"
    text = f"{value:.{decimals}f}"
    if float(text) < value:  # nearest rounding went down: one unit of the last place up
        text = f"{float(text) + 10.0**-decimals:.{decimals}f}"
    return text


def format_delta(value: float | None) -> str:
    """delta rounded UP to 3 significant digits."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return "?"
    text = f"{value:.3g}"
    if float(text) < value:
        text = f"{float(text) + 10.0 ** (math.floor(math.log10(value)) - 2):.3g}"
    return text


@dataclass
class PrivacyRecord:
    dp_enabled: bool
    target_epsilon: float | None
    delta: float | None
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float | None
    expected_batch_size: int
    planned_steps: int
    accountant: str
    n_train: int
    secure_mode: bool
    world_size: int = 1
    draw_split: str | None = None  # how W processes share one global draw (utils/distributed.py DRAW_SPLIT)
    split: dict | None = None  # the public SplitSpec: evaluation recomputes the held-out rows from it
    unit: str = EXAMPLE_UNIT
    neighbouring_relation: str = RELATION
    # user-level DP only (absent from an example-level report): N and q are then of users
    user_column: str | None = None
    n_users: int | None = None
    max_examples_per_user: int | None = None
    sampling: str = "poisson"
    steps_taken: int = 0
    accountant_history: list = field(default_factory=list)  # Opacus's [(sigma, q, steps), ...]
    epsilon: float | None = None  # the accountant's, at delta, after steps_taken
    epsilon_rdp: float | None = None
    epsilon_replace_one: float | None = None  # dp_accounting PLD, same mechanism, replace-one neighbours
    selected_on_private_data: bool = False
    selection: str | None = None
    lineage: list = field(
        default_factory=list
    )  # one entry per resume: {"resumed_at_step": k, "secure_mode": b}
    forks: int = 0  # secure-mode resumes of a checkpoint that had been resumed before (accepted explicitly)
    epsilon_with_forks: float | None = None  # epsilon of this branch composed with the forked ones

    # --- what resume must match ------------------------------------------------
    MECHANISM_KEYS = (
        "dp_enabled",
        "target_epsilon",
        "delta",
        "noise_multiplier",
        "sample_rate",
        "max_grad_norm",
        "expected_batch_size",
        "planned_steps",
        "accountant",
        "n_train",
        "secure_mode",
        "unit",
        "user_column",
        "n_users",
        "max_examples_per_user",
    )

    def compatible_with(self, other: "PrivacyRecord") -> list[str]:
        """One line per mechanism parameter that differs (resume refuses any)."""
        return [
            f"{key}: checkpoint {getattr(other, key)!r} vs now {getattr(self, key)!r}"
            for key in self.MECHANISM_KEYS
            if getattr(self, key) != getattr(other, key)
        ]

    # --- threat model and printing ---------------------------------------------
    @property
    def threat_model(self) -> str:
        return SECURE_NOTE if self.secure_mode else SEEDED_CAVEAT

    def guarantee_line(self) -> str:
        """One line: the guarantee, rounded up, with its relation and threat model."""
        if not self.dp_enabled:
            return "NO privacy guarantee (trained with --disable_dp)"
        text = (
            f"DP-trained: epsilon <= {format_epsilon(self.epsilon)}, delta = {format_delta(self.delta)} "
            f"(add/remove {self._one()}; {self.accountant} accountant; {self.threat_model})"
        )
        if self.forks:
            composed = format_epsilon(self.epsilon_with_forks)
            text += f"; composed with {self.forks} forked resume(s): epsilon <= {composed}"
        if self.selected_on_private_data:
            text += f"; WARNING: checkpoint selected on private data ({self.selection}), which epsilon does not cover"
        return text

    def _one(self) -> str:
        return f"one user, all rows sharing `{self.user_column}`" if self.user_column else "one row"

    # --- serialisation -----------------------------------------------------------
    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if self.user_column is None:  # an example-level report keeps exactly its earlier fields
            for key in USER_FIELDS:
                del data[key]
        data["accountant_history"] = [list(h) for h in self.accountant_history]
        data["threat_model"] = self.threat_model
        data["guarantee"] = self.guarantee_line()
        data["not_covered"] = self.not_covered()
        if self.dp_enabled:
            data["dp_event"] = dp_event(self.accountant_history)
        else:  # a non-private run makes no (epsilon, delta) claim at all
            for key in (
                "target_epsilon",
                "delta",
                "epsilon",
                "epsilon_rdp",
                "epsilon_replace_one",
                "max_grad_norm",
            ):
                data[key] = None
        return _json_safe(data)

    def not_covered(self) -> list[str]:
        return [USER_NOT_COVERED, *NOT_COVERED[1:]] if self.user_column else list(NOT_COVERED)

    @classmethod
    def from_json(cls, data: dict) -> "PrivacyRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        record = cls(**{k: v for k, v in data.items() if k in names})
        record.accountant_history = [tuple(h) for h in record.accountant_history]
        return record

    def write(self, path) -> None:
        from utils.run_dir import write_json_atomic

        write_json_atomic(path, self.to_json())

    @classmethod
    def read(cls, path) -> "PrivacyRecord":
        with open(path, encoding="utf-8") as handle:
            return cls.from_json(json.load(handle))


def dp_event(history) -> dict:
    """The mechanism the accountant was told about, as JSON in the names of Google's dp_accounting:
    ComposedDpEvent of SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)."""
    return {
        "event": "ComposedDpEvent",
        "neighboring_relation": "add_or_remove_one",
        "events": [
            {
                "event": "SelfComposedDpEvent",
                "count": int(steps),
                "inner": {
                    "event": "PoissonSampledDpEvent",
                    "sampling_probability": float(sample_rate),
                    "inner": {"event": "GaussianDpEvent", "noise_multiplier": float(sigma)},
                },
            }
            for sigma, sample_rate, steps in history
        ],
    }


def replace_one_epsilon(history, delta: float) -> float:
    """dp_accounting's PLD epsilon of the same mechanism for replace-one neighbours (N fixed and public)."""
    return _replace_one_epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta))


@functools.lru_cache(maxsize=256)  # a pure function of the history's numbers
def _replace_one_epsilon(history: tuple, delta: float) -> float:
    import dp_accounting
    from dp_accounting import dp_event as events
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for sigma, sample_rate, steps in history:
        accountant.compose(
            events.SelfComposedDpEvent(
                events.PoissonSampledDpEvent(sample_rate, events.GaussianDpEvent(sigma)), int(steps)
            )
        )
    return float(accountant.get_epsilon(delta))


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
