"""Trace estimators: Hutchinson and Hutch++, each with a standard error.

Hutchinson (1989): for Rademacher ``z``, ``E[zᵀAz] = tr(A)`` with variance
``2(‖A‖_F² − Σᵢ Aᵢᵢ²)``; the mean of ``m`` samples has standard error ``s/√m``
with ``s`` the sample standard deviation (reported, never omitted).

Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal stochastic trace
estimation"): spend ``m/3`` products on a sketch ``Q = orth(A S)`` of the top
eigenspace, ``m/3`` on ``tr(QᵀAQ)`` exactly, and ``m/3`` on Hutchinson for the
deflated remainder ``(I−QQᵀ)A(I−QQᵀ)``. When the spectrum decays (as Hessian
spectra do: a few outliers and a bulk near zero) its error falls like ``1/m``
instead of ``1/√m``. Its standard error is the Hutchinson standard error of the
remainder (the sketched part is exact given ``Q``).

XTrace and Krylov-aware Hutch++, which buy more from each product on the same
spectra, live in :mod:`probe.trace_lowrank`; :func:`trace` dispatches to all four.

Orthonormalization is done through the Gram matrix ``allreduce(YᵀY)`` and its
eigendecomposition (twice), so it works unchanged when vectors are sharded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from probe.operators import CurvatureOperator, inner

__all__ = ["TraceResult", "hutchinson", "hutchpp", "trace", "METHODS", "DEFAULT_METHOD"]

METHODS = ("hutchinson", "hutch++", "xtrace", "krylov-hutch++")
DEFAULT_METHOD = "krylov-hutch++"  # smallest worst case to 1% in bench/bench_peers.py (see trace())
DRAW_CHUNK = 16  # probes drawn at a time: memory stays at 16 vectors whatever the budget


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate.

    Attributes:
        method: one of :data:`METHODS`.
        trace: the estimate.
        trace_stderr: its standard error (NaN with fewer than 2 stochastic samples).
        num_matvecs: operator applications spent.
        num_samples: stochastic samples behind the standard error (Hutchinson probes; for
            XTrace its leave-one-out estimates).
        sketch_trace: for the deflating methods, the exact trace on the sketched subspace
            (for XTrace, its mean over the leave-one-out subspaces); 0 for Hutchinson.
    """

    method: str
    trace: float
    trace_stderr: float
    num_matvecs: int
    num_samples: int
    sketch_trace: float = 0.0


def _mean_stderr(samples: Tensor) -> tuple[float, float]:
    m = samples.numel()
    stderr = float(samples.std(unbiased=True) / math.sqrt(m)) if m > 1 else float("nan")
    return float(samples.mean()), stderr


