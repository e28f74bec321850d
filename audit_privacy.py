"""Empirical privacy audit of train_dp_lora.py in one training run, with canary flashcards.

What it does
- Makes m canaries: flashcards "What is the access code of record <random id>?" -> <random digits>,
  none equal to a real row. Each is inserted into the training data independently with probability 1/2.
- With --canary_repeats R >= 2, also inserts --num_repeated_canaries more canaries R times each
  (the copies differ only by a note in the question, since exact duplicates are dropped).
- Writes real rows + inserted canaries to OUT/audit_data.jsonl and trains on it by running
  train_dp_lora.py in its own process (run in OUT/train) with the training arguments given after `--`,
  or with --num_processes N > 1 under `accelerate launch` on N processes (--accelerate_config), the way
  multi-process runs are launched, so the audit covers the multi-process step as executed;
  --validation_fraction and --test_fraction are forced to 0 and --train_sample_fraction to 1 so every
  inserted canary is a training row (checked afterwards from the run's row count), and
  --num_real_rows K keeps the first K real rows.
- Scores every canary: its answer loss under the fine-tuned model minus under the base model
  (utils.loss.per_example_loss); the lower, the more likely it was trained on.
- Lower bound (Steinke, Nasr, Jagielski, "Privacy auditing with one training run", NeurIPS 2023):
  guess "in" for the k lowest scores and "out" for the k highest, count the correct guesses v of
  r = 2k. Under (eps, delta)-DP, P[v or more correct] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v]
  + 2 m delta * max_{i=1..v} P[v - i <= Binomial(r, e^eps / (1 + e^eps)) < v] / i (their main theorem
  with delta > 0). The reported bound is the largest eps whose p-value is below 1 - --confidence, at
  the report's delta. It is computed for each guess count r in --guess_fractions * m, and each test
  runs at level (1 - confidence) / len(guess_fractions) (Bonferroni), so taking the largest stays valid.
- Attack quality on the same scores: ROC AUC and TPR at 1% and 10% FPR (with m/2 non-members an
  FPR of 1% means no false positive at all).
- Secret-Sharer exposure (Carlini et al., USENIX Security 2019): for each canary, how many of A
  random alternative secrets (same question) the fine-tuned model finds at least as likely as the
  real one; exposure = log2|R| - log2(rank) with rank estimated as |R| (c + 1) / (A + 1), i.e.
  -log2((c + 1) / (A + 1)): about 1.44 bits on average for a secret never seen, at most log2(A + 1).

What the lower bound means, and what it does not
- It lower-bounds the privacy loss that THIS attack (loss-difference scores, top/bottom-k guesses)
  demonstrates on THIS training run and these canaries: with probability >= --confidence over the
  canaries' random inclusion, the training run as executed is not (eps', delta)-DP for any
  eps' < the bound. A bound above the reported epsilon means the guarantee is broken (a bug in the
  code or in the accounting).
- It is not evidence that the reported epsilon is tight: DP bounds the worst case over all
  datasets and attackers, and a black-box loss attack on the final adapters typically finds far
  less. A bound of 0 says nothing beyond "this attack found nothing".
- The bound uses the run's delta. With m canaries it cannot exceed about ln(m / ln(1 / level))
  even when every guess is right (level = (1 - confidence) / len(guess_fractions); about 2.7 for
  m = 64 at the defaults), so a small audit can only ever refute small epsilons.
- User level (--canary_rows_per_user k > 1, training with --user_column COL): each audit canary is a
  user of k rows (the question with k different notes, one secret) under its own id in COL, inserted
  with all its rows or none; its score is the mean over its rows. With --privacy_unit user the bound is
  tested against the reported user-level epsilon; with the example unit, against the group privacy
  the example-level guarantee gives k rows, (k eps, k e^((k-1) eps) delta), at that delta.
- Repeated canaries break the example-level privacy unit on purpose (one secret in R rows is
  protected only at group privacy of size R); they take no part in the lower bound, only in
  exposure, and show what memorization looks like when the unit assumption fails.

Outputs: OUT/audit_report.json (bound, reported epsilon, AUC, TPR at low FPR, exposures, counts),
OUT/canaries.jsonl (every canary, its secret and whether it was inserted: keep it private),
OUT/audit_data.jsonl, OUT/train/ (the full training run). The audit run trains on every real row
(no held-out split) plus canaries: its adapters are for auditing, not for release.

Run
    python audit_privacy.py --output_dir outputs/audit --num_canaries 256 -- \\
        --model gemma3-270m --dataset bundled --epsilon 8 --num_train_epochs 3 \\
        --logical_batch_size 16 --per_device_train_batch_size 4 --report_to none
    python audit_privacy.py --output_dir outputs/audit_users --canary_rows_per_user 4 -- \\
        --model gemma3-270m --dataset data/flashcards_by_student.jsonl --privacy_unit user \\
        --user_column student_id --epsilon 8 --report_to none
    python audit_privacy.py --output_dir outputs/audit_users_2proc --canary_rows_per_user 4 \\
        --num_processes 2 --mixed_precision no -- --model gemma3-270m \\
        --dataset data/flashcards_by_student.jsonl --privacy_unit user --user_column student_id --epsilon 8
    python audit_privacy.py --output_dir outputs/audit_nodp --canary_repeats 8 -- \\
        --model gemma3-270m --dataset bundled --disable_dp --num_train_epochs 5 --report_to none
"""

