"""Sharpness of a solution by each definition in the literature, one record per measure.

Every measure looks at the mean loss ``L`` over one fixed probe set as a function
of the flat parameter vector, around a center ``θ`` (``n`` coordinates):

- ``lambda_max``: the largest eigenvalue of the Hessian ``∇²L(θ)``, from the
  Lanczos engine (:func:`probe.eigen.eigenvalues`).
- ``keskar``: ε-sharpness, Keskar et al. (2017), "On large-batch training for deep
  learning: generalization gap and sharp minima", ICLR, Metric 2.1 with ``A = I``
  (the full space)::

      φ(θ, ε) = 100 · (max_{δ ∈ C_ε} L(θ+δ) − L(θ)) / (1 + L(θ)),
      C_ε = {δ : |δ_i| ≤ ε(|θ_i| + 1)}.

  The paper maximizes with L-BFGS-B; here projected sign ascent (below). Its
  random-subspace variant (``A ∈ R^{n×p}`` random) is not implemented.
- ``sam``: ρ-sharpness, Foret et al. (2021), "Sharpness-aware minimization for
  efficiently improving generalization", ICLR: ``max_{‖δ‖₂ ≤ ρ} L(θ+δ) − L(θ)``.
  ``steps=1`` is SAM's first-order solution ``δ = ρ g/‖g‖`` with ``g = ∇L(θ)``;
  more steps run projected ascent on the L2 ball.
- ``adaptive``: adaptive sharpness, Kwon et al. (2021), "ASAM: Adaptive
  sharpness-aware minimization for scale-invariant learning of deep neural
  networks", ICML, in the form of Andriushchenko et al. (2023), "A modern look at
  the relationship between sharpness and generalization", ICML: perturbations
  ``δ = c ⊙ u`` with ``c = |θ| + η`` (``η = 0`` by default). Worst case:
  ``max_{‖u‖_p ≤ ρ} L(θ + c⊙u) − L(θ)``, p ∈ {2, ∞}. Average case:
  ``E_u L(θ + c⊙u) − L(θ)`` with ``u_i`` i.i.d. ``N(0, ρ²)`` (p = 2) or
  ``U[−ρ, ρ]`` (p = ∞), as in Andriushchenko et al.'s code (``avg_l2``,
  ``avg_linf``); there ρ scales each coordinate, it is not a ball radius.
  Coordinates with ``c_i = 0`` (``θ_i = 0`` and ``η = 0``) are never perturbed.
- ``average``: ``E_{δ ~ N(0, σ²I)} L(θ+δ) − L(θ)`` (random-perturbation sharpness).

Scale invariance of ``adaptive``. If ``θ' = Sθ`` (``S`` positive diagonal) and
``L'(θ') = L(S⁻¹θ')`` (e.g. a ReLU layer scaled by α, the next by 1/α), then
``c' = S c`` and ``L'(θ' + c'⊙u) = L(θ + c⊙u)`` for every ``u``: the objective is
the same function of ``u``. Ascent is done in ``u``-space and random ``u`` are
drawn independently of ``θ``, so with the same generator both parameterizations
visit the same ``u`` and report the same value up to rounding. ``lambda_max``,
``keskar``, ``sam`` and ``average`` are not invariant.

Ascent (``keskar``, ``sam``, adaptive worst case). With ``δ = c ⊙ u`` and
``u ∈ {‖u‖_p ≤ r}`` (Keskar: ``c = ε(|θ|+1)``, p = ∞, r = 1; SAM: ``c = 1``, p = 2,
r = ρ), start at ``u = 0`` and repeat ``steps`` times: ``u ← P(u + α d)`` with
``d = g_u/‖g_u‖₂`` (p = 2) or ``sign(g_u)`` (p = ∞), ``g_u = c ⊙ ∇L(θ + c⊙u)``,
and ``P`` the projection onto the ball (rescaling, or clipping). A step whose loss
does not exceed the current one is rejected and α halved. Where ``g_u = 0`` (at an
exact stationary point) the direction is drawn at random from ``generator``
(Gaussian for p = 2, Rademacher for p = ∞) and the record's note says so. Default
α: ``r`` for p = 2 (so one step is SAM's), ``2.5 r/steps`` for p = ∞ (Madry et
al. 2018, "Towards deep learning models resistant to adversarial attacks"). The
reported maximum is the largest loss among the evaluated perturbations: a lower
bound on the true maximum (projected ascent finds local maxima only).

Limits. Ascent values are lower bounds. With an Evaluator that recomputes BatchNorm
statistics per point, the loss is exact but the ascent gradient treats the
recomputed statistics as constants. With a train-mode Evaluator (``mode="train"``)
every loss uses each batch's own statistics (the gradient flows through them) and
live dropout; without ``dropout_seed`` the masks change between evaluations and the
record's note says so. An Evaluator over one data-parallel shard
gives that shard's share of the loss: pass a callable that all-reduces instead.
``perturbation`` is a dense ``(n,)`` tensor.

Losses come from an :class:`probe.evaluate.Evaluator` (its differentiable
``loss_with_grad`` for ascent, its vmapped ``losses`` for Monte Carlo) or from any
callable ``loss(flat) -> 0-dim tensor`` differentiable by autograd plus a
``center``. Monte Carlo values carry their standard error ``s/√m``. Non-finite
losses are reported in the record's ``note``, never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from probe.eigen import eigenvalues
from probe.operators import CurvatureOperator
from probe.perturb import Ascent as _Ascent
from probe.perturb import LossLike
from probe.perturb import Objective as _Objective
from probe.perturb import ascend as _ascend
from probe.perturb import join_notes as _join
from probe.perturb import nonfinite_note as _nonfinite_note

__all__ = [
    "MEASURES",
    "KINDS",
    "SharpnessResult",
    "lambda_max",
    "keskar_sharpness",
    "sam_sharpness",
    "adaptive_sharpness",
    "average_sharpness",
]

MEASURES = ("lambda_max", "keskar", "sam", "adaptive", "average")
KINDS = ("worst", "average")
_NAN = float("nan")
# Adaptive ρ that no paper fixes: the grids of Andriushchenko et al. (2023)'s ResNet-18 runs, for the error message.
_ADAPTIVE_RHO_HINTS = {("average", "l2"): "0.05-0.4", ("average", "linf"): "0.1-0.8", ("worst", "linf"): "0.001-0.008"}


@dataclass(frozen=True)
class SharpnessResult:
    """One sharpness measure at one center.

    Attributes:
        measure: one of :data:`MEASURES`.
        value: the measure (Keskar's in percent, see the module docstring).
        base_loss: ``L(θ)`` (NaN for ``lambda_max``).
        perturbed_loss: the largest loss found (worst case) or the mean perturbed loss
            (average case); NaN for ``lambda_max``.
        params: the measure's parameters (``epsilon``/``rho``/``sigma``, ``norm``,
            ``kind``, ``steps``, ``step_size``, ``num_samples``, ``seed``...), as passed
            or resolved from defaults; ``seed`` is the generator's initial seed or None.
        stderr: standard error of ``value`` for Monte Carlo measures, else NaN.
        num_evaluations: loss evaluations over the probe set (with or without gradient).
        num_gradients: of those, evaluations with a gradient (a backward pass).
        num_matvecs: Hessian-vector products (``lambda_max`` only).
        losses: float64 on the CPU: the loss at each ascent candidate, in order
            (``(steps,)``, shorter if a non-finite gradient stopped the ascent), or at
            each Monte Carlo sample (``(num_samples,)``).
        perturbation: ``δ`` at the largest loss found (worst-case measures), else None.
        note: numerical trouble (zero gradient at the center, non-finite losses,
            Lanczos not converged), or ``""``.
    """

    measure: str
    value: float
    base_loss: float
    perturbed_loss: float
    params: dict[str, Any]
    stderr: float = _NAN
    num_evaluations: int = 0
    num_gradients: int = 0
    num_matvecs: int = 0
    losses: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64), repr=False)
    perturbation: Tensor | None = field(default=None, repr=False)
    note: str = ""


# --------------------------------------------------------------------------- validation


def _positive(name: str, value: float, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {name}={value!r}; {hint}")
    return float(value)


def _steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got steps={steps!r}; use 1 for a single ascent step")
    return steps


def _num_samples(num_samples: int, antithetic: bool) -> int:
    least = 4 if antithetic else 2
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < least:
        raise ValueError(
            f"num_samples must be an integer >= {least} (a standard error needs at least 2 independent "
            f"{'pairs' if antithetic else 'samples'}), got num_samples={num_samples!r}; raise num_samples"
        )
    if antithetic and num_samples % 2:
        raise ValueError(
            f"num_samples must be even with antithetic=True (samples come in pairs ±δ), "
            f"got num_samples={num_samples}; use {num_samples + 1}"
        )
    return num_samples


def _norm_name(p: float | str) -> str:
    if p in (2, "2"):
        return "l2"
    if p in (math.inf, "inf"):
        return "linf"
    raise ValueError(f"p must be 2 or inf (math.inf or 'inf'), got p={p!r}")


def _seed(generator: torch.Generator | None) -> int | None:
    return None if generator is None else int(generator.initial_seed())


# --------------------------------------------------------------------------- the loss as a function of θ


def _worst_record(measure: str, value: float, a: _Ascent, obj: _Objective, params: dict[str, Any]) -> SharpnessResult:
    return SharpnessResult(
        measure=measure,
        value=value,
        base_loss=a.base_loss,
        perturbed_loss=a.best_loss,
        params=params,
        num_evaluations=obj.num_evaluations,
        num_gradients=obj.num_gradients,
        losses=a.losses,
        perturbation=a.delta,
        note=_join(a.note, _randomness_note(obj)),
    )


def _randomness_note(obj: _Objective) -> str:
    """The evaluator's train-mode dropout note (see :attr:`probe.evaluate.Evaluator.randomness_note`), or ``""``."""
    return obj.evaluator.randomness_note if obj.evaluator is not None else ""


