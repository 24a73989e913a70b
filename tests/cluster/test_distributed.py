"""The sharded data-parallel operator (cluster/distributed.py) against the
single-process Hessian, in float64, with real gloo process groups on loopback.

One spawn of 3 processes serves both group sizes: the world group (3 workers) and
a sub-group of ranks 0 and 1 (2 workers, through the ``group`` argument). Each
worker holds its slice of the 120 probe examples and of every vector; the
estimators run unchanged on it with the same seeds as the reference.
"""

from __future__ import annotations

import os
import socket
import time
from itertools import pairwise

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cluster.data import digits_tensors
from cluster.distributed import ShardedEvaluator, ShardedOperator, shard_bounds
from probe.eigen import eigenvalues
from probe.hessian import HessianOperator
from probe.models import digits_mlp
from probe.slq import spectral_density
from probe.trace import trace

NUM_EXAMPLES = 120
BATCH_SIZE = 25  # shards of 40 and 60 examples give unequal batches: the weighting is exercised
HIDDEN = 8
GROUP_SIZES = (3, 2)
MATMAT_RTOL = 1e-12
ESTIMATE_RTOL = 1e-10
TIMEOUT_S = 240


# --- shard_bounds -------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, 2, 7, 10, 1000, 1001])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shard_bounds_cover_the_range_in_near_equal_contiguous_pieces(dim, world_size):
    bounds = shard_bounds(dim, world_size)
    assert len(bounds) == world_size + 1
    assert bounds[0] == 0 and bounds[-1] == dim
    sizes = [b - a for a, b in pairwise(bounds)]
    assert all(s >= 0 for s in sizes)
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger shards come first
    assert sum(sizes) == dim


def test_shard_bounds_examples():
    assert shard_bounds(10, 3) == [0, 4, 7, 10]
    assert shard_bounds(2, 3) == [0, 1, 2, 2]


@pytest.mark.parametrize("world_size", [0, -1])
def test_shard_bounds_rejects_empty_world(world_size):
    with pytest.raises(ValueError, match=f"world_size must be at least 1, got {world_size}"):
        shard_bounds(10, world_size)


def test_sharded_operator_needs_an_initialized_process_group():
    # every multi-worker test runs its group in other processes; a group left in this one would be a leak
    assert not dist.is_initialized(), "a test left torch.distributed initialized in the pytest process"
    model = digits_mlp(hidden=HIDDEN).to(torch.float64)
    x, y = torch.randn(10, 64, dtype=torch.float64), torch.arange(10)
    local = HessianOperator(model, F.cross_entropy, [(x, y)])
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized; call init_process_group first"):
        ShardedOperator(local)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "ShardedEvaluator needs total_examples, the example count over every worker"),
        (
            {"weighting": "tokens", "total_examples": 10},
            "ShardedEvaluator with weighting='tokens' needs total_tokens, the token count over every worker",
        ),
    ],
)
def test_sharded_evaluator_needs_the_global_count_of_its_weighting(kwargs, message):
    model = digits_mlp(hidden=HIDDEN).to(torch.float64)
    x, y = torch.randn(10, 64, dtype=torch.float64), torch.arange(10)
    with pytest.raises(ValueError, match=message):
        ShardedEvaluator(model, F.cross_entropy, [(x, y)], **kwargs)


# --- parity with one process --------------------------------------------------------


def make_model() -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return digits_mlp(hidden=HIDDEN).to(torch.float64)


def probe_data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_tensors(split="train")
    return x[:NUM_EXAMPLES].to(torch.float64), y[:NUM_EXAMPLES]


def batches_of(x: torch.Tensor, y: torch.Tensor) -> list:
    return [(x[i : i + BATCH_SIZE], y[i : i + BATCH_SIZE]) for i in range(0, len(y), BATCH_SIZE)]


def block(dim: int) -> torch.Tensor:
    return torch.randn(dim, 4, generator=torch.Generator().manual_seed(99), dtype=torch.float64)  # (dim, 4)


