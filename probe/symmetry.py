"""The symmetry defect of an operator: the accuracy its products actually attain.

An exact Hessian is symmetric, so for any ``u, v``: ``uᵀHv = vᵀHu``. A computed
operator is symmetric only up to the rounding of the arithmetic that produced its
products. In float64 that is near the unit roundoff; but code that computes parts
of a float64 model in lower precision (Hugging Face Llama-family models run RMSNorm
and the rotary embeddings in float32 whatever the model's dtype) leaves the
operator symmetric only to about float32's level, ~1e-8–1e-7 relative, and no
estimator built on it can be more accurate than that.

:func:`symmetry_defect` measures it with two products on Gaussian ``u, v``:

    defect = |uᵀHv − vᵀHu| / max(|uᵀHv|, tiny)

The inner products are formed in float64 and reduced over shards (``inner``), so
the measurement itself adds no rounding of the operator's dtype, and a sharded
operator (vectors split over workers) gives the value a single process would.

Rule for the warning: the defect of an operator computed entirely in its dtype is
a small multiple of the unit roundoff ``u`` (``eps/2``), independent of the
dimension to first order (the error of ``Hv`` and ``Hv`` itself meet ``u`` alike,
so the ``√dim`` of the dot product cancels in the ratio). It is flagged as
*far above rounding* when ``defect > 1e4 · u`` (``WARN_FACTOR``): ``1e3 · u``
leaves room for the amplification of rounding through a deep network's backward
passes, and a further factor 10 for ``|uᵀHv|`` falling below its typical size
(``uᵀHv`` is a Gaussian-like variable: |·| < 0.1 of its scale with probability
~8%). In float64 the bound is 1.1e-12, four orders of magnitude below what a
float32 computation inside the model produces; in float32 it is 6e-4.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from probe.operators import CurvatureOperator, inner

__all__ = ["SymmetryDefect", "SymmetryWarning", "symmetry_defect", "unit_roundoff", "WARN_FACTOR"]

WARN_FACTOR = 1e4  # warn above WARN_FACTOR × unit roundoff (see the module docstring)


class SymmetryWarning(UserWarning):
    """An operator far less symmetric than its dtype's rounding allows."""


def unit_roundoff(dtype: torch.dtype) -> float:
    """``eps/2`` of a floating dtype: 1.1e-16 (float64), 6.0e-8 (float32), 3.9e-3 (bfloat16)."""
    return torch.finfo(dtype).eps / 2


@dataclass(frozen=True)
class SymmetryDefect:
    """One measurement of an operator's symmetry.

    Attributes:
        defect: ``|uᵀHv − vᵀHu| / max(|uᵀHv|, tiny)`` (NaN when a product is not finite).
        uhv, vhu: the two inner products (float64).
        num_matvecs: operator products spent (2).
        unit_roundoff: ``eps/2`` of the operator's dtype.
        dtype: the operator's dtype, e.g. ``"float64"``.
        threshold: ``WARN_FACTOR × unit_roundoff``; above it the defect is not rounding.
    """

    defect: float
    uhv: float
    vhu: float
    num_matvecs: int
    unit_roundoff: float
    dtype: str
    threshold: float

    @property
    def exceeds(self) -> bool:
        """True when the defect is far above the dtype's rounding (or not finite)."""
        return not (self.defect <= self.threshold)

    @property
    def note(self) -> str:
        """What the defect means for the results; empty when it is at the level of rounding."""
        if not self.exceeds:
            return ""
        if not math.isfinite(self.defect):
            return (
                f"operator symmetry could not be measured (uᵀHv={self.uhv:.3g}, vᵀHu={self.vhu:.3g}): its "
                "products are not finite"
            )
        return (
            f"operator symmetric only to {self.defect:.1e} ({self.dtype} rounding {self.unit_roundoff:.1e}): parts "
            "of the model compute in lower precision (e.g. Hugging Face RMSNorm/rotary embeddings in float32) or "
            "its kernels are not deterministic; eigenvalues and other estimates are exact only to about that "
            "relative level"
        )


def symmetry_defect(
    op: CurvatureOperator, generator: torch.Generator | None = None, *, warn: bool = True
) -> SymmetryDefect:
    """Measure how symmetric ``op`` is, with two products on Gaussian vectors.

    ``u, v`` are drawn by ``op.random_vectors`` (whole vectors from ``generator``,
    then this process's shard), applied in one ``matmat`` of two columns, and the
    inner products reduced over shards: every worker of a sharded operator gets the
    same record.

    Args:
        op: any operator of this package (``matmat``, ``random_vectors``, ``allreduce``).
        generator: randomness of ``u, v``.
        warn: emit a :class:`SymmetryWarning` (text: :attr:`SymmetryDefect.note`) when
            the defect exceeds ``WARN_FACTOR ×`` the dtype's unit roundoff.

    Returns:
        A :class:`SymmetryDefect`.
    """
    UV = op.random_vectors(2, generator=generator, kind="gaussian")  # (local_dim, 2): columns u, v
    HUV = op.matmat(UV)  # (local_dim, 2): Hu, Hv
    # column 0: uᵀ(Hv), column 1: vᵀ(Hu); one reduction over shards for both
    dots = inner(op, UV.to(torch.float64), HUV.flip(1).to(torch.float64))
    uhv, vhu = float(dots[0]), float(dots[1])
    tiny = torch.finfo(torch.float64).tiny
    defect = abs(uhv - vhu) / max(abs(uhv), tiny) if math.isfinite(uhv) and math.isfinite(vhu) else math.nan
    u = unit_roundoff(op.dtype)
    r = SymmetryDefect(
        defect=defect,
        uhv=uhv,
        vhu=vhu,
        num_matvecs=2,
        unit_roundoff=u,
        dtype=str(op.dtype).removeprefix("torch."),
        threshold=WARN_FACTOR * u,
    )
    if warn and r.exceeds:
        warnings.warn(r.note, SymmetryWarning, stacklevel=2)
    return r
