"""bench/gpu_check.py runs every part at tiny sizes on CPU, so the GPU check is ready whenever a GPU is.

One in-process run of `--device cpu --tiny` (all four parts, the end-to-end scripts as subprocesses)
checked for the report's structure and the correctness verdicts; small pure functions beside it.
"""

import json
import re
from pathlib import Path

import pytest

from bench import gpu_check, offline_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("gpu_check")
    report = gpu_check.main(gpu_check.parse_args(["--device", "cpu", "--tiny", "--output_dir", str(output)]))
    return report, output


def test_tiny_run_writes_json_and_markdown_with_every_part(tiny_run):
    report, output = tiny_run
    assert json.loads((output / gpu_check.JSON_NAME).read_text()) == json.loads(
        json.dumps(gpu_check._json_safe(report))
    )
    markdown = (output / gpu_check.MARKDOWN_NAME).read_text()
    for heading in (
        "## Parts",
        "## Correctness",
        "## Step cost",
        "## Generation",
        "## End to end",
        "## Goals",
    ):
        assert heading in markdown
    assert re.search(r"^\| 16 \| A \| \d+ \| dp_ew \|", markdown, re.M)
    assert report["environment"]["missing"] == [] and report["status"] == "done"
    assert list(report["parts"]) == list(gpu_check.PARTS)
    assert all(part["wall_s"] <= part["limit_s"] + 30 for part in report["parts"].values())
    assert report["model_shape"] == offline_model.TINY.as_dict()


def test_tiny_run_correctness_checks_pass(tiny_run):
    correctness = tiny_run[0]["parts"]["correctness"]
    assert correctness["status"] == "passed", correctness.get("traceback") or correctness["checks"]
    checks = correctness["checks"]
    assert set(checks) == {
        "per_sample_grads_ew",
        "per_sample_grads_hooks",
        "per_sample_grads_functorch",
        "chunked_head_vs_full_logits",
        "dp_noise_seeded",
        "dp_noise_secure",
        "nf4_base_trains",
    }
    for mode in gpu_check.GRAD_SAMPLE_MODES:
        check = checks[f"per_sample_grads_{mode}"]
        assert check["passed"] and len(check["per_row_error_ulps"]) == correctness["rows"] == 3
    assert len(set(correctness["row_lengths"])) == 3  # the rows differ in length: padding is exercised
    for name in ("dp_noise_seeded", "dp_noise_secure"):
        assert (
            checks[name]["clip_passed"]
            and checks[name]["noise_passed"]
            and checks[name]["expected_std"] == pytest.approx(1 / 3)
        )
    nf4 = checks["nf4_base_trains"]
    assert nf4["passed"] is True or nf4["status"].startswith("skipped: bitsandbytes")


def test_tiny_run_step_part_searches_batches_and_measures_both_groups(tiny_run):
    step = tiny_run[0]["parts"]["step"]
    assert step["status"] == "ok", step.get("traceback")
    (entry,) = step["results"]
    assert entry["seq_len"] == 16
    assert set(entry["batch_search"]) == {
        "nonprivate",
        "dp_ew",
        "dp_hooks",
        "dp_functorch",
        "notebook",
        "hf_nonprivate",
    }
    for search in entry["batch_search"].values():
        assert 1 <= search["max_batch_size"] <= 4 and all(
            p["fits"] == (p["peak_bytes"] is not None and p["peak_bytes"] <= p["room_bytes"])
            for p in search["probes"]
        )
    group_a, group_b = entry["groups"]["A"], entry["groups"]["B"]
    assert set(group_a["arms"]) == {"nonprivate", "dp_ew", "dp_hooks", "dp_functorch"}
    assert set(group_b["arms"]) == {"nonprivate", "dp_ew", "notebook", "hf_nonprivate"}
    assert group_b["batch_size"] <= group_a["batch_size"]
    assert {"dp_ew/nonprivate", "dp_hooks/nonprivate", "dp_functorch/nonprivate"} <= set(group_a["ratios"])
    assert {"dp_ew/hf_nonprivate", "notebook/dp_ew"} <= set(group_b["ratios"])
    for arm in group_a["arms"].values():
        assert (
            arm["median_s"] > 0 and arm["examples_per_s"] > 0 and arm["tokens_per_s"] > 0 and arm["mfu"] > 0
        )
    assert set(entry["dp_phases"]["dp"]) >= {
        "body_forward_s",
        "head_forward_s",
        "backward_s",
        "optimizer_step_s",
    }
    assert "MFU" in entry["mfu_limits"]
    goals = tiny_run[0]["goals"]
    assert {
        "dp_vs_nonprivate_time_T16",
        "dp_vs_nonprivate_memory_T16",
        "dp_vs_hf_nonprivate_time_T16",
        "dp_mfu_T16",
    } <= set(goals)


