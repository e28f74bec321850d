"""Per-example causal-LM loss over answer tokens only.

The privacy unit is one flashcard, so each example's loss is the mean over *its own* answer tokens.
The Hugging Face default loss averages tokens across the whole batch, which scales example i's
gradient by B * n_i / N_tokens and couples examples (the clipping bound then no longer holds per
example). Logits are computed only at positions that have a label: Gemma's 256k-262k vocabulary
makes full B x T x V logits the largest tensor of the step, and the prompt positions are masked anyway.

Even the answer-only logits [M, V] dominate memory when a batch has many answer tokens (M = 2048
answer tokens x 256k x fp32 = 2 GiB per copy, and softcapping plus the softmax keep several copies
for backward). So when the LM head is a plain frozen linear layer (every LoRA setup here: the head
is tied to the frozen embeddings), the head and the cross-entropy run as one autograd function over
chunks of answer tokens: each chunk's logits are made, turned into that chunk's token losses and the
gradient of those losses with respect to the chunk's hidden states ([K, H], small), and freed. The
backward pass then only scales the stored [M, H] gradient by the incoming per-token weights, so the
logits are never recomputed and never more than one chunk of them exists (forward and backward).
Because that gradient is exact (the head is linear and frozen; the upstream gradient enters
linearly), everything below the head, the per-sample gradient machinery of every --grad_sample_mode
included, sees exactly the gradient the unchunked graph would give (tests/test_loss.py).
Measured on CPU (4-layer h256 VaultGemma, 256k vocabulary, T=128, B=8, 512 answer tokens, forward +
backward): peak step memory 377 MiB against 2120 MiB for the unchunked answer-only logits, and 8%
faster; torch.utils.checkpoint per chunk (recomputing the logits in backward) took 621 MiB and 1.8x
the time.
"""

import torch
import torch.nn.functional as F

from utils.prompt import IGNORE_INDEX

LOGIT_CHUNK_ELEMENTS = (
    2**25
)  # logits per chunk: 32M fp32 values = 128 MiB, i.e. 128 tokens at a 256k vocabulary


def _causal_lm(model):
    """The *ForCausalLM module under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def _at_least_fp32(tensor):
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _softcap(causal_lm):
    return getattr(causal_lm.config, "final_logit_softcapping", None) or None


def answer_hidden_states(model, input_ids, attention_mask, labels):
    """Final hidden states at the positions whose next token is labelled, with those targets and row ids.

    Returns (hidden [M, H], targets [M], rows [M]) where M is the number of answer tokens.
    """
    causal_lm = _causal_lm(model)
    # Right padding under a causal mask: no real position ever attends to a pad, so the padding mask
    # is left out. With it, a pad query whose sliding window holds only pads gets a fully masked
    # softmax (NaN) and the next layer spreads 0 * NaN into that row's real positions: one long
    # example could then wipe out other examples' gradients (sensitivity above C).
    right_padded = bool((attention_mask[:, :-1] >= attention_mask[:, 1:]).all())
    hidden = causal_lm.model(
        input_ids=input_ids, attention_mask=None if right_padded else attention_mask
    ).last_hidden_state
    targets = labels[:, 1:]
    positions = targets != IGNORE_INDEX  # hidden state at t predicts token t+1
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[positions]
    return hidden[:, :-1][positions], targets[positions], rows


def answer_token_logits(model, input_ids, attention_mask, labels):
    """Logits at the positions whose next token is labelled, with those targets and their row ids.

    Returns (logits [M, V] in fp32 (fp64 for an fp64 model), targets [M], rows [M]). All M x V logits at once:
    the reference
    path, and the fallback for heads the chunked path does not handle.
    """
    causal_lm = _causal_lm(model)
    hidden, targets, rows = answer_hidden_states(model, input_ids, attention_mask, labels)
    logits = _at_least_fp32(causal_lm.get_output_embeddings()(hidden))
    softcap = _softcap(causal_lm)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits, targets, rows


class ChunkedHeadNLL(torch.autograd.Function):
    """token NLL [M] of logits = softcap(hidden @ weight.T), made chunk by chunk; weight gets no gradient.

    Forward keeps d nll_m / d hidden_m ([M, H], at least fp32) instead of any logits; backward scales it by the
    incoming gradient. Math per token (z = raw logit, c = softcap, s = c * tanh(z / c), p = softmax(s)):
    nll = logsumexp(s) - s_y, d nll / d s = p - onehot(y), d s / d z = 1 - tanh(z / c)^2.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_tokens):
        needs_grad = ctx.needs_input_grad[0]
        n_tokens = hidden.shape[0]
        dtype = torch.promote_types(
            hidden.dtype, torch.float32
        )  # fp32 logits over a bf16 model; fp64 stays fp64
        nll = torch.empty(n_tokens, device=hidden.device, dtype=dtype)
        grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=dtype) if needs_grad else None
        for start in range(0, n_tokens, chunk_tokens):
            end = min(start + chunk_tokens, n_tokens)
            target = targets[start:end].unsqueeze(1)
            logits = (hidden[start:end] @ weight.t()).to(dtype)
            if softcap:
                logits.div_(softcap).tanh_().mul_(softcap)  # in place: the raw logits are not needed again
            log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
            nll[start:end] = (log_norm - logits.gather(1, target)).squeeze(1)
            if needs_grad:
                # at most two [K, V] buffers live: the capped logits (turned into softmax in place) and the cap's slope
                slope = logits.div(softcap).square_().neg_().add_(1) if softcap else None
                grad_logits = logits.sub_(log_norm).exp_()  # softmax, in place
                grad_logits.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad_logits.dtype))
                if softcap:
                    grad_logits.mul_(slope)
                    del slope
                grad_hidden[start:end] = grad_logits.to(weight.dtype) @ weight
                del grad_logits
            del logits  # before the next chunk's matmul allocates
        if needs_grad:
            ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden * grad_nll.unsqueeze(1)).to(ctx.hidden_dtype), None, None, None, None


