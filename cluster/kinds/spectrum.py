"""``spectrum``: the Hessian's spectral density by stochastic Lanczos quadrature
(:func:`probe.slq.spectral_density`), with its Ritz values and weights per run.

``deflate: auto`` (the default; or ``k``) runs :func:`probe.slq_deflated.deflated_spectral_density`:
the largest eigenvalues a first Lanczos pass has converged enter every run as exact point
masses (weight 1/dim each, inside ``ritz_values``/``ritz_weights``), and SLQ samples only the rest
(``deflate: 0`` is plain SLQ, :func:`probe.slq.spectral_density`). ``auto`` is the default because it
reached the density targets of the time-to-accuracy benchmark (bench/bench_peers.py, docs/benchmarks.md)
with the fewest products;
``num_matvecs`` counts the first pass, ``estimator`` says which ran (``slq`` | ``deflated-slq``) and
``deflated`` how many eigenvalues entered as point masses."""

from __future__ import annotations

import json
import sys
from typing import Any

import pyarrow as pa
import torch

from cluster.kinds.base import BASIS_CHECK, F64, LIST, LIST2, Headline, Kind, Sizes, Working, is_int, is_num, num, vec
from cluster.runners import ProbeContext, basis_store, join_notes, measure_symmetry
from probe.slq import SpectrumResult, spectral_density
from probe.slq_deflated import default_first_steps, deflated_spectral_density

OPTIONS = {
    "runs": 10,
    "steps": 80,
    "sigma": None,
    "reorth": "full",
    "grid_points": 1000,
    "basis": "device",
    "basis_memory_bytes": None,
    "deflate": "auto",  # fewest products to the density targets in bench/bench_peers.py
}

CHECKS = {
    "runs": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "steps": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "sigma": (lambda v: v is None or (is_num(v) and v > 0), "a positive number (eigenvalue units) or null"),
    "reorth": (lambda v: v in ("full", "selective", "none"), "'full', 'selective' or 'none'"),
    "grid_points": (lambda v: is_int(v) and v >= 2, "an integer of at least 2"),
    "basis": BASIS_CHECK,
    "basis_memory_bytes": (
        lambda v: v is None or (is_int(v) and v > 0),
        "a positive integer (bytes) or null; above it SLQ falls back to reorth none",
    ),
    "deflate": (
        lambda v: v == "auto" or (is_int(v) and v >= 0),
        "0 (plain SLQ), a positive integer (how many of the largest eigenvalues to deflate exactly) or 'auto'",
    ),
}

COLUMNS = (
    pa.field("grid", LIST),
    pa.field("density", LIST),
    pa.field("density_stderr", LIST),
    pa.field("ritz_values", LIST2),
    pa.field("ritz_weights", LIST2),
    pa.field("sigma", F64),
    pa.field("reorth", pa.string()),
    pa.field("lambda_min", F64),
    pa.field("lambda_max", F64),
    pa.field("negative_mass", F64),
    pa.field("negative_mass_stderr", F64),
    pa.field("orthogonality_loss", LIST),
    pa.field("breakdown", pa.list_(pa.bool_())),
    pa.field("num_matvecs", pa.int64()),
    pa.field("estimator", pa.string()),  # slq | deflated-slq
    pa.field("deflated", pa.int64()),  # eigenvalues entered as exact point masses (0: plain SLQ)
    pa.field("basis_storage", pa.string()),  # device | host | disk | none (reorth none keeps no basis)
    pa.field("note", pa.string()),  # e.g. the fallback to reorth none under basis_memory_bytes
    pa.field("symmetry_defect", F64),  # |uᵀHv − vᵀHu|/|uᵀHv| (probe.symmetry); null: not measured
)


