"""The Lanczos process on a symmetric operator, several start vectors at once.

Lanczos (1950) builds, from a start vector ``q₁``, an orthonormal basis ``Q_m`` of
the Krylov space span{q₁, Aq₁, …, A^{m-1}q₁} and the tridiagonal
``T_m = Q_mᵀ A Q_m`` with diagonal ``alphas`` and off-diagonal ``betas``. The
eigenvalues of ``T_m`` (Ritz values) approximate the extremes of A's spectrum;
the squared first components of its eigenvectors are the weights of the Gauss
quadrature rule with ``q₁ᵀ f(A) q₁ ≈ Σᵢ wᵢ f(θᵢ)``, exact for polynomials of
degree < 2m (Golub & Meurant, "Matrices, Moments and Quadrature", 2010).

``k`` independent processes advance together: one ``A.matmat`` per step serves
all of them, so ``k`` SLQ runs cost one pass over the probe data per step.

Reorthogonalization (``reorth``):
  - ``"full"``: classical Gram-Schmidt against the whole basis, repeated once when
    the first pass cancels much of the vector ("twice is enough", Giraud et al.
    2005). Costs ``m·dim`` memory per process.
  - ``"selective"``: against Ritz vectors that have converged (residual bound
    below ``sqrt(eps)·‖T‖``), after Parlett & Scott (1979): orthogonality is lost
    only in the direction of converged Ritz vectors, so that suffices to
    prevent spurious copies ("ghosts") of extreme eigenvalues.
  - ``"none"``: the plain three-term recurrence; ghosts appear once Ritz values
    converge. The quadrature moments stay accurate (Paige 1976; Meurant &
    Strakoš 2006), so SLQ remains usable when the basis cannot be stored.

Where the basis lives is a :mod:`probe.basis` store (``basis=``): on the device
(default), in host memory, or on disk (``cluster.basis.DiskBasis``). The
projections read it in blocks of at most ``block_size`` vectors per run, so the
device holds ``runs × block_size × local_dim`` basis entries at a time; the
results do not depend on the store beyond rounding.

The tridiagonal and its eigendecomposition are always float64 and ``eigh``
(symmetric; never a general ``eig``). Breakdown (``β_j ≈ 0``: the Krylov space is
invariant and the Ritz values are exact) ends a run early and is reported, as is
the achieved loss of orthogonality ``max_{i≠j} |q_iᵀq_j|`` whenever the basis is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from probe.basis import BasisStore, resolve_basis
from probe.operators import CurvatureOperator, norm
from probe.progress import report_steps

__all__ = ["LanczosProcess", "LanczosResult", "RitzPairs", "lanczos", "REORTH_MODES"]

REORTH_MODES = ("full", "selective", "none")
_DOT_LOOP_MIN_DIM = 65_536  # rows at least this long: one dot per run (see LanczosProcess._dots)


@dataclass(frozen=True)
class RitzPairs:
    """Ritz values of one run, ascending, with quadrature weights and residual bounds.

    ``residual_bounds[i] = β_m |s_{m,i}|`` bounds ``‖A y_i − θ_i y_i‖`` for the Ritz
    vector ``y_i = Q_m s_i`` (exact arithmetic; with lost orthogonality a Ritz
    value may be a ghost copy). ``vectors`` are the eigenvectors ``S`` of ``T_m``.
    """

    values: Tensor  # (n,)
    weights: Tensor  # (n,), sum to 1
    residual_bounds: Tensor  # (n,)
    vectors: Tensor  # (n, n)


@dataclass(frozen=True)
class LanczosResult:
    """Recurrence coefficients and diagnostics of ``k`` Lanczos runs.

    Attributes:
        alphas: ``(k, m)`` float64 diagonals; entries past ``num_steps[r]`` are 0.
        betas: ``(k, m)`` float64; ``betas[r, j]`` is the norm of the residual after
            step ``j`` (``betas[r, :n-1]`` is the off-diagonal of run ``r``'s ``T``).
        num_steps: ``(k,)`` steps completed per run (fewer than ``m`` after breakdown).
        breakdown: ``(k,)`` whether run ``r`` broke down (found an invariant subspace).
        orthogonality_loss: ``(k,)`` ``max_{i≠j} |q_iᵀq_j|`` over the basis, NaN when
            the basis was not kept.
        start_norms: ``(k,)`` norms of the start vectors (the quadrature of
            ``vᵀf(A)v`` is ``start_norms² · Σ wᵢ f(θᵢ)``).
        reorth: the reorthogonalization mode used.
        num_matvecs: operator applications (columns) spent.
        basis: ``(m+1, local_dim, k)`` orthonormal basis shard when kept, else None; a
            view where the store keeps it (device, host memory or a disk store's
            mapped file; on POSIX a mapping stays readable after its file is removed).
        basis_storage: where the basis was kept: the store's name (``"device"``,
            ``"host"``, ``"disk"``), or ``"none"`` when it was not kept.
    """

    alphas: Tensor
    betas: Tensor
    num_steps: Tensor
    breakdown: Tensor
    orthogonality_loss: Tensor
    start_norms: Tensor
    reorth: str
    num_matvecs: int
    basis: Tensor | None = None
    basis_storage: str = "device"

    @property
    def num_runs(self) -> int:
        return self.alphas.shape[0]

    def tridiagonal(self, run: int = 0) -> Tensor:
        """The ``(n, n)`` float64 tridiagonal ``T`` of run ``run``."""
        n = int(self.num_steps[run])
        a, b = self.alphas[run, :n], self.betas[run, : n - 1]
        return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)

    def ritz(self, run: int = 0) -> RitzPairs:
        """Ritz values, quadrature weights and residual bounds of run ``run``."""
        n = int(self.num_steps[run])
        values, vectors = torch.linalg.eigh(self.tridiagonal(run))
        last_beta = 0.0 if bool(self.breakdown[run]) else float(self.betas[run, n - 1])
        return RitzPairs(
            values=values,
            weights=vectors[0] ** 2,
            residual_bounds=(last_beta * vectors[-1]).abs(),
            vectors=vectors,
        )


def default_breakdown_tol(dtype: torch.dtype, dim: int) -> float:
    """The β below which the recurrence counts as broken down (the Krylov space exhausted).

    Rounding leaves a residual of about eps·sqrt(dim)·‖A‖ after the Krylov space is exhausted;
    a hundred times that counts as an exact zero (ten times missed a breakdown at 3e-15·‖T‖ in
    a test), capped at eps^(2/3) (2.4e-5 in float32) so that large float32 runs do not stop on
    a small β.
    """
    eps = torch.finfo(dtype).eps
    return min(100 * eps * math.sqrt(dim), eps ** (2 / 3))


def block_ranges(size: int | None, n: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of at most ``size`` vectors (None: all at once) covering the first ``n``."""
    if size is None or size >= n:
        return [(0, n)]
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _tridiagonal(alphas: list[Tensor], betas: list[Tensor], col: int) -> Tensor:
    a = torch.stack([x[col] for x in alphas])
    b = torch.stack([x[col] for x in betas[: len(alphas) - 1]]) if len(alphas) > 1 else a[:0]
    return torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)


