"""Block Lanczos with full reorthogonalization, for the top (or bottom) ``k`` eigenpairs.

From an orthonormal start block ``Q₁`` of ``b`` columns, block Lanczos (Cullum &
Donath 1974; Golub & Underwood 1977) builds an orthonormal basis of the block
Krylov space span{Q₁, AQ₁, …, A^{m-1}Q₁} and the block tridiagonal
``T_m = Q_mᵀ A Q_m`` with diagonal blocks ``A_j = Q_jᵀ A Q_j`` and sub-diagonal
blocks ``B_j`` from ``A Q_j − Q_j A_j − Q_{j-1} B_{j-1}ᵀ = Q_{j+1} B_j``. The
eigenpairs ``(θ, s)`` of ``T_m`` give Ritz pairs ``(θ, Q_m s)`` whose residual is
``‖A Q_m s − θ Q_m s‖ = ‖B_m s_last‖`` (``s_last``: the last block's rows of
``s``), the block form of the single-vector bound ``β_m|s_{m,i}|``.

Why a block: one step applies ``A`` to ``b`` columns in one ``matmat``: one pass
over the probe data, which a model operator on CUDA serves as one batched
backward (:class:`probe.model_operator.ModelOperator`, ``batched=None``), and a
block start sees a cluster of ``c ≤ b`` nearly equal eigenvalues at once, where
single-vector Lanczos resolves a multiplicity only through rounding (Parlett,
"The Symmetric Eigenvalue Problem", 1998, §13.12). On the CPU the model
operators run one backward per column, so a step of ``b`` columns costs ``b``
products; whether a block pays is measured in ``bench/bench_block_lanczos.py``.

Every new block is orthogonalized against the whole basis (classical
Gram-Schmidt), then column by column against the basis and the block's earlier
columns twice ("twice is enough") and normalized; directions whose norm after
projection is at most ``breakdown_tol·‖T‖`` are dropped (deflation: the block shrinks; when
none is left the space is invariant). The basis lives in a :mod:`probe.basis`
store as one run of single columns, so ``basis="host"`` and disk stores work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from probe.basis import BasisStore, resolve_basis
from probe.lanczos import RitzPairs, block_ranges, default_breakdown_tol
from probe.operators import CurvatureOperator

__all__ = ["BlockLanczosProcess"]


class BlockLanczosProcess:
    """Block Lanczos from the columns of ``start``, advanced one block product at a time.

    Args:
        op: symmetric operator.
        start: ``(local_dim, b)`` start block (orthonormalized here; dependent
            columns are dropped).
        basis: where the basis lives (:mod:`probe.basis`): ``"device"``, ``"host"``
            or a store.
        max_columns: the most basis columns expected (a store may reserve them).
        breakdown_tol: a direction is dropped when its norm after projection is at
            most ``breakdown_tol·max_j(‖A_j‖ + ‖B_j‖)``; default as
            :class:`probe.lanczos.LanczosProcess`: ``min(100·eps·sqrt(dim), eps^(2/3))``.

    Attributes:
        num_matvecs: operator columns applied so far.
        steps_done: block products (passes) so far.
        size: basis columns whose Ritz values are available (the order of ``T``).
        active: ``(1,)`` bool, False once the Krylov space is invariant.

    Raises:
        ValueError: for a start block of the wrong shape or of rank zero.
    """

    def __init__(
        self,
        op: CurvatureOperator,
        start: Tensor,
        *,
        basis: BasisStore | str = "device",
        max_columns: int | None = None,
        breakdown_tol: float | None = None,
    ) -> None:
        if start.ndim != 2 or start.shape[0] != op.local_dim or start.shape[1] < 1:
            raise ValueError(
                f"start must have shape (local_dim={op.local_dim}, b) with b ≥ 1, got {tuple(start.shape)}; "
                "draw it with op.random_vectors(b, generator=g)"
            )
        self.op = op
        self.breakdown_tol = breakdown_tol if breakdown_tol is not None else default_breakdown_tol(op.dtype, op.dim)
        self._store = resolve_basis(basis)
        self.basis_storage = self._store.name
        capacity = None if max_columns is None else min(op.dim, max_columns) + start.shape[1]
        self._store.allocate(1, op.local_dim, op.dtype, op.device, capacity)
        self._n = 0  # columns stored
        rows = start.T.contiguous()  # (b, local_dim)
        scale = float(self._dots(rows).max().sqrt())
        q, _ = self._orthonormal(rows, self.breakdown_tol * scale)
        if q.shape[0] == 0:
            raise ValueError("the start block is zero; draw start vectors with op.random_vectors")
        self._q = q  # the newest block, rows (b_j, local_dim)
        self._q_prev: Tensor | None = None
        self._put(q)
        self._diag: list[Tensor] = []  # A_j, (b_j, b_j) float64 on the CPU
        self._sub: list[Tensor] = []  # B_j, (b_{j+1}, b_j)
        self._widths: list[int] = []  # b_j of the blocks in T
        self._scale = 0.0
        self.active = torch.ones(1, dtype=torch.bool)
        self.num_matvecs = 0

    @property
    def steps_done(self) -> int:
        return len(self._diag)

    @property
    def size(self) -> int:
        return sum(self._widths)

    @property
    def block_size(self) -> int:
        return self._q.shape[0]

    def _put(self, rows: Tensor) -> None:
        for r in rows:
            self._store.put(self._n, r.unsqueeze(0))
            self._n += 1

    def _dots(self, rows: Tensor) -> Tensor:
        """Squared norms of the rows, reduced over shards, float64 on the CPU."""
        return self.op.allreduce(torch.linalg.vecdot(rows, rows, dim=1)).to("cpu", torch.float64)

    def _blocks(self, n: int) -> list[tuple[int, int]]:
        return block_ranges(self._store.block_size, n)

    def _project_out(self, w: Tensor, extra: Tensor | None = None) -> None:
        """Classical Gram-Schmidt, in place, of the rows of ``w`` against every stored column and
        the orthonormal rows ``extra`` (one set of coefficients from the same ``w``, one allreduce)."""
        blocks = self._blocks(self._n) if self._n else []
        parts = [w @ self._store.get(a, b, run=0).T for a, b in blocks]  # each (c, b-a)
        if extra is not None and extra.shape[0]:
            parts.append(w @ extra.T)
        if not parts:
            return
        coeff = self.op.allreduce(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        for a, b in blocks:
            w.sub_(coeff[:, a:b] @ self._store.get(a, b, run=0))
        if extra is not None and extra.shape[0]:
            w.sub_(coeff[:, self._n :] @ extra)

    def _orthonormal(self, w: Tensor, drop: float) -> tuple[Tensor, Tensor]:
        """Orthonormal rows ``q`` spanning the rows of ``w`` whose part orthogonal to the basis and
        to the earlier rows has norm above ``drop``, and ``B = q wᵀ`` (float64, CPU): ``w ≈ Bᵀ q``.

        Row by row, each projected twice against the basis and the rows kept so far (norms, not
        a Gram matrix, decide the rank: a Gram matrix would square the condition number)."""
        kept = w[:0]
        for i in range(w.shape[0]):
            if self._n + kept.shape[0] >= self.op.dim:
                break  # never more basis columns than the dimension
            v = w[i : i + 1].clone()
            for _ in range(2):
                self._project_out(v, kept)
            nu = float(self._dots(v).sqrt())
            if nu > drop:
                kept = torch.cat([kept, v / nu])
        b = self.op.allreduce(kept @ w.T).to("cpu", torch.float64)  # (c, rows of w)
        return kept.contiguous(), b

    def step(self) -> None:
        """One block product ``A Q_j`` and the next block ``Q_{j+1}`` (no-op once invariant)."""
        if not bool(self.active[0]):
            return
        q = self._q
        w = self.op.matmat(q.T).T.contiguous()  # (b_j, local_dim)
        self.num_matvecs += q.shape[0]
        a = self.op.allreduce(q @ w.T).to("cpu", torch.float64)
        a = (a + a.T) / 2
        w.sub_(a.to(w.device, w.dtype) @ q)
        if self._q_prev is not None:
            w.sub_(self._sub[-1].to(w.device, w.dtype) @ self._q_prev)
        self._project_out(w)  # full reorthogonalization; _orthonormal projects each row twice more
        self._diag.append(a)
        self._widths.append(q.shape[0])
        norm_a = float(torch.linalg.matrix_norm(a, ord=2))
        rest = float(self._dots(w).sum().sqrt())
        self._scale = max(self._scale, norm_a + rest)
        q_next, b = self._orthonormal(w, self.breakdown_tol * self._scale)
        self._sub.append(b)
        if q_next.shape[0] == 0:
            self.active[0] = False
            return
        self._q_prev, self._q = q, q_next
        self._put(q_next)

    def _tridiagonal(self) -> Tensor:
        """``T`` (float64, CPU): the ``A_j`` on the diagonal, the ``B_j`` below and ``B_jᵀ`` above."""
        n = self.size
        t = torch.zeros(n, n, dtype=torch.float64)
        at = 0
        for j, (a, w) in enumerate(zip(self._diag, self._widths, strict=True)):
            t[at : at + w, at : at + w] = a
            if j + 1 < len(self._diag):
                b = self._sub[j]  # (b_{j+1}, b_j)
                t[at + w : at + w + b.shape[0], at : at + w] = b
                t[at : at + w, at + w : at + w + b.shape[0]] = b.T
            at += w
        return t

    def ritz(self, run: int = 0) -> RitzPairs:
        """Ritz pairs after the steps so far: values ascending, start-block weights ``‖s_first‖²``,
        residual bounds ``‖B_m s_last‖`` and the eigenvectors of ``T`` (``run`` must be 0)."""
        if run != 0:
            raise ValueError(f"block Lanczos has one run, got run={run}")
        values, vectors = torch.linalg.eigh(self._tridiagonal())
        first, last = self._widths[0], self._widths[-1]
        weights = (vectors[:first] ** 2).sum(0)
        bounds = (self._sub[-1] @ vectors[-last:]).norm(dim=0)  # (0, n) @ … gives zeros once invariant
        return RitzPairs(values, weights, bounds, vectors)

    def ritz_vectors(self, coeffs: Tensor, run: int = 0) -> Tensor:
        """``Q @ coeffs`` for ``coeffs`` of shape ``(size, c)`` in the operator's dtype: ``(local_dim, c)``."""
        out = None
        for a, b in self._blocks(coeffs.shape[0]):
            part = self._store.get(a, b, run=0).T @ coeffs[a:b]
            out = part if out is None else out + part
        if out is None:
            raise ValueError(f"coeffs must have at least one row, got shape {tuple(coeffs.shape)}")
        return out

    def orthogonality_loss(self) -> float:
        """``max_{i≠j} |q_iᵀq_j|`` and ``max_i |q_iᵀq_i − 1|`` over the basis columns in ``T``."""
        n = self.size
        blocks = self._blocks(n)
        worst = 0.0
        for i, (a, b) in enumerate(blocks):
            left = self._store.get(a, b, run=0)
            for c, d in blocks[: i + 1]:
                g = self.op.allreduce(left @ self._store.get(c, d, run=0).T).to("cpu", torch.float64)
                if c == a:
                    g = g - torch.eye(b - a, dtype=torch.float64)
                worst = max(worst, float(g.abs().max()))
        return worst
