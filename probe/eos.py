"""Edge of stability: sharpness against the optimizer's stability threshold, per checkpoint.

Cohen et al. 2021 ("Gradient descent on neural networks typically occurs at the
edge of stability", ICLR 2021) observed that full-batch gradient descent with step
size η first raises the sharpness λ_max(H) (progressive sharpening) until it
reaches 2/η, and then hovers there while the loss keeps falling non-monotonically.
Cohen et al. 2022 ("Adaptive gradient methods at the edge of stability") found the
same for Adam with the *preconditioned* sharpness λ_max(P⁻¹H).

Thresholds. Each is the largest sharpness at which the optimizer, run on the
quadratic ``½θᵀHθ`` (the local model the thresholds come from) with everything
else frozen, still converges along H's top eigenvector. Write ``a = ηλ`` for an
eigenvalue λ of H (of P⁻¹H for Adam):

- ``"gd"``: ``θ' = (1 − a)θ`` converges iff ``|1 − a| < 1``, i.e. ``λ < 2/η``
  (Cohen et al. 2021, §2).
- ``"momentum"`` (heavy ball, as ``torch.optim.SGD(momentum=β, dampening=d)``:
  ``v' = βv + (1−d)g``, ``θ' = θ − ηv'``): ``x_{t+1} = (1 + β − (1−d)a)x_t − βx_{t−1}``,
  whose characteristic roots stay in the unit disc iff ``(1−d)a < 2 + 2β``, i.e.
  ``λ < (2 + 2β)/((1 − d)η)`` (Cohen et al. 2021 give (2+2β)/η for d = 0; the
  derivation above and the dampening factor are this module's, checked by
  simulating ``torch.optim.SGD`` in the tests).
- ``"nesterov"`` (``torch.optim.SGD(nesterov=True)``, equivalently Sutskever's
  form): characteristic polynomial ``x² − (1+β)(1−a)x + β(1−a)``, which has the
  root −1 at ``a = (2 + 2β)/(1 + 2β)``; stable iff ``λ < (2 + 2β)/((1 + 2β)η)``
  (the threshold Cohen et al. 2021 give for Nesterov; re-derived here and checked
  by simulating ``torch.optim.SGD(nesterov=True)`` in the tests).
- ``"adam"`` with β₁ and a frozen preconditioner P: ``m' = β₁m + (1−β₁)g``,
  ``θ' = θ − ηP⁻¹m'`` is heavy ball with dampening ``1 − β₁`` on ``P⁻¹H``, so
  ``λ_max(P⁻¹H) < (2 + 2β₁)/((1 − β₁)η)`` (Cohen et al. 2022, their "38/η" for
  β₁ = 0.9; checked by simulating frozen-P Adam in the tests).

Adam's preconditioner (:func:`adam_preconditioner`). ``torch.optim.Adam`` steps
``θ ← θ − η m / ((1 − β₁ᵗ)(√v̂ + ε))`` with ``v̂ = v/(1 − β₂ᵗ)``, so the frozen
preconditioner of the update actually taken is ``P = (1 − β₁ᵗ)·diag(√v̂ + ε)``.
That Cohen et al. 2022 fold the first-moment bias correction into P the same way
is our reading of the paper, not checked against its text; the torch side is
tested exactly. The factor tends to 1 (above 0.99 after 44 steps at β₁ = 0.9) and
``first_moment_correction=False`` drops it (the "diag(√v̂ + ε)" often quoted).
:class:`PreconditionedOperator` applies the symmetric ``P^{-1/2} H P^{-1/2}``, which
has the eigenvalues of ``P⁻¹H`` (a similarity transform), so the Lanczos engine runs
on it unchanged.

Warm starts (:func:`lambda_max_warm`). Consecutive checkpoints have nearby top
eigenvectors, so Lanczos started from the previous one needs fewer products than
from a random vector. The start is ``u/‖u‖ + mix·r/‖r‖`` with a Gaussian r: an
exact eigenvector as start spans an invariant subspace, and Lanczos would then
return its eigenvalue even when another has overtaken it (eigenvalue crossing);
the random part keeps every eigendirection reachable. Its weight ``mix``
(default ``max(0.01, 1000·tol)``, this module's choice) must stay well above
Lanczos' tolerance: with ``tol=1e-6``, an exact old eigenvector as start and a
crossing, ``mix=1e-4`` stopped on the overtaken eigenvalue while ``mix ≥ 1e-3``
found the new top (measured while writing tests/probe/test_eos.py, which checks
the latter), so ``mix`` in ``(0, 1000·tol)`` is rejected (0 opts out). The
savings are modest when checkpoints are far apart: Lanczos converges at a rate
set by the spectrum, and a warm start only shortens the part of the run spent
reducing the initial angle (34% fewer products on a series of 1e-3 perturbations
of a 300×300 matrix, 14% on the digits GD series every 100 steps, in the tests).

Limits: the thresholds are linear-stability statements about a frozen quadratic
model; they ignore weight decay (L2 decay coupled into the gradient shifts the
Hessian by the decay coefficient: pass a loss that contains it; decoupled decay,
as in AdamW, is not modelled), learning-rate warm-up and, for Adam, the drift of P.
Minibatch training is governed by other quantities (batch sharpness); these thresholds
are for full-batch (or large-batch) training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from probe.eigen import EigenResult, eigenvalues
from probe.operators import CurvatureOperator, norm
from probe.preconditioned import DEFAULT_ADAM_BETA1, PreconditionedOperator, adam_preconditioner

__all__ = [
    "OPTIMIZERS",
    "EosPoint",
    "EosSeries",
    "PreconditionedOperator",
    "adam_preconditioner",
    "eos_point",
    "eos_series",
    "lambda_max_warm",
    "stability_threshold",
]

OPTIMIZERS = ("gd", "momentum", "nesterov", "adam")
DEFAULT_MIX = 0.01  # default weight of the random part of a warm start (this module's choice)
MIX_PER_TOL = 1000  # smallest allowed mix / tol (see the module docstring)


def _resolve_momentum(optimizer: str, momentum: float | None) -> float:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got optimizer={optimizer!r}")
    if optimizer == "gd":
        if momentum not in (None, 0, 0.0):
            raise ValueError(
                f"optimizer='gd' has no momentum, got momentum={momentum}; use optimizer='momentum' or 'nesterov'"
            )
        return 0.0
    if momentum is None:
        if optimizer == "adam":
            return DEFAULT_ADAM_BETA1
        raise ValueError(
            f"optimizer={optimizer!r} needs momentum (β in [0, 1)), got momentum=None; "
            "pass the optimizer's momentum, e.g. momentum=0.9"
        )
    momentum = float(momentum)
    if not 0.0 <= momentum < 1.0:
        name = "momentum (β₁ for adam)" if optimizer == "adam" else "momentum"
        raise ValueError(f"{name} must be in [0, 1), got momentum={momentum}; β ≥ 1 never converges")
    return momentum


def stability_threshold(optimizer: str, lr: float, momentum: float | None = None, *, dampening: float = 0.0) -> float:
    """The largest stable sharpness of ``optimizer`` at learning rate ``lr`` (see the module docstring).

    Args:
        optimizer: ``"gd"`` (2/η), ``"momentum"`` ((2+2β)/((1−d)η)), ``"nesterov"``
            ((2+2β)/((1+2β)η)) or ``"adam"`` ((2+2β₁)/((1−β₁)η), a bound on the
            preconditioned sharpness λ_max(P⁻¹H)).
        lr: step size η (> 0).
        momentum: β for momentum/nesterov (required), β₁ for adam (default 0.9,
            torch's default); must be None or 0 for gd.
        dampening: d of ``torch.optim.SGD`` for ``"momentum"`` (default 0).

    Returns:
        The threshold, in the units of the Hessian's eigenvalues (1/η).

    Raises:
        ValueError: for an unknown optimizer, a non-positive or non-finite ``lr``,
            momentum outside [0, 1) (or missing where needed, or given for gd), or
            dampening outside [0, 1) or non-zero for other optimizers than momentum.
    """
    beta = _resolve_momentum(optimizer, momentum)
    lr = float(lr)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be positive and finite, got lr={lr}; pass the step size the optimizer used")
    if not 0.0 <= dampening < 1.0:
        raise ValueError(f"dampening must be in [0, 1), got dampening={dampening}; torch's default is 0")
    if dampening and optimizer != "momentum":
        raise ValueError(
            f"dampening applies to optimizer='momentum' only, got dampening={dampening} with "
            f"optimizer={optimizer!r}; pass dampening=0"
        )
    if optimizer == "gd":
        return 2.0 / lr
    if optimizer == "momentum":
        return (2.0 + 2.0 * beta) / ((1.0 - dampening) * lr)
    if optimizer == "nesterov":
        return (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * lr)
    return (2.0 + 2.0 * beta) / ((1.0 - beta) * lr)


def _check_previous(op: CurvatureOperator, previous: Tensor | None) -> Tensor | None:
    if previous is None:
        return None
    if previous.ndim != 1 or previous.shape[0] != op.local_dim:
        raise ValueError(
            f"previous must have shape (local_dim={op.local_dim},), got {tuple(previous.shape)}; "
            "pass the previous checkpoint's eigenvector of the same parameter space, or None for a cold start"
        )
    previous = previous.to(dtype=op.dtype, device=op.device)
    if not bool(torch.isfinite(previous).all()) or float(norm(op, previous)) == 0.0:
        raise ValueError("previous must be finite and non-zero; pass None for a cold start")
    return previous


def lambda_max_warm(
    op: CurvatureOperator,
    previous: Tensor | None = None,
    *,
    mix: float | None = None,
    tol: float = 1e-6,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    """λ_max of ``op`` by Lanczos, started from ``previous`` (warm) or a random vector (cold).

    Args:
        op: symmetric operator (a Hessian, or a :class:`PreconditionedOperator`).
        previous: ``(local_dim,)`` top eigenvector of the previous checkpoint's
            operator (``EigenResult.eigenvectors[:, 0]``, or ``EosPoint.eigenvector``),
            or None for a cold start.
        mix: weight of the random unit vector added to the unit ``previous`` (see
            the module docstring); default ``max(0.01, 1000·tol)``. 0 starts from
            ``previous`` exactly (an eigenvalue crossing can then go unnoticed);
            otherwise at least ``1000·tol``.
        tol, max_steps: as :func:`probe.eigen.eigenvalues` (default ``tol=1e-6``:
            relative residual, eigenvalue to about 1e-12 relative when separated).
        generator: randomness of the cold start and of the mixed-in vector.

    Returns:
        The :class:`~probe.eigen.EigenResult` (k=1) with its eigenvector and measured
        residual ``‖Av − λv‖``.

    Raises:
        ValueError: for ``previous`` of the wrong shape, non-finite or zero, ``mix``
            negative, non-finite or in ``(0, 1000·tol)``, or as
            :func:`probe.eigen.eigenvalues`.
    """
    if mix is None:
        mix = max(DEFAULT_MIX, MIX_PER_TOL * tol)
    if not (math.isfinite(mix) and mix >= 0):
        raise ValueError(
            f"mix must be finite and ≥ 0, got mix={mix}; the default is max({DEFAULT_MIX}, {MIX_PER_TOL}·tol)"
        )
    if 0 < mix < MIX_PER_TOL * tol:
        raise ValueError(
            f"mix must be 0 or at least {MIX_PER_TOL}·tol={MIX_PER_TOL * tol:g}, got mix={mix:g}; a smaller random "
            "part lets Lanczos stop on an eigenvalue that another has overtaken: raise mix or lower tol"
        )
    previous = _check_previous(op, previous)
    start = None
    if previous is not None:
        start = previous / norm(op, previous)
        if mix > 0:
            r = op.random_vectors(1, generator=generator, kind="gaussian")[:, 0]
            start = start + mix * r / norm(op, r)
    return eigenvalues(
        op,
        1,
        which="largest",
        tol=tol,
        max_steps=max_steps,
        generator=generator,
        start=start,
        return_eigenvectors=True,
    )


@dataclass(frozen=True)
class EosPoint:
    """Sharpness against the stability threshold at one checkpoint.

    Attributes:
        step: the training step of the checkpoint.
        lr: the step size η in force at that step.
        optimizer: one of :data:`OPTIMIZERS`.
        momentum: β (β₁ for adam; 0 for gd).
        lambda_max: λ_max(H), or λ_max(P⁻¹H) for adam.
        threshold: :func:`stability_threshold` (1/η units).
        ratio: ``lambda_max / threshold`` (1 = at the edge of stability).
        num_matvecs: operator products spent on λ_max.
        residual: measured ``‖Av − λv‖`` of the eigenpair (absolute).
        converged: whether Lanczos met its tolerance.
        warm_started: whether Lanczos started from the previous eigenvector.
        sharpness: ``"hessian"`` or ``"preconditioned"`` (adam).
        note: why the eigenvalue may be short of the tolerance, or ``""``.
        eigenvector: ``(local_dim,)`` unit top eigenvector of the operator Lanczos ran
            on (for the next warm start), or None once dropped.
    """

    step: int
    lr: float
    optimizer: str
    momentum: float
    lambda_max: float
    threshold: float
    ratio: float
    num_matvecs: int
    residual: float
    converged: bool
    warm_started: bool
    sharpness: str
    note: str = ""
    eigenvector: Tensor | None = field(default=None, repr=False, compare=False)


def eos_point(
    op: CurvatureOperator,
    lr: float,
    *,
    step: int,
    optimizer: str = "gd",
    momentum: float | None = None,
    dampening: float = 0.0,
    preconditioner: Tensor | None = None,
    previous: Tensor | None = None,
    mix: float | None = None,
    tol: float = 1e-6,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
) -> EosPoint:
    """λ_max, threshold and their ratio at one checkpoint (the per-checkpoint call of a series).

    Args:
        op: the Hessian operator of the checkpoint's training loss.
        lr: step size η at ``step``.
        step: the checkpoint's training step.
        optimizer, momentum, dampening: as :func:`stability_threshold`.
        preconditioner: ``(local_dim,)`` diagonal of Adam's P
            (:func:`adam_preconditioner`); required for adam, rejected otherwise.
        previous: the previous point's ``eigenvector`` for a warm start (it must come
            from the same kind of operator: preconditioned for adam), or None.
        mix, tol, max_steps, generator: as :func:`lambda_max_warm`.

    A checkpoint whose operator gives non-finite products (diverged weights) yields
    a point with NaN ``lambda_max``, ``ratio`` and ``residual``, ``converged=False``,
    no eigenvector and a ``note`` saying so, rather than an exception, so a series
    records where training blew up.

    Raises:
        ValueError: for a missing or unexpected ``preconditioner``, or as
            :func:`stability_threshold`, :class:`PreconditionedOperator` and
            :func:`lambda_max_warm`.
    """
    threshold = stability_threshold(optimizer, lr, momentum, dampening=dampening)
    beta = _resolve_momentum(optimizer, momentum)
    if optimizer == "adam":
        if preconditioner is None:
            raise ValueError(
                "optimizer='adam' needs preconditioner (the diagonal of P); "
                "build it from the optimizer state with adam_preconditioner(exp_avg_sq, step)"
            )
        op = PreconditionedOperator(op, preconditioner)
    elif preconditioner is not None:
        raise ValueError(
            f"preconditioner applies to optimizer='adam' only, got one with optimizer={optimizer!r}; "
            "pass preconditioner=None"
        )
    sharpness = "preconditioned" if optimizer == "adam" else "hessian"
    try:
        result = lambda_max_warm(op, previous, mix=mix, tol=tol, max_steps=max_steps, generator=generator)
        failure = "" if bool(torch.isfinite(result.eigenvalues).all()) else "λ_max is not finite"
    # torch.linalg.LinAlgError is public (documented) but re-exported from torch._C without __all__
    except torch.linalg.LinAlgError as err:  # pyright: ignore[reportPrivateImportUsage]  # eigh of a tridiagonal that holds NaN or inf
        result, failure = None, f"Lanczos failed ({err})"
    if result is None or failure:
        nan = float("nan")
        return EosPoint(
            step=int(step),
            lr=float(lr),
            optimizer=optimizer,
            momentum=beta,
            lambda_max=nan,
            threshold=threshold,
            ratio=nan,
            num_matvecs=result.num_matvecs if result is not None else 0,
            residual=nan,
            converged=False,
            warm_started=previous is not None,
            sharpness=sharpness,
            note=f"{failure}: the operator's products are not finite (diverged weights or loss?); "
            "check the checkpoint, the next point starts cold",
        )
    lam = float(result.eigenvalues[0])
    assert result.eigenvectors is not None  # lambda_max_warm returns its eigenvector
    return EosPoint(
        step=int(step),
        lr=float(lr),
        optimizer=optimizer,
        momentum=beta,
        lambda_max=lam,
        threshold=threshold,
        ratio=lam / threshold,
        num_matvecs=result.num_matvecs,
        residual=float(result.residuals[0]),
        converged=result.converged,
        warm_started=previous is not None,
        sharpness=sharpness,
        note=result.note,
        eigenvector=result.eigenvectors[:, 0],
    )


@dataclass(frozen=True)
class EosSeries:
    """An edge-of-stability series: one :class:`EosPoint` per checkpoint, in step order.

    Attributes:
        points: the points (eigenvectors dropped except, with ``keep_eigenvectors``, all).
        optimizer: the optimizer kind of every point.
        momentum: its β (β₁ for adam).
    """

    points: tuple[EosPoint, ...]
    optimizer: str
    momentum: float

    @property
    def steps(self) -> list[int]:
        return [p.step for p in self.points]

    @property
    def lambda_max(self) -> Tensor:
        """``(n,)`` float64 sharpness per point."""
        return torch.tensor([p.lambda_max for p in self.points], dtype=torch.float64)

    @property
    def thresholds(self) -> Tensor:
        """``(n,)`` float64 stability threshold per point."""
        return torch.tensor([p.threshold for p in self.points], dtype=torch.float64)

    @property
    def ratios(self) -> Tensor:
        """``(n,)`` float64 ``lambda_max / threshold`` per point."""
        return torch.tensor([p.ratio for p in self.points], dtype=torch.float64)

    @property
    def num_matvecs(self) -> int:
        """Operator products spent over the whole series."""
        return sum(p.num_matvecs for p in self.points)


def eos_series(
    checkpoints: Iterable[tuple[int, float, Any]],
    make_operator: Callable[[Any], CurvatureOperator],
    *,
    optimizer: str = "gd",
    momentum: float | None = None,
    dampening: float = 0.0,
    make_preconditioner: Callable[[Any], Tensor] | None = None,
    warm_start: bool = True,
    mix: float | None = None,
    tol: float = 1e-6,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
    keep_eigenvectors: bool = False,
) -> EosSeries:
    """:func:`eos_point` over a series of checkpoints, each warm-started from the previous one.

    Checkpoints are consumed one at a time (each operator is built, used and dropped
    before the next), so a long series costs one operator's memory.

    Args:
        checkpoints: ``(step, lr, state)`` triples in increasing step order; ``state``
            is whatever ``make_operator`` takes (a model, a state dict, a path the
            caller resolves). Learning rates come from the caller (checkpoint
            metadata, a sidecar file, the spec).
        make_operator: ``state -> CurvatureOperator`` (the Hessian at that checkpoint).
        optimizer, momentum, dampening: as :func:`stability_threshold`.
        make_preconditioner: ``state -> (local_dim,)`` diagonal of Adam's P; required
            for adam.
        warm_start: start each Lanczos run from the previous top eigenvector (True)
            or from a random vector (False, for comparison).
        mix, tol, max_steps, generator: as :func:`lambda_max_warm`.
        keep_eigenvectors: keep every point's eigenvector (default: only the last).

    Raises:
        ValueError: for steps that do not increase, ``make_preconditioner`` missing
            for adam or given for another optimizer, an empty series, or as
            :func:`eos_point`.
    """
    beta = _resolve_momentum(optimizer, momentum)
    if (optimizer == "adam") != (make_preconditioner is not None):
        raise ValueError(
            f"make_preconditioner is required for optimizer='adam' and rejected otherwise; got "
            f"optimizer={optimizer!r} with make_preconditioner={'set' if make_preconditioner else None}"
        )
    points: list[EosPoint] = []
    previous: Tensor | None = None
    for step, lr, state in checkpoints:
        if points and step <= points[-1].step:
            raise ValueError(
                f"checkpoint steps must increase, got step={step} after step={points[-1].step}; "
                "sort the checkpoints by step"
            )
        point = eos_point(
            make_operator(state),
            lr,
            step=step,
            optimizer=optimizer,
            momentum=momentum,
            dampening=dampening,
            preconditioner=make_preconditioner(state) if make_preconditioner is not None else None,
            previous=previous if warm_start else None,
            mix=mix,
            tol=tol,
            max_steps=max_steps,
            generator=generator,
        )
        previous = point.eigenvector
        if points and not keep_eigenvectors:
            points[-1] = replace(points[-1], eigenvector=None)
        points.append(point)
    if not points:
        raise ValueError("checkpoints is empty: pass at least one (step, lr, state) triple")
    return EosSeries(points=tuple(points), optimizer=optimizer, momentum=beta)
