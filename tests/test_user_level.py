"""User-level DP (--privacy_unit user): one user, every row sharing --user_column, is the privacy unit.

The properties the user-level claim rests on, one named test each: the split keeps a user's rows
together, the Poisson draw is over users, no user gives more than K rows to a step, removing a user
moves the clipped sum by at most C however its rows are batched, the accountant is charged at q_user
with N_users, resume is bitwise, and example-level runs are unchanged.
"""

import collections
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import train_dp_lora
from conftest import FP32_EPS, REPO, assert_close_scaled, bundled_cards, logical_step_grad, write_cards
from test_privacy_accounting import assert_honest, dp_accounting_event, independent_epsilons
from test_privacy_properties import GRAD_ULPS_FP32, batch_of, examples, lora_model
from utils import data, privacy, training
from utils.privacy_record import PrivacyRecord

STUDENTS = REPO / "data" / "flashcards_by_student.jsonl"
USER = ["--privacy_unit", "user", "--user_column", "student_id", "--max_examples_per_user", "4"]


def read(path):
    return json.loads(Path(path).read_text())


def student_rows():
    return [json.loads(line) for line in STUDENTS.read_text(encoding="utf-8").splitlines() if line.strip()]


# -----------------------------------------------------------------------------
# data: the bundled student file, the split by user, the user column


def test_bundled_student_file_holds_the_bundled_cards_in_students_of_2_to_20_uneven():
    rows = student_rows()
    strip = [{k: v for k, v in r.items() if k != "student_id"} for r in rows]
    assert sorted(map(json.dumps, strip)) == sorted(map(json.dumps, bundled_cards()))
    sizes = collections.Counter(r["student_id"] for r in rows).values()
    assert min(sizes) == 2 and max(sizes) == 20 and len(set(sizes)) >= 10


def test_one_users_rows_never_land_in_two_splits():
    cards, counts = data.clean_rows(student_rows(), user_column="student_id")
    assert counts["skipped_no_user"] == 0 and len(cards) == len(bundled_cards())
    spec = data.SplitSpec(0, 0.2, 0.2, 0.7, user_column="student_id")
    splits = collections.defaultdict(set)
    for card in cards:
        splits[card["student_id"]].add(data.assign_split(card, spec))
    assert all(len(s) == 1 for s in splits.values())
    assert {s for ss in splits.values() for s in ss} == {"train", "validation", "test", "unsampled"}
    # the example-level spec on the same cards does split users (the check has teeth)
    example = data.SplitSpec(0, 0.2, 0.2, 0.7)
    assert any(
        len({data.assign_split(c, example) for c in cards if c["student_id"] == u}) > 1 for u in splits
    )


def test_user_split_spec_round_trips_through_json_and_example_specs_keep_their_earlier_form():
    spec = data.SplitSpec(3, 0.1, 0.05, 0.9, user_column="student_id")
    assert data.SplitSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert "user id" in spec.method
    example = data.SplitSpec(3, 0.1, 0.05, 0.9)
    assert set(example.to_json()) == {
        "seed",
        "validation_fraction",
        "test_fraction",
        "train_sample_fraction",
        "method",
    }
    assert data.SplitSpec.from_json(example.to_json()) == example


def test_missing_user_column_is_one_line_naming_the_columns_found_and_empty_ids_are_a_counted_skip(
    tiny_model_dir, tmp_path, capsys
):
    path = write_cards(tmp_path / "c.jsonl", bundled_cards()[:30])
    argv = [
        "--model",
        tiny_model_dir,
        "--dataset",
        path,
        "--output_dir",
        str(tmp_path / "o"),
        "--report_to",
        "none",
    ]
    assert train_dp_lora.cli_main([*argv, *USER]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no column 'student_id'" in line and "found input, instruction, output" in line
    rows = [dict(r) for r in student_rows()[:10]]
    rows[0]["student_id"], rows[1]["student_id"] = "", None
    _, counts = data.clean_rows(rows, user_column="student_id")
    assert counts["skipped_no_user"] == 2


def test_user_unit_without_user_column_or_with_k_above_the_physical_batch_is_refused(capsys):
    argv = ["--privacy_unit", "user", "--per_device_train_batch_size", "2", "--max_examples_per_user", "3"]
    assert train_dp_lora.cli_main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "needs --user_column" in err
        and "--max_examples_per_user 3 must be <= --per_device_train_batch_size 2" in err
    )


