"""``trace``: the Hessian's trace with its standard error, by Hutchinson, Hutch++, XTrace or Krylov-aware
Hutch++ (:func:`probe.trace.trace`). The default, Krylov-aware Hutch++, is the estimator with the smallest
worst case to 1% of the exact trace in the time-to-accuracy benchmark (bench/bench_peers.py,
docs/benchmarks.md); each row records the ``method`` and the products spent (``num_matvecs``)."""

from __future__ import annotations

import pyarrow as pa
import torch

from cluster.kinds.base import F64, Gauge, Headline, Kind, Sizes, Working, is_int, no_basis
from cluster.runners import ProbeContext, measure_symmetry
from probe.trace import DEFAULT_METHOD, METHODS, trace

OPTIONS = {"method": DEFAULT_METHOD, "matvecs": 102}

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
    """The Hessian's trace and its standard error by the chosen ``method`` (:func:`probe.trace.trace`)."""
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
    """The working set of ``method`` with ``m`` products: Hutch++ keeps ``s = m/3`` sketch vectors S,
    their orthonormalized image Q and AQ (a list of blocks and its concatenation): 4s vectors;
    XTrace about ``4·m/2``; Krylov-aware Hutch++ its basis of about ``m/2`` (counted twice: the
    blocks and their concatenation while the next block is orthonormalized); Hutchinson a draw
    of 16 probes whatever ``m``; products in blocks of 8."""
    m = o.get("matvecs", 102)
    v = s.local * s.bv
    method = o.get("method", DEFAULT_METHOD)
    if method == "hutch++":
        # S, Q and AQ stay alive to the end; the deflated probes come DRAW_CHUNK at a time,
        # projected in place (counted here as three blocks: a margin) and applied in blocks of 8
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
    if method == "xtrace":  # m/2 test vectors: Ω, Y and the two passes that orthonormalize Y
        k = min(m // 2, s.dim)
        return no_basis(4 * k * v + s.product(min(8, k)))
    if method == "krylov-hutch++":
        # the Krylov basis of k vectors as blocks of b (and their concatenation while the next block
        # is orthonormalized against it, and once more as Q); then a probe draw of c, projected
        sk = max(1, min(m // 2, m - 2))
        b = min(4, max(1, sk // 2), s.dim)
        k = min(sk // b * b, s.dim)
        c = min(16, max(m - k, 1))
        return no_basis(
            max(
                2 * k * v + 2 * b * v + s.product(min(8, b)),
                2 * k * v + 3 * c * v,
                2 * k * v + c * v + s.product(min(8, c)),
            )
        )
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
    products=lambda o: int(o["matvecs"]),
)
