"""Differential-privacy pieces: Poisson sampling, noise calibration, the budget, the DP optimizer.

Privacy unit: one flashcard (one training row). Each step includes every training row independently
with probability q = logical_batch_size / N (Poisson sampling), clips each row's gradient to
max_grad_norm, adds Gaussian noise N(0, (sigma * C)^2) once to the sum and divides by the *expected*
batch size. sigma is calibrated so that the accountant's epsilon after exactly the planned number of
steps at this q is at most the target; the accountant is stepped once per optimizer step, empty draws
included.
"""

import hashlib
import math

import torch

ACCOUNTANTS = ("prv", "rdp")


def default_delta(n_train: int) -> float:
    """Well below 1/N: the usual 1e-5, or 1/(10 N) for datasets larger than 10^4 rows."""
    return min(1e-5, 1.0 / (10 * n_train))


def planned_steps(n_train: int, logical_batch_size: int, num_train_epochs: float, max_steps: int) -> int:
    """Optimizer steps the run will take: --max_steps if set, else epochs / q."""
    if max_steps > 0:
        return max_steps
    return max(1, int(round(num_train_epochs * n_train / logical_batch_size)))


def make_accountant(kind: str):
    from opacus.accountants import create_accountant

    return create_accountant(kind)


def epsilon_after(steps: int, noise_multiplier: float, sample_rate: float, delta: float, accountant: str) -> float:
    """Epsilon the accountant reports after `steps` identical subsampled-Gaussian steps."""
    if steps == 0:
        return 0.0
    acc = make_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return acc.get_epsilon(delta)


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest noise multiplier (to Opacus's search tolerance) whose epsilon after `steps` is <= target."""
    from opacus.accountants.utils import get_noise_multiplier

    return get_noise_multiplier(
        target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
    )


def step_budget(epsilon: float, delta: float, noise_multiplier: float, sample_rate: float, accountant: str, upper: int) -> int:
    """Largest number of steps <= upper whose epsilon stays <= target (epsilon grows with steps)."""
    if epsilon_after(upper, noise_multiplier, sample_rate, delta, accountant) <= epsilon:
        return upper
    low, high = 0, upper  # eps(low) <= target < eps(high)
    while high - low > 1:
        mid = (low + high) // 2
        if epsilon_after(mid, noise_multiplier, sample_rate, delta, accountant) <= epsilon:
            low = mid
        else:
            high = mid
    return low


class PoissonSampler:
    """Poisson sampling of row indices, one independent draw per step.

    The draw for step t comes from a generator seeded by (seed, t), so a resumed run draws exactly
    the batches an uninterrupted run would, and draws are independent across steps. With
    `secure_mode` the masks come from the OS's cryptographic randomness instead (not reproducible).
    """

    def __init__(self, num_rows: int, sample_rate: float, seed: int, secure_mode: bool = False):
        self.num_rows, self.sample_rate, self.seed, self.secure_mode = num_rows, sample_rate, seed, secure_mode

    def draw(self, step: int) -> list[int]:
        if self.secure_mode:
            import secrets

            uniforms = torch.tensor([secrets.randbits(53) / 2**53 for _ in range(self.num_rows)], dtype=torch.float64)
        else:
            step_seed = int.from_bytes(hashlib.sha256(f"poisson:{self.seed}:{step}".encode()).digest()[:8], "little")
            uniforms = torch.rand(self.num_rows, generator=torch.Generator().manual_seed(step_seed), dtype=torch.float64)
        return torch.nonzero(uniforms < self.sample_rate).flatten().tolist()


def physical_batches(indices: list[int], lengths: list[int], per_device_batch_size: int) -> list[list[int]]:
    """Split one logical batch into physical batches of similar length.

    Sorting by length only changes how the already-drawn rows are grouped for memory and padding,
    never which rows were drawn.
    """
    ordered = sorted(indices, key=lambda i: lengths[i])
    return [ordered[i:i + per_device_batch_size] for i in range(0, len(ordered), per_device_batch_size)]


def make_dp_optimizer(optimizer, noise_multiplier: float, max_grad_norm: float, expected_batch_size: int, generator=None, secure_mode=False):
    """Opacus's DP optimizer over the LoRA-only optimizer.

    loss_reduction="mean" makes it divide the noisy clipped sum by the expected batch size (not the
    realised one, which would depend on the private draw).
    """
    from opacus.optimizers import DPOptimizer

    return DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
        secure_mode=secure_mode,
    )


def attach_per_sample_hooks(model, grad_sample_mode: str = "hooks"):
    """Per-sample gradient hooks on the trainable (LoRA) layers, without wrapping the model.

    loss_reduction="sum": training backpropagates the *sum* of per-example losses, so each
    grad_sample row is exactly that example's gradient.
    """
    from opacus.grad_sample import prepare_module

    return prepare_module(model, grad_sample_mode=grad_sample_mode, wrap_model=False, batch_first=True, loss_reduction="sum")


def prepare_empty_step(params, dp: bool) -> None:
    """Make an empty Poisson draw a real step: noise only under DP, a zero gradient without.

    An empty draw is still a step the accountant counts; the model cannot run on 0 rows and Opacus
    refuses a step with no backward, so the zero-row per-sample gradient is made by hand.
    """
    for p in params:
        if dp:
            p.grad_sample = p.new_zeros((0, *p.shape))
        else:
            p.grad = torch.zeros_like(p)


def zero_nonfinite_grad_samples(params) -> int:
    """Zero the per-sample gradients of examples whose gradient is NaN/inf; returns how many examples.

    Such an example then contributes nothing to the step (a per-example change, so clipping and the
    sensitivity bound still hold).
    """
    grad_samples = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
    if not grad_samples or grad_samples[0].shape[0] == 0:
        return 0
    bad = torch.zeros(grad_samples[0].shape[0], dtype=torch.bool, device=grad_samples[0].device)
    for g in grad_samples:
        bad |= ~torch.isfinite(g.reshape(g.shape[0], -1)).all(dim=1)
    if bad.any():
        for g in grad_samples:
            g[bad] = 0
    return int(bad.sum())


def check_delta(delta: float, n_train: int) -> str | None:
    if not 0 < delta < 1.0 / n_train:
        return f"--delta {delta:g} must be in (0, 1/N) = (0, {1.0 / n_train:.3g}) for N={n_train} training rows"
    return None


def is_finite_number(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
