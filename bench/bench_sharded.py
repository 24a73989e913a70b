"""Exact parameter-sharded Hessian-vector products against central finite differences under FSDP2.

Both run in 2 gloo processes on loopback, each holding half of every layer's parameters
and half of the probe batches:

- ``exact``: :class:`cluster.sharded_hvp.ShardedHessian` (reverse over reverse through
  differentiable all-gathers, gathered layers re-gathered in the backward sweeps);
- ``fd``: the prototype below, ``Hv ≈ (∇L(θ+εv) − ∇L(θ−εv)) / 2ε`` with
  ``torch.distributed.fsdp.fully_shard`` on every layer and the root, the perturbation
  added to each rank's local shards (restored from a copy, not by subtracting), and
  ``ε = c · cbrt(u) · (1 + ‖θ‖) / ‖v‖`` (``u`` the unit roundoff of the dtype; ``c = 1``
  by default; the sweep over ``c`` shows the bias/rounding trade-off).

Each is compared with the single-process exact product (:class:`probe.hessian.HessianOperator`
in float64 at the same parameter values): relative error ``‖Hv − H_ref v‖ / ‖H_ref v‖`` over 4
Gaussian vectors, λ_max by Lanczos, and a Hutchinson trace over 8 Rademacher probes (the
same probes for all). Timing: seconds per product and per plain (FSDP2) gradient, on the
last config; memory: peak RSS growth per rank over the process's RSS before building.

Run: ``flock /tmp/bench.lock .venv/bin/python bench/bench_sharded.py``
"""

from __future__ import annotations

import os
import resource
import socket
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster.sharded_hvp import ShardedHessian  # noqa: E402
from probe.batches import call_model  # noqa: E402
from probe.eigen import eigenvalues  # noqa: E402
from probe.gpt import gpt, lm_loss  # noqa: E402
from probe.hessian import HessianOperator  # noqa: E402
from probe.operators import CurvatureOperator  # noqa: E402

WORLD = 2
CONFIGS: dict[
    str, tuple[dict[str, Any], int, int, int]
] = {  # name: (model kwargs, sequences, sequence length, batches)
    "gpt": (dict(kind="gpt", vocab=32, dim=16, layers=2, heads=2), 16, 8, 4),
    "llama": (dict(kind="llama", vocab=32, dim=16, layers=2, heads=2), 16, 8, 4),
    "gpt-m": (dict(kind="gpt", vocab=256, dim=128, layers=4, heads=4), 16, 32, 2),
}
C_SWEEP = (1e-2, 1e-1, 1.0, 10.0, 100.0)


def make_model(kind: str, vocab: int, dim: int, layers: int, heads: int, max_len: int = 32) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt":
        return gpt(vocab=vocab, dim=dim, layers=layers, heads=heads, max_len=max_len)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=2 * dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_len,
    )
    config._attn_implementation = "eager"  # the plain-autograd attention (twice differentiable)
    return LlamaForCausalLM(config)


def data(config: str, rank: int, world: int):
    kw, n, t, nb = CONFIGS[config]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, kw["vocab"], (n, t + 1), generator=g)
    batches = [(c[:, :-1], c[:, 1:]) for c in ids.chunk(nb)]
    return batches[rank::world]


