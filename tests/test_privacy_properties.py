"""The DP-SGD properties the privacy claim rests on, one named test each.

Gradient-level properties run in float64 on a tiny VaultGemma + LoRA through the project's own
pieces (utils.loss.per_example_loss, utils.privacy.attach_per_sample_hooks, make_dp_optimizer);
loop-level properties read one instrumented train_dp_lora run. End-to-end behaviour (resume, budget
guard by calibration, --save_loss_threshold marking, bad arguments) is in test_train_dp_lora.py.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

import train_dp_lora
from conftest import (
    FP32_EPS,
    FP64_EPS,
    assert_close_scaled,
    bundled_cards,
    logical_step_grad,
    scaled_error,
    write_cards,
)
from utils import privacy, recipe, train_args, training
from utils.data import collate
from utils.loss import per_example_loss
from utils.prompt import encode_example

DELTA = 1e-5

# Error budgets (conftest: ulps of the expected tensor's largest entry).
# Gradients that come from different batch shapes (a row alone, a batch without one row, a longer pad, other physical
# batches) are fp32-limited: VaultGemma's RMSNorm and eager softmax run in fp32 even in this fp64 model, and
# last-bit differences of fp64 activations round there differently. Observed 0-0.002 fp32 ulps here (and 1.4 in
# tests/test_loss.py's batches); the bugs these tests exist for (batch-mean loss, rows that see each other, divisor
# 6 or 32 instead of 16) err by 1e4-1e7 fp32 ulps.
GRAD_ULPS_FP32 = 16
# The same batch through the hooked and the plain model runs identical fp32 steps; only the fp64 sums differ
# (per-sample einsum then sum over rows vs one matmul over B*T ~ 240 products: <= 240 u times the terms' condition).
# Observed 4.3 fp64 ulps.
SAME_BATCH_ULPS_FP64 = 1024


# -----------------------------------------------------------------------------
# a float64 tiny VaultGemma + LoRA and its per-sample gradients


def lora_model(model_dir, per_sample: bool):
    """Tiny VaultGemma + LoRA in float64 with random (not zero) A and B, so every LoRA weight gets a gradient."""
    from peft import LoraConfig, get_peft_model

    from utils.model_loading import load_base_model

    base = load_base_model(model_dir, dtype=torch.float64, device="cpu")
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data = 0.05 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
    if per_sample:
        privacy.attach_per_sample_hooks(model)
    return model, [p for p in model.parameters() if p.requires_grad]


def examples(tokenizer, cards):
    return [encode_example(tokenizer, c["input"], c["output"], c["instruction"]) for c in cards]


def batch_of(tokenizer, exs):
    return collate(exs, tokenizer.pad_token_id)


def per_sample_grads(model, params, batch) -> torch.Tensor:
    """[B, P] per-sample gradients from Opacus's hooks after one backward of the summed loss."""
    for p in params:
        p.grad_sample, p.grad = None, None
    per_example_loss(model, batch).sum().backward()
    return torch.cat([p.grad_sample.reshape(p.grad_sample.shape[0], -1) for p in params], dim=1)


