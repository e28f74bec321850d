"""bench/utility_study.py on a tiny model: the declared grid runs, resumes, keeps to its CPU budget,
selects on validation, and reports retention against the best non-private run (not a utility test)."""

import json
import math
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from bench import utility_study
from conftest import REPO, bundled_cards, write_cards
from utils import data, recipe
from utils.run_dir import RunDir

# the study's own declarations: the fixtures below swap in tiny ones
DECLARED_GRID = utility_study.GRID
DECLARED_RECIPES, DECLARED_USER_RECIPES = utility_study.FINAL_RECIPES, utility_study.USER_RECIPES
DECLARED_DATA_RECIPES = utility_study.DATA_RECIPES
DECLARED = {name: getattr(utility_study, name) for name in
            ("GRID", "FINAL_RECIPES", "USER_RECIPES", "DATA_RECIPES", "FINAL_EPSILONS", "FINAL_SEEDS",
             "FINALISTS", "DATA_FRACTION")}  # fmt: skip
TINY_GRID = (
    utility_study.nonprivate("np_a", logical_batch_size=8, learning_rate=2e-3, max_steps=2),
    utility_study.nonprivate("np_b", logical_batch_size=8, learning_rate=5e-3, max_steps=2),
    utility_study.dp("dp_a", logical_batch_size=8, learning_rate=5e-3, max_steps=2),
)


def make_study(model_dir, root, monkeypatch):
    """(run(*flags), lines()) of a study on the tiny model and 80 bundled cards, writing under root."""
    monkeypatch.setattr(utility_study, "GRID", TINY_GRID)
    monkeypatch.setattr(utility_study, "FINALISTS", ("dp_a",))  # the best too: measured once, not twice
    monkeypatch.setattr(utility_study, "FINAL_EPSILONS", (8.0,))
    monkeypatch.setattr(utility_study, "FINAL_SEEDS", (0, 1))
    # the earlier recipes are explicit flags like any sweep entry (checked without training below): the tiny
    # study trains today's recipe only
    monkeypatch.setattr(utility_study, "FINAL_RECIPES", utility_study.FINAL_RECIPES[:1])
    monkeypatch.setattr(utility_study, "USER_RECIPES", utility_study.USER_RECIPES[:1])
    monkeypatch.setattr(utility_study, "DATA_RECIPES", utility_study.DATA_RECIPES[:1])
    # 2 steps a run: the recipe's own 9 at this N would test nothing more, for 4 times the training
    monkeypatch.setattr(
        utility_study, "COMMON", dict(utility_study.COMMON, per_device_train_batch_size=8, max_steps=2)
    )
    cards = write_cards(root / "cards.jsonl", bundled_cards()[:80])

    def run(*flags):
        argv = ["--model", model_dir, "--dataset", cards, "--train_sample_fraction", "1", "--jobs", "2"]
        argv += ["--runs_dir", str(root / "runs"), "--results", str(root / "results.jsonl")]
        argv += ["--table", str(root / "table.md"), "--plot", str(root / "curve.png")]
        return utility_study.main(utility_study.parse_args(argv + list(flags)))

    def lines():
        return [json.loads(x) for x in (root / "results.jsonl").read_text().splitlines()]

    return run, lines


@pytest.fixture(scope="module")
def studied(tiny_model_dir, tmp_path_factory):
    """The sweep, the sweep again, then the finals: what each left in the results file."""
    root = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run, lines = make_study(tiny_model_dir, root, monkeypatch)
        with pytest.raises(utility_study.StudyError, match="run --stage sweep first"):
            run("--stage", "finals")
        run("--stage", "sweep")
        after_sweep = lines()
        rerun = run("--stage", "sweep")
        after_rerun = lines()
        run("--stage", "finals")
        # the users stage on 600 student cards (about 65 students), one seed
        students = (REPO / "data" / "flashcards_by_student.jsonl").read_text(encoding="utf-8").splitlines()
        (root / "students.jsonl").write_text("\n".join(students[:600]) + "\n", encoding="utf-8")
        monkeypatch.setattr(utility_study, "FINAL_SEEDS", (0,))
        monkeypatch.setattr(utility_study, "USER_SPLIT", dict(utility_study.USER_SPLIT, test_fraction=0.2))
        monkeypatch.setattr(utility_study, "DATA_FRACTION", 0.5)  # the tiny study trains on all of its split
        run("--stage", "data")
        run("--stage", "users", "--user_dataset", str(root / "students.jsonl"))
        yield {"root": root, "sweep": after_sweep, "rerun": rerun, "after_rerun": after_rerun, "all": lines()}


