"""Answer questions with a base model plus (optionally) the DP-LoRA adapters a training run saved.

Shared by infer.py and evaluate_qa.py, so both feed exactly the training prompt and decode alike.

find_run_files(adapters) accepts OUT/adapter, OUT itself, or OUT/checkpoints/step_N (which holds
adapter/) and finds the run's args.json and privacy_report.json beside the adapter directory.
load_for_inference() loads the base model named by --model, else by the run's args.json, else by
adapter_config.json, with utils.model_loading (same resolution as training), attaches the adapters,
checks that every saved adapter tensor found its place (shape mismatches and missing/unexpected
keys raise AdapterError), and optionally merges them. The tokenizer pads on the LEFT, so in a batch
every prompt ends right where generation starts.
generate_answers() encodes each question with utils.prompt.encode_prompt (BOS + template, no EOS),
generates with the KV cache, greedy unless settings.do_sample, and stops a row at EOS or when it
starts a new "Question:". Each answer is the generated text up to the first EOS, cut at the next
question by utils.prompt.clean_answer. Greedy answers do not depend on the batch size (up to
floating-point ties).
"""

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.prompt import QUESTION_MARKER, clean_answer, encode_prompt

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
STOP_SCAN_TOKENS = 16  # tokens at the end of each row decoded to look for a new "Question:"


