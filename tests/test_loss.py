"""utils/loss.py's chunked answer-only loss against the full-logit reference, per-sample gradients of
every offered --grad_sample_mode against a brute-force loop, and length bucketing against the draw.
All in fp64 on a tiny VaultGemma (logit softcapping on, as in the real model)."""

import pytest
import torch
from conftest import FP32_EPS, FP64_EPS, assert_close_scaled, build_tiny_vaultgemma, scaled_error

from utils import loss, privacy
from utils.prompt import IGNORE_INDEX

VOCAB = 97

# Error budgets (conftest: ulps of the expected tensor's largest entry).
# Loss values: the body runs once on the same batch either way, so only the fp64 head differs: each logit is a
# 64-term dot product (error <= 64 u sum|h_k w_k|, u = eps/2, sum|h w| ~ 0.8 here), softcap tanh (a few ulps), and
# logsumexp over 97 exps (<= 97 u absolute in the log): <= ~25 eps relative to a loss of ~4.6 in the worst case
# (observed: 0 on AMD EPYC AVX-512, 1 and 2 threads). Dropping the softcap in the chunked path errs by 3.8e10 ulps.
LOSS_ULPS_FP64 = 128
# Gradients: fp32-limited (conftest): an fp64 upstream gradient that differs in the last bit (the chunked head's
# softmax - onehot vs autograd's, a row alone vs in a padded batch) rounds differently in the fp32 RMSNorm/softmax
# backward: observed 1.26-1.43 fp32 ulps for the per-sample gradients (3 model/batch seeds, 3 modes, 1 and 2 threads),
# 0 for the chunked gradient here. Coupling bugs err by 1e4-1e7 fp32 ulps (test_*_catches_* below).
GRAD_ULPS_FP32 = 16


@pytest.fixture
def fp64_model():
    model = build_tiny_vaultgemma(VOCAB, seed=1).double()
    assert model.config.final_logit_softcapping  # the chunked path must handle the cap
    model.requires_grad_(False)
    for (
        p
    ) in model.model.layers.parameters():  # train the body, keep the (tied) head frozen: the LoRA situation
        p.requires_grad_(True)
    return model


def lora_model(seed=0):
    """fp64 tiny VaultGemma with train_dp_lora.py's LoRA targets, dropout off, non-zero B."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny_vaultgemma(VOCAB, seed=seed).double()
    base.requires_grad_(False)
    model = get_peft_model(
        base,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:  # LoRA B starts at zero, which would make every A gradient zero
            p.data = 0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
    return model.train()


def padded_batch(lengths, answer_starts, seed=0):
    """Right-padded rows of the given lengths; labels from answer_starts[i] on (None: no answer tokens)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (length, start) in enumerate(zip(lengths, answer_starts)):
        input_ids[row, :length] = torch.randint(3, VOCAB, (length,), generator=generator)
        input_ids[row, 0] = 2
        attention_mask[row, :length] = 1
        if start is not None:
            labels[row, start:length] = input_ids[row, start:length]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


BATCH = dict(
    lengths=[17, 9, 23, 12], answer_starts=[6, 4, 11, None]
)  # ragged, padded, one row without answer tokens


def reference_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return loss.per_example_loss_from_logits(logits, batch["labels"])


def chunked_loss_error(model, chunk_tokens) -> float:
    """ulps (fp64) between the chunked per-example loss and the full-logit reference."""
    batch = padded_batch(**BATCH)
    chunked = loss.per_example_loss(model, batch, chunk_tokens=chunk_tokens)
    assert chunked.dtype == torch.float64
    assert chunked[3].item() == 0.0  # no answer tokens: zero loss, as the reference
    return scaled_error(chunked, reference_loss(model, batch), FP64_EPS)


@pytest.mark.numerics
@pytest.mark.parametrize("chunk_tokens", [1, 5, 1000])
def test_chunked_loss_equals_full_logit_reference(fp64_model, chunk_tokens):
    assert chunked_loss_error(fp64_model, chunk_tokens) <= LOSS_ULPS_FP64  # fp64 head only (LOSS_ULPS_FP64)


@pytest.mark.numerics
def test_chunked_loss_check_catches_a_chunked_path_without_the_softcap(fp64_model, monkeypatch):
    # the reference is Hugging Face's own forward, which still caps: measured 3.8e10 ulps, 3e8 x the budget
    monkeypatch.setattr(loss, "_softcap", lambda causal_lm: None)
    assert chunked_loss_error(fp64_model, 5) >= 1e6 * LOSS_ULPS_FP64


def hf_batch_mean_loss(model, batch, chunk_tokens=None):
    """The bug per_example_loss exists to avoid: row i's share of Hugging Face's batch loss (sum over all answer
    tokens of the batch / their total count), so .sum() is the HF loss and row i is weighted n_i / N, not 1."""
    token_nll, rows = loss.answer_token_nll(model, batch, chunk_tokens)
    return torch.zeros(batch["labels"].shape[0], dtype=token_nll.dtype).index_add(0, rows, token_nll) / len(
        token_nll
    )


