"""Extreme eigenvalues: Lanczos with convergence control, and power iteration.

:func:`eigenvalues` runs one Lanczos process with full reorthogonalization and
stops once each wanted Ritz pair's residual bound ``β_m|s_{m,i}|`` is at most
``tol·max|θ|``. For a Ritz value θ with residual r, some eigenvalue λ satisfies
``|λ − θ| ≤ r`` and, once θ is separated from the rest of the spectrum by a gap
δ, ``|λ − θ| ≤ r²/δ`` (Parlett, "The Symmetric Eigenvalue Problem", 1998, §11.7),
so the default ``tol=1e-6`` gives eigenvalues to about 1e-12 relative when
separated. Lanczos needs far fewer products than power iteration for the same
accuracy (its convergence depends on the gap through Chebyshev polynomials,
Kaniel-Paige-Saad theory). :func:`power_iteration` with deflation is kept for
parity with PyHessian and hessian-eigenthings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from probe.lanczos import LanczosProcess
from probe.operators import CurvatureOperator, inner, norm

__all__ = ["EigenResult", "eigenvalues", "power_iteration", "WHICH"]

WHICH = ("largest", "smallest")


@dataclass(frozen=True)
class EigenResult:
    """Extreme eigenvalues of an operator.

    Attributes:
        which: ``"largest"`` (sorted descending) or ``"smallest"`` (ascending).
        eigenvalues: ``(k,)`` float64, sorted as asked.
        residuals: ``(k,)`` float64: ``‖Ay − θy‖`` when eigenvectors were formed,
            else the Lanczos residual bounds.
        residuals_exact: whether ``residuals`` are measured (True) or bounds.
        converged: whether every residual met ``tol·max|θ|``.
        num_matvecs: operator applications spent.
        num_steps: Lanczos steps (or power iterations) taken.
        orthogonality_loss: achieved loss of orthogonality of the basis (NaN for power iteration).
        eigenvectors: ``(local_dim, k)`` unit eigenvector estimates, or None.
        method: ``"lanczos"`` or ``"power"``.
        tol: the requested relative residual tolerance.
        note: why the result is short of what was asked (fewer than ``k`` values,
            not converged), or ``""``.
    """

    which: str
    eigenvalues: Tensor
    residuals: Tensor
    residuals_exact: bool
    converged: bool
    num_matvecs: int
    num_steps: int
    orthogonality_loss: float
    method: str
    tol: float
    eigenvectors: Tensor | None = None
    note: str = ""


def _wanted(values: Tensor, k: int, which: str) -> Tensor:
    order = torch.argsort(values, descending=(which == "largest"))
    return order[:k]


def eigenvalues(
    op: CurvatureOperator,
    k: int = 1,
    *,
    which: str = "largest",
    tol: float = 1e-6,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
    start: Tensor | None = None,
    return_eigenvectors: bool = False,
) -> EigenResult:
    """The ``k`` largest or smallest eigenvalues of ``op`` by Lanczos.

    Args:
        op: symmetric operator.
        k: how many eigenvalues (1 ≤ k ≤ dim).
        which: ``"largest"`` (algebraically largest, e.g. λ_max) or ``"smallest"``
            (algebraically smallest, e.g. the most negative Hessian eigenvalue).
        tol: stop when every wanted residual bound is ≤ ``tol·max|θ|``.
        max_steps: cap on Lanczos steps; default ``min(dim, max(20·k, 100))``.
        generator: randomness of the start vector (Gaussian) when ``start`` is None.
        start: optional ``(local_dim,)`` start vector (e.g. a warm start from the
            previous checkpoint's top eigenvector).
        return_eigenvectors: form the Ritz vectors and measure true residuals
            (costs ``k`` more products).

    Raises:
        ValueError: for ``k`` outside ``[1, dim]``, an unknown ``which``, a
            non-positive ``tol``, or ``max_steps`` outside ``[k, dim]``.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got which={which!r}")
    if not 1 <= k <= op.dim:
        raise ValueError(f"k must be in [1, dim={op.dim}], got k={k}; lower k")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got tol={tol}; 1e-6 gives eigenvalues to about 1e-12 relative")
    if max_steps is None:
        max_steps = min(op.dim, max(20 * k, 100))
    if not k <= max_steps <= op.dim:
        raise ValueError(
            f"max_steps must be in [k={k}, dim={op.dim}], got max_steps={max_steps}; pass a value in that range or None"
        )
    if start is None:
        start = op.random_vectors(1, generator=generator, kind="gaussian")
    else:
        start = start.reshape(-1, 1)
    process = LanczosProcess(op, start, reorth="full")
    converged = False
    while process.steps_done < max_steps:
        process.step()
        if process.steps_done < k:
            if bool(process.active[0]):
                continue
            break  # broke down before k steps: the start vector reaches fewer than k eigenvalues
        ritz = process.ritz(0)
        idx = _wanted(ritz.values, k, which)
        scale = ritz.values.abs().max()
        if bool((ritz.residual_bounds[idx] <= tol * scale).all()) or not bool(process.active[0]):
            converged = True
            break
    result = process.result()
    ritz = result.ritz(0)
    idx = _wanted(ritz.values, min(k, len(ritz.values)), which)
    values = ritz.values[idx]
    residuals = ritz.residual_bounds[idx]
    scale = ritz.values.abs().max()
    vectors = None
    exact = False
    if return_eigenvectors:
        n = int(result.num_steps[0])
        basis = result.basis[:n, :, 0]  # (n, local_dim)
        vectors = basis.T @ ritz.vectors[:, idx].to(basis.device, basis.dtype)  # (local_dim, k)
        vectors = vectors / norm(op, vectors)
        av = op.matmat(vectors)
        residuals = norm(op, av - vectors * values.to(vectors.device, vectors.dtype)).to("cpu", torch.float64)
        exact = True
    converged = converged and bool((ritz.residual_bounds[idx] <= tol * scale).all())
    note = ""
    if len(idx) < k:
        note = (f"the start vector's Krylov space is invariant after {len(ritz.values)} steps: only "
                f"{len(ritz.values)} eigenvalues are reachable from it; use another start vector for more")
    elif not converged:
        worst = float((ritz.residual_bounds[idx] / scale).max())
        note = (f"not converged after max_steps={max_steps}: largest relative residual {worst:.2g} > tol={tol:g}; "
                "raise max_steps or tol")
    return EigenResult(
        which=which,
        eigenvalues=values,
        residuals=residuals,
        residuals_exact=exact,
        converged=converged,
        num_matvecs=result.num_matvecs + (len(idx) if return_eigenvectors else 0),
        num_steps=int(result.num_steps[0]),
        orthogonality_loss=float(result.orthogonality_loss[0]),
        method="lanczos",
        tol=tol,
        eigenvectors=vectors,
        note=note,
    )


def power_iteration(
    op: CurvatureOperator,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """The ``k`` eigenvalues of largest magnitude by power iteration with deflation.

    Stops each eigenvalue when its relative change between iterations is below
    ``tol`` (PyHessian's criterion and default). Note that this criterion does not
    bound the error: a slowly converging iteration can stall far from the answer.

    Raises:
        ValueError: for ``k`` outside ``[1, dim]`` or non-positive ``tol``/``max_iter``.
    """
    if not 1 <= k <= op.dim:
        raise ValueError(f"k must be in [1, dim={op.dim}], got k={k}; lower k")
    if tol <= 0 or max_iter <= 0:
        raise ValueError(
            f"tol and max_iter must be positive, got tol={tol}, max_iter={max_iter}; the defaults are tol=1e-3, max_iter=100"
        )
    found: list[Tensor] = []
    values: list[float] = []
    residuals: list[float] = []
    matvecs = 0
    steps = 0
    converged = True
    for _ in range(k):
        v = op.random_vectors(1, generator=generator, kind="gaussian")[:, 0]
        v = v / norm(op, v)
        lam = None
        ok = False
        for _ in range(max_iter):
            w = op.matvec(v)
            matvecs += 1
            steps += 1
            for u, mu in zip(found, values):
                w = w - mu * inner(op, u, v) * u
            new = float(inner(op, v, w))
            wn = norm(op, w)
            v_next = w / wn
            if lam is not None and abs(new - lam) <= tol * (abs(lam) + 1e-300):
                lam = new
                ok = True
                break
            lam, v = new, v_next
        converged &= ok
        found.append(v)
        values.append(lam)
        w = op.matvec(v)
        for u, mu in zip(found[:-1], values[:-1]):
            w = w - mu * inner(op, u, v) * u
        residuals.append(float(norm(op, w - lam * v)))
        matvecs += 1
    order = sorted(range(k), key=lambda i: -values[i])
    return EigenResult(
        which="largest",
        eigenvalues=torch.tensor([values[i] for i in order], dtype=torch.float64),
        residuals=torch.tensor([residuals[i] for i in order], dtype=torch.float64),
        residuals_exact=True,
        converged=converged,
        num_matvecs=matvecs,
        num_steps=steps,
        orthogonality_loss=float("nan"),
        method="power",
        tol=tol,
        eigenvectors=torch.stack([found[i] for i in order], dim=1),
    )
