"""Decoding: answer questions with a loaded model, exactly as training prompted.

generate_answers() encodes each question with utils.prompt.encode_prompt (BOS + template, no EOS),
generates with the KV cache, greedy unless settings.do_sample, and stops a row at EOS or when it
starts a new "Question:". Each answer is the generated text up to the first EOS, cut at the next
question by utils.prompt.clean_answer. The tokenizer pads on the LEFT, so in a batch every prompt
ends right where generation starts; greedy answers do not depend on the batch size (up to
floating-point ties). AnswerStreamer prints one answer as it is generated.
"""

import math
from dataclasses import dataclass, field

import torch

from utils.prompt import QUESTION_MARKER, clean_answer, encode_prompt

STOP_SCAN_TOKENS = 16  # tokens at the end of each row decoded to look for a new "Question:"


@dataclass
class GenerationSettings:
    max_new_tokens: int = field(default=128, metadata={"help": "most tokens generated per answer"})
    do_sample: bool = field(
        default=False, metadata={"help": "sample instead of greedy decoding (greedy is reproducible)"}
    )
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (with --do_sample)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (with --do_sample)"})
    top_k: int = field(
        default=50, metadata={"help": "sample among the k likeliest tokens; 0 = all (with --do_sample)"}
    )
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "> 1 discourages repeating tokens (greedy too)"}
    )
    seed: int = field(default=0, metadata={"help": "seed for sampling"})


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
# generation


def encode_batch(tokenizer, questions: list[str], instructions: list[str | None] | None = None) -> dict:
    """Left-padded input_ids and attention_mask of the training prompts of `questions`."""
    instructions = instructions or [None] * len(questions)
    prompts = [encode_prompt(tokenizer, q, i) for q, i in zip(questions, instructions)]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
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

    sampling = (
        dict(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
        if settings.do_sample
        else dict(temperature=None, top_p=None, top_k=None)
    )
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        repetition_penalty=settings.repetition_penalty,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
        **sampling,
    )
    return config


def decode_answer(tokenizer, generated_ids, stop_ids: list[int]) -> str:
    """Text of the generated ids up to (not including) the first stop token, cut at a new question."""
    ids = [int(t) for t in generated_ids]
    cut = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
    return clean_answer(tokenizer.decode(ids[:cut], skip_special_tokens=True))


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    questions: list[str],
    settings: GenerationSettings,
    batch_size: int = 8,
    instructions: list[str] | None = None,
    progress: bool = False,
    streamer=None,
) -> list[str]:
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
    order = sorted(
        range(len(questions)), key=lambda i: -len(encode_prompt(tokenizer, questions[i], instructions[i]))
    )
    answers: list[str | None] = [None] * len(questions)
    bar = tqdm(total=len(questions), desc="answering", unit="question", disable=not progress)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = encode_batch(tokenizer, [questions[i] for i in rows], [instructions[i] for i in rows])
        batch = {k: v.to(device) for k, v in batch.items()}
        width = batch["input_ids"].shape[1]
        from transformers import StoppingCriteriaList

        output = model.generate(
            **batch,
            generation_config=config,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_stop_at_new_question(tokenizer, width)]),
        )
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
            held = max(
                (
                    k
                    for k in range(1, len(QUESTION_MARKER) + 1)
                    if answer.endswith(QUESTION_MARKER[:k]) or answer.endswith(QUESTION_MARKER.strip()[:k])
                ),
                default=0,
            )
            answer = answer[: len(answer) - held].rstrip()
        if len(answer) > self.printed:
            self.write(answer[self.printed :])
            self.printed = len(answer)

    def end(self):
        self._emit(final=True)
        self.write("\n")
        self._reset()