import json
import math
import random
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils import cli, train_args, training
from utils.privacy_record import format_delta, format_epsilon
from utils.run_dir import RunDir, read_json, write_json_atomic
from utils.data import clean_rows, read_rows, row_hash
from utils.prompt import DEFAULT_INSTRUCTION, encode_example

QUESTION = "What is the access code of record {record}?"
ID_ALPHABET = string.ascii_uppercase + string.digits
FPR_LEVELS = (0.01, 0.1)
TRAIN_SCRIPT = Path(__file__).resolve().parent / "train_dp_lora.py"


class AuditError(cli.UserError):
    """A one-line reason the audit could not run."""


@dataclass
class AuditArguments:
    output_dir: str = field(
        default="outputs/audit", metadata={"help": "audit files; the training run goes to OUTPUT_DIR/train"}
    )
    num_canaries: int = field(default=64, metadata={"help": "m: canaries each inserted with probability 1/2"})
    secret_length: int = field(
        default=8, metadata={"help": "digits in a canary's secret answer (|R| = 10^length)"}
    )
    canary_repeats: int = field(
        default=0,
        metadata={"help": "R >= 2: also insert --num_repeated_canaries canaries R times each (0 = none)"},
    )
    num_repeated_canaries: int = field(
        default=4, metadata={"help": "how many repeated canaries when --canary_repeats is set"}
    )
    exposure_alternatives: int = field(
        default=200, metadata={"help": "A: random alternative secrets per canary for exposure"}
    )
    confidence: float = field(default=0.95, metadata={"help": "confidence of the epsilon lower bound"})
    guess_fractions: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 1.0],
        metadata={"help": "guess on this share of the m canaries (half in, half out); Bonferroni over them"},
    )
    seed: int = field(
        default=0, metadata={"help": "seeds the canaries, their inclusion and the alternatives"}
    )
    score_batch_size: int = field(default=64, metadata={"help": "rows per forward pass when scoring"})
    num_real_rows: int = field(
        default=0, metadata={"help": "use only the first K cleaned rows of the training --dataset (0 = all)"}
    )
    num_processes: int = field(
        default=1, metadata={"help": "train on N processes with accelerate launch (1: one python process)"}
    )
    accelerate_config: str = field(
        default="configs/accelerate_multi_gpu.yaml",
        metadata={"help": "accelerate config of the launch when --num_processes > 1"},
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "the launch's --mixed_precision when --num_processes > 1 (default: the config's)",
            "choices": ["no", "bf16", "fp16"],
        },
    )
    canary_rows_per_user: int = field(
        default=1,
        metadata={
            "help": "k > 1: each audit canary is a user of k rows under one id in the training --user_column, "
            "all inserted or none (a user-level audit with --privacy_unit user)"
        },
    )


GROUPS = {"audit": AuditArguments}


