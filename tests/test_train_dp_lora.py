"""train_dp_lora.py end to end on a tiny VaultGemma: outputs, LoRA-only updates, resume, budget, errors, tracking."""

import json
from pathlib import Path

import pytest
import torch

import train_dp_lora
from conftest import FP32_EPS, assert_close_scaled
from utils import privacy, training

FAST = [
    "--dataset",
    "bundled",
    "--logical_batch_size",
    "16",
    "--per_device_train_batch_size",
    "8",
    "--eval_steps",
    "0",
    "--report_to",
    "none",
    "--epsilon",
    "3",
]


def run(model_dir, out, *extra):
    args = train_dp_lora.parse_args(["--model", model_dir, "--output_dir", str(out), *FAST, *extra])
    return train_dp_lora.main(args)


def read(path):
    return json.loads(Path(path).read_text())


def adapter_tensors(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def dp_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp_run")
    results = run(tiny_model_dir, out, "--max_steps", "4", "--save_steps", "2")
    return out, results


def test_sgd_with_momentum_trains_under_the_privacy_plan_of_adamw(dp_run, tiny_model_dir, tmp_path):
    """The optimizer is post-processing of the noised gradient: it changes the update, never the plan."""
    from utils.run_dir import RunDir

    out, _ = dp_run
    sgd_out = tmp_path / "sgd"
    run(
        tiny_model_dir,
        sgd_out,
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--optimizer",
        "sgd",
        "--learning_rate",
        "0.5",
    )
    adamw_report, sgd_report = (read(o / "adapter" / "privacy_report.json") for o in (out, sgd_out))
    for key in (
        "epsilon",
        "delta",
        "noise_multiplier",
        "sample_rate",
        "steps_taken",
        "max_grad_norm",
        "accountant_history",
    ):
        assert sgd_report[key] == adamw_report[key], key
    state = torch.load(RunDir(sgd_out).checkpoint(4) / "training_state.pt", weights_only=False)["optimizer"]
    assert [g["momentum"] for g in state["param_groups"]] == [training.SGD_MOMENTUM]
    assert state["state"] and all("momentum_buffer" in v for v in state["state"].values())
    b_weights = [t for name, t in adapter_tensors(sgd_out / "adapter").items() if "lora_B" in name]
    assert b_weights and any(t.abs().max() > 0 for t in b_weights)  # B starts at zero: SGD moved it


def test_help_exits_zero_and_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_dp_lora.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [
        ("--epsilon", "3.0"),
        ("--delta", "None"),
        ("--max_grad_norm", "None"),
        ("--recipe", "auto"),
        ("--lora_r", "8"),
        ("--lora_alpha", "16"),
        ("--lora_dropout", "0.05"),
        ("--accountant", "prv"),
        ("--model", "google/vaultgemma-1b"),
        ("--dataset", "medalpaca/medical_meadow_medical_flashcards"),
        ("--report_to", "wandb"),
        ("--logical_batch_size", "None"),
        ("--learning_rate", "None"),
        ("--num_train_epochs", "None"),
        ("--seed", "42"),
    ]:
        entry = text.split(f" {flag} ", 1)[1].split(" --", 1)[0]
        assert f"(default: {default})" in entry, (flag, entry)


def test_run_writes_adapters_args_split_and_privacy_report_within_target(dp_run, tiny_model_dir):
    out, results = dp_run
    for name in [
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/tokenizer.json",
        "adapter/NOTICE",
        "adapter/privacy_report.json",
        "adapter/README.md",
        "private_run_record/README.txt",
        "private_run_record/args.json",
        "private_run_record/data_summary.json",
        "private_run_record/results.json",
        "private_run_record/checkpoints/step_000002/training_state.pt",
        "private_run_record/checkpoints/step_000004/privacy_record.json",
    ]:
        assert (out / name).exists(), name
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "private_run_record"]
    report = read(out / "adapter" / "privacy_report.json")
    assert report["steps_taken"] == report["planned_steps"] == 4
    assert 0 < report["epsilon"] <= report["target_epsilon"] == 3.0
    assert report["epsilon"] == results["privacy/epsilon"]
    assert report["sampling"] == "poisson" and report["accountant"] == "prv" and report["dp_enabled"]
    assert report["sample_rate"] == pytest.approx(
        16 / report["n_train"]
    )  # one fp64 division: <= 1 ulp, rel 1e-6 is ample
    assert report["delta"] < 1 / report["n_train"]
    # the noise was calibrated for exactly these 4 steps at this q (the same deterministic calibration: equal, rel 1e-6
    # spare; one step fewer moves sigma by 1.8%, q = 16/400 by 3%)
    assert report["noise_multiplier"] == pytest.approx(
        privacy.calibrate_noise(3.0, report["delta"], report["sample_rate"], 4, "prv")
    )
    assert report["epsilon_rdp"] >= report["epsilon"]
    assert read(out / "private_run_record" / "args.json")["privacy"]["epsilon"] == 3.0


