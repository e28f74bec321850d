"""evaluate_qa.py and utils/metrics.py: exact metric values, agreement with rouge_score, the refusal to
score training rows, an end-to-end evaluation of tiny DP and non-DP runs (JSON, JSONL, PNG, W&B
offline run), and that fine-tuning measurably helps on cards a model has memorised."""

import glob
import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from rouge_score import rouge_scorer

import evaluate_qa
import train_dp_lora
from conftest import FP32_EPS, assert_close_scaled, build_tiny_vaultgemma, bundled_cards, write_cards
from utils import metrics, training
from utils.data import SplitSpec, assign_split, clean_rows
from utils.decoding import GenerationSettings
from utils.run_loading import load_for_inference
from utils.loss import per_example_loss_from_logits
from utils.prompt import encode_example

# (prediction, reference) pairs with punctuation, case, articles, digits, non-ASCII, repeats, empties
PAIRS = [
    ("the cat on the mat", "the cat sat on the mat"),
    (
        "Cardiac output = stroke volume x heart rate.",
        "Cardiac output equals stroke volume multiplied by heart rate.",
    ),
    ("Vitamin B12 (cobalamin) deficiency", "vitamin b12 deficiency causes megaloblastic anaemia"),
    ("β-blockers reduce heart rate", "Beta blockers reduce the heart rate"),
    ("a b a b a", "b a b"),
    ("", "an empty prediction"),
    ("Type 2 diabetes; insulin resistance", "insulin resistance in type 2 diabetes"),
]


# -----------------------------------------------------------------------------
# metric functions on hand-made cases


def test_normalize_answer_lowercases_strips_punctuation_and_articles_and_collapses_spaces():
    assert metrics.normalize_answer("  The Cat,  sat! on a   mat. ") == "cat sat on mat"
    assert metrics.normalize_answer("An apple") == "apple"
    assert (
        metrics.normalize_answer("theory and thematic") == "theory and thematic"
    )  # articles only as whole words


def test_exact_match_compares_normalised_text():
    assert metrics.exact_match("The cat.", "cat") == 1.0
    assert metrics.exact_match("cats", "cat") == 0.0
    assert metrics.exact_match("", "") == 1.0


def test_token_f1_exact_values():
    # exact rationals computed in fp64 (a few ulps); approx's rel 1e-6 separates them from any other count ratio
    assert metrics.token_f1("The Cat sat.", "a cat sat down") == pytest.approx(0.8)  # P 1, R 2/3
    assert metrics.token_f1("cat cat dog", "cat dog dog") == pytest.approx(
        2 / 3
    )  # bag overlap counts min(count)
    assert metrics.token_f1("dog", "cat") == 0.0
    assert metrics.token_f1("the", "") == 1.0  # both normalise to nothing
    assert metrics.token_f1("the", "cat") == 0.0


def test_rouge_l_exact_values():
    # exact rationals in fp64, as above
    assert metrics.rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(
        10 / 11
    )  # LCS 5: P 1, R 5/6
    assert metrics.rouge_l("A B C", "c b a") == pytest.approx(1 / 3)  # LCS 1 of 3 tokens each way
    assert metrics.rouge_l("", "cat") == 0.0
    assert metrics.rouge_l("same words", "Same, words!") == 1.0


def test_rouge_l_agrees_with_rouge_score_run_directly():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for prediction, reference in PAIRS:
        assert (
            metrics.rouge_l(prediction, reference) == scorer.score(reference, prediction)["rougeL"].fmeasure
        )


def test_evaluate_module_gives_the_means_and_per_example_values_of_the_functions():
    metric = evaluate_qa.load_metric()  # the local module, offline
    predictions, references = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    result = metric.compute(predictions=predictions, references=references, per_example=True)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert result["per_example"]["rougeL"] == [scorer.score(r, p)["rougeL"].fmeasure for p, r in PAIRS]
    assert result["per_example"]["f1"] == [metrics.token_f1(p, r) for p, r in PAIRS]
    assert result["per_example"]["exact_match"] == [metrics.exact_match(p, r) for p, r in PAIRS]
    for name in ("exact_match", "f1", "rougeL"):
        assert result[name] == pytest.approx(
            sum(result["per_example"][name]) / len(PAIRS)
        )  # fp64 mean of 7: <= 7 ulps
    assert set(metric.compute(predictions=["a"], references=["a"])) == {"exact_match", "f1", "rougeL"}