def _chunkable_head(head) -> bool:
    """A plain, frozen, bias-free dense linear head (not a LoRA-wrapped or 4-bit one)."""
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
        and head.weight.is_floating_point()
    )


def answer_token_nll(model, batch: dict, chunk_tokens: int | None = None):
    """(nll [M] of every answer token, row id [M] of each), in fp32 (fp64 for an fp64 model).

    Chunked (ChunkedHeadNLL) when the head allows it, else from all M x V logits at once.
    chunk_tokens: answer tokens per logit chunk (default: LOGIT_CHUNK_ELEMENTS // vocabulary size).
    """
    causal_lm = _causal_lm(model)
    head = causal_lm.get_output_embeddings()
    if not _chunkable_head(head):
        logits, targets, rows = answer_token_logits(
            model, batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
        return F.cross_entropy(logits, targets, reduction="none"), rows
    hidden, targets, rows = answer_hidden_states(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"]
    )
    chunk_tokens = chunk_tokens or max(1, LOGIT_CHUNK_ELEMENTS // head.weight.shape[0])
    return ChunkedHeadNLL.apply(hidden, head.weight, targets, _softcap(causal_lm), chunk_tokens), rows


def per_example_loss(model, batch: dict, chunk_tokens: int | None = None) -> torch.Tensor:
    """[B] mean negative log-likelihood of each example's answer tokens (EOS included)."""
    token_nll, rows = answer_token_nll(model, batch, chunk_tokens)
    n_rows = batch["labels"].shape[0]
    total = torch.zeros(n_rows, device=token_nll.device, dtype=token_nll.dtype).index_add(0, rows, token_nll)
    count = torch.zeros(n_rows, device=token_nll.device, dtype=token_nll.dtype).index_add(
        0, rows, torch.ones_like(token_nll)
    )
    return total / count.clamp(min=1)


def per_example_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same quantity from full logits [B, T, V]; the reference the fast path is tested against."""
    targets = labels[:, 1:]
    token_nll = F.cross_entropy(
        _at_least_fp32(logits[:, :-1]).reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(targets)
    mask = (targets != IGNORE_INDEX).float()
    return (token_nll * mask).sum(1) / mask.sum(1).clamp(min=1)