def test_sweep_writes_one_line_per_configuration_and_a_rerun_trains_nothing(studied):
    first = studied["sweep"]
    sweep = [r for r in first if r["stage"] == "sweep"]
    assert sorted(r["name"] for r in sweep) == ["dp_a", "np_a", "np_b"]
    assert [r["name"] for r in first if r["kind"] == "base"] == ["base"]  # scored once, on the shared split
    for r in sweep:
        assert math.isfinite(r["validation_nll"]) and r["test_nll"] is None  # the sweep never scores test
        assert r["cpu_s"] > 0 and r["steps"] == 2 and r["flags"]["seed"] == 0
    dp = next(r for r in sweep if r["kind"] == "dp")
    assert 0 < dp["epsilon"] <= 8.0 and dp["resolved"]["max_grad_norm"] == 1.0
    assert studied["rerun"]["ran"] == [] and studied["after_rerun"] == first  # resumable: nothing twice


def test_finals_run_the_recipe_and_the_best_nonprivate_configuration_over_seeds(studied):
    results = studied["all"]
    sweep = {r["name"]: r for r in results if r["stage"] == "sweep"}
    best = min(("np_a", "np_b"), key=lambda name: sweep[name]["validation_nll"])
    finals = [r for r in results if r["stage"] == "finals"]
    assert sorted((r["name"], r["seed"]) for r in finals) == sorted(
        [("recipe_eps8", 0), ("recipe_eps8", 1), ("dp_a", 0), ("dp_a", 1), (best, 0), (best, 1)]
    )  # dp_a: the sweep's best (only) private configuration, over the seeds too
    for r in (r for r in finals if r["name"] == "recipe_eps8"):  # the recipe's DP levers, resolved at N
        args = json.loads((Path(r["run_dir"]) / "private_run_record" / "args.json").read_text())
        assert args["lora"]["lora_freeze_a"] is True and args["training"]["warmup_ratio"] == 0.3, r["seed"]
    assert all(math.isfinite(r["test_nll"]) for r in finals)
    # the best non-private seed 0 is the sweep's own run, scored on test, not trained again
    reused = next(r for r in finals if r["name"] == best and r["seed"] == 0)
    assert reused["validation_nll"] == sweep[best]["validation_nll"]
    recipe = [r for r in finals if r["name"] == "recipe_eps8"]
    assert all(r["flags"]["recipe"] == "auto" and r["epsilon"] <= 8.0 for r in recipe)
    rows = {(row["stage"], row["name"]): row for row in utility_study.summarise(results)}
    base = next(r for r in results if r["kind"] == "base")
    reference = sum(r["test_nll"] for r in finals if r["name"] == best) / 2
    expected = [(base["test_nll"] - r["test_nll"]) / (base["test_nll"] - reference) for r in recipe]
    # retention is defined only when fine-tuning gained something; both means are of the same two floats
    # (budget: a few ulps of reordering)
    if base["test_nll"] > reference:
        assert rows[("finals", "recipe_eps8")]["retention"][0] == pytest.approx(sum(expected) / 2, rel=1e-12)
    else:
        assert "retention" not in rows[("finals", "recipe_eps8")]
    table = (studied["root"] / "table.md").read_text()
    assert "| finals | recipe_eps8 |" in table and "| sweep | dp_a |" in table
    assert (studied["root"] / "curve.png").stat().st_size > 0