# -----------------------------------------------------------------------------
# answer NLL under teacher forcing


@pytest.mark.numerics
def test_answer_nll_is_the_same_in_any_batch_and_equals_the_full_logits_reference(tiny_model_dir):
    model, tokenizer, _ = load_for_inference(None, tiny_model_dir, device="cpu")
    assert tokenizer.padding_side == "left"  # the inference tokenizer; answer_nll must still pad right
    cards, _ = clean_rows(bundled_cards()[:5])
    batched = training.cards_answer_nll(model, tokenizer, cards, batch_size=5)
    one_by_one = training.cards_answer_nll(model, tokenizer, cards, batch_size=1)
    # fp32 model, NLL ~7.6 (log 2000): 64-term dot products per logit (<= 32 eps sum|h w| each), a 2000-term
    # logsumexp and other batch shapes: ~10 fp32 ulps of 7.6 at worst; budget 32 (2.9e-5; observed 0 batched vs alone,
    # 2.6 vs the full logits). Padding or batch averaging leaking into a row's NLL errs by >= 1e4 ulps.
    assert_close_scaled(
        torch.tensor(batched), torch.tensor(one_by_one), 32, eps=FP32_EPS, why="fp32 NLL, other batch shapes"
    )
    for card, value in zip(cards, one_by_one):
        example = encode_example(tokenizer, card["input"], card["output"], card["instruction"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits
        reference = per_example_loss_from_logits(logits, torch.tensor([example["labels"]]))
        assert_close_scaled(
            torch.tensor([value]), reference, 32, eps=FP32_EPS, why="fp32 NLL, answer-only vs full logits"
        )


# -----------------------------------------------------------------------------
# tiny training runs shared by the tests below


def _train(output_dir, model_dir, dataset, *extra):
    train_dp_lora.main(
        train_dp_lora.parse_args(
            [
                "--model",
                str(model_dir),
                "--dataset",
                str(dataset),
                "--report_to",
                "none",
                "--output_dir",
                str(output_dir),
                "--save_steps",
                "0",
                "--eval_steps",
                "0",
                *extra,
            ]
        )
    )
    return Path(output_dir)


@pytest.fixture(scope="module")
def curve_runs(tmp_path_factory, tiny_model_dir):
    """Two DP runs (epsilon 2 and 8) and a --disable_dp run on 60 cards with the same seed, hence the same split."""
    root = tmp_path_factory.mktemp("curve_runs")
    cards_file = write_cards(root / "cards.jsonl", bundled_cards()[:60])
    common = [
        "--max_steps",
        "2",
        "--logical_batch_size",
        "8",
        "--per_device_train_batch_size",
        "8",
        "--validation_fraction",
        "0.05",
        "--test_fraction",
        "0.15",
        "--accountant",
        "rdp",
    ]  # rdp: calibrates ~3x faster than prv
    return {
        "eps2": _train(root / "eps2", tiny_model_dir, cards_file, "--epsilon", "2", *common),
        "eps8": _train(root / "eps8", tiny_model_dir, cards_file, "--epsilon", "8", *common),
        "nodp": _train(root / "nodp", tiny_model_dir, cards_file, "--disable_dp", *common),
        "cards_file": cards_file,
    }


def _read_wandb_records(run_dir):
    """History and summary items of an offline W&B run, parsed from its run-*.wandb transaction log
    (a LevelDB-style log: 7-byte file header, 32 KiB blocks, records of crc32/len/type + protobuf)."""
    from wandb.proto import wandb_internal_pb2

    raw = Path(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0]).read_bytes()
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(raw):
        if block - position % block < 7:  # block trailer too short for a header: padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        if length == 0 and kind == 0:
            break
        pending += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            history.update(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return history


@pytest.fixture(scope="module")
def evaluated(curve_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    argv = [
        "--adapters",
        str(curve_runs["eps2"] / "adapter"),
        str(curve_runs["eps8"]),
        str(curve_runs["nodp"]),
        "--curve",
        "--max_new_tokens",
        "8",
        "--batch_size",
        "4",
        "--output_dir",
        str(out / "eval"),
        "--report_to",
        "wandb",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        results = evaluate_qa.main(evaluate_qa.parse_args(argv))
    return results, Path(results["output_dir"])


# -----------------------------------------------------------------------------
# refusing training rows


def test_check_no_training_rows_names_the_run_and_the_count():
    cards, _ = clean_rows(bundled_cards()[:40])
    spec = SplitSpec(seed=0, validation_fraction=0.2, test_fraction=0.3)
    run = {"name": "run_a", "spec": spec}
    held_out = [c for c in cards if assign_split(c, spec) != "train"]
    n_train = len(cards) - len(held_out)
    assert held_out and n_train  # the check below is not vacuous either way
    evaluate_qa.check_no_training_rows(held_out, [run])
    with pytest.raises(
        evaluate_qa.EvaluationError, match=rf"{n_train} of {len(cards)} rows are training rows of run_a"
    ):
        evaluate_qa.check_no_training_rows(cards, [run])


def test_cli_refuses_a_dataset_that_contains_training_rows(curve_runs, capsys):
    code = evaluate_qa.cli_main(
        ["--adapters", str(curve_runs["eps2"]), "--dataset", curve_runs["cards_file"], "--report_to", "none"]
    )
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: refusing to evaluate on training data:") and "\n" not in error


def test_a_bundle_alone_plus_the_data_file_evaluates_its_test_rows_and_refuses_its_training_rows(
    curve_runs, tmp_path, capsys
):
    shared = tmp_path / "shared_bundle"
    shutil.copytree(
        curve_runs["eps2"] / "adapter", shared
    )  # no private run record: no split record, no hashes
    assert "private_run_record" not in {p.name for p in tmp_path.iterdir()}
    out = tmp_path / "eval"
    code = evaluate_qa.cli_main(
        [
            "--adapters",
            str(shared),
            "--dataset",
            curve_runs["cards_file"],
            "--split",
            "test",
            "--no_base",
            "--max_new_tokens",
            "2",
            "--output_dir",
            str(out),
            "--report_to",
            "none",
        ]
    )
    assert code == 0, capsys.readouterr().err
    cards, _ = clean_rows(bundled_cards()[:60])
    spec = SplitSpec.from_json(json.loads((shared / "privacy_report.json").read_text())["split"])
    assert (
        json.loads((out / evaluate_qa.RESULTS_FILE).read_text())["data"]["n"]
        == sum(assign_split(c, spec) == "test" for c in cards)
        > 0
    )
    code = evaluate_qa.cli_main(
        ["--adapters", str(shared), "--dataset", curve_runs["cards_file"], "--report_to", "none"]
    )
    assert code == 2 and "rows are training rows of shared_bundle" in capsys.readouterr().err


def test_a_bundle_alone_without_a_dataset_says_which_flag_to_pass(curve_runs, tmp_path, capsys):
    shared = tmp_path / "shared_bundle"
    shutil.copytree(curve_runs["eps2"] / "adapter", shared)
    assert evaluate_qa.cli_main(["--adapters", str(shared), "--report_to", "none"]) == 2
    error = capsys.readouterr().err
    assert "pass --dataset" in error and len(error.strip().splitlines()) == 1


def test_cli_reports_every_bad_argument_at_once(capsys):
    assert evaluate_qa.cli_main(["--split", "all", "--max_samples", "-1", "--batch_size", "0"]) == 2
    error = capsys.readouterr().err
    for expected in ("--adapters", "--split all needs --dataset", "--max_samples", "--batch_size"):
        assert expected in error


def test_curve_needs_a_dp_run(curve_runs, capsys):
    argv = [
        "--adapters",
        str(curve_runs["nodp"]),
        str(curve_runs["nodp"] / "adapter"),
        "--curve",
        "--report_to",
        "none",
    ]
    assert evaluate_qa.cli_main(argv) == 2
    assert "at least one DP-trained run" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# end to end


def test_results_json_lists_every_model_with_its_privacy_and_consistent_metrics(evaluated, curve_runs):
    results, out = evaluated
    saved = json.loads((out / evaluate_qa.RESULTS_FILE).read_text())
    cards, _ = clean_rows(bundled_cards()[:60])
    spec = SplitSpec.from_json(
        json.loads((curve_runs["eps2"] / "adapter" / "privacy_report.json").read_text())["split"]
    )
    n_test = sum(assign_split(c, spec) == "test" for c in cards)
    assert saved["data"]["n"] == n_test > 0
    assert saved["data"]["split"] == "held-out test split of eps2"
    assert [m["name"] for m in saved["models"]] == ["question_echo", "base", "eps2", "eps8", "nodp"]
    by_name = {m["name"]: m for m in saved["models"]}
    for name in ("eps2", "eps8"):
        report = json.loads((curve_runs[name] / "adapter" / "privacy_report.json").read_text())
        assert by_name[name]["dp_enabled"] is True
        assert by_name[name]["epsilon"] == report["epsilon"] <= report["target_epsilon"]
        assert by_name[name]["delta"] == report["delta"]
    assert by_name["nodp"]["dp_enabled"] is False and by_name["nodp"]["epsilon"] is None
    assert by_name["base"]["kind"] == "base" and by_name["base"]["adapter_dir"] is None
    echo = by_name["question_echo"]
    assert echo["kind"] == "baseline" and echo["metrics"]["nll"] is None  # no model: no likelihood
    # echoing the question adds no token beyond the question: no content credit, whatever F1 and ROUGE-L say
    assert echo["metrics"]["content_f1"] == echo["metrics"]["content_recall"] == 0.0
    for model in saved["models"]:
        assert set(model["metrics"]) == set(evaluate_qa.METRIC_NAMES)
        if model["kind"] != "baseline":
            assert model["metrics"]["perplexity"] == pytest.approx(
                math.exp(model["metrics"]["nll"])
            )  # one fp64 exp: ~1 ulp
        assert 0 <= model["metrics"]["f1"] <= 1 and 0 <= model["metrics"]["rougeL"] <= 1
    assert saved["curve"] == str(out / evaluate_qa.CURVE_FILE)


def test_predictions_jsonl_holds_each_test_row_per_model_with_its_scores(evaluated, curve_runs):
    results, out = evaluated
    rows = [json.loads(line) for line in (out / evaluate_qa.PREDICTIONS_FILE).read_text().splitlines()]
    n_test = results["data"]["n"]
    assert len(rows) == 5 * n_test
    assert set(rows[0]) == {
        "model",
        "question",
        "reference",
        "prediction",
        "em",
        "f1",
        "rougeL",
        "content_f1",
        "content_recall",
        "nll",
    }
    assert all(r["prediction"] == r["question"] for r in rows if r["model"] == "question_echo")
    cards, _ = clean_rows(bundled_cards()[:60])
    spec = SplitSpec.from_json(
        json.loads((curve_runs["eps2"] / "adapter" / "privacy_report.json").read_text())["split"]
    )
    test_questions = [c["input"] for c in cards if assign_split(c, spec) == "test"]
    for model in results["models"]:
        mine = [r for r in rows if r["model"] == model["name"]]
        assert [r["question"] for r in mine] == test_questions
        for r in mine:
            assert r["f1"] == metrics.token_f1(r["prediction"], r["reference"])
            assert r["rougeL"] == metrics.rouge_l(r["prediction"], r["reference"])
            assert r["em"] == metrics.exact_match(r["prediction"], r["reference"])
        # fp64 means of the same per-row values in another order: <= n_test ulps, far inside approx's rel 1e-6
        assert sum(r["f1"] for r in mine) / n_test == pytest.approx(model["metrics"]["f1"])
        if model["kind"] != "baseline":
            assert sum(r["nll"] for r in mine) / n_test == pytest.approx(model["metrics"]["nll"])


def test_curve_png_is_written(evaluated):
    import matplotlib.image

    _, out = evaluated
    path = out / evaluate_qa.CURVE_FILE
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert (width, height) == (1080, 648)  # 9 x 5.4 inches at 120 dpi


def test_offline_wandb_run_holds_the_metrics_and_the_predictions_table(evaluated):
    results, out = evaluated
    run_dir = results["wandb_run_dir"]
    assert run_dir and Path(run_dir).is_relative_to(out) and Path(run_dir).name.startswith("offline-run-")
    history = _read_wandb_records(run_dir)
    for model in results["models"]:
        for name in evaluate_qa.METRIC_NAMES:
            if model["metrics"][name] is not None:  # the echo baseline has no NLL to log
                assert history[f"eval/{model['name']}/{name}"] == pytest.approx(
                    model["metrics"][name]
                )  # a JSON round trip: exact
    n_test = results["data"]["n"]
    assert history["eval/predictions/nrows"] == 5 * n_test and history["eval/summary/nrows"] == 5
    table = json.loads(next(Path(run_dir).rglob("predictions_*.table.json")).read_text())
    assert (
        table["columns"]
        == [
            "model",
            "question",
            "reference",
            "prediction",
            "em",
            "f1",
            "rougeL",
            "content_f1",
            "content_recall",
            "nll",
        ]
        and len(table["data"]) == 5 * n_test
    )
    assert next(Path(run_dir).rglob("privacy_utility_*.png"), None) is not None


# -----------------------------------------------------------------------------
# fine-tuning helps on what the model was trained on


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, tiny_model_dir):
    """A tiny model able to memorise, and a --disable_dp run that trained it many epochs on 16 short cards."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("memorised")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # initializer_range 0.1, not the default 0.02: with tied embeddings of norm ~0.16 the logits after
    # the final RMSNorm stay within about +-1.3, and no adapter can make such a model confident
    build_tiny_vaultgemma(len(tokenizer), initializer_range=0.1).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    cards = sorted(bundled_cards(), key=lambda c: len(c["output"]))[:16]
    cards_file = write_cards(root / "cards.jsonl", cards)
    run = _train(
        root / "run",
        root / "model",
        cards_file,
        "--disable_dp",
        "--validation_fraction",
        "0",
        "--test_fraction",
        "0",
        "--max_steps",
        "60",
        "--logical_batch_size",
        "8",
        "--per_device_train_batch_size",
        "16",
        "--learning_rate",
        "3e-2",
        "--lora_r",
        "16",
        "--lora_dropout",
        "0",
        "--warmup_ratio",
        "0",
    )
    return {"model": root / "model", "run": run, "cards_file": cards_file, "cards": clean_rows(cards)[0]}


@pytest.mark.numerics
def test_model_fine_tuned_without_dp_scores_far_better_than_its_base_on_the_cards_it_memorised(memorised):
    # Through the library functions, not the CLI: evaluate_qa.py refuses to score training rows (a score on
    # them measures memorisation, never held-out quality), and there is deliberately no flag to allow it.
    settings, metric, scores = GenerationSettings(max_new_tokens=40), evaluate_qa.load_metric(), {}
    for name, adapters in (("base", None), ("tuned", str(memorised["run"] / "adapter"))):
        model, tokenizer, _ = load_for_inference(adapters, str(memorised["model"]), device="cpu")
        scores[name], _ = evaluate_qa.score_model(
            model, tokenizer, memorised["cards"], settings, batch_size=16, metric=metric
        )
    # utility bands, observed over training seeds 42 (this test) and 0-4 (1 thread): NLL ratio 0.35-0.37 (limit 0.6),
    # F1 gain 0.74-0.94 and ROUGE-L gain 0.75-0.94 (limits 0.3): each limit sits at least 0.23 below the worst seed
    assert scores["tuned"]["nll"] < 0.6 * scores["base"]["nll"]
    assert scores["tuned"]["f1"] > scores["base"]["f1"] + 0.3
    assert scores["tuned"]["rougeL"] > scores["base"]["rougeL"] + 0.3


def test_cli_refuses_to_score_the_memorised_training_cards(memorised, capsys):
    assert (
        evaluate_qa.cli_main(
            ["--adapters", str(memorised["run"]), "--dataset", memorised["cards_file"], "--report_to", "none"]
        )
        == 2
    )
    assert "16 of 16 rows are training rows" in capsys.readouterr().err


def test_a_checkpoint_is_described_with_its_own_privacy_report_and_the_runs_split(curve_runs):
    checkpoint = curve_runs["eps2"] / "private_run_record" / "checkpoints" / "step_000002"
    run = evaluate_qa.describe_run(str(checkpoint))
    report = json.loads((checkpoint / "adapter" / "privacy_report.json").read_text())
    assert run["name"] == "eps2@step_000002"
    assert run["spec"] == SplitSpec.from_json(report["split"]) and run["run_dir"] == str(curve_runs["eps2"])
    assert run["epsilon"] == report["epsilon"] and run["dp_enabled"] is True


def test_content_scores_give_no_credit_for_repeating_the_question():
    question, reference = "What does insulin lower?", "Insulin lowers blood glucose."
    assert metrics.token_f1(question, reference) > 0.2  # plain F1 credits the echo
    assert (
        metrics.content_f1(question, reference, question)
        == metrics.content_recall(question, reference, question)
        == 0.0
    )
    assert metrics.content_f1("Lowers blood glucose.", reference, question) == 1.0
    # reference content tokens: lowers, blood, glucose ("insulin" is in the question); the prediction has 2 of them
    assert metrics.content_recall("It lowers glucose.", reference, question) == pytest.approx(2 / 3)
    assert (
        metrics.content_recall("", "Insulin.", "What is insulin?") == 1.0
    )  # nothing beyond the question to say


def test_seed_groups_average_runs_at_one_target_and_keep_the_largest_epsilon_spent():
    def run(target, spent, f1):
        return {"target_epsilon": target, "epsilon": spent, "metrics": {"f1": f1, "nll": math.nan}}

    groups = evaluate_qa.seed_groups([run(8, 7.99, 0.2), run(3, 2.99, 0.1), run(8, 7.98, 0.4)])
    assert [(g["n"], g["epsilon"]) for g in groups] == [(1, 2.99), (2, 7.99)]  # sorted by epsilon
    assert groups[1]["mean"]["f1"] == pytest.approx(0.3)
    assert groups[1]["std"]["f1"] == pytest.approx(0.1 * 2**0.5)  # the sample std of 0.2 and 0.4
    # a NaN metric is left out, not averaged
    assert groups[0]["std"]["f1"] == 0.0 and "nll" not in groups[1]["mean"]


def test_nll_only_scores_the_same_nll_as_the_full_evaluation_and_generates_nothing(
    evaluated, curve_runs, tmp_path
):
    full, _ = evaluated
    argv = ["--adapters", str(curve_runs["eps8"]), str(curve_runs["nodp"]), "--nll_only", "--batch_size", "4"]
    results = evaluate_qa.main(
        evaluate_qa.parse_args(argv + ["--output_dir", str(tmp_path), "--report_to", "none"])
    )
    nll = {m["name"]: m["metrics"] for m in results["models"]}
    for model in full["models"]:
        if model["name"] in nll and model["kind"] != "baseline":
            # the same function on the same cards in the same batches: bitwise
            assert nll[model["name"]]["nll"] == model["metrics"]["nll"]
            assert nll[model["name"]]["f1"] is None and nll[model["name"]]["rougeL"] is None
    rows = [json.loads(line) for line in (tmp_path / evaluate_qa.PREDICTIONS_FILE).read_text().splitlines()]
    assert all(row["prediction"] is None for row in rows if row["model"] != evaluate_qa.ECHO_NAME)
    assert evaluate_qa.cli_main(argv + ["--curve", "--report_to", "none"]) == 2  # nothing to plot
