"""Paths between two points of parameter space, and training the bend of a curved path.

A path ``φ: [0, 1] → R^dim`` joins flat parameter vectors ``a = φ(0)`` and
``b = φ(1)``. Every path here is a combination of a few nodes with weights that
depend on ``t`` only,

    φ(t) = Σ_k c_k(t) · node_k,

so a block of points is one small matrix product ``C(t) @ nodes`` and is
differentiable in the nodes:

- :class:`LinearPath`: ``φ(t) = (1−t)·a + t·b`` (nodes ``a, b``);
- :class:`BezierPath`: the quadratic Bézier curve with one bend ``θ``,
  ``φ(t) = (1−t)²·a + 2t(1−t)·θ + t²·b`` (nodes ``a, θ, b``);
- :class:`PolychainPath`: the polygonal chain ``a → θ → b`` that reaches the bend at
  ``t = ½``: ``φ(t) = (1−2t)·a + 2t·θ`` for ``t ≤ ½`` and ``(2−2t)·θ + (2t−1)·b``
  for ``t ≥ ½``.

Both curves are those of Garipov et al. (2018), "Loss surfaces, mode connectivity,
and fast ensembling of DNNs", Section 3. Their bend starts at the midpoint
``(a + b)/2`` (where the curve is the straight line) and :func:`train_bend` moves it
to minimize the expected loss along the curve,

    ℓ(θ) = E_{t ~ U[0, 1]} L(φ_θ(t)),

by stochastic gradient steps on ``θ`` alone, with one (or a few) fresh ``t`` per step
(Garipov et al. 2018, Section 3.2, draw one ``t`` per mini-batch). Endpoints stay fixed.

Limits: one bend only (Garipov et al. also use one); for models with BatchNorm the
running statistics that an :class:`~probe.evaluate.Evaluator` re-estimates at each
point enter the gradient as constants (they are computed without gradient), whereas
Garipov et al. train the curve in train mode with batch statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeAlias, cast

import torch
from torch import Tensor

__all__ = [
    "BendTraining",
    "BezierPath",
    "CurvedPath",
    "LinearPath",
    "PATH_KINDS",
    "Path",
    "PolychainPath",
    "path_points",
    "train_bend",
]

OPTIMIZERS = ("sgd", "adam")


def _check_t(t: Tensor | float | list[float]) -> Tensor:
    """``t`` as a 1-D float64 CPU tensor with values in [0, 1]."""
    t = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1:
        raise ValueError(
            f"t must be a scalar or a 1-D tensor of path positions, got shape {tuple(t.shape)}; flatten it"
        )
    if t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
        bad = t[~((t >= 0) & (t <= 1))][0].item()
        raise ValueError(f"t must lie in [0, 1] (0 is endpoint a, 1 is endpoint b), got t={bad!r}; clip or rescale it")
    return t


def _check_vector(name: str, v: Tensor, like: Tensor | None = None) -> None:
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (a flat parameter vector), got {type(v).__name__}")
    if v.ndim != 1:
        raise ValueError(
            f"{name} must be a flat 1-D parameter vector, got shape {tuple(v.shape)}; "
            "flatten it with ParameterSpace.get_flat(model)"
        )
    if not v.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {v.dtype}")
    if like is not None:
        if v.shape != like.shape:
            raise ValueError(
                f"{name} must have the shape of endpoint a, {tuple(like.shape)}, got {tuple(v.shape)}; "
                "both endpoints must come from the same architecture and parameter selection"
            )
        if v.dtype != like.dtype or v.device != like.device:
            raise ValueError(
                f"{name} must have endpoint a's dtype and device ({like.dtype}, {like.device}), "
                f"got ({v.dtype}, {v.device}); convert it with .to(a)"
            )


def path_points(coefficients: Tensor, nodes: Tensor) -> Tensor:
    """``C @ nodes``: points ``(T, dim)`` from weights ``C`` ``(T, k)`` and nodes ``(k, dim)``.

    The weights are cast to the nodes' dtype and device; the product is
    differentiable in ``nodes``.
    """
    return coefficients.to(dtype=nodes.dtype, device=nodes.device) @ nodes


@dataclass(frozen=True, eq=False)
class LinearPath:
    """The straight line ``φ(t) = (1−t)·a + t·b`` between flat vectors ``a`` and ``b``.

    Raises:
        ValueError / TypeError: if ``a`` and ``b`` are not flat floating vectors of one
            shape, dtype and device.
    """

    a: Tensor
    b: Tensor
    kind: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        _check_vector("endpoint a", self.a)
        _check_vector("endpoint b", self.b, self.a)

    @property
    def dim(self) -> int:
        return self.a.shape[0]

    def nodes(self) -> Tensor:
        """The nodes ``(k, dim)`` that :meth:`coefficients` weights."""
        return torch.stack([self.a, self.b])

    def coefficients(self, t: Tensor | float) -> Tensor:
        """Node weights ``(T, 2)`` in float64: ``(1−t, t)``."""
        t = _check_t(t)
        return torch.stack([1 - t, t], dim=1)

    def points(self, t: Tensor | float) -> Tensor:
        """Points ``φ(t)`` as rows ``(T, dim)`` in the endpoints' dtype and device."""
        return path_points(self.coefficients(t), self.nodes())

    def point(self, t: float) -> Tensor:
        """One point ``φ(t)`` ``(dim,)``."""
        return self.points(t)[0]


