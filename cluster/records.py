"""Probe records rebuilt from their Parquet rows.

The inverse of the job runners' row writing, for figures (``probe report``) and for
users who want the probe objects back (``SpectrumResult.moment``, ``negative_mass``,
the plot functions) from a results folder::

    rows = ResultStore("results").read("spectrum").to_pylist()
    spectrum_from_row(rows[0]).negative_mass()

Missing optional columns become NaN (numbers) or empty values; nothing is invented.
"""

from __future__ import annotations

import json
import math

import torch

from probe.barrier import BarrierResult
from probe.eos import EosPoint, EosSeries
from probe.slq import SpectrumResult
from probe.surface import SurfaceResult

__all__ = ["floats", "spectrum_from_row", "barrier_from_row", "surface_from_row", "eos_series_from_rows"]


def floats(xs) -> list[float]:
    """A list column as floats, with nulls as NaN."""
    return [math.nan if x is None else float(x) for x in (xs or [])]


def _vec(xs) -> torch.Tensor:
    return torch.tensor(floats(xs), dtype=torch.float64)


def _f(x) -> float:
    return math.nan if x is None else float(x)


def spectrum_from_row(row: dict) -> SpectrumResult | None:
    """The SLQ result of a ``spectrum`` row; None when the row holds no Ritz values and weights."""
    values = [_vec(v) for v in row.get("ritz_values") or [] if v]
    weights = [_vec(w) for w in row.get("ritz_weights") or [] if w]
    if not values or len(values) != len(weights):
        return None
    config = json.loads(row.get("probe_config") or "{}")
    grid = _vec(row["grid"])
    return SpectrumResult(
        ritz_values=values, ritz_weights=weights, grid=grid, density=_vec(row["density"]),
        density_stderr=_vec(row.get("density_stderr") or [None] * len(grid)), sigma=_f(row.get("sigma")),
        runs=len(values), steps=int(config.get("steps") or max(len(v) for v in values)),
        reorth=str(row.get("reorth") or config.get("reorth") or "?"), num_matvecs=int(row.get("num_matvecs") or 0),
        orthogonality_loss=_vec(row.get("orthogonality_loss")),
        breakdown=torch.tensor([bool(b) for b in row.get("breakdown") or []], dtype=torch.bool),
        dim=0,  # not stored
    )


def barrier_from_row(r: dict) -> BarrierResult:
    """The barrier result of one ``barrier`` row (one path, one eval set)."""
    t, loss = _vec(r["t"]), _vec(r["loss"])
    bad = ~torch.isfinite(loss)
    return BarrierResult(
        eval_set=str(r.get("eval_set")), path=str(r.get("path")), mode=str(r.get("mode") or ""),
        num_examples=int(r.get("num_examples") or 0), t=t, loss=loss,
        error=_vec(r.get("error") or [None] * len(t)), loss_a=_f(r.get("loss_a")), loss_b=_f(r.get("loss_b")),
        barrier_height=_f(r.get("barrier_height")), barrier_above_line=_f(r.get("barrier_above_line")),
        path_integral=_f(r.get("path_integral")), integration_rule="",
        argmax_t=float(t[loss.nan_to_num(nan=-math.inf).argmax()]) if len(t) else math.nan,
        error_barrier_height=_f(r.get("error_barrier_height")), num_nonfinite=int(bad.sum()),
        first_nonfinite_t=float(t[bad][0]) if bool(bad.any()) else None,
    )


def surface_from_row(row: dict) -> SurfaceResult:
    """The surface of a ``surface`` row (the loss list is stored alpha-major)."""
    alphas, betas = tuple(floats(row["alpha"])), tuple(floats(row.get("beta")))
    shape = (len(alphas), len(betas)) if betas else (len(alphas),)
    loss = _vec(row["loss"]).reshape(shape)
    return SurfaceResult(
        directions=str(row.get("directions") or "random"), normalization=str(row.get("normalization") or "none"),
        ignore_1d=bool(row.get("ignore_1d")), mode=str(row.get("mode") or ""), alphas=alphas, betas=betas,
        loss=loss, error=_vec(row.get("error") or [None] * loss.numel()).reshape(shape),
        num_evaluations=int(row.get("num_evaluations") or 0), num_nonfinite=int(row.get("num_nonfinite") or 0),
        direction_norms=tuple(floats(row.get("direction_norms"))), direction_cosine=_f(row.get("direction_cosine")),
        eigenvalues=tuple(floats(row.get("eigenvalues"))), note=str(row.get("note") or ""),
    )


def eos_series_from_rows(rows: list[dict]) -> EosSeries:
    """The edge-of-stability series of ``eos`` rows of one job and optimizer, in step order."""
    rows = sorted(rows, key=lambda r: r.get("step") or 0)
    optimizer, momentum = str(rows[0].get("optimizer") or "gd"), _f(rows[0].get("momentum") or 0.0)
    points = tuple(
        EosPoint(step=int(r.get("step") or 0), lr=_f(r.get("lr")), optimizer=optimizer, momentum=momentum,
                 lambda_max=_f(r.get("lambda_max")), threshold=_f(r.get("threshold")), ratio=_f(r.get("ratio")),
                 num_matvecs=int(r.get("num_matvecs") or 0), residual=_f(r.get("residual")),
                 converged=bool(r.get("converged")), warm_started=bool(r.get("warm_started")),
                 sharpness="preconditioned" if optimizer == "adam" else "hessian", note=str(r.get("note") or ""))
        for r in rows
    )
    return EosSeries(points, optimizer, momentum)
