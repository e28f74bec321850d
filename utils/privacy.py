"""Differential-privacy pieces: Poisson sampling, noise calibration, the budget, the DP optimizer.

Privacy unit: one flashcard (one training row). Each step includes every training row independently
with probability q = logical_batch_size / N (Poisson sampling), clips each row's gradient to
max_grad_norm, adds Gaussian noise N(0, (sigma * C)^2) once to the sum and divides by the *expected*
batch size. sigma is calibrated so that the accountant's epsilon after exactly the planned number of
steps at this q is at most the target; the accountant is stepped once per optimizer step, empty draws
included.

Secure mode takes every random bit of the sampling and of the noise from the operating system's
CSPRNG (os.urandom) instead of seeded PyTorch generators, whose state follows from the seed in
args.json (and whose CPU generator only uses 32 bits of any seed).
"""

import functools
import hashlib
import math
import os

import torch
from utils.cli import UserError

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


# RDP orders: Opacus's defaults stop at 63, where the optimum sits for small epsilon or few steps
# (Opacus then warns "Optimal order is the largest alpha"); these reach far enough for sigma up to ~1e3.
RDP_ORDERS = (
    [1 + x / 10.0 for x in range(1, 100)]
    + list(range(12, 64))
    + list(range(64, 256, 8))
    + [256, 320, 384, 448, 512, 768, 1024, 1536, 2048, 4096, 8192, 16384]
)
MAX_NOISE_MULTIPLIER = 1e4  # the largest sigma tried when calibrating; its epsilon is the smallest reachable


class PrivacyBudgetError(UserError):
    """The requested (epsilon, delta) cannot be met: a one-line, user-facing message."""


def accountant_epsilon(accountant, delta: float) -> float:
    """accountant.get_epsilon(delta), with the wide RDP orders for the RDP accountant."""
    import warnings

    with warnings.catch_warnings():
        # Opacus's PRV accountant sizes its domain with an RDP bound at its default orders, which warns at
        # small epsilon; only that size, not the PRV epsilon, depends on it. For our own RDP value, past
        # order 16384 only runs of a step or two at tiny q still gain, and the value stays an upper bound.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        if getattr(accountant, "mechanism", lambda: "")() == "rdp":
            return accountant.get_epsilon(delta, alphas=RDP_ORDERS)
        return accountant.get_epsilon(delta)


@functools.lru_cache(maxsize=4096)  # a pure function of its numbers; calibration and the guard ask again
def epsilon_after(
    steps: int, noise_multiplier: float, sample_rate: float, delta: float, accountant: str
) -> float:
    """Epsilon the accountant reports after `steps` identical subsampled-Gaussian steps."""
    if steps == 0:
        return 0.0
    acc = make_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return accountant_epsilon(acc, delta)


