"""Loss (and error rate) of a model at arbitrary points of its flat parameter space.

The landscape probes (sharpness, barriers, surfaces) evaluate the mean loss over a
fixed probe set at many parameter vectors θ. :class:`Evaluator` does that without
touching the model's own parameters: ``torch.func.functional_call`` runs the
module with the given tensors, and :meth:`Evaluator.losses` evaluates a block of
points at once with ``torch.vmap`` (one batched forward per data batch instead of
one forward per point), falling back to a loop in chunks where vmap cannot run.

Batches of unequal size are weighted by their example counts, as in
:mod:`probe.model_operator`. Parameters outside the :class:`ParameterSpace`
(frozen ones) and buffers keep the model's values.

BatchNorm: statistics estimated at one point are wrong at another (interpolated or
perturbed weights change every layer's activation statistics). With
``recompute_bn=True`` the evaluator re-estimates the running statistics at each
point with one pass over the probe data (cumulative average, momentum None), as
Garipov et al. (2018) and Frankle et al. (2020) do, and evaluates in eval mode
with them; this is recorded as the mode policy ``"eval+bn_recompute"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from probe.model_operator import Batch, LossFn, prepare_batches
from probe.params import ParameterSpace

__all__ = ["Evaluator", "has_batchnorm"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds BatchNorm layers with running statistics."""
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


class Evaluator:
    """Mean loss and error rate over fixed batches at any flat parameter vector.

    Args:
        model: the network (its parameters are never modified).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch-mean loss.
        batches: ``(inputs, targets)`` pairs.
        params: parameter selection (see :class:`ParameterSpace`).
        recompute_bn: re-estimate BatchNorm statistics at each evaluated point
            (default: True when the model has BatchNorm).
        classification: also count errors (``argmax(outputs) != targets``); default:
            True when targets are integer tensors.
        chunk_size: points per vmapped evaluation in :meth:`losses`.
        total_examples: the global example count when ``batches`` is one worker's
            shard (losses are then this shard's weighted share; sum them over
            workers); default: the local count.

    Raises:
        ValueError: for an empty probe set.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Batch],
        *,
        params: Sequence[str] | None = None,
        recompute_bn: bool | None = None,
        classification: bool | None = None,
        chunk_size: int = 16,
        total_examples: int | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.space = ParameterSpace.of(model, params)
        first = self.space.parameters(model)[0]
        self.dtype, self.device = first.dtype, first.device
        self.batches, sizes, self.weights = prepare_batches(batches, self.dtype, self.device, total_examples)
        self.num_examples = sum(sizes)
        self.recompute_bn = has_batchnorm(model) if recompute_bn is None else recompute_bn
        y0 = self.batches[0][1]
        self.classification = (
            isinstance(y0, Tensor) and not y0.is_floating_point() if classification is None else classification
        )
        self.chunk_size = chunk_size
        self.mode = "eval+bn_recompute" if self.recompute_bn else "eval"
        self.num_evaluations = 0

    @property
    def dim(self) -> int:
        return self.space.dim

    def center(self) -> Tensor:
        """The model's own parameters as a flat vector."""
        return self.space.get_flat(self.model)

    def _state(self, flat: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.space.names, self.space.unflatten(flat)))

    def _bn_buffers(self, flat: Tensor) -> dict[str, Tensor]:
        """Running statistics re-estimated at ``flat``: one pass over the probe data."""
        state = self._state(flat)
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        modules = [(n, m) for n, m in self.model.named_modules() if isinstance(m, _BN) and m.track_running_stats]
        momenta = {}
        for name, m in modules:
            prefix = f"{name}." if name else ""
            buffers[prefix + "running_mean"].zero_()
            buffers[prefix + "running_var"].fill_(1)
            buffers[prefix + "num_batches_tracked"].zero_()
            momenta[name] = m.momentum
            m.momentum = None  # cumulative moving average over the pass
        previous = self.model.training
        self.model.train()
        try:
            with torch.no_grad():
                for x, _ in self.batches:
                    functional_call(self.model, {**buffers, **state}, (x,))
        finally:
            self.model.train(previous)
            for name, m in modules:
                m.momentum = momenta[name]
        return buffers

    def _evaluate(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        state = self._state(flat)
        if self.recompute_bn:
            state = {**self._bn_buffers(flat), **state}
        previous = self.model.training
        self.model.eval()
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        err = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            for (x, y), w in zip(self.batches, self.weights):
                out = functional_call(self.model, state, (x,))
                loss = loss + w * self.loss_fn(out, y).to(torch.float64)
                if self.classification:
                    err = err + w * (out.argmax(-1) != y).to(torch.float64).mean()
        finally:
            self.model.train(previous)
        self.num_evaluations += 1
        return loss, err

    @torch.no_grad()
    def loss(self, flat: Tensor) -> float:
        """Mean loss at ``flat`` (shape ``(dim,)``)."""
        return float(self._evaluate(flat)[0])

    @torch.no_grad()
    def loss_and_error(self, flat: Tensor) -> tuple[float, float]:
        """``(mean loss, error rate)`` at ``flat``; the error rate is NaN for non-classification tasks."""
        loss, err = self._evaluate(flat)
        return float(loss), float(err) if self.classification else float("nan")

    def loss_with_grad(self, flat: Tensor) -> Tensor:
        """Mean loss at ``flat`` as a differentiable scalar (for ascent and curve training)."""
        return self._evaluate(flat)[0]

    @torch.no_grad()
    def losses(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """``(losses, errors)`` at each row of ``points`` (``(P, dim)``), float64 tensors of length P.

        Evaluated ``chunk_size`` points at a time with ``torch.vmap`` over the
        parameters; models with BatchNorm recompute (not vmappable) go point by point.
        """
        if points.ndim != 2 or points.shape[1] != self.dim:
            raise ValueError(f"points must have shape (P, dim={self.dim}), got {tuple(points.shape)}")
        if self.recompute_bn:
            pairs = [self._evaluate(p) for p in points]
            return torch.stack([a for a, _ in pairs]).cpu(), torch.stack([b for _, b in pairs]).cpu()
        losses, errors = [], []
        previous = self.model.training
        self.model.eval()
        try:
            for start in range(0, points.shape[0], self.chunk_size):
                chunk = points[start : start + self.chunk_size]
                stacked = dict(zip(self.space.names, self.space.unflatten(chunk.T)))  # each (c, *shape)
                loss = torch.zeros(chunk.shape[0], dtype=torch.float64, device=self.device)
                err = torch.zeros_like(loss)
                for (x, y), w in zip(self.batches, self.weights):
                    out = torch.vmap(lambda s: functional_call(self.model, s, (x,)))(stacked)  # (c, n, ...)
                    loss += w * torch.vmap(lambda o: self.loss_fn(o, y))(out).to(torch.float64)
                    if self.classification:
                        err += w * (out.argmax(-1) != y).to(torch.float64).mean(-1)
                losses.append(loss)
                errors.append(err)
                self.num_evaluations += chunk.shape[0]
        finally:
            self.model.train(previous)
        errors_t = torch.cat(errors).cpu()
        return torch.cat(losses).cpu(), errors_t if self.classification else torch.full_like(errors_t, float("nan"))
