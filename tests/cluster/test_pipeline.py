"""The pipeline Hessian-vector product equals the single-process one (float64, a small
GPT-style model) over 2 and 3 stages and a 2 × 2 stage × data grid, under real
torch.distributed (gloo on loopback) in separate processes."""

from __future__ import annotations

import os
import socket
from itertools import pairwise

import pytest
import torch
import torch.multiprocessing as mp

from cluster.pipeline import PipelineHessian, build_stage, grid_groups, stage_bounds
from probe.eigen import eigenvalues
from probe.gpt import gpt, lm_loss
from probe.hessian import HessianOperator

CONFIG = dict(vocab=16, dim=8, layers=3, heads=2, max_len=6)


def free_port() -> int:
    # not from conftest: the forkserver re-imports this module where a different conftest comes first on sys.path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model():
    torch.manual_seed(0)
    return gpt(**CONFIG).double()


def data(replica: int, replicas: int):
    """12 sequences in batches of 5, 4, 3 (unequal); replica r takes every replicas-th batch."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab"], (12, CONFIG["max_len"] + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    batches = [(x[0:5], y[0:5]), (x[5:9], y[5:9]), (x[9:12], y[9:12])]
    return batches[replica::replicas]


def _worker(rank: int, world: int, stages: int, port: int, out: str, V: torch.Tensor) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        replicas = world // stages
        ranks, pipe, data_group, stage, replica = grid_groups(stages, replicas)
        part, offset, dim = build_stage(model(), stages, stage)
        op = PipelineHessian(
            part,
            lm_loss,
            data(replica, replicas),
            stage_index=stage,
            ranks=ranks,
            offset=offset,
            dim=dim,
            total_examples=12,
            pipe_group=pipe,
            data_group=data_group,
        )
        hv = op.matmat(V[op.local_slice].contiguous())
        top = eigenvalues(op, 2, generator=torch.Generator().manual_seed(3))
        torch.save(
            {
                "slice": (offset, offset + op.local_dim),
                "hv": hv,
                "top": top.eigenvalues,
                "graph_bytes": op.peak_graph_bytes,
                "params": op.local_dim,
                "replica": replica,
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        torch.distributed.destroy_process_group()


def run(tmp_path, stages: int, replicas: int, V: torch.Tensor) -> list[dict]:
    world = stages * replicas
    mp.set_forkserver_preload(["torch", "probe.gpt", "cluster.pipeline", __name__])  # imported once, in the server
    mp.start_processes(
        _worker, args=(world, stages, free_port(), str(tmp_path), V), nprocs=world, join=True, start_method="forkserver"
    )  # forked from one clean server: torch imported once, no inherited threads (Ray)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def reference():
    m = model()
    batches = data(0, 1)
    op = HessianOperator(m, lm_loss, batches)
    V = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    top = eigenvalues(op, 2, generator=torch.Generator().manual_seed(3))
    return V, op.matmat(V), top.eigenvalues


def test_stage_bounds_are_contiguous_and_balanced():
    m = gpt(vocab=16, dim=8, layers=4, heads=2, max_len=6)
    for k in (1, 2, 3, 6):
        bounds = stage_bounds(m, k)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(m) and len(bounds) == k
        assert all(a < b for a, b in bounds) and all(b1 == a2 for (_, b1), (a2, _) in pairwise(bounds))
    with pytest.raises(ValueError, match="cannot split 6 stage modules over 7 workers"):
        stage_bounds(m, 7)


@pytest.mark.parametrize("stages, replicas", [(2, 1), (3, 1), (2, 2)])
def test_pipeline_hvp_equals_the_single_process_hvp(tmp_path, reference, stages, replicas):
    V, want, top = reference
    parts = run(tmp_path, stages, replicas, V)
    for replica in range(replicas):
        mine = sorted((p for p in parts if p["replica"] == replica), key=lambda p: p["slice"])
        assert [p["slice"][0] for p in mine][0] == 0 and mine[-1]["slice"][1] == V.shape[0]
        got = torch.cat([p["hv"] for p in mine])
        assert torch.allclose(got, want, rtol=0, atol=1e-10 * want.abs().max())
        for p in mine:
            assert torch.allclose(p["top"], top, rtol=1e-10, atol=0)


def test_memory_per_worker_shrinks_with_the_number_of_stages(tmp_path, reference):
    V = reference[0]
    peak = {}
    for stages in (1, 3):
        parts = run(tmp_path, stages, 1, V)
        peak[stages] = (max(p["graph_bytes"] for p in parts), max(p["params"] for p in parts))
    assert peak[3][0] < 0.75 * peak[1][0]  # saved activations and graphs per worker
    assert peak[3][1] < 0.75 * peak[1][1]  # parameters (and vector slices) per worker
