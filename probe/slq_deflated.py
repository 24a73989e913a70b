"""Deflated stochastic Lanczos quadrature: exact outliers plus SLQ of the bulk.

The Hessians users probe have a few large outlier eigenvalues (about one per
class for C-class cross-entropy, Papyan 2020, "Traces of class/cross-class
structure pervade deep learning spectra") above a wide bulk. The variance of a
Hutchinson-type quadratic form ``vᵀf(H)v`` grows with ``‖f(H)‖_F²``, which the
outliers dominate, so plain SLQ (:func:`probe.slq.spectral_density`) spends most
of its spread on eigenvalues that a single Lanczos pass finds exactly.

:func:`deflated_spectral_density` therefore

1. runs one Lanczos pass (Gaussian start, full reorthogonalization) and keeps the
   Ritz pairs ``(θᵢ, uᵢ)`` at the top of the spectrum (and, with ``negative``, at
   the bottom) whose residual bound ``β_m|s_{m,i}|`` is at most ``tol·|θᵢ|``;
   ``k`` is either given or, with ``"auto"``, the number of leading Ritz values
   that meet the tolerance;
2. puts each ``θᵢ`` into the density as an exact point mass of weight ``1/dim``;
3. runs SLQ on the deflated operator ``P H P`` with ``P = I − U Uᵀ`` (the start
   vectors projected off ``span(U)``, and every product projected again, so the
   recurrence never re-enters it), weighting its quadrature by ``(dim − k)/dim``.

Why it is right: for orthonormal Ritz vectors ``U`` (``UᵀHU = diag θ``),
``tr f(H) = Σᵢ f(θᵢ) + tr_{U⊥} f(PHP)`` up to terms of the order of the residuals
``‖HU − UΘ‖``; for ``f(t) = t`` the identity is exact whatever the residuals. SLQ
of ``PHP`` from start vectors in ``U⊥`` estimates the second term divided by
``dim − k``. The per-run quadrature is self-normalized (divided by ``‖Pv‖²``), so a
run's weights sum to exactly 1. For projected Rademacher vectors that ratio is biased
by about ``2k/dim² − 2Σᵢ(PHP)ᵢᵢ(UUᵀ)ᵢᵢ/(dim·tr PHP)`` relative (delta method;
4e-6 on the digits MLP), far below the run-to-run spread.

The result is a :class:`probe.slq.SpectrumResult` whose every run holds the point
masses followed by that run's bulk Ritz values (sorted together), so the moments,
negative mass, smoothed density and their standard errors are computed by the
same code as for plain SLQ: the point masses are the same in every run (they are
deterministic given ``U``), and the spread over runs is the bulk part's.

Sharded operators: everything goes through the operator protocol of
:mod:`probe.operators` (``matmat``, ``allreduce``, ``random_vectors``); ``U`` is held
as this process's ``(local_dim, k)`` shard and ``Uᵀx`` is reduced with ``allreduce``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from probe.basis import BasisStore, resolve_basis
from probe.eigen import _steps_within
from probe.lanczos import LanczosProcess, lanczos
from probe.operators import CurvatureOperator
from probe.slq import SpectrumResult, check_density_args, reorth_within_budget, smoothed_density

__all__ = ["DeflatedOperator", "DeflatedSpectrumResult", "deflated_spectral_density", "default_first_steps"]

# The first pass runs at least this many steps by default. Measured (bench/peer_accuracy.py's
# targets over 5 seeds, docs/benchmarks.md): on the digits MLP, k="auto" after a 20-step first
# pass deflates 6-7 outliers and needs 440 products for the density targets; after 80 steps it
# deflates ~31 and needs 180. The first moment's variance falls with every outlier removed.
MIN_FIRST_STEPS = 80

_EMPTY = torch.zeros(0, dtype=torch.float64)


@dataclass(frozen=True)
class DeflatedSpectrumResult(SpectrumResult):
    """A :class:`probe.slq.SpectrumResult` with the deflated outliers inside every run.

    Every run's ``ritz_values``/``ritz_weights`` hold the ``k`` point masses
    (weight ``1/dim`` each) and the run's Ritz values of ``PHP`` (Gauss weights
    times ``(dim − k)/dim``), ascending; ``num_matvecs`` counts the first pass and the
    SLQ runs, ``steps`` is the SLQ runs' step count.

    Attributes:
        deflated_values: ``(k,)`` float64 ascending: the Ritz values put in as point masses.
        deflated_residuals: ``(k,)`` their Lanczos residual bounds ``β_m|s_{m,i}|``.
        k: how many were deflated (``k_negative`` of them from the bottom of the spectrum).
        k_negative: how many of the ``k`` came from the bottom (``negative=``).
        first_pass_steps: Lanczos steps of the first pass (0 when nothing was asked for).
        first_pass_matvecs: products spent by the first pass.
    """

    deflated_values: Tensor = field(default_factory=_EMPTY.clone)
    deflated_residuals: Tensor = field(default_factory=_EMPTY.clone)
    k: int = 0
    k_negative: int = 0
    first_pass_steps: int = 0
    first_pass_matvecs: int = 0


class DeflatedOperator(CurvatureOperator):
    """``P A P`` with ``P = I − U Uᵀ``: ``A`` restricted to the orthogonal complement of ``span(U)``.

    Args:
        op: the symmetric operator ``A``.
        basis: ``(local_dim, k)`` this process's shard of orthonormal columns ``U``
            (orthonormal over the full vectors), in the operator's dtype and device.

    The projection is applied twice on each side (classical Gram-Schmidt, "twice is
    enough"), so vectors stay orthogonal to ``U`` to rounding however many Lanczos
    steps follow. One ``matmat`` costs one product of ``op`` per column.
    """

    def __init__(self, op: CurvatureOperator, basis: Tensor) -> None:
        if basis.ndim != 2 or basis.shape[0] != op.local_dim:
            raise ValueError(f"basis must have shape (local_dim={op.local_dim}, k), got {tuple(basis.shape)}")
        self.op = op
        self.basis = basis.to(dtype=op.dtype, device=op.device).contiguous()
        self._basis_rows = self.basis.T.contiguous()  # (k, local_dim)
        self.dim, self.local_dim, self.dtype, self.device = op.dim, op.local_dim, op.dtype, op.device

    @property
    def local_slice(self) -> slice:
        return self.op.local_slice

    def allreduce(self, t: Tensor) -> Tensor:
        return self.op.allreduce(t)

    def project(self, V: Tensor) -> Tensor:
        """``P V`` for ``V`` of shape ``(local_dim, c)`` (a new tensor)."""
        if self.basis.shape[1] == 0:
            return V.clone()
        # Row form, like probe.lanczos: the Lanczos vectors arrive as transposes of
        # run-major (c, local_dim) blocks, and a (c, local_dim) result goes back the same way.
        rows = V.T.contiguous()
        for _ in range(2):
            rows = rows - self.op.allreduce(rows @ self.basis) @ self._basis_rows
        return rows.T

    def _matmat(self, V: Tensor) -> Tensor:
        return self.project(self.op.matmat(self.project(V)))


def deflated_spectral_density(
    op: CurvatureOperator,
    *,
    runs: int = 10,
    steps: int = 80,
    k: int | str = "auto",
    negative: int | str = 0,
    tol: float = 1e-6,
    first_steps: int | None = None,
    sigma: float | None = None,
    reorth: str = "full",
    grid_points: int = 1000,
    generator: torch.Generator | None = None,
    basis: BasisStore | str = "device",
    basis_memory_bytes: int | None = None,
) -> DeflatedSpectrumResult:
    """Spectral density of ``op``: the converged outliers exactly, SLQ on the rest.

    Args:
        op: the symmetric operator (a Hessian, GGN, or any :class:`CurvatureOperator`).
        runs, steps, sigma, reorth, grid_points, basis: as in
            :func:`probe.slq.spectral_density`, for the SLQ runs on the deflated operator.
        k: how many of the largest eigenvalues to deflate: an integer (the first pass
            runs until they meet ``tol``, or ``first_steps``; only those that met it
            are deflated), or ``"auto"`` (default): every leading Ritz value at the
            top that meets ``tol`` after ``first_steps`` steps.
        negative: the same for the smallest eigenvalues (only negative Ritz values
            count); default 0, none. Worth it where λ_min is large in magnitude.
        tol: a Ritz pair counts as converged when its residual bound is at most
            ``tol·|θ|``; its value is then within about ``tol²·|θ|²/gap`` of an eigenvalue.
        first_steps: steps of the first pass (full reorthogonalization, one run);
            default :func:`default_first_steps`: ``min(dim, max(20·k_asked, steps, 80))``
            with ``k_asked`` the integer ``k + negative`` (0 for ``"auto"``). Lowered to
            fit ``basis_memory_bytes``.
        generator: randomness of the first pass's Gaussian start and the SLQ runs'
            Rademacher starts (drawn in that order).
        basis_memory_bytes: as in :func:`probe.slq.spectral_density` for the SLQ
            runs; the first pass's ``first_steps+1`` vectors are capped to it as well.

    With ``k=0`` and ``negative=0`` there is no first pass, and the result equals
    :func:`probe.slq.spectral_density` from the same generator.

    Raises:
        ValueError: for arguments :func:`probe.slq.spectral_density` rejects, a ``k``
            or ``negative`` that is neither a non-negative integer nor ``"auto"``,
            more than ``dim`` asked, a non-positive ``tol``, or ``first_steps``
            outside ``[1, dim]``.
    """
    _check(op, runs, steps, sigma, grid_points, reorth, basis_memory_bytes, tol)
    for name, value in (("k", k), ("negative", negative)):
        if not (value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)):
            raise ValueError(f"{name} must be a non-negative integer or 'auto', got {name}={value!r}")
    asked = (k if isinstance(k, int) else 0) + (negative if isinstance(negative, int) else 0)
    if asked > op.dim:
        raise ValueError(f"k + negative must be at most dim={op.dim}, got {asked}; deflate fewer eigenvalues")
    want_first = k != 0 or negative != 0
    if first_steps is None:
        first_steps = default_first_steps(op.dim, steps, asked)
    if not 1 <= first_steps <= op.dim:
        raise ValueError(f"first_steps must be in [1, dim={op.dim}], got first_steps={first_steps}")
    store = resolve_basis(basis)
    notes = []
    if want_first and basis_memory_bytes is not None:
        fits = _steps_within(store, op, basis_memory_bytes, first_steps)
        if fits < first_steps:
            notes.append(f"first pass lowered from {first_steps} to {fits} steps to fit basis_memory_bytes")
            first_steps = max(fits, 1)
    U = torch.zeros(op.local_dim, 0, dtype=op.dtype, device=op.device)
    values, residuals, n_neg, first_done, first_matvecs = _EMPTY, _EMPTY, 0, 0, 0
    if want_first:
        U, values, residuals, n_neg, first_done, first_matvecs, note = _first_pass(
            op, k, negative, tol, first_steps, generator, store
        )
        notes.append(note)
    kk = values.numel()
    deflated = DeflatedOperator(op, U)
    if basis_memory_bytes is not None:
        required = store.resident_bytes(runs, steps + 1, op.local_dim, op.dtype)
        reorth, note = reorth_within_budget(reorth, required, basis_memory_bytes, store.name)
        notes.append(note)
    start = deflated.project(op.random_vectors(runs, generator=generator, kind="rademacher"))
    if kk < op.dim:
        slq = lanczos(deflated, start, steps, reorth=reorth, basis=store)
        pairs = [slq.ritz(r) for r in range(runs)]
        bulk = [(p.values, p.weights * ((op.dim - kk) / op.dim)) for p in pairs]
        matvecs, ortho, broke = slq.num_matvecs, slq.orthogonality_loss, slq.breakdown
        storage, used = slq.basis_storage, slq.reorth
    else:  # the first pass found every eigenvalue: nothing is left to sample
        bulk = [(_EMPTY, _EMPTY)] * runs
        matvecs, ortho, broke = 0, torch.full((runs,), float("nan")), torch.ones(runs, dtype=torch.bool)
        storage, used = "none", reorth
    masses = torch.full((kk,), 1.0 / op.dim, dtype=torch.float64)
    run_values, run_weights = [], []
    for v, w in bulk:
        allv, allw = torch.cat([values, v]), torch.cat([masses, w])
        order = torch.argsort(allv)
        run_values.append(allv[order])
        run_weights.append(allw[order])
    grid, density, stderr, sigma = smoothed_density(run_values, run_weights, sigma, grid_points)
    return DeflatedSpectrumResult(
        ritz_values=run_values,
        ritz_weights=run_weights,
        grid=grid,
        density=density,
        density_stderr=stderr,
        sigma=float(sigma),
        runs=runs,
        steps=steps,
        reorth=used,
        num_matvecs=first_matvecs + matvecs,
        orthogonality_loss=ortho,
        breakdown=broke,
        dim=op.dim,
        note="; ".join(n for n in notes if n),
        basis_storage=storage,
        deflated_values=values,
        deflated_residuals=residuals,
        k=kk,
        k_negative=n_neg,
        first_pass_steps=first_done,
        first_pass_matvecs=first_matvecs,
    )


def default_first_steps(dim: int, steps: int, asked: int) -> int:
    """The first pass's default length: ``min(dim, max(20·asked, steps, MIN_FIRST_STEPS))``.

    ``asked`` is the integer ``k + negative`` (0 for ``"auto"``).

    >>> default_first_steps(3466, 20, 0), default_first_steps(3466, 80, 5), default_first_steps(50, 20, 0)
    (80, 100, 50)
    """
    return min(dim, max(20 * asked, steps, MIN_FIRST_STEPS))


def _check(op, runs, steps, sigma, grid_points, reorth, basis_memory_bytes, tol) -> None:
    """The argument checks of :func:`probe.slq.spectral_density`, plus ``tol``."""
    check_density_args(op, runs, steps, sigma, grid_points, reorth, basis_memory_bytes)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got tol={tol}; 1e-6 gives eigenvalues to about 1e-12 relative")


def _leading(values: Tensor, bounds: Tensor, tol: float, from_top: bool, negative_only: bool) -> list[int]:
    """Indices of the leading converged Ritz values from one end, up to the first that is not."""
    order = range(len(values) - 1, -1, -1) if from_top else range(len(values))
    out = []
    for i in order:
        theta = float(values[i])
        if float(bounds[i]) > tol * abs(theta) or theta == 0 or (negative_only and theta >= 0):
            break
        out.append(i)
    return out


def _select(values: Tensor, bounds: Tensor, k: int | str, negative: int | str, tol: float) -> tuple[list, list]:
    """The top and bottom indices to deflate (disjoint), each cut to its integer count."""
    top = _leading(values, bounds, tol, True, False) if k != 0 else []
    bottom = _leading(values, bounds, tol, False, True) if negative != 0 else []
    if isinstance(k, int):
        top = top[:k]
    if isinstance(negative, int):
        bottom = bottom[:negative]
    bottom = [i for i in bottom if i not in top]
    return top, bottom


def _first_pass(op, k, negative, tol, first_steps, generator, store):
    """One Lanczos run on ``op``; the converged outliers ``(U, θ, bounds, k_neg, steps, matvecs, note)``."""
    start = op.random_vectors(1, generator=generator, kind="gaussian")
    process = LanczosProcess(op, start, reorth="full", basis=store, max_steps=first_steps)
    fixed = isinstance(k, int) and isinstance(negative, int)
    while process.steps_done < first_steps and bool(process.active[0]):
        process.step()
        if fixed:
            ritz = process.ritz(0)
            top, bottom = _select(ritz.values, ritz.residual_bounds, k, negative, tol)
            if len(top) == k and len(bottom) == negative:
                break
    ritz = process.ritz(0)
    top, bottom = _select(ritz.values, ritz.residual_bounds, k, negative, tol)
    idx = sorted(bottom + top, key=lambda i: float(ritz.values[i]))
    note = ""
    if isinstance(k, int) and len(top) < k or isinstance(negative, int) and len(bottom) < negative:
        note = (
            f"asked to deflate k={k}, negative={negative}; {len(top)} and {len(bottom)} Ritz values met "
            f"tol={tol:g} after {process.steps_done} first-pass steps and only those were deflated; raise first_steps"
        )
    coeffs = ritz.vectors[:, idx].to(op.device, op.dtype)
    U = process.ritz_vectors(coeffs, 0) if idx else torch.zeros(op.local_dim, 0, dtype=op.dtype, device=op.device)
    if idx:
        # Cholesky QR: U orthonormal to rounding over the full (possibly sharded) vectors.
        gram = op.allreduce(U.T @ U).to("cpu", torch.float64)
        chol = torch.linalg.cholesky(gram)
        U = U @ torch.linalg.inv(chol).T.to(U.device, U.dtype)
    idx_t = torch.tensor(idx, dtype=torch.long)
    return (
        U,
        ritz.values[idx_t].clone(),
        ritz.residual_bounds[idx_t].clone(),
        len(bottom),
        process.steps_done,
        process.num_matvecs,
        note,
    )