def estimates(op) -> dict:
    """Every estimator on ``op`` with fixed seeds; only small tensors and numbers."""
    V = block(op.dim)
    eig = eigenvalues(op, 3, which="largest", generator=torch.Generator().manual_seed(1))
    low = eigenvalues(op, 2, which="smallest", generator=torch.Generator().manual_seed(2))
    hpp = trace(op, method="hutch++", num_matvecs=30, generator=torch.Generator().manual_seed(3))
    hut = trace(op, method="hutchinson", num_matvecs=12, generator=torch.Generator().manual_seed(4))
    slq = spectral_density(op, runs=3, steps=20, grid_points=200, generator=torch.Generator().manual_seed(5))
    return {
        "matmat": op.matmat(V[op.local_slice].contiguous()),  # this worker's rows of H @ V
        "local_slice": (op.local_slice.start, op.local_slice.stop),
        "eigenvalues": eig.eigenvalues,
        "smallest": low.eigenvalues,
        "eig_steps": eig.num_steps,
        "hutchpp": torch.tensor([hpp.trace, hpp.trace_stderr]),
        "hutchinson": torch.tensor([hut.trace, hut.trace_stderr]),
        "ritz_values": torch.cat(slq.ritz_values),
        "ritz_weights": torch.cat(slq.ritz_weights),
        "density": slq.density,
        "num_matvecs": op.num_matvecs,
    }


def _worker(rank: int, world_size: int, init_method: str, out_dir: str, x: torch.Tensor, y: torch.Tensor) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        pair = dist.new_group([0, 1])  # every rank takes part in creating a group
        for size, group in ((world_size, None), (2, pair)):
            if rank >= size:
                continue
            mine = torch.arange(NUM_EXAMPLES).tensor_split(size)[rank]
            local = HessianOperator(
                make_model(), F.cross_entropy, batches_of(x[mine], y[mine]), total_examples=NUM_EXAMPLES
            )
            op = ShardedOperator(local, group)
            assert op.world_size == size and op.rank == rank and op.dim == local.dim
            result = estimates(op)
            result["local_dim"] = op.local_dim
            result["num_collectives"] = op.num_collectives
            torch.save(result, os.path.join(out_dir, f"size{size}-rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The results are on disk; skip the interpreter's teardown, which takes seconds per torch process here.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory) -> dict[int, list[dict]]:
    """``{group_size: [rank 0's results, rank 1's, ...]}`` from one spawn of 3 gloo workers."""
    out = tmp_path_factory.mktemp("sharded")
    world_size = max(GROUP_SIZES)
    env = {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # The data travel with the arguments: the workers need not import scikit-learn.
        args = (world_size, f"tcp://127.0.0.1:{_free_port()}", str(out), *probe_data())
        ctx = mp.start_processes(_worker, args=args, nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"sharded workers did not finish within {TIMEOUT_S} s")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {size: [torch.load(out / f"size{size}-rank{r}.pt") for r in range(size)] for size in GROUP_SIZES}


@pytest.fixture(scope="module")
def reference() -> dict:
    torch.set_num_threads(1)
    x, y = probe_data()
    return estimates(HessianOperator(make_model(), F.cross_entropy, batches_of(x, y)))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("size", GROUP_SIZES)
def test_shards_tile_the_vector(sharded_results, reference, size):
    ranks = sharded_results[size]
    dim = reference["matmat"].shape[0]
    bounds = shard_bounds(dim, size)
    assert [r["local_slice"] for r in ranks] == list(pairwise(bounds))
    assert [r["local_dim"] for r in ranks] == [b - a for a, b in pairwise(bounds)]


@pytest.mark.parametrize("size", GROUP_SIZES)
def test_matmat_equals_the_single_process_hessian(sharded_results, reference, size):
    full = torch.cat([r["matmat"] for r in sharded_results[size]])  # (dim, 4), shards in rank order
    assert full.dtype == torch.float64
    assert rel(full, reference["matmat"]) <= MATMAT_RTOL


@pytest.mark.parametrize(
    "key", ["eigenvalues", "smallest", "hutchpp", "hutchinson", "ritz_values", "ritz_weights", "density"]
)
@pytest.mark.parametrize("size", GROUP_SIZES)
def test_estimators_agree_with_one_process_for_the_same_seed(sharded_results, reference, size, key):
    for rank, result in enumerate(sharded_results[size]):
        got, want = result[key], reference[key]
        assert got.shape == want.shape, (rank, key)
        assert rel(got, want) <= ESTIMATE_RTOL, f"rank {rank}, {key}: relative difference {rel(got, want):.3g}"


@pytest.mark.parametrize("size", GROUP_SIZES)
def test_every_rank_takes_the_same_steps_and_products(sharded_results, reference, size):
    for result in sharded_results[size]:
        assert result["eig_steps"] == reference["eig_steps"]
        assert result["num_matvecs"] == reference["num_matvecs"]
        assert result["num_collectives"] > 0
