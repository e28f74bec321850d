"""Data-parallel DP training across processes (`accelerate launch`, `torchrun`) with the single-process guarantee.

Contract (W processes, world_size = W; W = 1 is the plain single-process run)
- Sampling is global: every rank takes the same Poisson draw for step t (PoissonSampler.draw(t), seeded
  by (seed, t); with --secure_mode rank 0 draws from the OS's CSPRNG and broadcasts it). Each row is
  drawn with probability q = logical_batch_size / N overall, not q per rank, so the accountant's q
  does not depend on W.
- Split: the drawn rows are sorted by length and dealt round-robin, rank r taking ordered[r::W]; every
  drawn row is processed by exactly one rank. A rank whose share is empty still takes the step
  (zero-row per-sample gradients) and joins the all-reduce: skipping would deadlock.
- Gradients: each rank clips its own rows' per-sample gradients and sums them. Opacus's
  DistributedDPOptimizer (privacy.make_dp_optimizer with world_size) adds N(0, (sigma C)^2) on rank 0
  only, divides by expected_batch_size =
  logical_batch_size / W, all-reduces (sum) and divides by W, so every rank ends with
  (sum of all clipped gradients + one noise draw) / logical_batch_size: the single-process update.
- Parameters: the trainable (LoRA) parameters are broadcast from rank 0 once, by Opacus's
  DifferentiallyPrivateDistributedDataParallel over those parameters only; the PEFT model itself is
  never wrapped (no torch DDP: its reducer would average a second time and hangs when a rank has no
  backward), and nothing goes through accelerator.prepare (it would re-shard the sampling).

Every function here that communicates is a collective: all ranks must call it, in the same order.
"""

import hashlib
import json
import os

import torch

# What the privacy report says about the split (W is recorded next to it as world_size).
DRAW_SPLIT = (
    "one global Poisson draw per step, identical on every rank (rank 0's under --secure_mode); "
    "rows sorted by length, rank r processes ordered[r::world_size]; noise added once, on rank 0; "
    "clipped sums all-reduced, divided by the expected logical batch"
)


def launched_world_size() -> int:
    """Processes the launcher started (WORLD_SIZE, set by accelerate launch / torchrun); 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def needs_cpu_backend() -> bool:
    """True for a multi-process launch on a machine without an accelerator.

    Accelerate then only sets up the (gloo) process group when told to use the CPU; otherwise every
    process would think it is alone and train the whole run by itself.
    """
    if launched_world_size() <= 1:
        return False
    has_accelerator = (
        torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    )
    return not has_accelerator


def check_launch(accelerator) -> None:
    if accelerator.num_processes != launched_world_size():
        raise RuntimeError(
            f"the launcher started {launched_world_size()} processes but Accelerate set up "
            f"{accelerator.num_processes}; "
            "refusing to train copies of the run side by side (on a machine without GPUs set ACCELERATE_USE_CPU=1)"
        )


def _is_multi(world_size: int) -> bool:
    return world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def global_draw(sampler, step: int, device, world_size: int) -> list[int]:
    """The step's Poisson draw, the same on every rank.

    Seeded draws are identical everywhere by construction; a secure draw is made once, on rank 0,
    and broadcast as a row mask (per-rank CSPRNG draws would differ).
    """
    if not (sampler.secure_mode and _is_multi(world_size)):
        return sampler.draw(step)
    mask = torch.zeros(sampler.num_rows, dtype=torch.uint8, device=device)
    if torch.distributed.get_rank() == 0:
        mask[sampler.draw(step)] = 1
    torch.distributed.broadcast(mask, src=0)
    return torch.nonzero(mask).flatten().tolist()


def split_draw(drawn: list[int], lengths: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's disjoint share of a global draw; the shares of ranks 0..W-1 partition it.

    Length-sorted round-robin dealing gives every rank about the same number of rows and tokens.
    """
    if world_size == 1:
        return list(drawn)
    ordered = sorted(drawn, key=lambda i: lengths[i])
    return ordered[rank::world_size]


def broadcast_lora_weights(params) -> None:
    """Start every rank from rank 0's LoRA weights (in place), the frozen ones too: with --lora_freeze_a, A
    stays at its init, and each rank's init differs unless rank 0's is copied.

    Opacus's DifferentiallyPrivateDistributedDataParallel broadcasts every parameter of the module it
    wraps; wrapping only the trainable ones syncs the LoRA weights without copying the frozen base
    (loaded identically on every rank) and without wrapping the PEFT model, which saving and the
    per-example loss use directly.
    """
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel

    DifferentiallyPrivateDistributedDataParallel(torch.nn.ParameterList(params))


