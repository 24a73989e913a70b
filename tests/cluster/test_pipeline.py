"""The pipeline Hessian-vector product equals the single-process one (float64) over 1, 2 and 3
stages and a 2 × 2 stage × data grid, under real torch.distributed (gloo on loopback) in
separate processes: a small GPT-style model, and a model whose head is tied to its
embedding and whose pieces take the batch inputs, under both schedules, several
micro-batch counts (some not dividing the batches), example and token weighting, eval
and train mode, with graphs kept and rebuilt. One launch per grid runs every model and
case; the tests of this module share it."""

from __future__ import annotations

import os
import socket
from itertools import pairwise

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from cluster.pipeline import PipelineHessian, StagedSequential, build_stage, grid_groups, stage_bounds, stage_layout
from cluster.pipeline_layout import child_costs
from probe.eigen import eigenvalues
from probe.gpt import gpt, lm_loss
from probe.hessian import HessianOperator
from probe.params import ParameterSpace

CONFIG = dict(vocab=16, dim=8, layers=3, heads=2, max_len=6)
# tied-model cases run in every pipeline worker: (schedule, micro_batches, weighting, mode, graph_memory_bytes)
CASES = [
    ("overlap", 2, "tokens", "eval", 2 << 30),
    ("overlap", 4, "tokens", "eval", 2 << 30),  # 4 does not divide the batches of 5 and 3
    ("overlap", 3, "tokens", "eval", 0),  # graphs rebuilt on every product
    ("overlap", 3, "tokens", "train", 2 << 30),  # no dropout or BatchNorm: the eval-mode matrix
    ("overlap", 2, "examples", "eval", 2 << 30),  # targets with -100 under example weighting: not cut
    ("sequential", 1, "examples", "eval", 2 << 30),
    ("sequential", 3, "tokens", "eval", 2 << 30),
]


class TiedEmbedding(nn.Module):
    """Token and position embeddings; the first piece, called ``(None, ids)``."""

    takes_inputs = True

    def __init__(self, vocab: int, dim: int, max_len: int) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)

    def forward(self, h, ids):
        assert h is None
        return self.tokens(ids) + self.positions(torch.arange(ids.shape[-1]))


class Gated(nn.Module):
    """A residual layer gated by the batch inputs (``ids`` parity), so the inputs matter mid-model."""

    takes_inputs = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, h, ids):
        return h + torch.tanh(self.lin(h)) * (1.0 + (ids % 2).unsqueeze(-1).to(h.dtype))


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, h):
        return h + torch.tanh(self.fc(self.ln(h)))


