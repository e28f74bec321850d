"""infer.py, utils/decoding.py and utils/run_loading.py on a tiny VaultGemma whose adapters train_dp_lora.main
trains for a
few DP steps in this module (offline, CPU). Generation-control tests script the model's next tokens
with a forward hook, so EOS and a new "Question:" arrive exactly where the test says."""

import dataclasses
import io
import json
import shutil
import sys
import time
from pathlib import Path

import pytest

import infer
import train_dp_lora
from conftest import TOKENIZER_CARDS, build_gemma_style_tokenizer, build_tiny_vaultgemma, bundled_cards
from utils.decoding import AnswerStreamer, GenerationSettings, decode_answer, generate_answers, stop_token_ids
from utils.run_dir import find_adapters
from utils.run_loading import AdapterError, describe_privacy, load_for_inference
from utils.prompt import encode_prompt

QUESTIONS = [
    "What are the symptoms of diabetes?",
    "Why?",
    "What is the function of insulin in the body and how is its secretion regulated by blood glucose?",
    "What causes gout?",
    "Which nerve innervates the deltoid muscle?",
]
GREEDY = GenerationSettings(max_new_tokens=12)


# -----------------------------------------------------------------------------
# fixtures: a tiny base model with varied greedy output, adapters trained on it, a misfit base


def _save_tiny(path: Path, tokenizer, **overrides) -> str:
    # initializer_range 0.3: a random tiny model whose greedy continuations differ per prompt (0.02 repeats one token)
    build_tiny_vaultgemma(len(tokenizer), **{"initializer_range": 0.3, **overrides}).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_for_tests():
    return build_gemma_style_tokenizer(
        [c["input"] + " " + c["output"] for c in bundled_cards()[:TOKENIZER_CARDS]]
    )


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_for_tests) -> str:
    return _save_tiny(tmp_path_factory.mktemp("infer_base"), tokenizer_for_tests)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, base_dir) -> Path:
    """A 3-step DP run; --save_loss_threshold marks checkpoints 1 and 2 as selected on private data."""
    out = tmp_path_factory.mktemp("infer_run")
    train_dp_lora.main(
        train_dp_lora.parse_args(
            [
                "--model",
                base_dir,
                "--dataset",
                "bundled",
                "--max_steps",
                "3",
                "--logical_batch_size",
                "16",
                "--per_device_train_batch_size",
                "8",
                "--max_seq_length",
                "128",
                "--learning_rate",
                "0.05",
                "--eval_steps",
                "0",
                "--save_steps",
                "0",
                "--save_loss_threshold",
                "1e9",
                "--report_to",
                "none",
                "--output_dir",
                str(out),
            ]
        )
    )
    return out


@pytest.fixture(scope="module")
def adapted(run_dir):
    return load_for_inference(str(run_dir / "adapter"))


@pytest.fixture(scope="module")
def base_only(base_dir):
    return load_for_inference(None, base_dir)


def _run(argv, capsys):
    code = infer.cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -----------------------------------------------------------------------------
# loading and the privacy note


def test_find_adapters_accepts_run_bundle_and_checkpoint_dirs(run_dir):
    report = json.loads((run_dir / "adapter" / "privacy_report.json").read_text())
    for given in (run_dir, run_dir / "adapter"):
        found = find_adapters(str(given))
        assert found.adapter_dir == run_dir / "adapter" and found.run_dir == run_dir
        assert found.public_report == report and found.args == json.loads(
            (run_dir / "private_run_record" / "args.json").read_text()
        )
    checkpoint = run_dir / "private_run_record" / "checkpoints" / "step_000001"
    for given in (checkpoint, checkpoint / "adapter"):
        found = find_adapters(str(given))
        assert found.adapter_dir == checkpoint / "adapter" and found.run_dir == run_dir
        assert found.public_report["steps_taken"] == 1


def test_a_bundle_shared_alone_loads_and_states_its_guarantee(run_dir, base_dir, tmp_path):
    shared = tmp_path / "shared_bundle"
    shutil.copytree(run_dir / "adapter", shared)
    found = find_adapters(str(shared))
    assert found.run_dir is None and found.args is None
    model, _, info = load_for_inference(str(shared), base_dir)
    assert info["privacy"] == describe_privacy(
        json.loads((run_dir / "adapter" / "privacy_report.json").read_text())
    )
    assert info["privacy"].startswith("DP-trained: epsilon <= ")