def test_retention_is_against_one_nonprivate_configuration_chosen_on_validation_never_an_average_of_two():
    # a stage can hold two non-private configurations when the sweep's best changed after the first ran
    def run(name, kind, seed, validation, test, stage="finals"):
        return {"stage": stage, "name": name, "kind": kind, "seed": seed, "resolved": {}, "flags": {},
                "n_train": 278, "steps": 9, "cpu_s": 60.0, "epsilon": 8.0 if kind == "dp" else None,
                "validation_nll": validation, "test_nll": test}  # fmt: skip

    results = [
        run("base", "base", 0, 3.2, 3.3, stage="base"),
        run("np_1ep", "nonprivate", 0, 2.80, 2.90),
        run("np_1ep", "nonprivate", 1, 2.82, 2.92),
        run("np_2ep", "nonprivate", 0, 2.70, 2.85),  # the better one on validation
        run("np_2ep", "nonprivate", 1, 2.72, 2.87),
        run("dp", "dp", 0, 3.0, 3.1),
    ]
    rows = {row["name"]: row for row in utility_study.summarise(results)}
    # exact decimal inputs, two subtractions and one division: budget of a few ulps
    assert rows["dp"]["retention"][0] == pytest.approx((3.3 - 3.1) / (3.3 - 2.86), rel=1e-12)
    assert rows["np_2ep"]["retention"][0] == pytest.approx(1.0, rel=1e-12)
    assert rows["np_1ep"]["retention"][0] < 1.0


def test_a_retention_spread_under_one_point_is_printed_to_a_tenth_with_its_mean_and_never_as_zero():
    assert utility_study.percent((0.7801, 0.0030, 2)) == "78.0% ± 0.3%"
    assert utility_study.percent((0.8079, 0.0074, 2)) == "80.8% ± 0.7%"  # not "81%": a goal of 80% is near
    assert utility_study.percent((0.8395, 0.0120, 3)) == "84% ± 1%"
    assert utility_study.percent((0.8579, 0.0, 1)) == "86%"  # one seed: no spread to print
    assert utility_study.percent(None) == "-"


def test_cpu_budget_stops_new_runs_and_the_base_scoring_once_spent(tiny_model_dir, tmp_path, monkeypatch):
    run, lines = make_study(tiny_model_dir, tmp_path, monkeypatch)
    used = run("--stage", "sweep", "--jobs", "1", "--cpu_budget_minutes", "0.0001")
    assert len(used["ran"]) == 1 and [r["stage"] for r in lines()] == ["sweep"]  # no base line yet


def test_users_stage_trains_user_level_dp_and_its_reference_on_one_split_that_holds_out_whole_students(
    studied,
):
    results = studied["all"]
    users = {r["name"]: r for r in results if r["stage"] == "users"}
    best = min((r for r in results if r["stage"] == "sweep" and r["kind"] == "nonprivate"),
               key=lambda r: r["validation_nll"])["name"]  # fmt: skip
    assert sorted(users) == sorted(["user_recipe_eps8", f"user_{best}"])
    dp, reference = users["user_recipe_eps8"], users[f"user_{best}"]
    assert dp["flags"]["privacy_unit"] == "user" and 0 < dp["epsilon"] <= 8.0 and dp["n_users"] > 16
    assert reference["kind"] == "nonprivate" and reference["n_users"] is None  # rows, at the example unit
    # one split for the stage: every run and the base recorded the same student-keyed spec, and no held-out
    # student has a training row
    specs = []
    for r in (dp, reference):
        report = json.loads(
            (studied["root"] / "runs" / f"{r['name']}_seed0" / "adapter" / "privacy_report.json").read_text()
        )
        specs.append(data.SplitSpec.from_json(report["split"]))
    assert specs[0] == specs[1] and specs[0].user_column == "student_id"
    cards, _ = data.clean_rows(
        data.read_rows(str(studied["root"] / "students.jsonl")), user_column="student_id"
    )
    splits = {}
    for card in cards:
        splits.setdefault(card["student_id"], set()).add(data.assign_split(card, specs[0]))
    assert all(len(s) == 1 for s in splits.values()) and any(s == {"test"} for s in splits.values())
    base = next(r for r in results if r["name"] == "base_users")
    assert (
        base["stage"] == "base"
        and base["test_nll"] != next(r for r in results if r["name"] == "base")["test_nll"]
    )
    # the users row's retention is against its own base and reference (one seed: the value itself)
    row = next(r for r in utility_study.summarise(results) if r["name"] == "user_recipe_eps8")
    if base["test_nll"] > reference["test_nll"]:
        expected = (base["test_nll"] - dp["test_nll"]) / (base["test_nll"] - reference["test_nll"])
        assert row["retention"][0] == pytest.approx(expected, rel=1e-12)  # budget: one division, reordered
    else:
        assert "retention" not in row
    table = (studied["root"] / "table.md").read_text()
    assert f"| users | user_recipe_eps8 | {dp['epsilon']:.2f} |" in table
    # each stage's rows follow its own base: sweep, base, finals, base_users, users
    positions = [table.index(f"| {stage} | {name} |") for stage, name in
                 (("sweep", "np_a"), ("base", "base"), ("finals", "recipe_eps8"), ("base", "base_users"),
                  ("users", "user_recipe_eps8"))]  # fmt: skip
    assert positions == sorted(positions)