# --------------------------------------------------------------------------- average case: Monte Carlo


def _monte_carlo(
    measure: str,
    obj: _Objective,
    draw: Callable[[], Tensor],
    num_samples: int,
    antithetic: bool,
    params: dict[str, Any],
) -> SharpnessResult:
    """Mean of ``L(θ+δ) − L(θ)`` over ``num_samples`` draws ``δ = draw()`` (pairs ±δ when antithetic)."""
    center = obj.center
    base = obj.value(center)
    num_draws = num_samples // 2 if antithetic else num_samples
    chunks, done = [], 0
    while done < num_draws:
        rows = []
        for _ in range(min(obj.block, num_draws - done)):
            d = draw().to(center.device, center.dtype)  # one draw at a time: values do not depend on the block size
            rows += [d, -d] if antithetic else [d]
        done += len(rows) // (2 if antithetic else 1)
        chunks.append(obj.values(center + torch.stack(rows)))  # (rows, n) points
    losses = torch.cat(chunks)  # (num_samples,)
    increase = losses - base
    if antithetic:
        increase = increase.view(-1, 2).mean(1)  # (pairs,): the pair means are the independent samples
    note = _join(_nonfinite_note(losses), _randomness_note(obj))
    if not math.isfinite(base):
        note = _join(f"the loss at the center is {base}: no sharpness can be measured there", note)
    return SharpnessResult(
        measure=measure,
        value=float(increase.mean()),
        base_loss=base,
        perturbed_loss=float(losses.mean()),
        params=params,
        stderr=float(increase.std(unbiased=True) / math.sqrt(increase.numel())),
        num_evaluations=obj.num_evaluations,
        num_gradients=obj.num_gradients,
        losses=losses,
        note=note,
    )


