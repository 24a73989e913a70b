"""The one operator protocol every estimator consumes, and a dense operator.

An operator is a symmetric linear map on flat 1-D vectors of length ``dim``. The
estimators in this package (Lanczos, SLQ, trace, power iteration) touch only:

- ``shape``, ``dtype``, ``device``;
- ``matmat(V)``: ``A @ V`` for ``V`` of shape ``(dim, k)``; ``matvec`` and ``@``
  derive from it;
- ``allreduce(t)``: sum a tensor of partial results over every shard of the
  vectors. A single-process operator returns ``t`` unchanged; an operator whose
  vectors are sharded over workers sums across them, so that ``inner`` is the
  inner product of the full vectors.

Vectors an operator takes and returns are its *local* shard (the whole vector in
a single process). Nothing here reads files, logs or looks at a clock.
"""

from __future__ import annotations

import torch
from torch import Tensor

from probe.progress import ProgressHook, report_products

__all__ = ["CurvatureOperator", "DenseOperator", "inner", "norm", "RANDOM_CHUNK_ROWS"]

# Rows of random vectors drawn at once (a multiple of 16: torch's CPU sampler works in groups of 16).
RANDOM_CHUNK_ROWS = 1 << 22


class CurvatureOperator:
    """Base class: shape checks, ``matvec``/``@`` from ``matmat``, local inner product.

    Subclasses set ``dim`` (the global dimension), ``local_dim`` (the length of
    this process's shard; equal to ``dim`` when unsharded), ``dtype`` and
    ``device``, and implement ``_matmat(V)`` on a checked ``(local_dim, k)`` input.
    """

    dim: int
    local_dim: int
    dtype: torch.dtype
    device: torch.device
    # optional listener told of every product (probe.progress.ProgressHook); None: nobody listens
    progress: ProgressHook | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def allreduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over all shards of the vectors (identity when unsharded)."""
        return t

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``A @ V`` for ``V`` of shape ``(local_dim, k)``.

        Raises:
            ValueError: if ``V`` is not 2-D with ``local_dim`` rows, or its dtype or
                device differ from the operator's.
        """
        if V.ndim != 2 or V.shape[0] != self.local_dim:
            raise ValueError(
                f"matmat expects a tensor of shape (local_dim={self.local_dim}, k), "
                f"got shape {tuple(V.shape)}; reshape the input to ({self.local_dim}, k)"
            )
        self._check_dtype_device(V)
        out = self._matmat(V)
        report_products(self, V.shape[1])
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``A @ v`` for ``v`` of shape ``(local_dim,)``.

        Raises:
            ValueError: if ``v`` is not 1-D of length ``local_dim``, or has the wrong
                dtype or device.
        """
        if v.ndim != 1 or v.shape[0] != self.local_dim:
            raise ValueError(
                f"matvec expects a tensor of shape (local_dim={self.local_dim},), "
                f"got shape {tuple(v.shape)}; pass a flat vector of length {self.local_dim}"
            )
        self._check_dtype_device(v)
        out = self._matmat(v.unsqueeze(1)).squeeze(1)
        report_products(self, 1)
        return out

    def __matmul__(self, x: Tensor) -> Tensor:
        return self.matvec(x) if x.ndim == 1 else self.matmat(x)

    def _check_dtype_device(self, x: Tensor) -> None:
        if x.dtype != self.dtype:
            raise ValueError(
                f"operator dtype is {self.dtype}, got a vector of dtype {x.dtype}; convert it with .to({self.dtype})"
            )
        if x.device != self.device:
            raise ValueError(
                f"operator device is {self.device}, got a vector on {x.device}; move it with .to('{self.device}')"
            )

    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def local_slice(self) -> slice:
        """Which entries of a global vector this process holds (all of them when unsharded)."""
        return slice(0, self.dim)

    def random_vectors(self, k: int, *, generator: torch.Generator | None, kind: str = "rademacher") -> Tensor:
        """Draw ``k`` random global vectors and return this process's shard, ``(local_dim, k)``.

        The full vectors are drawn on the CPU from ``generator``, in the operator's
        dtype, and then sliced, so the same seed gives the same vectors however the
        dimension is sharded. Above ``RANDOM_CHUNK_ROWS`` rows they are drawn in
        blocks of that many rows (the same blocks on every process) and only this
        shard's rows are kept: memory O(block + local_dim), not O(dim), on a
        pipeline stage of a large model.

        Args:
            k: number of vectors (columns).
            generator: the shared random stream; every process must pass one in the same state.
            kind: ``"rademacher"`` (entries ±1) or ``"gaussian"`` (standard normal).
        """
        if kind == "rademacher":

            def draw(rows: int) -> Tensor:
                return torch.randint(0, 2, (rows, k), generator=generator, dtype=self.dtype).mul_(2).sub_(1)
        elif kind == "gaussian":

            def draw(rows: int) -> Tensor:
                return torch.randn(rows, k, generator=generator, dtype=self.dtype)
        else:
            raise ValueError(f"kind must be 'rademacher' or 'gaussian', got kind={kind!r}")
        if self.dim <= RANDOM_CHUNK_ROWS:
            return draw(self.dim)[self.local_slice].to(dtype=self.dtype, device=self.device)
        lo, hi = self.local_slice.start, self.local_slice.stop
        parts = []
        for start in range(0, self.dim, RANDOM_CHUNK_ROWS):
            block = draw(min(RANDOM_CHUNK_ROWS, self.dim - start))  # drawn by every process: the stream stays shared
            a, b = max(lo, start), min(hi, start + block.shape[0])
            if a < b:
                parts.append(block[a - start : b - start])
        return torch.cat(parts).to(dtype=self.dtype, device=self.device)

    def check_determinism(self, *, generator: torch.Generator | None = None) -> float:
        """Apply the operator twice to one random vector; return the relative difference.

        Non-zero values reveal non-deterministic kernels (atomics on GPU, dropout left
        on). Returns ``||Av - Av'|| / ||Av||`` (0.0 for a deterministic operator).
        """
        v = self.random_vectors(1, generator=generator, kind="gaussian")[:, 0]
        a, b = self.matvec(v), self.matvec(v)
        denom = norm(self, a).item()
        return float(norm(self, a - b).item() / denom) if denom > 0 else 0.0


def inner(op: CurvatureOperator, x: Tensor, y: Tensor) -> Tensor:
    """Column-wise inner products of ``x`` and ``y`` (shape ``(local_dim, ...)``), reduced over shards."""
    return op.allreduce((x * y).sum(dim=0))


def norm(op: CurvatureOperator, x: Tensor) -> Tensor:
    """Column-wise Euclidean norms of ``x`` (shape ``(local_dim, ...)``), reduced over shards."""
    return inner(op, x, x).clamp_min(0).sqrt()


class DenseOperator(CurvatureOperator):
    """A symmetric matrix held in memory; the reference operator for tests.

    Args:
        matrix: square tensor of shape ``(dim, dim)``. It is used as given; symmetry
            is checked to ``symmetry_tol`` relative to its largest entry.

    Raises:
        ValueError: if ``matrix`` is not square or not symmetric.

    Example:
        A diagonal matrix has its diagonal as eigenvalues, and their sum as trace:

        >>> import torch
        >>> from probe import eigenvalues, spectral_density, trace
        >>> op = DenseOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0, 0.5], dtype=torch.float64)))
        >>> g = torch.Generator().manual_seed(0)
        >>> eigenvalues(op, k=2, which="largest", generator=g).eigenvalues.round(decimals=10).tolist()
        [3.0, 1.0]
        >>> eigenvalues(op, k=1, which="smallest", generator=g).eigenvalues.round(decimals=10).tolist()
        [-2.0]
        >>> round(trace(op, method="hutch++", num_matvecs=12, generator=g).trace, 10)
        2.5

        Four Lanczos steps on a 4 × 4 matrix find every eigenvalue (the Ritz values):

        >>> ritz = spectral_density(op, runs=2, steps=4, generator=g).ritz_values[0]
        >>> ritz.sort().values.round(decimals=10).tolist()
        [-2.0, 0.5, 1.0, 3.0]
    """

    def __init__(self, matrix: Tensor, *, symmetry_tol: float = 1e-6) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        scale = matrix.abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
        asym = ((matrix - matrix.T).abs().max() / scale).item()
        if asym > symmetry_tol:
            raise ValueError(
                f"matrix must be symmetric, got relative asymmetry {asym:.3g} > "
                f"symmetry_tol={symmetry_tol:g}; symmetrize it with (A + A.T) / 2"
            )
        self.matrix = matrix
        self.dim = self.local_dim = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V