@dataclass(frozen=True, eq=False)
class CurvedPath(LinearPath):
    """A path through one bend ``θ`` (shared part of :class:`BezierPath` and :class:`PolychainPath`).

    ``bend`` defaults to the midpoint ``(a + b)/2``, where the curve is the straight line
    (the initialization of Garipov et al. 2018).
    """

    bend: Tensor | None = field(default=None)
    kind: ClassVar[str] = "curved"

    def __post_init__(self) -> None:
        super().__post_init__()
        bend = self.bend
        if bend is None:
            bend = (self.a + self.b) / 2
            object.__setattr__(self, "bend", bend)
        _check_vector("bend", bend, self.a)

    def nodes(self) -> Tensor:
        assert self.bend is not None  # set by __post_init__
        return torch.stack([self.a, self.bend, self.b])

    def with_bend(self, bend: Tensor) -> CurvedPath:
        """The same kind of path with another bend (endpoints shared)."""
        return replace(self, bend=bend)


@dataclass(frozen=True, eq=False)
class BezierPath(CurvedPath):
    """Quadratic Bézier curve ``φ(t) = (1−t)²·a + 2t(1−t)·θ + t²·b`` (Garipov et al. 2018, Eq. 2).

    The curve passes near, not through, the bend: ``φ(½) = (a + 2θ + b)/4``.
    """

    kind: ClassVar[str] = "bezier"

    def coefficients(self, t: Tensor | float) -> Tensor:
        """Node weights ``(T, 3)`` in float64: ``((1−t)², 2t(1−t), t²)``."""
        t = _check_t(t)
        return torch.stack([(1 - t) ** 2, 2 * t * (1 - t), t**2], dim=1)


@dataclass(frozen=True, eq=False)
class PolychainPath(CurvedPath):
    """Polygonal chain ``a → θ → b`` with the bend at ``t = ½`` (Garipov et al. 2018, Eq. 1).

    ``φ(t) = (1−2t)·a + 2t·θ`` for ``t ≤ ½`` and ``(2−2t)·θ + (2t−1)·b`` for ``t ≥ ½``.
    """

    kind: ClassVar[str] = "polychain"

    def coefficients(self, t: Tensor | float) -> Tensor:
        """Node weights ``(T, 3)`` in float64 (piecewise linear, continuous at ``t = ½``)."""
        t = _check_t(t)
        first = t <= 0.5
        c_a = torch.where(first, 1 - 2 * t, torch.zeros_like(t))
        c_bend = torch.where(first, 2 * t, 2 - 2 * t)
        c_b = torch.where(first, torch.zeros_like(t), 2 * t - 1)
        return torch.stack([c_a, c_bend, c_b], dim=1)


Path: TypeAlias = LinearPath | BezierPath | PolychainPath
PATH_KINDS = {cls.kind: cls for cls in (LinearPath, BezierPath, PolychainPath)}  # spec ``path`` value → class


@dataclass(frozen=True, eq=False)
class BendTraining:
    """Outcome of :func:`train_bend`.

    Attributes:
        path: the path with the trained bend (endpoints unchanged).
        initial_path: the path as given.
        losses: ``(steps_done,)`` float64, the loss of each step, averaged over that
            step's ``t`` samples (a one-sample estimate of ``E_t L(φ(t))`` per step, so noisy).
        t_samples: ``(steps_done, t_per_step)`` float64, the ``t`` drawn at each step.
        steps: steps requested; ``steps_done`` ran (fewer only if a loss was non-finite).
        nonfinite_step: index of the step whose loss was NaN or ±inf, where training
            stopped without applying that step; ``None`` when every loss was finite.
        optimizer, lr, momentum, weight_decay, t_per_step: the settings used.
    """

    path: CurvedPath
    initial_path: CurvedPath
    losses: Tensor
    t_samples: Tensor
    steps: int
    steps_done: int
    nonfinite_step: int | None
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    t_per_step: int


def _objective(loss: Any) -> Callable[[Tensor], Tensor]:
    if hasattr(loss, "loss_with_grad"):
        return loss.loss_with_grad
    if callable(loss):
        return cast(Callable[[Tensor], Tensor], loss)  # the documented contract: flat vector -> scalar tensor
    raise TypeError(
        "loss must be an Evaluator (its loss_with_grad is used) or a callable flat vector -> scalar tensor, "
        f"got {type(loss).__name__}"
    )