class LoggedEpsilon:
    """Epsilon to log after every step, at one accountant evaluation per `every` steps.

    One PRV evaluation costs 0.2-1 s, as much as a whole GPU step. Epsilon only grows with steps, so
    between evaluations the value given is epsilon at the next evaluation step (or at the last step
    the run may take): an upper bound on what has been spent, never an understatement. It is exact at
    every `every`-th step and at the last step; privacy_report.json is always exact.
    """

    def __init__(self, accountant, kind: str, delta: float, every: int, last_step: int):
        self.accountant, self.kind, self.delta, self.every, self.last_step = (
            accountant,
            kind,
            delta,
            max(1, every),
            last_step,
        )
        self._until, self._value = 0, float("nan")

    def after(self, steps_taken: int) -> float:
        history = self.accountant.history
        if self.every == 1 or steps_taken >= self.last_step or len(history) != 1:
            return accountant_epsilon(self.accountant, self.delta)
        if steps_taken > self._until:
            self._until = min(-(-steps_taken // self.every) * self.every, self.last_step)
            noise_multiplier, sample_rate, _ = history[
                0
            ]  # one (sigma, q) for the whole run: resume refuses others
            self._value = epsilon_after(self._until, noise_multiplier, sample_rate, self.delta, self.kind)
        return self._value


CALIBRATION_TRIALS = 64  # accountant evaluations at most after the first feasible sigma; 5-7 are needed


def calibrate_noise(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str, tolerance: float = 0.01
) -> float:
    """A noise multiplier whose epsilon after `steps` lies in [target - tolerance, target].

    Every trial is one accountant evaluation (0.2-1 s for PRV), so the search interpolates between the
    two ends of a bracket in (log sigma, log epsilon), where epsilon falls almost as a straight line,
    aiming at target - tolerance / 2: 5-7 evaluations where bisection needed 11-20. The upper end
    is always an evaluated sigma whose epsilon meets the target, and it is what is returned; each trial
    stays inside the inner 90% of the bracket, so the bracket shrinks even where the line is a poor fit.

    Raises PrivacyBudgetError, naming the smallest epsilon reachable, when no sigma up to
    MAX_NOISE_MULTIPLIER meets the target.
    """

    def eps(sigma):
        return epsilon_after(steps, sigma, sample_rate, delta, accountant)

    high = 20.0
    while eps(high) > epsilon:
        if high >= MAX_NOISE_MULTIPLIER:
            floor = eps(MAX_NOISE_MULTIPLIER)
            raise PrivacyBudgetError(
                f"--epsilon {epsilon:g} is below the smallest epsilon the {accountant} accountant certifies for "
                f"q = {sample_rate:.4g} over {steps} steps at delta {delta:.3g} ({floor:.4g}, at any noise); "
                f"raise --epsilon to at least {math.ceil(floor * 1000) / 1000:g}"
                + (
                    " or try --accountant rdp"
                    if accountant == "prv" and eps_rdp_floor(steps, sample_rate, delta) < floor
                    else ""
                )
            )
        high = min(2 * high, MAX_NOISE_MULTIPLIER)
    # a target within the tolerance of 0 is met by any feasible sigma: the loop ends at once
    eps_high, aim = eps(high), math.log(max(epsilon - tolerance / 2, epsilon / 2))
    low, eps_low = None, None  # the largest sigma tried whose epsilon misses the target
    slope = -1.0  # of log epsilon in log sigma: about -1 at large sigma, steeper below
    for _ in range(CALIBRATION_TRIALS):
        if epsilon - eps_high <= tolerance or (low is not None and high - low <= 1e-12 * high):
            break
        if low is None:  # only feasible sigmas known: extrapolate, by at most a factor 4 (as 2 bisections)
            trial = high * max(math.exp((aim - math.log(eps_high)) / slope), 1 / 4)
        elif math.isfinite(eps_low) and eps_low > eps_high > 0:
            ends = (math.log(low), math.log(high)), (math.log(eps_low), math.log(eps_high))
            t = min(max((aim - ends[1][0]) / (ends[1][1] - ends[1][0]), 0.05), 0.95)
            trial = math.exp(ends[0][0] + t * (ends[0][1] - ends[0][0]))
        else:  # no usable slope: halve the bracket
            trial = (low + high) / 2
        eps_trial = eps(trial)
        if eps_trial <= epsilon:
            if low is None and 0 < eps_trial and eps_high > 0:
                slope = min(
                    (math.log(eps_trial) - math.log(eps_high)) / (math.log(trial) - math.log(high)), -0.1
                )
            high, eps_high = trial, eps_trial
        else:
            low, eps_low = trial, eps_trial
    return float(high)


def eps_rdp_floor(steps: int, sample_rate: float, delta: float) -> float:
    import warnings

    # at this sigma the optimum is past any order: the value is still an upper bound
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return epsilon_after(steps, MAX_NOISE_MULTIPLIER, sample_rate, delta, "rdp")


def step_budget(
    epsilon: float, delta: float, noise_multiplier: float, sample_rate: float, accountant: str, upper: int
) -> int:
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
        self.num_rows, self.sample_rate, self.seed, self.secure_mode = (
            num_rows,
            sample_rate,
            seed,
            secure_mode,
        )

    def draw(self, step: int) -> list[int]:
        if self.secure_mode:
            uniforms = csprng_uniforms(self.num_rows)
        else:
            step_seed = int.from_bytes(
                hashlib.sha256(f"poisson:{self.seed}:{step}".encode()).digest()[:8], "little"
            )
            uniforms = torch.rand(
                self.num_rows, generator=torch.Generator().manual_seed(step_seed), dtype=torch.float64
            )
        return torch.nonzero(uniforms < self.sample_rate).flatten().tolist()


def physical_batches(indices: list[int], lengths: list[int], per_device_batch_size: int) -> list[list[int]]:
    """Split one logical batch into physical batches of similar length.

    Sorting by length only changes how the already-drawn rows are grouped for memory and padding,
    never which rows were drawn.
    """
    ordered = sorted(indices, key=lambda i: lengths[i])
    return [ordered[i : i + per_device_batch_size] for i in range(0, len(ordered), per_device_batch_size)]


def csprng_uniforms(n: int, device=None) -> torch.Tensor:
    """n float64 uniforms in (0, 1) from the OS CSPRNG, 53 random bits each."""
    words = (
        torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64)
        if n
        else torch.empty(0, dtype=torch.int64)
    )
    return ((words.to(device) & (2**53 - 1)).double() + 0.5) * 2.0**-53


def secure_gaussian(shape, std: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """N(0, std^2) noise of `shape` in `dtype` whose every random bit comes from os.urandom.

    Box-Muller in float64 on 53-bit uniforms, then Opacus's guard against floating-point attacks
    (arXiv 2107.10138): the sum of four N(0, std^2) draws divided by 2, which has the same law but
    hides the bit pattern of any single draw. Only then is it rounded to `dtype`.
    """
    n = math.prod(shape)
    pairs = 2 * n  # 4n normals from 2n pairs of uniforms
    u1, u2 = csprng_uniforms(2 * pairs, device).view(2, pairs)
    radius, angle = torch.sqrt(-2.0 * torch.log(u1)), 2.0 * math.pi * u2
    normals = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])
    return (normals.view(4, n).sum(0) * (std / 2)).view(tuple(shape)).to(dtype)