def parse_args(argv=None):
    """Audit flags, then `--`, then train_dp_lora.py flags (stored as args.train)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = cli.build_parser(
        __doc__.split("\n\n")[0] + " Training flags follow `--`.", GROUPS, config_flag=False
    )
    args = cli.parse_into(parser, GROUPS, argv[:split])
    args.train_argv = argv[split + 1 :]
    args.train = train_args.parse_args(args.train_argv)
    return args


def validate_args(args) -> None:
    a = args.audit
    problems = []
    if a.num_canaries < 4:
        problems.append(f"--num_canaries must be >= 4, got {a.num_canaries}")
    if not 1 <= a.secret_length <= 32:
        problems.append(f"--secret_length must be in [1, 32], got {a.secret_length}")
    if a.canary_repeats == 1 or a.canary_repeats < 0:
        problems.append(f"--canary_repeats must be 0 (none) or >= 2, got {a.canary_repeats}")
    if a.canary_repeats and a.num_repeated_canaries < 1:
        problems.append("--num_repeated_canaries must be >= 1 with --canary_repeats")
    if a.exposure_alternatives < 1:
        problems.append(f"--exposure_alternatives must be >= 1, got {a.exposure_alternatives}")
    if not 0 < a.confidence < 1:
        problems.append(f"--confidence must be in (0, 1), got {a.confidence}")
    if not a.guess_fractions or not all(0 < f <= 1 for f in a.guess_fractions):
        problems.append("--guess_fractions must be in (0, 1]")
    elif min(guess_counts(a.num_canaries, a.guess_fractions)) < 2:
        problems.append("--guess_fractions * --num_canaries must allow at least 2 guesses")
    if a.score_batch_size < 1:
        problems.append("--score_batch_size must be >= 1")
    if a.num_processes < 1:
        problems.append(f"--num_processes must be >= 1, got {a.num_processes}")
    elif a.num_processes > 1 and not Path(a.accelerate_config).is_file():
        problems.append(f"--accelerate_config {a.accelerate_config}: no such file")
    if a.canary_rows_per_user < 1:
        problems.append(f"--canary_rows_per_user must be >= 1, got {a.canary_rows_per_user}")
    elif a.canary_rows_per_user > 1 and not args.train.privacy.user_column:
        problems.append(
            "--canary_rows_per_user > 1 makes canary users: give the training flags --user_column COL "
            "(and --privacy_unit user for a user-level audit)"
        )
    if problems:
        raise cli.ArgumentErrors(problems)
    train_args.validate_args(args.train)


# -----------------------------------------------------------------------------
# canaries


def guess_counts(m: int, fractions) -> list[int]:
    """r for each guess fraction: an even number of guesses, half "in" and half "out"."""
    return sorted(
        {2 * max(1, int(round(f * m / 2))) for f in fractions if 2 * max(1, int(round(f * m / 2))) <= m}
    )


def random_secret(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(length))


def make_canaries(
    a: AuditArguments, instruction: str, real_hashes: set, real_questions: set, user_column: str | None = None
) -> list[dict]:
    """m audit canaries (inserted with probability 1/2; k rows each with --canary_rows_per_user k) and the
    repeated ones (always inserted, R copies). With a user column every canary is its own user."""
    rng = random.Random(f"canaries:{a.seed}")
    canaries, used = [], set()
    n_repeated = a.num_repeated_canaries if a.canary_repeats else 0
    while len(canaries) < a.num_canaries + n_repeated:
        record = "".join(rng.choice(ID_ALPHABET) for _ in range(8))
        question = QUESTION.format(record=record)
        if record in used or question in real_questions:
            continue
        used.add(record)
        repeated = len(canaries) >= a.num_canaries
        canary = {
            "index": len(canaries),
            "question": question,
            "secret": random_secret(rng, a.secret_length),
            "kind": "repeated" if repeated else "audit",
            "copies": a.canary_repeats if repeated else a.canary_rows_per_user,
        }
        canary["included"] = True if repeated else rng.random() < 0.5
        canaries.append(canary)
    for canary in canaries:
        canary["rows"] = [card_of(canary, instruction, j) for j in range(canary["copies"])]
        if user_column:  # one id for all of a canary's rows: the unit a user-level run protects
            canary["user"] = f"audit-canary-{canary['index']}"
            for row in canary["rows"]:
                row[user_column] = canary["user"]
        if any(row_hash(row) in real_hashes for row in canary["rows"]):
            raise AuditError(f"canary {canary['question']!r} collides with a real row")
    return canaries


def card_of(canary: dict, instruction: str, copy: int = 0, secret: str | None = None) -> dict:
    question = canary["question"] if copy == 0 else f"{canary['question']} (note {copy})"
    return {"instruction": instruction, "input": question, "output": secret or canary["secret"]}


# -----------------------------------------------------------------------------
# the statistics


def audit_p_value(epsilon: float, delta: float, m: int, r: int, v: int) -> float:
    """Upper bound on P[>= v of r guesses correct] for an (epsilon, delta)-DP run with m canaries."""
    from scipy.stats import binom

    p = 1.0 / (1.0 + math.exp(-epsilon))  # the best any guess can do under epsilon-DP
    tail = binom.sf(v - 1, r, p)
    if delta == 0 or v == 0:
        return min(1.0, tail)
    just_below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, p))  # [i - 1] = P[v - i <= Bin(r, p) < v]
    return min(1.0, tail + 2 * m * delta * float(np.max(just_below / np.arange(1, v + 1))))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, level: float) -> float:
    """Largest epsilon whose p-value is still below `level` (0 if even epsilon = 0 is not rejected)."""
    if audit_p_value(0.0, delta, m, r, v) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while audit_p_value(high, delta, m, r, v) < level:
        low, high = high, 2 * high
        if high > 1e3:
            return low
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if audit_p_value(middle, delta, m, r, v) < level else (low, middle)
    return low


def one_run_bound(scores, included, delta: float, confidence: float, fractions) -> dict:
    """The best Bonferroni-corrected lower bound over the guess counts, with each count's details."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    order = np.argsort(scores, kind="stable")  # lowest score first: most likely trained on
    counts = guess_counts(m, fractions)
    level = (1 - confidence) / len(counts)
    tries = []
    for r in counts:
        k = r // 2
        correct = int(included[order[:k]].sum() + (~included[order[m - k :]]).sum())
        tries.append(
            {
                "guesses": r,
                "correct": correct,
                "epsilon_lower_bound": epsilon_lower_bound(m, r, correct, delta, level),
            }
        )
    best = max(tries, key=lambda t: t["epsilon_lower_bound"])
    return {
        "epsilon_lower_bound": best["epsilon_lower_bound"],
        "confidence": confidence,
        "delta": delta,
        "m": m,
        "level_per_test": level,
        "best": best,
        "tries": tries,
    }


