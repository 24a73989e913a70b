"""Loss barriers along paths between two solutions, measured three ways side by side.

Along a path ``φ`` from ``a = φ(0)`` to ``b = φ(1)`` (see :mod:`probe.curves`) the mean
loss ``L(t) = L(φ(t))`` (and the error rate, for classification) is evaluated at ``T``
evenly spaced positions ``t_i = i/(T−1)``, endpoints included, on each named
evaluation set. The literature summarizes ``L(t)`` by different numbers; all three
are reported:

- ``barrier_height = max_i L(t_i) − max(L(0), L(1))``: the raw height of the
  highest point above the higher endpoint (Garipov et al. 2018 compare curves by
  ``max_t L``). Frankle et al. 2020, "Linear mode connectivity and the lottery ticket
  hypothesis", measure the rise of the *error* above the *mean* of the endpoints'
  errors; the two agree when the endpoint values are equal.
- ``barrier_above_line = max_i [L(t_i) − ((1−t_i)·L(0) + t_i·L(1))]``: the largest
  rise above the chord between the endpoint losses (the definition of Entezari et al.
  2022, "The role of permutation invariance in linear mode connectivity", in the
  linear-mode-connectivity line of work started by Frankle et al. 2020). It equals
  ``barrier_height`` when ``L(0) = L(1)``; both are ≥ 0 because the endpoints are on
  the grid.
- ``path_integral = ∫₀¹ L(t) dt − (L(0) + L(1))/2``: the mean loss along the path in
  ``t`` (the objective Garipov et al. train curves on) above the endpoints' mean. The
  integral uses composite Simpson's rule when ``T`` is odd (exact for polynomials of
  degree ≤ 3 in ``t``, e.g. any quadratic loss on the straight line; otherwise rule
  minus exact is ``h⁴·L⁗(ξ)/180``, ``h = 1/(T−1)``) and the trapezoid rule when ``T``
  is even (exact for degree ≤ 1; rule minus exact is ``h²·L''(ξ)/12``).

Every maximum is taken over the grid, so it underestimates the continuous maximum by
at most ``max|L''|·h²/8``. ``t`` is the path's parameter, not arc length: on a Bézier
curve equal steps in ``t`` are unequal steps in parameter space.

Non-finite losses (NaN, ±inf) along a path are counted in ``num_nonfinite`` with the
first position in ``first_nonfinite_t``; the three measures then come out NaN or inf as
arithmetic gives them, never computed over the finite points only.

BatchNorm: each :class:`~probe.evaluate.Evaluator` applies its own mode policy
(``"eval+bn_recompute"`` re-estimates running statistics at every path point with one
pass over that evaluator's data; ``"eval"`` keeps the model's buffers, which are wrong
away from the checkpoint they came from; ``"train"`` normalizes every batch by its own
statistics at each path point, so nothing is stale, with dropout live), recorded as
``mode`` in every result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from probe.curves import LinearPath

__all__ = ["BarrierMeasures", "BarrierResult", "barrier", "barrier_measures", "DEFAULT_POINTS"]

DEFAULT_POINTS = 61  # Garipov et al. (2018), dnn-mode-connectivity eval_curve.py: --num_points 61


@dataclass(frozen=True)
class BarrierMeasures:
    """The three barrier summaries of one curve ``values(t)`` (definitions in the module docstring).

    Attributes:
        barrier_height: ``max_i v_i − max(v_0, v_last)``.
        barrier_above_line: ``max_i [v_i − ((1−t_i)·v_0 + t_i·v_last)]``.
        path_integral: ``∫₀¹ v dt − (v_0 + v_last)/2``.
        integration_rule: ``"simpson"`` or ``"trapezoid"``.
        argmax_t: the grid position of ``max_i v_i`` (first one on ties; NaN if any value is NaN).
    """

    barrier_height: float
    barrier_above_line: float
    path_integral: float
    integration_rule: str
    argmax_t: float


def _uniform(t: Tensor) -> bool:
    steps = torch.diff(t)
    return bool(torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-9, atol=1e-12))


def barrier_measures(t: Tensor, values: Tensor) -> BarrierMeasures:
    """Barrier height, height above the chord and path integral of ``values`` at positions ``t``.

    Args:
        t: ``(T,)`` increasing positions from 0 to 1.
        values: ``(T,)`` losses (or error rates) at ``t``.

    Simpson's rule is used when ``T`` is odd and ``t`` is evenly spaced, the trapezoid
    rule otherwise. NaN and inf propagate into the results.

    Raises:
        ValueError: if the shapes differ, ``T < 2``, or ``t`` does not run increasing from 0 to 1.
    """
    t = torch.as_tensor(t, dtype=torch.float64).cpu()
    v = torch.as_tensor(values, dtype=torch.float64).cpu()
    if t.ndim != 1 or v.shape != t.shape:
        raise ValueError(f"t and values must be 1-D of one length, got shapes {tuple(t.shape)} and {tuple(v.shape)}")
    if t.numel() < 2:
        raise ValueError(f"need at least 2 positions (the endpoints), got {t.numel()}")
    if t[0] != 0 or t[-1] != 1 or not bool((torch.diff(t) > 0).all()):
        raise ValueError(
            "t must increase strictly from 0 to 1 (both endpoints included); build it with torch.linspace(0, 1, T)"
        )
    v0, v1 = v[0], v[-1]
    peak = v.max()  # NaN if any value is NaN
    height = peak - torch.maximum(v0, v1)
    above = (v - ((1 - t) * v0 + t * v1)).max()
    n = t.numel()
    if n % 2 == 1 and n >= 3 and _uniform(t):
        h = (t[-1] - t[0]) / (n - 1)
        integral = h / 3 * (v[0] + v[-1] + 4 * v[1:-1:2].sum() + 2 * v[2:-1:2].sum())
        rule = "simpson"
    else:
        integral = torch.trapezoid(v, t)
        rule = "trapezoid"
    argmax_t = float("nan") if bool(torch.isnan(v).any()) else float(t[int(torch.argmax(v))])
    return BarrierMeasures(
        barrier_height=float(height),
        barrier_above_line=float(above),
        path_integral=float(integral - (v0 + v1) / 2),
        integration_rule=rule,
        argmax_t=argmax_t,
    )


@dataclass(frozen=True, eq=False)
class BarrierResult:
    """Loss and error along one path on one evaluation set, and its barriers.

    Attributes:
        eval_set: the evaluation set's name.
        path: the path kind (``"linear"``, ``"bezier"``, ``"polychain"``).
        mode: the evaluator's mode policy (``"eval"``, ``"eval+bn_recompute"`` or ``"train"``).
        num_examples: examples in the evaluation set.
        t: ``(T,)`` float64 positions ``i/(T−1)``, endpoints included.
        loss: ``(T,)`` float64 mean loss at ``φ(t)``.
        error: ``(T,)`` float64 error rate at ``φ(t)``; NaN when the task has no classes.
        loss_a, loss_b: ``loss`` at ``t = 0`` and ``t = 1``.
        barrier_height, barrier_above_line, path_integral, integration_rule, argmax_t:
            the loss barrier three ways (module docstring) and where ``L`` peaks.
        error_barrier_height: ``max_i error_i − max(error_0, error_last)``; NaN without classes.
        num_nonfinite: how many ``loss`` values are NaN or ±inf.
        first_nonfinite_t: the smallest such ``t``; ``None`` when all are finite.
    """

    eval_set: str
    path: str
    mode: str
    num_examples: int
    t: Tensor
    loss: Tensor
    error: Tensor
    loss_a: float
    loss_b: float
    barrier_height: float
    barrier_above_line: float
    path_integral: float
    integration_rule: str
    argmax_t: float
    error_barrier_height: float
    num_nonfinite: int
    first_nonfinite_t: float | None

    @property
    def points(self) -> int:
        return self.t.numel()


class PathEvaluator(Protocol):
    """What :func:`barrier` reads of an evaluator; :class:`~probe.evaluate.Evaluator` is one."""

    @property
    def dim(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def mode(self) -> str: ...

    def losses(self, points: Tensor) -> tuple[Tensor, Tensor]: ...


def barrier(
    path: LinearPath,
    evaluators: Mapping[str, PathEvaluator],
    *,
    points: int = DEFAULT_POINTS,
) -> dict[str, BarrierResult]:
    """Loss and error along ``path`` at ``points`` evenly spaced positions, per evaluation set.

    Path points are built ``chunk_size`` rows at a time (the evaluator's own setting,
    16 by default) and evaluated with ``Evaluator.losses`` (vmapped over points; point
    by point when BatchNorm statistics are recomputed).

    Args:
        path: a :class:`~probe.curves.LinearPath`, :class:`~probe.curves.BezierPath` or
            :class:`~probe.curves.PolychainPath` between two flat vectors.
        evaluators: evaluation-set name → :class:`~probe.evaluate.Evaluator` (anything
            with ``dim``, ``dtype``, ``device``, ``mode``, ``num_examples`` and
            ``losses(points) -> (losses, errors)``), e.g. ``{"train": ..., "test": ...}``.
        points: ``T``, the number of positions including both endpoints (≥ 2; default
            61 as in Garipov et al. 2018; odd ``T`` integrates by Simpson's rule).

    Returns:
        ``{name: BarrierResult}`` in the order of ``evaluators``.

    Raises:
        ValueError: for ``points < 2``, no evaluators, or an evaluator whose parameter
            dimension differs from the path's.
        TypeError: if ``evaluators`` is not a mapping of names to evaluators.
    """
    if not isinstance(points, int) or isinstance(points, bool) or points < 2:
        raise ValueError(
            f"points must be an integer >= 2 (the endpoints plus interior positions), got points={points!r}; "
            f"use e.g. points={DEFAULT_POINTS}"
        )
    if not isinstance(path, LinearPath):
        raise TypeError(f"path must be a LinearPath, BezierPath or PolychainPath, got {type(path).__name__}")
    if not isinstance(evaluators, Mapping):
        raise TypeError(
            f"evaluators must be a mapping of evaluation-set names to Evaluators, got {type(evaluators).__name__}; "
            "pass e.g. {'train': evaluator}"
        )
    if not evaluators:
        raise ValueError("evaluators is empty: pass at least one, e.g. {'train': evaluator}")
    for name, ev in evaluators.items():
        if not hasattr(ev, "losses"):
            raise TypeError(f"evaluators[{name!r}] must be an Evaluator (with .losses), got {type(ev).__name__}")
        if ev.dim != path.dim:
            raise ValueError(
                f"evaluators[{name!r}] has parameter dimension {ev.dim}, but the path's endpoints have dim={path.dim}; "
                "build the evaluator from the same architecture and parameter selection as the endpoints"
            )

    t = torch.linspace(0, 1, points, dtype=torch.float64)
    coefficients = path.coefficients(t)  # (T, k)
    nodes = path.nodes().detach()  # (k, dim)
    results = {}
    for name, ev in evaluators.items():
        chunk = max(1, int(getattr(ev, "chunk_size", 16)))
        losses, errors = [], []
        for start in range(0, points, chunk):
            block = (coefficients[start : start + chunk].to(nodes.dtype) @ nodes).to(dtype=ev.dtype, device=ev.device)
            lo, er = ev.losses(block)
            losses.append(lo.to(torch.float64).cpu())
            errors.append(er.to(torch.float64).cpu())
        loss = torch.cat(losses)
        error = torch.cat(errors)
        measures = barrier_measures(t, loss)
        bad = ~torch.isfinite(loss)
        num_bad = int(bad.sum())
        error_height = float(error.max() - torch.maximum(error[0], error[-1]))
        results[name] = BarrierResult(
            eval_set=str(name),
            path=path.kind,
            mode=str(ev.mode),
            num_examples=int(getattr(ev, "num_examples", -1)),
            t=t,
            loss=loss,
            error=error,
            loss_a=float(loss[0]),
            loss_b=float(loss[-1]),
            barrier_height=measures.barrier_height,
            barrier_above_line=measures.barrier_above_line,
            path_integral=measures.path_integral,
            integration_rule=measures.integration_rule,
            argmax_t=measures.argmax_t,
            error_barrier_height=error_height,
            num_nonfinite=num_bad,
            first_nonfinite_t=float(t[bad][0]) if num_bad else None,
        )
    return results
