"""Score DP-LoRA adapters (and the base model) on held-out flashcards; draw the privacy-utility curve.

Contract
- Data: by default the held-out --split (test; or validation) of the first adapter's run, recomputed
  from the dataset its private run record names and the bundle's public split spec (a keyed hash of
  each row's content, utils/data.py). With --dataset SRC (a flashcard file, `bundled` or a hub id)
  every cleaned row of SRC is evaluated, or, with --split test|validation, that split of SRC: a
  release bundle shared alone plus its data file is enough. --max_samples K keeps the first K rows.
- No training rows, ever: every evaluated row is assigned by the split spec of EVERY evaluated run,
  and a single row in a run's training split stops the script with an error. No per-row hash is
  stored or needed. There is no switch to turn this off: a score on rows a model was trained on
  measures memorisation, and it would print next to an epsilon as if it were held-out quality.
- Models: each --adapters (OUT/adapter, OUT, or a checkpoint dir) is loaded exactly as
  infer.py loads it (utils.run_loading.load_for_inference) and answers with the training prompt,
  greedily, in batches (utils.decoding.generate_answers). The base model the runs were trained on
  is scored too (--no_base skips it; all runs must share one base model).
- Metrics per model (fractions in [0, 1], see utils/metrics.py): exact match and token F1 after
  SQuAD normalisation, ROUGE-L F-measure (rouge_score, no stemming), computed through the project's
  offline `evaluate` module metrics/qa_metrics; NLL = mean over rows of each reference answer's mean
  token negative log-likelihood (EOS included) under teacher forcing, the quantity training logs as
  eval/loss; perplexity = exp(NLL).
- Privacy columns: epsilon is the spent epsilon of the run's privacy_report.json (the accountant's
  upper bound at its delta); `inf` marks a --disable_dp run; `*` marks a checkpoint selected on
  private data, which that epsilon does not cover. The base model never saw the flashcards.
- Baseline: the question itself as the answer ("question_echo") is scored too, so the table shows the
  floor that overlap metrics give for free; content F1/recall count only reference tokens that are not
  in the question, which echoing cannot earn.
- Outputs in --output_dir (default OUT/private_run_record/eval for one run, outputs/eval otherwise):
  eval_results.json, predictions.jsonl (model, question, reference, prediction, em, f1, rougeL,
  nll), with --curve privacy_utility.png, a table on the terminal, and the metrics, a summary table,
  a predictions table and the plot in W&B (offline without a key) or TensorBoard.
  predictions.jsonl and the W&B predictions table hold the evaluated rows' text: treat them like the
  dataset itself (an online W&B run uploads them).
- --curve: F1 and ROUGE-L against epsilon for the DP runs (log axis), the --disable_dp runs as a
  separate "non-private" point right of a broken axis, the base model as dashed lines. Needs at
  least one DP run among --adapters; runs should share a dataset and split (the refusal above
  enforces that no run trained on an evaluated row).

Run
    python evaluate_qa.py --adapters outputs/dp_lora/adapter
    python evaluate_qa.py --adapters outputs/eps1 outputs/eps3 outputs/eps8 outputs/nodp --curve \\
        --output_dir outputs/curve
    python evaluate_qa.py --adapters outputs/dp_lora --dataset my_heldout_cards.jsonl --max_samples 200 --report_to none
Exit status 2 with a one-line error for bad input (including an evaluation set that overlaps training rows).
"""

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils import cli, tracking, training
from utils.cli import UserError
from utils.data import BUNDLED_DATASET, SplitSpec, assign_split, clean_rows, read_rows
from utils.decoding import GenerationSettings, generate_answers, settings_problems
from utils.privacy_record import format_delta, format_epsilon
from utils.run_dir import RunDir, RunDirError, find_adapters, write_json_atomic
from utils.run_loading import load_for_inference

METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "qa_metrics"
RESULTS_FILE = "eval_results.json"
PREDICTIONS_FILE = "predictions.jsonl"
CURVE_FILE = "privacy_utility.png"
BASE_NAME = "base"
METRIC_NAMES = ("exact_match", "f1", "rougeL", "content_f1", "content_recall", "nll", "perplexity")
PREDICTION_FIELDS = (
    "question",
    "reference",
    "prediction",
    "em",
    "f1",
    "rougeL",
    "content_f1",
    "content_recall",
    "nll",
)
ECHO_NAME = "question_echo"  # the question itself as the answer: the floor overlap metrics give for free


class EvaluationError(UserError):
    """A one-line, user-facing reason the evaluation cannot run (e.g. overlap with training rows)."""


@dataclass
class ModelArguments:
    adapters: list[str] = field(
        default_factory=list,
        metadata={
            "help": "one or more adapter dirs (OUT/adapter, OUT, a bundle copied anywhere, or a checkpoint dir)"
        },
    )
    model: str | None = field(
        default=None, metadata={"help": "base model; default: the one the runs were trained on (args.json)"}
    )
    no_base: bool = field(default=False, metadata={"help": "do not score the base model"})
    load_in_4bit: bool = field(
        default=False, metadata={"help": "NF4 base (bitsandbytes), e.g. when training used --load_in_4bit"}
    )


@dataclass
class DataArguments:
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "evaluate this flashcard source instead of the run's split (file, 'bundled' or hub id)"
        },
    )
    split: str | None = field(
        default=None,
        metadata={
            "help": "the run's held-out split; default test, or all rows of --dataset",
            "choices": ["test", "validation", "all"],
        },
    )
    max_samples: int = field(default=0, metadata={"help": "evaluate only the first K rows (0 = all)"})
    batch_size: int = field(default=8, metadata={"help": "questions per generation / NLL batch"})
    nll_only: bool = field(
        default=False,
        metadata={
            "help": "score only the teacher-forced answer NLL, generate nothing (the overlap metrics show -)"
        },
    )


@dataclass
class OutputArguments:
    output_dir: str | None = field(
        default=None, metadata={"help": "default OUT/private_run_record/eval (one run) or outputs/eval"}
    )
    curve: bool = field(
        default=False, metadata={"help": f"draw {CURVE_FILE}: F1 and ROUGE-L against epsilon"}
    )
    report_to: str = field(
        default="wandb", metadata={"help": "experiment tracker", "choices": ["wandb", "tensorboard", "none"]}
    )
    project_name: str = field(default="vaultgemma-dp-lora", metadata={"help": "tracker project"})


GROUPS = {
    "model": ModelArguments,
    "data": DataArguments,
    "generation": GenerationSettings,
    "output": OutputArguments,
}


def parse_args(argv=None):
    parser = cli.build_parser(__doc__.split("\n\n")[0], GROUPS)
    return cli.parse_into(parser, GROUPS, argv)


def validate_args(args) -> None:
    m, d, o = args.model, args.data, args.output
    problems = settings_problems(args.generation)
    if not m.adapters:
        problems.append("--adapters: give at least one adapter directory")
    if d.split == "all" and not d.dataset:
        problems.append(
            "--split all needs --dataset (a run's own data has train rows; use test or validation)"
        )
    if d.max_samples < 0:
        problems.append(f"--max_samples must be >= 0, got {d.max_samples}")
    if d.batch_size < 1:
        problems.append(f"--batch_size must be >= 1, got {d.batch_size}")
    if o.curve and m.adapters and len(m.adapters) < 2:
        problems.append(
            "--curve needs several --adapters (e.g. runs at epsilon 1, 3, 8 and a --disable_dp run)"
        )
    if o.curve and d.nll_only:
        problems.append("--curve plots F1 and ROUGE-L, which --nll_only does not compute")
    if problems:
        raise cli.ArgumentErrors(problems)


# -----------------------------------------------------------------------------
# runs and data