def _secure_dp_optimizer_class():
    from opacus.optimizers import DPOptimizer

    class SecureNoiseDPOptimizer(DPOptimizer):
        """DPOptimizer whose Gaussian noise comes from secure_gaussian (the OS CSPRNG).

        Opacus's own secure mode draws from `generator` (torchcsprng in its PrivacyEngine; with no
        generator, torch's global RNG, which set_seed makes predictable from the public seed).
        """

        def add_noise(self):
            sigma, self.noise_multiplier = self.noise_multiplier, 0.0
            try:
                super().add_noise()  # p.grad = clipped sum, with Opacus's bookkeeping; zero noise
            finally:
                self.noise_multiplier = sigma
            std = sigma * self.max_grad_norm
            if std > 0:
                for p in self.params:
                    p.grad += secure_gaussian(p.grad.shape, std, p.grad.device, p.grad.dtype)

    return SecureNoiseDPOptimizer


def make_dp_optimizer(
    optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator=None,
    secure_mode=False,
    world_size: int = 1,
):
    """Opacus's DP optimizer over the LoRA-only optimizer.

    loss_reduction="mean" makes it divide the noisy clipped sum by the expected batch size (not the
    realised one, which would depend on the private draw). The noise has the parameters' dtype (fp32:
    build_model keeps LoRA weights in fp32 over any base). secure_mode: noise from secure_gaussian;
    a seeded `generator` is then refused.
    With world_size W > 1 it is Opacus's DistributedDPOptimizer: per rank (local clipped sum [+ noise on
    rank 0 only]) / expected, summed over ranks and divided by W; expected = expected_batch_size / W
    makes the total (clipped sum + one noise draw) / expected_batch_size, noise std sigma C / expected_batch_size.
    """
    from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

    if secure_mode and generator is not None:
        raise ValueError(
            "secure_mode draws its noise from the OS CSPRNG; a seeded generator would make it predictable"
        )
    optimizer_class = _secure_dp_optimizer_class() if secure_mode else DPOptimizer
    if world_size > 1:  # rank 0's super().add_noise() is then optimizer_class's (method resolution order)
        optimizer_class = (
            type("SecureNoiseDistributedDPOptimizer", (DistributedDPOptimizer, optimizer_class), {})
            if secure_mode
            else DistributedDPOptimizer
        )
    return optimizer_class(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size / world_size if world_size > 1 else expected_batch_size,
        loss_reduction="mean",
        generator=generator,
        secure_mode=secure_mode,
    )