# -----------------------------------------------------------------------------
# sampling and contribution bounding


@pytest.mark.numerics
def test_poisson_draw_over_users_has_a_binomial_mean_and_variance():
    n_users, q, steps = 83, 0.1, 4000
    sampler = privacy.PoissonSampler(n_users, q, seed=5)
    sizes = np.array([len(sampler.draw(t)) for t in range(steps)])
    mean, var = n_users * q, n_users * q * (1 - q)
    se_mean = math.sqrt(var / steps)
    se_var = var * math.sqrt(2 / (steps - 1))  # the normal approximation of the sample variance's s.e.
    assert abs(sizes.mean() - mean) < 5 * se_mean
    assert abs(sizes.var(ddof=1) - var) < 5 * se_var


@pytest.mark.parametrize("secure_mode", [False, True], ids=["seeded", "secure"])
def test_no_user_contributes_more_than_k_rows_to_a_step_and_its_rows_share_one_physical_batch(secure_mode):
    rng = np.random.default_rng(0)
    users, start = [], 0
    for size in rng.integers(1, 12, size=40):
        users.append(list(range(start, start + size)))
        start += size
    lengths = rng.integers(5, 50, size=start).tolist()
    for k, batch in [(1, 1), (3, 4), (4, 4), (6, 8)]:
        for step in range(5):
            chosen = [
                privacy.choose_user_rows(users[u], k, 1, step, u, secure_mode) for u in range(len(users))
            ]
            assert all(
                len(c) == min(k, len(users[u])) and set(c) <= set(users[u]) for u, c in enumerate(chosen)
            )
            batches = privacy.user_physical_batches(chosen, lengths, batch)
            assert all(len(rows) <= batch for rows, _ in batches)
            placed = [
                tuple(sorted(r for r, o in zip(rows, owners) if o == i))
                for rows, owners in batches
                for i in sorted(set(owners))
            ]
            assert sorted(placed) == sorted(tuple(sorted(c)) for c in chosen)  # every user whole, once
            if not secure_mode:  # seeded by (seed, step, user): a resume picks the same rows
                assert chosen == [
                    privacy.choose_user_rows(users[u], k, 1, step, u) for u in range(len(users))
                ]
    assert privacy.choose_user_rows(users[0], 100, 1, 0, 0) == users[0]


# -----------------------------------------------------------------------------
# clipping: removing one user moves the clipped sum by at most C


def user_step_grad(
    model, params, tiny_tokenizer, user_exs, k, per_device, max_grad_norm, aggregate=True, keys=None
):
    """p.grad of one noiseless DP step over these users (expected batch 1: the clipped sum), as train_dp_lora.

    keys: each user's key for its row choice (default its position); a removal keeps the others' keys, so
    the other users choose the same rows (the coupling the sensitivity bound is about)."""
    keys = keys or list(range(len(user_exs)))
    exs = [e for u in user_exs for e in u]
    starts = np.cumsum([0] + [len(u) for u in user_exs]).tolist()
    users = [list(range(starts[i], starts[i + 1])) for i in range(len(user_exs))]
    lengths = [len(e["input_ids"]) for e in exs]
    chosen = [privacy.choose_user_rows(users[u], k, 0, 0, keys[u]) for u in range(len(users))]
    batches = privacy.user_physical_batches(chosen, lengths, per_device)
    optimizer = privacy.make_dp_optimizer(torch.optim.SGD(params, lr=0.0), 0.0, max_grad_norm, 1)

    def backward(rows, owners):
        user_of_row = torch.tensor(owners)
        counts = torch.bincount(user_of_row)
        batch = batch_of(tiny_tokenizer, [exs[r] for r in rows])
        training.backward_examples(model, batch, params, True, 1, 1.0 / counts[user_of_row].double())
        if aggregate:
            privacy.sum_grad_samples_by_user(params, user_of_row, len(counts))

    return logical_step_grad(optimizer, params, [lambda b=b: backward(*b) for b in batches])


@pytest.fixture(scope="module")
def hooked(tiny_model_dir):
    return lora_model(tiny_model_dir, per_sample=True)


