"""Trace estimators that get more from each product: XTrace and Krylov-aware Hutch++.

Both split the trace as ``tr(A) = tr(QᵀAQ) + tr((I−QQᵀ)A(I−QQᵀ))``: the first term is
computed exactly on a subspace that captures the outlier eigenvalues, the second is
sampled. They differ from Hutch++ (:func:`probe.trace.hutchpp`) in how much each
product buys.

**XTrace** (Epperly, Tropp & Webber 2024, "XTrace: Making the most of every sample in
stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1)). Hutch++ needs separate
vectors for the sketch and for the correction, because reusing a sketch vector to sample
the remainder biases the sample. XTrace reuses each of its ``m = num_matvecs // 2`` test
vectors for both by leaving it out: estimate ``tᵢ`` deflates with ``Q₍ᵢ₎ = orth(AΩ₋ᵢ)``
(the sketch of every test vector but ``ωᵢ``) and samples the remainder at ``ωᵢ``, which
``Q₍ᵢ₎`` does not depend on, so each ``tᵢ`` is unbiased; XTrace is their mean. All ``m``
estimates come from one basis ``Q`` of ``Y = AΩ = QR`` and the ``m`` products ``AQ``:
``Q₍ᵢ₎`` is ``Q`` less the one direction ``Q sᵢ``, ``sᵢ`` the unit ``i``-th column of
``R⁻ᵀ``, so the leave-one-out terms are ``m × m`` algebra (the paper's downdating; no
loop over bases, no further products). Test vectors are uniform on the sphere of radius
``√n`` and each sample of the remainder is rescaled by ``rank(Pᵢ)/‖Pᵢωᵢ‖²``
(``Pᵢ = I − Q₍ᵢ₎Q₍ᵢ₎ᵀ``): the paper's normalization, unbiased for rotation-invariant
vectors and exact when the remainder is a multiple of the identity on its range. With
Rademacher vectors the plain quadratic form is used. The standard error is the paper's
error estimate, the sample standard deviation of the ``tᵢ`` over ``√m``; the ``tᵢ`` are
exchangeable rather than independent, so it is an estimate whose quality the tests check
against the spread of the estimator over seeds.

**Krylov-aware Hutch++** (Chen & Hallman 2023, "Krylov-aware stochastic trace
estimation", SIAM J. Matrix Anal. Appl. 44(3)). Hutch++ pays ``2s`` products for an
``s``-dimensional subspace: ``s`` for the sketch ``AS`` and ``s`` more for ``AQ``. A block
Krylov space ``K = span(Ω, AΩ, …, A^qΩ)`` with block size ``b`` is built by the products
``AVⱼ`` of its own orthonormal blocks ``Vⱼ``, and those same products give the diagonal
blocks ``VⱼᵀAVⱼ`` of ``QᵀAQ``: ``b(q+1)`` products buy an exact ``tr(QᵀAQ)`` on
``b(q+1)`` dimensions, twice Hutch++'s, and the powers of ``A`` separate the outliers
better than one product does. Hutchinson (Rademacher probes independent of ``Ω``:
unbiased) samples the deflated remainder and gives the standard error, as in Hutch++.

Every basis is orthonormalized through Gram matrices reduced with ``op.allreduce``, so
both estimators work unchanged on sharded vectors, and both are rank-revealing: a
matrix of rank below the subspace size is deflated completely and its trace is exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from probe.operators import CurvatureOperator, inner
from probe.trace import TraceResult, _check, _mean_stderr, _orthonormalize, _quadratic_forms

__all__ = ["xtrace", "krylov_hutchpp", "XTRACE_KINDS"]

XTRACE_KINDS = ("sphere", "rademacher")
INDEPENDENT_LEVERAGE = 1 - 1e-8  # a sketch column whose leverage reaches this is independent of the others


def _apply(op: CurvatureOperator, V: Tensor, block_size: int) -> Tensor:
    """``A @ V`` applied ``block_size`` columns at a time."""
    if V.shape[1] == 0:
        return V.clone()
    return torch.cat([op.matmat(V[:, j : j + block_size]) for j in range(0, V.shape[1], block_size)], 1)


def _diag(a: Tensor, b: Tensor) -> Tensor:
    """``diag(aᵀb)`` without forming ``aᵀb``."""
    return (a * b).sum(0)


def _leave_one_out(
    R: Tensor, W: Tensor, H: Tensor, T: Tensor, omega_y: Tensor, norms2: Tensor, n: int, rescale: bool
) -> tuple[Tensor, Tensor]:
    """The ``m`` leave-one-out estimates of XTrace from ``m × m`` (or ``k × m``) quantities.

    With ``Y = AΩ ≈ QR`` (``Q``: ``k`` orthonormal columns), ``W = QᵀΩ``, ``H = QᵀAQ``,
    ``T = (AQ)ᵀΩ``, ``omega_y[i] = ωᵢᵀyᵢ`` and ``norms2[i] = ‖ωᵢ‖²``: the basis without
    column ``i`` is ``Q(I − sᵢsᵢᵀ)`` when column ``i`` of ``R`` is independent of the
    others (leverage 1; then ``sᵢ`` is the unit ``i``-th column of ``R⁺ᵀ``, orthogonal to
    every other column) and ``Q`` itself otherwise (``sᵢ = 0``). The remainder's sample at
    ``ωᵢ`` expands, with ``w, r, t`` the ``i``-th columns of ``W, R, T`` and ``c = sᵢᵀw``,
    into ``ωᵀy − wᵀr − tᵀw + wᵀHw + c(tᵀs − wᵀHs + sᵀr − sᵀHw) + c² sᵀHs``.

    Returns:
        ``(estimates, sketch_traces)``: each ``tᵢ`` and its exact part ``tr(Q₍ᵢ₎ᵀAQ₍ᵢ₎)``.
    """
    k = R.shape[0]
    if k:
        U, sig, Vh = torch.linalg.svd(R, full_matrices=False)  # R = U diag(sig) Vh, Vh: (k, m)
        independent = (Vh**2).sum(0) > INDEPENDENT_LEVERAGE
        S = U @ (Vh / sig[:, None])  # columns of R⁺ᵀ
        S = S / S.norm(dim=0).clamp_min(torch.finfo(S.dtype).tiny) * independent
    else:
        independent = torch.zeros(R.shape[1], dtype=torch.bool, device=R.device)
        S = R.clone()
    c = _diag(S, W)
    HS, HW = H @ S, H @ W
    s_h_s = _diag(S, HS)
    quad = (
        omega_y
        - _diag(W, R)
        - _diag(T, W)
        + _diag(W, HW)
        + c * (_diag(T - H.T @ W, S) + _diag(S, R - HW))
        + c**2 * s_h_s
    )
    if rescale:  # Pᵢωᵢ is uniform on the sphere of range(Pᵢ): rank(Pᵢ)·E[(Pω)ᵀA(Pω)/‖Pω‖²] = tr(PAP)
        rank = (n - k + independent.to(R.dtype)).clamp_min(0)
        residual2 = (norms2 - (W**2).sum(0) + c**2).clamp_min(torch.finfo(R.dtype).tiny)
        quad = quad * torch.where(rank > 0, rank / residual2, torch.zeros_like(rank))
    sketch = H.trace() - s_h_s
    return sketch + quad, sketch


def xtrace(
    op: CurvatureOperator,
    num_matvecs: int = 102,
    *,
    generator: torch.Generator | None = None,
    block_size: int = 8,
    kind: str = "sphere",
) -> TraceResult:
    """XTrace estimate within a budget of ``num_matvecs`` products (see the module docstring).

    Budget: ``m = min(num_matvecs // 2, dim)`` test vectors, ``m`` products for the sketch
    ``AΩ`` and at most ``m`` for ``AQ`` (fewer when the sketch is rank-deficient, as for a
    matrix of rank below ``m``); an odd budget leaves one product unspent. Memory: about
    ``4m`` vectors at the peak (``Ω``, ``Y`` and the two passes that orthonormalize it);
    ``AQ`` is reduced to ``QᵀAQ`` and ``(AQ)ᵀΩ`` one block at a time, never stored.

    Args:
        op: the symmetric operator whose trace is estimated.
        num_matvecs: the budget (≥ 4: two test vectors give a standard error).
        generator: randomness of the test vectors.
        block_size: columns per ``matmat`` (memory vs speed; the estimate does not depend on it).
        kind: ``"sphere"`` (the paper's choice: uniform on the sphere of radius ``√dim``,
            with its normalized remainder samples) or ``"rademacher"``.

    Returns:
        A :class:`~probe.trace.TraceResult` with ``method="xtrace"``; ``num_samples`` is
        ``m`` (leave-one-out estimates), ``sketch_trace`` the mean of their exact parts.

    Raises:
        ValueError: for ``num_matvecs < 4``, ``block_size < 1`` or an unknown ``kind``.
    """
    _check(num_matvecs, 4, block_size)
    if kind not in XTRACE_KINDS:
        raise ValueError(f"kind must be one of {XTRACE_KINDS}, got kind={kind!r}")
    n, f64 = op.dim, torch.float64
    m = min(num_matvecs // 2, n)
    omega = op.random_vectors(m, generator=generator, kind="gaussian" if kind == "sphere" else "rademacher")
    if kind == "sphere":
        omega = omega * (n / inner(op, omega, omega)).sqrt().to(omega.dtype)
    Y = _apply(op, omega, block_size)
    Q = _orthonormalize(op, Y)
    R = op.allreduce(Q.T @ Y).to(f64)
    omega_y = inner(op, omega, Y).to(f64)
    del Y
    k = Q.shape[1]
    W = op.allreduce(Q.T @ omega).to(f64)
    H = torch.zeros(k, k, dtype=f64, device=op.device)
    T = torch.zeros(k, m, dtype=f64, device=op.device)
    for j in range(0, k, block_size):  # AQ one block at a time: only its products with Q and Ω are kept
        Z = op.matmat(Q[:, j : j + block_size])
        G = op.allreduce(torch.cat([Z.T @ Q, Z.T @ omega], 1)).to(f64)
        H[:, j : j + G.shape[0]] = G[:, :k].T
        T[j : j + G.shape[0]] = G[:, k:]
    norms2 = inner(op, omega, omega).to(f64)
    ests, sketch = _leave_one_out(R, W, H, T, omega_y, norms2, n, rescale=kind == "sphere")
    est, stderr = _mean_stderr(ests)
    return TraceResult("xtrace", est, stderr, m + k, m, float(sketch.mean()))


def _extend(op: CurvatureOperator, Y: Tensor, Q: Tensor) -> Tensor:
    """Orthonormal basis of the part of ``span(Y)`` orthogonal to ``Q`` (orthonormal columns).

    Projected twice (classical Gram–Schmidt, reorthogonalized); directions whose projection
    is below ``√ε`` of ``Y``'s largest column are dropped: rounding there is comparable to
    the signal, the space is (numerically) invariant, and keeping them would cost
    orthogonality (dropping a direction only shrinks the subspace, never biases the
    estimate). The survivors are normalized, projected once more and orthonormalized.
    """
    scale2 = float(inner(op, Y, Y).max()) if Y.shape[1] else 0.0
    if scale2 == 0.0:
        return Y[:, :0]
    for _ in range(2):
        if Q.shape[1]:
            Y = Y - Q @ op.allreduce(Q.T @ Y)
    s, U = torch.linalg.eigh(op.allreduce(Y.T @ Y).to(torch.float64))
    keep = s > scale2 * torch.finfo(Y.dtype).eps
    if not bool(keep.any()):
        return Y[:, :0]
    Y = Y @ (U[:, keep] / s[keep].sqrt()).to(Y.dtype)
    if Q.shape[1]:
        Y = Y - Q @ op.allreduce(Q.T @ Y)
    return _orthonormalize(op, Y)


def krylov_hutchpp(
    op: CurvatureOperator,
    num_matvecs: int = 102,
    *,
    generator: torch.Generator | None = None,
    block_size: int = 8,
    krylov_block: int = 4,
    sketch_fraction: float = 0.5,
) -> TraceResult:
    """Krylov-aware Hutch++ within a budget of ``num_matvecs`` products (see the module docstring).

    Budget: ``sketch_fraction · num_matvecs`` products (at most ``num_matvecs − 2``),
    rounded down to whole blocks of ``b = krylov_block``, build the Krylov space
    ``span(Ω, AΩ, …, A^qΩ)`` and its exact trace (one product per basis vector); every
    other product (including those the sketch did not need, when the space becomes
    invariant early) is a Hutchinson probe of the deflated remainder. Memory: the basis
    (about ``sketch_fraction · num_matvecs`` vectors) plus a block.

    Args:
        op: the symmetric operator whose trace is estimated.
        num_matvecs: the budget (≥ 6, as for Hutch++).
        generator: randomness of the start block and of the probes.
        block_size: columns per ``matmat`` (the estimate does not depend on it).
        krylov_block: the block size ``b`` of the Krylov space: the number of outliers it
            resolves at once; fewer, deeper blocks separate well-isolated outliers better.
        sketch_fraction: the share of the budget spent on the Krylov space, in ``(0, 1)``.

    Returns:
        A :class:`~probe.trace.TraceResult` with ``method="krylov-hutch++"``; ``sketch_trace``
        is the exact trace on the Krylov space, ``num_samples`` the Hutchinson probes.

    Raises:
        ValueError: for ``num_matvecs < 6``, ``block_size < 1``, ``krylov_block < 1`` or a
            ``sketch_fraction`` outside ``(0, 1)``.
    """
    _check(num_matvecs, 6, block_size)
    if krylov_block < 1:
        raise ValueError(f"krylov_block must be at least 1, got krylov_block={krylov_block}")
    if not 0 < sketch_fraction < 1:
        raise ValueError(f"sketch_fraction must be in (0, 1), got sketch_fraction={sketch_fraction}")
    sketch_budget = max(1, min(math.floor(sketch_fraction * num_matvecs), num_matvecs - 2))
    b = min(krylov_block, max(1, sketch_budget // 2), op.dim)  # at least two blocks: Ω alone is a random subspace
    depth = sketch_budget // b  # q + 1 blocks
    V = _orthonormalize(op, op.random_vectors(b, generator=generator, kind="rademacher"))
    blocks: list[Tensor] = []
    sketch, spent = 0.0, 0
    for step in range(depth):
        if V.shape[1] == 0:  # the space is invariant: the rest of the budget goes to Hutchinson
            break
        AV = _apply(op, V, block_size)
        spent += V.shape[1]
        sketch += float(inner(op, V, AV).sum())
        blocks.append(V)
        if step + 1 < depth:
            V = _extend(op, AV, torch.cat(blocks, 1))
        del AV  # not kept past its step
    Q = torch.cat(blocks, 1)
    blocks.clear()  # only Q lives on into the probes: the blocks would double the basis
    del V  # the last block: Q holds its copy
    g = num_matvecs - spent
    rest, stderr = _mean_stderr(_quadratic_forms(op, g, block_size, generator, Q))  # on (I − QQᵀ) A (I − QQᵀ)
    return TraceResult("krylov-hutch++", sketch + rest, stderr, spent + g, g, sketch)
