"""What the training script, the benchmarks, the audit and the tests share: the LoRA model, one
physical batch's forward and backward, the held-out answer NLL, and the learning-rate schedule.

Heavy libraries (peft, transformers) are imported inside the functions that need them.
"""

from dataclasses import dataclass, field

import torch

from utils import privacy
from utils.data import collate
from utils.loss import per_example_loss

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adamw", "sgd")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraArguments:
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA path"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGETS), metadata={"help": "module names that get adapters"}
    )
    lora_freeze_a: bool | None = field(
        default=None,
        metadata={
            "help": "train B only; A stays at its random init (about half the weights: a smaller noise norm); "
            "unset: the recipe chooses"
        },
    )


def compute_dtype(dtype: str, mixed_precision: str, device) -> torch.dtype:
    """--dtype, else Accelerate's mixed precision (bf16 from accelerate_config.yaml), else the device default."""
    from utils.model_loading import default_compute_dtype

    return DTYPES[dtype] or MIXED_PRECISION_DTYPES.get(mixed_precision) or default_compute_dtype(device)


LORA_PARTS = ("lora_A", "lora_B")


def lora_weights(model, parts: tuple[str, ...] = LORA_PARTS) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter's weights, frozen or not: peft names them `<module>.lora_A.<adapter name>.weight`."""
    return [(name, p) for name, p in model.named_parameters() if any(f".{part}." in name for part in parts)]


def build_lora_model(
    model_name: str, lora: LoraArguments, tokenizer, device, *, dtype: torch.dtype, load_in_4bit: bool = False
):
    """The frozen base with LoRA adapters on `lora.lora_target_modules`; adapter weights in fp32."""
    from utils.model_loading import silence_library_noise

    silence_library_noise()  # before peft imports bitsandbytes
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from utils.model_loading import ModelLoadError, load_base_model

    model = load_base_model(model_name, load_in_4bit=load_in_4bit, dtype=dtype, device=device)
    if load_in_4bit:
        # norms to fp32, no gradient checkpointing: the per-sample hooks need each layer's activations
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    n_embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embeddings:
        raise ModelLoadError(f"tokenizer has {len(tokenizer)} tokens but the model only {n_embeddings}")
    config = LoraConfig(
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if lora.lora_freeze_a:  # A is saved with the adapters all the same: peft saves every lora_ weight
        for _, p in lora_weights(model, ("lora_A",)):
            p.requires_grad_(False)
    for p in model.parameters():  # fp32 even over a bf16 base: clipping and noise happen here
        if p.requires_grad:
            p.data = p.data.float()
    return model.to(device)


def backward_examples(
    model, batch, params, dp: bool, logical_batch_size: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Forward and backward one physical batch; returns (per-example losses, how many were NaN/inf).

    DP backpropagates the plain sum, so each per-sample gradient is that example's own (the DP
    optimizer clips, adds noise and divides by the expected batch); without DP the sum is divided by
    the logical batch here. A NaN/inf example is left out of the sum and its per-sample gradient
    zeroed, whatever backward made of it. `weights` (user level: 1/k_u for each of user u's k_u rows)
    scale each example's loss in the backward only; the returned losses are unweighted.
    """
    example_losses = per_example_loss(model, batch)
    finite = torch.isfinite(example_losses)
    weighted = example_losses if weights is None else example_losses * weights.to(example_losses.dtype)
    if dp or finite.all():
        kept_sum = weighted[finite].sum()
    # 0 * NaN in the backward would still reach the summed gradient: redo without those rows
    elif finite.any():
        again = per_example_loss(model, {k: v[finite] for k, v in batch.items()})
        kept_sum = (again if weights is None else again * weights[finite].to(again.dtype)).sum()
    else:
        kept_sum = None
    if kept_sum is not None:
        (kept_sum if dp else kept_sum / logical_batch_size).backward()
    nonfinite = privacy.zero_nonfinite_grad_samples(params, ~finite) if dp else int((~finite).sum())
    return example_losses.detach().float(), nonfinite


@torch.no_grad()
def answer_nll(
    model, examples: list[dict], batch_size: int, pad_token_id: int, progress: bool = False
) -> list[float]:
    """Per example: the mean NLL of its answer tokens (EOS included) under teacher forcing.

    The quantity training minimises and logs as eval/loss, and evaluate_qa.py reports as NLL.
    Batches are right-padded whatever the tokenizer's padding side; the model is left in eval mode
    only for the duration of the call.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # batches of similar lengths pad little; the values come back in the caller's order
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    values = [0.0] * len(examples)
    for start in tqdm(
        range(0, len(examples), batch_size), desc="answer NLL", unit="batch", disable=not progress
    ):
        chunk = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in chunk], pad_token_id).items()}
        for i, value in zip(chunk, per_example_loss(model, batch).float().cpu().tolist()):
            values[i] = value
    model.train(was_training)
    return values


def cards_answer_nll(
    model, tokenizer, cards: list[dict], batch_size: int = 8, progress: bool = False
) -> list[float]:
    """answer_nll of flashcards {instruction, input, output} under the training prompt."""
    from utils.prompt import encode_example

    examples = [encode_example(tokenizer, c["input"], c["output"], c["instruction"]) for c in cards]
    return answer_nll(model, examples, batch_size, tokenizer.pad_token_id, progress)


def rng_state(noise_generator: torch.Generator | None) -> dict:
    """The torch (and CUDA) RNG states, and the seeded noise generator's, for a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if noise_generator is not None:
        state["noise_generator"] = noise_generator.get_state()
    return state


def restore_rng_state(state: dict, noise_generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if noise_generator is not None and "noise_generator" in state:
        noise_generator.set_state(state["noise_generator"])


SGD_MOMENTUM = 0.9


def make_optimizer(params, name: str, learning_rate: float, weight_decay: float, momentum: float | None):
    """The LoRA-only optimizer the DP optimizer wraps: AdamW, or SGD with heavy-ball momentum (unset: 0.9)."""
    if name == "sgd":
        momentum = SGD_MOMENTUM if momentum is None else momentum
        return torch.optim.SGD(params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)


def make_schedule(optimizer, total_steps: int, warmup_ratio: float):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, int(round(warmup_ratio * total_steps)), total_steps)