@pytest.mark.numerics
def test_removing_one_user_with_all_rows_changes_the_summed_clipped_gradient_by_at_most_C_whatever_k_and_batching(
    hooked, tiny_tokenizer
):
    model, params = hooked
    cards = sorted(bundled_cards()[:60], key=lambda c: len(c["input"]) + len(c["output"]))[:15]
    exs = examples(tiny_tokenizer, cards)
    sizes = [1, 5, 3, 2, 4]
    user_exs = [exs[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]
    C = 1e-2  # below every user's mean-gradient norm here: clipping binds
    # the other users' clipped gradients may move by GRAD_ULPS_FP32 fp32 ulps each (other batch shapes)
    budget = 1 + len(sizes) * GRAD_ULPS_FP32 * FP32_EPS
    for k in (1, 2, 5):
        grads = {}
        for per_device in sorted({k, 5, 8}):
            full = user_step_grad(model, params, tiny_tokenizer, user_exs, k, per_device, C)
            grads[per_device] = full
            for j in range(len(sizes)):
                without = user_step_grad(
                    model,
                    params,
                    tiny_tokenizer,
                    user_exs[:j] + user_exs[j + 1 :],
                    k,
                    per_device,
                    C,
                    keys=[u for u in range(len(sizes)) if u != j],
                )
                assert ((full - without).norm() / C).item() <= budget, (k, per_device, j)
        first = grads[min(grads)]
        for g in grads.values():  # how users fall into physical batches never changes the step
            assert_close_scaled(
                g, first, GRAD_ULPS_FP32, eps=FP32_EPS, why="other physical batches: fp32-limited"
            )
    # the check has teeth: clipping each row (no per-user sum; C small enough that every row clips) lets
    # the 5-row user move the sum by up to 5 C
    tiny = 1e-5
    full = user_step_grad(model, params, tiny_tokenizer, user_exs, 5, 8, tiny, aggregate=False)
    without = user_step_grad(
        model,
        params,
        tiny_tokenizer,
        user_exs[:1] + user_exs[2:],
        5,
        8,
        tiny,
        aggregate=False,
        keys=[0, 2, 3, 4],
    )
    moved = ((full - without).norm() / tiny).item()
    print("per-row clipping: removing the 5-row user moves the sum by", moved, "C")
    assert moved > 1.5


def test_group_privacy_matches_the_chained_bound_computed_directly():
    eps, delta = 0.7, 1e-6
    for k in (1, 2, 7):
        g_eps, g_delta = privacy.group_privacy(eps, delta, k)
        direct = delta * sum(math.exp(i * eps) for i in range(k))  # the chain x_0 ~ x_1 ~ ... ~ x_k
        assert g_eps == k * eps and direct <= g_delta * (1 + 1e-12)
        assert g_delta == pytest.approx(k * math.exp((k - 1) * eps) * delta, rel=1e-15)


# -----------------------------------------------------------------------------
# end to end on the bundled student file

# every field an example-level privacy_report.json had before user-level DP existed
EXAMPLE_REPORT_FIELDS = {
    "dp_enabled", "target_epsilon", "delta", "noise_multiplier", "sample_rate", "max_grad_norm",
    "expected_batch_size", "planned_steps", "accountant", "n_train", "secure_mode", "world_size", "draw_split",
    "split", "unit", "neighbouring_relation", "sampling", "steps_taken", "accountant_history", "epsilon",
    "epsilon_rdp", "epsilon_replace_one", "selected_on_private_data", "selection", "lineage", "forks",
    "epsilon_with_forks", "threat_model", "guarantee", "not_covered", "dp_event",
}  # fmt: skip


@pytest.fixture(scope="module")
def user_run(train_run):
    return train_run(*USER, dataset=str(STUDENTS))


def test_accountant_is_charged_at_q_user_with_n_users_and_dp_accounting_agrees(user_run):
    report = read(user_run / "adapter" / "privacy_report.json")
    summary = read(user_run / "private_run_record" / "data_summary.json")
    n_users = summary["n_train_users"]
    assert report["n_users"] == n_users < report["n_train"] == summary["n_train"]
    assert report["sample_rate"] == report["expected_batch_size"] / n_users == 8 / n_users
    assert report["accountant_history"] == [[report["noise_multiplier"], 8 / n_users, 2]]
    assert report["delta"] < 1 / n_users and report["delta"] == privacy.default_delta(n_users)
    assert report["user_column"] == "student_id" and report["max_examples_per_user"] == 4
    assert report["unit"] == "one user: every row sharing `student_id`"
    pld, rdp = independent_epsilons(dp_accounting_event(report["dp_event"]), report["delta"])
    assert_honest(report["epsilon"], report["target_epsilon"], pld, rdp, "prv")


def test_user_level_report_card_and_guarantee_line_name_the_user(user_run):
    record = PrivacyRecord.read(user_run / "adapter" / "privacy_report.json")
    assert "one user, all rows sharing `student_id`" in record.guarantee_line()
    card = (user_run / "adapter" / "README.md").read_text()
    assert "Privacy unit: one user: every row sharing `student_id`" in card
    assert "at most 4 random rows of each sampled user" in card and "user added or removed" in card
    spec = data.SplitSpec.from_json(record.split)
    assert spec.user_column == "student_id"  # evaluate_qa recomputes held-out users from this


def test_infer_answers_with_one_process_user_level_adapters_and_names_the_user_guarantee(user_run, capsys):
    import infer

    capsys.readouterr()
    assert (
        infer.cli_main(
            ["--adapters", str(user_run), "--question", "What causes gout?", "--max_new_tokens", "4"]
        )
        == 0
    )
    header = capsys.readouterr().out.splitlines()[0]
    assert "one user" in header and "student_id" in header


@pytest.mark.numerics
def test_user_level_resume_continues_to_the_same_adapters_bitwise(
    user_run, train_run, tiny_model_dir, tmp_path
):
    from safetensors.torch import load_file

    resumed = tmp_path / "resumed"
    argv = ["--model", tiny_model_dir, "--dataset", str(STUDENTS), "--output_dir", str(resumed)]
    from conftest import TINY_RUN

    train_dp_lora.main(
        train_dp_lora.parse_args(
            [
                *argv,
                *TINY_RUN,
                *USER,
                "--resume_from_checkpoint",
                str(user_run / "private_run_record" / "checkpoints" / "step_000001"),
            ]
        )
    )
    a = load_file(str(user_run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read(resumed / "adapter" / "privacy_report.json")["epsilon"] == pytest.approx(
        read(user_run / "adapter" / "privacy_report.json")["epsilon"], rel=1e-9
    )


@pytest.mark.parametrize(
    "change",
    [["--max_examples_per_user", "2"], ["--privacy_unit", "example"], ["--user_column", "other"]],
    ids=["K", "unit", "column"],
)
def test_resume_refuses_a_change_of_unit_column_or_k(user_run, tiny_model_dir, tmp_path, change, capsys):
    from conftest import TINY_RUN

    path = STUDENTS
    if change[0] == "--user_column":  # the same ids under another column name
        rows = [dict(r, other=r["student_id"]) for r in student_rows()]
        path = Path(write_cards(tmp_path / "s.jsonl", rows))
    argv = ["--model", tiny_model_dir, "--dataset", str(path), "--output_dir", str(tmp_path / "o"), *TINY_RUN]
    checkpoint = str(user_run / "private_run_record" / "checkpoints" / "step_000001")
    assert train_dp_lora.cli_main([*argv, *USER, *change, "--resume_from_checkpoint", checkpoint]) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err


def test_example_level_with_a_user_column_holds_out_whole_users_and_reports_group_privacy_for_the_largest(
    train_run, tiny_tokenizer
):
    out = train_run("--user_column", "student_id", dataset=str(STUDENTS))
    report = read(out / "adapter" / "privacy_report.json")
    summary = read(out / "private_run_record" / "data_summary.json")
    assert set(report) == EXAMPLE_REPORT_FIELDS  # still an example-level report
    assert report["unit"] == "example: one row (flashcard) of the training split"
    # the split is by user at the example unit too: evaluation holds out students, not rows
    cards, _ = data.clean_rows(student_rows(), user_column="student_id")
    spec = data.SplitSpec.from_json(report["split"])
    assert spec.user_column == "student_id" and spec.method == data.USER_METHOD
    splits_of_user = collections.defaultdict(set)
    for card in cards:
        splits_of_user[card["student_id"]].add(data.assign_split(card, spec))
    assert all(len(s) == 1 for s in splits_of_user.values())
    assert {"train", "test"} <= set().union(*splits_of_user.values())
    card_text = (out / "adapter" / "README.md").read_text()
    assert "each user's split follows from a keyed hash of its `student_id` value" in card_text
    # the largest training user, directly from the data, the split and the length limit
    limit = read(out / "private_run_record" / "args.json")["data"]["max_seq_length"]
    train = [c for c in cards if data.assign_split(c, spec) == "train"]
    kept, _ = data.tokenize_cards(tiny_tokenizer, train, limit, user_column="student_id")
    k = max(collections.Counter(e["user"] for e in kept).values())
    g = summary["group_privacy"]
    assert g["largest_user_rows"] == k > 1
    assert g["epsilon"] == k * report["target_epsilon"]
    assert g["delta"] == pytest.approx(
        k * math.exp((k - 1) * report["target_epsilon"]) * report["delta"], rel=1e-12
    )


def test_example_level_runs_keep_exactly_their_report_fields(train_run):
    report = read(train_run() / "adapter" / "privacy_report.json")
    assert set(report) == EXAMPLE_REPORT_FIELDS
    assert report["unit"] == "example: one row (flashcard) of the training split"
    assert set(report["split"]) == {
        "seed",
        "validation_fraction",
        "test_fraction",
        "train_sample_fraction",
        "method",
    }


# -----------------------------------------------------------------------------
# two processes


@pytest.mark.numerics
def test_two_processes_at_user_level_train_the_single_process_adapters_at_the_same_epsilon_and_serve(
    tiny_model_dir, tmp_path, capsys
):
    """Ranks split sampled users (never a user's rows), so 2 processes run the 1-process mechanism; the
    two-process adapters are then evaluated on held-out students only and answer through infer.py."""
    from test_distributed import accelerate_launch, finish, free_port, start

    run = ["--dataset", str(STUDENTS), *USER, "--logical_batch_size", "8", "--per_device_train_batch_size", "8",
           "--eval_steps", "0", "--report_to", "none", "--epsilon", "3", "--lora_dropout", "0", "--max_steps", "3",
           "--save_steps", "0"]  # fmt: skip
    multi, single = tmp_path / "multi", tmp_path / "single"
    command = accelerate_launch(
        "--config_file", "configs/accelerate_multi_gpu.yaml", "--num_processes", "2", "--mixed_precision", "no",
        "--main_process_port", str(free_port()), "train_dp_lora.py", "--model", tiny_model_dir,
        "--output_dir", str(multi), *run,
    )  # fmt: skip
    launched = start(command, tmp_path)
    train_dp_lora.main(
        train_dp_lora.parse_args(["--model", tiny_model_dir, "--output_dir", str(single), *run])
    )
    finish(launched)
    a, b = (read(d / "adapter" / "privacy_report.json") for d in (multi, single))
    for key in ("epsilon", "noise_multiplier", "sample_rate", "n_users", "max_examples_per_user", "dp_event"):
        assert a[key] == b[key], key
    assert a["world_size"] == 2 and b["world_size"] == 1
    from safetensors.torch import load_file

    multi_w, single_w = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (multi, single))
    # the same users, rows and noise; each user's clipped gradient once, summed in another order over 3 AdamW
    # steps: budget 64 fp32 ulps of each tensor's max, as the example-level two-process test (observed 1.6 there)
    assert_close_scaled([multi_w[k] for k in single_w], [single_w[k] for k in single_w], 64, eps=FP32_EPS,
                        why="fp32, another summation order")  # fmt: skip
    assert any(
        v.abs().sum() > 0 for k, v in multi_w.items() if "lora_B" in k
    )  # the steps did move the adapters
    assert read(multi / "private_run_record" / "results.json")["replicas_identical"] is True

    import evaluate_qa
    import infer

    evaluated = evaluate_qa.main(evaluate_qa.parse_args(
        ["--adapters", str(multi), "--nll_only", "--split", "test", "--batch_size", "8", "--report_to", "none",
         "--output_dir", str(tmp_path / "eval")]))  # fmt: skip
    spec = data.SplitSpec.from_json(a["split"])
    cards, _ = data.clean_rows(student_rows(), user_column="student_id")
    held_out = {c["input"] for c in cards if data.assign_split(c, spec) == "test"}
    predictions = (tmp_path / "eval" / evaluate_qa.PREDICTIONS_FILE).read_text().splitlines()
    scored = {json.loads(line)["question"] for line in predictions}
    assert scored == held_out  # every held-out student's cards, and no training student's
    adapter = next(m for m in evaluated["models"] if m["kind"] == "adapter")
    assert math.isfinite(adapter["metrics"]["nll"])
    capsys.readouterr()
    assert (
        infer.cli_main(["--adapters", str(multi), "--question", "What causes gout?", "--max_new_tokens", "4"])
        == 0
    )
    assert "one user" in capsys.readouterr().out  # the header names the user-level guarantee