def test_base_model_is_read_from_the_runs_args(adapted, base_dir, run_dir):
    model, tokenizer, info = adapted
    assert info["base_model"] == base_dir and info["base_model_from"] == "args.json"
    assert info["adapter_dir"] == str(run_dir / "adapter") and tokenizer.padding_side == "left"
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_describe_privacy_rounds_up_and_states_relation_and_threat_model(run_dir):
    report = json.loads((run_dir / "adapter" / "privacy_report.json").read_text())
    seeded = dict(report, epsilon=2.985, delta=1e-5, secure_mode=False, selected_on_private_data=False)
    assert describe_privacy(seeded) == (
        "DP-trained: epsilon <= 2.99, delta = 1e-05 (add/remove one row; prv accountant; "
        "seeded: holds only against someone who does not know the seed)"
    )
    # printed values are upper bounds: rounded up, never down
    secure = describe_privacy(dict(seeded, epsilon=2.99392, delta=1 / 4680, secure_mode=True))
    assert (
        secure == "DP-trained: epsilon <= 3.00, delta = 0.000214 (add/remove one row; prv accountant; "
        "secure randomness (OS CSPRNG))"
    )
    flagged = describe_privacy(
        dict(seeded, selected_on_private_data=True, selection="training loss 7.1 < --save_loss_threshold 8")
    )
    assert (
        flagged.startswith("DP-trained: epsilon <= 2.99")
        and "WARNING" in flagged
        and "selected on private data" in flagged
    )
    assert (
        describe_privacy(dict(report, dp_enabled=False)) == "NO privacy guarantee (trained with --disable_dp)"
    )
    assert "unknown" in describe_privacy(None)


def test_single_question_prints_privacy_header_then_streamed_answer(run_dir, adapted, capsys):
    model, tokenizer, _ = adapted
    expected = generate_answers(model, tokenizer, QUESTIONS[:1], GREEDY)[0]
    report = json.loads((run_dir / "adapter" / "privacy_report.json").read_text())
    code, out, err = _run(
        ["--adapters", str(run_dir / "adapter"), "--question", QUESTIONS[0], "--max_new_tokens", "12"], capsys
    )
    assert code == 0, err
    header, answer = out.split("\n")[:2]
    printed_epsilon = float(header.split("epsilon <= ")[1].split(",")[0])
    assert report["epsilon"] <= printed_epsilon < report["epsilon"] + 0.01
    assert header.endswith(
        f"DP-trained: epsilon <= {printed_epsilon:.2f}, delta = {report['delta']:.3g} (add/remove one row; "
        "prv accountant; seeded: holds only against someone who does not know the seed)"
    )
    assert answer == expected and out == f"{header}\n{expected}\n"