def rss_now() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class FDOperator(CurvatureOperator):
    """Prototype: central differences of FSDP2 gradients; vectors are the concatenated local shards."""

    def __init__(self, model: nn.Module, batches, total: int, c: float = 1.0) -> None:
        from torch.distributed.fsdp import fully_shard

        self.model, self.c = model, c
        inner = getattr(model, "model", None)
        layers = list(inner.layers if inner is not None else model.children())  # pyright: ignore
        for m in layers:
            fully_shard(m)
        fully_shard(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.locals = [p.to_local() for p in self.params]  # pyright: ignore[reportAttributeAccessIssue]
        self.batches, self.total = batches, total
        self.dtype, self.device = self.params[0].dtype, torch.device("cpu")
        rank = dist.get_rank()
        sizes = torch.tensor([[sum(t.numel() for t in self.locals)] for _ in range(1)], dtype=torch.long)
        every = [torch.zeros_like(sizes) for _ in range(WORLD)]
        dist.all_gather(every, sizes)
        per = [int(e.item()) for e in every]
        self.dim, self.local_dim = sum(per), per[rank]
        self._slice = slice(sum(per[:rank]), sum(per[:rank]) + per[rank])
        index, offset = [], 0
        for p in self.params:
            chunks = torch.arange(p.numel()).view(p.shape).chunk(WORLD, dim=0)
            index.append(
                (chunks[rank] if rank < len(chunks) else torch.empty(0, dtype=torch.long)).reshape(-1) + offset
            )
            offset += p.numel()
        self.natural_index = torch.cat(index)
        self.u = torch.finfo(self.dtype).eps / 2
        self.num_matvecs = 0

    @property
    def local_slice(self) -> slice:
        return self._slice

    def allreduce(self, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    def gradient(self) -> torch.Tensor:
        for p in self.params:
            p.grad = None
        for x, y in self.batches:
            (lm_loss(call_model(self.model, x), y) * (len(y) / self.total)).backward()
        # FSDP2's reduce-scatter averages gradients over ranks (a data-parallel mean); the loss here is
        # already the global mean, so the sum is wanted: undo the division.
        return torch.cat([p.grad.to_local().reshape(-1) for p in self.params]) * WORLD  # pyright: ignore

    def _matmat(self, V):
        out = torch.empty_like(V)
        theta = torch.cat([t.detach().reshape(-1) for t in self.locals])
        tnorm = self.allreduce(theta.square().sum()).sqrt()
        with self.model_mode():
            for j in range(V.shape[1]):
                v = V[:, j]
                eps = float(self.c * self.u ** (1 / 3) * (1 + tnorm) / self.allreduce(v.square().sum()).sqrt())
                grads = []
                for sign in (1.0, -1.0):
                    self._set(theta + sign * eps * v)
                    grads.append(self.gradient())
                self._set(theta)
                out[:, j] = (grads[0] - grads[1]) / (2 * eps)
        self.num_matvecs += V.shape[1]
        return out

    def model_mode(self):
        from probe.model_operator import model_mode

        return model_mode(self.model, "eval")

    @torch.no_grad()
    def _set(self, flat):
        at = 0
        for t in self.locals:
            t.copy_(flat[at : at + t.numel()].view_as(t))
            at += t.numel()


def _worker(rank, config, dtype, port, out, V, P):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    kw, n, _, _ = CONFIGS[config]
    res = {}
    try:
        for method in ("exact", "fd"):
            model = make_model(**kw).to(dtype)
            base = rss_now()
            t0 = time.perf_counter()
            if method == "exact":
                op = ShardedHessian(model, lm_loss, data(config, rank, WORLD), total_examples=n)
                runs = [(1.0, op)]
            else:
                op = FDOperator(model, data(config, rank, WORLD), n)
                runs = [(c, op) for c in C_SWEEP]
            build = time.perf_counter() - t0
            idx = op.natural_index
            for c, o in runs:
                o.c = c  # pyright: ignore[reportAttributeAccessIssue]
                t0 = time.perf_counter()
                hv = o.matmat(V[idx].to(dtype).contiguous())
                per = (time.perf_counter() - t0) / V.shape[1]
                again = o.matmat(V[idx].to(dtype).contiguous())
                res[(method, c)] = dict(hv=hv.double(), idx=idx, per=per, repeat=(hv - again).norm().item())
            if method == "fd":  # c = 1 for the estimators
                op.c = 1.0  # pyright: ignore[reportAttributeAccessIssue]
            res[(method, "build_s")] = build
            if method == "fd":  # a plain FSDP2 gradient: the unit of time for both methods
                op.gradient()
                t0 = time.perf_counter()
                op.gradient()
                res[("fd", "grad_s")] = time.perf_counter() - t0
            res[(method, "lmax")] = eigenvalues(op, 1, generator=torch.Generator().manual_seed(3)).eigenvalues[0]
            Pl = P[idx].to(dtype)
            res[(method, "trace")] = op.allreduce((Pl * op.matmat(Pl.contiguous())).sum()).item() / P.shape[1]
            res[(method, "rss_mb")] = rss_peak() - base
            res[(method, "graph_mb")] = getattr(op, "graph_bytes", 0) / 2**20
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    mp.set_forkserver_preload(["torch", "probe.gpt", "cluster.sharded_hvp"])
    configs = sys.argv[1:] or list(CONFIGS)
    for config in configs:
        kw = CONFIGS[config][0]
        for dtype in (torch.float64, torch.float32) if config != "gpt-m" else (torch.float32,):
            ref_model = make_model(**kw).to(dtype).double()  # the same (dtype-representable) values in float64
            ref = HessianOperator(ref_model, lm_loss, data(config, 0, 1))
            V = torch.randn(ref.dim, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            P = torch.randint(0, 2, (ref.dim, 8), generator=torch.Generator().manual_seed(4)).double() * 2 - 1
            want = ref.matmat(V)
            lmax = eigenvalues(ref, 1, generator=torch.Generator().manual_seed(3)).eigenvalues[0].item()
            tr = (P * ref.matmat(P)).sum().item() / P.shape[1]
            with tempfile.TemporaryDirectory() as out:
                mp.start_processes(  # pyright: ignore[reportPrivateImportUsage]
                    _worker,
                    args=(config, dtype, free_port(), out, V, P),
                    nprocs=WORLD,
                    join=True,
                    start_method="forkserver",
                )
                parts = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]
            name = f"{config} {str(dtype).removeprefix('torch.')} (dim {ref.dim})"
            print(f"\n== {name}: reference λ_max {lmax:.6g}, Hutchinson(8) trace {tr:.6g}")
            print(f"{'method':>14} {'rel err Hv':>11} {'repeat':>8} {'s/product':>10} {'÷ grad':>7}", end="")
            print(f" {'λmax rel':>9} {'trace rel':>9} {'RSS+ MB':>8} {'graph MB':>8}")
            for (method, c), r0 in parts[0].items():
                if not isinstance(r0, dict):
                    continue
                got = torch.empty_like(want)
                got[torch.cat([p[(method, c)]["idx"] for p in parts])] = torch.cat(
                    [p[(method, c)]["hv"] for p in parts]
                )
                err = ((got - want).norm(dim=0) / want.norm(dim=0)).max().item()
                per = max(p[(method, c)]["per"] for p in parts)
                grad = max(p[("fd", "grad_s")] for p in parts)
                label = method if method == "exact" else f"fd c={c:g}"
                row = f"{label:>14} {err:11.2e} {max(p[(method, c)]['repeat'] for p in parts):8.1e} {per:10.4f}"
                row += f" {per / grad:7.2f}"
                if c == 1.0:
                    lm = abs(parts[0][(method, "lmax")].item() - lmax) / abs(lmax)
                    tre = abs(parts[0][(method, "trace")] - tr) / abs(tr)
                    rss = max(p[(method, "rss_mb")] for p in parts)
                    row += f" {lm:9.1e} {tre:9.1e} {rss:8.1f} {max(p[(method, 'graph_mb')] for p in parts):8.2f}"
                    row += f"  build {max(p[(method, 'build_s')] for p in parts) / grad:.2f} grads"
                print(row, flush=True)


if __name__ == "__main__":
    main()
