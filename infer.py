"""Answer medical questions with the DP-LoRA adapters a training run saved (or with the base model alone).

Contract
- Loading: --adapters is OUT/adapter (also a bundle copied anywhere), OUT (a train_dp_lora.py output
  dir) or a checkpoint dir OUT/private_run_record/checkpoints/step_N.
  The base model is the one the run trained on (its args.json, else adapter_config.json) unless
  --model overrides it; --model strings resolve as in training (hub id, local dir, kaggle:<handle>,
  a .gguf file, or gemma3-270m, the embedded offline model). Adapters that do not fit the base
  (another model's shapes or layers) are refused. --merge folds them into a non-quantized base
  (faster generation; refused with --load_in_4bit). Without --adapters the base model answers alone.
- Questions: --question (repeatable), --questions_file (text, one per line; or JSONL whose lines have
  "question" or "input", and optionally "instruction"), else standard input, one per line.
- Prompt: exactly the training template (utils/prompt.py). Decoding: greedy by default (reproducible,
  independent of --batch_size), or --do_sample with the sampling flags; stops at EOS or when the
  model starts a new "Question:"; the answer is the generated text alone.
- Output: a header line naming the adapters, base model and their privacy guarantee (epsilon, delta)
  from privacy_report.json, then the answers; a single question is streamed as it is generated.
  --output FILE.jsonl writes one record per question (question, answer, model, privacy, generation
  settings) instead. Bad input: a one-line error on stderr and exit code 2.

Run
    python infer.py --adapters outputs/dp_lora/adapter --question "What are the symptoms of diabetes?"
    python infer.py --adapters outputs/dp_lora/private_run_record/checkpoints/step_000100 \\
        --questions_file questions.txt --output answers.jsonl
    cat questions.txt | python infer.py --adapters outputs/dp_lora --batch_size 16
    python infer.py --model gemma3-270m --question "What causes gout?"          # base model, no adapters
    python infer.py --adapters outputs/dp_lora --merge --do_sample --temperature 0.7 --top_p 0.9 --question "..."
"""

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from utils import cli
from utils.cli import UserError
from utils.decoding import GenerationSettings, settings_problems
from utils.run_dir import RunDirError, find_adapters


@dataclass
class ModelArguments:
    adapters: str | None = field(
        default=None,
        metadata={
            "help": "OUT/adapter (or a copy), OUT, or a checkpoint dir of a training run; none = base model alone"
        },
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "base model; default: the one the adapters were trained on (google/vaultgemma-1b "
            "without --adapters)"
        },
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "NF4 + double quantization base (bitsandbytes), as in training"}
    )
    merge: bool = field(
        default=False,
        metadata={"help": "merge the adapters into the base weights (faster; not with --load_in_4bit)"},
    )
    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda, cuda:1, ...; default cuda if available"}
    )


@dataclass
class InputArguments:
    questions_file: str | None = field(
        default=None,
        metadata={"help": 'text file (one question per line) or JSONL ("question" or "input" field)'},
    )
    instruction: str | None = field(
        default=None, metadata={"help": "instruction line of the prompt; default: the training default"}
    )
    batch_size: int = field(default=8, metadata={"help": "questions generated together (left padding)"})
    output: str | None = field(
        default=None, metadata={"help": "write question, answer and settings per line to this .jsonl file"}
    )


GROUPS = {"model": ModelArguments, "input": InputArguments, "generation": GenerationSettings}


class InputError(UserError):
    """A one-line, user-facing problem with the questions."""


def build_parser():
    parser = cli.build_parser(__doc__.split("\n\n")[0], GROUPS)
    parser.add_argument(
        "--question",
        action="extend",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="a question to answer (repeatable); none and no --questions_file = read standard input",
    )
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = cli.parse_into(parser, GROUPS, argv)
    args.question = parser.parse_args(argv).question
    return args


def validate_args(args) -> None:
    """Raise one error listing every problem, before any model is loaded."""
    m, i = args.model, args.input
    problems = list(settings_problems(args.generation))
    if i.batch_size < 1:
        problems.append(f"--batch_size must be >= 1, got {i.batch_size}")
    if m.merge and m.load_in_4bit:
        problems.append("--merge needs a non-quantized base; drop --load_in_4bit or --merge")
    if m.merge and not m.adapters:
        problems.append("--merge needs --adapters")
    for n, question in enumerate(args.question or [], 1):
        if not question.strip():
            problems.append(f"--question #{n} is empty")
    if i.questions_file and not Path(i.questions_file).is_file():
        problems.append(f"--questions_file {i.questions_file}: no such file")
    if i.output and Path(i.output).is_dir():
        problems.append(f"--output {i.output} is a directory; expected a .jsonl file name")
    if m.adapters:
        try:
            find_adapters(m.adapters)
        except RunDirError as error:
            problems.append(str(error))
    if problems:
        raise cli.ArgumentErrors(problems)


def parse_questions(lines: list[str], source: str, jsonl: bool) -> list[tuple[str, str | None]]:
    """(question, instruction) pairs; blank lines are skipped, a record without a question is an error."""
    pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            pairs.append((line.strip(), None))
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise InputError(f"{source} line {n}: not valid JSON") from None
        question = record.get("question", record.get("input")) if isinstance(record, dict) else None
        if not isinstance(question, str) or not question.strip():
            raise InputError(f'{source} line {n}: no non-empty "question" or "input" field')
        instruction = record.get("instruction")
        pairs.append(
            (question.strip(), instruction if isinstance(instruction, str) and instruction.strip() else None)
        )
    return pairs