def test_checkpoint_selected_on_private_data_is_flagged(run_dir, capsys):
    code, out, err = _run(
        [
            "--adapters",
            str(run_dir / "private_run_record" / "checkpoints" / "step_000001"),
            "--question",
            "Why?",
            "--max_new_tokens",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    assert "WARNING: checkpoint selected on private data" in out.splitlines()[0]


def test_disable_dp_run_says_no_dp_guarantee(run_dir, tmp_path, capsys):
    nodp = tmp_path / "nodp"
    shutil.copytree(run_dir / "adapter", nodp / "adapter")
    shutil.copytree(run_dir / "private_run_record", nodp / "private_run_record")
    report = json.loads((run_dir / "adapter" / "privacy_report.json").read_text())
    (nodp / "adapter" / "privacy_report.json").write_text(
        json.dumps(dict(report, dp_enabled=False, epsilon=None))
    )  # as training writes it
    code, out, err = _run(["--adapters", str(nodp), "--question", "Why?", "--max_new_tokens", "2"], capsys)
    assert code == 0, err
    assert out.splitlines()[0].endswith("| NO privacy guarantee (trained with --disable_dp)")


def test_no_adapters_answers_with_the_base_model(base_dir, base_only, adapted, capsys):
    model, tokenizer, info = base_only
    expected = generate_answers(model, tokenizer, QUESTIONS[:1], GREEDY)[0]
    code, out, err = _run(["--model", base_dir, "--question", QUESTIONS[0], "--max_new_tokens", "12"], capsys)
    assert code == 0, err
    assert out == f"# base model {base_dir}, no adapters | {info['privacy']}\n{expected}\n"
    # and the adapters do change the model: otherwise the adapter tests below would prove nothing
    adapted_answers = generate_answers(adapted[0], adapted[1], QUESTIONS, GREEDY)
    assert adapted_answers != generate_answers(model, tokenizer, QUESTIONS, GREEDY)


# -----------------------------------------------------------------------------
# prompt and generation


@pytest.mark.numerics
def test_greedy_answers_identical_in_batch_and_one_at_a_time(adapted):
    # fp32 logits of a left-padded batch differ from a row alone by a few ulps of max|logit| (~10); greedy picks
    # the same token while the top-2 gap is larger: its minimum over these 5 x 12 steps is 0.011, ~1e4 fp32 ulps
    model, tokenizer, _ = adapted
    batched = generate_answers(model, tokenizer, QUESTIONS, GREEDY, batch_size=4)
    single = [generate_answers(model, tokenizer, [q], GREEDY, batch_size=1)[0] for q in QUESTIONS]
    assert batched == single
    assert len(set(batched)) > 2 and all(
        batched
    )  # a model that says the same thing everywhere would prove nothing


def test_prompt_ids_are_the_training_template_left_padded_with_kv_cache(adapted, monkeypatch):
    model, tokenizer, _ = adapted
    calls, forward_widths = [], []
    original = model.generate

    def recording_generate(**kwargs):
        calls.append({k: kwargs[k].clone() for k in ("input_ids", "attention_mask")})
        return original(**kwargs)

    handle = model.get_base_model().register_forward_hook(
        lambda mod, args, kwargs, out: forward_widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    monkeypatch.setattr(model, "generate", recording_generate)
    try:
        generate_answers(model, tokenizer, QUESTIONS[:3], GenerationSettings(max_new_tokens=4), batch_size=3)
    finally:
        handle.remove()
    (call,) = calls
    width = call["input_ids"].shape[1]
    rows = {
        tuple(ids[mask.bool()].tolist()): mask for ids, mask in zip(call["input_ids"], call["attention_mask"])
    }
    assert set(rows) == {tuple(encode_prompt(tokenizer, q)) for q in QUESTIONS[:3]}
    for ids, mask in rows.items():  # left padding: the prompt fills the right end of the row
        assert mask.tolist() == [0] * (width - len(ids)) + [1] * len(ids)
    assert forward_widths[0] == width and set(forward_widths[1:]) == {
        1
    }  # after the prompt, one new token per step


def _script_next_tokens(model, script: list[int]):
    """Make the model emit script[k] as its k-th generated token (for one generate() call: forward k gives token k)."""
    calls = []

    def force(module, args, output):
        step = len(calls)
        calls.append(step)
        if step < len(script):
            output.logits[:, -1, :] = -1e4
            output.logits[:, -1, script[step]] = 1e4
        return output

    return model.register_forward_hook(force)


def _recording_generate(model, monkeypatch):
    outputs = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: outputs.append(original(**kw)) or outputs[-1])
    return outputs


def test_generation_stops_at_eos_and_decodes_nothing_after_it(base_only, monkeypatch):
    model, tokenizer, _ = base_only
    words = tokenizer(" Polyuria and thirst", add_special_tokens=False)["input_ids"]
    after = tokenizer(" SHOULD NOT APPEAR", add_special_tokens=False)["input_ids"]
    prompt_width = len(encode_prompt(tokenizer, QUESTIONS[0]))
    outputs = _recording_generate(model, monkeypatch)
    handle = _script_next_tokens(model, words + [tokenizer.eos_token_id] + after)
    try:
        answer = generate_answers(model, tokenizer, QUESTIONS[:1], GenerationSettings(max_new_tokens=40))[0]
    finally:
        handle.remove()
    assert answer == "Polyuria and thirst"
    assert outputs[0].shape[1] == prompt_width + len(words) + 1  # stopped right at EOS, not at max_new_tokens
    assert (
        decode_answer(tokenizer, words + [tokenizer.eos_token_id] + after, [tokenizer.eos_token_id])
        == "Polyuria and thirst"
    )


def test_generation_stops_when_the_model_starts_a_new_question(base_only, monkeypatch):
    model, tokenizer, _ = base_only
    script = tokenizer(
        " Polyuria and thirst.\nQuestion: What else is there to ask about diabetes today?\nAnswer: nothing",
        add_special_tokens=False,
    )["input_ids"]
    prompt_width = len(encode_prompt(tokenizer, QUESTIONS[0]))
    outputs = _recording_generate(model, monkeypatch)
    streamed = []
    streamer = AnswerStreamer(tokenizer, stop_token_ids(model, tokenizer), write=streamed.append)
    handle = _script_next_tokens(model, script)
    try:
        answer = generate_answers(
            model, tokenizer, QUESTIONS[:1], GenerationSettings(max_new_tokens=len(script)), streamer=streamer
        )[0]
    finally:
        handle.remove()
    assert answer == "Polyuria and thirst."
    assert (
        outputs[0].shape[1] - prompt_width < len(script) - 5
    )  # stopped soon after "Question:", long before the script ends
    assert (
        "".join(streamed) == "Polyuria and thirst.\n"
    )  # the stream shows the answer only, never the new question


# -----------------------------------------------------------------------------
# merging, inputs and outputs


def test_merged_and_unmerged_adapters_give_the_same_greedy_answers(run_dir, adapted):
    model, tokenizer, _ = adapted
    merged, merged_tokenizer, info = load_for_inference(str(run_dir), merge=True)
    assert info["merged"] and not hasattr(merged, "peft_config")
    assert generate_answers(merged, merged_tokenizer, QUESTIONS, GREEDY, batch_size=5) == generate_answers(
        model, tokenizer, QUESTIONS, GREEDY, batch_size=5
    )


def test_questions_file_to_output_jsonl_records_answers_and_settings(run_dir, adapted, tmp_path, capsys):
    model, tokenizer, _ = adapted
    questions_file = tmp_path / "questions.txt"
    questions_file.write_text(f"{QUESTIONS[0]}\n\n{QUESTIONS[1]}\n{QUESTIONS[2]}\n", encoding="utf-8")
    output = tmp_path / "answers.jsonl"
    code, out, err = _run(
        [
            "--adapters",
            str(run_dir),
            "--questions_file",
            str(questions_file),
            "--output",
            str(output),
            "--max_new_tokens",
            "12",
            "--batch_size",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["question"] for r in records] == QUESTIONS[:3]
    assert [r["answer"] for r in records] == generate_answers(model, tokenizer, QUESTIONS[:3], GREEDY)
    report = json.loads((run_dir / "adapter" / "privacy_report.json").read_text())
    for record in records:
        assert set(record) == {"question", "instruction", "answer", "model", "privacy", "generation"}
        assert record["generation"] == dataclasses.asdict(GREEDY)
        assert (
            record["privacy"]["epsilon"] == report["epsilon"]
            and record["privacy"]["delta"] == report["delta"]
        )
        assert record["model"]["adapters"] == str(run_dir / "adapter")
    assert f"wrote 3 answers to {output}" in err and out == ""


def test_jsonl_questions_file_accepts_question_or_input_fields(run_dir, adapted, tmp_path, capsys):
    model, tokenizer, _ = adapted
    questions_file = tmp_path / "cards.jsonl"
    questions_file.write_text(
        json.dumps({"question": QUESTIONS[0]})
        + "\n"
        + json.dumps({"input": QUESTIONS[3], "output": "x"})
        + "\n"
    )
    code, out, err = _run(
        ["--adapters", str(run_dir), "--questions_file", str(questions_file), "--max_new_tokens", "12"],
        capsys,
    )
    assert code == 0, err
    expected = generate_answers(model, tokenizer, [QUESTIONS[0], QUESTIONS[3]], GREEDY)
    assert (
        out.split("\n", 1)[1]
        == f"\nQ: {QUESTIONS[0]}\nA: {expected[0]}\n\nQ: {QUESTIONS[3]}\nA: {expected[1]}\n"
    )


def test_standard_input_one_question_per_line(run_dir, adapted, monkeypatch, capsys):
    model, tokenizer, _ = adapted
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTIONS[1]}\n\n{QUESTIONS[4]}\n"))
    code, out, err = _run(["--adapters", str(run_dir), "--max_new_tokens", "12"], capsys)
    assert code == 0, err
    expected = generate_answers(model, tokenizer, [QUESTIONS[1], QUESTIONS[4]], GREEDY)
    assert out.startswith("# adapters ") and out.endswith(
        f"\nQ: {QUESTIONS[1]}\nA: {expected[0]}\n\nQ: {QUESTIONS[4]}\nA: {expected[1]}\n"
    )


def test_terminal_on_standard_input_answers_each_line_streamed(run_dir, adapted, monkeypatch, capsys):
    model, tokenizer, _ = adapted

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(f"{QUESTIONS[0]}\n{QUESTIONS[3]}\n"))
    code, out, err = _run(["--adapters", str(run_dir), "--max_new_tokens", "12"], capsys)
    assert code == 0, err
    expected = generate_answers(model, tokenizer, [QUESTIONS[0], QUESTIONS[3]], GREEDY)
    assert out.splitlines()[1:] == expected


def test_help_exits_zero_and_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer.cli_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--adapters",
        "--question",
        "--questions_file",
        "--merge",
        "--load_in_4bit",
        "--batch_size",
        "--do_sample",
        "--top_p",
        "--output",
    ):
        assert flag in out
    assert "(default: 128)" in out  # --max_new_tokens