class LanczosProcess:
    """Advance ``k`` Lanczos runs step by step (one ``matmat`` per step).

    Args:
        op: the symmetric operator.
        start: ``(local_dim, k)`` start vectors (normalized here; need not be unit).
        reorth: ``"full"``, ``"selective"`` or ``"none"``.
        keep_basis: keep every basis vector (needed for eigenvectors and to measure
            orthogonality). Defaults to True except for ``reorth="none"``.
        basis: where the kept basis lives: ``"device"`` (default), ``"host"`` or a
            :class:`probe.basis.BasisStore` (e.g. ``cluster.basis.DiskBasis``). Ignored
            when the basis is not kept. The caller owns a store it passes (and closes it).
        max_steps: the most steps expected, so a store can reserve ``max_steps+1``
            vectors per run at once; None lets it grow.
        breakdown_tol: a run breaks down when ``β_j ≤ breakdown_tol · max_j(|α_j| + β_j)``;
            default ``min(100·eps·sqrt(dim), eps^(2/3))`` of the operator's dtype.

    Raises:
        ValueError: for an unknown ``reorth``, ``keep_basis=False`` with a
            reorthogonalizing mode, a start block of the wrong shape, a zero
            start vector, or an unknown ``basis``.
    """

    def __init__(
        self,
        op: CurvatureOperator,
        start: Tensor,
        *,
        reorth: str = "full",
        keep_basis: bool | None = None,
        breakdown_tol: float | None = None,
        basis: BasisStore | str = "device",
        max_steps: int | None = None,
    ) -> None:
        if reorth not in REORTH_MODES:
            raise ValueError(f"reorth must be one of {REORTH_MODES}, got reorth={reorth!r}")
        keep_basis = reorth != "none" if keep_basis is None else keep_basis
        if reorth != "none" and not keep_basis:
            raise ValueError(f"reorth={reorth!r} needs the basis; pass keep_basis=True or reorth='none'")
        if start.ndim != 2 or start.shape[0] != op.local_dim:
            raise ValueError(
                f"start must have shape (local_dim={op.local_dim}, k), got {tuple(start.shape)}; "
                "pass one column per run, e.g. op.random_vectors(k, generator=g)"
            )
        self.op = op
        self.reorth = reorth
        self.keep_basis = keep_basis
        self.k = start.shape[1]
        eps = torch.finfo(op.dtype).eps
        self.breakdown_tol = breakdown_tol if breakdown_tol is not None else default_breakdown_tol(op.dtype, op.dim)
        self._sqrt_eps = math.sqrt(eps)
        self.start_norms = norm(op, start).to("cpu", torch.float64)
        if bool((self.start_norms == 0).any()):
            zero = torch.nonzero(self.start_norms == 0).flatten().tolist()
            raise ValueError(
                f"a start vector is zero; draw start vectors with op.random_vectors (zero columns: {zero})"
            )
        q = start / self.start_norms.to(start.device, start.dtype)
        # The recurrence's last two vectors stay on the device, run-major (k, local_dim);
        # the whole basis, when kept, goes to the store (projections are batched
        # products over its blocks).
        self._q = q.T.contiguous()
        self._q_prev: Tensor | None = None
        self._store = resolve_basis(basis) if keep_basis else None
        self.basis_storage = self._store.name if self._store is not None else "none"
        if self._store is not None:
            capacity = None if max_steps is None else max_steps + 1
            self._store.allocate(self.k, op.local_dim, op.dtype, op.device, capacity)
            self._store.put(0, self._q)
        self._n = 1  # vectors produced (and stored, when keep_basis)
        self.alphas: list[Tensor] = []  # each (k,) float64
        self.betas: list[Tensor] = []
        self.active = torch.ones(self.k, dtype=torch.bool)
        self.num_steps = torch.zeros(self.k, dtype=torch.long)
        self.num_matvecs = 0
        self._scale = torch.zeros(self.k, dtype=torch.float64)
        self.max_steps = max_steps

    @property
    def steps_done(self) -> int:
        return len(self.alphas)

    @property
    def basis(self) -> Tensor | None:
        """The stored basis vectors, run-major ``(k, n, local_dim)``.

        A view where the store keeps them; None if not kept.
        """
        return self._store.view(self._n) if self._store is not None else None

    def _kept(self) -> BasisStore:
        """The basis store, for the steps that read the basis (reorthogonalization, Ritz vectors, Gram)."""
        if self._store is None:
            raise ValueError("this needs the Lanczos basis; pass keep_basis=True")
        return self._store

    def _blocks(self, n: int) -> list[tuple[int, int]]:
        """``[start, stop)`` ranges of at most the store's ``block_size`` vectors covering the first ``n``."""
        return block_ranges(self._kept().block_size, n)

    def _push(self, q_next: Tensor) -> None:
        """Make ``q_next`` (run-major ``(k, local_dim)``, contiguous) the newest basis vector."""
        self._q_prev, self._q = self._q, q_next
        if self._store is not None:
            self._store.put(self._n, self._q)
        self._n += 1

    def _dots(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-run inner products of run-major ``(k, local_dim)`` blocks, reduced over shards.

        Long rows go through one ``dot`` per run: on 1.1M entries that read the
        block at memory speed, 4-15× faster than ``vecdot``, ``bmm`` or ``(a*b).sum``,
        which win only on short rows."""
        if a.shape[1] < _DOT_LOOP_MIN_DIM:
            local = torch.linalg.vecdot(a, b, dim=1)
        else:
            local = torch.stack([torch.dot(x, y) for x, y in zip(a, b, strict=True)])
        return self.op.allreduce(local)

    def step(self) -> None:
        """One Lanczos step for every run that has not broken down.

        The vectors stay run-major ``(k, local_dim)`` and are updated in place, so a
        step makes about ten passes over a block of ``k·local_dim`` entries plus
        the projections' two reads of the basis (on 1.1M parameters the element-wise
        work of an earlier column-major form cost as much as the projections)."""
        op = self.op
        q = self._q  # (k, local_dim)
        w = op.matmat(q.T).T.contiguous()  # a no-op copy for the model operators, which return run-major blocks
        self.num_matvecs += self.k
        alpha_dev = self._dots(q, w)
        w.addcmul_(q, alpha_dev.unsqueeze(1), value=-1)
        if self.betas:
            assert self._q_prev is not None  # set by the first step, which appended betas[0]
            w.addcmul_(self._q_prev, self.betas[-1].to(w.device, w.dtype).unsqueeze(1), value=-1)
        sq = None  # squared norms of w once known
        if self.reorth == "full":
            before = self._dots(w, w)
            self._project_out(w)
            sq = self._dots(w, w)
            # A second pass only when the first removed much of w (Kahan-Parlett
            # "twice is enough": ‖w'‖² < ‖w‖²/2 signals cancellation).
            if bool((sq < before / 2).any()):
                self._project_out(w)
                sq = self._dots(w, w)
        # The recurrence coefficients live on the CPU in float64, whatever the device.
        alpha = alpha_dev.to("cpu", torch.float64)
        if self.reorth == "selective":
            sq = self._selective(w, alpha)
        if sq is None:
            sq = self._dots(w, w)
        beta = sq.clamp_min(0).sqrt().to("cpu", torch.float64)
        self._scale = torch.maximum(self._scale, alpha.abs() + beta)
        broke = self.active & (beta <= self.breakdown_tol * self._scale)
        alpha = torch.where(self.active, alpha, torch.zeros_like(alpha))
        beta = torch.where(self.active & ~broke, beta, torch.zeros_like(beta))
        self.num_steps += self.active.long()
        self.active &= ~broke
        self.alphas.append(alpha)
        self.betas.append(beta)
        safe = torch.where(beta > 0, beta, torch.ones_like(beta)).to(w.device, w.dtype)
        w.div_(safe.unsqueeze(1))
        if not bool(self.active.all()):
            w[~self.active.to(w.device)] = 0
        self._push(w)
        report_steps(op, self.steps_done, self.max_steps)

    def ritz(self, run: int = 0) -> RitzPairs:
        """Ritz pairs of run ``run`` after the steps so far (cheap: no basis work)."""
        n = int(self.num_steps[run])
        values, vectors = torch.linalg.eigh(_tridiagonal(self.alphas[:n], self.betas, run))
        last_beta = float(self.betas[n - 1][run]) if bool(self.active[run]) else 0.0
        return RitzPairs(values, vectors[0] ** 2, (last_beta * vectors[-1]).abs(), vectors)

    def _project_out(self, w: Tensor) -> None:
        """Classical Gram-Schmidt, in place, of each run's row of ``w`` (``(k, local_dim)``) against its basis.

        Two passes over the store's blocks: all coefficients ``Qᵀw`` from the same
        ``w`` (one allreduce), then ``w −= Q·coeff`` block by block.
        """
        blocks = self._blocks(self._n)
        w_row = w.unsqueeze(1)  # (k, 1, local_dim), a view: updated in place below
        # Row form (w as a 1×d matrix against the stored n×d blocks) reads each block
        # once at memory speed; the column form measured 1.3-2.8× slower.
        store = self._kept()
        parts = [torch.bmm(w_row, store.get(a, b).transpose(1, 2)) for a, b in blocks]  # each (k, 1, b-a)
        coeff = self.op.allreduce(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))  # (k, 1, n)
        for a, b in blocks:
            w_row.baddbmm_(coeff[:, :, a:b], store.get(a, b), alpha=-1)

    def ritz_vectors(self, coeffs: Tensor, run: int = 0) -> Tensor:
        """``Q_n @ coeffs``: combinations of run ``run``'s first ``n`` basis vectors, ``(local_dim, c)``.

        ``coeffs`` is ``(n, c)`` in the operator's dtype and device, e.g. eigenvectors
        of ``T`` (Ritz vectors). Formed block by block from the store.

        Raises:
            ValueError: if the basis was not kept.
        """
        if self._store is None:
            raise ValueError("Ritz vectors need the basis; pass keep_basis=True")
        out = None
        for a, b in self._blocks(coeffs.shape[0]):
            part = self._store.get(a, b, run=run).T @ coeffs[a:b]
            out = part if out is None else out + part
        if out is None:
            raise ValueError(f"coeffs must have at least one row, got shape {tuple(coeffs.shape)}")
        return out

    def _selective(self, w: Tensor, alpha: Tensor) -> Tensor:
        """Orthogonalize, in place, each run's row of ``w`` against its Ritz vectors whose residual
        bound says they have converged; return the squared norms of the rows after."""
        alphas = self.alphas + [alpha]
        sq = self._dots(w, w)
        beta_next = sq.clamp_min(0).sqrt().to("cpu", torch.float64)
        changed = False
        for col in range(self.k):
            if not bool(self.active[col]):
                continue
            values, vectors = torch.linalg.eigh(_tridiagonal(alphas, self.betas, col))
            bound = (beta_next[col] * vectors[-1]).abs()
            scale = values.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
            good = bound <= self._sqrt_eps * scale
            if not bool(good.any()):
                continue
            s = vectors[:, good].to(w.device, w.dtype)  # (j+1, c)
            ritz_vectors = self.ritz_vectors(s, col)  # (local_dim, c): the basis has j+1 vectors
            for _ in range(2):
                coeff = self.op.allreduce(ritz_vectors.T @ w[col])
                w[col] -= ritz_vectors @ coeff
            changed = True
        return self._dots(w, w) if changed else sq

    def result(self) -> LanczosResult:
        """Freeze what has been computed so far into a :class:`LanczosResult`."""
        m = self.steps_done
        alphas = torch.stack(self.alphas, dim=1) if m else torch.zeros(self.k, 0, dtype=torch.float64)
        betas = torch.stack(self.betas, dim=1) if m else torch.zeros(self.k, 0, dtype=torch.float64)
        kept = self.basis
        basis = kept.permute(1, 2, 0) if kept is not None else None  # (m+1, local_dim, k) view
        if basis is not None:
            n = self._n
            gram = self.op.allreduce(self._gram(n)).to("cpu", torch.float64)
            # Only pairs inside each run's completed steps (later vectors are zero).
            mask = torch.zeros(self.k, n, n, dtype=torch.bool)
            for r in range(self.k):
                valid = int(self.num_steps[r]) + int(self.active[r])  # q_{n+1} exists unless broken down
                mask[r, :valid, :valid] = True
            off = (gram - torch.eye(n, dtype=torch.float64)).abs() * mask
            ortho = off.amax(dim=(1, 2))
        else:
            ortho = torch.full((self.k,), float("nan"), dtype=torch.float64)
        return LanczosResult(
            alphas=alphas,
            betas=betas,
            num_steps=self.num_steps.clone(),
            breakdown=~self.active.clone(),
            orthogonality_loss=ortho,
            start_norms=self.start_norms,
            reorth=self.reorth,
            num_matvecs=self.num_matvecs,
            basis=basis,
            basis_storage=self.basis_storage,
        )

    def _gram(self, n: int) -> Tensor:
        """Local ``(k, n, n)`` Gram matrices of the first ``n`` basis vectors, two blocks on the device at a time."""
        store = self._kept()
        blocks = self._blocks(n)
        if len(blocks) == 1:
            q = store.get(0, n)
            return torch.bmm(q, q.transpose(1, 2))
        gram = None
        for i, (a, b) in enumerate(blocks):
            left = store.get(a, b)
            for c, d in blocks[: i + 1]:
                right = left if c == a else store.get(c, d)
                g = torch.bmm(left, right.transpose(1, 2))  # (k, b-a, d-c)
                if gram is None:
                    gram = torch.empty(self.k, n, n, dtype=g.dtype, device=g.device)
                gram[:, a:b, c:d] = g
                gram[:, c:d, a:b] = g.transpose(1, 2)
        assert gram is not None  # n ≥ 1: at least one block
        return gram


def lanczos(
    op: CurvatureOperator,
    start: Tensor,
    num_steps: int,
    *,
    reorth: str = "full",
    keep_basis: bool | None = None,
    basis: BasisStore | str = "device",
) -> LanczosResult:
    """Run ``num_steps`` Lanczos steps from each column of ``start`` (``(local_dim, k)``).

    Runs that break down stop early (see :class:`LanczosResult`). See
    :class:`LanczosProcess` for the arguments; ``basis`` says where the kept basis
    lives (:mod:`probe.basis`), and the result records it in ``basis_storage``.

    Raises:
        ValueError: if ``num_steps`` is not in ``[1, dim]``, or as :class:`LanczosProcess`.
    """
    if not 1 <= num_steps <= op.dim:
        raise ValueError(
            f"num_steps must be in [1, dim={op.dim}], got num_steps={num_steps}; choose a step count in that range"
        )
    process = LanczosProcess(op, start, reorth=reorth, keep_basis=keep_basis, basis=basis, max_steps=num_steps)
    for _ in range(num_steps):
        process.step()
        if not bool(process.active.any()):
            break
    return process.result()