def read_questions_file(path: str) -> list[tuple[str, str | None]]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read --questions_file {path}: {error}") from None
    first = next((line for line in lines if line.strip()), "")
    jsonl = path.endswith((".jsonl", ".json")) or first.lstrip().startswith("{")
    pairs = parse_questions(lines, path, jsonl)
    if not pairs:
        raise InputError(f"--questions_file {path} holds no questions")
    return pairs


def collect_questions(args) -> list[tuple[str, str | None]]:
    """--question and --questions_file together; standard input when neither is given."""
    pairs = [(q.strip(), None) for q in args.question or []]
    if args.input.questions_file:
        pairs += read_questions_file(args.input.questions_file)
    if not pairs:
        pairs = parse_questions(sys.stdin.read().splitlines(), "standard input", jsonl=False)
        if not pairs:
            raise InputError(
                "no questions: pass --question, --questions_file, or questions on standard input"
            )
    return pairs


def header(info: dict) -> str:
    if info["adapter_dir"] is None:
        return f"# base model {info['base_model']}, no adapters | {info['privacy']}"
    merged = ", merged" if info["merged"] else ""
    return f"# adapters {info['adapter_dir']} on {info['base_model']}{merged} | {info['privacy']}"


def _finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def jsonl_record(
    question: str, instruction: str | None, answer: str, info: dict, settings: GenerationSettings
) -> dict:
    report = info["privacy_report"] or {}
    return {
        "question": question,
        "instruction": instruction,
        "answer": answer,
        "model": {
            "base_model": info["base_model"],
            "adapters": info["adapter_dir"],
            "merged": info["merged"],
            "load_in_4bit": info["load_in_4bit"],
        },
        "privacy": {
            "summary": info["privacy"],
            "epsilon": _finite(report.get("epsilon")),
            "delta": _finite(report.get("delta")),
            "dp_enabled": report.get("dp_enabled"),
            "threat_model": report.get("threat_model"),
            "selected_on_private_data": report.get("selected_on_private_data"),
        },
        "generation": dataclasses.asdict(settings),
    }


def answer_interactively(model, tokenizer, info, args) -> list[dict]:
    """A terminal on standard input: answer (streamed) each question as soon as it is typed."""
    from utils.decoding import AnswerStreamer, generate_answers, stop_token_ids

    print(header(info), flush=True)
    print("Type a question and press Enter; Ctrl-D to finish.", file=sys.stderr, flush=True)
    streamer = AnswerStreamer(tokenizer, stop_token_ids(model, tokenizer))
    results = []
    for line in sys.stdin:
        if line.strip():
            answer = generate_answers(
                model,
                tokenizer,
                [line.strip()],
                args.generation,
                instructions=[args.input.instruction],
                streamer=streamer,
            )[0]
            results.append(jsonl_record(line.strip(), args.input.instruction, answer, info, args.generation))
    return results


def main(args) -> list[dict]:
    """Answer every question; returns [{question, instruction, answer, ...}] as written to --output."""
    from transformers.utils import logging as hf_logging

    from utils.decoding import AnswerStreamer, generate_answers, stop_token_ids
    from utils.run_loading import load_for_inference

    validate_args(args)
    m, i, settings = args.model, args.input, args.generation
    interactive = not args.question and not i.questions_file and sys.stdin.isatty()
    pairs = [] if interactive else collect_questions(args)  # before loading: bad input fails in a second
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(f"loading {m.adapters or 'base model'} ...", file=sys.stderr, flush=True)
    model, tokenizer, info = load_for_inference(
        m.adapters, m.model, load_in_4bit=m.load_in_4bit, merge=m.merge, device=m.device
    )
    if info["trained_in_4bit"] and not m.load_in_4bit:
        print(
            "note: these adapters were trained on a 4-bit base; pass --load_in_4bit to match training",
            file=sys.stderr,
        )
    if interactive:
        return answer_interactively(model, tokenizer, info, args)

    questions = [q for q, _ in pairs]
    instructions = [instruction or i.instruction for _, instruction in pairs]
    stream = len(questions) == 1 and not i.output
    if stream:
        print(header(info), flush=True)
        streamer = AnswerStreamer(tokenizer, stop_token_ids(model, tokenizer))
        answers = generate_answers(
            model, tokenizer, questions, settings, instructions=instructions, streamer=streamer
        )
    else:
        answers = generate_answers(
            model,
            tokenizer,
            questions,
            settings,
            batch_size=i.batch_size,
            instructions=instructions,
            progress=len(questions) > 1,
        )
    records = [
        jsonl_record(q, instruction, a, info, settings)
        for q, instruction, a in zip(questions, instructions, answers)
    ]
    if i.output:
        Path(i.output).parent.mkdir(parents=True, exist_ok=True)
        with open(i.output, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        print(header(info), file=sys.stderr)
        print(f"wrote {len(records)} answers to {i.output}", file=sys.stderr)
    elif not stream:
        print(header(info))
        for q, a in zip(questions, answers):
            print(f"\nQ: {q}\nA: {a}")
    return records


def cli_main(argv=None) -> int:
    return cli.run_main(main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli_main())