class TiedHead(nn.Module):
    """Final LayerNorm and logits ``h @ Eᵀ`` with the embedding's own weight (one Parameter in two pieces)."""

    def __init__(self, embedding: nn.Embedding, dim: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.weight = embedding.weight

    def forward(self, h):
        return self.ln(h) @ self.weight.T


def tied_model() -> StagedSequential:
    torch.manual_seed(5)
    vocab, dim, max_len = CONFIG["vocab"], CONFIG["dim"], CONFIG["max_len"]
    emb = TiedEmbedding(vocab, dim, max_len)
    return StagedSequential(emb, Gated(dim), Mlp(dim), Gated(dim), TiedHead(emb.tokens, dim)).double()


def tied_data(replica: int, replicas: int):
    """The batches of :func:`data` with some targets ignored (-100), unevenly over sequences."""
    out = []
    for i, (x, y) in enumerate(data(0, 1)):
        y = y.clone()
        y[0, : 2 + i] = -100
        y[-1, -1] = -100
        out.append((x, y))
    return out[replica::replicas]


def tied_tokens() -> int:
    return sum(int((y != -100).sum()) for _, y in tied_data(0, 1))


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


def _worker(rank: int, world: int, stages: int, port: int, out: str, V: torch.Tensor, V_tied, with_tied: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    # one intra-op thread per process: up to 4 processes × torch's default of one thread per core, spinning for
    # descheduled peers on a busy 2-core machine, made every product several times slower (a 2-stage launch:
    # 50 s against 6.5 s)
    torch.set_num_threads(1)
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
        tied = {}
        if with_tied:
            full = tied_model()
            layout = stage_layout(full, stages)[stage]
            part, _, _ = build_stage(full, stages, stage)
            for schedule, micro, weighting, mode, budget in CASES:
                total = dict(total_tokens=tied_tokens()) if weighting == "tokens" else dict(total_examples=12)
                tied_op = PipelineHessian(
                    part,
                    lm_loss,
                    tied_data(replica, replicas),
                    stage_index=stage,
                    ranks=ranks,
                    layout=layout,
                    pipe_group=pipe,
                    data_group=data_group,
                    schedule=schedule,
                    micro_batches=micro,
                    weighting=weighting,
                    mode=mode,
                    graph_memory_bytes=budget,
                    **total,
                )
                v = V_tied[tied_op.local_slice].contiguous()
                key = (schedule, micro, weighting, mode, budget)
                tied[key] = (tied_op.matmat(v), tied_op.matmat(v), tied_op.num_micro_batches, tied_op.graph_bytes)
            tied["slice"] = (layout.offset, layout.offset + layout.dim)
        torch.save(
            {
                "tied": tied,
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


def run(folder, stages: int, replicas: int, V: torch.Tensor, V_tied=None) -> list[dict]:
    world = stages * replicas
    mp.set_forkserver_preload(["torch", "probe.gpt", "cluster.pipeline", __name__])  # imported once, in the server
    mp.start_processes(  # pyright: ignore[reportPrivateImportUsage]
        _worker,
        args=(world, stages, free_port(), str(folder), V, V_tied, V_tied is not None),
        nprocs=world,
        join=True,
        start_method="forkserver",
    )  # forked from one clean server: torch imported once, no inherited threads (Ray)
    return [torch.load(folder / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def grid(tmp_path_factory, reference, tied_reference):
    """``grid(stages, replicas)``: every rank's results of one launch on that grid, run once per module."""
    done: dict[tuple[int, int], list[dict]] = {}

    def get(stages: int, replicas: int) -> list[dict]:
        if (stages, replicas) not in done:
            folder = tmp_path_factory.mktemp(f"grid{stages}x{replicas}")
            done[stages, replicas] = run(folder, stages, replicas, reference[0], tied_reference[0])
        return done[stages, replicas]

    return get


@pytest.fixture(scope="module")
def reference():
    m = model()
    batches = data(0, 1)
    op = HessianOperator(m, lm_loss, batches)
    V = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    top = eigenvalues(op, 2, generator=torch.Generator().manual_seed(3))
    return V, op.matmat(V), top.eigenvalues


@pytest.fixture(scope="module")
def tied_reference():
    """``V`` and the single-process products of the tied model, by weighting."""
    m = tied_model()
    want = {}
    for weighting in ("examples", "tokens"):
        op = HessianOperator(m, lm_loss, tied_data(0, 1), weighting=weighting)
        if weighting == "examples":
            V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        want[weighting] = op.matmat(V)
    assert (want["examples"] - want["tokens"]).abs().max() > 1e-3 * want["examples"].abs().max()
    return V, want


def test_stage_layout_owns_contiguous_slices_and_borrows_the_tied_head():
    m = tied_model()
    space = ParameterSpace.of(m)
    tokens = m[0].get_submodule("tokens")
    assert m[4].weight is tokens.weight and space.names[0] == "0.tokens.weight"
    for k in (1, 2, 3, 5):
        layouts = stage_layout(m, k)
        assert [n for s in layouts for n in s.names] == list(space.names)  # the single-process flat order
        assert [s.offset for s in layouts] == [sum(s.dim for s in layouts[:i]) for i in range(k)]
        assert all(s.total_dim == space.dim for s in layouts)
        last, first = layouts[-1], layouts[0]
        if k == 1:
            assert not last.borrowed and not last.lent
            continue
        (b,) = last.borrowed
        assert (b.owner, b.owner_name, b.offset, b.owner_offset, b.numel) == (0, "0.tokens.weight", 0, 0, 16 * 8)
        assert b.full_name == "4.weight" and b.name == f"{4 - last.bounds[0]}.weight"
        assert [(e.borrower, e.owner_name) for e in first.lent] == [(k - 1, "0.tokens.weight")]
        assert all(not s.borrowed and not s.lent for s in layouts[1:-1])
    # the shared weight counts once, in the embedding: the head alone is its LayerNorm
    sizes = [sum(p.numel() for p in c.parameters()) for c in m]
    assert stage_bounds(m, 5) == [(i, i + 1) for i in range(5)] and sizes[4] == 16 * 8 + 16


def test_stage_bounds_are_contiguous_and_balanced():
    m = gpt(vocab=16, dim=8, layers=4, heads=2, max_len=6)
    for k in (1, 2, 3, 6):
        bounds = stage_bounds(m, k)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(m) and len(bounds) == k
        assert all(a < b for a, b in bounds) and all(b1 == a2 for (_, b1), (a2, _) in pairwise(bounds))
    with pytest.raises(ValueError, match="cannot split 6 stage modules over 7 workers"):
        stage_bounds(m, 7)


@pytest.mark.parametrize("stages, replicas", [(1, 1), (2, 1), (3, 1), (2, 2)])
def test_pipeline_hvp_equals_the_single_process_hvp(grid, reference, tied_reference, stages, replicas):
    V, want, top = reference
    V_tied, want_tied = tied_reference
    parts = grid(stages, replicas)
    for replica in range(replicas):
        mine = sorted((p for p in parts if p["replica"] == replica), key=lambda p: p["slice"])
        assert [p["slice"][0] for p in mine][0] == 0 and mine[-1]["slice"][1] == V.shape[0]
        got = torch.cat([p["hv"] for p in mine])
        assert torch.allclose(got, want, rtol=0, atol=1e-10 * want.abs().max())
        for p in mine:
            assert torch.allclose(p["top"], top, rtol=1e-10, atol=0)
        # the tied model: every case, both products (the second from kept or rebuilt graphs)
        tied = sorted((p["tied"] for p in mine), key=lambda t: t["slice"])
        assert [t["slice"][1] for t in tied][-1] == V_tied.shape[0]
        for case in CASES:
            schedule, micro, weighting = case[:3]
            ref = want_tied[weighting]
            for i in (0, 1):
                got = torch.cat([t[case][i] for t in tied])
                assert torch.allclose(got, ref, rtol=0, atol=1e-10 * ref.abs().max()), (case, i)
            sizes = [5, 4, 3][replica::replicas]  # cut into up to `micro` pieces each, unless not exact
            cut = weighting == "tokens"
            assert tied[0][case][2] == sum(min(micro, n) if cut else 1 for n in sizes)
            # graphs kept between products (their bytes counted) on every stage, unless rebuilt (no budget, train mode)
            mode, budget = case[3:]
            assert all((t[case][3] > 0) == (budget > 0 and mode == "eval") for t in tied), case


def test_memory_per_worker_shrinks_with_the_number_of_stages(grid):
    peak = {}
    for stages in (1, 3):
        parts = grid(stages, 1)  # the 3-stage launch is the one above
        peak[stages] = (max(p["graph_bytes"] for p in parts), max(p["params"] for p in parts))
    assert peak[3][0] < 0.75 * peak[1][0]  # saved activations and graphs per worker
    assert peak[3][1] < 0.75 * peak[1][1]  # parameters (and vector slices) per worker


def test_stages_balance_compute_by_default_and_memory_on_request():
    """An embedding is a lookup (no matmul) and a tied head multiplies with the embedding's table:
    by compute the head's stage gets few layers; by parameters the embedding alone is a stage."""
    emb = torch.nn.Embedding(1000, 8)
    head = torch.nn.Linear(8, 1000, bias=False)
    head.weight = emb.weight
    m = torch.nn.Sequential(emb, *[torch.nn.Linear(8, 8) for _ in range(4)], head)
    assert child_costs(m) == [0, 72, 72, 72, 72, 8000]
    assert child_costs(m, "parameters") == [8000, 72, 72, 72, 72, 0]
    assert stage_bounds(m, 2) == [(0, 5), (5, 6)]
    assert stage_bounds(m, 2, "parameters") == [(0, 1), (1, 6)]
    layouts = stage_layout(m, 2)
    assert layouts[1].borrowed[0].numel == 8000 and layouts[0].dim == 8000 + 4 * 72
    with pytest.raises(ValueError, match="balance must be one of"):
        stage_bounds(m, 2, "flops")
