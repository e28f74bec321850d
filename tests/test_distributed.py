"""Multi-process DP training (utils/distributed.py and train_dp_lora.py under `accelerate launch`).

Three layers, cheapest first: the global draw and its split (no processes); the collectives on 2
gloo processes spawned here (noise added once, scaling, broadcasts, secure draw); and real launches
of train_dp_lora.py on 2 CPU processes the way users launch them, compared with the single-process run.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FP32_EPS, assert_close_scaled
from utils import distributed, privacy
from utils.privacy import PoissonSampler

REPO = Path(__file__).resolve().parent.parent
RUN = [
    "--dataset",
    "bundled",
    "--logical_batch_size",
    "16",
    "--per_device_train_batch_size",
    "8",
    "--eval_steps",
    "0",
    "--report_to",
    "none",
    "--epsilon",
    "3",
    "--lora_dropout",
    "0",
    "--max_steps",
    "4",
    "--save_steps",
    "2",
]

# -- the draw and its split ------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_rank_shares_partition_every_draw(world_size):
    lengths = [(7 * i) % 23 for i in range(200)]
    sampler = PoissonSampler(200, 0.2, seed=3)
    for step in range(20):
        drawn = sampler.draw(step)
        shares = [distributed.split_draw(drawn, lengths, r, world_size) for r in range(world_size)]
        assert sorted(i for share in shares for i in share) == sorted(
            drawn
        )  # each drawn row on exactly one rank
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert distributed.split_draw([5, 1, 3], lengths, 0, 1) == [5, 1, 3]  # one process: the draw untouched


@pytest.mark.numerics
def test_global_step_takes_q_n_rows_on_average_and_each_row_with_probability_q_whatever_the_world_size():
    n, q, steps = 300, 0.05, 2000
    sampler = PoissonSampler(n, q, seed=11)
    lengths = list(range(n))
    included = torch.zeros(n)
    sizes, rank_sizes = [], {2: [], 4: []}
    for step in range(steps):
        drawn = sampler.draw(step)
        sizes.append(len(drawn))
        included[drawn] += 1
        for world_size in rank_sizes:
            rank_sizes[world_size].append(
                sum(len(distributed.split_draw(drawn, lengths, r, world_size)) for r in range(world_size))
            )
    # 5 standard errors (false failure 6e-7 for a fresh draw); this seeded draw is exact (sha256-seeded torch CPU
    # generator, the same on every CPU). A sampler off by one row in 15 (q n = 15) misses by 12 standard errors.
    standard_error = (n * q * (1 - q) / steps) ** 0.5
    assert abs(sum(sizes) / steps - q * n) < 5 * standard_error
    assert all(per_rank == sizes for per_rank in rank_sizes.values())  # the global batch does not depend on W
    assert abs(included.mean().item() / steps - q) < 5 * (q * (1 - q) / (steps * n)) ** 0.5


def test_launch_that_set_up_fewer_processes_than_it_started_is_refused(monkeypatch):
    class SingleProcess:
        num_processes = 1

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.needs_cpu_backend() == (not torch.cuda.is_available())
    with pytest.raises(RuntimeError, match="started 2 processes but Accelerate set up 1"):
        distributed.check_launch(SingleProcess())
    monkeypatch.delenv("WORLD_SIZE")
    distributed.check_launch(SingleProcess())
    assert not distributed.needs_cpu_backend()


def test_resume_restores_each_ranks_own_rng_state_when_the_world_size_matches():
    state = {"rng": "rank0", "rng_per_rank": ["rank0", "rank1"]}
    assert distributed.rng_state_for_rank(state, 1, 2) == "rank1"
    assert (
        distributed.rng_state_for_rank(state, 1, 3) == "rank0"
    )  # other W: rank 0's (dropout then differs, privacy not)
    assert distributed.rng_state_for_rank({"rng": "only"}, 0, 1) == "only"


def test_accelerate_bf16_sets_the_base_dtype_and_lora_stays_fp32(tiny_model_dir, tiny_tokenizer):
    import train_dp_lora

    args = train_dp_lora.parse_args(["--model", tiny_model_dir])
    model = train_dp_lora.build_model(args, tiny_tokenizer, torch.device("cpu"), mixed_precision="bf16")
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}


@pytest.mark.parametrize(
    "path, distributed_type, processes, machines",
    [
        ("accelerate_config.yaml", "NO", 1, 1),
        ("configs/accelerate_multi_gpu.yaml", "MULTI_GPU", 4, 1),
        ("configs/accelerate_multi_node.yaml", "MULTI_GPU", 16, 2),
    ],
)
def test_accelerate_configs_load_with_bf16(path, distributed_type, processes, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / path))
    assert (config.distributed_type.value, config.num_processes, config.num_machines) == (
        distributed_type,
        processes,
        machines,
    )
    assert config.mixed_precision == "bf16"
    if machines > 1:
        assert config.main_process_ip and config.main_process_port and config.rdzv_backend == "static"


# -- collectives on 2 spawned gloo processes -----------------------------------------------------------------

SIGMA, CLIP, LOGICAL, NOISE_DIM = 1.3, 0.7, 16, 50_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(rank, world_size, port, out_dir):
    """One rank's side of every collective check; results go to out_dir/rank{rank}.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    found = {}

    def step(dp_optimizer, param, grad_sample):
        param.grad_sample = grad_sample
        dp_optimizer.step()
        grad = param.grad.clone()
        dp_optimizer.zero_grad()
        return grad

    # zero per-sample gradients: rank 0 holds 3 rows, rank 1 an empty share; what remains is the noise
    for secure in (False, True):
        param = torch.nn.Parameter(torch.zeros(NOISE_DIM))
        generator = (
            None if secure else torch.Generator().manual_seed(7)
        )  # same seed on every rank, as in training
        optimizer = privacy.make_dp_optimizer(
            torch.optim.SGD([param], lr=1.0), SIGMA, CLIP, LOGICAL, generator, secure, world_size
        )
        found[f"noise_secure={secure}"] = step(
            optimizer, param, torch.zeros(3 if rank == 0 else 0, NOISE_DIM)
        )
        found[f"class_secure={secure}"] = type(optimizer).__name__

    # no noise: per-example gradients of norm 3 and 0.5 on rank 0, norm 4 on rank 1, clipped to C = 1
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = privacy.make_dp_optimizer(
        torch.optim.SGD([param], lr=1.0), 0.0, 1.0, 4, world_size=world_size
    )
    rows = torch.tensor([[3.0, 0, 0], [0, 0.5, 0]]) if rank == 0 else torch.tensor([[0, 0, 4.0]])
    found["clipped_mean"] = step(optimizer, param, rows)

    sampler = PoissonSampler(500, 0.1, seed=0, secure_mode=True)  # per-process CSPRNG: rank 0's draw must win
    found["secure_draws"] = [distributed.global_draw(sampler, s, "cpu", world_size) for s in range(3)]

    lora = [
        torch.nn.Parameter(torch.full((4, 2), float(rank))),
        torch.nn.Parameter(torch.full((3,), 10.0 + rank)),
    ]
    distributed.broadcast_lora_weights(lora)
    found["broadcast"] = [p.detach().clone() for p in lora]
    found["identical_after_broadcast"] = distributed.replicas_identical(lora)
    with torch.no_grad():
        lora[1][0] += rank
    found["identical_after_rank1_moved"] = distributed.replicas_identical(lora)

    plain = [torch.nn.Parameter(torch.zeros(2))]
    plain[0].grad = torch.tensor([1.0, rank + 1.0])
    distributed.sum_gradients(plain)
    found["non_dp_grad"] = plain[0].grad.clone()

    distributed.check_same_on_all_ranks("plan", {"q": 0.1, "n": 500}, "cpu")
    try:
        distributed.check_same_on_all_ranks("plan", {"q": 0.1, "n": 500 + rank}, "cpu")
        found["mismatch"] = None
    except RuntimeError as error:
        found["mismatch"] = str(error)

    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    try:
        distributed.assert_not_wrapped(ddp)
        found["ddp_refused"] = False
    except RuntimeError:
        found["ddp_refused"] = True
    distributed.assert_not_wrapped(torch.nn.Linear(2, 2))

    torch.manual_seed(100 + rank)
    found["rng_states"] = distributed.gather_rng_states({"torch": torch.get_rng_state()})
    found.update(_fsdp2_ghost_clipping(rank, world_size))
    torch.save(found, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _fsdp2_ghost_clipping(rank, world_size):
    """Opacus's path for a model too big for one GPU: FSDP2 shards + ghost clipping, one step of SGD(lr=1).

    Without noise the update must be the clipped per-example mean over the global batch; with zero
    gradients (x = 0 for the weights) what moves the weights is the noise alone.
    """
    import copy

    from opacus import PrivacyEngine
    from opacus.utils.fsdp_utils import FSDP2Wrapper
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    def one_step(model, x, y, noise_multiplier, max_grad_norm):
        loader = DataLoader(
            TensorDataset(x, y),
            batch_size=len(x) // world_size,
            sampler=DistributedSampler(
                TensorDataset(x, y), num_replicas=world_size, rank=rank, shuffle=False
            ),
        )
        sharded = FSDP2Wrapper(model)
        sharded, optimizer, criterion, loader = PrivacyEngine().make_private(
            module=sharded,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            criterion=torch.nn.CrossEntropyLoss(),
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=False,
            grad_sample_mode="ghost_fsdp",
        )
        for xb, yb in loader:
            loss = criterion(sharded(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return [p.full_tensor().detach() for p in model.parameters()], type(optimizer).__name__

    torch.manual_seed(0)  # the same data and initial weights on both ranks
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    clipped_sum = [torch.zeros_like(p) for p in reference.parameters()]
    for i in range(len(x)):
        grads = torch.autograd.grad(
            torch.nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]),
            list(reference.parameters()),
        )
        factor = min(1.0, 0.5 / (torch.sqrt(sum((g**2).sum() for g in grads)).item() + 1e-6))
        clipped_sum = [s + factor * g for s, g in zip(clipped_sum, grads)]
    after, optimizer_class = one_step(model, x, y, 0.0, 0.5)
    expected = [p.detach() - s / len(x) for p, s in zip(reference.parameters(), clipped_sum)]
    noise_model = torch.nn.Sequential(
        torch.nn.Linear(200, 200)
    )  # FSDP2Wrapper shards each layer, then the root
    with torch.no_grad():
        noise_model[0].weight.zero_()
    noisy, _ = one_step(noise_model, torch.zeros(16, 200), torch.randint(0, 200, (16,)), SIGMA, CLIP)
    return {
        "fsdp_after": after,
        "fsdp_expected": expected,
        "fsdp_moved": max((a - p.detach()).abs().max().item() for a, p in zip(after, reference.parameters())),
        "fsdp_optimizer": optimizer_class,
        "fsdp_noise_weight": noisy[0],
    }


@pytest.fixture(scope="module")
def collectives(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("collectives")
    mp.spawn(_collectives, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.numerics
@pytest.mark.parametrize("secure", [False, True])
def test_noise_of_the_averaged_gradient_has_std_sigma_c_over_logical_batch(collectives, secure):
    rank0, rank1 = (c[f"noise_secure={secure}"] for c in collectives)
    assert torch.equal(rank0, rank1)  # every rank applies the same update
    expected = (
        SIGMA * CLIP / LOGICAL
    )  # not sqrt(2) times more (noise on every rank) or less (noise averaged away)
    # relative s.e. of a std from 5e4 draws: 1 / sqrt(2 n) = 0.32%, so 2% is 6.3 s.e. (and a sqrt(2) error is 41%);
    # the mean within 5 s.e.: false failure < 1e-6 for the OS-random secure noise
    assert rank0.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(rank0.mean().item()) < 5 * expected / NOISE_DIM**0.5
    assert collectives[0][f"class_secure={secure}"] == (
        "SecureNoiseDistributedDPOptimizer" if secure else "DistributedDPOptimizer"
    )


@pytest.mark.numerics
def test_clipped_gradients_are_summed_over_ranks_and_divided_by_the_logical_batch_once(collectives):
    for c in collectives:  # clipped rows (1,0,0), (0,0.5,0), (0,0,1); logical batch 4
        # fp32: Opacus's clip factor C / (norm + 1e-6) shortens the rows of norm 3 and 4 by 3e-7 (2.7 ulps of 0.25),
        # plus a few roundings; dividing by 2 (ranks) or 3 (rows) instead of 4 errs by 4e6 ulps
        assert_close_scaled(
            c["clipped_mean"],
            torch.tensor([0.25, 0.125, 0.25]),
            16,
            eps=FP32_EPS,
            why="fp32 clip-and-sum with Opacus's 1e-6 in the clip factor",
        )


def test_secure_draw_is_rank_zeros_draw_on_every_rank(collectives):
    draws = [c["secure_draws"] for c in collectives]
    assert draws[0] == draws[1] and len({tuple(d) for d in draws[0]}) == 3 and all(draws[0])


def test_ranks_start_from_rank_zeros_lora_weights_and_replica_check_notices_drift(collectives):
    for c in collectives:
        assert torch.equal(c["broadcast"][0], torch.zeros(4, 2)) and torch.equal(
            c["broadcast"][1], torch.full((3,), 10.0)
        )
        assert c["identical_after_broadcast"] is True and c["identical_after_rank1_moved"] is False


def test_non_private_gradients_are_summed_over_ranks(collectives):
    assert all(torch.equal(c["non_dp_grad"], torch.tensor([2.0, 3.0])) for c in collectives)


def test_plan_mismatch_between_ranks_and_a_ddp_wrapped_model_are_refused(collectives):
    assert all(c["mismatch"] and "differs between ranks" in c["mismatch"] for c in collectives)
    assert all(c["ddp_refused"] for c in collectives)
    states = collectives[0]["rng_states"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])


@pytest.mark.numerics
def test_fsdp2_ghost_clipping_runs_on_cpu_with_the_clipped_mean_and_sigma_c_over_batch_noise(collectives):
    for c in collectives:
        assert c["fsdp_optimizer"] == "FSDPOptimizerFastGradientClipping"
        assert c["fsdp_moved"] > 1e-3
        # fp32: the ghost norms (a different formula for each row's norm) and the sharded sums round differently from
        # the per-row loop; each weight after SGD(lr=1) is w - update, so the budget is ulps of max|w| (~0.4).
        # Observed 0.63 ulps (3e-8); a mean over the per-rank batch (8) instead of the global 16 errs by 3.7e5 ulps.
        assert_close_scaled(
            c["fsdp_after"], c["fsdp_expected"], 64, eps=FP32_EPS, why="fp32 ghost clipping vs per-row loop"
        )
    noise = collectives[0][
        "fsdp_noise_weight"
    ]  # the weights' gradient is zero (x = 0): pure noise, global batch 16
    assert torch.equal(noise, collectives[1]["fsdp_noise_weight"])
    # 4e4 draws: relative s.e. of the std 0.35%, so 3% is 8.5 s.e. (false failure < 1e-15; seeded by
    # torch.manual_seed(0))
    assert noise.std().item() == pytest.approx(SIGMA * CLIP / 16, rel=0.03)


# -- train_dp_lora.py launched on 2 CPU processes ------------------------------------------------------------

# Loaded through PYTHONPATH into every launched process: records each write under AUDIT_ROOT, per rank.
WRITE_AUDIT = """
import atexit, json, os, sys
_root, _log, _rank = os.environ.get("AUDIT_ROOT"), os.environ.get("AUDIT_LOG"), os.environ.get("RANK")
if _root and _log and _rank is not None:
    _writes = []
    def _path(p):
        return os.path.abspath(os.fsdecode(p)) if isinstance(p, (str, bytes, os.PathLike)) else ""
    def _hook(event, args):
        if event == "open":
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                paths = [args[0]]
            else:
                return
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        _writes.extend(f"{event} {p}" for p in map(_path, paths) if p.startswith(_root))
    sys.addaudithook(_hook)
    atexit.register(lambda: open(os.path.join(_log, "rank" + _rank + ".json"), "w").write(json.dumps(_writes)))
"""


def start(command, tmp_path, audit_root=None):
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("WORLD_SIZE", None)
    if audit_root:
        hook_dir = tmp_path / "audit_hook"
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(WRITE_AUDIT)
        env.update(
            PYTHONPATH=str(hook_dir), AUDIT_ROOT=str(Path(audit_root).resolve()), AUDIT_LOG=str(tmp_path)
        )
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process, timeout=400) -> str:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return stdout


def accelerate_launch(*args):
    return [str(Path(sys.executable).parent / "accelerate"), "launch", *args]


def adapters(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def read(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def two_process_run(tiny_model_dir, tmp_path_factory):
    """4 steps on 2 processes (multi-GPU config, CPU here), and the same run in this one process."""
    import train_dp_lora

    root = tmp_path_factory.mktemp("two_process")
    out, single = root / "out", root / "single"
    command = accelerate_launch(
        "--config_file",
        "configs/accelerate_multi_gpu.yaml",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        "train_dp_lora.py",
        "--model",
        tiny_model_dir,
        "--output_dir",
        str(out),
        *RUN,
    )
    launched = start(command, root, audit_root=out)
    single_results = train_dp_lora.main(
        train_dp_lora.parse_args(["--model", tiny_model_dir, "--output_dir", str(single), *RUN])
    )
    return {
        "out": out,
        "single": single,
        "stdout": finish(launched),
        "audit": root,
        "single_results": single_results,
    }


def test_two_processes_spend_exactly_the_single_process_epsilon_and_noise(two_process_run):
    multi, single = (
        read(two_process_run["out"] / "adapter" / "privacy_report.json"),
        read(two_process_run["single"] / "adapter" / "privacy_report.json"),
    )
    for key in (
        "epsilon",
        "epsilon_rdp",
        "noise_multiplier",
        "sample_rate",
        "expected_batch_size",
        "steps_taken",
        "delta",
        "n_train",
        "dp_event",
    ):
        assert multi[key] == single[key], key
    assert multi["world_size"] == 2 and single["world_size"] == 1
    assert (
        multi["draw_split"] == distributed.DRAW_SPLIT
        and "rank r processes ordered[r::world_size]" in multi["draw_split"]
    )


@pytest.mark.numerics
def test_two_processes_train_the_single_process_adapters(two_process_run):
    # same draws, the same noise (rank 0's generator), each row's clipped gradient once: equal up to float rounding.
    # fp32: the clipped sums are added in another order (per rank, then all-reduced), a few ulps per step through 4
    # AdamW steps: budget 64 ulps of each tensor's max (observed 1.6). Two AdamW steps fewer differ by 2.8e6 ulps; a
    # second noise draw, another draw or divisor would move B by O(max|B|) alike.
    multi, single = adapters(two_process_run["out"]), adapters(two_process_run["single"])
    assert multi.keys() == single.keys()
    assert_close_scaled(
        [multi[k] for k in multi], [single[k] for k in multi], 64, eps=FP32_EPS, why="fp32, another sum order"
    )
    assert any(v.abs().sum() > 0 for k, v in multi.items() if "lora_B" in k)


def test_ranks_end_identical_and_together_processed_exactly_each_draw(two_process_run):
    results = read(two_process_run["out"] / "private_run_record" / "results.json")
    # every step checked the count and the row-id digest of what the ranks processed against the draw
    # (distributed.step_totals raises otherwise), so a finished run is the proof; the ranks also agree at the end
    assert results["world_size"] == 2 and results["replicas_identical"] is True and results["steps"] == 4
    assert two_process_run["single_results"]["world_size"] == 1


def test_row_ids_digest_is_order_free_and_tells_other_rows_apart():
    assert distributed.row_ids_digest([3, 1, 2]) == distributed.row_ids_digest([1, 2, 3])
    assert distributed.row_ids_digest([1, 2]) + distributed.row_ids_digest([3]) == distributed.row_ids_digest(
        [1, 2, 3]
    )
    assert distributed.row_ids_digest([1, 2, 3]) != distributed.row_ids_digest(
        [1, 2, 2]
    )  # a row processed twice
    assert distributed.row_ids_digest([1, 2, 3]) != distributed.row_ids_digest(
        [1, 2, 4]
    )  # another row instead


def test_only_rank_zero_writes_files_and_prints(two_process_run):
    audit = two_process_run["audit"]
    rank0, rank1 = read(audit / "rank0.json"), read(audit / "rank1.json")
    assert rank1 == []
    assert any(w.endswith("privacy_report.json") for w in rank0) and any("checkpoints" in w for w in rank0)
    stdout = two_process_run["stdout"]
    assert stdout.count("***** Running DP LoRA training *****") == 1 and stdout.count("Done: 4 steps") == 1
    state = torch.load(
        two_process_run["out"] / "private_run_record" / "checkpoints" / "step_000002" / "training_state.pt",
        weights_only=False,
    )
    assert len(state["rng_per_rank"]) == 2  # each rank's dropout RNG, for an exact resume


@pytest.mark.numerics
def test_two_process_resume_reaches_the_uninterrupted_adapters_and_epsilon(
    two_process_run, tiny_model_dir, tmp_path
):
    resumed = tmp_path / "resumed"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "train_dp_lora.py",
        "--model",
        tiny_model_dir,
        "--output_dir",
        str(resumed),
        *RUN,
        "--resume_from_checkpoint",
        str(two_process_run["out"] / "private_run_record" / "checkpoints" / "step_000002"),
    ]
    finish(start(command, tmp_path))
    full, cont = (
        read(two_process_run["out"] / "adapter" / "privacy_report.json"),
        read(resumed / "adapter" / "privacy_report.json"),
    )
    # the same accountant on the same history: equal up to fp64 roundings (rel 1e-9); one step more is +3.6%
    assert cont["steps_taken"] == full["steps_taken"] == 4 and cont["epsilon"] == pytest.approx(
        full["epsilon"], rel=1e-9
    )
    # bitwise (observed): the same 2 processes, thread count, shapes, draws and noise replay the same fp32 ops
    a, b = adapters(two_process_run["out"]), adapters(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read(resumed / "private_run_record" / "results.json")["replicas_identical"] is True


@pytest.mark.slow
@pytest.mark.numerics
def test_two_machines_on_localhost_train_like_one_process(two_process_run, tiny_model_dir, tmp_path):
    """configs/accelerate_multi_node.yaml with 2 'machines' x 1 process, both on this host."""
    out, port = tmp_path / "out", free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    machines = [
        subprocess.Popen(
            accelerate_launch(
                "--config_file",
                "configs/accelerate_multi_node.yaml",
                "--num_processes",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                "--mixed_precision",
                "no",
                "train_dp_lora.py",
                "--model",
                tiny_model_dir,
                "--output_dir",
                str(out),
                *RUN,
            ),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [m.communicate(timeout=600)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert (
        read(out / "adapter" / "privacy_report.json")["epsilon"]
        == read(two_process_run["single"] / "adapter" / "privacy_report.json")["epsilon"]
    )
    multi, single = adapters(out), adapters(two_process_run["single"])
    # fp32, another sum order: the budget of test_two_processes_train_the_single_process_adapters
    assert_close_scaled(
        [multi[k] for k in multi], [single[k] for k in multi], 64, eps=FP32_EPS, why="fp32, another sum order"
    )
