"""``eigenvalues``: extreme eigenvalues of the Hessian by Lanczos (:func:`probe.eigen.eigenvalues`).

Options ``k``, ``which`` (largest | smallest), ``tol``, ``max_steps``, ``reorth`` (full |
selective), ``basis`` (device | host | disk) and ``basis_memory_bytes``; one row per task.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from cluster.kinds.base import BASIS_CHECK, F64, LIST, Headline, Kind, Sizes, Working, is_int, is_num
from cluster.runners import ProbeContext, basis_store, join_notes, measure_symmetry
from probe.eigen import default_max_steps, eigenvalues

OPTIONS = {
    "k": 5,
    "which": "largest",
    "tol": 1e-6,
    "max_steps": None,
    "reorth": "full",
    "basis": "device",
    "basis_memory_bytes": None,
}

CHECKS = {
    "k": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "which": (lambda v: v in ("largest", "smallest"), "'largest' or 'smallest'"),
    "tol": (lambda v: is_num(v) and v > 0, "a positive number"),
    "max_steps": (lambda v: v is None or (is_int(v) and v >= 1), "a positive integer or null"),
    "reorth": (lambda v: v in ("full", "selective"), "'full' or 'selective'"),
    "basis": BASIS_CHECK,
    "basis_memory_bytes": (lambda v: v is None or (is_int(v) and v > 0), "a positive integer (bytes) or null"),
}

COLUMNS = (
    pa.field("which", pa.string()),
    pa.field("eigenvalues", LIST),
    pa.field("residuals", LIST),
    pa.field("converged", pa.bool_()),
    pa.field("num_steps", pa.int64()),
    pa.field("orthogonality_loss", F64),
    pa.field("num_matvecs", pa.int64()),
    pa.field("note", pa.string()),
    pa.field("basis_storage", pa.string()),  # device | host | disk | none
    pa.field("symmetry_defect", F64),  # |uᵀHv − vᵀHu|/|uᵀHv| (probe.symmetry); null: not measured
)


def run(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    """The ``k`` largest or smallest Hessian eigenvalues by Lanczos, with residuals and convergence."""
    op = ctx.operator()
    sym = measure_symmetry(op, o, g)
    with basis_store(ctx, o) as basis:
        r = eigenvalues(
            op,
            o["k"],
            which=o["which"],
            tol=o["tol"],
            max_steps=o["max_steps"],
            generator=g,
            basis=basis,
            basis_memory_bytes=o.get("basis_memory_bytes"),
            reorth=o.get("reorth", "full"),
        )
    return {
        "basis_storage": r.basis_storage,
        "which": r.which,
        "eigenvalues": r.eigenvalues.tolist(),
        "residuals": r.residuals.tolist(),
        "converged": r.converged,
        "num_steps": r.num_steps,
        "orthogonality_loss": r.orthogonality_loss,
        "num_matvecs": r.num_matvecs + sym.num_matvecs,
        "note": join_notes(r.note, sym.note),
        "symmetry_defect": sym.defect,
    }


def vectors(o: dict, s: Sizes) -> Working:
    """``m+1`` basis vectors, ``m = max_steps`` or ``min(D, max(20k, 100))`` (probe.eigen's cap), lowered
    to what ``basis_memory_bytes`` holds; the recurrence's 4 vectors and single-column products."""
    k = o.get("k", 1)
    m = o.get("max_steps") or min(s.dim, default_max_steps(k))
    budget = o.get("basis_memory_bytes")
    if budget is not None:
        m = max(min(m, budget // max(1, s.local * s.bv) - 1), k)
    return Working(1, m + 1, 4 * s.local * s.bv + s.product(1))


def lambda_max(row: dict) -> float | None:
    """The first eigenvalue of a ``which: largest`` row (λ_max), else None."""
    if row.get("which") == "largest" and row.get("eigenvalues"):
        return row["eigenvalues"][0]
    return None


def products(o: dict) -> int:
    """The Lanczos step cap: ``max_steps``, else :func:`probe.eigen.eigenvalues`' ``max(20k, 100)``."""
    return int(o["max_steps"] or default_max_steps(int(o["k"])))


KIND = Kind(
    name="eigenvalues",
    options=OPTIONS,
    checks=CHECKS,
    columns=COLUMNS,
    run=run,
    vectors=vectors,
    headline=Headline(finite=("eigenvalues",), lambda_max=lambda_max, lambda_max_priority=3),
    pipeline=True,
    uses_hessian=True,
    products=products,
)
