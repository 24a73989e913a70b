"""Loss surfaces around a point of parameter space (Li et al. 2018).

Li, Xu, Taylor, Studer and Goldstein, "Visualizing the loss landscape of neural
nets" (NeurIPS 2018): with directions ``d₁`` (and ``d₂``) from
:mod:`probe.directions`,

    1-D:  f(α)    = L(θ + α·d₁),             α ∈ alphas
    2-D:  f(α, β) = L(θ + α·d₁ + β·d₂),      (α, β) ∈ alphas × betas

with ``L`` the example-weighted mean loss over the evaluator's probe set (and the
error rate alongside for classification). The 2-D grid is stored row-major:
``loss[i, j] = f(alphas[i], betas[j])``, flattened as index ``i·len(betas) + j``.

Evaluation is vectorized: the grid's points are formed in blocks as one matrix
product ``θ + C·D`` (``C`` the ``(block, k)`` coefficients, ``D`` the ``(k, dim)``
directions) and handed to :meth:`probe.evaluate.Evaluator.losses`, which runs
``chunk_size`` points per ``torch.vmap``-ed forward. Models whose BatchNorm
statistics are re-estimated per point (``Evaluator.recompute_bn``) fall back to one
point at a time inside the evaluator; their statistics are then correct at every
grid point (stale statistics would distort the surface). A train-mode evaluator
(``mode="train"``: batch statistics, live dropout) also evaluates one point at a time.

Defaults (:func:`loss_surface`): span 1 and 51 points per axis, the grid
``[-1, 1]`` at 51 points of Li et al.'s plotting commands (``--x=-1:1:51``); filter
normalization with 1-D parameters excluded (their Sec. 4). Limits: the surface is a
1-D or 2-D slice of a ``dim``-dimensional function; random slices see mostly the
bulk of the Hessian spectrum, not its extreme directions (use ``"eigen"`` for those).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from probe.directions import (
    DIRECTION_KINDS,
    NORMALIZATIONS,
    Directions,
    eigen_directions,
    pca_directions,
    random_directions,
)
from probe.evaluate import Evaluator
from probe.operators import CurvatureOperator

__all__ = ["SurfaceResult", "loss_surface", "surface"]

DEFAULT_RESOLUTION = 51  # Li et al.'s plotting commands: --x=-1:1:51 --y=-1:1:51
DEFAULT_SPAN = 1.0
POINT_BLOCK_BYTES = 64 * 2**20  # grid points formed at once (before the evaluator's own chunking)


@dataclass(frozen=True)
class SurfaceResult:
    """A 1-D or 2-D loss surface.

    Attributes:
        directions: where the directions came from: ``"random"``, ``"eigen"``,
            ``"pca"`` or ``"given"`` (vectors passed in directly).
        normalization: ``"filter"``, ``"layer"``, ``"weight"`` or ``"none"``.
        ignore_1d: whether 1-D parameters (biases, norm layers) were left fixed.
        mode: the evaluator's mode policy (``"eval"``, ``"eval+bn_recompute"`` or ``"train"``).
        alphas: coordinates along the first direction.
        betas: coordinates along the second direction; ``()`` for a 1-D surface.
        loss: float64, ``(len(alphas),)`` or ``(len(alphas), len(betas))``; entry
            ``[i, j]`` is the mean loss at ``θ + alphas[i]·d₁ + betas[j]·d₂``.
        error: error rates, same shape (NaN when the task has no classes).
        num_evaluations: points evaluated (each a full pass over the probe set).
        num_nonfinite: grid points whose loss is NaN or ±inf (kept in ``loss``).
        direction_norms: Euclidean norm of each direction (the parameter-space
            length of a unit step in alpha or beta).
        direction_cosine: cosine between the two directions (NaN for 1-D or a zero
            direction); random directions are only nearly orthogonal.
        eigenvalues: Hessian eigenvalues of ``"eigen"`` directions, else ``()``.
        explained_variance_ratio: of ``"pca"`` directions, else ``()``.
        trajectory_coordinates: ``(n, k)`` float64 coordinates of the trajectory
            for ``"pca"`` directions, else None.
        note: numerical trouble met (non-finite losses, unconverged Lanczos), or ``""``.
    """

    directions: str
    normalization: str
    ignore_1d: bool
    mode: str
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    loss: Tensor
    error: Tensor
    num_evaluations: int
    num_nonfinite: int
    direction_norms: tuple[float, ...]
    direction_cosine: float
    eigenvalues: tuple[float, ...] = ()
    explained_variance_ratio: tuple[float, ...] = ()
    trajectory_coordinates: Tensor | None = None
    note: str = ""

    @property
    def dims(self) -> int:
        return 2 if self.betas else 1

    @property
    def loss_flat(self) -> list[float]:
        """The loss grid flattened row-major (alpha-major), as stored in Parquet."""
        return self.loss.reshape(-1).tolist()

    @property
    def error_flat(self) -> list[float]:
        """The error grid flattened row-major (alpha-major)."""
        return self.error.reshape(-1).tolist()


def _coordinates(name: str, values: Sequence[float] | Tensor) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).cpu()
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D sequence of numbers, got shape {tuple(t.shape)}; "
            f"e.g. torch.linspace(-1, 1, 51)"
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {t.tolist()}; drop NaN/inf coordinates")
    return t


def _as_directions(directions: Directions | Tensor | Sequence[Tensor], dim: int) -> Directions:
    if isinstance(directions, Directions):
        d = directions
    else:
        if isinstance(directions, Tensor):
            vectors = directions.unsqueeze(0) if directions.ndim == 1 else directions
        else:
            vectors = torch.stack(list(directions))
        d = Directions(vectors=vectors, kind="given", normalization="none", ignore_1d=False)
    if d.vectors.ndim != 2 or d.vectors.shape[1] != dim or d.vectors.shape[0] not in (1, 2):
        raise ValueError(
            f"directions must be 1 or 2 vectors of length dim={dim} (shape (1, {dim}) or (2, {dim})), "
            f"got shape {tuple(d.vectors.shape)}; pass one direction per surface axis"
        )
    return d


def surface(
    evaluator: Evaluator,
    center: Tensor,
    directions: Directions | Tensor | Sequence[Tensor],
    alphas: Sequence[float] | Tensor,
    betas: Sequence[float] | Tensor | None = None,
    *,
    points_per_call: int | None = None,
) -> SurfaceResult:
    """Evaluate the loss (and error rate) on a 1-D or 2-D grid around ``center``.

    Args:
        evaluator: mean loss over the probe set (its ``chunk_size`` sets how many
            points share one vmapped forward).
        center: ``(dim,)`` the point θ (e.g. ``evaluator.center()``).
        directions: a :class:`~probe.directions.Directions` record, or 1 or 2
            vectors (a ``(dim,)`` or ``(k, dim)`` tensor, or a list), used as given
            and recorded as ``directions="given"``, ``normalization="none"``.
        alphas: coordinates along the first direction (parameter-space length
            ``|alpha|·‖d₁‖``).
        betas: coordinates along the second direction; required with two
            directions, not allowed with one.
        points_per_call: grid points formed and passed to the evaluator at once;
            default: as many as fit in 64 MiB, at least ``evaluator.chunk_size``.

    Returns:
        A :class:`SurfaceResult`; non-finite losses are kept and counted.

    Raises:
        ValueError: for directions of the wrong shape or number, ``center`` of the
            wrong shape, empty or non-finite coordinates, ``betas`` missing for two
            directions or given for one, or ``points_per_call < 1``.
    """
    dim = evaluator.dim
    d = _as_directions(directions, dim)
    if center.ndim != 1 or center.shape[0] != dim:
        raise ValueError(f"center must have shape (dim={dim},), got {tuple(center.shape)}; use evaluator.center()")
    a = _coordinates("alphas", alphas)
    if d.k == 2 and betas is None:
        raise ValueError("betas is required with two directions (a 2-D surface); pass betas or one direction")
    if d.k == 1 and betas is not None:
        raise ValueError("betas was given with one direction (a 1-D surface); pass a second direction or betas=None")
    b = _coordinates("betas", betas) if betas is not None else None
    if points_per_call is not None and points_per_call < 1:
        raise ValueError(f"points_per_call must be at least 1, got points_per_call={points_per_call}; or pass None")

    if b is None:
        coeffs = a[:, None]  # (P, 1)
        shape: tuple[int, ...] = (a.numel(),)
    else:
        grid_a, grid_b = torch.meshgrid(a, b, indexing="ij")  # (A, B) each
        coeffs = torch.stack([grid_a.reshape(-1), grid_b.reshape(-1)], dim=1)  # (P, 2), row-major
        shape = (a.numel(), b.numel())
    num_points = coeffs.shape[0]

    dtype, device = evaluator.dtype, evaluator.device
    vectors = d.vectors.to(dtype=dtype, device=device)  # (k, dim)
    theta = center.to(dtype=dtype, device=device)
    if points_per_call is None:
        itemsize = torch.empty((), dtype=dtype).element_size()
        points_per_call = max(evaluator.chunk_size, POINT_BLOCK_BYTES // (dim * itemsize))
    losses, errors = [], []
    start_count = evaluator.num_evaluations
    for start in range(0, num_points, points_per_call):
        c = coeffs[start : start + points_per_call].to(dtype=dtype, device=device)  # (block, k)
        points = torch.addmm(theta.expand(c.shape[0], dim), c, vectors)  # (block, dim) = θ + C·D
        block_loss, block_err = evaluator.losses(points)
        losses.append(block_loss)
        errors.append(block_err)
    loss = torch.cat(losses).to(torch.float64).reshape(shape)
    error = torch.cat(errors).to(torch.float64).reshape(shape)

    num_nonfinite = int((~torch.isfinite(loss)).sum())
    notes = [d.note] if d.note else []
    if num_nonfinite:
        notes.append(f"{num_nonfinite} of {num_points} grid points have a non-finite loss; shrink the span")
    v64 = d.vectors.to(torch.float64)
    norms = torch.linalg.vector_norm(v64, dim=1)
    cosine = float("nan")
    if d.k == 2 and bool((norms > 0).all()):
        cosine = float((v64[0] @ v64[1]) / (norms[0] * norms[1]))
    return SurfaceResult(
        directions=d.kind,
        normalization=d.normalization,
        ignore_1d=d.ignore_1d,
        mode=evaluator.mode,
        alphas=tuple(a.tolist()),
        betas=tuple(b.tolist()) if b is not None else (),
        loss=loss,
        error=error,
        num_evaluations=evaluator.num_evaluations - start_count,
        num_nonfinite=num_nonfinite,
        direction_norms=tuple(norms.tolist()),
        direction_cosine=cosine,
        eigenvalues=tuple(d.eigenvalues.tolist()) if d.eigenvalues is not None else (),
        explained_variance_ratio=(
            tuple(d.explained_variance_ratio.tolist()) if d.explained_variance_ratio is not None else ()
        ),
        trajectory_coordinates=d.trajectory_coordinates,
        note="; ".join(notes),
    )


def loss_surface(
    evaluator: Evaluator,
    *,
    dims: int = 2,
    resolution: int = DEFAULT_RESOLUTION,
    span: float = DEFAULT_SPAN,
    normalization: str | None = None,
    directions: str = "random",
    generator: torch.Generator | None = None,
    op: CurvatureOperator | None = None,
    trajectory: Sequence[Tensor] | None = None,
    ignore_1d: bool = True,
    center: Tensor | None = None,
) -> SurfaceResult:
    """A loss surface on the square grid ``[-span, span]^dims`` with ``resolution`` points per axis.

    Args:
        evaluator: mean loss over the probe set.
        dims: 1 or 2 (default 2, Li et al.'s contour plots).
        resolution: points per axis (default 51, Li et al.); odd values put the
            center itself on the grid.
        span: half-width of the grid in units of the directions (default 1, Li et
            al.). Filter-normalized directions have the norm of θ's weights, so
            ``span=1`` reaches as far from θ as θ is from the origin in those
            weights; eigen and PCA directions are unit vectors, so there ``span`` is
            a Euclidean distance in parameter space.
        normalization: for ``directions="random"``: ``"filter"`` (default, Li et al.
            Sec. 4), ``"layer"``, ``"weight"`` or ``"none"``. Eigen and PCA
            directions are unit vectors used as computed: leave it None (or "none").
        directions: ``"random"`` (Gaussian, needs ``generator``), ``"eigen"`` (top
            Hessian eigenvectors, needs ``op`` and ``generator``) or ``"pca"``
            (principal components of ``trajectory``, Li et al. Sec. 7).
        generator: randomness of the random directions or of the Lanczos start.
        op: the Hessian at ``center`` on the evaluator's parameter space.
        trajectory: flat parameter vectors of a training run (for ``"pca"``).
        ignore_1d: keep biases and norm parameters fixed (default True, Li et al.
            Sec. 4); random directions only.
        center: the surface's center; default ``evaluator.center()``.

    Raises:
        ValueError: for ``dims`` not 1 or 2, ``resolution < 2``, a non-positive or
            non-finite ``span``, an unknown ``directions`` or ``normalization``, a
            normalization with eigen/PCA directions, a missing ``generator``, ``op``
            or ``trajectory``, or an ``op`` of another dimension.
    """
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got dims={dims}")
    if resolution < 2:
        raise ValueError(
            f"resolution must be at least 2 points per axis, got resolution={resolution}; Li et al. use 51"
        )
    if not (math.isfinite(span) and span > 0):
        raise ValueError(f"span must be a positive finite number, got span={span}; Li et al. use 1.0")
    kinds = tuple(k for k in DIRECTION_KINDS if k != "given")
    if directions not in kinds:
        raise ValueError(f"directions must be one of {kinds}, got directions={directions!r}")
    if normalization is not None and normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {NORMALIZATIONS} or None, got normalization={normalization!r}; "
            "'filter' is Li et al.'s choice"
        )
    if directions != "random" and normalization not in (None, "none"):
        raise ValueError(
            f"normalization={normalization!r} applies to random directions only; {directions} directions are unit "
            "vectors used as computed (rescaling would change them): pass normalization=None"
        )
    if directions in ("random", "eigen") and generator is None:
        raise ValueError(
            f"generator is required for directions={directions!r} (randomness is an argument); "
            "pass torch.Generator().manual_seed(seed)"
        )
    theta = evaluator.center() if center is None else center
    if directions == "random":
        d = random_directions(
            evaluator.space, theta, dims, generator, normalization=normalization or "filter", ignore_1d=ignore_1d
        )
    elif directions == "eigen":
        if op is None:
            raise ValueError("op is required for directions='eigen'; pass the HessianOperator at the center")
        if op.dim != evaluator.dim:
            raise ValueError(
                f"op must act on the evaluator's parameter space (dim={evaluator.dim}), got op.dim={op.dim}; "
                "build both from the same model and parameter selection"
            )
        d = eigen_directions(op, dims, generator)
    else:
        if trajectory is None:
            raise ValueError("trajectory is required for directions='pca'; pass the flat parameter vectors of a run")
        d = pca_directions(trajectory, theta, dims)
    grid = torch.linspace(-span, span, resolution, dtype=torch.float64)
    return surface(evaluator, theta, d, grid, grid if dims == 2 else None)