def roc_summary(scores, included) -> dict:
    """AUC and TPR at low FPR of the attack "lower score means member"."""
    from scipy.stats import rankdata

    member_likeness = -np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    n_in, n_out = int(included.sum()), int((~included).sum())
    if not n_in or not n_out:
        return {"auc": float("nan"), **{f"tpr_at_fpr_{x:g}": float("nan") for x in FPR_LEVELS}}
    ranks = rankdata(member_likeness)
    auc = (ranks[included].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out)  # Mann-Whitney U / (n_in n_out)
    thresholds = np.unique(member_likeness)[::-1]
    tpr = np.array([(member_likeness[included] >= t).mean() for t in thresholds])
    fpr = np.array([(member_likeness[~included] >= t).mean() for t in thresholds])
    summary = {"auc": float(auc)}
    for x in FPR_LEVELS:
        within = tpr[fpr <= x]
        summary[f"tpr_at_fpr_{x:g}"] = float(within.max()) if len(within) else 0.0
    return summary


def exposure(secret_loss: float, alternative_losses) -> float:
    """-log2((c + 1) / (A + 1)), c = alternatives at least as likely (loss <= the secret's)."""
    alternative_losses = np.asarray(alternative_losses, dtype=float)
    c = int((alternative_losses <= secret_loss).sum())
    return float(-math.log2((c + 1) / (len(alternative_losses) + 1)))


# -----------------------------------------------------------------------------
# scoring