def run(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    """The Hessian's spectral density by SLQ, its Ritz values and weights and its negative mass."""
    op = ctx.operator()
    sym = measure_symmetry(op, o, g)
    deflate = o.get("deflate", 0)
    deflated = ""
    with basis_store(ctx, o) as basis:
        budget = o.get("basis_memory_bytes")
        common: dict[str, Any] = dict(
            runs=o["runs"],
            steps=o["steps"],
            sigma=o["sigma"],
            reorth=o["reorth"],
            grid_points=o["grid_points"],
            generator=g,
            basis=basis,
            basis_memory_bytes=budget,
        )
        if deflate:
            d = deflated_spectral_density(op, k=deflate, **common)
            deflated = (
                f"deflate={deflate}: the {d.k} largest eigenvalues entered as exact point masses "
                f"(first Lanczos pass: {d.first_pass_matvecs} products)"
            )
            r: SpectrumResult = d
            k = d.k
        else:
            r, k = spectral_density(op, **common), 0
    neg, neg_err = r.negative_mass()
    return {
        "basis_storage": r.basis_storage,
        "note": join_notes(r.note, sym.note, deflated),
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
        "num_matvecs": r.num_matvecs + sym.num_matvecs,
        "estimator": "deflated-slq" if deflate else "slq",
        "deflated": k,
        "symmetry_defect": sym.defect,
    }


def slq_vectors(o: dict, s: Sizes) -> Working:
    """``runs × (steps+1)`` basis vectors (none with ``reorth: none``, or where ``basis_memory_bytes``
    makes SLQ drop them), 4 recurrence vectors per run and products of ``runs`` columns. With
    ``deflate``, the first pass's basis (one run of ``default_first_steps + 1`` vectors, held before
    the SLQ runs' in the same store and at any ``reorth``) and the deflated vectors on the device
    (for ``auto`` as many as the first pass has steps: an upper bound, since how many converge is
    known only after the first pass)."""
    runs, steps = o.get("runs", 10), o.get("steps", 80)
    device = 4 * runs * s.local * s.bv + s.product(runs)
    deflate = o.get("deflate", 0)
    first = 0  # the first pass's basis vectors, spread over the runs' slots
    if deflate:
        auto = deflate == "auto"
        first_steps = default_first_steps(s.dim, steps, 0 if auto else deflate)
        device += (first_steps if auto else deflate) * s.local * s.bv
        first = -(-(first_steps + 1) // runs)
    if o.get("reorth", "full") == "none":
        return Working(runs, first, device)
    budget = o.get("basis_memory_bytes")
    if budget is not None and runs * (steps + 1) * s.local * s.bv > budget:
        return Working(runs, first, device)  # SLQ falls back to reorth none
    return Working(runs, max(steps + 1, first), device)


def spectrum_from_row(row: dict) -> SpectrumResult | None:
    """The SLQ result of a ``spectrum`` row; None when the row holds no Ritz values and weights."""
    values = [vec(v) for v in row.get("ritz_values") or [] if v]
    weights = [vec(w) for w in row.get("ritz_weights") or [] if w]
    if not values or len(values) != len(weights):
        return None
    config = json.loads(row.get("probe_config") or "{}")
    grid = vec(row["grid"])
    return SpectrumResult(
        ritz_values=values,
        ritz_weights=weights,
        grid=grid,
        density=vec(row["density"]),
        density_stderr=vec(row.get("density_stderr") or [None] * len(grid)),
        sigma=num(row.get("sigma")),
        runs=len(values),
        steps=int(config.get("steps") or max(len(v) for v in values)),
        reorth=str(row.get("reorth") or config.get("reorth") or "?"),
        num_matvecs=int(row.get("num_matvecs") or 0),
        orthogonality_loss=vec(row.get("orthogonality_loss")),
        breakdown=torch.tensor([bool(b) for b in row.get("breakdown") or []], dtype=torch.bool),
        dim=0,  # not stored
    )


def products(o: dict) -> int:
    """``runs · steps``, plus the deflation's first pass (at most :func:`default_first_steps`)."""
    steps, deflate = int(o["steps"]), o["deflate"]
    first = 0 if not deflate else default_first_steps(sys.maxsize, steps, 0 if deflate == "auto" else int(deflate))
    return int(o["runs"]) * steps + first


KIND = Kind(
    name="spectrum",
    options=OPTIONS,
    checks=CHECKS,
    columns=COLUMNS,
    run=run,
    vectors=slq_vectors,
    read=spectrum_from_row,
    headline=Headline(finite=("lambda_min", "lambda_max")),
    pipeline=True,
    uses_hessian=True,
    products=products,
)
