"""Directions in the flat parameter space for loss surfaces (Li et al. 2018).

Li, Xu, Taylor, Studer and Goldstein, "Visualizing the loss landscape of neural
nets" (NeurIPS 2018), plot ``L(θ + α·d₁ + β·d₂)`` around a solution θ. Three
sources of directions are provided:

- **random** (:func:`random_direction`, :func:`random_directions`): Gaussian
  ``d ~ N(0, I)`` rescaled by :func:`normalize`. Unnormalized Gaussian directions
  are misleading: a ReLU network whose layer ``l`` is scaled by ``a`` and layer
  ``l+1`` by ``1/a`` computes the same function, but a fixed step ``α·d`` is large
  for the shrunk layer and small for the grown one, so the surface (and its
  apparent sharpness) changes with the parameterization (Li et al. Sec. 3).
- **eigen** (:func:`eigen_directions`): the top Hessian eigenvectors (Lanczos,
  :func:`probe.eigen.eigenvalues`), unit vectors; along ``v`` with ``Hv = λv``
  the surface's curvature at 0 is λ.
- **pca** (:func:`pca_directions`): principal components of an optimization
  trajectory relative to its end point (Li et al. Sec. 7), unit vectors.

Normalization (:func:`normalize`), for a direction ``d`` and center θ, per
parameter tensor ``d_p``, ``θ_p``:

- ``"filter"`` (Li et al. Sec. 4, Eq. 1): for each filter ``i`` of a weight
  tensor of ≥ 2 dimensions, ``d_{p,i} ← d_{p,i} · ‖θ_{p,i}‖ / ‖d_{p,i}‖``. A
  filter is a slice along dimension 0: the output row ``W[i, :]`` of a Linear
  weight, the output channel ``W[i, :, :, :]`` of a Conv weight (and, for an
  Embedding, one embedding row).
- ``"layer"``: ``d_p ← d_p · ‖θ_p‖ / ‖d_p‖`` per parameter tensor.
- ``"weight"``: ``d_p ← d_p ⊙ |θ_p|`` elementwise (Li et al.'s code multiplies by
  θ itself; with a symmetric Gaussian d the two have the same distribution).
- ``"none"``: ``d`` as given.

1-D (and 0-D) tensors (biases, BatchNorm/LayerNorm scales and shifts) have their
direction entries set to zero by default (``ignore_1d=True``): Li et al. Sec. 4,
"we do not perturb bias and batchnorm parameters" (their code's
``ignore='biasbn'``). With ``ignore_1d=False`` a 1-D tensor is one filter under
``"filter"`` and ``"layer"`` (rescaled to ``‖θ_p‖``) and elementwise under
``"weight"``; Li et al.'s code instead copies θ_p into the direction there.

Invariance this buys: when every filter of a tensor is scaled by the same factor
(a whole layer times ``a``, the next times ``1/a``), the filter-, layer- and
weight-normalized directions scale with it and the surface is unchanged. Scaling
individual units (``W₁[i,:]·a_i``, ``W₂[:,i]/a_i``) is compensated exactly only in
the scaled layer's rows: the next layer's rows mix units with different factors,
so no per-row rescaling undoes it (a limit of filter normalization itself).

All functions are pure: randomness comes in as a ``torch.Generator``; nothing is
read from the model except through the arguments given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from probe.eigen import eigenvalues
from probe.operators import CurvatureOperator
from probe.params import ParameterSpace

__all__ = [
    "Directions",
    "NORMALIZATIONS",
    "DIRECTION_KINDS",
    "eigen_directions",
    "normalize",
    "pca_directions",
    "random_direction",
    "random_directions",
]

NORMALIZATIONS = ("filter", "layer", "weight", "none")
DIRECTION_KINDS = ("random", "eigen", "pca", "given")


@dataclass(frozen=True)
class Directions:
    """A set of ``k`` directions in the flat parameter space and where they came from.

    Attributes:
        vectors: ``(k, dim)`` directions, one per row, in the model's dtype/device.
        kind: ``"random"``, ``"eigen"``, ``"pca"`` or ``"given"``.
        normalization: one of :data:`NORMALIZATIONS` (``"none"`` for eigen and PCA
            directions, which are unit vectors).
        ignore_1d: whether the entries of 1-D parameters were zeroed.
        eigenvalues: ``(k,)`` float64 Hessian eigenvalues for ``kind="eigen"``, else None.
        explained_variance_ratio: ``(k,)`` float64 share of the trajectory's variance
            along each component for ``kind="pca"``, else None.
        trajectory_coordinates: ``(n, k)`` float64 coordinates of ``θ_i − center`` in
            the directions' basis for ``kind="pca"`` (to draw the path on a surface).
        note: numerical trouble met while computing them (e.g. Lanczos not
            converged), or ``""``.
    """

    vectors: Tensor
    kind: str
    normalization: str
    ignore_1d: bool
    eigenvalues: Tensor | None = None
    explained_variance_ratio: Tensor | None = None
    trajectory_coordinates: Tensor | None = None
    note: str = ""

    @property
    def k(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def random_direction(
    space: ParameterSpace,
    generator: torch.Generator | None,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """A Gaussian direction ``d ~ N(0, I_dim)`` in ``space``, shape ``(dim,)``.

    The draw is made on the CPU in float64 from ``generator`` and then converted, so
    one seed gives the same direction (to rounding) for every dtype and device, and
    for every model with the same parameter shapes (the reparameterization tests
    rely on this). Pass ``generator=None`` only to use torch's global generator.
    """
    return torch.randn(space.dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


def _check_flat(name: str, t: Tensor, space: ParameterSpace) -> None:
    if not isinstance(t, Tensor) or t.ndim != 1 or t.shape[0] != space.dim:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(
            f"{name} must be a flat vector of shape (dim={space.dim},), got {got}; "
            "flatten per-parameter tensors with ParameterSpace.flatten"
        )


def normalize(
    direction: Tensor,
    center: Tensor,
    space: ParameterSpace,
    mode: str = "filter",
    *,
    ignore_1d: bool = True,
) -> Tensor:
    """Rescale ``direction`` to the scale of ``center`` per filter, layer or weight.

    See the module docstring for the formulas. A filter (or tensor) whose
    direction is zero stays zero (there is nothing to rescale); a filter of θ that
    is zero gives a zero direction there.

    Args:
        direction: ``(dim,)`` raw direction (e.g. from :func:`random_direction`).
        center: ``(dim,)`` the point θ whose scales are copied.
        space: the parameter space both vectors live in (names and shapes).
        mode: ``"filter"`` (default, Li et al. 2018 Sec. 4), ``"layer"``,
            ``"weight"`` or ``"none"``.
        ignore_1d: zero the entries of 1-D and 0-D parameters (biases, norm
            layers); default True as in Li et al. Sec. 4. Applies in every mode.

    Returns:
        A new ``(dim,)`` tensor in ``direction``'s dtype and device.

    Raises:
        ValueError: for an unknown ``mode``, or vectors of the wrong shape, dtype
            or device.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"mode must be one of {NORMALIZATIONS}, got mode={mode!r}; 'filter' is Li et al.'s choice")
    _check_flat("direction", direction, space)
    _check_flat("center", center, space)
    if center.dtype != direction.dtype or center.device != direction.device:
        raise ValueError(
            f"direction and center must share dtype and device, got direction {direction.dtype} on "
            f"{direction.device} and center {center.dtype} on {center.device}; convert one with .to(other)"
        )
    parts = []
    for d, t in zip(space.unflatten(direction), space.unflatten(center), strict=True):
        if d.ndim <= 1 and ignore_1d:
            parts.append(torch.zeros_like(d))
        elif mode == "none":
            parts.append(d.clone())
        elif mode == "weight":
            parts.append(d * t.abs())
        else:
            rows = 1 if (mode == "layer" or d.ndim <= 1) else d.shape[0]
            d2, t2 = d.reshape(rows, -1), t.reshape(rows, -1)  # (filters, entries per filter)
            dn = torch.linalg.vector_norm(d2, dim=1, keepdim=True)
            tn = torch.linalg.vector_norm(t2, dim=1, keepdim=True)
            scale = torch.where(dn > 0, tn / torch.where(dn > 0, dn, torch.ones_like(dn)), torch.zeros_like(dn))
            parts.append((d2 * scale).reshape(d.shape))
    return space.flatten(parts)