def own_token_mean_error(model, per_example_loss) -> float:
    batch = padded_batch(**BATCH)
    token_nll, rows = loss.answer_token_nll(model, batch, chunk_tokens=3)
    n_answer = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    assert rows.tolist() == [r for r in range(4) for _ in range(int(n_answer[r]))]
    means = torch.stack([token_nll[rows == r].mean() for r in range(3)])
    return scaled_error(per_example_loss(model, batch)[:3], means, FP64_EPS)


@pytest.mark.numerics
def test_chunked_loss_is_each_examples_mean_over_its_own_answer_tokens(fp64_model):
    # budget: two summation orders of <= 12 positive token NLLs and a division: <= 12 u + u ~ 7 eps (observed 0)
    assert own_token_mean_error(fp64_model, loss.per_example_loss) <= 16
    # the batch-mean loss errs by a factor n_i / N (~0.3): measured 3.7e15 ulps, 2e14 x the budget
    assert own_token_mean_error(fp64_model, hf_batch_mean_loss) >= 1e6 * 16


def chunked_gradient_error(model, chunk_tokens) -> float:
    """fp32 ulps between the chunked path's parameter gradients and the full-logit reference's (worst tensor)."""
    batch = padded_batch(**BATCH)
    weights = torch.tensor(
        [0.3, -1.2, 2.0, 0.7], dtype=torch.float64
    )  # any upstream gradient, not only a plain sum
    params = [p for p in model.parameters() if p.requires_grad]
    chunked = torch.autograd.grad((loss.per_example_loss(model, batch, chunk_tokens) * weights).sum(), params)
    reference = torch.autograd.grad((reference_loss(model, batch) * weights).sum(), params)
    return scaled_error(chunked, reference, FP32_EPS)


@pytest.mark.numerics
@pytest.mark.parametrize("chunk_tokens", [1, 5, None])
def test_chunked_gradient_equals_full_logit_gradient(fp64_model, chunk_tokens):
    assert (
        chunked_gradient_error(fp64_model, chunk_tokens) <= GRAD_ULPS_FP32
    )  # fp32-limited body backward (GRAD_ULPS_FP32)


@pytest.mark.numerics
def test_chunked_gradient_check_catches_a_backward_that_drops_the_upstream_gradient(fp64_model, monkeypatch):
    # backward returning d nll / d hidden unscaled (the per-example weights and 1 / n_i lost):
    # measured 7.8e7 fp32 ulps, 5e6 x the budget
    monkeypatch.setattr(
        loss.ChunkedHeadNLL,
        "backward",
        staticmethod(
            lambda ctx, grad_nll: (ctx.saved_tensors[0].to(ctx.hidden_dtype), None, None, None, None)
        ),
    )
    assert chunked_gradient_error(fp64_model, 5) >= 1e4 * GRAD_ULPS_FP32


@pytest.mark.numerics
def test_no_grad_evaluation_gives_the_same_loss(fp64_model):
    batch = padded_batch(**BATCH)
    with torch.no_grad():
        evaluated = loss.per_example_loss(fp64_model, batch, chunk_tokens=2)
    assert not evaluated.requires_grad
    assert_close_scaled(
        evaluated,
        loss.per_example_loss(fp64_model, batch).detach(),
        LOSS_ULPS_FP64,
        eps=FP64_EPS,
        why="same body, fp64 head in other chunk shapes (LOSS_ULPS_FP64)",
    )


@pytest.mark.numerics
def test_trainable_head_falls_back_to_full_logits_with_the_same_loss_and_gradient(fp64_model):
    batch = padded_batch(**BATCH)
    fp64_model.lm_head.weight.requires_grad_(True)  # tied to the embeddings: both now train
    chunked = loss.per_example_loss(fp64_model, batch, chunk_tokens=2)
    assert_close_scaled(
        chunked,
        reference_loss(fp64_model, batch),
        LOSS_ULPS_FP64,
        eps=FP64_EPS,
        why="same body, fp64 head on [M, V] answer logits instead of [B, T, V] (LOSS_ULPS_FP64)",
    )
    (head_grad,) = torch.autograd.grad(chunked.sum(), [fp64_model.lm_head.weight])
    assert head_grad.abs().sum() > 0  # the head got its gradient: the unchunked path ran


def test_every_offered_mode_is_a_training_choice():
    import dataclasses

    from utils.train_args import PrivacyArguments

    field = next(f for f in dataclasses.fields(PrivacyArguments) if f.name == "grad_sample_mode")
    assert field.metadata["choices"] == list(privacy.GRAD_SAMPLE_MODES)
    assert field.default in privacy.GRAD_SAMPLE_MODES