def describe_run(adapters: str) -> dict:
    """What evaluation needs to know about one adapter: its public report, split spec and a display name."""
    try:
        found = find_adapters(adapters)
    except RunDirError as error:
        raise EvaluationError(str(error)) from None
    report = found.public_report
    if not report or not report.get("split"):
        raise EvaluationError(
            f"{found.adapter_dir}: no privacy_report.json with a split spec, so its training rows are "
            "unknown; evaluate a release bundle written by train_dp_lora.py"
        )
    spec = SplitSpec.from_json(report["split"])
    step_dir = found.adapter_dir.parent
    if found.run_dir is not None:
        name = found.run_dir.name + (f"@{step_dir.name}" if step_dir != found.run_dir else "")
    else:
        name = step_dir.name if found.adapter_dir.name == "adapter" else found.adapter_dir.name
    args = found.args or {}
    dp = bool(report.get("dp_enabled", False))
    epsilon = report.get("epsilon")
    return {
        "name": name,
        "adapter_dir": str(found.adapter_dir),
        "run_dir": str(found.run_dir) if found.run_dir else None,
        "base_model": (args.get("model") or {}).get("model"),
        "spec": spec,
        "dataset": (args.get("data") or {}).get("dataset"),  # from the private record, when it is at hand
        "dp_enabled": dp,
        "epsilon": float(epsilon)
        if dp and isinstance(epsilon, (int, float))
        else (math.inf if not dp else None),
        "target_epsilon": report.get("target_epsilon"),
        "delta": report.get("delta") if dp else None,
        "accountant": report.get("accountant") if dp else None,
        "secure_mode": bool(report.get("secure_mode")),
        "steps": report.get("steps_taken"),
        "n_train": report.get("n_train"),
        "selected_on_private_data": bool(report.get("selected_on_private_data")),
    }


def unique_names(runs: list[dict]) -> None:
    seen = {BASE_NAME: 1}
    for run in runs:
        count = seen.get(run["name"], 0)
        seen[run["name"]] = count + 1
        if count:
            run["name"] = f"{run['name']}#{count + 1}"


def load_eval_cards(
    runs: list[dict], dataset: str | None, split: str | None, max_samples: int
) -> tuple[list[dict], dict]:
    """The evaluation rows and where they came from; refuses any row that a run trained on.

    The held-out split is recomputed from the data and the first run's public split spec: no
    per-row record of the training data is needed or stored.
    """
    split = split or ("all" if dataset else "test")
    first = runs[0]
    source_name = dataset or first["dataset"]
    if source_name is None:
        raise EvaluationError(
            f"{first['adapter_dir']} is a bundle without its private run record: pass --dataset "
            "with the data file it was trained on (its held-out rows are recomputed) or with other cards"
        )
    # a user-level run's split is by user id: the cards then carry its user column
    cards, _ = clean_rows(read_rows(source_name), user_column=first["spec"].user_column)
    if split == "all":
        source = {"dataset": source_name, "split": "all rows"}
    else:
        cards = [card for card in cards if assign_split(card, first["spec"]) == split]
        source = {"dataset": source_name, "split": f"held-out {split} split of {first['name']}"}
        if not cards:
            raise EvaluationError(
                f"the {split} split of {first['name']} is empty (trained with --{split}_fraction 0?); "
                "pass --dataset with held-out cards"
            )
    check_no_training_rows(cards, runs)
    if max_samples:
        cards = cards[:max_samples]
    if not cards:
        raise EvaluationError(f"{source['dataset']}: no rows to evaluate")
    return cards, dict(source, n=len(cards), checked_against_training_rows_of=[r["name"] for r in runs])


def check_no_training_rows(cards: list[dict], runs: list[dict]) -> None:
    """Raise EvaluationError if any card falls in the training split of any run (recomputed from its spec)."""
    overlaps = []
    for run in runs:
        shared = sum(assign_split(card, run["spec"]) == "train" for card in cards)
        if shared:
            overlaps.append(f"{shared} of {len(cards)} rows are training rows of {run['name']}")
    if overlaps:
        raise EvaluationError(
            "refusing to evaluate on training data: "
            + "; ".join(overlaps)
            + ". Evaluate on held-out rows only"
        )


