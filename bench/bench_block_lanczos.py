"""Products and passes to reach ``tol`` for the top-k eigenvalues, single-vector vs block Lanczos.

For k = 1, 5, 10 and block sizes b = 1, 2, 4, k, runs ``eigenvalues(op, k, tol=tol,
block_size=b)`` from ``--seeds`` start blocks and reports the products (operator
columns applied), the passes (block products: one sweep over the probe data each),
whether every run converged, and the largest relative error of the k eigenvalues
against a reference:

- ``cluster``: a dense float64 matrix (n = 2,000) with a top eigenvalue of
  multiplicity 3 and a second cluster 10⁻⁴ apart, above a bulk; the reference is its
  exact spectrum. Single-vector Lanczos sees one direction of a repeated eigenvalue;
- the peer benchmark's digits models (``bench/peer_common.py``: digits_mlp, digits_cnn,
  wide_mlp), trained as ``bench/peer_tasks.py``'s ``train`` does, float32 Hessian of the
  mean cross-entropy over the 1,348 training digits; the reference is a float64 Lanczos
  run at tol 1e-10 (digits_mlp, digits_cnn; none for wide_mlp: the column is the
  largest difference from the b = 1 values).

Cost model printed beside the counts: on the CPU a pass of b columns costs b backward
passes (``HessianOperator``'s CPU default, one backward per column), so the cost is
the products; on CUDA a batched pass costs ``--cuda-ratio`` (default 0.9: 10% less per
column, measured at 8 columns, 1.1M parameters, H200; see ``probe.model_operator``) of
b products, so the cost is ``products·ratio`` for b > 1; ``break-even`` is the per-column
cost ratio of a batched pass below which the block would be cheaper (products at b = 1
over products at b). Times are wall seconds on
this machine (CPU only; noisy on a shared machine).

    flock /tmp/bench.lock .venv/bin/python bench/bench_block_lanczos.py [--models cluster digits_mlp ...]
        [--ks 1 5 10] [--blocks 1 2 4] [--seeds 3] [--tol 1e-6]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peer_common, peer_tasks

from peer_common import FULL_MODELS, generator  # noqa: E402
from peer_tasks import train  # noqa: E402

from cluster.data import digits_tensors  # noqa: E402
from probe.eigen import eigenvalues  # noqa: E402
from probe.hessian import HessianOperator  # noqa: E402
from probe.operators import CurvatureOperator, DenseOperator  # noqa: E402

MODEL_NAMES = ("cluster", "digits_mlp", "digits_cnn", "wide_mlp")


def cluster_operator(n: int = 2000) -> tuple[DenseOperator, torch.Tensor]:
    """``Q diag(λ) Qᵀ``: λ = 10 (×3), 9, 9−1e-4, 9−2e-4, eight outliers in [6, 8], bulk in [−1, 4]."""
    top = [10.0, 10.0, 10.0, 9.0, 9.0 - 1e-4, 9.0 - 2e-4] + torch.linspace(8.0, 6.0, 8).tolist()
    bulk = torch.linspace(-1.0, 4.0, n - len(top), dtype=torch.float64)
    lam = torch.cat([torch.tensor(top, dtype=torch.float64), bulk])
    g = torch.Generator().manual_seed(0)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    a = (q * lam) @ q.T
    return DenseOperator((a + a.T) / 2), lam.sort(descending=True).values


def model_operators(name: str, ks: list[int]) -> tuple[CurvatureOperator, torch.Tensor | None, str]:
    spec = next(s for s in FULL_MODELS if s.name == name)
    x, y = digits_tensors(split="train")
    model, loss = train(spec, x, y)
    op = HessianOperator(model, F.cross_entropy, [(x, y)])
    info = f"{op.dim:,} parameters, loss {loss:.4g}, float32, batched={op.batched}"
    if name == "wide_mlp":
        return op, None, info
    m64 = copy.deepcopy(model).double()
    ref_op = HessianOperator(m64, F.cross_entropy, [(x.double(), y)])
    steps = min(400, -(-ref_op.dim // 4))
    ref = eigenvalues(ref_op, max(ks) + 2, tol=1e-10, block_size=4, max_steps=steps, generator=generator(12345))
    info += f"; reference float64 block Lanczos tol 1e-10 ({ref.num_matvecs} products, converged={ref.converged})"
    return op, ref.eigenvalues, info


def one(op: CurvatureOperator, k: int, b: int, tol: float, seed: int) -> dict:
    t0 = time.perf_counter()
    r = eigenvalues(op, k, tol=tol, block_size=b, generator=generator(seed))
    return {
        "products": r.num_matvecs,
        "passes": r.num_steps,
        "converged": r.converged,
        "values": r.eigenvalues,
        "time_s": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 5, 10])
    ap.add_argument("--blocks", nargs="+", type=int, default=[1, 2, 4], help="block sizes besides k itself")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--cuda-ratio", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"tol {args.tol:g}, {args.seeds} seed(s), CPU, {threads} thread(s), torch {torch.__version__}")
    header = (
        f"{'model':<11} {'k':>3} {'b':>3} {'products':>9} {'passes':>7} {'conv':>5} {'max rel err':>11} "
        f"{'prod/b1':>8} {'pass/b1':>8} {'cuda cost/b1':>12} {'break-even':>10} {'time s':>8}"
    )
    for name in args.models:
        if name == "cluster":
            op, ref = cluster_operator()
            info = f"dense float64, n={op.dim}, top 10 (x3), 9, 9-1e-4, 9-2e-4, 8..6 (8), bulk [-1, 4]"
        else:
            op, ref, info = model_operators(name, args.ks)
        print(f"\n== {name}: {info}", flush=True)
        print(header, flush=True)
        for k in args.ks:
            base = None
            for b in sorted({1, *args.blocks, k}):
                runs = [one(op, k, b, args.tol, seed) for seed in range(args.seeds)]
                products = sum(r["products"] for r in runs) / len(runs)
                passes = sum(r["passes"] for r in runs) / len(runs)
                conv = sum(r["converged"] for r in runs)
                if ref is not None:
                    err = max(float(((r["values"] - ref[:k]).abs() / ref[:k].abs()).max()) for r in runs)
                elif base is not None:
                    err = max(float(((r["values"] - base["values"]).abs() / base["values"].abs()).max()) for r in runs)
                else:
                    err = float("nan")
                if b == 1:
                    base = {"products": products, "passes": passes, "values": runs[0]["values"]}
                assert base is not None  # b = 1 comes first
                cuda = products * (args.cuda_ratio if b > 1 else 1.0) / base["products"]
                t = sum(r["time_s"] for r in runs) / len(runs)
                print(
                    f"{name:<11} {k:>3} {b:>3} {products:>9.1f} {passes:>7.1f} {conv:>3}/{len(runs)} {err:>11.2e} "
                    f"{products / base['products']:>8.2f} {passes / base['passes']:>8.2f} {cuda:>12.2f} "
                    f"{base['products'] / products:>10.2f} {t:>8.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
