"""bench/ runs end to end on tiny models and writes its JSON (a smoke test, not a timing test)."""

import json
import re
from pathlib import Path

from bench import bench_generate, bench_step

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_bench_step_main_measures_every_arm_and_writes_json(tmp_path):
    output = tmp_path / "step.json"
    args = bench_step.parse_args(
        [
            "--vocab_size",
            "300",
            "--hidden_size",
            "16",
            "--intermediate_size",
            "32",
            "--num_hidden_layers",
            "1",
            "--num_attention_heads",
            "2",
            "--seq_lens",
            "12",
            "--tokens_per_batch",
            "36",
            "--steps",
            "1",
            "--warmup_steps",
            "0",
            "--grad_sample_modes",
            "ew",
            "hooks",
            "--output",
            str(output),
        ]
    )
    report = bench_step.main(args)
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    (result,) = report["results"]
    assert (result["seq_len"], result["batch_size"], result["answer_tokens"]) == (12, 3, 3 * 6)
    assert set(result["arms"]) == {"nonprivate", "dp_ew", "dp_hooks", "notebook", "hf_nonprivate"}
    for arm in result["arms"].values():
        assert len(arm["times_s"]) == 1 and arm["median_s"] > 0 and arm["peak_bytes"] > 0
    assert set(result["ratios"]) == {
        "dp_ew/nonprivate",
        "notebook/dp_ew",
        "dp_ew/hf_nonprivate",
        "dp_hooks/nonprivate",
        "notebook/dp_hooks",
        "dp_hooks/hf_nonprivate",
    }
    assert result["hf_padded_len"] == bench_step.HF_PAD_TO == 128
    assert report["model"]["vocab_size"] == 300 and report["memory_method"] == bench_step.MEMORY_METHOD["cpu"]


def test_bench_step_full_logits_of_the_notebook_path_show_in_its_memory(tmp_path):
    """The notebook's B x T x V logits dwarf the answer-only chunk at a large vocabulary."""
    args = bench_step.parse_args(
        [
            "--vocab_size",
            "20000",
            "--hidden_size",
            "16",
            "--intermediate_size",
            "32",
            "--num_hidden_layers",
            "1",
            "--num_attention_heads",
            "2",
            "--seq_lens",
            "32",
            "--tokens_per_batch",
            "128",
            "--steps",
            "1",
            "--warmup_steps",
            "0",
            "--output",
            str(tmp_path / "step.json"),
        ]
    )
    (result,) = bench_step.main(args)["results"]
    mode = bench_step.DEFAULT_GRAD_SAMPLE_MODE
    assert result["ratios"][f"notebook/dp_{mode}"]["memory"] > 2
    assert result["ratios"][f"dp_{mode}/nonprivate"]["memory"] < 1.05
    assert (
        result["ratios"][f"dp_{mode}/hf_nonprivate"]["memory"] < 0.5
    )  # full logits of rows padded to 128 tokens


def test_hf_nonprivate_pads_rows_to_the_notebook_length_and_can_be_left_out(tmp_path):
    batch = bench_step.synthetic_batch(2, 12, 300, 0.5, 0, "cpu")
    padded = bench_step.pad_rows(batch, 16)
    assert padded["input_ids"].shape == (2, 16) and (padded["input_ids"][:, 12:] == 0).all()
    assert (padded["attention_mask"][:, 12:] == 0).all() and (padded["labels"][:, 12:] == -100).all()
    assert bench_step.pad_rows(batch, 8) is batch
    report = bench_step.main(
        bench_step.parse_args(
            [
                "--vocab_size",
                "300",
                "--hidden_size",
                "16",
                "--intermediate_size",
                "32",
                "--num_hidden_layers",
                "1",
                "--num_attention_heads",
                "2",
                "--seq_lens",
                "12",
                "--tokens_per_batch",
                "24",
                "--steps",
                "1",
                "--warmup_steps",
                "0",
                "--skip_notebook",
                "--skip_hf_nonprivate",
                "--output",
                str(tmp_path / "step.json"),
            ]
        )
    )
    (result,) = report["results"]
    assert (
        set(result["arms"]) == {"nonprivate", f"dp_{bench_step.DEFAULT_GRAD_SAMPLE_MODE}"}
        and result["hf_padded_len"] is None
    )


def test_bench_imports_only_utils_and_bench_modules_never_a_script():
    scripts = ("train_dp_lora", "evaluate_qa", "infer", "audit_privacy")
    for path in BENCH.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        for script in scripts:
            assert not re.search(rf"^\s*(import|from)\s+{script}\b", source, re.M), (
                f"{path.name} imports {script}"
            )


def test_bench_generate_main_compares_batched_and_merged_with_one_at_a_time(tiny_model_dir, tmp_path):
    output = tmp_path / "generate.json"
    report = bench_generate.main(
        bench_generate.parse_args(
            [
                "--model",
                tiny_model_dir,
                "--questions",
                "4",
                "--batch_size",
                "2",
                "--max_new_tokens",
                "4",
                "--output",
                str(output),
            ]
        )
    )
    assert [run["name"] for run in report["runs"]] == ["one_at_a_time", "batched", "batched_merged"]
    assert [run["batch_size"] for run in report["runs"]] == [1, 2, 2]
    assert all(len(run["answers"]) == 4 and run["seconds"] > 0 for run in report["runs"])
    assert json.loads(output.read_text())["runs"][0]["speedup_vs_one_at_a_time"] == 1.0