# -----------------------------------------------------------------------------
# scoring (library functions; the tests call these directly)


def load_metric():
    """The project's offline `evaluate` module (metrics/qa_metrics)."""
    import evaluate

    return evaluate.load(str(METRIC_DIR), keep_in_memory=True)


OVERLAP_METRICS = ("exact_match", "f1", "rougeL", "content_f1", "content_recall")


def score_predictions(
    cards: list[dict], predictions: list[str] | None, nll: list[float] | None, metric
) -> tuple[dict, list[dict]]:
    """(summary metrics, per-card rows) of `predictions`; nll None (a baseline with no model) reports NaN,
    and predictions None (--nll_only: nothing generated) reports NaN overlap metrics."""
    from utils.metrics import content_f1, content_recall

    if predictions is None:  # nothing generated: every overlap metric is undefined, none computed
        per_example = {name: [math.nan] * len(cards) for name in OVERLAP_METRICS}
    else:
        scores = metric.compute(
            predictions=predictions, references=[c["output"] for c in cards], per_example=True
        )
        per_example = dict(scores["per_example"])
        per_example["content_f1"] = [
            content_f1(p, c["output"], c["input"]) for p, c in zip(predictions, cards)
        ]
        per_example["content_recall"] = [
            content_recall(p, c["output"], c["input"]) for p, c in zip(predictions, cards)
        ]
    nll = nll if nll is not None else [math.nan] * len(cards)
    summary = {name: sum(values) / len(values) for name, values in per_example.items()}
    summary["nll"] = sum(nll) / len(nll)
    summary["perplexity"] = math.exp(summary["nll"]) if summary["nll"] < 700 else math.inf
    rows = [
        {
            "question": c["input"],
            "reference": c["output"],
            "prediction": None if predictions is None else predictions[i],
            "em": per_example["exact_match"][i],
            "f1": per_example["f1"][i],
            "rougeL": per_example["rougeL"][i],
            "content_f1": per_example["content_f1"][i],
            "content_recall": per_example["content_recall"][i],
            "nll": nll[i],
        }
        for i, c in enumerate(cards)
    ]
    return summary, rows


def score_model(
    model,
    tokenizer,
    cards: list[dict],
    settings: GenerationSettings,
    batch_size: int = 8,
    metric=None,
    progress: bool = False,
    generate: bool = True,
) -> tuple[dict, list[dict]]:
    """(summary metrics, per-card rows) of one model on `cards`; generate False scores the NLL alone."""
    predictions = None
    if generate:
        predictions = generate_answers(
            model,
            tokenizer,
            [c["input"] for c in cards],
            settings,
            batch_size=batch_size,
            instructions=[c["instruction"] for c in cards],
            progress=progress,
        )
    nll = training.cards_answer_nll(model, tokenizer, cards, batch_size, progress)
    return score_predictions(cards, predictions, nll, metric or load_metric())


# -----------------------------------------------------------------------------
# reporting


def _epsilon_text(entry: dict) -> str:
    if entry["kind"] in ("base", "baseline"):
        return "-"
    if not entry["dp_enabled"]:
        return "inf (no DP)"
    text = "<=" + format_epsilon(entry["epsilon"]) + ("" if entry.get("secure_mode") else " seeded")
    return text + ("*" if entry["selected_on_private_data"] else "")


