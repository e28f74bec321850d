"""utils/loss.py's chunked answer-only loss against the full-logit reference, per-sample gradients of
every offered --grad_sample_mode against a brute-force loop, and length bucketing against the draw.
All in fp64 on a tiny VaultGemma (logit softcapping on, as in the real model)."""

import pytest
import torch
from conftest import build_tiny_vaultgemma

from utils import loss, privacy
from utils.prompt import IGNORE_INDEX

VOCAB = 97


@pytest.fixture
def fp64_model():
    model = build_tiny_vaultgemma(VOCAB, seed=1).double()
    assert model.config.final_logit_softcapping  # the chunked path must handle the cap
    model.requires_grad_(False)
    for p in model.model.layers.parameters():  # train the body, keep the (tied) head frozen: the LoRA situation
        p.requires_grad_(True)
    return model


def lora_model(seed=0):
    """fp64 tiny VaultGemma with train_dp_lora.py's LoRA targets, dropout off, non-zero B."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny_vaultgemma(VOCAB, seed=seed).double()
    base.requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
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


BATCH = dict(lengths=[17, 9, 23, 12], answer_starts=[6, 4, 11, None])  # ragged, padded, one row without answer tokens


def reference_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return loss.per_example_loss_from_logits(logits, batch["labels"])


@pytest.mark.parametrize("chunk_tokens", [1, 5, 1000])
def test_chunked_loss_equals_full_logit_reference(fp64_model, chunk_tokens):
    batch = padded_batch(**BATCH)
    chunked = loss.per_example_loss(fp64_model, batch, chunk_tokens=chunk_tokens)
    reference = reference_loss(fp64_model, batch)
    assert chunked.dtype == torch.float64
    torch.testing.assert_close(chunked, reference, rtol=1e-12, atol=1e-12)
    assert chunked[3].item() == 0.0  # no answer tokens: zero loss, as the reference


def test_chunked_loss_is_each_examples_mean_over_its_own_answer_tokens(fp64_model):
    batch = padded_batch(**BATCH)
    token_nll, rows = loss.answer_token_nll(fp64_model, batch, chunk_tokens=3)
    n_answer = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)
    assert rows.tolist() == [r for r in range(4) for _ in range(int(n_answer[r]))]
    means = [token_nll[rows == r].mean().item() for r in range(3)]
    torch.testing.assert_close(loss.per_example_loss(fp64_model, batch)[:3], torch.tensor(means, dtype=torch.float64), rtol=1e-13, atol=0)


@pytest.mark.parametrize("chunk_tokens", [1, 5, None])
def test_chunked_gradient_equals_full_logit_gradient(fp64_model, chunk_tokens):
    batch = padded_batch(**BATCH)
    weights = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)  # any upstream gradient, not only a plain sum
    params = [p for p in fp64_model.parameters() if p.requires_grad]
    chunked = torch.autograd.grad((loss.per_example_loss(fp64_model, batch, chunk_tokens) * weights).sum(), params)
    reference = torch.autograd.grad((reference_loss(fp64_model, batch) * weights).sum(), params)
    for got, want in zip(chunked, reference):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_no_grad_evaluation_gives_the_same_loss(fp64_model):
    batch = padded_batch(**BATCH)
    with torch.no_grad():
        evaluated = loss.per_example_loss(fp64_model, batch, chunk_tokens=2)
    assert not evaluated.requires_grad
    torch.testing.assert_close(evaluated, loss.per_example_loss(fp64_model, batch).detach(), rtol=1e-13, atol=0)


def test_trainable_head_falls_back_to_full_logits_with_the_same_loss_and_gradient(fp64_model):
    batch = padded_batch(**BATCH)
    fp64_model.lm_head.weight.requires_grad_(True)  # tied to the embeddings: both now train
    chunked = loss.per_example_loss(fp64_model, batch, chunk_tokens=2)
    torch.testing.assert_close(chunked, reference_loss(fp64_model, batch), rtol=1e-12, atol=1e-12)
    (head_grad,) = torch.autograd.grad(chunked.sum(), [fp64_model.lm_head.weight])
    assert head_grad.abs().sum() > 0  # the head got its gradient: the unchunked path ran


def test_every_offered_mode_is_a_training_choice():
    import train_dp_lora

    field = next(f for f in train_dp_lora.dataclasses.fields(train_dp_lora.PrivacyArguments) if f.name == "grad_sample_mode")
    assert field.metadata["choices"] == list(privacy.GRAD_SAMPLE_MODES)
    assert field.default in privacy.GRAD_SAMPLE_MODES


@pytest.mark.parametrize("mode", privacy.GRAD_SAMPLE_MODES)
def test_per_sample_gradients_equal_brute_force_loop(mode):
    """grad_sample[i] == the gradient of example i's loss computed from example i alone (fp64)."""
    model = lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = padded_batch(lengths=[17, 9, 23], answer_starts=[6, 4, 11])
    brute_force = []
    for row, length in enumerate([17, 9, 23]):
        alone = {k: v[row:row + 1, :length] for k, v in batch.items()}
        brute_force.append(torch.autograd.grad(loss.per_example_loss(model, alone).sum(), params))

    hooks = privacy.attach_per_sample_hooks(model, mode)
    loss.per_example_loss(model, batch).sum().backward()
    grad_samples = [p.grad_sample for p in params]
    hooks.remove_hooks()

    for j, p in enumerate(params):
        assert grad_samples[j].shape == (3, *p.shape)
        for row in range(3):
            torch.testing.assert_close(grad_samples[j][row], brute_force[row][j], rtol=1e-9, atol=1e-13)
    assert max(g[0].abs().max().item() for g in grad_samples) > 1e-4  # not vacuous


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
        assert privacy.PoissonSampler(n_rows, 0.05, seed=7).draw(step) == drawn  # bucketing consumed no randomness


def test_the_draw_does_not_depend_on_lengths():
    """Two datasets of the same size with different lengths get the same rows drawn at every step."""
    sampler = privacy.PoissonSampler(300, 0.1, seed=3)
    short, long = [10] * 300, list(range(300, 0, -1))
    for step in range(10):
        assert sorted(r for b in privacy.physical_batches(sampler.draw(step), short, 4) for r in b) == \
               sorted(r for b in privacy.physical_batches(sampler.draw(step), long, 4) for r in b) == sorted(sampler.draw(step))