def score_canaries(run_dir: Path, train, canaries: list[dict], a: AuditArguments, instruction: str) -> dict:
    """Fine-tuned and base losses of every canary's secret, and the fine-tuned losses of the alternatives."""
    from utils.run_loading import load_for_inference

    model, tokenizer, _ = load_for_inference(
        str(run_dir), train.model.model, load_in_4bit=train.model.load_in_4bit
    )
    cards = [row for c in canaries for row in c["rows"]]
    finetuned = per_canary(canaries, training.cards_answer_nll(model, tokenizer, cards, a.score_batch_size))
    with model.disable_adapter():
        base = per_canary(canaries, training.cards_answer_nll(model, tokenizer, cards, a.score_batch_size))
    rng = random.Random(f"alternatives:{a.seed}")
    alternatives = [random_secret(rng, a.secret_length) for _ in range(a.exposure_alternatives)]
    alternative_losses = []
    for canary in canaries:
        alt_cards = [card_of(canary, instruction, secret=s) for s in alternatives if s != canary["secret"]]
        alternative_losses.append(training.cards_answer_nll(model, tokenizer, alt_cards, a.score_batch_size))
    return {"finetuned": finetuned, "base": base, "alternatives": alternative_losses}


def per_canary(canaries: list[dict], row_losses: list[float]) -> list[list[float]]:
    """Row losses (in the order of the canaries' rows) regrouped as one list per canary."""
    grouped, start = [], 0
    for canary in canaries:
        grouped.append(row_losses[start : start + len(canary["rows"])])
        start += len(canary["rows"])
    return grouped


# -----------------------------------------------------------------------------


def check_canary_lengths(canaries: list[dict], train) -> None:
    """A canary longer than --max_seq_length would be skipped by training, silently breaking the coin flips."""
    from utils.model_loading import load_tokenizer

    tokenizer = load_tokenizer(train.model.model)
    limit = train.data.max_seq_length
    longest = max(
        len(encode_example(tokenizer, r["input"], r["output"], r["instruction"])["input_ids"])
        for c in canaries
        for r in c["rows"]
    )
    if longest > limit:
        raise cli.ArgumentErrors(
            [
                f"canaries are up to {longest} tokens but --max_seq_length is {limit}; raise it or lower "
                "--secret_length"
            ]
        )


def write_canaries(path: Path, canaries: list[dict]) -> None:
    path.write_text(
        "".join(json.dumps({k: v for k, v in c.items() if k != "rows"}) + "\n" for c in canaries),
        encoding="utf-8",
    )


def write_audit_data(out: Path, a, t) -> tuple[list[dict], list[dict], str, Path]:
    """(real rows, canaries, instruction, data file): real rows plus each inserted canary's rows."""
    column = t.privacy.user_column
    cards, _ = clean_rows(read_rows(t.data.dataset), user_column=column)
    if a.num_real_rows > 0:
        cards = cards[: a.num_real_rows]
    instruction = cards[0]["instruction"] if cards else DEFAULT_INSTRUCTION
    if column and any(c[column].startswith("audit-canary-") for c in cards):
        raise AuditError(f"the data's {column} already uses the canary ids audit-canary-*")
    canaries = make_canaries(
        a, instruction, {row_hash(c) for c in cards}, {c["input"] for c in cards}, user_column=column
    )
    check_canary_lengths(canaries, t)
    data_path = out / "audit_data.jsonl"
    rows = cards + [row for c in canaries if c["included"] for row in c["rows"]]
    data_path.write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
    )
    write_canaries(out / "canaries.jsonl", canaries)
    return cards, canaries, instruction, data_path


def comparable_guarantee(report: dict, rows_per_canary: int, delta_flag: float | None) -> dict:
    """The (epsilon, delta) the run claims for one audit canary, which the lower bound is tested against.

    A canary is one row, or at user level one user of k rows: the report's guarantee. An example-level
    run claims only group privacy for a canary of k > 1 rows: (k eps, k e^((k-1) eps) delta). Without DP
    there is no claim; the bound still needs a delta (--delta, else 1e-5).
    """
    from utils.privacy import group_privacy

    if not report["dp_enabled"]:
        return {"epsilon": None, "delta": delta_flag or 1e-5, "unit": None, "claim": "none (--disable_dp)"}
    epsilon, delta, unit = report["epsilon"], report["delta"], report["unit"]
    if rows_per_canary > 1 and not report.get("user_column"):  # the report names a column only at user level
        epsilon, delta = group_privacy(epsilon, delta, rows_per_canary)
        claim = f"group privacy of the example-level guarantee for {rows_per_canary} rows"
    else:
        claim = "the reported guarantee"
    return {"epsilon": epsilon, "delta": delta, "unit": unit, "claim": claim}


