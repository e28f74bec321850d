"""The utility study: a declared grid over the DP levers, on the bundled (public) flashcards; resumable.

Contract
- Data: the bundled cards with one fixed split for every run (--test_fraction 0.1, --validation_fraction
  0.05, --split_seed 0) and one training subset (--train_sample_fraction, a keyed hash: the same rows
  for every run). Model: the embedded Gemma 3 270M in fp32. Public data only: choosing a recipe here
  spends no privacy of anyone's private data.
- Stage `sweep` (GRID below): each configuration trains once (seed 0), at epsilon 8 for the private
  ones; selection is by the validation split's answer NLL (teacher forcing), never by the test split.
- Stage `finals`: `--recipe auto` and the earlier auto recipes (FINAL_RECIPES) at epsilon 3 and 8, the
  sweep's best private configuration and the FINALISTS at its epsilon, the sweep's best private
  configuration again at the other final epsilons (named `{name}_eps{epsilon}`), and its best non-private
  configuration (lowest validation NLL), each with seeds 0, 1, 2; and the base model once. The test
  split's answer NLL is the reported metric; retention = (base NLL - NLL) / (base NLL - best non-private NLL), per seed.
- Stage `data` (the data lever): `--recipe auto` and the fourth auto recipe (DATA_RECIPES) at each final
  epsilon and the best non-private configuration on DATA_FRACTION of the training split (about 3x the
  rows), seeds 0, 1, 2 each, on the finals' test cards; retention is against the base and this stage's own
  non-private run (the same N).
- Stage `users` (user-level DP, issue #13), measured the same way on --user_dataset (the same cards, in
  students): `--privacy_unit user` with `--recipe auto` and the earlier auto recipes (USER_RECIPES) at
  epsilon 3 and 8, and the best non-private configuration (example unit), seeds 0, 1, 2, and the base
  model, all with --user_column: the split hashes the student id (USER_SPLIT: 240 test cards of 29
  students held out), and --train_sample_fraction keeps students. Its retention is against its own base
  and non-private reference on its own test split.
- Validation NLL: the training run's final evaluation. Test NLL (all but the sweep): evaluate_qa.py
  --nll_only. A finished run appends one JSON line to --results (name, seed, stage, flags, epsilon,
  steps, N, validation and test NLL, CPU seconds); a rerun skips every (stage, name, seed) already
  there, so the study can be stopped and continued at any point. A configuration whose flags (with the
  recipe's levers resolved at N) equal a finished run's in --runs_dir scores that run instead of training
  again: the finals reuse the sweep's seed-0 runs. --configs runs only the named configurations.
- CPU budget: the study starts no run once the CPU time of this invocation's runs passes
  --cpu_budget_minutes (a run in flight finishes), nor scores the base model. --jobs runs that many at
  once, --threads_per_job threads each (1 by default; a line records the most threads its processes ran
  with when more than 1: CPU seconds at 2 threads are not those at 1; each segment records its own).
- Stopping: --stop_after_minutes (wall clock), SIGTERM or Ctrl-C stop the runs in flight and start no
  other. Every run checkpoints after each step, so a stopped run, or one killed with the study, keeps its
  last step's checkpoint, and the next invocation continues it from there when its flags are unchanged (a
  seeded resume: the same adapters as an uninterrupted run). Its line counts the CPU of every segment,
  steps redone after the stop included ({run}.segments.json beside the run); a segment killed from
  outside with the study has no CPU figure, and the line counts such segments in segments_cpu_unknown.
- Report: --table (markdown) and --plot (PNG: test NLL against epsilon, mean and seed spread),
  rewritten from the results file after every run, and by --report_only.

Run
    python bench/utility_study.py --stage sweep --jobs 2         # then:
    python bench/utility_study.py --stage finals --jobs 2
    python bench/utility_study.py --stage data --jobs 2
    python bench/utility_study.py --stage users --jobs 2
    python bench/utility_study.py --report_only
    python bench/utility_study.py --stage data --configs data0.5_recipe_eps3 --stop_after_minutes 100
                                                  # a run longer than a sitting: the same command continues it
"""