def test_data_stage_trains_the_recipe_and_its_reference_on_its_own_share_against_the_shared_base(studied):
    results = studied["all"]
    best = min((r for r in results if r["stage"] == "sweep" and r["kind"] == "nonprivate"),
               key=lambda r: r["validation_nll"])["name"]  # fmt: skip
    rows = {r["name"]: r for r in results if r["stage"] == "data"}
    assert sorted(rows) == sorted(["data0.5_recipe_eps8", f"data0.5_{best}"])
    dp, reference = rows["data0.5_recipe_eps8"], rows[f"data0.5_{best}"]
    finals_n = next(r for r in results if r["stage"] == "finals")["n_train"]  # --train_sample_fraction 1
    for r in (dp, reference):
        assert r["flags"]["train_sample_fraction"] == 0.5 and 0 < r["n_train"] < finals_n
    assert dp["kind"] == "dp" and 0 < dp["epsilon"] <= 8.0 and dp["flags"]["recipe"] == "auto"
    assert [r["name"] for r in results if r["kind"] == "base"] == ["base", "base_users"]  # no base of its own
    base = next(r for r in results if r["name"] == "base")
    row = next(r for r in utility_study.summarise(results) if r["name"] == "data0.5_recipe_eps8")
    if base["test_nll"] > reference["test_nll"]:  # against the stage's own reference, not the finals'
        expected = (base["test_nll"] - dp["test_nll"]) / (base["test_nll"] - reference["test_nll"])
        assert row["retention"][0] == pytest.approx(expected, rel=1e-12)  # budget: one division, reordered
    else:
        assert "retention" not in row
    table = (studied["root"] / "table.md").read_text()
    positions = [table.index(f"| {stage} | {name} |") for stage, name in
                 (("finals", "recipe_eps8"), ("data", "data0.5_recipe_eps8"), ("base", "base_users"))]  # fmt: skip
    assert positions == sorted(positions)


def test_every_sweep_entry_and_earlier_recipe_pins_the_recipe_levers_and_the_shared_flags_set_none():
    # a flag shared by every run would override the recipe's own choice in the finals
    assert not (set(utility_study.COMMON) | set(utility_study.SPLIT)) & set(recipe.LEVERS)
    declared = DECLARED_RECIPES + DECLARED_USER_RECIPES + DECLARED_DATA_RECIPES
    earlier = [utility_study.Config(name, flags) for name, flags in declared if "recipe" not in flags]
    # the first four recipes, the first and fourth at user level, and the fourth on the data stage's rows
    assert len(earlier) == 7
    for config in DECLARED_GRID + tuple(earlier):
        used = set(recipe.LEVERS) - (set() if config.private else {"max_grad_norm"})
        assert used <= set(config.flags), (config.name, used - set(config.flags))