def test_tiny_run_generation_and_end_to_end(tiny_run):
    report = tiny_run[0]
    runs = report["parts"]["generate"]["runs"]
    assert [(r["batch_size"], r["merged"]) for r in runs] == [(1, False), (1, True), (4, False), (4, True)]
    assert all(r["answer_tokens_per_s"] > 0 and "speedup_vs_batch1" in r for r in runs)
    e2e = report["parts"]["end_to_end"]
    assert e2e["status"] == "ok", {
        k: e2e.get(k, {}).get("stderr_tail") for k in ("train", "infer", "evaluate")
    }
    assert e2e["max_steps"] == 2 and e2e["train"]["rc"] == 0
    assert 0 < e2e["train"]["epsilon"] <= 8.0 and e2e["train"]["source"]
    assert e2e["infer"]["rc"] == 0 and e2e["evaluate"]["rc"] == 0 and e2e["evaluate"]["results"]


# -----------------------------------------------------------------------------
# the pieces


def test_read_epsilon_prefers_the_bundle_report_then_the_old_layout_then_stdout(tmp_path):
    stdout = (
        "***** Running DP LoRA training *****\nDone: 2 steps, train loss 6.3\n"
        "  DP-trained: epsilon <= 7.50, delta = 1e-05\n"
    )
    assert gpu_check.read_epsilon(tmp_path, stdout) == {"epsilon": 7.5, "source": "stdout, at the Done: line"}
    assert gpu_check.read_epsilon(tmp_path, "Done: 3 steps; epsilon = 2.5000 (target 3)")["epsilon"] == 2.5
    (tmp_path / "privacy_report.json").write_text(json.dumps({"epsilon": 2.0, "delta": 1e-5, "steps": 4}))
    assert gpu_check.read_epsilon(tmp_path, stdout)["source"] == "privacy_report.json"
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "privacy_report.json").write_text(
        json.dumps({"epsilon": 1.25, "delta": 1e-5, "steps_taken": 4})
    )
    assert gpu_check.read_epsilon(tmp_path, stdout) == {
        "epsilon": 1.25,
        "source": "adapter/privacy_report.json",
        "delta": 1e-5,
        "steps": 4,
    }
    assert gpu_check.read_epsilon(tmp_path / "none", "no summary")["epsilon"] is None


def test_flops_and_parameter_counts_at_vaultgemma_1b_shapes():
    shape = offline_model.VAULTGEMMA_1B
    counts = gpu_check.parameter_counts(shape)
    per_layer = 1152 * 1024 + 2 * 1152 * 256 + 1024 * 1152 + 3 * 1152 * 6912
    assert counts["body"] == 26 * per_layer and counts["embedding_head"] == 256000 * 1152
    assert 0.95e9 < counts["total"] < 1.05e9  # "1B"
    flops = gpu_check.model_flops(shape, batch_size=2, seq_len=128, answer_tokens=100)
    assert flops == 4 * counts["body"] * 256 + 12 * 26 * 4 * 256 * 2 * 128**2 + 4 * 256000 * 1152 * 100


