"""Shared machinery of operators defined by a model, a loss and a fixed probe set.

The curvature operators (:mod:`probe.hessian`, :mod:`probe.ggn`) are matrices of
the *mean* loss over every example of the probe set,

    L(θ) = (1/N) Σ_b n_b · ℓ_b(θ),     ℓ_b = mean loss over batch b of n_b examples,

so each batch enters with weight ``n_b / N`` and batches of unequal size are
weighted exactly (summing per-batch products, as some peers do, scales the matrix
by the number of batches; averaging them unweighted biases it towards small ones).

Graph reuse. On this library's reference CPU, one Hessian-vector product by double
backward through a gradient graph that is built once and kept costs 1.4-1.8
gradients, against 2.6-2.9 when the graph is rebuilt per product and 3-7 for
``torch.func`` forward-over-reverse. Operators therefore keep each batch's graph
while the bytes autograd saved for it fit ``graph_memory_bytes``, and rebuild the
graphs of the remaining batches on every product. The bytes are measured exactly,
with saved-tensor hooks, not guessed.

Mode policy. ``mode="eval"`` (default) puts the model in eval mode while the
operator evaluates it: BatchNorm uses its running statistics and dropout is off,
so the operator is a fixed, deterministic matrix. ``mode="train"`` uses batch
statistics and active dropout; the result then depends on the batching and, with
dropout, on randomness. In train mode no graph is kept, so every product redraws
the dropout masks as training would (a kept graph would freeze one mask per
batch), and :meth:`CurvatureOperator.check_determinism` reveals the randomness.
Running statistics are restored after every evaluation in either mode.

Batches and weighting (:mod:`probe.batches`): batches are ``(inputs, targets)``
pairs or Hugging Face style dicts with ``"labels"``; ``weighting="tokens"`` makes
the operator that of the mean over every probe token (targets ``!= -100``) for a
loss that is a per-batch token mean, in place of the example-weighted mean above.

Mixed precision. The operator's vectors, its accumulation over batches and its
results are in ``accumulate_dtype``: by default the parameters' dtype for float32
and float64 models, and float32 for bfloat16 and float16 ones, so the estimators
(Lanczos, SLQ, trace) never run in a 16-bit format. Each batch's product is then
computed in the parameters' dtype on the input rounded to it, without the batch
weight (weights such as 37/300 are not representable in 8 mantissa bits), and added
into the float32 result scaled by its weight. Expected accuracy: the rounding of
one bfloat16 product, a relative error of a few times bfloat16's unit roundoff
``2⁻⁸ ≈ 3.9e-3`` (against the float64 Hessian at the same, bfloat16-representable,
weights and inputs: measured 2.4e-3 on the 1,482-parameter digits MLP and 1.1e-2 on
a 2,064-parameter GPT); accumulating ``b`` batches adds only float32 rounding, so
the error does not grow with ``b``. Eigenvalues from such an operator carry errors
of the same relative order (1.2e-3 for the MLP's λ_max).

float16 (unit roundoff ``2⁻¹¹``, range ``6e-8 .. 65504``) products are formed at a
power-of-two loss scale chosen from the first batch's gradient (``loss_scale``), on
vectors scaled to a largest entry in ``[1, 2)``, both undone exactly in the float32 sum;
an overflowing product lowers the scale and is recomputed, and normalization layers run
in float32 (:mod:`probe.loss_scale`). Measured on the digits MLP: 0.74 unit roundoffs
(3.6e-4) per product. The Lanczos scalars and tridiagonal eigenproblems are float64 in
every precision (:mod:`probe.lanczos`); over tens of millions of parameters the float32
vectors' own inner products limit spectral estimates near 1e-4, which
``accumulate_dtype=torch.float64`` removes (docs/benchmarks.md, "Mixed precision").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from probe.batches import (
    IGNORE_INDEX,
    WEIGHTINGS,
    Batch,
    LossFn,
    batch_size_of,
    call_model,
    move_batch,
    prepare_batches,
    weigh_batches,
)
from probe.loss_scale import (
    BACKOFF,
    MAX_RETRIES,
    MIN_SCALE,
    Float16RangeError,
    check_loss_scale,
    choose_loss_scale,
    float32_loss,
    float32_norms,
    overflow_message,
    vector_scale,
)
from probe.operators import CurvatureOperator
from probe.params import ParameterSpace

__all__ = [
    "ModelOperator",
    "double_backward_attention",
    "model_mode",
    "Batch",
    "LossFn",
    "MODES",
    "WEIGHTINGS",
    "batch_size_of",
    "move_batch",
    "prepare_batches",
    "vector_dtype",
]

MODES = ("eval", "train")
ACCUMULATE_DTYPES = (torch.float32, torch.float64)
DEFAULT_GRAPH_MEMORY_BYTES = 2 * 1024**3


def vector_dtype(param_dtype: torch.dtype, accumulate_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of an operator's vectors: ``accumulate_dtype``, or by default the parameters'
    dtype when it is float32 or float64 and float32 otherwise (bfloat16, float16).

    Raises:
        ValueError: for an ``accumulate_dtype`` other than float32/float64, or narrower than the parameters'.
    """
    if accumulate_dtype is None:
        return param_dtype if param_dtype in ACCUMULATE_DTYPES else torch.float32
    if accumulate_dtype not in ACCUMULATE_DTYPES:
        raise ValueError(
            f"accumulate_dtype must be torch.float32 or torch.float64, got {accumulate_dtype}; "
            f"estimators must not run in 16-bit formats"
        )
    if accumulate_dtype.itemsize < param_dtype.itemsize:
        raise ValueError(
            f"accumulate_dtype={accumulate_dtype} is narrower than the parameters' {param_dtype}; "
            f"pass None or torch.float64"
        )
    return accumulate_dtype