def test_finals_users_and_data_declare_every_recipe_at_every_epsilon_and_seed_with_its_flags(monkeypatch):
    for name, value in DECLARED.items():  # the module's fixture holds its tiny study's patches meanwhile
        monkeypatch.setattr(utility_study, name, value)
    sweep = [{"stage": "sweep", "kind": "nonprivate", "name": "nonprivate_b16_lr2e-3", "validation_nll": 2.0},
             {"stage": "sweep", "kind": "dp", "name": "dp_b32_lr5e-3", "validation_nll": 3.0}]  # fmt: skip
    finals = {(c.name, c.seed): c for c in utility_study.final_configs(sweep)}
    for name, flags in DECLARED_RECIPES:
        for eps in utility_study.FINAL_EPSILONS:
            for seed in utility_study.FINAL_SEEDS:
                config = finals[(f"{name}_eps{eps:g}", seed)]
                assert config.stage == "finals" and config.flags == flags | {"epsilon": eps}
    assert finals[("first_recipe_eps8", 0)].flags["lora_freeze_a"] is False
    assert finals[("second_recipe_eps3", 2)].flags["lora_freeze_a"] is True
    assert (
        finals[("third_recipe_eps3", 1)].flags | {"warmup_ratio": 0.05}
        == finals[("second_recipe_eps3", 1)].flags
    )
    fourth = finals[("fourth_recipe_eps3", 0)].flags  # the third's batch and epochs doubled
    assert (
        fourth | {"logical_batch_size": 64, "num_train_epochs": 2} == finals[("third_recipe_eps3", 0)].flags
    )
    # today's recipe at the finals' N = 278 takes the levers of the sweep's best private configuration
    declared_flags = {c.name: c.flags for c in DECLARED_GRID}
    batch_256 = declared_flags["dp_b256_lr5e-3_8ep_freeze_a_warmup0.3"]
    today = recipe.resolve("auto", dict.fromkeys(recipe.LEVERS), 278, utility_study.SWEEP_EPSILON)
    assert today == {lever: batch_256[lever] for lever in recipe.LEVERS}
    assert {("dp_b32_lr5e-3", s) for s in utility_study.FINAL_SEEDS} <= set(finals)  # the sweep's best DP
    best_dp_flags = declared_flags["dp_b32_lr5e-3"]
    assert finals[("dp_b32_lr5e-3", 0)].flags == best_dp_flags  # at the sweep's epsilon, 8
    for eps in set(utility_study.FINAL_EPSILONS) - {utility_study.SWEEP_EPSILON}:  # and at the others: 3
        for seed in utility_study.FINAL_SEEDS:
            assert finals[(f"dp_b32_lr5e-3_eps{eps:g}", seed)].flags == best_dp_flags | {"epsilon": eps}
    assert "dp_b32_lr5e-3_eps8" not in {name for name, _ in finals}  # not trained twice under two names
    study = utility_study.parse_args([]).study
    users = {(c.name, c.seed): c for c in utility_study.user_configs(sweep, study)}
    for name, flags in DECLARED_USER_RECIPES:
        config = users[(f"user_{name}_eps8", 0)]
        assert config.flags["privacy_unit"] == "user" and flags.items() <= config.flags.items()
    data = {(c.name, c.seed): c for c in utility_study.data_configs(sweep)}  # on half the training split
    share = {"train_sample_fraction": utility_study.DATA_FRACTION}
    for seed in utility_study.FINAL_SEEDS:
        for name, flags in DECLARED_DATA_RECIPES:
            for eps in utility_study.FINAL_EPSILONS:
                config = data[(f"data0.5_{name}_eps{eps:g}", seed)]
                assert config.stage == "data" and config.flags == flags | {"epsilon": eps} | share
        reference = data[("data0.5_nonprivate_b16_lr2e-3", seed)]
        assert reference.flags == declared_flags["nonprivate_b16_lr2e-3"] | share
    assert data[("data0.5_fourth_recipe_eps3", 0)].flags["logical_batch_size"] == 256  # 8 sqrt(913), rounded
    per_seed = len(utility_study.FINAL_EPSILONS) * len(DECLARED_DATA_RECIPES) + 1
    assert len(data) == per_seed * len(utility_study.FINAL_SEEDS)
    # seeds in order within each configuration: a budget that stops early leaves the first seeds run
    order = [(c.name, c.seed) for c in utility_study.data_configs(sweep)]
    assert order.index(("data0.5_recipe_eps3", 1)) < order.index(("data0.5_recipe_eps3", 2))


