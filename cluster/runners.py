"""One function per probe kind: operator and options in, plain record out.

Each runner calls a :mod:`probe` estimator and turns its frozen result into a dict
of scalars and lists (what goes back to the driver and into Parquet). Runners
run identically on every worker of a group; the driver keeps rank 0's record.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from probe.eigen import eigenvalues
from probe.operators import CurvatureOperator
from probe.slq import spectral_density
from probe.trace import trace

__all__ = ["RUNNERS", "run_probe"]


def _eigenvalues(op: CurvatureOperator, o: dict, g: torch.Generator) -> dict:
    r = eigenvalues(op, o["k"], which=o["which"], tol=o["tol"], max_steps=o["max_steps"], generator=g)
    return {
        "which": r.which,
        "eigenvalues": r.eigenvalues.tolist(),
        "residuals": r.residuals.tolist(),
        "converged": r.converged,
        "num_steps": r.num_steps,
        "orthogonality_loss": r.orthogonality_loss,
        "num_matvecs": r.num_matvecs,
    }


def _trace(op: CurvatureOperator, o: dict, g: torch.Generator) -> dict:
    r = trace(op, method=o["method"], num_matvecs=o["matvecs"], generator=g)
    return {"method": r.method, "trace": r.trace, "trace_stderr": r.trace_stderr, "num_matvecs": r.num_matvecs}


def _spectrum(op: CurvatureOperator, o: dict, g: torch.Generator) -> dict:
    r = spectral_density(
        op, runs=o["runs"], steps=o["steps"], sigma=o["sigma"], reorth=o["reorth"], grid_points=o["grid_points"], generator=g
    )
    neg, neg_err = r.negative_mass()
    return {
        "grid": r.grid.tolist(),
        "density": r.density.tolist(),
        "density_stderr": r.density_stderr.tolist(),
        "ritz_values": [v.tolist() for v in r.ritz_values],
        "ritz_weights": [w.tolist() for w in r.ritz_weights],
        "sigma": r.sigma,
        "reorth": r.reorth,
        "lambda_min": r.lambda_min,
        "lambda_max": r.lambda_max,
        "negative_mass": neg,
        "negative_mass_stderr": neg_err,
        "orthogonality_loss": [float(x) for x in r.orthogonality_loss],
        "breakdown": [bool(x) for x in r.breakdown],
        "num_matvecs": r.num_matvecs,
    }


RUNNERS: dict[str, Callable[[CurvatureOperator, dict, torch.Generator], dict]] = {
    "eigenvalues": _eigenvalues,
    "trace": _trace,
    "spectrum": _spectrum,
}


def run_probe(kind: str, op: CurvatureOperator, options: dict[str, Any], seed: int) -> dict:
    """Run probe ``kind`` on ``op`` with resolved ``options`` and randomness from ``seed``.

    Raises:
        ValueError: for a kind without a runner.
    """
    if kind not in RUNNERS:
        raise ValueError(f"no runner for probe kind {kind!r}; available: {', '.join(RUNNERS)}")
    return RUNNERS[kind](op, options, torch.Generator().manual_seed(seed))