def test_split_is_recomputable_from_the_bundle_and_no_per_row_record_is_stored(dp_run):
    from conftest import bundled_cards
    from utils.data import SplitSpec, assign_split, clean_rows

    out, _ = dp_run
    report = read(out / "adapter" / "privacy_report.json")
    cards, _ = clean_rows(bundled_cards())
    assigned = [assign_split(c, SplitSpec.from_json(report["split"])) for c in cards]
    summary = read(out / "private_run_record" / "data_summary.json")
    assert report["n_train"] == summary["n_train"] and summary["n_test"] == assigned.count("test")
    # every assigned training and validation row was kept, or skipped as too long and counted
    dropped = (
        assigned.count("train") - summary["n_train"] + assigned.count("validation") - summary["n_validation"]
    )
    assert dropped == summary["skipped_too_long"]
    assert all(
        not isinstance(v, (list, dict)) for v in summary.values()
    )  # counts only: no indices, no hashes


def test_adapters_load_with_plain_peft_and_change_the_model(dp_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = dp_run
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    lora_b = [v for k, v in adapter_tensors(out / "adapter").items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: non-zero means LoRA trained
    assert set(k.split(".")[-2] for k in adapter_tensors(out / "adapter")) == {"lora_A", "lora_B"}
    ids = torch.tensor([[2, 50, 60, 70]])
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert not torch.allclose(tuned, plain)


def test_base_weights_never_change_and_lora_weights_do(tiny_model_dir, tmp_path, monkeypatch):
    captured = {}
    build = train_dp_lora.build_model

    def capture(*args, **kwargs):
        model = build(*args, **kwargs)
        captured["model"] = model
        captured["before"] = {k: v.detach().clone() for k, v in model.named_parameters()}
        return model

    monkeypatch.setattr(train_dp_lora, "build_model", capture)
    run(tiny_model_dir, tmp_path, "--max_steps", "2", "--save_steps", "0")
    after = dict(captured["model"].named_parameters())
    lora = [k for k in after if "lora_" in k]
    base = [k for k in after if "lora_" not in k]
    assert lora and base
    assert all(torch.equal(after[k], captured["before"][k]) for k in base)
    assert all(not after[k].requires_grad for k in base)
    assert any(not torch.equal(after[k], captured["before"][k]) for k in lora if "lora_B" in k)


@pytest.mark.numerics
def test_resume_continues_to_the_same_adapters_and_epsilon_as_an_uninterrupted_run(
    dp_run, tiny_model_dir, tmp_path
):
    out, _ = dp_run  # 4 steps with checkpoints at 2 and 4
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    run(
        tiny_model_dir,
        resumed,
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--resume_from_checkpoint",
        str(out / "private_run_record" / "checkpoints" / "step_000002"),
    )
    full, cont = (
        read(out / "adapter" / "privacy_report.json"),
        read(resumed / "adapter" / "privacy_report.json"),
    )
    assert cont["steps_taken"] == full["steps_taken"] == 4
    assert cont["lineage"] == [{"resumed_at_step": 2, "secure_mode": False}] and full["lineage"] == []
    # the same accountant on the same (sigma, q, steps) history: equal up to fp64 roundings of the PRV
    # composition (rel 1e-9
    # is ~4e6 ulps spare); one step more or less changes epsilon by 3.6-4.6%
    assert cont["epsilon"] == pytest.approx(full["epsilon"], rel=1e-9)
    # epsilon(2 + 2 resumed) == epsilon(4) computed from scratch (a history of 2 + 2 entries vs one of 4: rel 1e-6)
    assert cont["epsilon"] == pytest.approx(
        privacy.epsilon_after(4, full["noise_multiplier"], full["sample_rate"], full["delta"], "prv"),
        rel=1e-6,
    )
    state = read(resumed / "private_run_record" / "checkpoints" / "step_000004" / "privacy_record.json")
    assert sum(h[2] for h in state["accountant_history"]) == 4
    a, b = adapter_tensors(out / "adapter"), adapter_tensors(resumed / "adapter")
    # bitwise: seeded, the same draws, noise and ops on the same shapes in one process (numerics: rerun at
    # other thread counts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_latest_picks_the_highest_step(dp_run, tiny_model_dir, tmp_path):
    import shutil

    out, _ = dp_run
    copy = tmp_path / "copy"
    shutil.copytree(out / "private_run_record" / "checkpoints", copy / "private_run_record" / "checkpoints")
    run(tiny_model_dir, copy, "--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "latest")
    assert read(copy / "adapter" / "privacy_report.json")["epsilon"] == pytest.approx(
        read(out / "adapter" / "privacy_report.json")["epsilon"]
    )


RESUME_CHANGES = {  # one change per key resume must refuse: the mechanism, the threat model, the split, model and LoRA
    "max_grad_norm": ["--max_grad_norm", "0.5"],
    "sample_rate": ["--logical_batch_size", "8"],
    "noise_multiplier": ["--epsilon", "8"],
    "delta": ["--delta", "1e-6"],
    "planned_steps": ["--max_steps", "5"],
    "accountant": ["--accountant", "rdp"],
    "dp_enabled": ["--disable_dp"],
    "secure_mode": ["--secure_mode"],
    "split": ["--test_fraction", "0.1"],
    "split ": ["--validation_fraction", "0.1"],
    "split  ": ["--train_sample_fraction", "0.9"],
    "split   ": ["--split_seed", "1"],
    "max_seq_length": ["--max_seq_length", "200"],
    "lora": ["--lora_r", "4"],
    "lora ": ["--lora_target_modules", "q_proj"],
    "seed": ["--seed", "7"],
    "optimizer": ["--optimizer", "sgd"],
}


@pytest.mark.parametrize(
    "key", list(RESUME_CHANGES), ids=[f"{k.strip()}:{v[0]}" for k, v in RESUME_CHANGES.items()]
)
def test_resume_refuses_a_change_of_mechanism_threat_model_split_model_or_lora(
    dp_run, tiny_model_dir, tmp_path, key, capsys
):
    out, _ = dp_run
    argv = [
        "--model",
        tiny_model_dir,
        "--output_dir",
        str(tmp_path / "o"),
        *FAST,
        "--max_steps",
        "4",
        "--resume_from_checkpoint",
        str(out / "private_run_record" / "checkpoints" / "step_000002"),
        *RESUME_CHANGES[key],
    ]
    assert train_dp_lora.cli_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: cannot resume from") and f"{key.strip()}: checkpoint" in lines[0]
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_resume_refuses_another_dataset_and_another_model(dp_run, tiny_model_dir, tmp_path, capsys):
    from conftest import build_tiny_vaultgemma, bundled_cards, write_cards
    from utils.model_loading import load_tokenizer

    out, _ = dp_run
    checkpoint = str(out / "private_run_record" / "checkpoints" / "step_000002")
    other_data = write_cards(tmp_path / "other.jsonl", bundled_cards()[1:])
    base = [
        "--model",
        tiny_model_dir,
        "--output_dir",
        str(tmp_path / "o"),
        *FAST,
        "--max_steps",
        "4",
        "--resume_from_checkpoint",
        checkpoint,
    ]
    assert train_dp_lora.cli_main([*base, "--dataset", other_data]) == 2
    assert "dataset_fingerprint: checkpoint" in capsys.readouterr().err
    other_model = tmp_path / "other_model"
    tokenizer = load_tokenizer(tiny_model_dir)
    build_tiny_vaultgemma(len(tokenizer), seed=1, intermediate_size=96).save_pretrained(other_model)
    tokenizer.save_pretrained(other_model)
    base[1] = str(other_model)
    assert train_dp_lora.cli_main(base) == 2
    assert "model: checkpoint" in capsys.readouterr().err


def test_budget_guard_stops_before_epsilon_passes_the_target(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # Pretend calibration came out too low: the guard, not the calibration, must then keep epsilon <= target.
    honest = privacy.calibrate_noise
    monkeypatch.setattr(privacy, "calibrate_noise", lambda *a, **k: 0.6 * honest(*a, **k))
    run(tiny_model_dir, tmp_path, "--max_steps", "6", "--save_steps", "0")
    report = read(tmp_path / "adapter" / "privacy_report.json")
    assert (
        read(tmp_path / "private_run_record" / "results.json")["stopped_by_budget"]
        and report["steps_taken"] < 6
    )
    assert report["epsilon"] <= 3.0
    assert (
        privacy.epsilon_after(
            report["steps_taken"] + 1,
            report["noise_multiplier"],
            report["sample_rate"],
            report["delta"],
            "prv",
        )
        > 3.0
    )
    assert "would take epsilon past the target" in capsys.readouterr().out


def test_loss_threshold_checkpoint_is_marked_as_selected_on_private_data(tiny_model_dir, tmp_path):
    run(tiny_model_dir, tmp_path, "--max_steps", "2", "--save_steps", "0", "--save_loss_threshold", "100")
    selected = read(
        tmp_path / "private_run_record" / "checkpoints" / "step_000001" / "adapter" / "privacy_report.json"
    )
    assert selected["selected_on_private_data"] and "save_loss_threshold" in selected["selection"]
    assert not read(tmp_path / "adapter" / "privacy_report.json")[
        "selected_on_private_data"
    ]  # the final adapters are the last step's


def test_disable_dp_runs_the_same_loop_without_a_guarantee(tiny_model_dir, tmp_path):
    results = run(tiny_model_dir, tmp_path, "--max_steps", "2", "--save_steps", "0", "--disable_dp")
    report = read(tmp_path / "adapter" / "privacy_report.json")
    assert not report["dp_enabled"] and report["noise_multiplier"] == 0.0
    assert (
        report["epsilon"] is None and report["delta"] is None and report["target_epsilon"] is None
    )  # no claim at all
    assert report["guarantee"] == "NO privacy guarantee (trained with --disable_dp)"
    assert results["steps"] == 2 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_bad_arguments_are_all_reported_at_once(capsys):
    code = train_dp_lora.cli_main(
        [
            "--epsilon",
            "0",
            "--max_grad_norm",
            "-1",
            "--lora_r",
            "0",
            "--learning_rate",
            "0",
            "--validation_fraction",
            "0.6",
            "--test_fraction",
            "0.6",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    for fragment in ["--epsilon", "--max_grad_norm", "--lora_r", "--learning_rate", "--validation_fraction"]:
        assert fragment in err


def test_delta_not_below_one_over_n_is_refused(tiny_model_dir, tmp_path, capsys):
    code = train_dp_lora.cli_main(
        ["--model", tiny_model_dir, "--output_dir", str(tmp_path), *FAST, "--delta", "0.01"]
    )
    assert code == 2 and "--delta 0.01 must be in (0, 1/N)" in capsys.readouterr().err


def test_bad_data_file_gives_one_line_error(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nQ?,A.\n", encoding="utf-8")
    args = ["--model", tiny_model_dir, "--output_dir", str(tmp_path / "o"), *FAST, "--dataset", str(bad)]
    assert train_dp_lora.cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "missing column(s) input, output" in err and len(err.splitlines()) == 1


def test_wandb_offline_run_records_epsilon_and_loss(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    args = train_dp_lora.parse_args(
        [
            "--model",
            tiny_model_dir,
            "--output_dir",
            str(tmp_path),
            *FAST,
            "--max_steps",
            "2",
            "--save_steps",
            "0",
            "--report_to",
            "wandb",
        ]
    )
    train_dp_lora.main(args)
    out = capsys.readouterr().out
    assert "wandb sync" in out
    runs = list(tmp_path.glob("private_run_record/tracking/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # wandb-core writes the history as protobuf records whose values are JSON text: find the logged values in it
    records = runs[0].read_bytes()
    report = read(tmp_path / "adapter" / "privacy_report.json")
    assert json.dumps(report["epsilon"]).encode() in records  # the final epsilon, logged at the last step
    for key in [b"privacy/epsilon", b"privacy/delta", b"train/loss", b"train/lr"]:
        assert records.count(key) >= 2, key  # one history row per optimizer step


def test_4bit_base_trains_lora_adapters_under_dp(tiny_model_dir, tmp_path, monkeypatch):
    import bitsandbytes as bnb

    captured = {}
    build = train_dp_lora.build_model
    monkeypatch.setattr(
        train_dp_lora, "build_model", lambda *a, **k: captured.setdefault("model", build(*a, **k))
    )
    run(tiny_model_dir, tmp_path, "--max_steps", "2", "--save_steps", "0", "--load_in_4bit")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in captured["model"].modules())
    assert all(p.dtype == torch.float32 for p in captured["model"].parameters() if p.requires_grad)
    report = read(tmp_path / "adapter" / "privacy_report.json")
    assert report["steps_taken"] == 2 and report["epsilon"] <= 3.0
    assert any(v.abs().sum() > 0 for k, v in adapter_tensors(tmp_path / "adapter").items() if "lora_B" in k)


def test_tensorboard_tracker_records_epsilon_per_step(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(
        tiny_model_dir,
        tmp_path,
        "--max_steps",
        "2",
        "--save_steps",
        "0",
        "--report_to",
        "tensorboard",
        "--epsilon_log_steps",
        "1",
    )
    events = [p.parent for p in tmp_path.rglob("events.out.tfevents.*")]
    assert events
    scalars = {}
    for directory in set(events):
        accumulator = EventAccumulator(str(directory))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [event.value for event in accumulator.Scalars(tag)]
    assert (
        len(scalars["privacy/epsilon"]) == 2 and scalars["privacy/epsilon"][0] < scalars["privacy/epsilon"][1]
    )
    # TensorBoard stores fp32 scalars: rounding to fp32 is <= 6e-8 relative; rel 1e-6 allows 16 fp32 ulps
    assert scalars["privacy/epsilon"][1] == pytest.approx(
        read(tmp_path / "adapter" / "privacy_report.json")["epsilon"], rel=1e-6
    )
    assert len(scalars["train/loss"]) == 2


def test_yaml_config_sets_flags_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "epsilon: 8\nlora_r: 4\nlora_target_modules: [q_proj, v_proj]\ndisable_dp: false\n", encoding="utf-8"
    )
    args = train_dp_lora.parse_args(["--config", str(config), "--lora_r", "16"])
    assert (
        args.privacy.epsilon == 8
        and args.lora.lora_r == 16
        and args.lora.lora_target_modules == ["q_proj", "v_proj"]
    )
    config.write_text("epsilom: 8\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        train_dp_lora.parse_args(["--config", str(config)])


def test_non_private_backward_leaves_out_and_counts_a_nan_example(
    tiny_model_dir, tiny_tokenizer, monkeypatch
):
    from utils.data import collate
    from utils.prompt import encode_example

    args = train_dp_lora.parse_args(["--model", tiny_model_dir, "--lora_dropout", "0"])
    model = train_dp_lora.build_model(args, tiny_tokenizer, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    poisoned = encode_example(tiny_tokenizer, "What is insulin?", "A hormone.")
    healthy = encode_example(tiny_tokenizer, "What is renin?", "An enzyme made by the kidney.")
    assert len(poisoned["input_ids"]) != len(healthy["input_ids"])
    real = training.per_example_loss

    def nan_for_poisoned_rows(m, b):  # a NaN made inside the graph, as a real overflow would be
        rows_poisoned = b["attention_mask"].sum(1) == len(poisoned["input_ids"])
        return real(m, b) * torch.where(rows_poisoned, float("nan"), 1.0)

    monkeypatch.setattr(training, "per_example_loss", nan_for_poisoned_rows)
    losses, nonfinite = training.backward_examples(
        model,
        collate([poisoned, healthy], tiny_tokenizer.pad_token_id),
        params,
        dp=False,
        logical_batch_size=2,
    )
    assert nonfinite == 1 and torch.isnan(losses[0]) and torch.isfinite(losses[1])
    with_nan = [p.grad.clone() for p in params]
    assert all(torch.isfinite(g).all() for g in with_nan)
    for p in params:  # the gradient is exactly that of the healthy example alone, over the logical batch
        p.grad = None
    training.backward_examples(
        model, collate([healthy], tiny_tokenizer.pad_token_id), params, dp=False, logical_batch_size=2
    )
    # an fp32 model on a 2-row padded batch vs the row alone: fp32 kernels on other shapes, a few ulps per op through
    # 2 layers and back (observed 0); a NaN that leaked through 0 * NaN is inf here, dividing by 1 not 2 is 8.4e6 ulps
    assert_close_scaled(
        with_nan, [p.grad for p in params], 256, eps=FP32_EPS, why="fp32 model, other batch shape"
    )


def test_a_second_secure_mode_resume_of_one_checkpoint_is_a_fork_refused_unless_its_cost_is_accepted(
    tiny_model_dir, tmp_path, capsys
):
    first = tmp_path / "first"
    run(tiny_model_dir, first, "--max_steps", "3", "--save_steps", "1", "--secure_mode")
    checkpoint = str(first / "private_run_record" / "checkpoints" / "step_000001")
    resume = [
        "--max_steps",
        "3",
        "--save_steps",
        "0",
        "--secure_mode",
        "--resume_from_checkpoint",
        checkpoint,
    ]
    run(tiny_model_dir, tmp_path / "branch_a", *resume)  # the first resume: one branch, one run's epsilon
    argv = ["--model", tiny_model_dir, "--output_dir", str(tmp_path / "branch_b"), *FAST, *resume]
    assert train_dp_lora.cli_main(argv) == 2
    assert "already resumed 1 time(s) in --secure_mode" in capsys.readouterr().err
    run(tiny_model_dir, tmp_path / "branch_b", *resume, "--accept_forked_resume")
    a, b = (
        read(tmp_path / "branch_a" / "adapter" / "privacy_report.json"),
        read(tmp_path / "branch_b" / "adapter" / "privacy_report.json"),
    )
    # the same history on both branches: equal epsilons (approx's rel 1e-6 is spare); 1 + 2 + 2 composed vs 5 from
    # scratch: the PRV composition of a regrouped history, rel 1e-6 (one step more or less: >= 3%)
    assert a["forks"] == 0 and b["forks"] == 1 and b["epsilon"] == pytest.approx(a["epsilon"])
    # both branches share step 1 and each took 2 more: 1 + 2 + 2 steps composed
    assert b["epsilon_with_forks"] == pytest.approx(
        privacy.epsilon_after(5, b["noise_multiplier"], b["sample_rate"], b["delta"], "prv"), rel=1e-6
    )
    assert b["epsilon_with_forks"] > b["epsilon"] and "forked resume" in b["guarantee"]


def test_freeze_a_trains_b_only_and_saves_a_at_its_random_init(tiny_model_dir, tmp_path):
    # the same seed gives the same LoRA init: A after training with A frozen equals A of a 0-lr run's init
    frozen = run(
        tiny_model_dir, tmp_path / "frozen", "--max_steps", "2", "--lora_freeze_a", "--learning_rate", "0.05"
    )
    run(tiny_model_dir, tmp_path / "init", "--max_steps", "1", "--lora_freeze_a", "--learning_rate", "1e-12")
    full = run(tiny_model_dir, tmp_path / "full", "--max_steps", "1", "--lora_freeze_a", "false")  # A trained
    trained, start = (
        adapter_tensors(tmp_path / "frozen" / "adapter"),
        adapter_tensors(tmp_path / "init" / "adapter"),
    )
    a_keys = [k for k in trained if ".lora_A." in k]
    assert a_keys and all(torch.equal(trained[k], start[k]) for k in a_keys)  # A never moved
    assert any(not torch.equal(trained[k], start[k]) for k in trained if ".lora_B." in k)  # B did
    b_count = sum(v.numel() for k, v in trained.items() if ".lora_B." in k)
    assert frozen["trainable_parameters"] == b_count < full["trainable_parameters"]


def test_final_checkpoint_is_written_once_when_the_last_step_is_a_save_step(
    tiny_model_dir, tmp_path, monkeypatch
):
    written, save = [], train_dp_lora.save_checkpoint

    def counted(run, trainer, step, *rest):
        written.append(step)
        return save(run, trainer, step, *rest)

    monkeypatch.setattr(train_dp_lora, "save_checkpoint", counted)
    run(tiny_model_dir, tmp_path / "on_grid", "--max_steps", "2", "--save_steps", "2")
    assert written == [2]  # the loop's save, not a second one by finish
    run(tiny_model_dir, tmp_path / "off_grid", "--max_steps", "1", "--save_steps", "2")
    assert (
        written == [2, 1]
        and (tmp_path / "off_grid" / "private_run_record" / "checkpoints" / "step_000001").is_dir()
    )
