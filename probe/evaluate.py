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

Train mode. ``mode="train"`` (the job spec's ``mode: train``) runs the model as
training does: BatchNorm normalizes each batch by that batch's own mean and
(biased) variance and dropout is live. The loss at a point θ is then

    L_train(θ) = Σ_b w_b · ℓ_b(θ; batch statistics of b, masks m_b),

the weighted mean of per-batch losses, each batch normalized by its own
statistics at θ (so BatchNorm is never stale: no re-estimation, and
``recompute_bn`` must not be asked for), with dropout masks drawn afresh from
torch's global generator at every evaluation; with ``dropout_seed`` every
evaluation draws the same masks (the generator is seeded with it inside
``torch.random.fork_rng``, so the caller's stream is untouched), which makes
differences between points common-random-number differences. The value depends
on the batching (batch size, and the shard split of a data-parallel probe set),
as training's loss does. BatchNorm updates scratch copies of its running
statistics, one per batch, and any other buffer written by the forward pass is
restored after the evaluation, so the model is never changed. Points are evaluated one at a time: under ``torch.vmap``
BatchNorm cannot update its (unbatched) running statistics in place and dropout
refuses random operations, so :meth:`Evaluator.losses` loops over points as it
does for ``recompute_bn``. Ascent gradients (``loss_with_grad``) differentiate
through the batch statistics, as training does. The mode policy is recorded as
``"train"``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from probe.batches import IGNORE_INDEX, Batch, LossFn, call_model, split_batch, weigh_batches
from probe.model_operator import MODES, vector_dtype
from probe.params import ParameterSpace

__all__ = ["Evaluator", "has_batchnorm", "has_dropout"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds BatchNorm layers with running statistics."""
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


def has_dropout(model: nn.Module) -> bool:
    """Whether ``model`` holds dropout modules with a positive rate (live in train mode)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


class Evaluator:
    """Mean loss and error rate over fixed batches at any flat parameter vector.

    Args:
        model: the network (its parameters are never modified).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch-mean loss (over
            examples, or over counted tokens for ``weighting="tokens"``).
        batches: ``(inputs, targets)`` pairs or dicts with ``"labels"`` (see :mod:`probe.batches`).
        params: parameter selection (see :class:`ParameterSpace`).
        recompute_bn: re-estimate BatchNorm statistics at each evaluated point
            (default: True when the model has BatchNorm and ``mode="eval"``).
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
        mode: ``"eval"`` (default: running statistics, no dropout) or ``"train"`` (batch
            statistics, live dropout; see "Train mode" in the module docstring).
        dropout_seed: in train mode, seed every evaluation's dropout masks with it (the
            same masks at every point); default ``None``: fresh masks per evaluation.

    Raises:
        ValueError: for an empty probe set, an unknown ``weighting`` or ``mode``, a bad
            ``accumulate_dtype``, or ``recompute_bn=True`` with ``mode="train"``.
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
        mode: str = "eval",
        dropout_seed: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
        if mode == "train" and recompute_bn:
            raise ValueError(
                "recompute_bn=True re-estimates running statistics for eval mode, but mode='train' normalizes "
                "each batch by its own statistics; pass recompute_bn=None (or False) with mode='train'"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.space = ParameterSpace.of(model, params)
        first = self.space.parameters(model)[0]
        self.param_dtype, self.device = first.dtype, first.device
        self.dtype = vector_dtype(self.param_dtype, accumulate_dtype)
        batches = list(batches)
        prepared = weigh_batches(
            batches,
            self.param_dtype,
            self.device,
            weighting=weighting,
            total_examples=total_examples,
            total_tokens=total_tokens,
            ignore_index=ignore_index,
        )
        self.batches, self.weights = prepared.batches, prepared.weights
        self.num_examples = sum(prepared.sizes)
        self.weighting = weighting
        self.ignore_index = ignore_index
        self.num_tokens = sum(prepared.tokens) if prepared.tokens is not None else None
        self._tokens = prepared.tokens
        self.train_mode = mode == "train"
        self.dropout_seed = dropout_seed
        bn_prefixes = [
            f"{n}." if n else "" for n, m in model.named_modules() if isinstance(m, _BN) and m.track_running_stats
        ]
        self._bn_buffer_items = [
            (n, b)
            for n, b in model.named_buffers()
            if any(
                n == p + leaf for p in bn_prefixes for leaf in ("running_mean", "running_var", "num_batches_tracked")
            )
        ]
        if self.train_mode:
            self.recompute_bn = False
        else:
            self.recompute_bn = has_batchnorm(model) if recompute_bn is None else recompute_bn
        y0 = split_batch(batches[0])[1]  # before token weighting may drop batches without tokens
        self.classification = (
            isinstance(y0, Tensor) and not y0.is_floating_point() if classification is None else classification
        )
        self.chunk_size = chunk_size
        # the mode policy recorded with results: "train", "eval+bn_recompute" or "eval"
        self.mode = "train" if self.train_mode else "eval+bn_recompute" if self.recompute_bn else "eval"
        self.num_evaluations = 0

    @property
    def randomness_note(self) -> str:
        """A note for results built on this evaluator: ``""``, or in train mode with live dropout
        and no ``dropout_seed``, that every evaluation drew fresh masks (so differences between
        points carry dropout noise that no reported standard error covers)."""
        if not self.train_mode or self.dropout_seed is not None or not has_dropout(self.model):
            return ""
        return (
            "train mode with live dropout: masks redrawn at every evaluation, so loss differences carry "
            "dropout noise beyond any reported standard error (Evaluator(dropout_seed=...) fixes the masks)"
        )

    @property
    def pointwise(self) -> bool:
        """Whether points are evaluated one at a time (BatchNorm re-estimation, or train mode)."""
        return self.recompute_bn or self.train_mode

    @contextmanager
    def _running(self) -> Iterator[None]:
        """The model in this evaluator's mode for one evaluation, its mode restored after.

        In train mode BatchNorm runs on scratch copies of its statistics
        (:meth:`_scratch_bn_buffers`); any other buffer the forward pass writes in
        place is restored afterwards. Unlike :func:`probe.model_operator.model_mode`,
        buffers that were not written are left alone: copying into them would bump
        their version and break the graph of :meth:`loss_with_grad` wherever autograd
        saved one (a causal mask in ``masked_fill``).
        """
        previous = self.model.training
        self.model.train(self.train_mode)
        saved = [(b, b._version, b.clone()) for b in self.model.buffers()] if self.train_mode else []
        try:
            with self._dropout_masks():
                yield
        finally:
            self.model.train(previous)
            with torch.no_grad():
                for buf, version, copy in saved:
                    if buf._version != version:
                        buf.copy_(copy)

    def _scratch_bn_buffers(self) -> dict[str, Tensor]:
        """Train mode: fresh copies of the BatchNorm running statistics for one batch's forward.

        Train-mode BatchNorm updates its running statistics in place and autograd saves
        them for backward, so a second batch's update (or restoring the model's buffers)
        would invalidate the first batch's graph; each batch updates its own copies
        instead, and the model's buffers are never written. Empty in eval mode.
        """
        if not self.train_mode:
            return {}
        return {n: b.clone() for n, b in self._bn_buffer_items}

    @contextmanager
    def _dropout_masks(self) -> Iterator[None]:
        """Train mode: with ``dropout_seed``, the same masks at every evaluation (caller's generator untouched)."""
        if self.dropout_seed is None:
            yield
            return
        on_cpu = self.device.type == "cpu"
        devices, device_type = ([], None) if on_cpu else ([self.device], self.device.type)
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            torch.manual_seed(self.dropout_seed)
            yield

    @property
    def dim(self) -> int:
        return self.space.dim

    def center(self) -> Tensor:
        """The model's own parameters as a flat vector in ``dtype``."""
        return self.space.get_flat(self.model).to(self.dtype)

    def _state(self, flat: Tensor) -> dict[str, Tensor]:
        """Parameters at ``flat`` (a vector, or a block ``(dim, k)`` giving ``(k, *shape)``) in the model's dtype."""
        return {n: t.to(self.param_dtype) for n, t in zip(self.space.names, self.space.unflatten(flat), strict=True)}

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
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        err = torch.zeros((), dtype=torch.float64, device=self.device)
        with self._running():
            for b, ((x, y), w) in enumerate(zip(self.batches, self.weights, strict=True)):
                out = call_model(self.model, x, {**self._scratch_bn_buffers(), **state})
                loss = loss + w * self.loss_fn(out, y).to(torch.float64)
                if self.classification:
                    err = err + w * self._errors(out, y, b)
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
        parameters; models with BatchNorm recompute and train mode (neither vmappable:
        see the module docstring) go point by point.
        """
        if points.ndim != 2 or points.shape[1] != self.dim:
            raise ValueError(f"points must have shape (P, dim={self.dim}), got {tuple(points.shape)}")
        if self.pointwise:
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
                for b, ((x, y), w) in enumerate(zip(self.batches, self.weights, strict=True)):
                    # vmap calls both lambdas in this iteration: the loop variables cannot go stale
                    out = torch.vmap(lambda s: call_model(self.model, x, s))(stacked)  # noqa: B023  # (c, n, ...)
                    loss += w * torch.vmap(lambda o: self.loss_fn(o, y))(out).to(torch.float64)  # noqa: B023
                    if self.classification:
                        err += w * self._errors(out, y, b)
                losses.append(loss)
                errors.append(err)
                self.num_evaluations += chunk.shape[0]
        finally:
            self.model.train(previous)
        errors_t = torch.cat(errors).cpu()
        return torch.cat(losses).cpu(), errors_t if self.classification else torch.full_like(errors_t, float("nan"))
