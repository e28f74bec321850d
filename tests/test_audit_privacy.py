"""audit_privacy.py: the one-run lower bound and its statistics, and the audit end to end on a tiny model.

The end-to-end audits use a tiny VaultGemma with a larger initialisation (initializer_range 0.3):
at the default 0.02 its frozen tied embeddings keep every logit within about +-1, so no adapter
could memorise a secret and the no-DP audit would have no power to show.

The no-DP audit is designed to sit far above its threshold on any CPU: 96 canaries, 10 real rows,
30 epochs at lr 0.01 (0.03 was unstable: AUC 0.53-0.98 and bounds 0-2.0 over seeds; 0.005-0.01 memorise
every inserted canary). With perfect separation the r = 48 guesses are all right (bound 2.41); the
threshold 1.0 is only reached with 6 of those 48 wrong.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import audit_privacy
from conftest import bundled_cards, build_tiny_vaultgemma, write_cards

NUM_CANARIES, REAL_ROWS = 96, 10
FAST_AUDIT = [
    "--num_canaries",
    str(NUM_CANARIES),
    "--secret_length",
    "6",
    "--exposure_alternatives",
    "20",
    "--canary_repeats",
    "3",
    "--num_repeated_canaries",
    "1",
    "--num_real_rows",
    str(REAL_ROWS),
    "--seed",
    "0",
]
FAST_TRAIN = [
    "--logical_batch_size",
    "8",
    "--per_device_train_batch_size",
    "16",
    "--lora_r",
    "16",
    "--lora_alpha",
    "32",
    "--lora_dropout",
    "0",
    "--warmup_ratio",
    "0",
    "--eval_steps",
    "0",
    "--save_steps",
    "0",
    "--report_to",
    "none",
]


# -----------------------------------------------------------------------------
# statistics


def test_p_value_at_epsilon_zero_is_a_fair_coin_tail():
    from scipy.stats import binom

    # the same scipy tail evaluated twice: equal to fp64 rounding (approx's rel 1e-6 is spare); v - 1 vs v is 2x off
    assert audit_privacy.audit_p_value(0.0, 0.0, m=100, r=40, v=28) == pytest.approx(binom.sf(27, 40, 0.5))
    # delta only ever adds to the p-value
    assert audit_privacy.audit_p_value(1.0, 1e-3, 100, 40, 30) > audit_privacy.audit_p_value(
        1.0, 0.0, 100, 40, 30
    )


def test_all_guesses_correct_gives_the_closed_form_bound():
    # delta = 0, v = r: p^r = level  =>  epsilon = log(p / (1 - p)) with p = level^(1/r)
    level, r = 0.05, 30
    p = level ** (1 / r)
    bound = audit_privacy.epsilon_lower_bound(m=60, r=r, v=r, delta=0.0, level=level)
    # 60 bisection halvings of a root of a smooth monotone p-value: observed 4e-16 from the closed form; abs 1e-6 spare
    assert bound == pytest.approx(math.log(p / (1 - p)), abs=1e-6)
    assert audit_privacy.epsilon_lower_bound(60, r, r, 1e-5, level) <= bound
    assert (
        audit_privacy.epsilon_lower_bound(60, r, r // 2, 0.0, level) == 0.0
    )  # chance-level guessing proves nothing


def randomized_response_scores(m, epsilon, rng):
    """Scores of an epsilon-DP mechanism per canary: the membership bit, flipped w.p. 1 / (1 + e^eps)."""
    included = rng.random(m) < 0.5
    flipped = rng.random(m) < 1 / (1 + math.exp(epsilon))
    observed = included ^ flipped
    return np.where(observed, -1.0, 1.0) + 1e-3 * rng.random(m), included  # low score = "in"


@pytest.mark.numerics
def test_bound_rarely_exceeds_the_true_epsilon_of_randomized_response():
    # an exactly epsilon-DP mechanism: at 95% confidence the bound may exceed epsilon in <= 5% of runs. The count
    # of 80 runs is then <= Binomial(80, 0.05), which exceeds the limit (16) with probability 4e-7; a bound that
    # exceeded epsilon in 30% of runs would fail with probability 0.97. Observed (numpy seeds 0-39 x 40 runs):
    # 3.1% of runs exceed, at most 6 of 40 in one seed; the old "<= 4 of 40" fails 4.8% of seeds at a 5% rate.
    # This seed: 5 of 80.
    from scipy.stats import binom

    rng, runs = np.random.default_rng(0), 80  # an exact seeded draw (PCG64): the same scores on every CPU
    bounds = [
        audit_privacy.one_run_bound(*randomized_response_scores(1000, 1.0, rng), 0.0, 0.95, [0.1, 0.5, 1.0])[
            "epsilon_lower_bound"
        ]
        for _ in range(runs)
    ]
    assert sum(b > 1.0 for b in bounds) <= binom.isf(1e-6, runs, 0.05)
    # and it is not vacuous: the median of 40 runs is 0.81-0.87 over seeds 0-39 (sd 0.014), 20 sd above 0.5 (here 0.85)
    assert np.median(bounds) > 0.5


def test_roc_summary_and_exposure_on_known_cases():
    included = np.array([True] * 5 + [False] * 5)
    perfect = audit_privacy.roc_summary(np.where(included, -1.0, 1.0) + np.arange(10) * 1e-3, included)
    assert perfect == {"auc": 1.0, "tpr_at_fpr_0.01": 1.0, "tpr_at_fpr_0.1": 1.0}
    assert audit_privacy.roc_summary(np.where(included, 1.0, -1.0), included)["auc"] == 0.0
    assert audit_privacy.exposure(0.1, [0.5] * 99) == pytest.approx(
        math.log2(100)
    )  # rank 1 of 100 (fp64 log2: ~1 ulp)
    assert audit_privacy.exposure(0.6, [0.5] * 99) == 0.0  # every alternative is at least as likely


def test_bad_audit_arguments_are_all_reported(capsys):
    code = audit_privacy.cli_main(
        ["--canary_repeats", "1", "--confidence", "1.5", "--num_canaries", "2", "--", "--epsilon", "0"]
    )
    err = capsys.readouterr().err
    assert code == 2
    for fragment in ["--canary_repeats", "--confidence", "--num_canaries"]:
        assert fragment in err


# -----------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def audit_setup(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    model_dir = root / "tiny_wide_init"
    build_tiny_vaultgemma(len(tiny_tokenizer), initializer_range=0.3).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    return root, str(model_dir), write_cards(root / "cards.jsonl", bundled_cards()[:40])


def run_audit(setup, name, *train_flags, audit_flags=()):
    root, model_dir, cards = setup
    out = root / name
    args = audit_privacy.parse_args(
        [
            "--output_dir",
            str(out),
            *FAST_AUDIT,
            *audit_flags,
            "--",
            "--model",
            model_dir,
            "--dataset",
            cards,
            *FAST_TRAIN,
            *train_flags,
        ]
    )
    return out, audit_privacy.main(args)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.numerics
def test_audit_without_dp_finds_a_large_lower_bound(audit_setup, capsys):
    out, result = run_audit(
        audit_setup, "no_dp", "--disable_dp", "--num_train_epochs", "30", "--learning_rate", "0.01"
    )
    assert result["reported_epsilon"] is None and not result["dp_enabled"]
    # Design runs (audit seeds 0-12 with training seeds 100-112, 1 thread; this test's seeds 0/42: 2.41, AUC 1.0): bound
    # 2.41-3.13, AUC 0.994-1.0, exposure inserted once 4.38-4.39 bits vs never inserted 0.81-1.75 (max measurable 4.39);
    # 0 of the 48 extreme guesses wrong in any. The thresholds sit below the worst seed: the bound by 1.4 (it takes 6 of
    # those 48 wrong), the AUC by 0.09, the exposure gap by 1.6 bits. (The old 48 canaries at lr 0.03: 0.36-1.68.)
    assert result["epsilon_lower_bound"] > 1.0
    assert result["attack"]["auc"] > 0.9
    exposure = result["exposure"]
    assert exposure["mean_included_once"] > exposure["mean_not_included"] + 1.0
    assert exposure["repeated"][0]["exposure"] > exposure["mean_not_included"]
    # files: the canaries (all of them, with secrets and inclusion) and the data that was trained on
    canaries = read_jsonl(out / "canaries.jsonl")
    assert len(canaries) == NUM_CANARIES + 1 and {"secret", "included", "score", "exposure"} <= set(
        canaries[0]
    )
    real_questions = {c["input"] for c in bundled_cards()}
    assert not any(
        c["question"] in real_questions for c in canaries
    )  # disjoint from the real rows, inserted or not
    trained = read_jsonl(out / "audit_data.jsonl")
    inserted = sum(c["copies"] for c in canaries if c["included"])
    assert len(trained) == REAL_ROWS + inserted and result["canaries"]["inserted"] == sum(
        c["included"] for c in canaries[:NUM_CANARIES]
    )
    summary = json.loads((out / "train" / "private_run_record" / "data_summary.json").read_text())
    assert summary["n_train"] == len(trained) and summary["n_validation"] == summary["n_test"] == 0
    assert (
        json.loads((out / "audit_report.json").read_text())["epsilon_lower_bound"]
        == result["epsilon_lower_bound"]
    )
    assert "epsilon lower bound" in capsys.readouterr().out


@pytest.mark.numerics
def test_audit_with_dp_stays_at_or_below_the_reported_epsilon(audit_setup):
    # the theorem: a (1, delta)-DP run exceeds bound 1 with probability <= 5%; this weak attack on 6 noisy steps
    # finds bound 0.0 for audit seeds 0-12 (training seeds 100-112): at most 17 of 24 and 31 of 48 extreme guesses
    # right, where 1.0 needs 23 of 24 or 44 of 48
    _, result = run_audit(audit_setup, "dp", "--epsilon", "1", "--max_steps", "6", "--learning_rate", "0.03")
    assert result["dp_enabled"] and 0 < result["reported_epsilon"] <= 1.0
    assert result["epsilon_lower_bound"] <= result["reported_epsilon"]
    assert not result["lower_bound_exceeds_reported"]


def test_help_shows_every_audit_default_and_points_to_training_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        audit_privacy.parse_args(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "Training flags follow `--`" in text
    for flag in [
        "--num_canaries",
        "--canary_repeats",
        "--confidence",
        "--guess_fractions",
        "--exposure_alternatives",
    ]:
        assert flag in text
    assert "(default: 64)" in text and "(default: 0.95)" in text


# -----------------------------------------------------------------------------
# user level: canary users of several rows


CANARY_ROWS = 3


def student_cards_file(root: Path) -> str:
    """The first REAL_ROWS bundled cards as 5 students of 2 cards each."""
    cards = [dict(c, student_id=f"student-{i // 2}") for i, c in enumerate(bundled_cards()[:REAL_ROWS])]
    return write_cards(root / "students.jsonl", cards)


def run_user_audit(setup, name, *train_flags, audit_flags=()):
    root, model_dir, _ = setup
    return run_audit(
        (root, model_dir, student_cards_file(root)),
        name,
        "--user_column",
        "student_id",
        "--max_examples_per_user",
        str(CANARY_ROWS),
        *train_flags,
        audit_flags=("--canary_rows_per_user", str(CANARY_ROWS), *audit_flags),
    )


def test_comparable_guarantee_is_the_report_at_user_level_and_group_privacy_at_example_level():
    from utils.privacy import group_privacy

    example = {"dp_enabled": True, "epsilon": 2.0, "delta": 1e-5, "unit": "example: one row"}
    user = dict(example, unit="one user: every row sharing `student_id`", user_column="student_id")
    assert audit_privacy.comparable_guarantee(user, 4, None)["epsilon"] == 2.0
    assert audit_privacy.comparable_guarantee(example, 1, None)["epsilon"] == 2.0
    grouped = audit_privacy.comparable_guarantee(example, 4, None)
    assert (
        (grouped["epsilon"], grouped["delta"]) == group_privacy(2.0, 1e-5, 4) == (8.0, 4 * math.exp(6) * 1e-5)
    )
    assert audit_privacy.comparable_guarantee({"dp_enabled": False}, 4, 1e-6)["epsilon"] is None


def test_canary_users_need_a_user_column(audit_setup, capsys):
    root, model_dir, cards = audit_setup
    argv = ["--output_dir", str(root / "x"), "--canary_rows_per_user", "3", "--", "--model", model_dir]
    assert audit_privacy.cli_main(argv + ["--dataset", cards, "--report_to", "none"]) == 2
    assert "--user_column" in capsys.readouterr().err


@pytest.mark.numerics
def test_user_level_audit_inserts_whole_canary_users_and_finds_memorised_ones_without_dp(audit_setup):
    out, result = run_user_audit(
        audit_setup,
        "users_no_dp",
        "--privacy_unit",
        "user",
        "--disable_dp",
        "--num_train_epochs",
        "30",
        "--learning_rate",
        "0.01",
    )
    rows = read_jsonl(out / "audit_data.jsonl")
    canaries = read_jsonl(out / "canaries.jsonl")[:NUM_CANARIES]
    by_user = {}
    for row in rows:
        by_user.setdefault(row["student_id"], []).append(row)
    for canary in canaries:  # all of a canary user's rows are in the data, under its own id, or none
        assert len(by_user.get(canary["user"], [])) == (CANARY_ROWS if canary["included"] else 0)
    assert result["canaries"]["rows_per_canary"] == CANARY_ROWS and result["unit"] is None
    # observed: bound 2.41 (all 48 extreme guesses right), AUC 1.0; 1.0 needs 42 of 48 right
    assert result["epsilon_lower_bound"] > 1.0 and result["attack"]["auc"] > 0.9


USER_DP = ("--privacy_unit", "user", "--epsilon", "1", "--max_steps", "6", "--learning_rate", "0.03")


@pytest.fixture(scope="module")
def user_dp_audits(audit_setup):
    """The user-level DP audit trained in one python process, and the same audit launched on 2 processes."""
    single = run_user_audit(audit_setup, "users_dp", *USER_DP)
    two = run_user_audit(
        audit_setup,
        "users_dp_2proc",
        *USER_DP,
        audit_flags=("--num_processes", "2", "--mixed_precision", "no"),
    )
    return single, two


@pytest.mark.numerics
def test_user_level_audit_stays_at_or_below_the_reported_user_level_epsilon(user_dp_audits):
    (_, result), _ = user_dp_audits
    assert (
        result["dp_enabled"] and result["unit"].startswith("one user") and result["training_processes"] == 1
    )
    assert result["compared_epsilon"] == result["reported_epsilon"] <= 1.0
    assert (
        result["epsilon_lower_bound"] <= result["reported_epsilon"]
        and not result["lower_bound_exceeds_reported"]
    )


@pytest.mark.numerics
def test_example_level_audit_with_canary_users_is_compared_against_group_privacy(audit_setup):
    from utils.privacy import group_privacy

    out, result = run_user_audit(
        audit_setup, "users_example", "--epsilon", "1", "--max_steps", "6", "--learning_rate", "0.03"
    )
    report = json.loads((out / "train" / "adapter" / "privacy_report.json").read_text())
    assert result["unit"].startswith("example") and result["reported_epsilon"] == report["epsilon"]
    # the bound is tested at the group's (k eps, k e^((k-1) eps) delta), the claim for a k-row canary
    assert (result["compared_epsilon"], result["delta"]) == group_privacy(
        report["epsilon"], report["delta"], CANARY_ROWS
    )
    assert result["one_run_audit"]["delta"] == result["delta"]
    assert (
        result["epsilon_lower_bound"] <= result["compared_epsilon"]
        and not result["lower_bound_exceeds_reported"]
    )


@pytest.mark.numerics
def test_user_level_audit_on_two_processes_audits_the_single_process_mechanism(user_dp_audits):
    """accelerate launch on 2 CPU processes: the same canaries and inclusion, the same epsilon, the canary
    scores of the single-process run, and a bound at or below the claim."""
    (single_out, single), (two_out, two) = user_dp_audits
    report = json.loads((two_out / "train" / "adapter" / "privacy_report.json").read_text())
    assert report["world_size"] == 2 and two["training_processes"] == 2
    assert two["reported_epsilon"] == single["reported_epsilon"] <= 1.0 and two["delta"] == single["delta"]
    canaries = [read_jsonl(out / "canaries.jsonl") for out in (single_out, two_out)]
    assert [(c["user"], c["included"]) for c in canaries[0]] == [
        (c["user"], c["included"]) for c in canaries[1]
    ]
    # the same users, rows and noise, summed over 2 ranks in another order: the adapters agree to 64 fp32 ulps
    # (test_user_level's two-process test), so each canary's mean loss difference agrees far below its size
    # (budget 1e-4 nats on scores of mean size 0.5; observed 2e-6)
    scores = [np.array([c["score"] for c in group]) for group in canaries]
    assert np.abs(scores[0] - scores[1]).max() < 1e-4
    assert two["epsilon_lower_bound"] <= two["reported_epsilon"] and not two["lower_bound_exceeds_reported"]