# -----------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2, no traceback


@pytest.fixture(scope="module")
def misfit_bases(tmp_path_factory, tokenizer_for_tests) -> dict:
    root = tmp_path_factory.mktemp("misfit")
    return {
        "narrower": _save_tiny(root / "narrow", tokenizer_for_tests, hidden_size=32, intermediate_size=64),
        "deeper": _save_tiny(
            root / "deep",
            tokenizer_for_tests,
            num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    }


def _bad_cases(run_dir: Path, tmp: Path, misfit: dict) -> dict:
    (tmp / "empty_dir").mkdir()
    (tmp / "not_utf8.txt").write_bytes(b"\xff\xfe\xfa question\n")
    (tmp / "broken.jsonl").write_text('{"question": "ok"}\n{"question": \n')
    (tmp / "blank.txt").write_text("\n  \n")
    adapters = str(run_dir / "adapter")
    return {
        "missing dir": (["--adapters", str(tmp / "nope"), "--question", "Why?"], "no such directory"),
        "not an adapter dir": (
            ["--adapters", str(tmp / "empty_dir"), "--question", "Why?"],
            "is not an adapter directory",
        ),
        "a file as adapters": (
            ["--adapters", str(tmp / "blank.txt"), "--question", "Why?"],
            "is a file, not an adapter directory",
        ),
        "shapes of another model": (
            ["--adapters", adapters, "--model", misfit["narrower"], "--question", "Why?"],
            "size mismatch",
        ),
        "layers of another model": (
            ["--adapters", adapters, "--model", misfit["deeper"], "--question", "Why?"],
            "were not saved",
        ),
        "empty question": (["--adapters", adapters, "--question", "   "], "--question #1 is empty"),
        "missing questions file": (
            ["--adapters", adapters, "--questions_file", str(tmp / "none.txt")],
            "no such file",
        ),
        "undecodable questions file": (
            ["--adapters", adapters, "--questions_file", str(tmp / "not_utf8.txt")],
            "cannot read --questions_file",
        ),
        "broken jsonl": (
            ["--adapters", adapters, "--questions_file", str(tmp / "broken.jsonl")],
            "line 2: not valid JSON",
        ),
        "file without questions": (
            ["--adapters", adapters, "--questions_file", str(tmp / "blank.txt")],
            "holds no questions",
        ),
        "merge with 4-bit": (
            ["--adapters", adapters, "--merge", "--load_in_4bit", "--question", "Why?"],
            "--merge needs a non-quantized base",
        ),
        "bad settings": (
            ["--adapters", adapters, "--question", "Why?", "--top_p", "0", "--max_new_tokens", "0"],
            "--max_new_tokens must be >= 1, got 0; --top_p",
        ),
        "hub model offline": (["--model", "no-such-org/no-such-model", "--question", "Why?"], "gemma3-270m"),
    }


CASES = [
    "missing dir",
    "not an adapter dir",
    "a file as adapters",
    "shapes of another model",
    "layers of another model",
    "empty question",
    "missing questions file",
    "undecodable questions file",
    "broken jsonl",
    "file without questions",
    "merge with 4-bit",
    "bad settings",
    "hub model offline",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_error_and_exit_code_2(
    case, run_dir, misfit_bases, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv, phrase = _bad_cases(run_dir, tmp_path, misfit_bases)[case]
    started = time.time()
    code, out, err = _run(argv, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("loading ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], err
    assert "Traceback" not in err and out == ""
    assert time.time() - started < 15


def test_empty_standard_input_is_an_error(run_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n\n"))
    code, out, err = _run(["--adapters", str(run_dir)], capsys)
    assert code == 2 and err.strip().startswith("error: no questions") and len(err.strip().splitlines()) == 1


def test_generate_answers_rejects_empty_questions(adapted):
    with pytest.raises(ValueError, match="empty question"):
        generate_answers(adapted[0], adapted[1], ["ok", " "], GREEDY)
    with pytest.raises(AdapterError, match="--merge needs"):
        load_for_inference("x", merge=True, load_in_4bit=True)


@pytest.mark.slow
def test_embedded_gemma3_answer_is_clean_and_stops(capsys):
    from utils.model_loading import embedded_cache_dir

    if not (embedded_cache_dir() / "config.json").is_file():
        pytest.skip("embedded Gemma 3 270M not converted yet (run any script with --model gemma3-270m once)")
    code, out, err = _run(
        ["--model", "gemma3-270m", "--question", "What causes gout?", "--max_new_tokens", "64"], capsys
    )
    assert code == 0, err
    header, answer = out.rstrip("\n").split("\n", 1)
    assert header.startswith("# base model gemma3-270m, no adapters")
    assert answer.strip() and "Question:" not in answer and "Answer:" not in answer