# Per-sample gradient modes that work on the unwrapped model and give exactly the brute-force
# per-example gradients (tests/test_loss.py). Opacus's "ghost" clipping needs its own double-backward
# loss and was 1.67x a non-private step in an earlier measurement, so it is not offered.
GRAD_SAMPLE_MODES = ("ew", "hooks", "functorch")
DEFAULT_GRAD_SAMPLE_MODE = "ew"  # the fastest on every measured shape: README, "Benchmarks"


def attach_per_sample_hooks(model, grad_sample_mode: str = "hooks"):
    """Per-sample gradients of the trainable (LoRA) weights in p.grad_sample, without wrapping the model.

    "hooks"/"functorch": Opacus's hooks on the LoRA layers. "ew": torch's ExpandedWeights around the
    decoder body (ExpandedWeightsBody). loss_reduction="sum": training backpropagates the *sum* of
    per-example losses, so each grad_sample row is exactly that example's gradient. The returned
    object's remove_hooks() undoes it.
    """
    if grad_sample_mode == "ew":
        return ExpandedWeightsBody(model)
    from opacus.grad_sample import prepare_module

    return prepare_module(
        model, grad_sample_mode=grad_sample_mode, wrap_model=False, batch_first=True, loss_reduction="sum"
    )


class ExpandedWeightsBody:
    """Opacus's "ew" mode without its wrapper: while gradients are enabled, the decoder body (which
    holds every trainable weight) runs through torch's call_for_per_sample_grads, whose backward writes
    each trainable weight's per-example gradients to p.grad_sample. utils.loss calls the body and the
    LM head itself, so wrapping the whole model would not reach it; shadowing the body's forward does.
    """

    def __init__(self, model):
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.body = causal_lm.model
        # a trainable weight used outside the body (say a head tied to the embeddings) would miss its share
        body_modules = {id(module) for module in self.body.modules()}
        outside = [
            name
            for name, module in model.named_modules()
            if id(module) not in body_modules
            and any(p.requires_grad for p in module.parameters(recurse=False))
        ]
        if outside:
            raise ValueError(
                'grad_sample_mode="ew" needs every trainable weight used only inside the decoder body; '
                f'{outside[0]} is outside (use "hooks")'
            )
        self._running = False
        self._inner_forward = self.body.forward  # the class's, or one a library already set on the instance
        self._instance_forward = self.body.__dict__.get("forward")
        self.body.forward = self._forward  # an instance attribute shadows the class's forward

    def _forward(self, *args, **kwargs):
        if self._running or not torch.is_grad_enabled():  # the inner call, or evaluation
            return self._inner_forward(*args, **kwargs)
        from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

        first = next(
            x
            for x in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
            if isinstance(x, torch.Tensor)
        )
        self._running = True
        try:
            return call_for_per_sample_grads(self.body, batch_size=first.shape[0], loss_reduction="sum")(
                *args, **kwargs
            )
        finally:
            self._running = False

    def remove_hooks(self) -> None:
        if self._instance_forward is not None:
            self.body.forward = self._instance_forward
        else:
            self.body.__dict__.pop("forward", None)


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


def zero_nonfinite_grad_samples(params, bad_rows: torch.Tensor | None = None) -> int:
    """Zero the per-sample gradients of examples whose gradient is NaN/inf, or that `bad_rows` marks
    (e.g. a non-finite loss); returns how many examples.

    Such an example then contributes nothing to the step (a per-example change, so clipping and the
    sensitivity bound still hold).
    """
    grad_samples = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
    if not grad_samples or grad_samples[0].shape[0] == 0:
        return 0
    bad = torch.zeros(grad_samples[0].shape[0], dtype=torch.bool, device=grad_samples[0].device)
    if bad_rows is not None:
        bad |= bad_rows.to(bad.device)
    for g in grad_samples:
        bad |= ~torch.isfinite(g.reshape(g.shape[0], -1)).all(dim=1)
    if bad.any():
        for g in grad_samples:
            g[bad] = 0
    return int(bad.sum())