@contextmanager
def double_backward_attention() -> Iterator[None]:
    """Restrict ``torch.nn.functional.scaled_dot_product_attention`` to its math kernel.

    The fused kernels (flash and memory-efficient attention on CUDA, the flash kernel
    on CPU) have no derivative of their backward, so a Hessian-vector product through
    them fails (``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
    is not implemented``); the math kernel is plain composite autograd. Models that do
    not call SDPA are unaffected. The choice is made when the forward pass records
    the graph, so graphs built inside this context stay twice differentiable after it.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


@contextmanager
def model_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Temporarily put ``model`` in ``mode`` (``"eval"`` or ``"train"``), restoring it after.

    In train mode the buffers (BatchNorm running statistics and their counters) are
    restored too, so probing never changes the model. On CUDA, cuDNN runs
    deterministically and without TF32, so float32 products are float32.
    ``scaled_dot_product_attention`` is restricted to its math kernel (see
    :func:`double_backward_attention`), so every gradient graph built here can be
    differentiated twice. In a float16 model, normalization layers compute in float32
    (:class:`probe.loss_scale.float32_norms`).
    """
    previous = model.training
    saved = [(b, b.clone()) for b in model.buffers()] if mode == "train" else []
    model.train(mode == "train")
    half = any(p.dtype == torch.float16 for p in model.parameters())
    try:
        with (
            torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False),
            double_backward_attention(),
            float32_norms() if half else contextlib.nullcontext(),
        ):
            yield
    finally:
        model.train(previous)
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)


