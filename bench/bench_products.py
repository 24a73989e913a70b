"""Per-column cost of three exact ways to apply the Hessian to a block of columns.

On the peer benchmark's models and data (the 1,348 training digits, cross-entropy, float32,
untrained weights from a fixed seed), for blocks of k columns:

- ``loop``: our kept gradient graph, one double backward per column
  (``HessianOperator(batched=False)``, the CPU default);
- ``batched``: the kept graph, one ``is_grads_batched`` double backward per block
  (``HessianOperator(batched=True)``, the CUDA default);
- ``fwd-over-rev``: ``torch.func`` ``vmap(jvp(grad(loss)))`` over the columns,
  which re-runs the forward pass per block and keeps no graph (curvlinops' method).

It prints milliseconds per column (minimum of ``--repeats``) and each method's
relative difference from ``loop`` (rounding only: all three are exact).

    .venv/bin/python bench/bench_products.py [--models digits_mlp digits_cnn wide_mlp] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

from cluster.data import digits_tensors
from probe.hessian import HessianOperator
from probe.models import digits_cnn, digits_mlp, wide_mlp

MODELS = {
    "digits_mlp": (digits_mlp, (1, 4, 10, 20)),
    "digits_cnn": (digits_cnn, (1, 4, 10, 20)),
    "wide_mlp": (wide_mlp, (1, 4)),
}


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def compare(
    name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ks: tuple[int, ...], repeats: int
) -> None:
    """Print the three methods' milliseconds per column and differences for each block size in ``ks``."""
    loop = HessianOperator(model, F.cross_entropy, [(x, y)], batched=False)
    batched = HessianOperator(model, F.cross_entropy, [(x, y)], batched=True)
    names = [n for n, _ in model.named_parameters()]
    primals = tuple(p.detach() for p in model.parameters())

    def loss_of(params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, dict(zip(names, params, strict=True)), (x,)), y)

    gradient = grad(loss_of)

    def column(v: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return jvp(gradient, (primals,), (v,))[1]

    print(f"{name} ({loop.dim:,} parameters)")
    for k in ks:
        V = torch.randn(loop.dim, k, generator=torch.Generator().manual_seed(k))
        parts = tuple(loop.space.unflatten(V))

        def fwd_over_rev(parts: tuple[torch.Tensor, ...] = parts, k: int = k) -> torch.Tensor:
            out = vmap(column)(parts)
            return torch.cat([t.reshape(k, -1) for t in out], dim=1).T

        ref = loop.matmat(V)
        row = []
        for label, fn in (
            ("loop", partial(loop.matmat, V)),
            ("batched", partial(batched.matmat, V)),
            ("fwd-over-rev", fwd_over_rev),
        ):
            ms = best_of(fn, repeats) / k * 1e3
            diff = float((fn() - ref).norm() / ref.norm())
            row.append(f"{label} {ms:7.2f} ms (diff {diff:.0e})")
        print(f"  k={k:3d}: " + "   ".join(row))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y = digits_tensors()
    print(f"{len(y)} examples, float32, {args.threads} thread(s); ms per column, min of {args.repeats}")
    for name in args.models:
        factory, ks = MODELS[name]
        torch.manual_seed(0)
        compare(name, factory().eval(), x, y, ks, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
