"""Time the Lanczos bookkeeping alone: everything a step does besides the product.

The operator is a diagonal matrix, whose product is one element-wise multiply, so
the time is that of the recurrence, the full reorthogonalization against the kept
basis, the norms and the basis store. With the defaults (1,126,410 rows, the size
of ``wide_mlp``; 4 runs × 40 steps, the peer benchmark's SLQ setting) it is the
overhead that ``bench_peers.py`` adds to every SLQ product on that model.

    .venv/bin/python bench/bench_lanczos.py [--dim N] [--runs K] [--steps M] [--threads T]

Run it at two commits to compare implementations; it prints the time per step and
per product, and the achieved loss of orthogonality (which must not grow).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor

from probe.lanczos import LanczosProcess
from probe.operators import CurvatureOperator


class Diagonal(CurvatureOperator):
    """``diag(d)``: a product costs one multiply, so the bookkeeping dominates."""

    def __init__(self, d: Tensor) -> None:
        self.d = d
        self.dim = self.local_dim = d.numel()
        self.dtype, self.device = d.dtype, d.device

    def _matmat(self, V: Tensor) -> Tensor:
        return V * self.d.unsqueeze(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1_126_410)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # A spectrum with a few outliers over a bulk, like a trained network's Hessian.
    d = torch.cat([torch.linspace(-0.1, 1.0, args.dim - 10), torch.linspace(5.0, 50.0, 10)])
    op = Diagonal(d)
    times, product_s, ortho = [], [], 0.0
    for rep in range(args.repeats):
        start = op.random_vectors(args.runs, generator=torch.Generator().manual_seed(rep))
        t0 = time.perf_counter()
        process = LanczosProcess(op, start, reorth="full", max_steps=args.steps)
        for _ in range(args.steps):
            process.step()
        times.append(time.perf_counter() - t0)
        # The products alone, timed apart on the same block size.
        V = start.contiguous()
        a = time.perf_counter()
        for _ in range(args.steps):
            op.matmat(V)
        spent = time.perf_counter() - a
        product_s.append(spent)
        ortho = max(ortho, float(process.result().orthogonality_loss.max()))
    best, prod = min(times), min(product_s)
    products = args.runs * args.steps
    print(
        f"dim {args.dim:,}, {args.runs} runs x {args.steps} steps, full reorthogonalization, "
        f"{args.threads} thread(s), float32"
    )
    print(f"  total {best:.3f} s (best of {args.repeats}); diagonal products {prod:.3f} s")
    print(
        f"  bookkeeping {best - prod:.3f} s = {(best - prod) / args.steps * 1e3:.1f} ms per step = "
        f"{(best - prod) / products * 1e3:.2f} ms per product"
    )
    print(f"  loss of orthogonality {ortho:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