def train_bend(
    path: CurvedPath,
    loss,
    *,
    steps: int,
    lr: float,
    generator: torch.Generator,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    t_per_step: int = 1,
) -> BendTraining:
    """Train the bend of a Bézier or polychain path to minimize ``E_{t~U[0,1]} L(φ(t))``.

    Each step draws ``t_per_step`` positions ``t ~ U[0, 1]`` from ``generator``, takes the
    mean of ``L(φ(t))`` over them and makes one optimizer step on the bend ``θ``
    (``∂φ(t)/∂θ = c_θ(t)``: ``2t(1−t)`` on a Bézier curve, ``1 − |2t − 1|`` on a polychain).
    The endpoints never move. Garipov et al. (2018, Section 3.2) draw one ``t`` per step
    (default ``t_per_step=1``) and use SGD with momentum 0.9 (defaults ``optimizer="sgd"``,
    ``momentum=0.9``); ``"adam"`` is Adam with torch's defaults. There is no default
    learning rate: it depends on the loss scale (Garipov et al. use 0.015 on CIFAR with
    mini-batches).

    Args:
        path: a :class:`BezierPath` or :class:`PolychainPath` (its bend is the start).
        loss: an :class:`~probe.evaluate.Evaluator` (its differentiable ``loss_with_grad``
            over the whole probe set is used, i.e. full-batch steps) or any callable
            mapping a flat vector ``(dim,)`` to a differentiable scalar tensor.
        steps: number of optimizer steps (≥ 1).
        lr: learning rate (> 0).
        generator: the source of the ``t`` samples (CPU generator).
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty on the bend, passed to the optimizer (Garipov et al. use
            5e-4 on CIFAR; default 0).
        t_per_step: positions averaged per step (≥ 1).

    Returns:
        A :class:`BendTraining` with the trained path and the loss history. A NaN or
        infinite loss stops training before that step is applied and is recorded in
        ``nonfinite_step``; it is never skipped silently.

    Raises:
        TypeError: if ``path`` has no bend or ``loss`` is neither an Evaluator nor callable.
        ValueError: for ``steps < 1``, ``t_per_step < 1``, ``lr <= 0``, an unknown
            ``optimizer``, or a loss that is not a scalar tensor.
    """
    if not isinstance(path, CurvedPath):
        raise TypeError(
            f"path must be a BezierPath or PolychainPath (a path with a bend), got {type(path).__name__}; "
            "a straight line has nothing to train"
        )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got steps={steps!r}")
    if not isinstance(t_per_step, int) or t_per_step < 1:
        raise ValueError(f"t_per_step must be an integer >= 1, got t_per_step={t_per_step!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got lr={lr!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got optimizer={optimizer!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator (randomness is an argument), got {type(generator).__name__}"
        )
    objective = _objective(loss)

    assert path.bend is not None  # set by BezierPath.__post_init__
    bend = path.bend.detach().clone().requires_grad_(True)
    if optimizer == "sgd":
        opt = torch.optim.SGD([bend], lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam([bend], lr=lr, weight_decay=weight_decay)
    a, b = path.a.detach(), path.b.detach()
    losses, samples = [], []
    nonfinite_step = None
    with torch.enable_grad():
        for step in range(steps):
            t = torch.rand(t_per_step, generator=generator, dtype=torch.float64)
            nodes = torch.stack([a, bend, b])  # (3, dim)
            pts = path_points(path.coefficients(t), nodes)  # (t_per_step, dim)
            values = [objective(p) for p in pts]
            for v in values:
                if not isinstance(v, Tensor) or v.ndim != 0:
                    raise ValueError(
                        f"loss must return a scalar tensor, got {type(v).__name__} "
                        f"{tuple(v.shape) if isinstance(v, Tensor) else ''}; reduce it to the mean loss"
                    )
            mean = torch.stack(values).mean()
            value = float(mean.detach())
            if not math.isfinite(value):
                nonfinite_step = step
                break
            opt.zero_grad(set_to_none=True)
            mean.backward()
            opt.step()
            losses.append(value)
            samples.append(t)
    steps_done = len(losses)
    return BendTraining(
        path=path.with_bend(bend.detach()),
        initial_path=path,
        losses=torch.tensor(losses, dtype=torch.float64),
        t_samples=torch.stack(samples) if samples else torch.empty(0, t_per_step, dtype=torch.float64),
        steps=steps,
        steps_done=steps_done,
        nonfinite_step=nonfinite_step,
        optimizer=optimizer,
        lr=float(lr),
        momentum=float(momentum),
        weight_decay=float(weight_decay),
        t_per_step=t_per_step,
    )
