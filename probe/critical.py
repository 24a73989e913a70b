"""What kind of critical point a checkpoint sits at: near-minimum, saddle, or not critical.

Dauphin et al. (2014) separate minima from saddles by the negative part of the
Hessian's spectrum at points where the gradient (nearly) vanishes. The record holds
every input of the decision and every threshold, and the rule is applied in order:

1. ``not_critical`` when ``‖∇L‖ > grad_norm_threshold``;
2. ``saddle`` when the negative spectral mass ``tr(H₋)/tr|H|`` (SLQ, see
   :meth:`probe.slq.SpectrumResult.negative_mass`) exceeds ``negative_mass_threshold``;
3. ``near_minimum`` otherwise.

λ_min and λ_max (Lanczos) are recorded beside it: a trained network's Hessian almost
always has some small negative eigenvalues (Sagun et al. 2017), so the decision uses
the mass of the negative part, not the sign of λ_min. Both thresholds are absolute
and model dependent; the defaults (``1e-3`` and ``0.01``) are conventions to adjust,
not results from a paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from probe.eigen import eigenvalues
from probe.operators import CurvatureOperator
from probe.slq import spectral_density

__all__ = ["CriticalPointResult", "classify_critical_point", "LABELS", "RULE"]

LABELS = ("near_minimum", "saddle", "not_critical")
RULE = (
    "not_critical if grad_norm > grad_norm_threshold; else saddle if negative_mass > "
    "negative_mass_threshold; else near_minimum"
)


@dataclass(frozen=True)
class CriticalPointResult:
    """The classification and everything it rests on.

    Attributes:
        label: one of :data:`LABELS`.
        grad_norm: ‖∇L‖ of the mean loss over the probe set.
        lambda_min, lambda_max: extreme Hessian eigenvalues (Lanczos).
        negative_mass, negative_mass_stderr: ``tr(H₋)/tr|H|`` by SLQ and its standard error.
        grad_norm_threshold, negative_mass_threshold: the thresholds applied.
        rule: the rule, as text.
        num_matvecs: operator products spent.
        note: Lanczos convergence trouble, or ``""``.
    """

    label: str
    grad_norm: float
    lambda_min: float
    lambda_max: float
    negative_mass: float
    negative_mass_stderr: float
    grad_norm_threshold: float
    negative_mass_threshold: float
    rule: str
    num_matvecs: int
    note: str = ""


def _threshold(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {name}={value!r}")
    return float(value)


def classify_critical_point(
    op: CurvatureOperator,
    gradient: Tensor | float,
    *,
    grad_norm_threshold: float = 1e-3,
    negative_mass_threshold: float = 0.01,
    runs: int = 10,
    steps: int = 80,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> CriticalPointResult:
    """Classify the point at which ``op`` (its Hessian) and ``gradient`` were taken.

    Args:
        op: the Hessian at θ.
        gradient: ∇L(θ) (a flat tensor) or its norm, of the same loss as ``op``: in the same
            mode (``"eval"`` or ``"train"``: batch statistics and live dropout) and over the
            same probe set, else the label compares the gradient of one function with the
            curvature of another.
        grad_norm_threshold, negative_mass_threshold: see the module docstring.
        runs, steps: SLQ configuration for the negative mass (defaults as :func:`spectral_density`).
        tol: Lanczos tolerance for λ_min and λ_max.
        generator: randomness of the Lanczos start vectors and SLQ probes.

    Raises:
        ValueError: for a negative or non-finite threshold.
    """
    g_thr = _threshold("grad_norm_threshold", grad_norm_threshold)
    m_thr = _threshold("negative_mass_threshold", negative_mass_threshold)
    grad_norm = float(gradient.to(torch.float64).norm()) if isinstance(gradient, Tensor) else float(gradient)
    top = eigenvalues(op, 1, which="largest", tol=tol, generator=generator)
    bottom = eigenvalues(op, 1, which="smallest", tol=tol, generator=generator)
    spec = spectral_density(op, runs=runs, steps=steps, generator=generator)
    mass, mass_se = spec.negative_mass()
    if not grad_norm <= g_thr:
        label = "not_critical"
    elif mass > m_thr:
        label = "saddle"
    else:
        label = "near_minimum"
    notes = [n for n in (top.note, bottom.note) if n]
    return CriticalPointResult(
        label=label,
        grad_norm=grad_norm,
        lambda_min=float(bottom.eigenvalues[0]),
        lambda_max=float(top.eigenvalues[0]),
        negative_mass=mass,
        negative_mass_stderr=mass_se,
        grad_norm_threshold=g_thr,
        negative_mass_threshold=m_thr,
        rule=RULE,
        num_matvecs=top.num_matvecs + bottom.num_matvecs + spec.num_matvecs,
        note="; ".join(notes),
    )