class SavedBytes:
    """Counts the bytes autograd saves for backward while active (distinct storages once)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[tuple[int, int]] = set()

    def _pack(self, t: Tensor) -> Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += key[1]
        return t

    @contextmanager
    def counting(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


class ModelOperator(CurvatureOperator):
    """Base of operators built from ``(model, loss_fn, batches)``.

    Subclasses implement ``_build(batch, weight)`` (returns a per-batch state that
    holds the autograd graph) and ``_apply(state, vs, k)`` (adds the batch's
    contribution to ``A @ V``, given ``V`` split per parameter as ``(k, *shape)``).

    Args:
        model: the network; its parameters define the flat space and the compute dtype.
        loss_fn: ``loss_fn(outputs, targets)`` returning the *mean* loss of a batch
            (over its examples, or over its counted tokens for ``weighting="tokens"``).
        batches: the fixed probe set: ``(inputs, targets)`` pairs or dicts with
            ``"labels"`` (see :mod:`probe.batches`).
        params: ``None`` for all trainable parameters, or names/prefixes of a subset
            (one layer or block: its diagonal block of the matrix).
        mode: ``"eval"`` (default) or ``"train"``; see the module docstring.
        graph_memory_bytes: budget for kept graphs (default 2 GiB; 0 in train mode).
        total_examples: the global number of examples when ``batches`` is one shard
            of a larger probe set (data parallelism); defaults to the local count.
        weighting: ``"examples"`` (default: batch weights ``n_b/N``) or ``"tokens"``
            (``T_b/T``, ``T_b`` = targets ``!= ignore_index``); see :mod:`probe.batches`.
        total_tokens: the global token count for a shard under ``weighting="tokens"``.
        ignore_index: the target value that is not a token (default -100).
        accumulate_dtype: dtype of the vectors, the accumulation and the results
            (float32 or float64); default: the parameters' dtype, float32 for 16-bit
            models. See "Mixed precision" in the module docstring.
        loss_scale: float16 models only: the power of two that scales the loss inside
            the graph (:mod:`probe.loss_scale`); default ``None``: chosen from the first
            probe batch's gradient. Lowered, with the kept graphs rebuilt, when a
            product overflows.
        forward_context: entered (with :func:`model_mode`) around every model call the
            operator makes, e.g. ``lambda: probe.lm_head.chunked_head(model)`` with
            ``loss_fn=probe.lm_head.chunked_lm_loss``: the head's product in token chunks.
        batched: apply the operator to all columns of a block in one batched
            backward (``torch.autograd.grad(..., is_grads_batched=True)``) rather
            than one backward per column. Default ``None``: batched on CUDA, where
            it measured 10% faster per column (k=8, 1.1M parameters, H200), and one
            backward per column on the CPU, where batching measured no faster on
            any model of the peer benchmark (`docs/benchmarks.md`): 8-20% slower on
            the digits MLP and CNN, 40-60% slower at 1.1M parameters.

    Raises:
        ValueError: on an empty probe set, an unknown ``mode`` or ``weighting``, a bad
            selection, an ``accumulate_dtype`` other than float32/float64, or a
            ``loss_scale`` that is not a power of two in ``[2⁻²⁴, 2¹⁵]`` or is given
            for a model that is not float16.
        Float16RangeError: (a ``ValueError``) when a float16 model's loss or first
            gradient is not finite at any loss scale.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Batch],
        *,
        params: Sequence[str] | None = None,
        mode: str = "eval",
        graph_memory_bytes: int = DEFAULT_GRAPH_MEMORY_BYTES,
        total_examples: int | None = None,
        batched: bool | None = None,
        weighting: str = "examples",
        total_tokens: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        accumulate_dtype: torch.dtype | None = None,
        loss_scale: float | None = None,
        forward_context: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.mode = mode
        self.forward_context = forward_context
        self.space = ParameterSpace.of(model, params)
        self.params = self.space.parameters(model)
        self.param_dtype = self.params[0].dtype  # the compute dtype
        self.dtype = vector_dtype(self.param_dtype, accumulate_dtype)  # vectors, accumulation, results
        self.device = self.params[0].device
        self.dim = self.local_dim = self.space.dim
        self.batched = self.device.type == "cuda" if batched is None else batched
        prepared = weigh_batches(
            batches,
            self.param_dtype,
            self.device,
            weighting=weighting,
            total_examples=total_examples,
            total_tokens=total_tokens,
            ignore_index=ignore_index,
        )
        self.batches, self.batch_sizes, self.weights = prepared.batches, prepared.sizes, prepared.weights
        self.weighting = weighting
        self.ignore_index = ignore_index
        self.num_examples = sum(self.batch_sizes)
        self.total_examples = total_examples if total_examples is not None else self.num_examples
        self.batch_tokens = prepared.tokens  # None under example weighting
        self.num_tokens = sum(prepared.tokens) if prepared.tokens is not None else None
        self.total_tokens = prepared.total if weighting == "tokens" else None
        self._mixed = self.dtype != self.param_dtype
        self.num_matvecs = 0
        self.rescales = 0  # float16 products recomputed at a lower loss scale after an overflow
        self._cached: list[Any] = []
        self.graph_bytes = 0
        if mode == "train":
            graph_memory_bytes = 0  # redraw dropout masks per product; see the module docstring
        self.graph_memory_bytes = graph_memory_bytes
        self.loss_scale: float | None = None  # float16 only; see probe.loss_scale
        if self.param_dtype == torch.float16:
            self.loss_fn = float32_loss(loss_fn)  # the loss scale multiplies a float32 loss
            if loss_scale is None:
                with self._forward():
                    x, y = self.batches[0]
                    loss_scale = choose_loss_scale(self.loss_fn(call_model(model, x), y), self.params)
            self.loss_scale = check_loss_scale(loss_scale)
        elif loss_scale is not None:
            raise ValueError(f"loss_scale applies to float16 models only; these parameters are {self.param_dtype}")
        self._set_weights()
        with self._forward():
            self._build_cache()

    @contextlib.contextmanager
    def _forward(self) -> Iterator[None]:
        """Around every model call: :func:`model_mode`, and ``forward_context()`` when given."""
        with model_mode(self.model, self.mode), self.forward_context() if self.forward_context else nullcontext():
            yield

    def _set_weights(self) -> None:
        # Same precision: the weight scales the loss inside the graph (as ever). Mixed: it scales
        # the product in accumulate_dtype, where it is represented exactly enough; float16 graphs
        # carry the loss scale S instead, undone (exactly: a power of two) with the weight.
        S = self.loss_scale or 1.0
        self._graph_weights = [S] * len(self.weights) if self._mixed else list(self.weights)
        self._sum_weights = [w / S for w in self.weights] if self._mixed else [1.0] * len(self.weights)

    def _build_cache(self) -> None:
        """Build and keep the graphs of the first batches while they fit ``graph_memory_bytes``."""
        self._cached, self.graph_bytes = [], 0
        for batch, w in zip(self.batches, self._graph_weights, strict=True):
            counter = SavedBytes()
            with counter.counting():
                state = self._build(batch, w)
            if self.graph_bytes + counter.bytes > self.graph_memory_bytes:
                del state
                break
            self.graph_bytes += counter.bytes
            self._cached.append(state)

    @property
    def num_cached_batches(self) -> int:
        """How many batches keep their graph between products (the rest are rebuilt)."""
        return len(self._cached)

    def _build(self, batch: Batch, weight: float) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self, state: Any, vs: list[Tensor], k: int) -> list[Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        out = self._products(V)
        if self.loss_scale is not None:  # float16: an overflow lowers the loss scale and recomputes
            retries = 0
            while not bool(torch.isfinite(out).all()) and bool(torch.isfinite(V).all()):
                if retries == MAX_RETRIES or self.loss_scale <= MIN_SCALE:
                    raise Float16RangeError(overflow_message(self.loss_scale, retries))
                self.loss_scale = max(self.loss_scale / BACKOFF, MIN_SCALE)
                self._set_weights()
                self._cached = []  # free the old graphs before building the new ones
                with self._forward():
                    self._build_cache()
                out = self._products(V)
                retries += 1
                self.rescales += 1
        self.num_matvecs += V.shape[1]
        return out

    def _products(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        # float16: the vector at a power-of-two scale c (its largest entry in [1, 2)), undone with the weight
        c = vector_scale(V) if self.loss_scale is not None else 1.0
        if c != 1.0:
            V = V * c
        # Batched (CUDA): one backward for the block, from per-parameter (k, *shape) copies.
        # Otherwise one backward per column, each from views of its column, written straight
        # into its row of the output: a block of k columns then holds k output rows and one
        # column's gradients, not k gradients and their stack (same arithmetic, element by element).
        if self.batched or k == 1:
            columns = [(slice(None), [v.to(self.param_dtype) for v in self.space.unflatten(V)], k)]
        else:
            columns = [
                (slice(j, j + 1), [v.to(self.param_dtype).unsqueeze(0) for v in self.space.unflatten(V[:, j])], 1)
                for j in range(k)
            ]
        out_t = torch.empty((k, self.dim), dtype=self.dtype, device=V.device)  # each parameter: a column range
        all_cached = len(self._cached) == len(self.batches)
        sum_weights = [s / c for s in self._sum_weights]
        # Kept graphs need no mode switch; rebuilding a graph does.
        with contextlib.nullcontext() if all_cached else self._forward():
            for i, (batch, w, s) in enumerate(zip(self.batches, self._graph_weights, sum_weights, strict=True)):
                state = self._cached[i] if i < len(self._cached) else self._build(batch, w)
                for rows, vs, width in columns:
                    parts = self._apply(state, vs, width)
                    target = out_t[rows]
                    for p, block in zip(parts, target.split(self.space.numels, dim=1), strict=True):
                        if i == 0:  # the first batch is written once (no zero fill and add)
                            block.copy_(p.reshape(width, -1))
                        else:
                            block.add_(p.reshape(width, -1), alpha=s)  # in self.dtype; s = 1.0 is exact
                    if i == 0 and s != 1.0:
                        target.mul_(s)
        return out_t.T

    def _grad(self, outputs, inputs, grad_outputs, k: int) -> tuple[Tensor, ...]:
        """Backward of ``outputs`` for ``k`` stacked cotangents; returns ``(k, *shape)`` tensors."""
        if self.batched and k > 1:
            return torch.autograd.grad(
                outputs, inputs, grad_outputs=grad_outputs, retain_graph=True, is_grads_batched=True
            )
        if k == 1:  # a view, not a copy
            grads = torch.autograd.grad(outputs, inputs, grad_outputs=[g[0] for g in grad_outputs], retain_graph=True)
            return tuple(g.unsqueeze(0) for g in grads)
        cols = [
            torch.autograd.grad(outputs, inputs, grad_outputs=[g[j] for g in grad_outputs], retain_graph=True)
            for j in range(k)
        ]
        return tuple(torch.stack(parts) for parts in zip(*cols, strict=True))

    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """Mean loss over the probe set and its flat gradient (no graph kept), in ``self.dtype``."""
        loss = torch.zeros((), dtype=self.dtype, device=self.device)
        grad = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with self._forward():
            for (x, y), w, s in zip(self.batches, self._graph_weights, self._sum_weights, strict=True):
                batch_loss = self.loss_fn(call_model(self.model, x), y) * w
                grad.add_(self.space.flatten(torch.autograd.grad(batch_loss, self.params)), alpha=s)
                loss.add_(batch_loss.detach(), alpha=s)
        return loss, grad
