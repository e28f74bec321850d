"""utils/recipe.py: the levers a run leaves unset, from N and epsilon; explicit flags always win."""

import json

import pytest

import train_dp_lora
from utils import recipe

UNSET = dict.fromkeys(recipe.LEVERS)


@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0, None])
def test_auto_batch_is_a_power_of_two_in_bounds_that_grows_with_n_and_keeps_q_below_one(epsilon):
    previous = 0
    for n in (2, 17, 100, 271, 1809, 33955, 10**7):
        levers = recipe.resolve("auto", UNSET, n, epsilon)
        batch = levers["logical_batch_size"]
        assert batch & (batch - 1) == 0 and batch < n  # q = batch / N < 1 even on tiny data
        assert batch <= recipe.MAX_BATCH and (batch >= recipe.MIN_BATCH or n <= recipe.MIN_BATCH)
        assert batch >= previous
        previous = batch
        assert levers["num_train_epochs"] > 0 and levers["learning_rate"] > 0 and levers["max_grad_norm"] > 0


def test_explicit_levers_always_win_over_either_recipe():
    given = {
        "logical_batch_size": 48,
        "num_train_epochs": 2.5,
        "learning_rate": 1e-4,
        "warmup_ratio": 0.0,  # falsy, still given
        "max_grad_norm": 0.1,
        "lora_freeze_a": False,
    }
    for name in recipe.RECIPES:
        assert recipe.resolve(name, given, 1000, 3.0) == given
        partly = recipe.resolve(name, dict(UNSET, learning_rate=7e-4), 1000, 3.0)
        assert partly["learning_rate"] == 7e-4
        assert partly["logical_batch_size"] == recipe.resolve(name, UNSET, 1000, 3.0)["logical_batch_size"]


def test_auto_dp_batch_is_the_power_of_two_nearest_16_sqrt_n_within_bounds_over_8_epochs():
    # the study's best noise-batch ratio (batch 256 over 8 epochs at N = 278), and the README's scaling rows
    for n, batch in (
        (278, 256),
        (913, 512),
        (1853, 512),
        (2100, recipe.MAX_BATCH),
        (30500, recipe.MAX_BATCH),
        (10**6, recipe.MAX_BATCH),
    ):
        levers = recipe.resolve("auto", UNSET, n, 8.0)
        assert (levers["logical_batch_size"], levers["num_train_epochs"]) == (batch, 8.0), n


def test_fixed_recipe_is_the_first_versions_constants():
    assert recipe.resolve("fixed", UNSET, 10**5, 3.0) == recipe.FIXED


def test_private_runs_take_larger_batches_than_non_private_ones_at_scale():
    # the noise-batch ratio: under DP a larger expected batch averages the same noise over more signal
    for n in (1809, 33955):
        assert (
            recipe.resolve("auto", UNSET, n, 8.0)["logical_batch_size"]
            > recipe.resolve("auto", UNSET, n, None)["logical_batch_size"]
        )


def test_auto_freezes_lora_a_under_dp_only_and_an_explicit_false_trains_it():
    # frozen A halves the noised dimension; without noise there is nothing to halve
    for n in (278, 33955):
        assert recipe.resolve("auto", UNSET, n, 3.0)["lora_freeze_a"] is True
        assert recipe.resolve("auto", UNSET, n, None)["lora_freeze_a"] is False
        assert recipe.resolve("auto", dict(UNSET, lora_freeze_a=False), n, 3.0)["lora_freeze_a"] is False
    args = train_dp_lora.parse_args(["--lora_freeze_a", "false"])
    assert "lora_freeze_a false (given)" in recipe.apply(args, 1000) and args.lora.lora_freeze_a is False


def test_auto_warms_up_over_30_percent_of_the_steps_under_dp_and_5_percent_without():
    # noisy first steps: AdamW's early moment estimates are mostly noise (the study: +7 points at epsilon 8)
    for n in (278, 33955):
        assert recipe.resolve("auto", UNSET, n, 8.0)["warmup_ratio"] == 0.3
        assert recipe.resolve("auto", UNSET, n, None)["warmup_ratio"] == 0.05
    assert recipe.FIXED["warmup_ratio"] == 0.05  # the first version's schedule
    args = train_dp_lora.parse_args(["--warmup_ratio", "0"])
    assert "warmup_ratio 0 (given)" in recipe.apply(args, 1000) and args.training.warmup_ratio == 0.0


def test_describe_marks_the_given_levers():
    given = dict(UNSET, learning_rate=1e-3)
    line = recipe.describe("auto", given, recipe.resolve("auto", given, 500, 3.0))
    assert line.startswith("recipe auto: ") and "learning_rate 0.001 (given)" in line
    assert line.count("(given)") == 1 and all(lever in line for lever in recipe.LEVERS)


def test_a_run_without_lever_flags_trains_with_the_recipe_and_records_it(tiny_model_dir, tmp_path, capsys):
    from conftest import bundled_cards, write_cards

    cards = write_cards(tmp_path / "cards.jsonl", bundled_cards()[:60])
    out = tmp_path / "out"
    argv = ["--model", tiny_model_dir, "--dataset", cards, "--output_dir", str(out), "--max_steps", "1"]
    results = train_dp_lora.main(
        train_dp_lora.parse_args(argv + ["--report_to", "none", "--eval_steps", "0"])
    )
    n = results["data"]["n_train"]
    expected = recipe.resolve("auto", UNSET, n, 3.0)
    args = json.loads((out / "private_run_record" / "args.json").read_text())
    assert args["training"]["recipe"] == "auto"
    assert args["training"]["logical_batch_size"] == expected["logical_batch_size"]
    assert args["training"]["learning_rate"] == expected["learning_rate"]
    assert args["training"]["warmup_ratio"] == expected["warmup_ratio"]
    assert args["privacy"]["max_grad_norm"] == expected["max_grad_norm"]
    assert args["lora"]["lora_freeze_a"] is expected["lora_freeze_a"] is True
    report = json.loads((out / "adapter" / "privacy_report.json").read_text())
    assert report["expected_batch_size"] == expected["logical_batch_size"]
    assert report["sample_rate"] == expected["logical_batch_size"] / n
    assert report["max_grad_norm"] == expected["max_grad_norm"]
    assert "recipe auto: logical_batch_size" in capsys.readouterr().out