def random_directions(
    space: ParameterSpace,
    center: Tensor,
    k: int,
    generator: torch.Generator | None,
    *,
    normalization: str = "filter",
    ignore_1d: bool = True,
) -> Directions:
    """``k`` Gaussian directions, each normalized by :func:`normalize`.

    All ``k`` raw directions are drawn first (in order, from ``generator``), then
    normalized, so the raw draws depend only on the seed and ``space.dim``.
    Two Gaussian directions in high dimension are nearly orthogonal (cosine of order
    ``1/sqrt(dim)``); Li et al. rely on this rather than orthogonalizing, and so do
    we (the surface record reports the cosine).

    Raises:
        ValueError: for ``k < 1``, or as :func:`normalize`.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got k={k}; surfaces use k=1 or k=2")
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {NORMALIZATIONS}, got normalization={normalization!r}; "
            "'filter' is Li et al.'s choice"
        )
    raw = [random_direction(space, generator, dtype=center.dtype, device=center.device) for _ in range(k)]
    vectors = torch.stack([normalize(d, center, space, normalization, ignore_1d=ignore_1d) for d in raw])
    return Directions(vectors=vectors, kind="random", normalization=normalization, ignore_1d=ignore_1d)


def eigen_directions(
    op: CurvatureOperator,
    k: int,
    generator: torch.Generator | None,
    *,
    tol: float = 1e-6,
    max_steps: int | None = None,
) -> Directions:
    """The top-``k`` (algebraically largest) Hessian eigenvectors as unit directions.

    Lanczos with full reorthogonalization (:func:`probe.eigen.eigenvalues`, its
    defaults: ``tol=1e-6`` relative residual); Ritz vectors are orthonormal to about
    machine precision. Eigenvector signs are arbitrary (a surface along ``-v`` is
    the mirror image). Directions are not rescaled (``normalization="none"``):
    rescaling per filter would break ``Hv = λv``.

    Args:
        op: the Hessian (or any symmetric operator) at the surface's center, on the
            same parameter space as the evaluator.
        k: how many directions (1 or 2 for a surface).
        generator: randomness of the Lanczos start vector.
        tol, max_steps: as in :func:`probe.eigen.eigenvalues`.

    Raises:
        ValueError: for ``k`` outside ``[1, dim]``, a sharded operator (the
            vectors must be whole), or when fewer than ``k`` eigenvectors are
            reachable from the start vector.
    """
    if op.local_dim != op.dim:
        raise ValueError(
            f"op holds a shard of each vector (local_dim={op.local_dim} of dim={op.dim}); surfaces need whole "
            "vectors: use a single-process HessianOperator"
        )
    if not 1 <= k <= op.dim:
        raise ValueError(f"k must be in [1, dim={op.dim}], got k={k}; surfaces use k=1 or k=2")
    result = eigenvalues(
        op, k, which="largest", tol=tol, max_steps=max_steps, generator=generator, return_eigenvectors=True
    )
    if result.eigenvectors is None or result.eigenvectors.shape[1] < k:
        raise ValueError(f"fewer than k={k} eigenvectors found: {result.note}")
    return Directions(
        vectors=result.eigenvectors.T.contiguous(),  # (k, dim)
        kind="eigen",
        normalization="none",
        ignore_1d=False,
        eigenvalues=result.eigenvalues.to(torch.float64).cpu(),
        note=result.note,
    )


def pca_directions(trajectory: Sequence[Tensor], center: Tensor, k: int = 2) -> Directions:
    """First ``k`` principal components of a trajectory around its end point (Li et al. Sec. 7).

    With ``M`` the ``(n, dim)`` matrix of rows ``θ_i − center`` (``center`` is
    usually the final iterate θ_n), the directions are the top right singular
    vectors of ``M − mean(M)`` (mean-centered, as Li et al.'s code does through
    scikit-learn's PCA), unit length and orthogonal. The explained variance ratio
    is ``s_j² / Σ s²``. Signs are fixed so that the first trajectory point has a
    non-negative coordinate (training then runs towards the origin from positive
    coordinates). Computed in float64 by a thin SVD.

    Args:
        trajectory: ``n`` flat ``(dim,)`` parameter vectors (checkpoints of one run);
            including ``center`` itself is harmless.
        center: ``(dim,)`` the surface's center.
        k: how many components (1 or 2 for a surface); at most ``n − 1``.

    Raises:
        ValueError: for an empty trajectory, vectors of the wrong shape, ``k``
            outside ``[1, n − 1]``, or a trajectory without variance.
    """
    trajectory = list(trajectory)
    if center.ndim != 1:
        raise ValueError(f"center must be a flat (dim,) vector, got shape {tuple(center.shape)}")
    dim = center.shape[0]
    if len(trajectory) < 2:
        raise ValueError(
            f"trajectory must hold at least 2 parameter vectors, got {len(trajectory)}; pass the checkpoints of a run"
        )
    for i, t in enumerate(trajectory):
        if t.ndim != 1 or t.shape[0] != dim:
            raise ValueError(f"trajectory[{i}] must have shape (dim={dim},) like center, got {tuple(t.shape)}")
    n = len(trajectory)
    if not 1 <= k <= n - 1:
        raise ValueError(
            f"k must be in [1, n-1={n - 1}] for n={n} trajectory points, got k={k}; lower k or pass more points"
        )
    m = torch.stack([t.to(torch.float64).cpu() - center.to(torch.float64).cpu() for t in trajectory])  # (n, dim)
    _, s, vh = torch.linalg.svd(m - m.mean(0), full_matrices=False)
    total = float((s**2).sum())
    if total == 0.0:
        raise ValueError("the trajectory has no variance (all points equal); pass checkpoints from different steps")
    vectors = vh[:k]  # (k, dim)
    coords = m @ vectors.T  # (n, k)
    signs = torch.where(coords[0] < 0, -1.0, 1.0).to(torch.float64)
    vectors, coords = vectors * signs[:, None], coords * signs
    return Directions(
        vectors=vectors.to(dtype=center.dtype, device=center.device),
        kind="pca",
        normalization="none",
        ignore_1d=False,
        explained_variance_ratio=(s[:k] ** 2) / total,
        trajectory_coordinates=coords,
    )
