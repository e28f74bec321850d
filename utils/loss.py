"""Per-example causal-LM loss over answer tokens only.

The privacy unit is one flashcard, so each example's loss is the mean over *its own* answer tokens.
The Hugging Face default loss averages tokens across the whole batch, which scales example i's
gradient by B * n_i / N_tokens and couples examples (the clipping bound then no longer holds per
example). Logits are computed only at positions that have a label: Gemma's 256k-262k vocabulary
makes full B x T x V logits the largest tensor of the step, and the prompt positions are masked anyway.
"""

import torch
import torch.nn.functional as F

from utils.prompt import IGNORE_INDEX


def _causal_lm(model):
    """The *ForCausalLM module under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def answer_token_logits(model, input_ids, attention_mask, labels):
    """Logits at the positions whose next token is labelled, with those targets and their row ids.

    Returns (logits [M, V] in fp32, targets [M], rows [M]) where M is the number of answer tokens.
    """
    causal_lm = _causal_lm(model)
    hidden = causal_lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    positions = targets != IGNORE_INDEX  # hidden state at t predicts token t+1
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[positions]
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][positions]).float()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits, targets[positions], rows


def per_example_loss(model, batch: dict) -> torch.Tensor:
    """[B] mean negative log-likelihood of each example's answer tokens (EOS included)."""
    labels = batch["labels"]
    logits, targets, rows = answer_token_logits(model, batch["input_ids"], batch["attention_mask"], labels)
    token_nll = F.cross_entropy(logits, targets, reduction="none")
    n_rows = labels.shape[0]
    total = torch.zeros(n_rows, device=token_nll.device, dtype=token_nll.dtype).index_add(0, rows, token_nll)
    count = torch.zeros(n_rows, device=token_nll.device, dtype=token_nll.dtype).index_add(0, rows, torch.ones_like(token_nll))
    return total / count.clamp(min=1)


def per_example_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same quantity from full logits [B, T, V]; the reference the fast path is tested against."""
    targets = labels[:, 1:]
    token_nll = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    mask = (targets != IGNORE_INDEX).float()
    return (token_nll * mask).sum(1) / mask.sum(1).clamp(min=1)