def per_sample_gradient_error(mode, per_example_loss=loss.per_example_loss, mix_rows: float = 0.0) -> float:
    """fp32 ulps between grad_sample[i] and the gradient of example i's loss computed from example i alone (fp64
    model), worst over every (row, LoRA tensor), each on its own scale. mix_rows > 0 plants a coupling bug: layer 0's
    output becomes h + mix_rows * (batch mean of h - h), as a mask or op that lets one row see another would (a no-op
    on a row alone)."""
    model = lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    handle = None
    if mix_rows:

        def mix(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            mixed = hidden + mix_rows * (hidden.mean(0, keepdim=True) - hidden)
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        handle = model.get_base_model().model.layers[0].register_forward_hook(mix)
    batch = padded_batch(lengths=[17, 9, 23], answer_starts=[6, 4, 11])
    brute_force = []
    for row, length in enumerate([17, 9, 23]):
        alone = {k: v[row : row + 1, :length] for k, v in batch.items()}
        brute_force.append(torch.autograd.grad(per_example_loss(model, alone).sum(), params))

    hooks = privacy.attach_per_sample_hooks(model, mode)
    per_example_loss(model, batch).sum().backward()
    grad_samples = [p.grad_sample for p in params]
    hooks.remove_hooks()
    if handle is not None:
        handle.remove()

    for j, p in enumerate(params):
        assert grad_samples[j].shape == (3, *p.shape)
    assert max(g[0].abs().max().item() for g in grad_samples) > 1e-4  # not vacuous
    return max(scaled_error([g[row] for g in grad_samples], brute_force[row], FP32_EPS) for row in range(3))


@pytest.mark.numerics
@pytest.mark.parametrize("mode", privacy.GRAD_SAMPLE_MODES)
def test_per_sample_gradients_equal_brute_force_loop(mode):
    # fp32-limited (GRAD_ULPS_FP32): a row alone runs other matmul shapes than in the padded batch, so its fp64
    # activations differ in the last bits and the fp32 RMSNorm/softmax round some of them the other way
    assert per_sample_gradient_error(mode) <= GRAD_ULPS_FP32


@pytest.mark.numerics
@pytest.mark.parametrize("mode", privacy.GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("bug", ["hf_batch_mean_loss", "rows_mixed_1pct"])
def test_per_sample_gradient_check_catches_coupled_examples(mode, bug):
    # measured, the same on every mode and at 1 and 2 threads: batch-mean loss 6.9e6 fp32 ulps (4.3e5 x the budget);
    # 1% mixing 2.2e5 (1.4e4 x; 0.1% mixing gave 1.4e4-2.2e4 over 3 model/batch seeds, so the error is linear in it)
    if bug == "hf_batch_mean_loss":
        error = per_sample_gradient_error(mode, per_example_loss=hf_batch_mean_loss)
    else:
        error = per_sample_gradient_error(mode, mix_rows=1e-2)
    assert error >= 1000 * GRAD_ULPS_FP32


@pytest.mark.parametrize("mode", privacy.GRAD_SAMPLE_MODES)
def test_removed_per_sample_machinery_leaves_a_plain_model(mode):
    model = lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = padded_batch(lengths=[9, 12], answer_starts=[4, 5])
    privacy.attach_per_sample_hooks(model, mode).remove_hooks()
    loss.per_example_loss(model, batch).sum().backward()
    assert all(getattr(p, "grad_sample", None) is None and p.grad is not None for p in params)


def test_ew_mode_is_skipped_under_no_grad():
    model = lora_model()
    hooks = privacy.attach_per_sample_hooks(model, "ew")
    with torch.no_grad():
        loss.per_example_loss(model, padded_batch(lengths=[9, 12], answer_starts=[4, 5]))
    hooks.remove_hooks()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


def test_ew_mode_refuses_trainable_weights_outside_the_body():
    model = lora_model()
    model.get_base_model().lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="outside"):
        privacy.attach_per_sample_hooks(model, "ew")


@pytest.mark.parametrize("per_device_batch_size", [1, 3, 8, 1000])
def test_length_bucketing_keeps_exactly_the_poisson_draw(per_device_batch_size):
    n_rows = 500
    lengths = torch.randint(5, 300, (n_rows,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = privacy.PoissonSampler(n_rows, 0.05, seed=7)
    for step in range(20):
        drawn = sampler.draw(step)
        snapshot = list(drawn)
        batches = privacy.physical_batches(drawn, lengths, per_device_batch_size)
        assert drawn == snapshot  # the draw itself is untouched
        assert sorted(r for b in batches for r in b) == sorted(drawn)  # every drawn row once, nothing else
        assert all(1 <= len(b) <= per_device_batch_size for b in batches)
        flat = [lengths[r] for b in batches for r in b]
        assert flat == sorted(flat)  # grouped by length
        assert (
            privacy.PoissonSampler(n_rows, 0.05, seed=7).draw(step) == drawn
        )  # bucketing consumed no randomness


def test_the_draw_does_not_depend_on_lengths():
    """Two datasets of the same size with different lengths get the same rows drawn at every step."""
    sampler = privacy.PoissonSampler(300, 0.1, seed=3)
    short, long = [10] * 300, list(range(300, 0, -1))
    for step in range(10):
        assert (
            sorted(r for b in privacy.physical_batches(sampler.draw(step), short, 4) for r in b)
            == sorted(r for b in privacy.physical_batches(sampler.draw(step), long, 4) for r in b)
            == sorted(sampler.draw(step))
        )
