"""Spectral density by stochastic Lanczos quadrature (SLQ).

The spectral density ``φ(t) = (1/p) Σᵢ δ(t − λᵢ)`` of a ``p × p`` symmetric
matrix is estimated as in Lin, Saad & Yang (2016, "Approximating spectral
densities of large matrices") and Ghorbani, Krishnan & Xiao (2019, "An
investigation into neural net optimization via Hessian eigenvalue density"):
for each of ``runs`` random unit vectors ``v`` (Rademacher), ``m = steps``
Lanczos steps give Ritz values ``θⱼ`` and Gauss weights ``wⱼ`` with
``vᵀf(H)v ≈ Σⱼ wⱼ f(θⱼ)``; since ``E[vᵀf(H)v] = tr f(H)/p`` the average over runs
of ``Σⱼ wⱼ δ(t − θⱼ)`` estimates ``φ``. It is smoothed with a Gaussian of standard
deviation ``sigma`` in eigenvalue units (a standard deviation, not a variance).

Every run advances in the same ``matmat``, so a step costs one pass over the
probe data for all runs. The run-to-run spread of the density is its uncertainty
(``density_stderr``), and the quadrature moments ``Σⱼ wⱼ θⱼ^q`` are unbiased
estimates of ``tr(H^q)/p`` for ``q < 2m``.

Memory: full or selective reorthogonalization keeps ``runs × (steps+1)`` vectors
of ``local_dim`` entries in a :mod:`probe.basis` store (``basis=``). Under a
``basis_memory_bytes`` budget that the store cannot meet, the runs go without
reorthogonalization (:func:`reorth_within_budget`), which costs ghosts but keeps
the moments; the result's ``reorth`` and ``note`` say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from probe.basis import BasisStore, resolve_basis
from probe.lanczos import REORTH_MODES, LanczosResult, lanczos
from probe.operators import CurvatureOperator

__all__ = ["SpectrumResult", "spectral_density", "density_from_ritz", "reorth_within_budget", "SIGMA_FRACTION"]

# Papyan (2020, "Traces of class/cross-class structure pervade deep learning
# spectra", §D.2) smooths with 0.05 on a spectrum rescaled to [-1, 1]; on the raw
# scale that is 0.05 of the half-width of the Ritz range.
SIGMA_FRACTION = 0.05


@dataclass(frozen=True)
class SpectrumResult:
    """SLQ estimate of a spectral density.

    Attributes:
        ritz_values: per run, the ascending Ritz values (float64; runs that broke
            down have fewer than ``steps``).
        ritz_weights: per run, their Gauss quadrature weights (sum to 1).
        grid: ``(grid_points,)`` where the density is evaluated.
        density: ``(grid_points,)`` run average of the smoothed densities (integrates to ≈1).
        density_stderr: ``(grid_points,)`` standard error of ``density`` over runs.
        sigma: Gaussian smoothing width, eigenvalue units.
        runs, steps, reorth: the estimator's configuration.
        num_matvecs: operator applications spent.
        orthogonality_loss: ``(runs,)`` achieved loss of orthogonality (NaN if the basis was not kept).
        breakdown: ``(runs,)`` runs whose Krylov space became invariant (their quadrature is exact).
        dim: dimension of the operator.
        note: why the estimator ran other than asked (reorthogonalization dropped
            to fit ``basis_memory_bytes``, and its effect), or ``""``.
        basis_storage: where the Lanczos basis was kept (``"device"``, ``"host"``,
            ``"disk"``, …), ``"none"`` when it was not kept (``reorth="none"``).
    """

    ritz_values: list[Tensor]
    ritz_weights: list[Tensor]
    grid: Tensor
    density: Tensor
    density_stderr: Tensor
    sigma: float
    runs: int
    steps: int
    reorth: str
    num_matvecs: int
    orthogonality_loss: Tensor
    breakdown: Tensor
    dim: int
    note: str = ""
    basis_storage: str = "device"

    def moment(self, q: int) -> tuple[float, float]:
        """``(estimate, stderr)`` of ``tr(H^q)/p`` from the quadrature (exact per run for q < 2·steps)."""
        return self._per_run(lambda v, w: (w * v**q).sum())

    @property
    def lambda_min(self) -> float:
        """Smallest Ritz value over all runs (an upper bound on λ_min in exact arithmetic)."""
        return float(min(v[0] for v in self.ritz_values))

    @property
    def lambda_max(self) -> float:
        """Largest Ritz value over all runs (a lower bound on λ_max in exact arithmetic)."""
        return float(max(v[-1] for v in self.ritz_values))

    def _per_run(self, f) -> tuple[float, float]:
        per_run = torch.stack([f(v, w) for v, w in zip(self.ritz_values, self.ritz_weights, strict=True)])
        stderr = float(per_run.std(unbiased=True) / math.sqrt(self.runs)) if self.runs > 1 else float("nan")
        return float(per_run.mean()), stderr

    def negative_mass(self) -> tuple[float, float]:
        """``(estimate, stderr)`` of ``tr(H₋)/tr|H|``: the share of the spectrum's absolute mass that is negative.

        ``H₋`` is the negative part of H (eigenvalues ``min(λ, 0)`` negated). It is 0
        at a minimum and grows with the depth and number of descent directions. The
        integrand is a ramp (continuous), so Gauss quadrature converges for it; a plain
        *count* of negative eigenvalues does not (see :meth:`negative_fraction`).
        """
        neg = torch.stack(
            [(w * (-v).clamp_min(0)).sum() for v, w in zip(self.ritz_values, self.ritz_weights, strict=True)]
        )
        tot = torch.stack([(w * v.abs()).sum() for v, w in zip(self.ritz_values, self.ritz_weights, strict=True)])
        # Ratio of the run means (a mean of per-run ratios is biased at order 1/runs),
        # with the delta-method standard error.
        ratio = float(neg.mean() / tot.mean().clamp_min(1e-300))
        if self.runs < 2:
            return ratio, float("nan")
        resid = neg - ratio * tot
        stderr = float(resid.std(unbiased=True) / (math.sqrt(self.runs) * tot.mean().clamp_min(1e-300)))
        return ratio, stderr

    def negative_fraction(self, threshold: float = 1e-3) -> tuple[float, float]:
        """``(estimate, stderr)`` of the fraction of eigenvalues below ``−threshold·max|θ|``.

        Times ``dim`` it estimates the saddle (Morse) index. Counting is resolution
        limited: ``steps`` Ritz values cannot resolve the signs of a bulk of
        eigenvalues clustered around 0 (on a trained digits MLP, counting below 0
        overestimated a true fraction of 0.38 as 0.71), hence the default threshold
        of 1e-3 of the spectral radius.
        """
        scale = max(abs(self.lambda_min), abs(self.lambda_max))
        return self._per_run(lambda v, w: w[v < -threshold * scale].sum())

    def log_abs_density(
        self, *, grid_points: int = 400, sigma: float = 0.1, floor: float = 1e-6
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Density of ``log10|λ|`` split by sign: ``(grid, positive, negative)``.

        Shows the many small eigenvalues that a linear axis hides. Ritz values with
        ``|θ| < floor·max|θ|`` are left out; ``sigma`` is in decades.
        """
        scale = max(abs(self.lambda_min), abs(self.lambda_max))
        cut = floor * scale
        lo, hi = math.log10(cut) - 3 * sigma, math.log10(scale) + 3 * sigma
        grid = torch.linspace(lo, hi, grid_points, dtype=torch.float64)
        pos = torch.zeros_like(grid)
        neg = torch.zeros_like(grid)
        for v, w in zip(self.ritz_values, self.ritz_weights, strict=True):
            keep = v.abs() >= cut
            u, ww, sign = v[keep].abs().log10(), w[keep], v[keep] > 0
            kern = torch.exp(-0.5 * ((grid[:, None] - u[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
            pos += (kern[:, sign] * ww[sign]).sum(1)
            neg += (kern[:, ~sign] * ww[~sign]).sum(1)
        return grid, pos / self.runs, neg / self.runs


def density_from_ritz(values: list[Tensor], weights: list[Tensor], grid: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """Gaussian-smoothed density per run on ``grid``; returns ``(mean, stderr)`` over runs."""
    per_run = []
    for v, w in zip(values, weights, strict=True):
        kern = torch.exp(-0.5 * ((grid[:, None] - v[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        per_run.append(kern @ w)
    stack = torch.stack(per_run)  # (runs, grid_points)
    runs = stack.shape[0]
    stderr = stack.std(dim=0, unbiased=True) / math.sqrt(runs) if runs > 1 else torch.full_like(grid, float("nan"))
    return stack.mean(dim=0), stderr


def spectral_density(
    op: CurvatureOperator,
    *,
    runs: int = 10,
    steps: int = 80,
    sigma: float | None = None,
    reorth: str = "full",
    grid_points: int = 1000,
    generator: torch.Generator | None = None,
    basis: BasisStore | str = "device",
    basis_memory_bytes: int | None = None,
) -> SpectrumResult:
    """Estimate the spectral density of ``op`` by SLQ.

    Args:
        op: the symmetric operator (a Hessian, GGN, or any :class:`CurvatureOperator`).
        runs: random start vectors (≥ 1; ≥ 2 for standard errors). Default 10.
        steps: Lanczos steps per run, in ``[1, dim]``. Default 80: the quadrature
            is then exact for polynomials of degree < 160.
        sigma: smoothing standard deviation in eigenvalue units; default
            ``SIGMA_FRACTION`` (0.05, Papyan 2020 §D.2) of the half-width of the
            Ritz range (``1e-3·max(|λ|, 1)`` when every Ritz value coincides).
        reorth: ``"full"`` (default), ``"selective"`` or ``"none"``; see :mod:`probe.lanczos`.
        grid_points: density evaluation points, spanning the Ritz extremes ± 3σ.
        generator: randomness of the Rademacher start vectors.
        basis: where the Lanczos basis lives: ``"device"`` (default), ``"host"`` or a
            :class:`probe.basis.BasisStore` such as ``cluster.basis.DiskBasis``.
        basis_memory_bytes: the most bytes the store may hold for the basis
            (``store.resident_bytes``: device memory for ``"device"``, host memory for
            ``"host"``, one block for a disk store); default None, no limit. When a
            reorthogonalizing ``reorth`` needs more, the runs use ``reorth="none"``
            and ``note`` says so (see :func:`reorth_within_budget`).

    Raises:
        ValueError: if ``runs < 1``, ``steps`` outside ``[1, dim]``, ``sigma ≤ 0``,
            ``grid_points < 2``, a negative ``basis_memory_bytes`` or an unknown ``basis``.
    """
    check_density_args(op, runs, steps, sigma, grid_points, reorth, basis_memory_bytes)
    store = resolve_basis(basis)
    note = ""
    if basis_memory_bytes is not None:
        required = store.resident_bytes(runs, steps + 1, op.local_dim, op.dtype)
        reorth, note = reorth_within_budget(reorth, required, basis_memory_bytes, store.name)
    start = op.random_vectors(runs, generator=generator, kind="rademacher")
    result = lanczos(op, start, steps, reorth=reorth, basis=store)
    return _density(result, op.dim, steps, sigma, grid_points, note)


def reorth_within_budget(reorth: str, required_bytes: int, budget_bytes: int, storage: str) -> tuple[str, str]:
    """The reorthogonalization SLQ can afford, and a note when it is not the one asked for.

    ``"full"`` and ``"selective"`` keep the basis (``required_bytes`` in the store
    named ``storage``); above ``budget_bytes`` they fall back to ``"none"``. Without
    reorthogonalization Lanczos loses orthogonality as Ritz values converge (Paige
    1971), producing spurious copies ("ghosts") of extreme eigenvalues whose Gauss
    weights are split among the copies. The SLQ moments of low order and the density
    remain accurate: the quadrature is still exact for polynomials of degree
    < 2·steps in exact arithmetic and the ghosts' weights sum to the true weight
    (Golub & Meurant 2010; Ubaru, Chen & Saad 2017, SIAM J. Matrix Anal. Appl. 38(3)).
    Ritz values as eigenvalue estimates and counts of Ritz values are what suffer.

    Returns:
        ``(reorth_used, note)``; ``note`` is ``""`` when ``reorth`` is kept.
    """
    if reorth == "none" or required_bytes <= budget_bytes:
        return reorth, ""
    note = (
        f"reorth={reorth!r} needs {required_bytes} bytes for the Lanczos basis in the {storage} store, above "
        f"basis_memory_bytes={budget_bytes}; ran reorth='none' instead. Without reorthogonalization Lanczos loses "
        "orthogonality as Ritz values converge, producing spurious copies (ghosts) of extreme eigenvalues whose "
        "Gauss weights are split among the copies; low-order moments and the density remain accurate, since the "
        "quadrature is still exact for polynomials of degree < 2*steps in exact arithmetic and the ghosts' weights "
        "sum to the true weight (Golub & Meurant 2010; Ubaru, Chen & Saad 2017). To keep reorthogonalization, raise "
        "basis_memory_bytes or pass basis='host' or a cluster.basis.DiskBasis"
    )
    return "none", note


def check_density_args(op, runs, steps, sigma, grid_points, reorth, basis_memory_bytes) -> None:
    """The argument checks of :func:`spectral_density` (one line each, naming the fix)."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got runs={runs}; use 2 or more for standard errors")
    if not 1 <= steps <= op.dim:
        raise ValueError(f"steps must be in [1, dim={op.dim}], got steps={steps}; choose a step count in that range")
    if sigma is not None and sigma <= 0:
        raise ValueError(f"sigma must be positive (eigenvalue units), got sigma={sigma}")
    if grid_points < 2:
        raise ValueError(f"grid_points must be at least 2, got grid_points={grid_points}")
    if reorth not in REORTH_MODES:
        raise ValueError(f"reorth must be one of {REORTH_MODES}, got reorth={reorth!r}")
    if basis_memory_bytes is not None and basis_memory_bytes < 0:
        raise ValueError(
            f"basis_memory_bytes must be non-negative or None, got basis_memory_bytes={basis_memory_bytes}"
        )


def smoothed_density(
    values: list[Tensor], weights: list[Tensor], sigma: float | None, grid_points: int
) -> tuple[Tensor, Tensor, Tensor, float]:
    """``(grid, density, stderr, sigma)`` of per-run Ritz values and weights smoothed by Gaussians
    of width ``sigma`` (default: ``SIGMA_FRACTION`` of the Ritz half-width) on a grid 3σ past them."""
    lo = min(float(v[0]) for v in values)
    hi = max(float(v[-1]) for v in values)
    if sigma is None:
        half_width = 0.5 * (hi - lo)
        sigma = SIGMA_FRACTION * half_width if half_width > 0 else 1e-3 * max(abs(hi), 1.0)
    grid = torch.linspace(lo - 3 * sigma, hi + 3 * sigma, grid_points, dtype=torch.float64)
    density, stderr = density_from_ritz(values, weights, grid, sigma)
    return grid, density, stderr, float(sigma)


def _density(
    result: LanczosResult, dim: int, steps: int, sigma: float | None, grid_points: int, note: str = ""
) -> SpectrumResult:
    pairs = [result.ritz(r) for r in range(result.num_runs)]
    values = [p.values for p in pairs]
    weights = [p.weights for p in pairs]
    grid, density, stderr, sigma = smoothed_density(values, weights, sigma, grid_points)
    return SpectrumResult(
        ritz_values=values,
        ritz_weights=weights,
        grid=grid,
        density=density,
        density_stderr=stderr,
        sigma=float(sigma),
        runs=result.num_runs,
        steps=steps,
        reorth=result.reorth,
        num_matvecs=result.num_matvecs,
        orthogonality_loss=result.orthogonality_loss,
        breakdown=result.breakdown,
        dim=dim,
        note=note,
        basis_storage=result.basis_storage,
    )