def test_plot_draws_a_configurations_runs_at_each_epsilon_on_one_line_and_each_recipe_on_its_own():
    def row(name, epsilon, seeds=3, stage="finals"):
        return {"stage": stage, "kind": "dp", "name": name, "epsilon": epsilon, "seeds": seeds,
                "retention": (0.5, 0.01)}  # fmt: skip

    rows = [row("dp_b256_eps3", 2.99, seeds=1), row("recipe_eps8", 7.99), row("dp_b256", 8.0),
            row("recipe_eps3", 2.99), row("dp_b32_freeze_a", 8.0), row("data0.5_recipe_eps8", 7.99, 1, "data"),
            dict(row("dp_unscored", 8.0), retention=None), row("fourth_recipe_eps8", 7.99),
            row("data0.5_fourth_recipe_eps3", 2.99, 2, "data")]  # fmt: skip
    series = {label: [(r["name"], r["epsilon"]) for r in points] for label, points in
              utility_study.plot_series(rows)}  # fmt: skip
    assert series == {
        "--recipe auto, example unit (one row)": [("recipe_eps3", 2.99), ("recipe_eps8", 7.99)],
        "fourth auto recipe (batch 8 sqrt N), example unit": [("fourth_recipe_eps8", 7.99)],
        "--recipe auto, example unit, training share 0.5": [("data0.5_recipe_eps8", 7.99)],
        "fourth auto recipe, example unit, training share 0.5": [("data0.5_fourth_recipe_eps3", 2.99)],
        "dp_b256, example unit": [("dp_b256_eps3", 2.99), ("dp_b256", 8.0)],
        "dp_b32_freeze_a, example unit": [("dp_b32_freeze_a", 8.0)],
    }
    assert [utility_study.seed_counts(p) for p in ([rows[0], rows[2]], [rows[1]], [rows[5]])] == [
        "1-3 seeds", "3 seeds", "1 seed"]  # fmt: skip


def test_a_run_recorded_before_a_flag_existed_counts_as_trained_with_that_flags_default(studied, tmp_path):
    row = next(r for r in studied["all"] if r["stage"] == "sweep" and r["name"] == "dp_a")
    old = tmp_path / "old_run"
    shutil.copytree(row["run_dir"], old)
    assert utility_study.trained_with(old, row["flags"])
    args_file = old / "private_run_record" / "args.json"
    args = json.loads(args_file.read_text())
    del args["training"]["optimizer"]  # as a run from before --optimizer recorded it
    args_file.write_text(json.dumps(args))
    assert utility_study.trained_with(old, row["flags"])
    assert not utility_study.trained_with(old, row["flags"] | {"optimizer": "sgd"})


def test_an_unknown_configs_name_is_refused_naming_each_declared_configuration_once(tmp_path, monkeypatch):
    for name, value in DECLARED.items():
        monkeypatch.setattr(utility_study, name, value)
    sweep = {
        "stage": "sweep",
        "kind": "nonprivate",
        "name": "nonprivate_b16_lr2e-3",
        "seed": 0,
        "validation_nll": 2.0,
    }
    (tmp_path / "results.jsonl").write_text(json.dumps(sweep) + "\n")
    args = utility_study.parse_args(
        ["--stage", "data", "--configs", "no_such", "--results", str(tmp_path / "results.jsonl")]
    )
    with pytest.raises(utility_study.StudyError) as refused:
        utility_study.main(args)
    listed = str(refused.value).split("(", 1)[1].rstrip(")").split(", ")
    assert listed == [
        "data0.5_recipe_eps3",
        "data0.5_recipe_eps8",
        "data0.5_fourth_recipe_eps3",
        "data0.5_fourth_recipe_eps8",
        "data0.5_nonprivate_b16_lr2e-3",
    ]  # 3 seeds each