def check_delta(delta: float, n_train: int, units: str = "rows") -> str | None:
    if not 0 < delta < 1.0 / n_train:
        return f"--delta {delta:g} must be in (0, 1/N) = (0, {1.0 / n_train:.3g}) for N={n_train} training {units}"
    return None


# -----------------------------------------------------------------------------
# user-level DP: one user (every row sharing --user_column) is the privacy unit


def choose_user_rows(
    user_rows: list[int], max_examples: int, seed: int, step: int, user: int, secure_mode: bool = False
) -> list[int]:
    """At most `max_examples` of a sampled user's rows, uniformly at random without replacement.

    Seeded: a generator keyed by (seed, step, user), so a resume chooses the same rows and the choice
    does not depend on which other users were drawn or on which rank processes the user. Secure: the
    OS CSPRNG. The choice depends only on this user's own rows (the bound on its contribution).
    """
    if len(user_rows) <= max_examples:
        return list(user_rows)
    if secure_mode:
        uniforms = csprng_uniforms(len(user_rows))
    else:
        key = int.from_bytes(
            hashlib.sha256(f"user-rows:{seed}:{step}:{user}".encode()).digest()[:8], "little"
        )
        uniforms = torch.rand(
            len(user_rows), generator=torch.Generator().manual_seed(key), dtype=torch.float64
        )
    chosen = torch.argsort(uniforms)[:max_examples].tolist()
    return [user_rows[i] for i in sorted(chosen)]


def user_physical_batches(
    chosen: list[list[int]], lengths: list[int], per_device_batch_size: int
) -> list[tuple[list[int], list[int]]]:
    """Pack whole users into physical batches of at most `per_device_batch_size` rows.

    `chosen` holds each sampled user's chosen rows (each list no longer than the batch size). Returns
    (rows, user_of_row) per batch, user_of_row numbering the batch's users 0, 1, ... A user's rows are
    never split over two batches: its per-user gradient must be summed before clipping. Users are
    ordered by their longest row (less padding); this only groups the drawn rows, never changes them.
    """
    order = sorted(range(len(chosen)), key=lambda u: (max(lengths[r] for r in chosen[u]), u))
    batches, rows, owners = [], [], []
    for u in order:
        if rows and len(rows) + len(chosen[u]) > per_device_batch_size:
            batches.append((rows, owners))
            rows, owners = [], []
        local = owners[-1] + 1 if owners else 0
        rows = rows + chosen[u]
        owners = owners + [local] * len(chosen[u])
    if rows:
        batches.append((rows, owners))
    return batches


def sum_grad_samples_by_user(params, user_of_row: torch.Tensor, n_users: int) -> None:
    """Replace each p.grad_sample [rows, ...] by its per-user sum [n_users, ...] (index_add over users).

    Training backpropagates sum_rows loss_row / k_u, so each user's sum is the mean of its chosen rows'
    gradients; the DP optimizer then clips that one vector per user to C (user-level sensitivity C).
    """
    for p in params:
        g = getattr(p, "grad_sample", None)
        if g is None:
            continue
        if isinstance(g, list):  # Opacus hooks accumulate a list across backward calls
            g = torch.cat(g, dim=0)
        summed = g.new_zeros((n_users, *g.shape[1:]))
        summed.index_add_(0, user_of_row.to(g.device), g)
        p.grad_sample = summed


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(epsilon, delta) for datasets differing in k rows, from an (epsilon, delta)-DP mechanism.

    Chaining k neighbouring datasets x_0 ~ x_1 ~ ... ~ x_k (the standard group-privacy argument; Dwork
    and Roth 2014, "The Algorithmic Foundations of Differential Privacy", Section 2.3, states it for
    pure DP and gives this (epsilon, delta) form after it):
    P[M(x_0) in S] <= e^{k eps} P[M(x_k) in S] + delta * sum_{i<k} e^{i eps}, and
    sum_{i<k} e^{i eps} <= k e^{(k-1) eps}, giving (k eps, k e^{(k-1) eps} delta).
    """
    return k * epsilon, k * math.exp((k - 1) * epsilon) * delta
