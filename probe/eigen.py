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

The basis lives in a :mod:`probe.basis` store (``basis=``); under a
``basis_memory_bytes`` budget the step cap is lowered to the number of vectors
the store can hold within it (reorthogonalization stays full: dropping it would
turn converged eigenvalues into repeated ghost copies among the ``k`` returned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from probe.basis import BasisStore, resolve_basis
from probe.block_lanczos import BlockLanczosProcess
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
        num_steps: Lanczos steps (or power iterations) taken; with ``block_size > 1``,
            block steps: passes over the data, each applying the operator to a block.
        orthogonality_loss: achieved loss of orthogonality of the basis (NaN for power iteration).
        eigenvectors: ``(local_dim, k)`` unit eigenvector estimates, or None.
        method: ``"lanczos"`` or ``"power"``.
        tol: the requested relative residual tolerance.
        note: why the result is short of what was asked (fewer than ``k`` values,
            not converged, steps capped by a memory budget), or ``""``.
        basis_storage: where the Lanczos basis was kept (``"device"``, ``"host"``,
            ``"disk"``, …; ``"none"`` for power iteration).
        block_size: start vectors of the Lanczos process (1: single-vector Lanczos).
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
    basis_storage: str = "device"
    block_size: int = 1


def default_max_steps(k: int) -> int:
    """The products a single-vector run may spend on ``k`` eigenvalues when ``max_steps`` is None
    (capped at the dimension): ``max(20k, 100)``."""
    return max(20 * k, 100)


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
    basis: BasisStore | str = "device",
    basis_memory_bytes: int | None = None,
    reorth: str = "full",
    block_size: int = 1,
) -> EigenResult:
    """The ``k`` largest or smallest eigenvalues of ``op`` by Lanczos.

    Args:
        op: symmetric operator.
        k: how many eigenvalues (1 ≤ k ≤ dim).
        which: ``"largest"`` (algebraically largest, e.g. λ_max) or ``"smallest"``
            (algebraically smallest, e.g. the most negative Hessian eigenvalue).
        tol: stop when every wanted residual bound is ≤ ``tol·max|θ|``. The bound
            places *an* eigenvalue near each Ritz value; while the Krylov space is
            small a loose ``tol`` can stop before the extreme one has appeared, and
            return the next as converged (on the digits MLP, λ₂ for λ_max from 5 of
            100 start vectors at ``tol=0.1``, and from none at ``tol ≤ 0.02``).
        max_steps: cap on Lanczos steps; default ``min(dim, max(20·k, 100))``.
        generator: randomness of the start vector (Gaussian) when ``start`` is None.
        start: optional ``(local_dim,)`` start vector (e.g. a warm start from the
            previous checkpoint's top eigenvector).
        return_eigenvectors: form the Ritz vectors and measure true residuals
            (costs ``k`` more products).
        basis: where the Lanczos basis lives: ``"device"`` (default), ``"host"`` or a
            :class:`probe.basis.BasisStore` such as ``cluster.basis.DiskBasis``.
        basis_memory_bytes: the most bytes the store may hold for the basis
            (``store.resident_bytes``; device or host memory); default None, no
            limit. When ``max_steps+1`` vectors do not fit, ``max_steps`` is lowered
            to what fits and ``note`` says so.
        reorth: ``"full"`` (default) or ``"selective"``: orthogonalize each new vector
            only against Ritz vectors that have converged (Parlett & Scott 1979), which
            keeps the extreme eigenvalues free of ghost copies at a fraction of full
            reorthogonalization's projections; the basis is still stored (the
            converged Ritz vectors are formed from it).
        block_size: start vectors ``b``. With ``b > 1``, block Lanczos
            (:mod:`probe.block_lanczos`; full reorthogonalization only) applies the
            operator to ``b`` columns per step: one pass over the data, one batched
            backward on CUDA, ``b`` backward passes on the CPU. ``max_steps`` then
            counts block steps (default ``min(⌈dim/b⌉, ⌈2·max(20·k, 100)/b⌉)``: up to
            twice the single-vector products) and ``num_steps`` reports them; ``start``
            may be ``(local_dim,)`` (the other ``b−1`` columns are drawn from
            ``generator``) or ``(local_dim, b)``. Default 1: in
            ``bench/bench_block_lanczos.py`` a block needed 1.2-3.2× the products of
            a single vector to reach ``tol`` on every model and ``k``, so it is cheaper
            only where a batched pass of ``b`` columns costs less than
            ``products(1)/products(b)`` (0.31-0.86) of ``b`` single products; measured
            on CUDA: 0.9 (H200, 1.1M parameters). Use ``b`` ≥ the multiplicity
            where the top eigenvalues may be repeated: one start vector sees a single
            direction of a repeated eigenvalue and returns the next one, converged.

    Raises:
        ValueError: for ``k`` outside ``[1, dim]``, an unknown ``which``, a
            non-positive ``tol``, ``max_steps`` outside ``[k, dim]`` (block:
            ``[⌈k/b⌉, ⌈dim/b⌉]``), an unknown ``basis``, a ``basis_memory_bytes`` too
            small for ``k+1`` vectors (block: ``k+b``), a ``block_size`` outside
            ``[1, dim]``, or ``block_size > 1`` with ``reorth="selective"``.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got which={which!r}")
    if reorth not in ("full", "selective"):
        raise ValueError(
            f"reorth must be 'full' or 'selective' for eigenvalues, got reorth={reorth!r} (without "
            "reorthogonalization converged Ritz values repeat as ghosts among the k returned)"
        )
    if not 1 <= k <= op.dim:
        raise ValueError(f"k must be in [1, dim={op.dim}], got k={k}; lower k")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got tol={tol}; 1e-6 gives eigenvalues to about 1e-12 relative")
    if not isinstance(block_size, int) or not 1 <= block_size <= op.dim:
        raise ValueError(
            f"block_size must be an integer in [1, dim={op.dim}], got block_size={block_size!r}; "
            "1 is single-vector Lanczos"
        )
    if block_size > 1 and reorth != "full":
        raise ValueError(
            f"block_size > 1 needs reorth='full', got reorth={reorth!r}; pass reorth='full' or block_size=1"
        )
    b = block_size
    most_steps = -(-op.dim // b)  # ⌈dim/b⌉: block steps until the basis spans the space
    fewest_steps = -(-k // b)
    if max_steps is None:  # single vector: max(20k, 100) products; a block may spend twice that
        cap = default_max_steps(k)
        max_steps = min(most_steps, cap if b == 1 else -(-2 * cap // b))
    if not fewest_steps <= max_steps <= most_steps:
        lo, hi = (f"k={k}", f"dim={op.dim}") if b == 1 else (f"ceil(k/b)={fewest_steps}", f"ceil(dim/b)={most_steps}")
        raise ValueError(
            f"max_steps must be in [{lo}, {hi}], got max_steps={max_steps}; pass a value in that range or None"
        )
    store = resolve_basis(basis)
    budget_note = ""
    if basis_memory_bytes is not None:
        fits = _steps_within(store, op, basis_memory_bytes, max_steps * b + b - 1)  # vectors that fit, less one
        steps_fit = (fits + 1) // b - 1  # the basis of m block steps and the next block: (m+1)·b vectors
        if fits + 1 < k + b or steps_fit < fewest_steps:
            need = store.resident_bytes(1, k + b, op.local_dim, op.dtype)
            raise ValueError(
                f"basis_memory_bytes={basis_memory_bytes} holds fewer than {'k+1' if b == 1 else 'k+block_size'}"
                f"={k + b} basis vectors "
                f"(needs {need} bytes in the {store.name} store); raise basis_memory_bytes or pass "
                "basis='host' or a cluster.basis.DiskBasis"
            )
        if steps_fit < max_steps:
            budget_note = (
                f"max_steps lowered from {max_steps} to {steps_fit}: {(max_steps + 1) * b} basis vectors exceed "
                f"basis_memory_bytes={basis_memory_bytes} in the {store.name} store"
            )
            max_steps = steps_fit
    if start is None:
        start = op.random_vectors(b, generator=generator, kind="gaussian")
    else:
        start = start.reshape(op.local_dim, -1)
        if start.shape[1] < b:
            extra = op.random_vectors(b - start.shape[1], generator=generator, kind="gaussian")
            start = torch.cat([start, extra], dim=1)
    if b == 1:
        process = LanczosProcess(op, start, reorth=reorth, basis=store, max_steps=max_steps)
    else:
        process = BlockLanczosProcess(op, start, basis=store, max_columns=max_steps * b)
    converged = False
    while process.steps_done < max_steps:
        process.step()
        if _ritz_count(process) < k:
            if bool(process.active[0]):
                continue
            break  # broke down before k Ritz values: the start reaches fewer than k eigenvalues
        ritz = process.ritz(0)
        idx = _wanted(ritz.values, k, which)
        scale = ritz.values.abs().max()
        if bool((ritz.residual_bounds[idx] <= tol * scale).all()) or not bool(process.active[0]):
            converged = True
            break
    if isinstance(process, BlockLanczosProcess):
        ritz = process.ritz(0)
        num_matvecs, num_steps, ortho = process.num_matvecs, process.steps_done, process.orthogonality_loss()
        storage = process.basis_storage
    else:
        result = process.result()
        ritz = result.ritz(0)
        num_matvecs, num_steps = result.num_matvecs, int(result.num_steps[0])
        ortho, storage = float(result.orthogonality_loss[0]), result.basis_storage
    idx = _wanted(ritz.values, min(k, len(ritz.values)), which)
    values = ritz.values[idx]
    residuals = ritz.residual_bounds[idx]
    scale = ritz.values.abs().max()
    vectors = None
    exact = False
    if return_eigenvectors:
        vectors = process.ritz_vectors(ritz.vectors[:, idx].to(op.device, op.dtype))  # (local_dim, k)
        vectors = vectors / norm(op, vectors)
        av = op.matmat(vectors)
        residuals = norm(op, av - vectors * values.to(vectors.device, vectors.dtype)).to("cpu", torch.float64)
        exact = True
    converged = converged and bool((ritz.residual_bounds[idx] <= tol * scale).all())
    note = ""
    if len(idx) < k:
        what = "start vector's" if b == 1 else "start block's"
        when = f"{len(ritz.values)} steps" if b == 1 else f"{num_steps} block steps"
        note = (
            f"the {what} Krylov space is invariant after {when}: only "
            f"{len(ritz.values)} eigenvalues are reachable from it; use another start vector for more"
        )
    elif not converged:
        worst = float((ritz.residual_bounds[idx] / scale).max())
        note = (
            f"not converged after max_steps={max_steps}: largest relative residual {worst:.2g} > tol={tol:g}; "
            "raise max_steps or tol"
        )
    note = "; ".join(x for x in (note, budget_note) if x)
    return EigenResult(
        which=which,
        eigenvalues=values,
        residuals=residuals,
        residuals_exact=exact,
        converged=converged,
        num_matvecs=num_matvecs + (len(idx) if return_eigenvectors else 0),
        num_steps=num_steps,
        orthogonality_loss=ortho,
        method="lanczos",
        tol=tol,
        eigenvectors=vectors,
        note=note,
        basis_storage=storage,
        block_size=b,
    )


def _ritz_count(process: LanczosProcess | BlockLanczosProcess) -> int:
    """Ritz values available: one per step (single vector) or per basis column in ``T`` (block)."""
    return process.size if isinstance(process, BlockLanczosProcess) else process.steps_done


def _steps_within(store: BasisStore, op: CurvatureOperator, budget_bytes: int, max_steps: int) -> int:
    """The most steps ``m ≤ max_steps`` whose ``m+1`` basis vectors fit ``budget_bytes`` in ``store`` (0 if none)."""

    def fits(m: int) -> bool:
        return store.resident_bytes(1, m + 1, op.local_dim, op.dtype) <= budget_bytes

    if fits(max_steps):
        return max_steps
    lo, hi = 0, max_steps  # fits(lo) or lo == 0; not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


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
            f"tol and max_iter must be positive, got tol={tol}, max_iter={max_iter}; "
            "the defaults are tol=1e-3, max_iter=100"
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
            for u, mu in zip(found, values, strict=True):
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
        assert lam is not None  # max_iter ≥ 1 (checked above): the loop ran
        found.append(v)
        values.append(lam)
        w = op.matvec(v)
        for u, mu in zip(found[:-1], values[:-1], strict=True):
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
        basis_storage="none",
    )