def lambda_max(
    op: CurvatureOperator,
    *,
    tol: float = 1e-6,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
    start: Tensor | None = None,
) -> SharpnessResult:
    """λ_max of a curvature operator (e.g. :class:`probe.hessian.HessianOperator`) by Lanczos.

    Args:
        op: the symmetric operator.
        tol, max_steps, start: as in :func:`probe.eigen.eigenvalues` (default ``tol=1e-6``:
            about 1e-12 relative accuracy for a separated top eigenvalue).
        generator: randomness of the Lanczos start vector.

    Returns:
        ``measure="lambda_max"``, ``value`` the largest Ritz value, ``num_matvecs``;
        ``note`` says when Lanczos did not converge. Losses are NaN (not computed).

    Raises:
        ValueError: as :func:`probe.eigen.eigenvalues` does (bad ``tol``, ``max_steps``).
    """
    r = eigenvalues(op, 1, which="largest", tol=tol, max_steps=max_steps, generator=generator, start=start)
    return SharpnessResult(
        measure="lambda_max",
        value=float(r.eigenvalues[0]),
        base_loss=_NAN,
        perturbed_loss=_NAN,
        params={"tol": tol, "max_steps": max_steps, "seed": _seed(generator)},
        num_matvecs=r.num_matvecs,
        note=r.note,
    )