def sum_gradients(params) -> None:
    """Non-private baseline: add up the ranks' gradients (each already divided by the logical batch)."""
    for p in params:
        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)


def sum_across_ranks(values: list[float], device) -> list[float]:
    """Element-wise sum of a few numbers over all ranks."""
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM)
    return totals.tolist()


def row_ids_digest(rows) -> int:
    """Order-free digest of a multiset of row ids: the sum of their 48-bit hashes (a different multiset
    collides with probability about 2^-48)."""
    return sum(int.from_bytes(hashlib.sha256(f"row:{r}".encode()).digest()[:6], "little") for r in rows)


def step_totals(example_losses: torch.Tensor, drawn: list[int], processed: list[int], device) -> float:
    """Mean finite loss over the whole step, checking that the ranks processed exactly the drawn rows.

    Each rank contributes the count and an order-free digest of the row ids it processed; both must
    equal those of the global draw. Otherwise rows were dropped or processed twice (say, ranks with
    different tokenizers or data files) and the step would not be the mechanism the accountant charged.
    """
    finite = example_losses[torch.isfinite(example_losses)]
    digest_hi, digest_lo = divmod(row_ids_digest(processed), 2**24)  # two float64-exact halves
    totals = torch.tensor(
        [finite.sum().item(), len(finite), len(processed), digest_hi, digest_lo],
        dtype=torch.float64,
        device=device,
    )
    torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM)
    loss_sum, n_finite, n_rows, hi, lo = totals.tolist()
    if int(n_rows) != len(drawn) or int(hi) * 2**24 + int(lo) != row_ids_digest(drawn):
        raise RuntimeError(
            f"ranks processed {int(n_rows)} rows, not exactly the {len(drawn)} rows the step drew"
        )
    return loss_sum / n_finite if n_finite else float("nan")


def mean_across_ranks(local_mean: float, local_count: int, device) -> float:
    """Mean over all ranks' items from each rank's mean over its own shard."""
    total, count = sum_across_ranks([local_mean * local_count if local_count else 0.0, local_count], device)
    return total / count if count else float("nan")


def shard(items: list, rank: int, world_size: int) -> list:
    return items if world_size == 1 else items[rank::world_size]


def digest_hex(value) -> str:
    """SHA-256 of a JSON-able value (an identity to compare, never a record of private rows)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _digest(value) -> int:
    return int(digest_hex(value)[:14], 16)  # 56 bits: fits the int64 tensor the ranks all-reduce


def check_same_on_all_ranks(name: str, value, device) -> None:
    """Raise on every rank if `value` differs between ranks (e.g. nodes reading different data files)."""
    digest = _digest(value)
    bounds = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(bounds, op=torch.distributed.ReduceOp.MAX)
    if bounds.tolist() != [digest, -digest]:
        raise RuntimeError(
            f"{name} differs between ranks; every process must see the same data, arguments and plan"
        )


def replicas_identical(params) -> bool:
    """Whether every rank holds exactly rank 0's trainable weights."""
    differs = torch.zeros(1, device=params[0].device)
    for p in params:
        reference = p.detach().clone()
        torch.distributed.broadcast(reference, src=0)
        differs += (reference != p.detach()).sum()
    torch.distributed.all_reduce(differs, op=torch.distributed.ReduceOp.SUM)
    return differs.item() == 0


def assert_not_wrapped(model) -> None:
    """The model must not be torch DDP: its reducer would average the DP gradients a second time."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) or isinstance(
        getattr(model, "module", None), DistributedDataParallel
    ):
        raise RuntimeError(
            "the model is wrapped in torch DDP; DP training must not go through accelerator.prepare(model)"
        )


def gather_rng_states(state: dict) -> list[dict]:
    """Every rank's RNG state (dropout differs per rank), for a checkpoint that resumes exactly."""
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def rng_state_for_rank(training_state: dict, rank: int, world_size: int) -> dict:
    """This rank's saved RNG state if the checkpoint was made with the same number of processes, else rank 0's."""
    per_rank = training_state.get("rng_per_rank")
    return per_rank[rank] if per_rank and len(per_rank) == world_size else training_state["rng"]
