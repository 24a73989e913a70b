"""Loss (and error rate) of a model at arbitrary points of its flat parameter space.

The landscape probes (sharpness, barriers, surfaces) evaluate the mean loss over a
fixed probe set at many parameter vectors θ. :class:`Evaluator` does that without
touching the model's own parameters: ``torch.func.functional_call`` runs the
module with the given tensors, and :meth:`Evaluator.losses` evaluates a block of
points at once with ``torch.vmap`` (one batched forward per data batch instead of
one forward per point), falling back to a loop in chunks where vmap cannot run.

Batches of unequal size are weighted by their example counts, or by their token
counts with ``weighting="tokens"`` (then the error rate is per token, over targets
``!= ignore_index``), as in :mod:`probe.batches`, whose batch layouts (pairs, dict
inputs, ``"labels"`` dicts) the evaluator accepts. Parameters outside the
:class:`ParameterSpace` (frozen ones) and buffers keep the model's values.

Points are flat vectors in the evaluator's ``dtype``: the parameters' dtype, or
float32 for a bfloat16/float16 model (as :func:`probe.model_operator.vector_dtype`),
so directions and perturbations are formed in float32 and rounded to the model's
dtype only when the model runs; losses are summed in float64.

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

from probe.batches import IGNORE_INDEX, Batch, LossFn, call_model, split_batch, weigh_batches
from probe.model_operator import vector_dtype
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
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch-mean loss (over
            examples, or over counted tokens for ``weighting="tokens"``).
        batches: ``(inputs, targets)`` pairs or dicts with ``"labels"`` (see :mod:`probe.batches`).
        params: parameter selection (see :class:`ParameterSpace`).
        recompute_bn: re-estimate BatchNorm statistics at each evaluated point
            (default: True when the model has BatchNorm).
        classification: also count errors (``argmax(outputs) != targets``); default:
            True when targets are integer tensors.
        chunk_size: points per vmapped evaluation in :meth:`losses`.
        total_examples: the global example count when ``batches`` is one worker's
            shard (losses are then this shard's weighted share; sum them over
            workers); default: the local count.
        weighting: ``"examples"`` (default) or ``"tokens"`` (see :mod:`probe.batches`).
        total_tokens: the global token count when ``batches`` is a shard (``weighting="tokens"``).
        ignore_index: the target value that is not a token (default -100).
        accumulate_dtype: dtype of the points (float32 or float64); default as above.

    Raises:
        ValueError: for an empty probe set, an unknown ``weighting`` or a bad ``accumulate_dtype``.
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
        weighting: str = "examples",
        total_tokens: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        accumulate_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.space = ParameterSpace.of(model, params)
        first = self.space.parameters(model)[0]
        self.param_dtype, self.device = first.dtype, first.device
        self.dtype = vector_dtype(self.param_dtype, accumulate_dtype)
        batches = list(batches)
        prepared = weigh_batches(batches, self.param_dtype, self.device, weighting=weighting,
                                 total_examples=total_examples, total_tokens=total_tokens, ignore_index=ignore_index)
        self.batches, self.weights = prepared.batches, prepared.weights
        self.num_examples = sum(prepared.sizes)
        self.weighting = weighting
        self.ignore_index = ignore_index
        self.num_tokens = sum(prepared.tokens) if prepared.tokens is not None else None
        self._tokens = prepared.tokens
        self.recompute_bn = has_batchnorm(model) if recompute_bn is None else recompute_bn
        y0 = split_batch(batches[0])[1]  # before token weighting may drop batches without tokens
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
        """The model's own parameters as a flat vector in ``dtype``."""
        return self.space.get_flat(self.model).to(self.dtype)

    def _state(self, flat: Tensor) -> dict[str, Tensor]:
        """Parameters at ``flat`` (a vector, or a block ``(dim, k)`` giving ``(k, *shape)``) in the model's dtype."""
        return {n: t.to(self.param_dtype) for n, t in zip(self.space.names, self.space.unflatten(flat))}

    def _errors(self, out: Tensor, y: Tensor, b: int) -> Tensor:
        """Error rate of batch ``b`` from outputs ``(..., *y.shape, classes)``; leading dims kept.

        Per example (``argmax != target``, averaged over every target entry) or, with
        token weighting, per counted token.
        """
        if not isinstance(out, Tensor):  # a model that computed its own loss (batches.model_loss): no error rate
            return torch.tensor(float("nan"), dtype=torch.float64, device=y.device)
        wrong = out.argmax(-1) != y  # (..., *y.shape)
        lead = wrong.shape[: wrong.ndim - y.ndim]
        if self._tokens is None:
            return wrong.to(torch.float64).reshape(*lead, -1).mean(-1)
        wrong = wrong & (y != self.ignore_index)
        return wrong.to(torch.float64).reshape(*lead, -1).sum(-1) / self._tokens[b]

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
                    call_model(self.model, x, {**buffers, **state})
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
            for b, ((x, y), w) in enumerate(zip(self.batches, self.weights)):
                out = call_model(self.model, x, state)
                loss = loss + w * self.loss_fn(out, y).to(torch.float64)
                if self.classification:
                    err = err + w * self._errors(out, y, b)
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
                stacked = self._state(chunk.T)  # each (c, *shape)
                loss = torch.zeros(chunk.shape[0], dtype=torch.float64, device=self.device)
                err = torch.zeros_like(loss)
                for b, ((x, y), w) in enumerate(zip(self.batches, self.weights)):
                    out = torch.vmap(lambda s: call_model(self.model, x, s))(stacked)  # (c, n, ...)
                    loss += w * torch.vmap(lambda o: self.loss_fn(o, y))(out).to(torch.float64)
                    if self.classification:
                        err += w * self._errors(out, y, b)
                losses.append(loss)
                errors.append(err)
                self.num_evaluations += chunk.shape[0]
        finally:
            self.model.train(previous)
        errors_t = torch.cat(errors).cpu()
        return torch.cat(losses).cpu(), errors_t if self.classification else torch.full_like(errors_t, float("nan"))