def clip(rows: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Per-row clipping with Opacus's factor min(1, C / (norm + 1e-6))."""
    return rows * (max_grad_norm / (rows.norm(dim=1) + 1e-6)).clamp(max=1.0).unsqueeze(1)


def dp_step_grad(
    model,
    params,
    batches,
    *,
    noise_multiplier,
    max_grad_norm,
    expected_batch_size,
    accountant=None,
    sample_rate=None,
):
    """The flat p.grad DPOptimizer hands the inner optimizer for one logical batch split into `batches`."""
    optimizer = privacy.make_dp_optimizer(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier,
        max_grad_norm,
        expected_batch_size,
        generator=torch.Generator().manual_seed(0),
    )
    if accountant is not None:
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    backwards = [lambda batch=batch: per_example_loss(model, batch).sum().backward() for batch in batches]
    return logical_step_grad(optimizer, params, backwards)


@pytest.fixture(scope="module")
def cards():
    # short, different lengths, so padding differs from example to example
    return sorted(bundled_cards()[:40], key=lambda c: len(c["input"]) + len(c["output"]))[:6]


@pytest.fixture(scope="module")
def hooked(tiny_model_dir):
    return lora_model(tiny_model_dir, per_sample=True)


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return lora_model(tiny_model_dir, per_sample=False)


@pytest.mark.numerics
def test_per_sample_gradients_match_a_brute_force_per_example_loop(hooked, plain, tiny_tokenizer, cards):
    model, params = hooked
    exs = examples(tiny_tokenizer, cards)
    grads = per_sample_grads(model, params, batch_of(tiny_tokenizer, exs))
    ref_model, ref_params = plain
    for i, ex in enumerate(exs):
        ref_model.zero_grad(set_to_none=True)
        per_example_loss(ref_model, batch_of(tiny_tokenizer, [ex])).sum().backward()
        reference = torch.cat([p.grad.reshape(-1) for p in ref_params])
        assert reference.norm() > 0
        assert_close_scaled(
            grads[i], reference, GRAD_ULPS_FP32, eps=FP32_EPS, why="a row alone vs in the batch: fp32-limited"
        )


def removal_error(model, params, tiny_tokenizer, cards) -> float:
    """fp32 ulps by which removing example 0 moves the other examples' clipped gradients."""
    exs = examples(tiny_tokenizer, cards)
    clipped = clip(per_sample_grads(model, params, batch_of(tiny_tokenizer, exs)), max_grad_norm=1e-2)
    removed = clip(per_sample_grads(model, params, batch_of(tiny_tokenizer, exs[1:])), max_grad_norm=1e-2)
    return scaled_error(removed, clipped[1:], FP32_EPS)


@pytest.mark.numerics
def test_removing_or_lengthening_one_example_never_changes_another_examples_clipped_gradient(
    hooked, tiny_tokenizer, cards
):
    model, params = hooked
    assert (
        removal_error(model, params, tiny_tokenizer, cards) <= GRAD_ULPS_FP32
    )  # other batch shape: fp32-limited
    exs = examples(tiny_tokenizer, cards)
    clipped = clip(per_sample_grads(model, params, batch_of(tiny_tokenizer, exs)), max_grad_norm=1e-2)
    longer = dict(
        cards[0], output=cards[0]["output"] + " " + " ".join(c["output"] for c in cards)
    )  # now the longest: more padding for all
    widths = [len(e["input_ids"]) for e in examples(tiny_tokenizer, [longer] + cards[1:])]
    assert (
        widths[0] > max(widths[1:]) + model.get_base_model().config.sliding_window
    )  # some pads see only pads in their window
    lengthened = clip(
        per_sample_grads(
            model, params, batch_of(tiny_tokenizer, examples(tiny_tokenizer, [longer] + cards[1:]))
        ),
        1e-2,
    )
    assert (
        scaled_error(lengthened[0], clipped[0], FP32_EPS) > 1e4 * GRAD_ULPS_FP32
    )  # its own gradient did change (3.7e6)
    assert_close_scaled(
        lengthened[1:], clipped[1:], GRAD_ULPS_FP32, eps=FP32_EPS, why="wider padding: fp32-limited"
    )


@pytest.mark.numerics
def test_removal_check_catches_rows_that_see_each_other(hooked, tiny_tokenizer, cards):
    # a planted coupling: layer 0's output mixed 5% with the batch mean (a mask or op letting one row see another;
    # removing 1 of 6 rows moves that mean by ~1/6 of a row, and clipping rescales: 1% gave only 1.5e4 ulps)
    model, params = hooked

    def mix(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        mixed = hidden + 5e-2 * (hidden.mean(0, keepdim=True) - hidden)
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

    handle = model.get_base_model().model.layers[0].register_forward_hook(mix)
    try:
        assert (
            removal_error(model, params, tiny_tokenizer, cards) >= 1000 * GRAD_ULPS_FP32
        )  # measured 7.4e4 ulps: 4.6e3 x
    finally:
        handle.remove()


@pytest.mark.numerics
def test_removing_one_example_changes_the_summed_clipped_gradient_by_at_most_C(hooked, tiny_tokenizer, cards):
    model, params = hooked
    exs, max_grad_norm = examples(tiny_tokenizer, cards), 1e-2
    assert (
        per_sample_grads(model, params, batch_of(tiny_tokenizer, exs)).norm(dim=1) > max_grad_norm
    ).all()  # clipping is active
    # Exactly, the difference is example j's clipped gradient, of norm C n / (n + 1e-6) < C (Opacus's 1e-6; n ~ 0.02
    # here, so 5e-5 C below C, observed). The other 5 rows' clipped gradients may move by GRAD_ULPS_FP32 fp32 ulps each
    # (another batch shape): the budget is C (1 + 5 * 16 * eps32) = C (1 + 1e-5). Without clipping: n / C = 1.5-2.1.
    budget = 1 + (len(exs) - 1) * GRAD_ULPS_FP32 * FP32_EPS
    assert (
        max(summed_clipped_gradient_sensitivity(model, params, tiny_tokenizer, exs, max_grad_norm)) <= budget
    )
    # the check catches a step that does not clip (clipping at 1e9): 1.5-2.1 C, i.e. 5e4-1e5 x the budget's slack
    unclipped = summed_clipped_gradient_sensitivity(
        model, params, tiny_tokenizer, exs, max_grad_norm, clip_at=1e9
    )
    assert min(unclipped) - 1 >= 1e4 * (budget - 1)


def summed_clipped_gradient_sensitivity(
    model, params, tiny_tokenizer, exs, max_grad_norm, clip_at=None
) -> list[float]:
    """||summed clipped gradient - the same without example j|| / max_grad_norm, for each j (clipped at clip_at)."""
    kwargs = dict(
        noise_multiplier=0.0, max_grad_norm=clip_at or max_grad_norm, expected_batch_size=1
    )  # p.grad = the clipped sum
    full = dp_step_grad(model, params, [batch_of(tiny_tokenizer, exs)], **kwargs)
    return [
        (
            (
                full
                - dp_step_grad(model, params, [batch_of(tiny_tokenizer, exs[:j] + exs[j + 1 :])], **kwargs)
            ).norm()
            / max_grad_norm
        ).item()
        for j in range(len(exs))
    ]


@pytest.mark.numerics
def test_no_noise_and_no_clipping_equals_the_non_private_step_over_the_expected_batch(
    hooked, plain, tiny_tokenizer, cards
):
    model, params = hooked
    batch, expected = batch_of(tiny_tokenizer, examples(tiny_tokenizer, cards)), 16  # realised 6, expected 16
    dp_grad = dp_step_grad(
        model, params, [batch], noise_multiplier=0.0, max_grad_norm=1e9, expected_batch_size=expected
    )
    ref_model, ref_params = plain
    ref_model.zero_grad(set_to_none=True)
    (per_example_loss(ref_model, batch).sum() / expected).backward()  # train_dp_lora's --disable_dp loss
    # same batch, same fp32 steps: fp64-limited (SAME_BATCH_ULPS_FP64); dividing by the realised 6 errs by 7.5e15 ulps
    assert_close_scaled(
        dp_grad,
        torch.cat([p.grad.reshape(-1) for p in ref_params]),
        SAME_BATCH_ULPS_FP64,
        eps=FP64_EPS,
        why="same batch: per-sample sums vs one matmul, in fp64",
    )


@pytest.mark.numerics
def test_divisor_is_the_expected_batch_size_not_the_realised_one_even_across_physical_batches(
    hooked, tiny_tokenizer, cards
):
    model, params = hooked
    exs, max_grad_norm, expected = examples(tiny_tokenizer, cards), 1e-2, 16
    clipped_sum = clip(per_sample_grads(model, params, batch_of(tiny_tokenizer, exs)), max_grad_norm).sum(0)
    accountant = privacy.make_accountant("prv")
    split = dp_step_grad(
        model,
        params,
        [batch_of(tiny_tokenizer, exs[:2]), batch_of(tiny_tokenizer, exs[2:])],
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected,
        accountant=accountant,
        sample_rate=0.25,
    )
    # other physical batches: fp32-limited (observed 6e-4 ulps); / 6 or / (16 * 2 physical batches) err by
    # 1.4e7 or 6e6 ulps
    assert_close_scaled(
        split, clipped_sum / expected, GRAD_ULPS_FP32, eps=FP32_EPS, why="2 + 4 rows vs 6 rows: fp32-limited"
    )
    assert accountant.history == [(0.0, 0.25, 1)]  # two physical batches are one step at the logical q


@pytest.mark.numerics
def test_nonfinite_example_contributes_zero_to_the_step(hooked, tiny_tokenizer, cards):
    model, params = hooked
    exs, max_grad_norm = examples(tiny_tokenizer, cards), 1e-2
    expected = clip(
        per_sample_grads(model, params, batch_of(tiny_tokenizer, [exs[i] for i in (0, 2, 4, 5)])),
        max_grad_norm,
    ).sum(0)
    optimizer = privacy.make_dp_optimizer(torch.optim.SGD(params, lr=0.0), 0.0, max_grad_norm, 1)
    optimizer.zero_grad(set_to_none=True)
    losses = per_example_loss(model, batch_of(tiny_tokenizer, exs))
    losses = losses * torch.tensor(
        [1.0, float("nan"), 1.0, 1.0, 1.0, 1.0], dtype=losses.dtype
    )  # example 1: NaN loss
    finite = torch.isfinite(losses)
    losses[finite].sum().backward()  # as train_dp_lora does
    params[0].grad_sample[3] = float("inf")  # example 3: finite loss, overflowing gradient
    assert privacy.zero_nonfinite_grad_samples(params, ~finite) == 2
    optimizer.step()
    # 6 rows vs the 4 healthy ones: fp32-limited; a NaN or inf row kept would make it NaN/inf (scaled_error: inf)
    assert_close_scaled(
        torch.cat([p.grad.reshape(-1) for p in params]),
        expected,
        GRAD_ULPS_FP32,
        eps=FP32_EPS,
        why="6 rows vs the 4 healthy ones: fp32-limited",
    )
    optimizer.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# Poisson sampling


@pytest.mark.numerics
@pytest.mark.parametrize("secure_mode", [False, True], ids=["seeded", "secure"])
def test_poisson_batch_sizes_have_binomial_mean_and_variance(secure_mode):
    n, q, steps = 400, 0.05, 2000
    sampler = privacy.PoissonSampler(n, q, seed=7, secure_mode=secure_mode)
    sizes = np.array([len(sampler.draw(t)) for t in range(steps)])
    # mean N q = 20 (standard error 0.097: the limit is 5.1 s.e.), variance N q (1 - q) = 19 (s.e. 0.60: 5.0 s.e.);
    # false failure < 1e-6 each for the OS-random secure draw. Seeded (an exact torch CPU draw from sha256 seeds, the
    # same on every CPU): mean at +0.8 s.e., variance at +1.3 s.e.
    assert abs(sizes.mean() - n * q) < 0.5
    assert abs(sizes.var(ddof=1) - n * q * (1 - q)) < 3.0


@pytest.mark.numerics
@pytest.mark.parametrize("secure_mode", [False, True], ids=["seeded", "secure"])
def test_poisson_draws_are_independent_across_consecutive_steps(secure_mode):
    # limits: 6.2 s.e. (pairs), 5.2 s.e. (mean rate), 6.5 s.e. for each of 400 rows' rates (the max row sits at 3.1):
    # false failure < 1e-6 in all for the secure draw; the seeded draw is exact
    n, q, steps = 400, 0.1, 1500
    sampler = privacy.PoissonSampler(n, q, seed=11, secure_mode=secure_mode)
    masks = np.zeros((steps, n), dtype=bool)
    for t in range(steps):
        masks[t, sampler.draw(t)] = True
    both = (masks[1:] & masks[:-1]).mean()  # P(a row is in steps t and t+1) = q^2 = 0.01, s.e. about 1.3e-4
    assert abs(both - q * q) < 8e-4
    per_row = masks.mean(0)  # every row is drawn at rate q, none favoured (s.e. of a row's rate ~0.008)
    assert abs(per_row.mean() - q) < 2e-3 and per_row.max() < q + 0.05 and per_row.min() > q - 0.05


def test_no_row_contributes_twice_to_one_step():
    n = 300
    sampler = privacy.PoissonSampler(n, 0.2, seed=3)
    lengths = [(7 * i) % 50 + 5 for i in range(n)]
    for t in range(200):
        drawn = sampler.draw(t)
        assert len(set(drawn)) == len(drawn)
        physical = privacy.physical_batches(drawn, lengths, per_device_batch_size=7)
        assert sorted(i for b in physical for i in b) == sorted(
            drawn
        )  # a partition: each drawn row exactly once


# -----------------------------------------------------------------------------
# noise


def noise_only_step(
    noise_multiplier, max_grad_norm, expected_batch_size, size, secure_mode, generator=None
) -> torch.Tensor:
    """The update direction DPOptimizer produces when every per-sample gradient is zero: pure noise / B."""
    param = torch.nn.Parameter(torch.zeros(size))
    optimizer = privacy.make_dp_optimizer(
        torch.optim.SGD([param], lr=0.0),
        noise_multiplier,
        max_grad_norm,
        expected_batch_size,
        generator=generator,
        secure_mode=secure_mode,
    )
    param.grad_sample = torch.zeros(3, size)
    optimizer.step()
    assert param.grad.dtype == torch.float32
    return param.grad.clone()


@pytest.mark.numerics
@pytest.mark.parametrize("secure_mode", [False, True], ids=["seeded", "secure"])
def test_noise_std_is_sigma_times_C_over_the_expected_batch(secure_mode):
    # std within 1% = 8.9 s.e. (a sqrt(2) or B-vs-realised error is 30-40%), mean within 5 s.e.: false failure < 1e-6
    sigma, max_grad_norm, expected = 1.3, 0.7, 4
    generator = None if secure_mode else torch.Generator().manual_seed(0)
    noise = noise_only_step(sigma, max_grad_norm, expected, 400_000, secure_mode, generator).double()
    target = sigma * max_grad_norm / expected
    assert abs(noise.std().item() / target - 1) < 0.01  # relative s.e. of the std estimate is 0.11%
    assert abs(noise.mean().item()) < 5 * target / math.sqrt(len(noise))


@pytest.mark.numerics
def test_secure_noise_is_gaussian_with_std_sigma_C():
    sigma, max_grad_norm = 0.9, 2.5
    draws = noise_only_step(sigma, max_grad_norm, 1, 200_000, secure_mode=True).double().numpy()
    scale = sigma * max_grad_norm
    # exact N(0, (sigma C)^2), no fitted parameters. The draw is OS-random (not seedable), so each check fails a correct
    # sampler with probability 1e-6 (p-values are uniform under the null); at n = 2e5 KS still rejects a 3% scale error.
    assert scipy.stats.kstest(draws, "norm", args=(0.0, scale)).pvalue > 1e-6
    assert scipy.stats.cramervonmises(draws, "norm", args=(0.0, scale)).pvalue > 1e-6
    # shape (tails): the count beyond 2, 3, 4 sigma is Binomial(n, 2 Phi(-t)) (9100, 540, 12.7 expected); each count
    # outside its central 1 - 2e-6 range fails. (Anderson-Darling's tables stop at p = 0.001: a 1e-3 false failure.)
    for t in (2.0, 3.0, 4.0):
        tail = 2 * scipy.stats.norm.sf(t)
        low, high = (
            scipy.stats.binom.ppf(1e-6, len(draws), tail),
            scipy.stats.binom.isf(1e-6, len(draws), tail),
        )
        assert low <= (np.abs(draws) > t * scale).sum() <= high, t


def test_secure_noise_does_not_follow_torch_seeds_and_refuses_a_generator():
    torch.manual_seed(0)
    first = noise_only_step(1.0, 1.0, 1, 1000, secure_mode=True)
    torch.manual_seed(0)
    second = noise_only_step(1.0, 1.0, 1, 1000, secure_mode=True)
    assert not torch.equal(first, second)  # Opacus's secure mode with no generator would repeat here
    seeded = [noise_only_step(1.0, 1.0, 1, 1000, False, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*seeded)  # the default mode is reproducible from the seed, by design
    with pytest.raises(ValueError, match="seeded generator"):
        noise_only_step(1.0, 1.0, 1, 10, secure_mode=True, generator=torch.Generator())


@pytest.mark.numerics
def test_secure_noise_is_drawn_in_fp32_over_a_bf16_base(tiny_model_dir, tiny_tokenizer, cards):
    args = train_dp_lora.parse_args(
        ["--model", tiny_model_dir, "--dtype", "bfloat16", "--lora_dropout", "0", "--secure_mode"]
    )
    model = train_dp_lora.build_model(args, tiny_tokenizer, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in params} == {torch.float32}
    privacy.attach_per_sample_hooks(model)
    optimizer = privacy.make_dp_optimizer(torch.optim.SGD(params, lr=0.0), 1.0, 1.0, 4, secure_mode=True)
    per_example_loss(model, batch_of(tiny_tokenizer, examples(tiny_tokenizer, cards[:3]))).sum().backward()
    optimizer.step()
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    assert grads.dtype == torch.float32
    # fp32 precision, not bf16 values: a continuous fp32 value is exactly a bf16 one with probability 2^-16, so the
    # share is ~1 - 1.5e-5 (a binomial over 10^4+ weights: > 0.9 fails with probability < 1e-100); bf16 noise gives 0
    assert (grads.to(torch.bfloat16).float() != grads).float().mean() > 0.9


# -----------------------------------------------------------------------------
# delta and the step budget


def test_delta_must_be_below_one_over_n():
    for n in (2, 10, 520, 10**4, 10**6):
        assert privacy.check_delta(privacy.default_delta(n), n) is None and privacy.default_delta(n) < 1 / n
        assert privacy.check_delta(1 / n, n) is not None and privacy.check_delta(2 / n, n) is not None
    args = train_dp_lora.parse_args(["--delta", "0.01"])
    recipe.apply(
        args, 100
    )  # as train_dp_lora.set_up does: the recipe fills the levers before the data checks
    with pytest.raises(train_dp_lora.cli.ArgumentErrors, match="must be in \\(0, 1/N\\)"):
        train_args.validate_against_data(args, n_train=100)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_step_budget_is_the_last_step_within_the_target(accountant):
    epsilon, q, planned = 2.0, 0.05, 200
    sigma = 0.8 * privacy.calibrate_noise(
        epsilon, DELTA, q, planned, accountant
    )  # too little noise for all planned steps
    budget = privacy.step_budget(epsilon, DELTA, sigma, q, accountant, planned)
    assert 0 < budget < planned
    assert (
        privacy.epsilon_after(budget, sigma, q, DELTA, accountant)
        <= epsilon
        < privacy.epsilon_after(budget + 1, sigma, q, DELTA, accountant)
    )


# -----------------------------------------------------------------------------
# the training loop: one instrumented train_dp_lora run
#   N = 54 rows, 5 steps at logical batch 8 split into physical batches of 3;
#   step 3's Poisson draw is forced empty; one example of step 1 gets a NaN loss;
#   --save_loss_threshold 1e9 checkpoints every non-empty step as "selected on private data";
#   every accelerator.log call is recorded.

STEPS, LOGICAL, PHYSICAL, EMPTY_STEP = 5, 8, 3, 2  # EMPTY_STEP is 0-based: the third step


@pytest.fixture(scope="module")
def instrumented_run(tiny_model_dir, tmp_path_factory):
    import accelerate

    root = tmp_path_factory.mktemp("instrumented")
    cards_file = write_cards(root / "cards.jsonl", bundled_cards()[:60])
    out = root / "out"
    logged, loss_calls = [], []
    real_log, real_draw, real_loss = (
        accelerate.Accelerator.log,
        privacy.PoissonSampler.draw,
        training.per_example_loss,
    )

    def record_log(self, values, step=None, log_kwargs=None):
        logged.append((step, dict(values)))
        return real_log(self, values, step=step, log_kwargs=log_kwargs or {})

    def draw(self, step):
        return [] if step == EMPTY_STEP else real_draw(self, step)

    def loss_with_one_nan(model, batch):
        losses = real_loss(model, batch)
        if model.training:
            loss_calls.append(len(losses))
            if len(loss_calls) == 1:
                losses = losses * torch.tensor([float("nan")] + [1.0] * (len(losses) - 1), dtype=losses.dtype)
        return losses

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accelerate.Accelerator, "log", record_log)
        patch.setattr(privacy.PoissonSampler, "draw", draw)
        patch.setattr(training, "per_example_loss", loss_with_one_nan)
        args = train_dp_lora.parse_args(
            [
                "--model",
                tiny_model_dir,
                "--dataset",
                cards_file,
                "--output_dir",
                str(out),
                "--max_steps",
                str(STEPS),
                "--logical_batch_size",
                str(LOGICAL),
                "--per_device_train_batch_size",
                str(PHYSICAL),
                "--eval_steps",
                "2",
                "--save_steps",
                "0",
                "--save_loss_threshold",
                "1e9",
                "--report_to",
                "none",
                "--epsilon",
                "3",
            ]
        )
        results = train_dp_lora.main(args)
    report = json.loads((out / "adapter" / "privacy_report.json").read_text())
    natural_empty = sum(
        len(real_draw(privacy.PoissonSampler(report["n_train"], report["sample_rate"], 42), t)) == 0
        for t in range(STEPS)
        if t != EMPTY_STEP
    )
    return {
        "out": out,
        "results": results,
        "report": report,
        "logged": logged,
        "loss_calls": loss_calls,
        "empty": 1 + natural_empty,
    }


def read_json(path):
    return json.loads(Path(path).read_text())


def adapter_tensors(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def test_accountant_steps_equal_optimizer_steps_at_the_logical_q_despite_physical_batches(instrumented_run):
    report = instrumented_run["report"]
    q = LOGICAL / report["n_train"]
    assert report["sample_rate"] == q and report["steps_taken"] == STEPS
    assert len(instrumented_run["loss_calls"]) > STEPS  # several physical batches per logical step happened
    state = read_json(
        instrumented_run["out"]
        / "private_run_record"
        / "checkpoints"
        / f"step_{STEPS:06d}"
        / "privacy_record.json"
    )
    assert state["accountant_history"] == [
        [report["noise_multiplier"], q, STEPS]
    ]  # one entry per step, empty step included
    event = report["dp_event"]["events"]
    assert len(event) == 1 and event[0]["count"] == STEPS
    assert (
        event[0]["inner"]["sampling_probability"] == q
        and event[0]["inner"]["inner"]["noise_multiplier"] == report["noise_multiplier"]
    )


def test_empty_poisson_draw_is_a_counted_noise_only_step(instrumented_run):
    logged = instrumented_run["logged"]
    assert (
        instrumented_run["results"]["counters"]["empty_steps"] == instrumented_run["empty"]
    )  # private record only
    losses = {step: values["train/loss"] for step, values in logged if "privacy/epsilon" in values}
    assert sorted(losses) == list(
        range(1, STEPS + 1)
    )  # every step, the empty one included, is logged with its epsilon
    assert math.isnan(losses[EMPTY_STEP + 1])  # no row drawn: no loss to report


def test_nan_loss_example_is_left_out_and_reported(instrumented_run):
    logged = instrumented_run["logged"]
    assert instrumented_run["results"]["counters"]["nonfinite_examples"] == 1  # private record only
    assert all(torch.isfinite(t).all() for t in adapter_tensors(instrumented_run["out"] / "adapter").values())
    first = next(values for step, values in logged if step == 1)
    assert math.isfinite(first["train/loss"])  # the mean over the examples that count


def test_final_epsilon_is_within_the_target(instrumented_run):
    report = instrumented_run["report"]
    assert (
        report["epsilon"] <= report["target_epsilon"] == 3.0
        and not instrumented_run["results"]["stopped_by_budget"]
    )
    assert report["epsilon"] == pytest.approx(
        privacy.epsilon_after(
            STEPS, report["noise_multiplier"], report["sample_rate"], report["delta"], "prv"
        )
    )


def test_released_adapters_are_the_last_steps_not_a_loss_selected_checkpoint(instrumented_run):
    out = instrumented_run["out"]
    released = adapter_tensors(out / "adapter")
    last = adapter_tensors(out / "private_run_record" / "checkpoints" / f"step_{STEPS:06d}" / "adapter")
    assert released.keys() == last.keys() and all(torch.equal(released[k], last[k]) for k in released)
    selected = read_json(
        out / "private_run_record" / "checkpoints" / "step_000002" / "adapter" / "privacy_report.json"
    )
    assert (
        selected["selected_on_private_data"]
        and selected["steps_taken"] == 2
        and "--save_loss_threshold" in selected["selection"]
    )
    assert any(
        not torch.equal(released[k], t)
        for k, t in adapter_tensors(
            out / "private_run_record" / "checkpoints" / "step_000002" / "adapter"
        ).items()
    )
    assert instrumented_run["report"]["selected_on_private_data"] is False


def test_only_the_documented_allowlist_of_metrics_is_logged(instrumented_run):
    keys = set().union(*(values.keys() for _, values in instrumented_run["logged"]))
    allowlist = {
        "train/loss",
        "train/lr",
        "privacy/epsilon",
        "privacy/delta",
        "eval/loss",
    }  # no realised batch size
    assert keys == allowlist == set(train_dp_lora.LOGGED_METRICS)
    private = {k for k, what in train_dp_lora.LOGGED_METRICS.items() if what.startswith("private:")}
    assert private == {"train/loss", "eval/loss"}


def test_secure_mode_runs_do_not_follow_the_seed(tiny_model_dir, tmp_path):
    # same arguments and seed twice: the sampling and the noise must differ (they come from the OS CSPRNG)
    adapters = []
    for name in ("a", "b"):
        args = train_dp_lora.parse_args(
            [
                "--model",
                tiny_model_dir,
                "--dataset",
                "bundled",
                "--output_dir",
                str(tmp_path / name),
                "--max_steps",
                "2",
                "--logical_batch_size",
                "16",
                "--per_device_train_batch_size",
                "16",
                "--eval_steps",
                "0",
                "--save_steps",
                "0",
                "--report_to",
                "none",
                "--secure_mode",
            ]
        )
        train_dp_lora.main(args)
        assert read_json(tmp_path / name / "adapter" / "privacy_report.json")["secure_mode"] is True
        adapters.append(adapter_tensors(tmp_path / name / "adapter"))
    assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