def keskar_sharpness(
    loss: LossLike,
    center: Tensor | None = None,
    *,
    epsilon: float = 1e-3,
    steps: int = 20,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> SharpnessResult:
    """Keskar et al. (2017) ε-sharpness ``100·(max_{C_ε} L(θ+δ) − L(θ))/(1 + L(θ))`` in the full space.

    Args:
        loss: an :class:`Evaluator`, or a callable ``flat -> 0-dim tensor`` differentiable by autograd.
        center: θ (``(n,)``); default: the evaluator's model parameters (required for a callable).
        epsilon: box size, ``|δ_i| ≤ ε(|θ_i| + 1)``; default 1e-3, the paper's (its tables also use 5e-4).
        steps: projected sign-ascent steps (gradient evaluations); default 20 (ours: the paper
            runs L-BFGS-B instead).
        step_size: sign-step length as a fraction of each coordinate's half-width; default
            ``2.5/steps`` (Madry et al. 2018).
        generator: randomness of the first direction when the gradient at θ is zero.

    Returns:
        ``measure="keskar"``; ``perturbation`` is the maximizing δ, inside the box.

    Raises:
        ValueError: for a non-positive ``epsilon``/``step_size``, ``steps < 1``, a missing or
            malformed ``center``, or a loss that is not a differentiable scalar.
        TypeError: for a ``loss`` that is neither an Evaluator nor callable.
    """
    epsilon = _positive("epsilon", epsilon, "Keskar et al. use 1e-3 and 5e-4")
    steps = _steps(steps)
    step_size = 2.5 / steps if step_size is None else _positive("step_size", step_size, "omit it for 2.5/steps")
    obj = _Objective(loss, center)
    scale = epsilon * (obj.center.abs() + 1)
    a = _ascend(obj, scale, radius=1.0, norm="linf", steps=steps, step_size=step_size, generator=generator)
    value = 100.0 * (a.best_loss - a.base_loss) / (1.0 + a.base_loss)
    params = {
        "epsilon": epsilon,
        "norm": "linf",
        "space": "full",
        "steps": steps,
        "step_size": step_size,
        "seed": _seed(generator),
    }
    return _worst_record("keskar", value, a, obj, params)


def sam_sharpness(
    loss: LossLike,
    center: Tensor | None = None,
    *,
    rho: float = 0.05,
    steps: int = 1,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> SharpnessResult:
    """Foret et al. (2021) ρ-sharpness ``max_{‖δ‖₂ ≤ ρ} L(θ+δ) − L(θ)``.

    Args:
        loss, center: as in :func:`keskar_sharpness`.
        rho: L2 radius in parameter units; default 0.05 (Foret et al.'s usual value).
        steps: 1 (default, SAM's ``δ = ρ g/‖g‖``) or more for projected ascent on the ball.
        step_size: L2 length of each normalized step; default ``rho``.
        generator: randomness of the first direction when ``∇L(θ) = 0``. At an exact
            minimum ``δ = ρ g/‖g‖`` is undefined: the first step then follows a random
            direction and ``note`` says so (the value is a random-direction lower bound).

    Returns:
        ``measure="sam"``; ``value`` is the largest loss increase found (for ``steps=1`` the
        one-step value itself, which may be negative).

    Raises:
        ValueError, TypeError: as :func:`keskar_sharpness`, for ``rho`` in place of ``epsilon``.
    """
    rho = _positive("rho", rho, "Foret et al. use 0.05")
    steps = _steps(steps)
    step_size = rho if step_size is None else _positive("step_size", step_size, "omit it for step_size=rho")
    obj = _Objective(loss, center)
    a = _ascend(
        obj, torch.ones_like(obj.center), radius=rho, norm="l2", steps=steps, step_size=step_size, generator=generator
    )
    params = {"rho": rho, "norm": "l2", "steps": steps, "step_size": step_size, "seed": _seed(generator)}
    return _worst_record("sam", a.best_loss - a.base_loss, a, obj, params)


def adaptive_sharpness(
    loss: LossLike,
    center: Tensor | None = None,
    *,
    kind: str = "worst",
    p: float | str = 2,
    rho: float | None = None,
    eta: float = 0.0,
    steps: int = 20,
    step_size: float | None = None,
    num_samples: int = 20,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
) -> SharpnessResult:
    """Adaptive sharpness with ``δ = (|θ| + η) ⊙ u`` (Kwon et al. 2021; Andriushchenko et al. 2023).

    Args:
        loss, center: as in :func:`keskar_sharpness`.
        kind: ``"worst"`` (``max_{‖u‖_p ≤ ρ}``, projected ascent in u-space) or ``"average"``
            (Monte Carlo over ``u_i`` i.i.d. ``N(0, ρ²)`` for p = 2, ``U[−ρ, ρ]`` for p = ∞).
        p: 2 or ``math.inf`` (``"inf"``).
        rho: radius (worst) or per-coordinate scale (average) of ``u``. Default only for
            worst-case p = 2: 0.5, the official ASAM default (Kwon et al. 2021, CIFAR-10);
            otherwise required.
        eta: offset in ``c = |θ| + η``; default 0 (Andriushchenko et al.: exactly scale
            invariant, coordinates with ``θ_i = 0`` stay fixed); ASAM's code uses 0.01.
        steps, step_size: worst case only; default 20 steps (Andriushchenko et al.'s
            ``n_iters``) and ``step_size`` ``rho`` (p = 2) or ``2.5·rho/steps`` (p = ∞), in u units.
        num_samples, antithetic: average case only; default 20 samples (Andriushchenko et
            al.'s ``n_iters``); ``antithetic`` evaluates pairs ``±u`` (cancels the odd part of
            ``L``, e.g. the gradient term away from a minimum).
        generator: randomness of ``u`` (average) or of a first direction at a stationary point.

    Returns:
        ``measure="adaptive"`` with ``params["kind"]`` and ``params["norm"]``; the average
        case has ``stderr``; the worst case has ``perturbation``.

    Raises:
        ValueError: for an unknown ``kind`` or ``p``, a missing or non-positive ``rho``, a
            negative ``eta``, a center whose scale ``|θ| + η`` is 0 everywhere, bad
            ``steps``/``step_size``/``num_samples``, and as :func:`keskar_sharpness`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got kind={kind!r}")
    norm = _norm_name(p)
    if rho is None:
        if (kind, norm) != ("worst", "l2"):
            raise ValueError(
                f"rho is required for kind={kind!r}, p={p!r}: no paper fixes a default; Andriushchenko et al. "
                f"(2023) sweep rho={_ADAPTIVE_RHO_HINTS[(kind, norm)]} for ResNet-18 on CIFAR-10"
            )
        rho = 0.5
    rho = _positive("rho", rho, "ASAM's default is 0.5 for worst-case p=2")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got eta={eta!r}; 0 keeps exact scale invariance")
    obj = _Objective(loss, center)
    scale = obj.center.abs() + eta
    if not bool((scale != 0).any()):
        raise ValueError("every coordinate of center is 0, so adaptive perturbations |θ|⊙u vanish; pass eta > 0")
    params: dict[str, Any] = {"kind": kind, "rho": rho, "norm": norm, "eta": float(eta)}
    if kind == "worst":
        steps = _steps(steps)
        default = rho if norm == "l2" else 2.5 * rho / steps
        step_size = default if step_size is None else _positive("step_size", step_size, "omit it for the default")
        a = _ascend(obj, scale, radius=rho, norm=norm, steps=steps, step_size=step_size, generator=generator)
        params |= {"steps": steps, "step_size": step_size, "seed": _seed(generator)}
        return _worst_record("adaptive", a.best_loss - a.base_loss, a, obj, params)
    num_samples = _num_samples(num_samples, antithetic)
    n = obj.center.shape[0]

    def draw() -> Tensor:
        if norm == "l2":
            u = torch.randn(n, generator=generator, dtype=torch.float64) * rho
        else:
            u = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * rho
        return u.to(obj.center.device, obj.center.dtype) * scale

    params |= {"num_samples": num_samples, "antithetic": antithetic, "seed": _seed(generator)}
    return _monte_carlo("adaptive", obj, draw, num_samples, antithetic, params)


def average_sharpness(
    loss: LossLike,
    center: Tensor | None = None,
    *,
    sigma: float,
    num_samples: int = 20,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
) -> SharpnessResult:
    """Random-perturbation sharpness ``E_{δ ~ N(0, σ²I)} L(θ+δ) − L(θ)`` by Monte Carlo.

    Args:
        loss, center: as in :func:`keskar_sharpness`.
        sigma: standard deviation of each coordinate of δ, in parameter units (required:
            no paper fixes one; ``‖δ‖₂ ≈ σ√n``).
        num_samples: perturbed evaluations; default 20 (Andriushchenko et al. 2023's count).
        antithetic: evaluate pairs ``±δ``; removes the variance of the gradient term.
        generator: randomness of δ.

    Returns:
        ``measure="average"`` with ``stderr`` (``s/√m`` over samples, or over pairs).

    Raises:
        ValueError: for a non-positive ``sigma``, ``num_samples < 2`` (odd or < 4 with
            ``antithetic``), and as :func:`keskar_sharpness`.
    """
    sigma = _positive("sigma", sigma, "it is the standard deviation of each coordinate of δ")
    num_samples = _num_samples(num_samples, antithetic)
    obj = _Objective(loss, center)
    n = obj.center.shape[0]

    def draw() -> Tensor:
        return torch.randn(n, generator=generator, dtype=torch.float64) * sigma

    params = {
        "sigma": sigma,
        "distribution": "gaussian",
        "num_samples": num_samples,
        "antithetic": antithetic,
        "seed": _seed(generator),
    }
    return _monte_carlo("average", obj, draw, num_samples, antithetic, params)
