"""``trace``: the Hessian's trace with its standard error, by Hutchinson, Hutch++, XTrace or Krylov-aware
Hutch++ (:func:`probe.trace.trace`; the last two measured 1.3-2.9x lower variance than Hutch++ at equal
products on the digits Hessian, tests/probe/test_trace_estimators.py; the default stays Hutch++ until the
time-to-accuracy benchmark decides)."""

from __future__ import annotations

import pyarrow as pa
import torch

from cluster.kinds.base import F64, Gauge, Headline, Kind, Sizes, Working, is_int, no_basis
from cluster.runners import ProbeContext, measure_symmetry
from probe.trace import METHODS, trace

OPTIONS = {"method": "hutch++", "matvecs": 102}

CHECKS = {
    "method": (lambda v: v in METHODS, "one of " + ", ".join(repr(m) for m in METHODS)),
    "matvecs": (lambda v: is_int(v) and v >= 6, "an integer of at least 6"),
}

COLUMNS = (
    pa.field("method", pa.string()),
    pa.field("trace", F64),
    pa.field("trace_stderr", F64),
    pa.field("num_matvecs", pa.int64()),
    pa.field("symmetry_defect", F64),  # |uᵀHv − vᵀHu|/|uᵀHv| (probe.symmetry); null: not measured
)


def run(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    """The Hessian's trace and its standard error by Hutchinson or Hutch++."""
    op = ctx.operator()
    sym = measure_symmetry(op, o, g)
    r = trace(op, method=o["method"], num_matvecs=o["matvecs"], generator=g)
    return {
        "method": r.method,
        "trace": r.trace,
        "trace_stderr": r.trace_stderr,
        "num_matvecs": r.num_matvecs + sym.num_matvecs,
        "symmetry_defect": sym.defect,
    }


def vectors(o: dict, s: Sizes) -> Working:
    """Hutch++ with ``m`` products keeps ``s = m/3`` sketch vectors S, their orthonormalized image Q
    and AQ (a list of blocks and its concatenation): 4s vectors; Hutchinson a draw of 16 probes and
    its projection; products in blocks of 8."""
    m = o.get("matvecs", 102)
    v = s.local * s.bv
    if o.get("method", "hutch++") == "hutch++":
        # S, Q and AQ stay alive to the end; the deflated probes come DRAW_CHUNK at a time,
        # projected (Z − Q(QᵀZ): three blocks at once) and applied in blocks of 8
        sk = min(m // 3, s.dim)
        c = min(16, max(m - 2 * sk, 1))
        return no_basis(
            max(
                4 * sk * v,
                3 * sk * v + 3 * c * v,
                3 * sk * v + s.product(min(8, sk)),
                3 * sk * v + c * v + s.product(min(8, c)),
            )
        )
    if o.get("method") == "xtrace":  # m/2 test vectors: Ω, Y and the two passes that orthonormalize Y
        k = min(m // 2, s.dim)
        return no_basis(4 * k * v + s.product(min(8, k)))
    if o.get("method") == "krylov-hutch++":  # the Krylov basis (half the budget), a block, a probe draw
        k = min(m // 2, s.dim)
        return no_basis((k + 4 + 16) * v + s.product(8))
    c = min(16, m)
    return no_basis(c * v + s.product(min(8, c)))


def gauges(row: dict) -> list[Gauge]:
    """The ``trace`` gauge."""
    return [Gauge("trace", row["trace"])]


KIND = Kind(
    name="trace",
    options=OPTIONS,
    checks=CHECKS,
    columns=COLUMNS,
    run=run,
    vectors=vectors,
    headline=Headline(finite=("trace",), gauges=gauges),
    pipeline=True,
    uses_hessian=True,
)
