"""Perturbations of a flat parameter vector: the loss as an objective, projected ascent, Monte Carlo.

Shared machinery of the worst-case and average-case measures in
:mod:`probe.sharpness` (and of any probe that perturbs weights): an
:class:`Objective` wraps an :class:`~probe.evaluate.Evaluator` or a plain callable
``loss(flat) -> 0-dim tensor`` and counts evaluations; :func:`ascend` runs a
projected ascent in a coordinate space ``u`` with ``δ = scale ⊙ u``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from probe.evaluate import Evaluator

__all__ = ["LossLike", "Objective", "Ascent", "ascend", "random_direction", "nonfinite_note", "join_notes"]

LossLike = Evaluator | Callable[[Tensor], Tensor]
_NAN = float("nan")
_MC_BLOCK = 16  # Monte Carlo points per call to a callable's loop (an Evaluator uses its chunk_size)


class Objective:
    """``L`` at flat vectors, from an Evaluator or a callable, counting evaluations."""

    def __init__(self, loss: LossLike, center: Tensor | None) -> None:
        self.evaluator = loss if isinstance(loss, Evaluator) else None
        if self.evaluator is not None:
            self.fn = self.evaluator.loss_with_grad
            center = self.evaluator.center() if center is None else center
        elif callable(loss):
            self.fn = loss
            if center is None:
                raise ValueError(
                    "center is required when loss is a callable: pass center=θ (a 1-D float tensor), "
                    "or pass an Evaluator, whose center defaults to the model's parameters"
                )
        else:
            raise TypeError(f"loss must be an Evaluator or a callable flat -> scalar tensor, got {type(loss).__name__}")
        if not isinstance(center, Tensor) or center.ndim != 1 or not center.is_floating_point():
            got = (
                f"shape {tuple(center.shape)}, dtype {center.dtype}"
                if isinstance(center, Tensor)
                else type(center).__name__
            )
            raise ValueError(f"center must be a 1-D floating-point tensor, got {got}; pass the flat parameter vector")
        if self.evaluator is not None and center.shape[0] != self.evaluator.dim:
            raise ValueError(
                f"center must have the evaluator's dim={self.evaluator.dim} entries, got {center.shape[0]}; "
                "build it with evaluator.center() or evaluator.space.get_flat(model)"
            )
        self.center = center.detach()
        self.num_evaluations = 0
        self.num_gradients = 0

    @staticmethod
    def _scalar(out: Any) -> Tensor:
        if not isinstance(out, Tensor) or out.ndim != 0:
            got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"loss(flat) must return a 0-dim tensor, got {got}; reduce it, e.g. with .mean()")
        return out

    def value(self, x: Tensor) -> float:
        self.num_evaluations += 1
        if self.evaluator is not None:
            return self.evaluator.loss(x)
        with torch.no_grad():
            return float(self._scalar(self.fn(x)))

    def value_and_grad(self, x: Tensor) -> tuple[float, Tensor]:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self._scalar(self.fn(x))
        if not out.requires_grad:
            raise ValueError(
                "loss(flat) is not differentiable in flat: compute it with torch operations on flat "
                "(no .item(), no torch.no_grad()) so that autograd can give the ascent direction"
            )
        (grad,) = torch.autograd.grad(out, x, allow_unused=True)
        self.num_evaluations += 1
        self.num_gradients += 1
        return float(out.detach()), torch.zeros_like(x) if grad is None else grad.detach()

    def values(self, points: Tensor) -> Tensor:
        """Losses at the rows of ``points`` (``(P, n)``), float64 on the CPU."""
        self.num_evaluations += points.shape[0]
        if self.evaluator is not None:
            return self.evaluator.losses(points)[0]
        with torch.no_grad():
            return torch.stack([self._scalar(self.fn(p)).to("cpu", torch.float64) for p in points])

    @property
    def block(self) -> int:
        return self.evaluator.chunk_size if self.evaluator is not None else _MC_BLOCK


def nonfinite_note(losses: Tensor) -> str:
    """A note counting the non-finite entries of ``losses``; empty when there are none."""
    bad = int((~torch.isfinite(losses)).sum())
    return f"{bad} of {losses.numel()} perturbed losses were non-finite" if bad else ""


def join_notes(*notes: str) -> str:
    """The non-empty ``notes`` joined by ``"; "``."""
    return "; ".join(n for n in notes if n)


# --------------------------------------------------------------------------- worst case: projected ascent


@dataclass(frozen=True)
class Ascent:
    """The result of :func:`ascend`: the loss at θ, the best perturbed loss, its δ, every loss seen, notes."""

    base_loss: float
    best_loss: float
    delta: Tensor
    losses: Tensor
    note: str


def random_direction(center: Tensor, active: Tensor, norm: str, generator: torch.Generator | None) -> Tensor:
    """A random unit (p = 2) or sign (p = ∞) direction on the active coordinates, drawn on the CPU in float64."""
    n = center.shape[0]
    if norm == "l2":
        d = torch.randn(n, generator=generator, dtype=torch.float64)
    else:
        d = torch.randint(0, 2, (n,), generator=generator).to(torch.float64).mul_(2).sub_(1)
    d = d.to(center.device, center.dtype) * active
    return d / d.norm() if norm == "l2" else d


def ascend(
    obj: Objective,
    scale: Tensor,
    *,
    radius: float,
    norm: str,
    steps: int,
    step_size: float,
    generator: torch.Generator | None,
) -> Ascent:
    """Projected ascent of ``L(θ + scale⊙u)`` over ``‖u‖_p ≤ radius`` (see the module docstring)."""
    center = obj.center
    base, grad = obj.value_and_grad(center)
    if not math.isfinite(base):
        return Ascent(
            base,
            _NAN,
            torch.zeros_like(center),
            torch.zeros(0, dtype=torch.float64),
            f"the loss at the center is {base}: no sharpness can be measured there",
        )
    active = (scale != 0).to(center.dtype)
    u, current, g_u = torch.zeros_like(center), base, scale * grad
    best_loss, best_u = -math.inf, u
    alpha, losses, notes = step_size, [], []
    for _ in range(steps):
        if not bool(torch.isfinite(g_u).all()):
            notes.append(f"the gradient is non-finite after {len(losses)} steps: ascent stopped there")
            break
        if bool((g_u == 0).all()):
            d = random_direction(center, active, norm, generator)
            if not any("zero" in n for n in notes):
                notes.append(
                    "the gradient is zero at the center (a stationary point): the first step "
                    "followed a random direction drawn from generator"
                )
        elif norm == "l2":
            d = g_u / g_u.norm()
        else:
            d = torch.sign(g_u)
        cand = u + alpha * d
        if norm == "l2":
            length = float(cand.norm())
            cand = cand * (radius / length) if length > radius else cand
        else:
            cand = cand.clamp(-radius, radius)
        loss, grad = obj.value_and_grad(center + scale * cand)
        losses.append(loss)
        if not math.isnan(loss) and loss > best_loss:
            best_loss, best_u = loss, cand
        if math.isfinite(loss) and loss > current:
            u, current, g_u = cand, loss, scale * grad
        else:
            alpha /= 2
    losses_t = torch.tensor(losses, dtype=torch.float64)
    if best_loss == -math.inf:
        best_loss = _NAN
    return Ascent(base, best_loss, scale * best_u, losses_t, join_notes(*notes, nonfinite_note(losses_t)))