def audit_result(
    report: dict, canaries: list[dict], bound: dict, comparable: dict, a, run_dir: Path, forced: dict
) -> dict:
    audit = [c for c in canaries if c["kind"] == "audit"]
    scores, included = [c["score"] for c in audit], [c["included"] for c in audit]
    reported, delta = comparable["epsilon"], comparable["delta"]

    def mean_exposure(group):
        return float(np.mean([c["exposure"] for c in group])) if group else None

    return {
        "epsilon_lower_bound": bound["epsilon_lower_bound"],
        "reported_epsilon": report["epsilon"] if report["dp_enabled"] else None,
        "compared_epsilon": reported,
        "compared_claim": comparable["claim"],
        "unit": comparable["unit"],
        "delta": delta,
        "threat_model": report.get("threat_model"),
        "dp_enabled": report["dp_enabled"],
        "training_processes": report.get("world_size"),
        "lower_bound_exceeds_reported": reported is not None and bound["epsilon_lower_bound"] > reported,
        "confidence": a.confidence,
        "attack": roc_summary(scores, included),
        "one_run_audit": bound,
        "exposure": {
            "secret_space_bits": a.secret_length * math.log2(10),
            "measurable_bits": math.log2(a.exposure_alternatives + 1),
            "alternatives": a.exposure_alternatives,
            "repeated": [
                {"index": c["index"], "copies": c["copies"], "exposure": c["exposure"]}
                for c in canaries
                if c["kind"] == "repeated"
            ],
            "mean_included_once": mean_exposure([c for c in audit if c["included"]]),
            "mean_not_included": mean_exposure([c for c in audit if not c["included"]]),
        },
        "canaries": {
            "audit": len(audit),
            "inserted": int(sum(included)),
            "repeated": sum(c["kind"] == "repeated" for c in canaries),
            "canary_repeats": a.canary_repeats,
            "rows_per_canary": a.canary_rows_per_user,
            "secret_length": a.secret_length,
        },
        "training": {
            "run_dir": str(run_dir),
            "n_train": report["n_train"],
            "steps": report["steps_taken"],
            "noise_multiplier": report["noise_multiplier"],
            "sample_rate": report["sample_rate"],
            "forced_arguments": forced,
        },
    }


def main(args) -> dict:
    validate_args(args)
    a, t = args.audit, args.train
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cards, canaries, instruction, data_path = write_audit_data(out, a, t)

    run_dir = out / "train"
    forced = {
        "dataset": str(data_path),
        "validation_fraction": "0",
        "test_fraction": "0",
        "train_sample_fraction": "1",
        "output_dir": str(run_dir),
        "overwrite_output_dir": "true",
    }
    print(
        f"Audit: {a.num_canaries} canaries ({sum(c['included'] for c in canaries if c['kind'] == 'audit')} inserted)"
        + (f" + {a.num_repeated_canaries} repeated x{a.canary_repeats}" if a.canary_repeats else "")
        + f", {len(cards)} real rows -> {data_path}; training in {run_dir}",
        flush=True,
    )
    train_argv = args.train_argv + [x for key, value in forced.items() for x in (f"--{key}", value)]
    train_in_subprocess(launch_command(a) + train_argv)
    run = RunDir(run_dir)
    report, trained = read_json(run.public_report), read_json(run.data_summary_file)
    n_rows = len(cards) + sum(c["copies"] for c in canaries if c["included"])
    # every row is a training row (no held-out split), so the inclusion the bound assumes is the one that happened
    if trained["n_train"] != n_rows:
        raise AuditError(
            f"training kept {trained['n_train']} of the {n_rows} audit rows; every inserted canary must be trained on"
        )

    scored = score_canaries(run_dir, t, canaries, a, instruction)
    for canary, ft, base, alts in zip(canaries, scored["finetuned"], scored["base"], scored["alternatives"]):
        # a canary user's score is the mean over its rows; exposure is of its first row's secret
        score = float(np.mean(np.subtract(ft, base)))
        canary.update(loss_finetuned=ft[0], loss_base=base[0], score=score, exposure=exposure(ft[0], alts))
    audit = [c for c in canaries if c["kind"] == "audit"]
    comparable = comparable_guarantee(report, a.canary_rows_per_user, t.privacy.delta)
    delta = comparable["delta"]
    bound = one_run_bound(
        [c["score"] for c in audit], [c["included"] for c in audit], delta, a.confidence, a.guess_fractions
    )
    result = audit_result(report, canaries, bound, comparable, a, run_dir, forced)
    write_json_atomic(out / "audit_report.json", result)
    write_canaries(out / "canaries.jsonl", canaries)
    print(summary_text(result))
    return result


