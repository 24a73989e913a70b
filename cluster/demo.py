"""The embedded default job: curvature of a small digits network, single process.

Trains ``probe.models.digits_mlp`` on scikit-learn's digits (bundled with the
package, no download), then measures on a fixed probe set of training examples:
the top-5 Hessian eigenvalues, λ_min, the trace (Hutch++) and the SLQ spectral
density, and writes a density plot and a JSON summary.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F

from cluster.data import digits_tensors
from cluster.figures import plot_density
from probe.eigen import eigenvalues
from probe.hessian import HessianOperator
from probe.models import digits_mlp
from probe.slq import spectral_density
from probe.trace import hutchpp

__all__ = ["train_digits", "run_demo"]


def train_digits(*, seed: int = 0, steps: int = 300, lr: float = 0.01, hidden: int = 32) -> torch.nn.Module:
    """Train a digits MLP by full-batch Adam; returns the model (float32)."""
    torch.manual_seed(seed)
    x, y = digits_tensors(split="train")
    model = digits_mlp(hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _accuracy(model: torch.nn.Module, split: str) -> float:
    x, y = digits_tensors(split=split)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run_demo(out_dir: str | Path = "out/demo", *, seed: int = 0, num_examples: int = 512, batch_size: int = 128,
             stream: TextIO = sys.stdout) -> dict:
    """Run the demo and write ``density.png`` and ``summary.json`` under ``out_dir``; returns the summary."""
    out_dir = Path(out_dir)
    say = lambda msg: print(msg, file=stream, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    say("[1/5] training a digits MLP (64-32-32-10, tanh) by full-batch Adam, 300 steps ...")
    model = train_digits(seed=seed).double()
    say(f"      train accuracy {_accuracy(model.float(), 'train'):.3f}, test accuracy {_accuracy(model.float(), 'test'):.3f}")
    model = model.double()
    x, y = digits_tensors(split="train")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:num_examples]
    batches = [(x[idx[i:i + batch_size]], y[idx[i:i + batch_size]]) for i in range(0, len(idx), batch_size)]
    H = HessianOperator(model, F.cross_entropy, batches)
    say(f"      probe set: {H.num_examples} training examples in {len(batches)} batches; "
        f"{H.dim:,} parameters; float64; mode={H.mode}; graphs kept for {H.num_cached_batches}/{len(batches)} batches")

    timings = {}
    t = time.perf_counter()
    say("[2/5] top-5 eigenvalues (Lanczos, full reorthogonalization) ...")
    top = eigenvalues(H, 5, which="largest", generator=g)
    timings["top5_s"] = time.perf_counter() - t
    t = time.perf_counter()
    say("[3/5] smallest eigenvalue ...")
    bottom = eigenvalues(H, 1, which="smallest", generator=g)
    timings["lambda_min_s"] = time.perf_counter() - t
    t = time.perf_counter()
    say("[4/5] trace (Hutch++, 99 products) ...")
    tr = hutchpp(H, 99, generator=g)
    timings["trace_s"] = time.perf_counter() - t
    t = time.perf_counter()
    say("[5/5] spectral density (SLQ, 10 runs × 80 steps) ...")
    spec = spectral_density(H, runs=10, steps=80, generator=g)
    timings["density_s"] = time.perf_counter() - t
    neg, neg_err = spec.negative_mass()
    frac, frac_err = spec.negative_fraction()
    png = plot_density(spec, out_dir / "density.png", title=f"Hessian spectral density, digits MLP ({H.dim:,} parameters)")

    summary = {
        "parameters": H.dim,
        "probe_examples": H.num_examples,
        "top_eigenvalues": top.eigenvalues.tolist(),
        "top_residuals": top.residuals.tolist(),
        "lambda_min": float(bottom.eigenvalues[0]),
        "trace": tr.trace,
        "trace_stderr": tr.trace_stderr,
        "negative_mass": neg,
        "negative_mass_stderr": neg_err,
        "negative_fraction": frac,
        "negative_fraction_stderr": frac_err,
        "sigma": spec.sigma,
        "num_matvecs": top.num_matvecs + bottom.num_matvecs + tr.num_matvecs + spec.num_matvecs,
        "timings_s": timings,
        "total_s": time.perf_counter() - t0,
        "density_png": str(png),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out_dir / "summary.json")

    say("")
    say("Hessian of the mean cross-entropy over the probe set")
    say(f"  λ_max .............. {top.eigenvalues[0]:.6g}   (residual {top.residuals[0]:.1e}, {top.num_steps} Lanczos steps)")
    say("  top-5 .............. " + ", ".join(f"{v:.5g}" for v in top.eigenvalues.tolist()))
    say(f"  λ_min .............. {bottom.eigenvalues[0]:.6g}   (residual {bottom.residuals[0]:.1e})")
    say(f"  |λ_min|/λ_max ...... {abs(float(bottom.eigenvalues[0])) / float(top.eigenvalues[0]):.3g}")
    say(f"  trace .............. {tr.trace:.6g} ± {tr.trace_stderr:.2g} (1 s.e., Hutch++, {tr.num_matvecs} products)")
    say(f"  negative mass ...... {neg:.3g} ± {neg_err:.2g}   (tr(H₋)/tr|H|)")
    say(f"  eigenvalues < −1e-3·λ_max: {frac:.3g} ± {frac_err:.2g} of the spectrum (≈ {frac * H.dim:.0f} of {H.dim:,})")
    say(f"  Hessian-vector products: {summary['num_matvecs']}, total time {summary['total_s']:.1f} s")
    say(f"  density plot ....... {png}")
    say(f"  summary ............ {out_dir / 'summary.json'}")
    return summary
