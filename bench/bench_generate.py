"""Answer throughput of utils.decoding.generate_answers: batched vs one question at a time, LoRA
adapters attached vs merged into the base.

Contract
- Model: --model through utils.model_loading (default the embedded Gemma 3 270M), with LoRA adapters:
  --adapters (a training run's) or, by default, fresh adapters of the default LoRA shape
  (utils.training.LoraArguments: what train_dp_lora.py trains; their values do not change the cost).
  Loading goes through utils.run_loading.load_for_inference,
  as infer.py does.
- Questions: the first --questions questions of the bundled flashcards. Greedy decoding, at most
  --max_new_tokens tokens per answer.
- Configurations, each timed once after one unmeasured warm-up call on two questions:
    one_at_a_time   adapters attached, batch_size=1 (what a loop over questions does);
    batched         adapters attached, batch_size=--batch_size;
    batched_merged  adapters merged into the base (not with --load_in_4bit), batch_size=--batch_size.
- Reported: seconds, questions/s and answer tokens/s (tokens of the returned answers, re-tokenized:
  the useful output, not the padding a batch keeps generating after a row has stopped), and whether
  every configuration gave the same answers as one_at_a_time (greedy decoding should, up to
  floating-point ties). JSON to --output; a table on stdout.

Run
    OMP_NUM_THREADS=1 python bench/bench_generate.py                                  # Gemma 3 270M, 16 questions
    python bench/bench_generate.py --adapters outputs/dp_lora --model google/vaultgemma-1b \\
        --questions 64 --batch_size 32
"""

import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python bench/bench_generate.py` from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from utils import cli  # noqa: E402
from utils.data import BUNDLED_DATASET, clean_rows, read_rows  # noqa: E402
from utils.decoding import GenerationSettings, generate_answers  # noqa: E402
from utils.run_loading import load_for_inference  # noqa: E402
from utils.model_loading import EMBEDDED_MODEL, load_base_model  # noqa: E402
from utils.training import LoraArguments  # noqa: E402


@dataclass
class BenchArguments:
    model: str = field(default=EMBEDDED_MODEL, metadata={"help": "base model (any train_dp_lora.py --model)"})
    adapters: str | None = field(
        default=None,
        metadata={"help": "a training run's adapters; default: fresh adapters of the default LoRA shape"},
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "NF4 base (then no merged configuration)"})
    questions: int = field(default=16, metadata={"help": "how many bundled questions to answer"})
    batch_size: int = field(
        default=16, metadata={"help": "questions per generate call in the batched configurations"}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "most tokens per answer"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, ...; auto = cuda if available"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = torch's default"})
    output: str = field(default="outputs/bench/bench_generate.json", metadata={"help": "JSON results"})


GROUPS = {"bench": BenchArguments}


def parse_args(argv=None):
    parser = cli.build_parser(__doc__.split("\n\n")[0], GROUPS, config_flag=False)
    return cli.parse_into(parser, GROUPS, argv)


def validate_args(args) -> None:
    b = args.bench
    problems = [
        f"--{name} must be >= 1"
        for name in ("questions", "batch_size", "max_new_tokens")
        if getattr(b, name) < 1
    ]
    if problems:
        raise cli.ArgumentErrors(problems)


def fresh_adapters(model: str, directory: str) -> str:
    """Adapters of train_dp_lora.py's default LoRA shape over `model`, saved as a run would save them."""
    from peft import LoraConfig, get_peft_model

    lora = LoraArguments()
    base = load_base_model(model, device="cpu")
    config = LoraConfig(
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    get_peft_model(base, config).save_pretrained(directory)
    return directory


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(
    name: str, adapters: str, b: BenchArguments, questions: list[str], batch_size: int, merge: bool, device
) -> dict:
    model, tokenizer, _ = load_for_inference(
        adapters, b.model, load_in_4bit=b.load_in_4bit, merge=merge, device=device
    )
    settings = GenerationSettings(max_new_tokens=b.max_new_tokens)
    generate_answers(model, tokenizer, questions[:2], settings, batch_size=min(batch_size, 2))  # warm-up
    _sync(device)
    started = time.perf_counter()
    answers = generate_answers(model, tokenizer, questions, settings, batch_size=batch_size)
    _sync(device)
    seconds = time.perf_counter() - started
    tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    del model
    return {
        "name": name,
        "batch_size": batch_size,
        "merged": merge,
        "seconds": seconds,
        "questions_per_s": len(questions) / seconds,
        "answer_tokens": tokens,
        "answer_tokens_per_s": tokens / seconds,
        "answers": answers,
    }


def main(args) -> dict:
    validate_args(args)
    b = args.bench
    if b.threads:
        torch.set_num_threads(b.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if b.device == "auto" else b.device
    cards, _ = clean_rows(read_rows(BUNDLED_DATASET))
    questions = [c["input"] for c in cards[: b.questions]]
    with tempfile.TemporaryDirectory(prefix="bench_generate_adapters_") as directory:
        adapters = b.adapters or fresh_adapters(b.model, directory)
        runs = [
            measure("one_at_a_time", adapters, b, questions, 1, False, device),
            measure("batched", adapters, b, questions, b.batch_size, False, device),
        ]
        if not b.load_in_4bit:
            runs.append(measure("batched_merged", adapters, b, questions, b.batch_size, True, device))
    reference = runs[0]["answers"]
    for run in runs:
        run["same_answers_as_one_at_a_time"] = run["answers"] == reference
        run["speedup_vs_one_at_a_time"] = (
            run["answer_tokens_per_s"] / runs[0]["answer_tokens_per_s"] if runs[0]["answer_tokens"] else None
        )
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            None,
        )
        if Path("/proc/cpuinfo").exists()
        else None
    )
    report = {
        "command": " ".join(["python"] + sys.argv),
        "args": cli.to_dict(args),
        "machine": {
            "cpu": cpu,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": device,
            "gpu": torch.cuda.get_device_name() if str(device).startswith("cuda") else None,
            "torch": torch.__version__,
        },
        "runs": runs,
    }
    output = Path(b.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(
        f"{b.model}, {len(questions)} questions, greedy, max {b.max_new_tokens} new tokens, on {device} "
        f"({cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"
    )
    print(
        f"{'configuration':<16} {'batch':>5} {'seconds':>8} {'questions/s':>12} {'answer tok/s':>13} "
        f"{'speedup':>8}  same answers"
    )
    for run in runs:
        speedup = f"{run['speedup_vs_one_at_a_time']:.2f}x" if run["speedup_vs_one_at_a_time"] else "-"
        print(
            f"{run['name']:<16} {run['batch_size']:>5} {run['seconds']:>8.2f} {run['questions_per_s']:>12.2f} "
            f"{run['answer_tokens_per_s']:>13.1f} {speedup:>8}  {run['same_answers_as_one_at_a_time']}"
        )
    print(f"written: {output}")
    return report


def quiet() -> None:
    """No weight-loading progress bars or library deprecation notices between the results."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


if __name__ == "__main__":
    quiet()
    sys.exit(cli.run_main(main, parse_args))