import dataclasses
import functools
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/utility_study.py` from anywhere
    sys.path.insert(0, str(REPO))

from utils import cli  # noqa: E402
from utils.run_dir import CHECKPOINT_RECORD, RunDir, read_json, write_json_atomic  # noqa: E402

SPLIT = {"test_fraction": 0.1, "validation_fraction": 0.05, "split_seed": 0}
COMMON = {
    "max_seq_length": 320,  # the longest bundled card (295 tokens) fits: none skipped
    "per_device_train_batch_size": 16,
    "eval_steps": 0,
    "report_to": "none",
}  # and --save_steps CHECKPOINT_EVERY (see train), which changes nothing that is trained
# test 0.12 of the 294 students holds out 240 cards (29 students); 0.10 would hold out 164
USER_SPLIT = {"test_fraction": 0.12, "validation_fraction": 0.05, "split_seed": 0}
USER_COLUMN = "student_id"
SWEEP_EPSILON = 8.0
FINAL_EPSILONS = (3.0, 8.0)
FINAL_SEEDS = (0, 1, 2)
# The earlier auto recipes, as explicit flags at the finals' N = 278 rows (and the users stage's N = 43
# students, the data stage's 913 rows), measured beside today's: the first (batch 2 sqrt(N), one epoch,
# lr 5e-3, C = 1, A trained), the second (batch 4 sqrt(N) over 2 epochs, A frozen), both warmed up over 5% of
# the steps, the third (the second warmed up over 30%) and the fourth (batch 8 sqrt(N) over 4 epochs)
B32 = {"logical_batch_size": 32, "learning_rate": 5e-3, "max_grad_norm": 1.0, "warmup_ratio": 0.05}
FIRST_RECIPE = B32 | {"num_train_epochs": 1, "lora_freeze_a": False}
B64_2EP = B32 | {"logical_batch_size": 64, "num_train_epochs": 2}  # twice the batch over twice the epochs
SECOND_RECIPE = B64_2EP | {"lora_freeze_a": True}
THIRD_RECIPE = SECOND_RECIPE | {"warmup_ratio": 0.3}
B128_4EP = B64_2EP | {"logical_batch_size": 128, "num_train_epochs": 4}  # twice again: the same 9 steps
B256_8EP = B128_4EP | {"logical_batch_size": 256, "num_train_epochs": 8}  # the last doubling N = 278 allows
FOURTH_RECIPE = B128_4EP | {"lora_freeze_a": True, "warmup_ratio": 0.3}
FIRST_USER_RECIPE = dict(FIRST_RECIPE, logical_batch_size=16)
FOURTH_USER_RECIPE = dict(FOURTH_RECIPE, logical_batch_size=32)  # 8 sqrt(43) rounds to 64, kept below N = 43
FINAL_RECIPES = (
    ("recipe", {"recipe": "auto"}),
    ("fourth_recipe", FOURTH_RECIPE),
    ("third_recipe", THIRD_RECIPE),
    ("second_recipe", SECOND_RECIPE),
    ("first_recipe", FIRST_RECIPE),
)
USER_RECIPES = (
    ("recipe", {"recipe": "auto"}),
    ("fourth_recipe", FOURTH_USER_RECIPE),
    ("first_recipe", FIRST_USER_RECIPE),
)
# private sweep configurations the finals measure besides the sweep's best: the best of an earlier sweep
FINALISTS = ("dp_b32_lr5e-3_freeze_a",)
# stage data: the same test and validation cards, a larger share of the training split (913 rows)
DATA_FRACTION = 0.5
DATA_RECIPES = (
    ("recipe", {"recipe": "auto"}),
    ("fourth_recipe", dict(FOURTH_RECIPE, logical_batch_size=256)),  # 8 sqrt(913) = 242 rounds to 256
)


@dataclass(frozen=True)
class Config:
    name: str
    flags: dict  # train_dp_lora.py flags on top of COMMON and SPLIT
    stage: str = "sweep"
    seed: int = 0

    @property
    def private(self) -> bool:
        return not self.flags.get("disable_dp", False)


# a sweep entry pins every recipe lever it uses, so a later recipe never changes what an entry trains
def dp(name, **flags) -> Config:
    return Config(name, {"epsilon": SWEEP_EPSILON, "num_train_epochs": 1, "warmup_ratio": 0.05} | flags)


def nonprivate(name, **flags) -> Config:
    defaults = {"disable_dp": True, "num_train_epochs": 1, "lora_freeze_a": False, "warmup_ratio": 0.05}
    return Config(name, defaults | flags)


# The levers of issue #14 at the cost this CPU allows (about 0.4 training rows per CPU-second): one epoch each.
# At N ~ 270 training rows, batch 16 is about sqrt(N) (dp-transformers' advice) and 32 about 2 sqrt(N).
GRID = (
    nonprivate("nonprivate_b16_lr2e-3", logical_batch_size=16, learning_rate=2e-3),
    nonprivate("nonprivate_b16_lr5e-3", logical_batch_size=16, learning_rate=5e-3),
    # the reference gets the DP side's best schedule too: warmup over 5 of its 17 steps
    nonprivate(
        "nonprivate_b16_lr2e-3_warmup0.3", logical_batch_size=16, learning_rate=2e-3, warmup_ratio=0.3
    ),
    # and its epochs: the DP side trains 4, so a reference held to one might flatter the retention
    nonprivate("nonprivate_b16_lr2e-3_2ep", logical_batch_size=16, learning_rate=2e-3, num_train_epochs=2),
    # the first version's
    dp("dp_b16_lr2e-3", logical_batch_size=16, learning_rate=2e-3, max_grad_norm=1.0, lora_freeze_a=False),
    dp("dp_b32_lr5e-3", **B32, lora_freeze_a=False),
    dp("dp_b32_lr5e-3_freeze_a", **B32, lora_freeze_a=True),
    dp("dp_b32_lr1e-2", **B32 | {"learning_rate": 1e-2}, lora_freeze_a=False),
    # clip norm: with AdamW, C scales the clipped signal and the noise sigma C alike; a small C clips every
    # gradient (in effect normalised gradients, as jax_privacy's Gemma recipe does)
    dp("dp_b32_lr5e-3_clip0.1", **B32 | {"max_grad_norm": 0.1}, lora_freeze_a=False),
    # batch and epochs together: 2 epochs at batch 64 is the same 9 steps at twice the batch per unit of noise
    dp("dp_b64_lr5e-3_2ep", **B64_2EP, lora_freeze_a=False),
    # on top of the best so far (A frozen): warmup (3 of the 9 steps; 5% of 9 rounds to none), and SGD with
    # heavy-ball momentum 0.9 instead of AdamW; with noise of std sigma C / B ~ 0.02 per coordinate dominating
    # the gradient (sigma 0.63 at epsilon 8), lr 5e-2 with momentum's build-up (about 4x over 9 steps) moves
    # a weight about as far per step as AdamW at 5e-3
    dp("dp_b32_lr5e-3_freeze_a_warmup0.3", **B32 | {"warmup_ratio": 0.3}, lora_freeze_a=True),
    dp("dp_b32_sgd_lr5e-2_freeze_a", **B32 | {"learning_rate": 5e-2}, lora_freeze_a=True, optimizer="sgd"),
    # the two best levers together: batch 64 over 2 epochs with A frozen
    dp("dp_b64_lr5e-3_2ep_freeze_a", **B64_2EP, lora_freeze_a=True),
    # warmup on the recipe's batch (3 of its 9 steps), and the batch doubled again: batch 128 over 4 epochs is
    # the same 9 steps with sigma 1.11 at epsilon 8 against batch 64's 0.80: 115 rows per unit of noise against 80
    dp("dp_b64_lr5e-3_2ep_freeze_a_warmup0.3", **B64_2EP | {"warmup_ratio": 0.3}, lora_freeze_a=True),
    dp("dp_b128_lr5e-3_4ep_freeze_a", **B128_4EP, lora_freeze_a=True),
    # batch 128's 9 steps with the recipe's warmup, and with twice the learning rate: a batch carrying 115 rows
    # per unit of noise may take larger steps than batch 32, where lr 1e-2 diverged
    dp("dp_b128_lr5e-3_4ep_freeze_a_warmup0.3", **B128_4EP | {"warmup_ratio": 0.3}, lora_freeze_a=True),
    dp(
        "dp_b128_lr1e-2_4ep_freeze_a_warmup0.3",
        **B128_4EP | {"warmup_ratio": 0.3, "learning_rate": 1e-2},
        lora_freeze_a=True,
    ),
    # batch 256 over 8 epochs: q = 0.92, the same 9 steps at sigma 1.70 (epsilon 8), 150 rows per unit of noise
    dp("dp_b256_lr5e-3_8ep_freeze_a_warmup0.3", **B256_8EP | {"warmup_ratio": 0.3}, lora_freeze_a=True),
    # the trainable dimension: rank 1 on q_proj and v_proj holds 46k weights against rank 8 everywhere's 1.9M,
    # so the noise norm sigma C sqrt(d) is 6.4x smaller (alpha 2 keeps the scale alpha / r = 2)
    dp(
        "dp_b32_lr5e-3_r1_qv",
        **B32,
        lora_r=1,
        lora_alpha=2,
        lora_freeze_a=False,
        lora_target_modules=["q_proj", "v_proj"],
    ),
)


def final_configs(results: list[dict]) -> list[Config]:
    """--recipe auto and the earlier auto recipes at each final epsilon, the best private sweep configuration and
    the FINALISTS at the sweep's epsilon (a run whose flags resolve to the recipe's is scored, not retrained),
    and the best non-private one; 3 seeds each."""
    configs = [
        Config(f"{name}_eps{eps:g}", flags | {"epsilon": eps}, "finals", seed)
        for name, flags in FINAL_RECIPES
        for eps in FINAL_EPSILONS
        for seed in FINAL_SEEDS
    ]
    best = best_nonprivate(results)
    if best is None:
        raise StudyError("the finals need the sweep's non-private runs: run --stage sweep first")
    grid = {c.name: c for c in GRID}
    best_dp = best_of(results, "dp")
    for name in dict.fromkeys(([best_dp] if best_dp else []) + list(FINALISTS) + [best]):
        configs += [dataclasses.replace(grid[name], stage="finals", seed=seed) for seed in FINAL_SEEDS]
    if best_dp:  # a candidate for the recipe must be measured where the recipe is: at every final epsilon
        configs += [
            Config(f"{best_dp}_eps{eps:g}", grid[best_dp].flags | {"epsilon": eps}, "finals", seed)
            for eps in FINAL_EPSILONS
            if eps != SWEEP_EPSILON
            for seed in FINAL_SEEDS
        ]
    return configs


def user_configs(results: list[dict], s: "StudyArguments") -> list[Config]:
    """The finals' configurations at user level on --user_dataset: the recipe and the first auto recipe per
    epsilon over users, and the best non-private configuration over rows, all splitting by student."""
    best = best_nonprivate(results)
    if best is None:
        raise StudyError("the users stage needs the sweep's non-private runs: run --stage sweep first")
    on_users = dict(USER_SPLIT, dataset=s.user_dataset, user_column=USER_COLUMN)
    user_unit = {"privacy_unit": "user"} | on_users
    configs = [
        Config(f"user_{name}_eps{eps:g}", user_unit | flags | {"epsilon": eps}, "users", seed)
        for name, flags in USER_RECIPES
        for eps in FINAL_EPSILONS
        for seed in FINAL_SEEDS
    ]
    flags = {c.name: c.flags for c in GRID}[best] | on_users
    return configs + [Config(f"user_{best}", flags, "users", seed) for seed in FINAL_SEEDS]


def data_configs(results: list[dict]) -> list[Config]:
    """The data lever: the recipes at each final epsilon and the best non-private configuration on
    DATA_FRACTION of the training split instead of --train_sample_fraction; seeds 0, 1, 2 each, in that
    order, so that a CPU budget that stops early leaves every configuration with its first seeds."""
    best = best_nonprivate(results)
    if best is None:
        raise StudyError("the data stage needs the sweep's non-private runs: run --stage sweep first")
    more = {"train_sample_fraction": DATA_FRACTION}
    flags = {c.name: c.flags for c in GRID}[best] | more
    recipes = [
        Config(f"data{DATA_FRACTION:g}_{name}_eps{eps:g}", flags | {"epsilon": eps} | more, "data", seed)
        for name, flags in DATA_RECIPES
        for eps in FINAL_EPSILONS
        for seed in FINAL_SEEDS
    ]
    return recipes + [Config(f"data{DATA_FRACTION:g}_{best}", flags, "data", seed) for seed in FINAL_SEEDS]


def best_of(results: list[dict], kind: str) -> str | None:
    """The sweep configuration of `kind` (dp or nonprivate) with the lowest validation NLL."""
    sweep = [r for r in results if r["stage"] == "sweep" and r["kind"] == kind]
    return min(sweep, key=lambda r: r["validation_nll"])["name"] if sweep else None


def best_nonprivate(results: list[dict]) -> str | None:
    return best_of(results, "nonprivate")


class StudyError(cli.UserError):
    pass


class ChildEnded(Exception):
    """A child that did not finish: stopped on request (STOP), or failed; cpu_s is what it had spent."""

    def __init__(self, message: str, cpu_s: float):
        super().__init__(message)
        self.cpu_s = cpu_s


class StudyStopped(ChildEnded):
    """Stopped on request (STOP): a training run keeps its last checkpoint and the next invocation continues it."""


class ChildFailed(ChildEnded, StudyError):
    pass


# Set by --stop_after_minutes or SIGTERM/SIGINT: the runs in flight are stopped (each keeps its last checkpoint)
# and no run starts.
STOP = threading.Event()
# Every run checkpoints after each step (adapters, tokenizer and optimizer state: about 40 MB a step for Gemma 3
# 270M), so a stop or a crash loses at most one step. A seeded resume replays the same draws and noise: the
# adapters equal an uninterrupted run's.
CHECKPOINT_EVERY = 1


@dataclass
class StudyArguments:
    stage: str = field(
        default="sweep", metadata={"help": "which runs", "choices": ["sweep", "finals", "data", "users"]}
    )
    model: str = field(default="gemma3-270m", metadata={"help": "base model of every run"})
    dataset: str = field(default="bundled", metadata={"help": "public flashcards every run trains on"})
    user_dataset: str = field(
        default="data/flashcards_by_student.jsonl",
        metadata={"help": "the same public cards with a student id per row (stage users)"},
    )
    train_sample_fraction: float = field(
        default=0.15, metadata={"help": "share of the training split every run trains on (a keyed hash)"}
    )
    cpu_budget_minutes: float = field(
        default=120.0, metadata={"help": "start no run after this invocation's runs used this much CPU"}
    )
    jobs: int = field(default=1, metadata={"help": "runs at once"})
    threads_per_job: int = field(
        default=1, metadata={"help": "threads of each run (one run alone on 2 cores: 2, for its wall time)"}
    )
    runs_dir: str = field(default="outputs/utility_study", metadata={"help": "where the runs are written"})
    results: str = field(
        default="bench/results/utility_study.jsonl", metadata={"help": "one JSON line per finished run"}
    )
    table: str = field(default="bench/results/utility_study.md", metadata={"help": "markdown table"})
    plot: str = field(default="docs/utility_study.png", metadata={"help": "test NLL against epsilon"})
    configs: list[str] = field(
        default_factory=list, metadata={"help": "run only these configurations of the stage (default: all)"}
    )
    report_only: bool = field(default=False, metadata={"help": "rewrite the table and plot, train nothing"})
    stop_after_minutes: float = field(
        default=0.0,
        metadata={
            "help": "stop the runs in flight after this many wall minutes, to be continued (0 = never)"
        },
    )


GROUPS = {"study": StudyArguments}


def parse_args(argv=None):
    parser = cli.build_parser(__doc__.split("\n\n")[0], GROUPS)
    return cli.parse_into(parser, GROUPS, argv)


def validate_args(args) -> None:
    s = args.study
    problems = []
    if not 0 < s.train_sample_fraction <= 1:
        problems.append(f"--train_sample_fraction must be in (0, 1], got {s.train_sample_fraction}")
    if s.jobs < 1:
        problems.append(f"--jobs must be >= 1, got {s.jobs}")
    if s.threads_per_job < 1:
        problems.append(f"--threads_per_job must be >= 1, got {s.threads_per_job}")
    if s.cpu_budget_minutes <= 0:
        problems.append(f"--cpu_budget_minutes must be > 0, got {s.cpu_budget_minutes}")
    if s.stop_after_minutes < 0:
        problems.append(f"--stop_after_minutes must be >= 0, got {s.stop_after_minutes}")
    if problems:
        raise cli.ArgumentErrors(problems)


# -----------------------------------------------------------------------------
# running


def read_results(path: Path) -> list[dict]:
    """The finished runs, the first line of each (stage, name, seed): two invocations may both add one."""
    if not path.exists():
        return []
    lines, seen = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if (
            line.strip()
            and (key := tuple(json.loads(line)[k] for k in ("stage", "name", "seed"))) not in seen
        ):
            seen.add(key)
            lines.append(json.loads(line))
    return lines


def flag_list(flags: dict) -> list[str]:
    out = []
    for key, value in flags.items():
        out += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]
    return out


class ChildCPU:
    """CPU seconds of finished children, per thread: RUSAGE_CHILDREN would mix concurrent runs."""

    POLL_S = 0.2  # how soon a finished child is reaped, and a STOP reaches a running one

    @staticmethod
    def run(command: list[str], log_path: Path, threads: int = 1) -> float:
        """The finished child's CPU seconds; ChildFailed or StudyStopped (with the CPU spent) otherwise."""
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        env["TOKENIZERS_PARALLELISM"] = "false"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            child = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            while True:
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                if STOP.wait(ChildCPU.POLL_S):
                    child.terminate()  # a checkpoint is one atomic directory: a kill never leaves half of one
                    _, status, usage = os.wait4(child.pid, 0)
                    break
        cpu = usage.ru_utime + usage.ru_stime
        if os.waitstatus_to_exitcode(status) != 0:
            if STOP.is_set():
                raise StudyStopped(f"{command[1]} stopped (log {log_path})", cpu)
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise ChildFailed(f"{command[1]} failed (log {log_path}): {tail[0]}", cpu)
        return cpu


def nll_of(run_dir: Path, split: str, base: bool = False, threads: int = 1) -> tuple[float, float]:
    """(answer NLL of the run's adapters, or of the base model, on the run's `split`; CPU seconds)."""
    out = run_dir / "private_run_record" / f"nll_{split}"
    command = [sys.executable, "evaluate_qa.py", "--adapters", str(run_dir), "--nll_only", "--split", split]
    command += ["--batch_size", "16", "--report_to", "none", "--output_dir", str(out)]
    command += [] if base else ["--no_base"]
    cpu = ChildCPU.run(command, out.with_suffix(".log"), threads)
    models = read_json(out / "eval_results.json")["models"]
    entry = next(m for m in models if m["kind"] == ("base" if base else "adapter"))
    return entry["metrics"]["nll"], cpu


def run_flags(config: Config, s: StudyArguments) -> dict:
    """Every train_dp_lora.py flag of one run but --output_dir."""
    common = {
        **COMMON,
        **SPLIT,
        "model": s.model,
        "dataset": s.dataset,
        "train_sample_fraction": s.train_sample_fraction,
    }
    return {**common, **config.flags, "seed": config.seed}


# where a run is written, and how it is checkpointed and continued: none of them changes what it trains
IGNORED = ("output_dir", "overwrite_output_dir", "save_steps", "resume_from_checkpoint")


@functools.cache
def flag_defaults() -> dict:
    """train_dp_lora.py's flag defaults by group: parsed once, not once per run directory compared."""
    from utils import train_args

    return cli.to_dict(train_args.parse_args([]))


def trained_with(run_dir: Path, flags: dict) -> bool:
    """Did a finished run in run_dir train with exactly these flags (every other flag at its default)?

    Each parsed value is compared with the run's args.json; the levers left unset are compared with
    what the recipe gives at the run's N and epsilon (utils.recipe, as train_dp_lora.py fills them). A flag
    the run's args.json lacks was added after it ran, and a new flag's default keeps the old behaviour
    (--optimizer adamw was the only update): the run counts as trained with that default.
    """
    run = RunDir(run_dir)
    if not run.results_file.is_file():
        return False
    data = read_json(run.results_file)["data"]
    return started_with(run, flags, n_train=data["n_train"], n_users=data.get("n_train_users"))


def started_with(run: RunDir, flags: dict, n_train: int, n_users: int | None) -> bool:
    """Did the run in `run` start with exactly these flags, its N being n_train rows or n_users users?
    (trained_with's comparison, for a finished run or one stopped at a checkpoint)"""
    from utils import recipe, train_args

    if not run.args_file.is_file():
        return False
    parsed = train_args.parse_args(flag_list(flags))
    n = n_users if parsed.privacy.privacy_unit == "user" else n_train
    if n is None:  # a user-level configuration, and a run that counted no users
        return False
    recipe.apply(parsed, n)
    wanted, saved, defaults = cli.to_dict(parsed), read_json(run.args_file), flag_defaults()
    return all(
        saved.get(group, {}).get(key, defaults[group][key]) == value
        for group, values in wanted.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if key not in IGNORED
    )


def segments_file(run_dir: Path) -> Path:
    """The CPU and wall seconds of each process that trained run_dir, beside it (a name may hold a dot)."""
    return run_dir.parent / f"{run_dir.name}.segments.json"


def train(run_dir: Path, flags: dict, threads: int = 1) -> list[dict]:
    """Train run_dir with these flags, continuing from its last checkpoint an unfinished run started with
    the same flags (stopped, or killed), else from scratch: every segment of the run, this one last.

    A segment ended from outside (the study killed with it) is kept with cpu_s None: its CPU is unknown."""
    run, segments_path = RunDir(run_dir), segments_file(run_dir)
    checkpoint = None if run.results_file.is_file() else run.latest_checkpoint()
    saved = read_json(checkpoint / CHECKPOINT_RECORD) if checkpoint else None
    if saved and not started_with(run, flags, n_train=saved["n_train"], n_users=saved.get("n_users")):
        checkpoint = saved = None
    segments = read_json(segments_path)["segments"] if saved and segments_path.is_file() else []
    segments.append(
        {"from_step": saved["steps_taken"] if saved else 0, "cpu_s": None, "wall_s": None, "threads": threads}
    )
    write_json_atomic(segments_path, {"segments": segments})
    continued = {"resume_from_checkpoint": "latest"} if checkpoint else {"overwrite_output_dir": True}
    argv = flag_list(dict(flags, output_dir=str(run_dir), save_steps=CHECKPOINT_EVERY, **continued))
    start = time.time()
    try:
        cpu = ChildCPU.run(
            [sys.executable, "train_dp_lora.py", *argv], run_dir.parent / f"{run_dir.name}.log", threads
        )
    except ChildEnded as ended:
        segments[-1].update(cpu_s=round(ended.cpu_s, 1), wall_s=round(time.time() - start, 1))
        write_json_atomic(segments_path, {"segments": segments})
        raise
    segments[-1].update(cpu_s=round(cpu, 1), wall_s=round(time.time() - start, 1))
    write_json_atomic(segments_path, {"segments": segments})
    return segments


def train_and_score(config: Config, s: StudyArguments) -> dict:
    run_dir = Path(s.runs_dir) / f"{config.name}_seed{config.seed}"
    flags = run_flags(config, s)
    same = [d for d in sorted(Path(s.runs_dir).glob("*_seed*")) if d.is_dir() and trained_with(d, flags)]
    trained_here = True
    if same and same[0] == run_dir and segments_file(run_dir).is_file():
        # this configuration's own run, trained by an invocation that stopped before it was scored
        segments = read_json(segments_file(run_dir))["segments"]
    elif same:  # a finished run of exactly these flags (the sweep's, or an earlier invocation's): score it
        run_dir, segments, trained_here = same[0], [], False  # its training CPU is not counted again
    else:
        segments = train(run_dir, flags, s.threads_per_job)
    cpu = sum(segment["cpu_s"] or 0.0 for segment in segments)
    wall = sum(segment["wall_s"] or 0.0 for segment in segments)
    start = time.time()
    run = RunDir(run_dir)
    results, resolved = read_json(run.results_file), read_json(run.args_file)
    test_nll = None  # the sweep selects on validation only; the test split is scored for the finals
    threads = {segment.get("threads", 1) for segment in segments}  # a segment written before the field: 1
    if config.stage in ("finals", "data", "users"):
        test_nll, cpu_test = nll_of(run_dir, "test", threads=s.threads_per_job)
        cpu += cpu_test
        threads.add(s.threads_per_job)
    # the training run's final evaluation is the validation split's answer NLL (the same function)
    line = result_line(
        config, flags, results, resolved, results["eval/loss"], test_nll, cpu, wall + time.time() - start
    )
    if len(segments) > 1:  # continued after a stop: the CPU of a segment killed from outside is unknown
        line |= {"segments": len(segments), "segments_cpu_unknown": sum(x["cpu_s"] is None for x in segments)}
    if max(threads, default=1) > 1:  # what this line's processes ran with, not what this invocation asked
        line["threads"] = max(threads)
    return dict(line, run_dir=str(run_dir), trained_here=trained_here)


def result_line(config, flags, results, resolved, validation_nll, test_nll, cpu_s, wall_s) -> dict:
    t, p = resolved.get("training", {}), resolved.get("privacy", {})
    return {
        "name": config.name,
        "seed": config.seed,
        "stage": config.stage,
        "kind": "dp" if config.private else "nonprivate",
        "flags": flags,
        "resolved": {
            k: t.get(k) for k in ("logical_batch_size", "num_train_epochs", "learning_rate", "warmup_ratio")
        }
        | {"max_grad_norm": p.get("max_grad_norm")},  # fmt: skip
        "epsilon": results["privacy/epsilon"] if config.private else None,
        "delta": results["privacy/delta"] if config.private else None,
        "steps": results["steps"],
        "n_train": results["data"]["n_train"],
        "n_users": results["data"].get("n_train_users") if flags.get("privacy_unit") == "user" else None,
        "validation_nll": validation_nll,
        "test_nll": test_nll,
        "cpu_s": round(cpu_s, 1),
        "wall_s": round(wall_s, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def base_line(first_run: Path, s: StudyArguments, name: str = "base") -> dict:
    """The base model on first_run's validation and test splits (the split every run of its stage shares)."""
    start = time.time()
    with ThreadPoolExecutor(max_workers=2) as pool:  # two evaluations, one thread each: both cores
        (validation_nll, cpu_v), (test_nll, cpu_t) = pool.map(
            lambda split: nll_of(first_run, split, base=True), ("validation", "test")
        )
    return {"name": name, "seed": 0, "stage": "base", "kind": "base", "flags": {"model": s.model},
            "resolved": {}, "epsilon": None, "delta": None, "steps": 0, "n_train": 0,
            "validation_nll": validation_nll, "test_nll": test_nll, "cpu_s": round(cpu_v + cpu_t, 1),
            "wall_s": round(time.time() - start, 1),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip


# -----------------------------------------------------------------------------
# reporting


def mean_sd(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation, count); the deviation is 0 for one value."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


# the base run on each stage's split
BASE_OF = {"sweep": "base", "finals": "base", "data": "base", "users": "base_users"}


def summarise(results: list[dict]) -> list[dict]:
    """One row per (stage, name): means and seed spreads of the NLLs, and the retention of the fine-tuning
    gain, (base NLL - NLL) / (base NLL - reference NLL), per seed. The base is the base model on the stage's
    split; the reference is the stage's best non-private configuration by (mean) validation NLL: in the
    sweep its validation NLL, in the other stages the mean of its seeds on that stage's test split.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["stage"], r["name"]), []).append(r)
    bases = {r["name"]: r for r in results if r["kind"] == "base"}

    def reference(stage: str) -> tuple[str, float | None]:
        metric = "validation_nll" if stage == "sweep" else "test_nll"
        scored = [[r for r in runs if r[metric] is not None] for (s, _), runs in groups.items()
                  if s == stage and runs[0]["kind"] == "nonprivate"]  # fmt: skip
        scored = [runs for runs in scored if runs]
        if not scored:
            return metric, None
        # one configuration, chosen on validation as the sweep chooses: a stage that holds two (the sweep's
        # best changed after they ran) must not average them
        best = min(scored, key=lambda runs: statistics.fmean(r["validation_nll"] for r in runs))
        return metric, statistics.fmean(r[metric] for r in best)

    rows = []
    for (stage, name), runs in groups.items():
        row = {"stage": stage, "name": name, "kind": runs[0]["kind"], "seeds": len(runs),
               "resolved": runs[0]["resolved"], "flags": runs[0]["flags"], "n_train": runs[0]["n_train"],
               "n_users": runs[0].get("n_users"), "steps": runs[0]["steps"],
               "cpu_min": sum(r["cpu_s"] for r in runs) / 60}  # fmt: skip
        row["epsilon"] = max(r["epsilon"] for r in runs) if runs[0]["epsilon"] is not None else None
        for split in ("validation_nll", "test_nll"):
            values = [r[split] for r in runs if r[split] is not None]
            row[split] = mean_sd(values) if len(values) == len(runs) else None
        metric, ref = reference(stage)
        base = bases.get(BASE_OF.get(stage))
        if base and ref is not None and base[metric] > ref and row["kind"] != "base" and row[metric]:
            gain = base[metric] - ref
            row["retention"] = mean_sd([(base[metric] - r[metric]) / gain for r in runs])
        rows.append(row)
    return rows


def percent(mean_sd_count) -> str:
    """'78%', or '78% ± 3%' over seeds; under a point of spread, the mean and spread keep a decimal each, so
    the spread never reads as none and a mean near a goal is not rounded across it ('80.8% ± 0.7%')."""
    if not mean_sd_count:
        return "-"
    mean, sd, seeds = mean_sd_count
    if seeds < 2:
        return f"{mean:.0%}"
    return f"{mean:.0%} ± {sd:.0%}" if sd >= 0.01 else f"{mean:.1%} ± {sd:.1%}"


def format_table(rows: list[dict]) -> str:
    pm = lambda ms: "-" if ms is None else (f"{ms[0]:.4f} ± {ms[1]:.4f}" if ms[2] > 1 else f"{ms[0]:.4f}")  # noqa: E731
    lines = [
        "| stage | configuration | epsilon | logical batch | epochs | lr | clip | N (training) | steps | seeds "
        "| validation NLL | test NLL | retention (sweep: validation; finals, data and users: test NLL) | CPU min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        res = row["resolved"]
        eps = (
            "-"
            if row["kind"] == "base"
            else ("inf (no DP)" if row["epsilon"] is None else f"{row['epsilon']:.2f}")
        )
        retention = row.get("retention")
        n = f"{row['n_users']} users ({row['n_train']} rows)" if row.get("n_users") else row["n_train"] or "-"
        lines.append(
            f"| {row['stage']} | {row['name']} | {eps} | {res.get('logical_batch_size', '-')} "
            f"| {res.get('num_train_epochs', '-')} | {res.get('learning_rate', '-')} "
            f"| {res.get('max_grad_norm', '-') if row['kind'] == 'dp' else '-'} | {n} "
            f"| {row['steps']} | {row['seeds']} | {pm(row['validation_nll'])} | {pm(row['test_nll'])} "
            f"| {percent(retention)} | {row['cpu_min']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_series(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """(label, summary rows by epsilon) per line of the plot: each recipe per stage and unit, and each other
    finals configuration, its runs at other epsilons (`{name}_eps{e}`) on its line."""
    share = f"training share {DATA_FRACTION:g}"
    lines = (  # (stage, name prefix, label)
        ("finals", "recipe_eps", "--recipe auto, example unit (one row)"),
        ("finals", "fourth_recipe_eps", "fourth auto recipe (batch 8 sqrt N), example unit"),
        ("finals", "third_recipe_eps", "third auto recipe (batch 4 sqrt N), example unit"),
        ("finals", "second_recipe_eps", "second auto recipe (5% warmup), example unit"),
        ("finals", "first_recipe_eps", "first auto recipe, example unit"),
        ("users", "user_recipe_eps", "--recipe auto, user unit (one student)"),
        ("users", "user_fourth_recipe_eps", "fourth auto recipe, user unit"),
        ("users", "user_first_recipe_eps", "first auto recipe, user unit"),
        ("data", f"data{DATA_FRACTION:g}_recipe_eps", f"--recipe auto, example unit, {share}"),
        ("data", f"data{DATA_FRACTION:g}_fourth_recipe_eps", f"fourth auto recipe, example unit, {share}"),
    )
    series = [
        (label, sorted((r for r in rows if r["stage"] == stage and r["kind"] == "dp"
                        and r["name"].startswith(prefix) and r.get("retention")), key=lambda r: r["epsilon"]))
        for stage, prefix, label in lines
    ]  # fmt: skip
    by_configuration = {}  # a sweep configuration's finals, at the sweep's epsilon and as `{name}_eps{e}`
    recipes = tuple(prefix for stage, prefix, _ in lines if stage == "finals")  # each on its own line above
    for r in rows:
        if (
            r["stage"] == "finals"
            and r["kind"] == "dp"
            and r.get("retention")
            and not r["name"].startswith(recipes)
        ):
            by_configuration.setdefault(re.sub(r"_eps[0-9.]+$", "", r["name"]), []).append(r)
    series += [(f"{name}, example unit", sorted(points, key=lambda r: r["epsilon"]))
               for name, points in by_configuration.items()]  # fmt: skip
    return [(label, points) for label, points in series if points]


def seed_counts(points: list[dict]) -> str:
    """'3 seeds', '1 seed', or '1-3 seeds' for a line whose points have different seed counts."""
    counts = sorted({r["seeds"] for r in points})
    return f"{'-'.join(map(str, counts))} seed{'s' if counts[-1] != 1 else ''}"


def plot(rows: list[dict], path: Path) -> None:
    """Retention against epsilon, per privacy unit: each unit against its own split's base (0%) and
    best non-private reference (100%), so both units share one axis."""
    series = plot_series(rows)
    if not series:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for (label, points), marker in zip(series, itertools.cycle(("o", "x", "s", "D", "^", "v", "P"))):
        ax.errorbar(
            [r["epsilon"] for r in points],
            [100 * r["retention"][0] for r in points],
            yerr=[100 * r["retention"][1] for r in points],
            marker=marker,
            capsize=4,
            label=f"{label} ({seed_counts(points)})",
        )
    ax.axhline(100, linestyle="--", color="tab:green", label="best non-private configuration")
    ax.axhline(0, linestyle="--", color="tab:grey", label="base model")
    ax.scatter([3, 8], [80, 90], marker="*", s=90, color="tab:red", label="issue #14 goals", zorder=3)
    ax.set_xlabel("epsilon (delta from the run)")
    ax.set_ylabel("retention of the test NLL gain, % (mean ± sd)")
    ax.set_title("Gemma 3 270M, bundled flashcards")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: no point hidden
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_order(row: dict) -> int:
    """Sweep, then each stage after its own base: the finals after `base`, the users stage after `base_users`."""
    stage = {"base": "finals", "base_users": "users"}.get(row["name"], row["stage"])
    return 2 * ("sweep", "finals", "data", "users").index(stage) + (row["kind"] != "base")


def write_report(s: StudyArguments) -> str:
    rows = sorted(summarise(read_results(Path(s.results))), key=report_order)  # stable within a stage
    table = format_table(rows)
    Path(s.table).parent.mkdir(parents=True, exist_ok=True)
    Path(s.table).write_text(table, encoding="utf-8")
    plot(rows, Path(s.plot))
    return table


# -----------------------------------------------------------------------------


def main(args) -> dict:
    validate_args(args)
    s = args.study
    results_path = Path(s.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    if s.report_only:
        print(write_report(s))
        return {"ran": []}
    done = {(r["stage"], r["name"], r["seed"]) for r in read_results(results_path)}
    finished_before = read_results(results_path)
    configs = {
        "sweep": lambda: list(GRID),
        "finals": lambda: final_configs(finished_before),
        "data": lambda: data_configs(finished_before),
        "users": lambda: user_configs(finished_before, s),
    }[s.stage]()
    declared = list(dict.fromkeys(c.name for c in configs))  # a name per configuration, not per seed
    unknown = sorted(set(s.configs) - set(declared))
    if unknown:
        raise StudyError(f"--configs: no {', '.join(unknown)} in stage {s.stage} ({', '.join(declared)})")
    todo = [
        c for c in configs if (c.stage, c.name, c.seed) not in done and (not s.configs or c.name in s.configs)
    ]
    lock, used = threading.Lock(), {"cpu_s": 0.0, "ran": [], "stopped": []}

    def one(config: Config) -> None:
        with lock:
            if used["cpu_s"] >= 60 * s.cpu_budget_minutes or STOP.is_set():
                why = "stopped" if STOP.is_set() else "CPU budget spent"
                print(f"skipped {config.name} seed {config.seed}: {why}", flush=True)
                return
        print(f"start {config.name} seed {config.seed}", flush=True)
        try:
            line = train_and_score(config, s)
        except StudyStopped as stopped:
            with lock:
                used["cpu_s"] += stopped.cpu_s
                used["stopped"].append((config.name, config.seed))
            print(f"stopped {config.name} seed {config.seed}: the next invocation continues it", flush=True)
            return
        with lock:
            with open(results_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")
            used["cpu_s"] += line["cpu_s"]
            used["ran"].append((config.name, config.seed))
            write_report(s)
        print(f"done {config.name} seed {config.seed}: {line}", flush=True)

    STOP.clear()
    deadline = threading.Timer(60 * s.stop_after_minutes, STOP.set) if s.stop_after_minutes else None
    if deadline:
        deadline.daemon = True
        deadline.start()
    try:
        with ThreadPoolExecutor(max_workers=s.jobs) as pool:
            for future in [pool.submit(one, c) for c in todo]:
                future.result()
    finally:
        if deadline:
            deadline.cancel()
    base = BASE_OF[s.stage]
    finished = [r for r in read_results(results_path) if r["kind"] != "base" and BASE_OF[r["stage"]] == base]
    if finished and ("base", base, 0) not in done:  # the base model on the split the stage's runs share, once
        if used["cpu_s"] >= 60 * s.cpu_budget_minutes or STOP.is_set():
            print(f"skipped {base}: CPU budget spent or stopped (the next invocation scores it)", flush=True)
        else:
            first = Path(
                finished[0].get("run_dir")
                or Path(s.runs_dir) / f"{finished[0]['name']}_seed{finished[0]['seed']}"
            )
            try:
                line = base_line(first, s, base)
            except StudyStopped:
                print(f"stopped scoring {base}: the next invocation scores it", flush=True)
            else:
                with open(results_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(line) + "\n")
    print(write_report(s))
    return used


def cli_main(argv=None) -> int:
    for signum in (signal.SIGTERM, signal.SIGINT):  # stop the runs at their checkpoints, keep their CPU
        signal.signal(signum, lambda *_: STOP.set())
    return cli.run_main(main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli_main())