@dataclass
class GenerationSettings:
    max_new_tokens: int = field(default=128, metadata={"help": "most tokens generated per answer"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding (greedy is reproducible)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (with --do_sample)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (with --do_sample)"})
    top_k: int = field(default=50, metadata={"help": "sample among the k likeliest tokens; 0 = all (with --do_sample)"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages repeating tokens (greedy too)"})
    seed: int = field(default=0, metadata={"help": "seed for sampling"})


class AdapterError(ValueError):
    """A one-line, user-facing problem with --adapters."""


def settings_problems(settings: GenerationSettings) -> list[str]:
    """Every invalid generation setting, as user-facing lines (empty when all are fine)."""
    problems = []
    if settings.max_new_tokens < 1:
        problems.append(f"--max_new_tokens must be >= 1, got {settings.max_new_tokens}")
    if not (settings.temperature > 0 and math.isfinite(settings.temperature)):
        problems.append(f"--temperature must be > 0, got {settings.temperature}")
    if not 0 < settings.top_p <= 1:
        problems.append(f"--top_p must be in (0, 1], got {settings.top_p}")
    if settings.top_k < 0:
        problems.append(f"--top_k must be >= 0, got {settings.top_k}")
    if not (settings.repetition_penalty > 0 and math.isfinite(settings.repetition_penalty)):
        problems.append(f"--repetition_penalty must be > 0, got {settings.repetition_penalty}")
    return problems


# -----------------------------------------------------------------------------
# finding a run's files

def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise AdapterError(f"cannot read {path}: {error}") from None


def find_run_files(adapters: str) -> dict:
    """Locate the adapter directory and its run's args.json and privacy_report.json.

    `adapters` may be an adapter directory (holds adapter_config.json) or a directory holding one in
    adapter/ (a run's output dir or one of its checkpoints). The run dir is the adapter directory's
    parent when that holds args.json or privacy_report.json, else None.
    """
    path = Path(adapters).expanduser()
    if not path.exists():
        raise AdapterError(f"--adapters {adapters}: no such directory")
    if not path.is_dir():
        raise AdapterError(f"--adapters {adapters} is a file, not an adapter directory")
    if (path / ADAPTER_CONFIG).is_file():
        adapter_dir = path
    elif (path / "adapter" / ADAPTER_CONFIG).is_file():
        adapter_dir = path / "adapter"
    else:
        checkpoints = sorted((path / "checkpoints").glob("step_*/adapter/" + ADAPTER_CONFIG)) or sorted(path.glob("step_*/adapter/" + ADAPTER_CONFIG))
        hint = f"; its latest checkpoint is {checkpoints[-1].parent.parent}" if checkpoints else ""
        raise AdapterError(f"--adapters {adapters} is not an adapter directory (no {ADAPTER_CONFIG} in it or in its adapter/){hint}")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{adapter_dir} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    parent = adapter_dir.parent
    run_dir = parent if (parent / "args.json").is_file() or (parent / "privacy_report.json").is_file() else None
    args = _read_json(run_dir / "args.json") if run_dir and (run_dir / "args.json").is_file() else None
    report = _read_json(run_dir / "privacy_report.json") if run_dir and (run_dir / "privacy_report.json").is_file() else None
    return {"adapter_dir": adapter_dir, "run_dir": run_dir, "args": args, "privacy_report": report}


def format_upper(value: float, significant: int | None = None, decimals: int = 2) -> str:
    """`value` rounded UP (never down: a printed epsilon or delta must stay an upper bound), to
    `decimals` places or, if given, `significant` digits."""
    if significant is not None:
        scale = 10.0 ** (math.floor(math.log10(abs(value))) - significant + 1) if value else 1.0
        text = f"{math.ceil(value / scale - 1e-9) * scale:.{significant}g}"
    else:
        text = f"{math.ceil(value * 10 ** decimals - 1e-9) / 10 ** decimals:.{decimals}f}"
    return text if float(text) >= value else format_upper(value + 10.0 ** -(decimals + 6), significant, decimals)


def describe_privacy(report: dict | None) -> str:
    """One line saying what (epsilon, delta) guarantee the adapters carry; both are rounded up."""
    if report is None:
        return "privacy unknown (no privacy_report.json next to the adapters)"
    epsilon = report.get("epsilon")
    if not report.get("dp_enabled", True) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon):
        return "no DP guarantee (trained with --disable_dp)" if report.get("dp_enabled") is False else "no DP guarantee (no finite epsilon in the privacy report)"
    delta = report.get("delta")
    delta_text = format_upper(delta, significant=3) if isinstance(delta, (int, float)) and math.isfinite(delta) else "unknown"
    text = f"DP-trained: epsilon {format_upper(epsilon)}, delta {delta_text} ({report.get('accountant', '?')} accountant)"
    if report.get("selected_on_private_data"):
        rule = (report.get("selection") or {}).get("rule", "a rule on the training loss")
        text += f"; WARNING: this checkpoint was selected on private data ({rule}), which epsilon does not cover"
    return text


# -----------------------------------------------------------------------------
# loading

def _base_model_name(files: dict | None, model: str | None) -> tuple[str, str]:
    """(base model, where the name came from): --model, else args.json, else adapter_config.json."""
    if model:
        return model, "--model"
    if files is None:
        from utils.model_loading import DEFAULT_MODEL

        return DEFAULT_MODEL, "default"
    saved = ((files["args"] or {}).get("model") or {}).get("model")
    if saved:
        return saved, "args.json"
    saved = _read_json(files["adapter_dir"] / ADAPTER_CONFIG).get("base_model_name_or_path")
    if saved:
        return saved, ADAPTER_CONFIG
    raise AdapterError(f"{files['adapter_dir']} does not name its base model; pass --model")


def _attach_adapters(base_model, adapter_dir: Path, base_name: str):
    """PeftModel over base_model, raising AdapterError unless every saved tensor fits exactly."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    misfit = f"the adapters in {adapter_dir} do not fit base model {base_name!r} (trained on another model? pass the right --model)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # missing keys are checked below, exactly
            model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    except RuntimeError as error:
        if "size mismatch" in str(error):
            first = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), "")
            raise AdapterError(f"{misfit}: {first}") from None
        raise
    except (ValueError, KeyError) as error:  # e.g. "Target modules {...} not found in the base model"
        raise AdapterError(f"{misfit}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as saved:
        saved_keys = set(saved.keys())
    model_keys = set(get_peft_model_state_dict(model).keys())
    if saved_keys != model_keys:
        unplaced, uncovered = sorted(saved_keys - model_keys), sorted(model_keys - saved_keys)
        detail = (f"{len(unplaced)} saved tensors have no place in it (e.g. {unplaced[0]})" if unplaced
                  else f"{len(uncovered)} adapter tensors of the model were not saved (e.g. {uncovered[0]})")
        raise AdapterError(f"{misfit}: {detail}")
    return model


def load_for_inference(adapters: str | None, model: str | None = None, *, load_in_4bit: bool = False, merge: bool = False, device=None):
    """(model, tokenizer, info) ready for generate_answers: eval mode, left-padding tokenizer.

    adapters=None answers with the base model alone (default model: --model or DEFAULT_MODEL).
    merge=True folds the adapters into the (non-quantized) base weights for faster generation.
    info: base_model, base_model_from, adapter_dir, run_dir, privacy_report, privacy (one line),
    merged, load_in_4bit, device, trained_in_4bit.
    Raises AdapterError (bad --adapters) or utils.model_loading.ModelLoadError (model unreachable).
    """
    from utils.model_loading import ModelLoadError, load_base_model, load_tokenizer

    if merge and load_in_4bit:
        raise AdapterError("--merge needs a non-quantized base; drop --load_in_4bit or --merge")
    if merge and not adapters:
        raise AdapterError("--merge needs --adapters")
    files = find_run_files(adapters) if adapters else None
    base_name, base_from = _base_model_name(files, model)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    try:
        tokenizer = load_tokenizer(base_name)
        base_model = load_base_model(base_name, load_in_4bit=load_in_4bit, device=device)
    except ModelLoadError as error:
        if base_from in ("--model", "default"):
            raise
        raise ModelLoadError(f"{error} (base model named by the {base_from} of {adapters}; pass --model to override)") from None
    tokenizer.padding_side = "left"  # prompts end where generation starts, for every row of a batch
    if len(tokenizer) > base_model.get_input_embeddings().weight.shape[0]:
        raise ModelLoadError(f"tokenizer of {base_name!r} has {len(tokenizer)} tokens but the model only {base_model.get_input_embeddings().weight.shape[0]}")
    net = base_model
    if files:
        net = _attach_adapters(base_model, files["adapter_dir"], base_name)
        if merge:
            net = net.merge_and_unload()
    net.eval()
    saved_model_args = ((files or {}).get("args") or {}).get("model") or {}
    report = files["privacy_report"] if files else None
    info = {
        "base_model": base_name,
        "base_model_from": base_from,
        "adapter_dir": str(files["adapter_dir"]) if files else None,
        "run_dir": str(files["run_dir"]) if files and files["run_dir"] else None,
        "privacy_report": report,
        "privacy": describe_privacy(report) if files else "base model only (no adapters; no fine-tuning, so no DP claim applies)",
        "merged": bool(files) and merge,
        "load_in_4bit": load_in_4bit,
        "trained_in_4bit": bool(saved_model_args.get("load_in_4bit")),
        "device": str(device),
    }
    return net, tokenizer, info


# -----------------------------------------------------------------------------
# generation

def encode_batch(tokenizer, questions: list[str], instructions: list[str | None] | None = None) -> dict:
    """Left-padded input_ids and attention_mask of the training prompts of `questions`."""
    instructions = instructions or [None] * len(questions)
    prompts = [encode_prompt(tokenizer, q, i) for q, i in zip(questions, instructions)]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS (what training taught) plus any end token the model's generation config names."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in configured if isinstance(configured, (list, tuple)) else [configured]:
        if token is not None and token not in ids:
            ids.append(int(token))
    return ids


def _stop_at_new_question(tokenizer, prompt_width: int):
    """Stopping criterion: a row is done once its generated text contains "Question:" (see clean_answer)."""
    from transformers import StoppingCriteria

    marker = QUESTION_MARKER.strip()

    class StopAtNewQuestion(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            generated = input_ids[:, prompt_width:][:, -STOP_SCAN_TOKENS:]
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            return torch.tensor([marker in text for text in texts], dtype=torch.bool, device=input_ids.device)

    return StopAtNewQuestion()


def _generation_config(settings: GenerationSettings, tokenizer, stop_ids: list[int]):
    from transformers import GenerationConfig

    sampling = dict(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k) if settings.do_sample else \
        dict(temperature=None, top_p=None, top_k=None)
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample, repetition_penalty=settings.repetition_penalty,
        eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, use_cache=True, **sampling,
    )
    return config


def decode_answer(tokenizer, generated_ids, stop_ids: list[int]) -> str:
    """Text of the generated ids up to (not including) the first stop token, cut at a new question."""
    ids = [int(t) for t in generated_ids]
    cut = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
    return clean_answer(tokenizer.decode(ids[:cut], skip_special_tokens=True))


@torch.no_grad()
def generate_answers(model, tokenizer, questions: list[str], settings: GenerationSettings, batch_size: int = 8,
                     instructions: list[str] | None = None, progress: bool = False, streamer=None) -> list[str]:
    """One clean answer per question, in order (see module docstring). A streamer gets one question at a time."""
    from tqdm.auto import tqdm

    if problems := settings_problems(settings):
        raise ValueError("; ".join(problems))
    if any(not isinstance(q, str) or not q.strip() for q in questions):
        raise ValueError("empty question")
    if instructions is not None and len(instructions) != len(questions):
        raise ValueError(f"{len(instructions)} instructions for {len(questions)} questions")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if streamer is not None:
        batch_size = 1  # a streamer follows one sequence
    instructions = instructions or [None] * len(questions)
    stop_ids = stop_token_ids(model, tokenizer)
    config = _generation_config(settings, tokenizer, stop_ids)
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)
    # longest prompts first: batches of similar length waste little on padding
    order = sorted(range(len(questions)), key=lambda i: -len(encode_prompt(tokenizer, questions[i], instructions[i])))
    answers: list[str | None] = [None] * len(questions)
    bar = tqdm(total=len(questions), desc="answering", unit="question", disable=not progress)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = encode_batch(tokenizer, [questions[i] for i in rows], [instructions[i] for i in rows])
        batch = {k: v.to(device) for k, v in batch.items()}
        width = batch["input_ids"].shape[1]
        from transformers import StoppingCriteriaList

        output = model.generate(**batch, generation_config=config, streamer=streamer,
                                stopping_criteria=StoppingCriteriaList([_stop_at_new_question(tokenizer, width)]))
        for row, generated in zip(rows, output[:, width:].cpu()):
            answers[row] = decode_answer(tokenizer, generated, stop_ids)
        bar.update(len(rows))
    bar.close()
    return answers


class AnswerStreamer:
    """Prints the answer as it is generated, and nothing else: the prompt, anything from the first EOS
    on, and a new "Question:" are never printed. Text that could still turn out to be the start of
    a new question (or trailing whitespace) is held back until the next token decides, so the printed
    text equals the final answer of generate_answers."""

    def __init__(self, tokenizer, stop_ids: list[int], write=None):
        import sys

        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        self._reset()

    def _reset(self):
        self.ids, self.printed, self.seen_prompt, self.stopped = [], 0, False, False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def put(self, value):
        if not self.seen_prompt:  # generate() hands over the prompt first
            self.seen_prompt = True
            return
        if self.stopped:
            return
        for token in value.reshape(-1).tolist():
            if token in self.stop_ids:
                self.stopped = True
                break
            self.ids.append(token)
        self._emit(final=self.stopped)

    def _emit(self, final: bool):
        text = self._text()
        answer = clean_answer(text)
        if not final:
            if text.rstrip().endswith("\ufffd"):  # a multi-byte character is still incomplete
                return
            answer = text.lstrip()
            cut = answer.find(QUESTION_MARKER.strip())
            if cut != -1:
                answer = answer[:cut]
            held = max((k for k in range(1, len(QUESTION_MARKER) + 1) if answer.endswith(QUESTION_MARKER[:k]) or answer.endswith(QUESTION_MARKER.strip()[:k])), default=0)
            answer = answer[:len(answer) - held].rstrip()
        if len(answer) > self.printed:
            self.write(answer[self.printed:])
            self.printed = len(answer)

    def end(self):
        self._emit(final=True)
        self.write("\n")
        self._reset()