def format_table(entries: list[dict]) -> str:
    header = [
        "model",
        "epsilon",
        "delta",
        "EM",
        "F1",
        "ROUGE-L",
        "content F1",
        "content recall",
        "NLL",
        "perplexity",
    ]
    lines = [
        [
            e["name"],
            _epsilon_text(e),
            format_delta(e["delta"]) if e.get("delta") else "-",
            *(f"{e['metrics'][k]:.4f}" if math.isfinite(e["metrics"][k]) else "-" for k in METRIC_NAMES),
        ]
        for e in entries
    ]
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    render = lambda row: "  ".join(
        str(cell).ljust(w) if i == 0 else str(cell).rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
    )  # noqa: E731
    out = [render(header), "  ".join("-" * w for w in widths), *map(render, lines)]
    if any(e.get("selected_on_private_data") for e in entries):
        out.append("* checkpoint selected on private data: its epsilon does not cover that selection")
    if any(e["kind"] == "adapter" and e["dp_enabled"] and not e.get("secure_mode") for e in entries):
        out.append("seeded: the guarantee holds only against someone who does not know the seed")
    out.append(
        f"{ECHO_NAME}: the question itself as the answer, the score overlap metrics give for free; "
        "content F1/recall count only reference tokens that are not in the question"
    )
    return "\n".join(out)


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _label(source: str) -> str:
    """A model or dataset name short enough for a title: a local path becomes its last component."""
    if source == BUNDLED_DATASET:
        return "the bundled medical flashcards"
    return Path(source).name if os.path.exists(source) else source


def seed_groups(entries: list[dict]) -> list[dict]:
    """Entries of one kind grouped by target epsilon (runs that differ only by seed): epsilon spent (the
    largest, an upper bound for each), per-metric mean and standard deviation, and the run count."""
    import statistics

    by_target = {}
    for entry in entries:
        by_target.setdefault(entry.get("target_epsilon"), []).append(entry)
    groups = []
    for members in by_target.values():
        keys = [k for k in members[0]["metrics"] if all(math.isfinite(m["metrics"][k]) for m in members)]
        groups.append({
            "epsilon": max((m["epsilon"] for m in members), default=math.inf),
            "n": len(members),
            "mean": {k: statistics.fmean(m["metrics"][k] for m in members) for k in keys},
            "std": {k: statistics.stdev([m["metrics"][k] for m in members]) if len(members) > 1 else 0.0 for k in keys},
        })  # fmt: skip
    return sorted(groups, key=lambda g: g["epsilon"])