def adapter_bytes(run_dir) -> bytes:
    return (RunDir(run_dir).bundle / "adapter_model.safetensors").read_bytes()


def test_a_run_killed_mid_training_continues_from_its_checkpoint_to_the_uninterrupted_adapters_counting_both_segments(
    studied, tiny_model_dir, tmp_path, monkeypatch
):
    reference = next(r for r in studied["sweep"] if r["name"] == "dp_a")
    run, lines = make_study(tiny_model_dir, tmp_path, monkeypatch)
    # the child kills itself (SIGKILL) in the middle of step 2, after step 1's checkpoint (utils/run_dir.py)
    monkeypatch.setenv("DP_LORA_TEST_KILL_AT", "step_2:mid")
    with pytest.raises(utility_study.StudyError, match="train_dp_lora.py failed"):
        run("--stage", "sweep", "--configs", "dp_a", "--jobs", "1")
    assert not (tmp_path / "results.jsonl").exists()
    segments_path = tmp_path / "runs" / "dp_a_seed0.segments.json"
    killed = json.loads(segments_path.read_text())["segments"]
    assert len(killed) == 1 and killed[0]["from_step"] == 0 and killed[0]["cpu_s"] > 0

    monkeypatch.delenv("DP_LORA_TEST_KILL_AT")
    used = run("--stage", "sweep", "--configs", "dp_a", "--jobs", "1")
    assert used["ran"] == [("dp_a", 0)]
    [line] = [r for r in lines() if r["stage"] == "sweep"]
    segments = json.loads(segments_path.read_text())["segments"]
    assert [s["from_step"] for s in segments] == [0, 1] and segments[0] == killed[0]
    assert line["segments"] == 2 and line["segments_cpu_unknown"] == 0
    assert line["cpu_s"] == pytest.approx(sum(s["cpu_s"] for s in segments), abs=0.15)  # rounding: 2 x 0.05
    assert line["steps"] == 2 and line["epsilon"] == reference["epsilon"]
    # a seeded resume replays the same draws and noise on the same one-thread kernels: bitwise the same
    assert adapter_bytes(line["run_dir"]) == adapter_bytes(reference["run_dir"])
    assert line["validation_nll"] == reference["validation_nll"]


def test_a_run_with_other_flags_at_the_checkpoint_is_trained_again_from_scratch(
    studied, tiny_model_dir, tmp_path, monkeypatch
):
    run, lines = make_study(tiny_model_dir, tmp_path, monkeypatch)
    monkeypatch.setenv("DP_LORA_TEST_KILL_AT", "step_2:mid")
    with pytest.raises(utility_study.StudyError):
        run("--stage", "sweep", "--configs", "dp_a", "--jobs", "1")
    monkeypatch.delenv("DP_LORA_TEST_KILL_AT")
    changed = tuple(
        utility_study.dp("dp_a", logical_batch_size=8, learning_rate=2e-3, max_steps=2)
        if c.name == "dp_a"
        else c
        for c in TINY_GRID
    )
    monkeypatch.setattr(utility_study, "GRID", changed)  # the same name, another learning rate
    run("--stage", "sweep", "--configs", "dp_a", "--jobs", "1")
    segments = json.loads((tmp_path / "runs" / "dp_a_seed0.segments.json").read_text())["segments"]
    [line] = [r for r in lines() if r["stage"] == "sweep"]
    assert [s["from_step"] for s in segments] == [0] and "segments" not in line
    args = json.loads((Path(line["run_dir"]) / "private_run_record" / "args.json").read_text())
    assert args["training"]["learning_rate"] == 2e-3


def test_stop_ends_a_running_child_at_once_and_reports_the_cpu_it_spent(tmp_path):
    command = [sys.executable, "-c", "import time; sum(range(3 * 10**6)); time.sleep(120)"]
    timer = threading.Timer(3.0, utility_study.STOP.set)
    timer.start()
    start = time.time()
    try:
        with pytest.raises(utility_study.StudyStopped) as stopped:
            utility_study.ChildCPU.run(command, tmp_path / "child.log")
    finally:
        timer.cancel()
        utility_study.STOP.clear()
    # the child sleeps 120 s after its loop: ended within 60 s (3 s, a 0.2 s poll and a terminate under load)
    assert time.time() - start < 60 and stopped.value.cpu_s > 0