def summary_text(result: dict) -> str:
    attack, bound, exp = result["attack"], result["one_run_audit"], result["exposure"]
    reported = (
        f"<= {format_epsilon(result['reported_epsilon'])} ({result['threat_model']})"
        if result["reported_epsilon"] is not None
        else "none (--disable_dp)"
    )
    lines = [
        "***** Privacy audit (one run, Steinke et al. 2023) *****",
        f"  epsilon lower bound = {result['epsilon_lower_bound']:.3f} at {100 * result['confidence']:g}% "
        f"confidence, delta = {format_delta(result['delta'])}"
        f" ({bound['best']['correct']}/{bound['best']['guesses']} guesses correct, m = {bound['m']})",
        f"  reported epsilon    = {reported}" + (f", unit {result['unit']}" if result["unit"] else ""),
        f"  attack AUC = {attack['auc']:.3f}; TPR at 1% FPR = {attack['tpr_at_fpr_0.01']:.3f}; TPR at 10% "
        f"FPR = {attack['tpr_at_fpr_0.1']:.3f}",
        f"  exposure (bits, max measurable {exp['measurable_bits']:.1f} of {exp['secret_space_bits']:.1f}): "
        f"inserted once {exp['mean_included_once']:.2f}, never inserted {exp['mean_not_included']:.2f}"
        + "".join(f"; repeated x{r['copies']} #{r['index']}: {r['exposure']:.2f}" for r in exp["repeated"]),
    ]
    if result["compared_epsilon"] is not None and result["compared_epsilon"] != result["reported_epsilon"]:
        lines.append(
            f"  compared against    = {format_epsilon(result['compared_epsilon'])} at delta "
            f"{format_delta(result['delta'])}: {result['compared_claim']} (canaries of "
            f"{result['canaries']['rows_per_canary']} rows)"
        )
    if result["lower_bound_exceeds_reported"]:
        lines.append(
            "  WARNING: the lower bound exceeds the reported epsilon: the privacy guarantee does not hold for this run"
        )
    else:
        lines.append(
            "  A lower bound for this attack on this run, not a measure of how tight the reported epsilon is."
        )
    return "\n".join(lines)


def launch_command(a: AuditArguments) -> list[str]:
    """The command that runs train_dp_lora.py: python, or accelerate launch on --num_processes processes."""
    if a.num_processes == 1:
        return [sys.executable, str(TRAIN_SCRIPT)]
    import socket

    with socket.socket() as probe:  # a free port for the processes' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", a.accelerate_config]
    command += ["--num_processes", str(a.num_processes), "--main_process_port", str(port)]
    command += ["--mixed_precision", a.mixed_precision] if a.mixed_precision else []
    return command + [str(TRAIN_SCRIPT)]


def train_in_subprocess(command: list[str]) -> None:
    """Run the training command in its own process(es) (the command line wins over any --config)."""
    import subprocess

    completed = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.splitlines() if line.strip()]
        first_error = next(
            (line for line in lines if line.startswith("error:")), lines[-1] if lines else "no output"
        )
        raise AuditError(f"training failed (exit {completed.returncode}): {first_error}")


def cli_main(argv=None) -> int:
    return cli.run_main(main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli_main())