def plot_privacy_utility(
    entries: list[dict], path: str, *, model: str, dataset: str, split: str, n: int
) -> str:
    """PNG of F1 and ROUGE-L against epsilon; non-private runs right of a broken axis; base model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = sorted(
        (e for e in entries if e["kind"] == "adapter" and e["dp_enabled"]), key=lambda e: e["epsilon"]
    )
    public = [e for e in entries if e["kind"] == "adapter" and not e["dp_enabled"]]
    base = next((e for e in entries if e["kind"] == "base"), None)
    echo = next((e for e in entries if e["kind"] == "baseline"), None)
    if not private:
        raise EvaluationError("--curve needs at least one DP-trained run among --adapters")
    # value labels: F1 above its point, ROUGE-L below, so equal scores stay legible
    series = [("f1", "token F1", "tab:blue", "o", 7), ("rougeL", "ROUGE-L", "tab:orange", "s", -13)]
    fig = plt.figure(figsize=(9, 5.4))
    grid = fig.add_gridspec(1, 2, width_ratios=[5, 1] if public else [1, 0.0001], wspace=0.06)
    left = fig.add_subplot(grid[0])
    right = fig.add_subplot(grid[1], sharey=left)
    groups = seed_groups(private)  # runs at one target epsilon (e.g. several seeds) become one point
    epsilons = [g["epsilon"] for g in groups]
    for key, label, color, marker, offset in series:
        means, spreads = [g["mean"][key] for g in groups], [g["std"][key] for g in groups]
        left.errorbar(
            epsilons, means, yerr=spreads, marker=marker, color=color, capsize=3,
            label=f"{label}, DP fine-tuned" + (" (mean +- std over seeds)" if any(g["n"] > 1 for g in groups) else ""),
        )  # fmt: skip
        for g in groups:
            left.annotate(
                f"{g['mean'][key]:.3f}",
                (g["epsilon"], g["mean"][key]),
                textcoords="offset points",
                xytext=(0, offset),
                ha="center",
                fontsize=8,
                color=color,
            )
        if public:
            public_group = seed_groups(public)[0]
            values, spread = [public_group["mean"][key]], [public_group["std"][key]]
            right.errorbar(
                [0],
                values,
                yerr=spread,
                capsize=3,
                linestyle="none",
                marker=marker,
                markersize=9,
                markerfacecolor="white",
                markeredgewidth=2,
                color=color,
                label=f"{label}, non-private (--disable_dp)",
            )
            for value in values:
                right.annotate(
                    f"{value:.3f}",
                    (0, value),
                    textcoords="offset points",
                    xytext=(0, offset + (2 if offset > 0 else -2)),
                    ha="center",
                    fontsize=8,
                    color=color,
                )
        for reference, style, text in ((echo, ":", "question echoed as the answer"),
                                       (base, "--", "base model (no fine-tuning)")):  # fmt: skip
            if reference is None:
                continue
            for axis in (left, right):
                axis.axhline(reference["metrics"][key], color=color, linestyle=style, linewidth=1,
                             label=f"{label}, {text}" if axis is left else None)  # fmt: skip
    left.set_xscale("log")
    left.set_xticks(epsilons)
    left.set_xticklabels([format_epsilon(x) for x in epsilons])
    left.minorticks_off()
    left.set_xlim(min(epsilons) / 1.6, max(epsilons) * 1.6)
    left.set_xlabel("privacy budget ε spent (log scale; smaller = more private)")
    left.set_ylabel(f"score on {n} held-out flashcards (0–1, higher is better)")
    left.grid(True, alpha=0.3)
    top = max([e["metrics"][k] for e in entries for k in ("f1", "rougeL")] + [0.05])
    upper = min(1.0, top * 1.25 + 0.02)
    left.set_ylim(-0.08 * upper, upper)  # room for the labels below points at 0
    right.set_xlim(-1, 1)
    right.set_xticks([0] if public else [])
    right.set_xticklabels(["non-private\n(ε = ∞)"] if public else [])
    right.tick_params(axis="y", left=False, labelleft=False)
    right.grid(True, axis="y", alpha=0.3)
    if public:  # broken-axis marks: the non-private point is not at any finite epsilon
        left.spines["right"].set_visible(False)
        right.spines["left"].set_visible(False)
        kwargs = dict(
            marker=[(-1, -1.5), (1, 1.5)],
            markersize=10,
            linestyle="none",
            color="k",
            mec="k",
            mew=1,
            clip_on=False,
        )
        left.plot([1, 1], [0, 1], transform=left.transAxes, **kwargs)
        right.plot([0, 0], [0, 1], transform=right.transAxes, **kwargs)
    else:
        right.set_visible(False)
    deltas = sorted({e["delta"] for e in private if e.get("delta")})
    accountants = sorted({e["accountant"] for e in private if e.get("accountant")})
    delta_text = "δ = " + ", ".join(format_delta(d) for d in deltas) if deltas else "δ unknown"
    fig.suptitle(f"Privacy–utility trade-off: {_label(model)} + LoRA on {_label(dataset)}", fontsize=12)
    left.set_title(
        f"{split}, N = {n} flashcards; example-level DP, {delta_text}"
        + (f" ({', '.join(accountants)} accountant)" if accountants else "")
        + (
            "; seeded: holds only against someone who does not know the seed"
            if any(not e.get("secure_mode") for e in private)
            else ""
        )
        + "; greedy answers",
        fontsize=9,
        loc="left",
    )
    handles, labels = left.get_legend_handles_labels()
    more_handles, more_labels = right.get_legend_handles_labels()
    fig.legend(
        handles + more_handles, labels + more_labels, loc="lower center", ncol=3, fontsize=8, frameon=False
    )
    fig.subplots_adjust(bottom=0.24, top=0.86, left=0.09, right=0.97)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_to_tracker(
    accelerator, report_to: str, entries: list[dict], predictions: list[dict], curve_path: str | None
) -> None:
    metrics = {
        f"eval/{e['name']}/{k}": e["metrics"][k]
        for e in entries
        for k in METRIC_NAMES
        if math.isfinite(e["metrics"][k])
    }
    accelerator.log(metrics, step=0)
    if report_to != "wandb":
        return
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    summary = wandb.Table(
        columns=["model", "dp_enabled", "epsilon", "delta", *METRIC_NAMES],
        data=[
            [
                e["name"],
                e["dp_enabled"],
                _json_number(e.get("epsilon")),
                e.get("delta"),
                *(_json_number(e["metrics"][k]) for k in METRIC_NAMES),
            ]
            for e in entries
        ],
    )
    columns = ["model", *PREDICTION_FIELDS]
    table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in predictions])
    logged = {"eval/summary": summary, "eval/predictions": table}
    if curve_path:
        logged["eval/privacy_utility"] = wandb.Image(curve_path)
    run.log(logged, step=0)


# -----------------------------------------------------------------------------


def shared_base_model(runs: list[dict], model: str | None) -> str | None:
    """--model, else the one base model every run was trained on."""
    base_models = sorted({r["base_model"] for r in runs if r["base_model"]})
    if not model and len(base_models) > 1:
        raise EvaluationError(
            f"the adapters were trained on different base models ({', '.join(base_models)}); "
            "evaluate them separately"
        )
    return model or (base_models[0] if base_models else None)


def score_all(
    jobs: list[dict], cards: list[dict], base_model, args, accelerator
) -> tuple[list[dict], list[dict]]:
    """The question-echo baseline, then every model: (table entries, prediction rows)."""
    m, d, g = args.model, args.data, args.generation
    metric = load_metric()
    summary, rows = score_predictions(cards, [c["input"] for c in cards], None, metric)
    entries = [
        dict(name=ECHO_NAME, kind="baseline", dp_enabled=False, epsilon=None, delta=None, metrics=summary)
    ]
    predictions = [dict(model=ECHO_NAME, **row) for row in rows]
    for job in jobs:
        model, tokenizer, info = load_for_inference(
            job["adapters"], base_model, load_in_4bit=m.load_in_4bit, device=accelerator.device
        )
        accelerator.print(f"[{job['name']}] {info['privacy']}")
        summary, rows = score_model(
            model,
            tokenizer,
            cards,
            g,
            d.batch_size,
            metric,
            progress=accelerator.is_local_main_process,
            generate=not d.nll_only,
        )
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next model loads into the memory this one held
        keys = (
            "dp_enabled",
            "epsilon",
            "target_epsilon",
            "delta",
            "accountant",
            "steps",
            "n_train",
            "secure_mode",
            "selected_on_private_data",
        )
        flags = ("dp_enabled", "secure_mode", "selected_on_private_data")
        entries.append(
            dict(
                {k: job.get(k, False if k in flags else None) for k in keys},
                name=job["name"],
                kind=job["kind"],
                base_model=info["base_model"],
                adapter_dir=info["adapter_dir"],
                run_dir=info["run_dir"],
                metrics=summary,
            )
        )
        predictions.extend(dict(model=job["name"], **row) for row in rows)
    return entries, predictions


def write_results(output_dir: Path, entries, predictions, source: dict, args, curve_path) -> dict:
    results = {
        "data": source,
        "generation": dataclasses.asdict(args.generation),
        "metric_definitions": {
            "exact_match": "SQuAD-normalised exact match",
            "f1": "SQuAD-normalised token F1",
            "rougeL": "rouge_score ROUGE-L F-measure, no stemming",
            "content_f1": "token F1 over the reference tokens not in the question",
            "content_recall": "share of the reference's non-question tokens in the prediction",
            "nll": "mean over rows of the reference answer's mean token NLL (EOS included), teacher forcing",
            "perplexity": "exp(nll)",
        },
        "models": [
            dict(
                e,
                epsilon=_json_number(e["epsilon"]) if e.get("epsilon") is not None else None,
                metrics={k: _json_number(v) for k, v in e["metrics"].items()},
            )
            for e in entries
        ],
        "curve": curve_path,
    }
    write_json_atomic(output_dir / RESULTS_FILE, results)
    with open(output_dir / PREDICTIONS_FILE, "w", encoding="utf-8") as handle:
        for row in predictions:
            handle.write(json.dumps({k: _json_number(v) for k, v in row.items()}, ensure_ascii=False) + "\n")
    return results


def main(args):
    from accelerate import Accelerator

    validate_args(args)
    m, d, o = args.model, args.data, args.output
    runs = [describe_run(path) for path in m.adapters]
    unique_names(runs)
    base_model = shared_base_model(runs, m.model)
    if o.curve and not any(r["dp_enabled"] for r in runs):
        raise EvaluationError("--curve needs at least one DP-trained run among --adapters")
    cards, source = load_eval_cards(runs, d.dataset, d.split, d.max_samples)

    # the predictions hold the evaluated rows' text: by default they stay in the run's private record
    default_dir = (
        RunDir(runs[0]["run_dir"]).private / "eval"
        if len(runs) == 1 and runs[0]["run_dir"]
        else Path("outputs/eval")
    )
    output_dir = Path(o.output_dir or default_dir)
    wandb_mode = tracking.prepare_wandb_environment() if o.report_to == "wandb" else None
    accelerator = Accelerator(
        log_with=tracking.tracker_names(o.report_to) or None, project_dir=str(output_dir)
    )
    if accelerator.num_processes > 1:
        raise EvaluationError(
            "run evaluate_qa.py as one process (python evaluate_qa.py ...), not under a multi-process accelerate launch"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(
        o.project_name,
        config=tracking.flatten_config(cli.to_dict(args)),
        init_kwargs=tracking.tracker_init_kwargs(o.report_to, str(output_dir), job_type="eval"),
    )
    accelerator.print(
        f"Evaluating {len(runs) + (not m.no_base)} model(s) on {source['n']} flashcards ({source['split']}, "
        f"{source['dataset']}); no evaluated row is a training row of any run"
    )

    jobs = ([] if m.no_base else [{"name": BASE_NAME, "kind": "base", "adapters": None}]) + [
        dict(r, kind="adapter", adapters=r["adapter_dir"]) for r in runs
    ]
    entries, predictions = score_all(jobs, cards, base_model, args, accelerator)
    curve_path = (
        plot_privacy_utility(
            entries,
            str(output_dir / CURVE_FILE),
            model=base_model or entries[-1]["base_model"],
            dataset=source["dataset"],
            split=source["split"],
            n=source["n"],
        )
        if o.curve
        else None
    )
    results = write_results(output_dir, entries, predictions, source, args, curve_path)
    if o.report_to != "none":
        log_to_tracker(accelerator, o.report_to, entries, predictions, curve_path)
    run_dir = tracking.wandb_run_dir(accelerator) if o.report_to == "wandb" else None
    accelerator.end_training()
    accelerator.print("\n" + format_table(entries))
    accelerator.print(
        f"\n  results: {output_dir / RESULTS_FILE}; predictions: {output_dir / PREDICTIONS_FILE}"
        + (f"; curve: {curve_path}" if curve_path else "")
        + (
            f"\n  W&B offline run: {run_dir}; upload with `wandb sync {run_dir}`"
            if run_dir and wandb_mode == "offline"
            else ""
        )
    )
    return dict(results, output_dir=str(output_dir), wandb_run_dir=run_dir)


def cli_main(argv=None) -> int:
    return cli.run_main(main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli_main())