def test_tiny_changes_only_flags_left_at_their_defaults():
    args = gpu_check.parse_args(["--tiny", "--seq_lens", "24", "--steps", "2"])
    gpu_check.apply_tiny(args)
    assert args.step.seq_lens == [24] and args.step.steps == 2 and args.step.warmup_steps == 0
    assert args.model.hidden_size == offline_model.TINY.hidden_size and args.check.dtype == "float32"
    explicit = gpu_check.parse_args(
        ["--tiny", "--dtype", "bfloat16", "--steps=3"]
    )  # given flags win, even at their defaults
    gpu_check.apply_tiny(explicit)
    assert explicit.check.dtype == "bfloat16" and explicit.step.steps == 3 and explicit.step.warmup_steps == 0
    untouched = gpu_check.parse_args(["--seq_lens", "24"])
    gpu_check.apply_tiny(untouched)
    assert untouched.model.vocab_size == 256000 and untouched.step.steps == 3


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in (
        "--time_budget_s",
        "--correctness_s",
        "--step_s",
        "--generate_s",
        "--end_to_end_s",
        "--peak_tflops",
        "--hf_pad_to",
    ):
        assert name in text
    assert "(default: 450.0)" in text and "(default: 989.0)" in text


def test_a_missing_package_is_one_line_and_exit_status_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(
        gpu_check, "REQUIRED", gpu_check.REQUIRED + [("no_such_module_xyz", "no-such-dist", None, "testing")]
    )
    with pytest.raises(gpu_check.CheckError):
        gpu_check.main(gpu_check.parse_args(["--device", "cpu", "--tiny", "--output_dir", str(tmp_path)]))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("missing:")]
    assert len(lines) == 1 and lines[0].startswith("missing: no-such-dist (needed for testing)")
    written = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    assert written["status"] == "environment incomplete" and written["parts"] == {}


def test_wheel_list_fits_what_may_travel_and_names_the_bitsandbytes_size():
    sizes = gpu_check.wheel_sizes()
    carried = {name: size for name, (_, size, is_carried) in sizes.items() if is_carried}
    assert {"opacus", "scipy", "dp-accounting", "rouge-score", "nltk"} <= set(carried)
    tree = 2 * 2**20  # the working tree is well under this
    assert sum(carried.values()) + tree < 64 * 2**20
    version, size, is_carried = sizes["bitsandbytes"]
    assert not is_carried and sum(carried.values()) + size + tree > 64 * 2**20
    script = (REPO / "bench" / "fetch_gpu_wheels.sh").read_text()
    assert (
        "gpu_wheels.txt" in script and "--only-binary=:all:" in script and "--python-version 3.12" in script
    )
    command = (
        (REPO / "bench" / "GPU_CHECK.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].strip()
    )
    assert len(command) <= 2000 and "bench/gpu_check.py" in command and "$OUT" in command


@pytest.mark.parametrize("quadratic, expected", [(0.0, 88), (0.05, 64)])
def test_batch_search_fits_a_line_then_bisects_below_a_prediction_that_does_not_fit(
    monkeypatch, quadratic, expected
):
    """peak(B) = 100 + 10 B (+ quadratic B^2) bytes in 1000 bytes of room: the largest fit, rounded down to 8s."""
    from types import SimpleNamespace

    ctx = SimpleNamespace(
        args=SimpleNamespace(step=SimpleNamespace(search_start_tokens=64, max_batch_size=1024))
    )
    tried = []

    def fake_probe(ctx, model, params, name, b, seq_len):
        tried.append(b)
        return 100 + 10 * b + quadratic * b * b

    monkeypatch.setattr(gpu_check, "probe", fake_probe)
    monkeypatch.setattr(gpu_check, "free_bytes", lambda ctx: 1000)
    found = gpu_check.search_batch(ctx, None, None, "dp_ew", 16, gpu_check.Clock(60))
    best = found["max_batch_size"]
    assert 100 + 10 * best + quadratic * best * best <= 1000
    assert best == expected and tried[:2] == [4, 8] and len(tried) <= 8
    assert all(p["fits"] == (p["batch_size"] <= best) for p in found["probes"])
