"""bench/ runs end to end on tiny models and writes its JSON (a smoke test, not a timing test)."""

import json

from bench import bench_generate, bench_step


def test_bench_step_main_measures_every_arm_and_writes_json(tmp_path):
    output = tmp_path / "step.json"
    args = bench_step.parse_args([
        "--vocab_size", "300", "--hidden_size", "16", "--intermediate_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
        "--seq_lens", "12", "--tokens_per_batch", "36", "--steps", "1", "--warmup_steps", "0",
        "--grad_sample_modes", "ew", "hooks", "--output", str(output),
    ])
    report = bench_step.main(args)
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    (result,) = report["results"]
    assert (result["seq_len"], result["batch_size"], result["answer_tokens"]) == (12, 3, 3 * 6)
    assert set(result["arms"]) == {"nonprivate", "dp_ew", "dp_hooks", "notebook"}
    for arm in result["arms"].values():
        assert len(arm["times_s"]) == 1 and arm["median_s"] > 0 and arm["peak_bytes"] > 0
    assert set(result["ratios"]) == {"dp_ew/nonprivate", "notebook/dp_ew", "dp_hooks/nonprivate", "notebook/dp_hooks"}
    assert report["model"]["vocab_size"] == 300 and report["memory_method"] == bench_step.MEMORY_METHOD["cpu"]


def test_bench_step_full_logits_of_the_notebook_path_show_in_its_memory(tmp_path):
    """The notebook's B x T x V logits dwarf the answer-only chunk at a large vocabulary."""
    args = bench_step.parse_args([
        "--vocab_size", "20000", "--hidden_size", "16", "--intermediate_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
        "--seq_lens", "32", "--tokens_per_batch", "128", "--steps", "1", "--warmup_steps", "0", "--output", str(tmp_path / "step.json"),
    ])
    (result,) = bench_step.main(args)["results"]
    mode = bench_step.DEFAULT_GRAD_SAMPLE_MODE
    assert result["ratios"][f"notebook/dp_{mode}"]["memory"] > 2
    assert result["ratios"][f"dp_{mode}/nonprivate"]["memory"] < 1.05


def test_bench_generate_main_compares_batched_and_merged_with_one_at_a_time(tiny_model_dir, tmp_path):
    output = tmp_path / "generate.json"
    report = bench_generate.main(bench_generate.parse_args([
        "--model", tiny_model_dir, "--questions", "4", "--batch_size", "2", "--max_new_tokens", "4", "--output", str(output),
    ]))
    assert [run["name"] for run in report["runs"]] == ["one_at_a_time", "batched", "batched_merged"]
    assert [run["batch_size"] for run in report["runs"]] == [1, 2, 2]
    assert all(len(run["answers"]) == 4 and run["seconds"] > 0 for run in report["runs"])
    assert json.loads(output.read_text())["runs"][0]["speedup_vs_one_at_a_time"] == 1.0