def test_a_stopped_study_writes_no_line_keeps_the_runs_cpu_and_the_next_invocation_finishes_it(
    tiny_model_dir, tmp_path, monkeypatch
):
    run, lines = make_study(tiny_model_dir, tmp_path, monkeypatch)
    child_run = utility_study.ChildCPU.run

    def stop_after_the_child_started(command, log_path, threads=1):
        # a train_dp_lora.py child imports torch for longer than 1 s: it is in flight when STOP is set
        timer = threading.Timer(1.0, utility_study.STOP.set)
        timer.start()
        try:
            return child_run(command, log_path, threads)
        finally:
            timer.cancel()

    monkeypatch.setattr(utility_study.ChildCPU, "run", stop_after_the_child_started)
    used = run("--stage", "sweep", "--configs", "dp_a", "np_a", "--jobs", "1")
    # the grid's order: np_a first, stopped in flight; dp_a never started
    assert used["ran"] == [] and used["stopped"] == [("np_a", 0)] and used["cpu_s"] > 0
    assert not (tmp_path / "results.jsonl").exists()  # neither a run's line nor the base's
    assert not (tmp_path / "runs" / "dp_a_seed0").exists()
    [segment] = json.loads((tmp_path / "runs" / "np_a_seed0.segments.json").read_text())["segments"]
    assert segment["cpu_s"] == pytest.approx(used["cpu_s"], abs=0.05)  # one rounding
    monkeypatch.setattr(utility_study.ChildCPU, "run", child_run)
    used = run("--stage", "sweep", "--configs", "dp_a", "np_a", "--jobs", "1")
    assert sorted(used["ran"]) == [("dp_a", 0), ("np_a", 0)] and not utility_study.STOP.is_set()
    assert sorted(r["name"] for r in lines()) == ["base", "dp_a", "np_a"]


def test_a_child_runs_with_the_threads_asked_and_one_by_default(tmp_path):
    command = [
        sys.executable,
        "-c",
        "import os; print(os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'])",
    ]
    utility_study.ChildCPU.run(command, tmp_path / "default.log")
    utility_study.ChildCPU.run(command, tmp_path / "two.log", threads=2)
    assert (tmp_path / "default.log").read_text().split() == ["1", "1"]
    assert (tmp_path / "two.log").read_text().split() == ["2", "2"]


def test_threads_per_job_reach_the_training_and_scoring_children_and_the_line_and_segments_record_them(
    studied, tiny_model_dir, tmp_path, monkeypatch
):
    run, lines = make_study(tiny_model_dir, tmp_path, monkeypatch)
    before = [json.dumps(r) for r in studied["all"] if r["stage"] != "data"]  # the sweep and the base: done
    (tmp_path / "results.jsonl").write_text("\n".join(before) + "\n")
    monkeypatch.setattr(utility_study, "FINAL_SEEDS", (0,))
    child_run, asked = utility_study.ChildCPU.run, []

    def recording(command, log_path, threads=1):
        asked.append((Path(command[1]).name, threads))
        return child_run(command, log_path, threads)

    monkeypatch.setattr(utility_study.ChildCPU, "run", recording)
    used = run("--stage", "data", "--configs", "data0.5_recipe_eps8", "--jobs", "1", "--threads_per_job", "2")
    assert used["ran"] == [("data0.5_recipe_eps8", 0)]
    assert asked == [("train_dp_lora.py", 2), ("evaluate_qa.py", 2)]  # training, then the test NLL
    line = lines()[-1]
    assert line["name"] == "data0.5_recipe_eps8" and line["threads"] == 2
    [segment] = json.loads((tmp_path / "runs" / "data0.5_recipe_eps8_seed0.segments.json").read_text())[
        "segments"
    ]
    assert segment["threads"] == 2
    assert all("threads" not in r for r in studied["all"])  # one thread by default: no field