def _check(num_matvecs: int, minimum: int, block_size: int) -> None:
    if num_matvecs < minimum:
        raise ValueError(
            f"num_matvecs must be at least {minimum} for a standard error, got num_matvecs={num_matvecs}; "
            f"raise num_matvecs"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got block_size={block_size}")


def _quadratic_forms(op: CurvatureOperator, count: int, block_size: int, generator, Q: Tensor | None = None) -> Tensor:
    """``zᵢᵀ A zᵢ`` for ``count`` Rademacher probes, drawn and applied ``block_size`` at a time
    (never all in memory at once); with ``Q``, probes are first projected to ``(I − QQᵀ)z``."""
    out = []
    for j in range(0, count, DRAW_CHUNK):  # fixed draw order: the estimate does not depend on block_size
        Z = op.random_vectors(min(DRAW_CHUNK, count - j), generator=generator, kind="rademacher")
        if Q is not None:
            Z.addmm_(Q, op.allreduce(Q.T @ Z), alpha=-1)  # in place: no second draw-sized block
        for b in range(0, Z.shape[1], block_size):
            block = Z[:, b : b + block_size]
            out.append(inner(op, block, op.matmat(block)).to(torch.float64))
    return torch.cat(out)


def hutchinson(
    op: CurvatureOperator,
    num_matvecs: int = 100,
    *,
    generator: torch.Generator | None = None,
    block_size: int = 8,
) -> TraceResult:
    """Hutchinson's trace estimate from ``num_matvecs`` Rademacher probes.

    Args:
        op: the symmetric operator whose trace is estimated.
        num_matvecs: probes (≥ 2). Default 100: a 10% relative standard error of
            the per-probe spread.
        generator: randomness of the Rademacher probes.
        block_size: probes applied per ``matmat`` (memory vs speed; the estimate
            does not depend on it).

    Raises:
        ValueError: for ``num_matvecs < 2`` or ``block_size < 1``.
    """
    _check(num_matvecs, 2, block_size)
    est, stderr = _mean_stderr(_quadratic_forms(op, num_matvecs, block_size, generator))
    return TraceResult("hutchinson", est, stderr, num_matvecs, num_matvecs)


def _orthonormalize(op: CurvatureOperator, Y: Tensor) -> Tensor:
    """Orthonormal basis of the column span of ``Y`` (shards reduced), rank-revealing."""
    for _ in range(2):
        gram = op.allreduce(Y.T @ Y).to(torch.float64)
        s, U = torch.linalg.eigh(gram)
        keep = s > s.max().clamp_min(0) * 1e3 * torch.finfo(Y.dtype).eps  # drop numerically dependent directions
        if not bool(keep.any()):
            return Y[:, :0]
        Y = Y @ (U[:, keep] / s[keep].sqrt()).to(Y.dtype)
    return Y


def hutchpp(
    op: CurvatureOperator,
    num_matvecs: int = 102,
    *,
    generator: torch.Generator | None = None,
    block_size: int = 8,
) -> TraceResult:
    """Hutch++ trace estimate within a budget of ``num_matvecs`` products.

    The budget is split in thirds: ``s = num_matvecs // 3`` sketch vectors,
    ``s`` products for the exact sketched trace, and the rest (≥ 2) for Hutchinson
    on the deflated remainder.

    Raises:
        ValueError: for ``num_matvecs < 6`` or ``block_size < 1``.
    """
    _check(num_matvecs, 6, block_size)
    s = min(num_matvecs // 3, op.dim)
    S = op.random_vectors(s, generator=generator, kind="rademacher")
    Q = _orthonormalize(op, torch.cat([op.matmat(S[:, j : j + block_size]) for j in range(0, s, block_size)], 1))
    AQ = torch.cat([op.matmat(Q[:, j : j + block_size]) for j in range(0, Q.shape[1], block_size)], 1)
    sketch = float(inner(op, Q, AQ).sum()) if Q.shape[1] else 0.0
    g = num_matvecs - s - Q.shape[1]
    rest, stderr = _mean_stderr(_quadratic_forms(op, g, block_size, generator, Q))  # on (I − QQᵀ) G
    return TraceResult("hutch++", sketch + rest, stderr, s + Q.shape[1] + g, g, sketch)


def trace(op: CurvatureOperator, *, method: str = DEFAULT_METHOD, num_matvecs: int = 102, **kwargs) -> TraceResult:
    """Trace by ``method``: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"``
    (:func:`probe.trace_lowrank.xtrace`) or ``"krylov-hutch++"`` (the default,
    :func:`probe.trace_lowrank.krylov_hutchpp`); ``kwargs`` go to the estimator.

    The default has the smallest worst case in ``bench/bench_peers.py``: products to 1% of the
    exact trace from three seeds were 36, 50 and 50 on the digits MLP, the digits CNN and the
    1.1M-parameter MLP (XTrace: 50, 237, 16; Hutch++: 140, 100, 50; docs/benchmarks.md). XTrace
    wins where a few test vectors capture the spectrum, as on the wide MLP.

    Raises:
        ValueError: for an unknown ``method``, or as the chosen estimator.
    """
    if method == "hutchinson":
        return hutchinson(op, num_matvecs, **kwargs)
    if method == "hutch++":
        return hutchpp(op, num_matvecs, **kwargs)
    if method in ("xtrace", "krylov-hutch++"):
        from probe.trace_lowrank import krylov_hutchpp, xtrace  # imports this module: loaded on first use

        return (xtrace if method == "xtrace" else krylov_hutchpp)(op, num_matvecs, **kwargs)
    raise ValueError(f"method must be one of {METHODS}, got method={method!r}")
