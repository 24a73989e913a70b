"""Gradient noise: per-example gradient moments, the noise scale and SGD's implicit regularizers.

For a probe set of ``n`` examples with per-example gradients ``gᵢ = ∇ℓᵢ(θ)``
(``ℓᵢ`` = the loss of example ``i`` alone), the probe-set gradient and the
population covariance of the per-example gradients are

    ḡ = (1/n) Σᵢ gᵢ,        Σ = (1/n) Σᵢ (gᵢ − ḡ)(gᵢ − ḡ)ᵀ,

and ``tr(Σ) = (1/n) Σᵢ ‖gᵢ‖² − ‖ḡ‖²``. :func:`gradient_moments` computes the
sufficient statistics ``Σᵢ gᵢ``, ``Σᵢ ‖gᵢ‖²``, ``Σᵢ ℓᵢ`` and ``n`` in one pass, with
``torch.func`` (``vmap(grad(...))`` over ``functional_call``) on chunks of at most
``chunk_size`` examples, so only ``chunk_size × dim`` gradient entries exist at a
time. The statistics are sums: shards of a data-parallel probe set add them
(:meth:`GradientMoments.merge`, or one all-reduce of
:meth:`GradientMoments.to_tensor`).

:func:`noise_statistics` turns them into

- the *simple noise scale* ``B_simple = tr(Σ)/‖G‖²`` of McCandlish, Kaplan, Amodei
  & OpenAI Dota Team (2018), "An empirical model of large-batch training":
  the batch size above which SGD's progress per step stops growing linearly;
- the two implicit-regularization terms of Smith, Dherin, Barrett & De (2021),
  "On the origin of implicit regularization in stochastic gradient descent",
  and the SGD temperature (Chaudhari & Soatto 2018), given the learning rate and
  batch size of the training run.

Limits. The values are exact for the probe set taken as the population. As
estimates of training-set quantities from ``n`` sampled examples, ``‖ḡ‖²`` is
biased up by ``tr(Σ)/n`` (``E‖ḡ‖² = ‖G‖² + tr(Σ)/n`` for i.i.d. examples), so
``noise_scale`` saturates near ``n`` when the true noise scale exceeds ``n``;
``noise_scale_debiased`` uses McCandlish et al.'s unbiased estimators (Appendix
A, with ``B_small = 1`` and ``B_big = n``) and is NaN when the probe set is too
small to resolve the gradient. No sampling standard error is reported: the
one-pass sums do not determine one.

Mode policy as :mod:`probe.model_operator`: ``mode="eval"`` (default) uses
BatchNorm's running statistics, so each example's loss depends on that example
only and per-example gradients are exact. ``mode="train"`` draws independent
dropout masks per example (the job spec's ``mode: train``); it rejects BatchNorm
models: per-example gradients need each example's loss to depend on that example
alone, and a batch of one has no variance (train-mode BatchNorm1d refuses it),
while per-example gradients taken inside a batch's statistics couple the examples,
so their covariance is not the noise of sampling independent examples that the
noise scale and Smith et al.'s regularizer describe.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from probe.batches import call_model
from probe.evaluate import has_batchnorm
from probe.linear_identity import NotLinear, linear_owners, linear_sums
from probe.model_operator import MODES, Batch, LossFn, batch_size_of, model_mode, prepare_batches
from probe.params import ParameterSpace

__all__ = ["GradientMoments", "NoiseResult", "default_chunk_size", "gradient_moments", "noise_statistics"]

DEFAULT_CHUNK_SIZE = 64  # per-example gradients held at once, at most: 64 × dim entries
CPU_BLOCK_BYTES = 30 * 2**20  # below glibc's largest dynamic mmap threshold, 32 MiB, with room for headers
_PACKED_SCALARS = 4  # to_tensor() layout: [sum_grad (dim), sum_loss, sum_sq_norm, count, num_nonfinite]


@dataclass(frozen=True, eq=False)
class GradientMoments:
    """Sufficient statistics of per-example gradients; they add over disjoint example sets.

    Attributes:
        sum_grad: ``Σᵢ gᵢ``, float64, shape ``(dim,)`` in :class:`ParameterSpace` order.
        sum_sq_norm: ``Σᵢ ‖gᵢ‖²``, a float64 0-d tensor.
        sum_loss: ``Σᵢ ℓᵢ``, a float64 0-d tensor.
        count: ``n``, the number of examples.
        num_nonfinite: examples whose loss or gradient was not finite (they are
            included in the sums, which are then not finite either).
        dtype: the model's dtype, in which the gradients were computed (``"float32"``).
        chunk_size: the largest number of examples whose gradients were held at once
            (``method="linear"``: the largest batch, whose per-example gradients are never formed).
        mode: ``"eval"`` or ``"train"`` (see the module docstring).
        method: how they were computed (see :func:`gradient_moments`).
    """

    sum_grad: Tensor
    sum_sq_norm: Tensor
    sum_loss: Tensor
    count: int
    num_nonfinite: int
    dtype: str
    chunk_size: int
    mode: str
    method: str = "vmap"  # "linear" (layer identity) or "vmap" (per-example gradients formed in chunks)

    @property
    def dim(self) -> int:
        return int(self.sum_grad.shape[0])

    @property
    def mean_grad(self) -> Tensor:
        """``ḡ = Σᵢ gᵢ / n``, the gradient of the mean loss over the examples (float64)."""
        return self.sum_grad / self.count

    def merge(self, other: GradientMoments) -> GradientMoments:
        """The moments of the union of two disjoint example sets (``self + other`` does the same).

        ``chunk_size`` becomes the larger of the two.

        Raises:
            ValueError: if the two differ in ``dim``, ``dtype`` or ``mode``.
        """
        for name in ("dim", "dtype", "mode"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                raise ValueError(
                    f"cannot merge moments with different {name}: {a!r} and {b!r}; "
                    f"compute both with the same model, parameter selection and mode"
                )
        return GradientMoments(
            sum_grad=self.sum_grad + other.sum_grad.to(self.sum_grad.device),
            sum_sq_norm=self.sum_sq_norm + other.sum_sq_norm.to(self.sum_sq_norm.device),
            sum_loss=self.sum_loss + other.sum_loss.to(self.sum_loss.device),
            count=self.count + other.count,
            num_nonfinite=self.num_nonfinite + other.num_nonfinite,
            dtype=self.dtype,
            chunk_size=max(self.chunk_size, other.chunk_size),
            mode=self.mode,
            method=self.method if self.method == other.method else "mixed",
        )

    __add__ = merge

    def to_tensor(self) -> Tensor:
        """All sums packed in one float64 vector ``[sum_grad, sum_loss, sum_sq_norm, count,
        num_nonfinite]`` (length ``dim + 4``, on the moments' device), for one all-reduce.
        Counts are exact in float64 up to 2⁵³."""
        scalars = torch.stack(
            [
                self.sum_loss,
                self.sum_sq_norm,
                self.sum_grad.new_tensor(float(self.count)),
                self.sum_grad.new_tensor(float(self.num_nonfinite)),
            ]
        )
        return torch.cat([self.sum_grad, scalars])

    @classmethod
    def from_tensor(
        cls, packed: Tensor, *, dtype: str | torch.dtype, chunk_size: int, mode: str = "eval"
    ) -> GradientMoments:
        """Inverse of :meth:`to_tensor` (typically after summing it over shards).

        Raises:
            ValueError: if ``packed`` is not a 1-D tensor of length at least 5.
        """
        if packed.ndim != 1 or packed.shape[0] <= _PACKED_SCALARS:
            raise ValueError(
                f"packed must be a 1-D tensor of length dim + {_PACKED_SCALARS} (from to_tensor()), "
                f"got shape {tuple(packed.shape)}"
            )
        packed = packed.to(torch.float64)
        dim = packed.shape[0] - _PACKED_SCALARS
        return cls(
            sum_grad=packed[:dim].clone(),
            sum_loss=packed[dim].clone(),
            sum_sq_norm=packed[dim + 1].clone(),
            count=int(round(float(packed[dim + 2]))),
            num_nonfinite=int(round(float(packed[dim + 3]))),
            dtype=_dtype_name(dtype),
            chunk_size=chunk_size,
            mode=mode,
        )

    def all_reduced(self, reduce: Callable[[Tensor], Tensor]) -> GradientMoments:
        """The moments summed over shards: ``reduce`` sums a tensor over every shard and
        returns the result (e.g. an operator's ``allreduce``)."""
        out = GradientMoments.from_tensor(
            reduce(self.to_tensor()), dtype=self.dtype, chunk_size=self.chunk_size, mode=self.mode
        )
        return dataclasses.replace(out, method=self.method)


def _dtype_name(dtype: str | torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _map(fn: Callable[[Tensor], Tensor], x: Any) -> Any:
    """Apply ``fn`` to every tensor of a batch (a tensor, or a dict/list/tuple of them)."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map(fn, v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_map(fn, v) for v in x)
    return x


def default_chunk_size(space: ParameterSpace, dtype: torch.dtype, device: torch.device | str) -> int:
    """Examples per vectorized chunk when ``chunk_size`` is not given.

    64, except on CPU, where it is lowered until the largest parameter's block of
    per-example gradients (``chunk_size × numel × itemsize`` bytes) fits in 30 MiB.
    glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh
    mappings, so every chunk's gradients are page-faulted anew: on this project's
    reference CPU (2-core Xeon, 1 thread, ``wide_mlp()``, 4 MiB per example for the
    1024×1024 weight) chunks of 16 to 128 took 2.2 to 2.9 ms per example against
    1.2 at 7, the cap's choice (bench/bench_noise.py). Below the threshold glibc
    may still return the freed blocks to the system when other allocations have
    fragmented its heap (seen after batched forward passes: 2.3 ms per example
    again); ``MALLOC_TRIM_THRESHOLD_`` set high in the environment prevents that.
    Other allocators (CUDA's caching allocator) keep their blocks, and there the
    default stays 64.
    """
    if torch.device(device).type != "cpu":
        return DEFAULT_CHUNK_SIZE
    largest = max(space.numels) * dtype.itemsize
    return max(1, min(DEFAULT_CHUNK_SIZE, CPU_BLOCK_BYTES // largest))


def gradient_moments(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    *,
    params: Sequence[str] | None = None,
    chunk_size: int | None = None,
    mode: str = "eval",
    method: str = "auto",
) -> GradientMoments:
    """Per-example gradient moments over a probe set, in one pass.

    The loss of example ``i`` is ``loss_fn(model(xᵢ[None]), yᵢ[None])``: ``loss_fn``
    is a mean-reduction loss (``F.cross_entropy``, ``F.mse_loss``) applied to a batch
    of one. Gradients are taken with respect to the selected parameters and computed
    in the model's dtype; each chunk's sums are formed in that dtype and accumulated
    across chunks in float64. The model's parameters and buffers are never modified.

    Args:
        model: the network; its selected parameters define the flat space and dtype.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch.
        batches: ``(inputs, targets)`` pairs or dicts with ``"labels"`` (see
            :mod:`probe.batches`: dict inputs are passed as keywords); inputs and
            targets are tensors or dicts/lists/tuples of tensors whose first
            dimension indexes examples. Batch sizes may differ: every example counts
            once (example weighting; a token-mean loss gives each example's own
            token mean, not a token-weighted mean).
        params: ``None`` for all trainable parameters, or names/prefixes of a subset
            (see :class:`ParameterSpace`); the others are held fixed.
        chunk_size: examples per vectorized gradient computation, the memory bound:
            ``chunk_size × dim`` gradient entries in the model's dtype. Default
            (``None``): :func:`default_chunk_size`, 64 or less on CPU.
        mode: ``"eval"`` (default) or ``"train"``; see the module docstring.
        method: ``"linear"`` uses the layer identity for ``nn.Linear`` (Goodfellow 2015):
            with ``aᵢ`` a layer's input and ``δᵢ = ∂ℓᵢ/∂yᵢ`` its output's gradient for
            example ``i``, ``‖∂ℓᵢ/∂W‖² = ‖δᵢ‖²‖aᵢ‖²`` and ``‖∂ℓᵢ/∂b‖² = ‖δᵢ‖²``, so one
            ordinary forward and backward of ``Σᵢ ℓᵢ`` gives every per-example norm and
            the gradient sum without forming a per-example gradient. It applies when
            every selected parameter belongs to an ``nn.Linear`` called once per
            forward on ``(batch, features)`` inputs (in train mode too: dropout draws
            each example's masks independently). ``"vmap"`` forms
            the per-example gradients with ``torch.func`` in chunks (any model).
            ``"auto"`` (default) takes ``"linear"`` where it applies, else ``"vmap"``;
            the result's ``method`` says which ran.

    Raises:
        ValueError: for ``chunk_size < 1``, an unknown ``mode``, ``mode="train"`` on a
            model with BatchNorm, an empty probe set or a bad parameter selection.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got chunk_size={chunk_size}; pass None for the default")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
    if mode == "train" and has_batchnorm(model):
        raise ValueError(
            "mode='train' is undefined for per-example gradients of a model with BatchNorm "
            "(batch statistics of a single example); use mode='eval' (running statistics)"
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got method={method!r}")
    space = ParameterSpace.of(model, params)
    selected = space.parameters(model)
    dtype, device = selected[0].dtype, selected[0].device
    moved, _, _ = prepare_batches(batches, dtype, device, None)
    if method != "vmap":
        owners = linear_owners(model, space.names)
        if owners is not None:
            try:
                sums = linear_sums(model, loss_fn, moved, space, owners, mode=mode)
                return GradientMoments(**sums, dtype=_dtype_name(dtype), mode=mode, method="linear")
            except NotLinear as exc:
                if method == "linear":
                    raise ValueError(f"method='linear' does not apply: {exc}; use method='vmap' or 'auto'") from None
        elif method == "linear":
            raise ValueError(
                "method='linear' needs every selected parameter in an nn.Linear; use method='vmap' or 'auto'"
            )
    if chunk_size is None:
        chunk_size = default_chunk_size(space, dtype, device)
    chosen = set(space.names)
    fixed = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in chosen}
    theta = {n: p.detach() for n, p in zip(space.names, selected, strict=True)}

    def example_loss(theta: dict[str, Tensor], x: Any, y: Any) -> tuple[Tensor, Tensor]:
        unsqueeze = lambda t: t.unsqueeze(0)  # noqa: E731 - a batch of one
        loss = loss_fn(call_model(model, _map(unsqueeze, x), {**fixed, **theta}), _map(unsqueeze, y))
        return loss, loss.detach()

    per_example = vmap(
        grad(example_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different" if mode == "train" else "error"
    )
    sum_grad = torch.zeros(space.dim, dtype=torch.float64, device=device)
    sum_sq_norm = torch.zeros((), dtype=torch.float64, device=device)
    sum_loss = torch.zeros((), dtype=torch.float64, device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # a tensor: no device sync per chunk
    count = 0
    offsets = [0]
    for numel in space.numels:
        offsets.append(offsets[-1] + numel)
    with model_mode(model, mode), torch.no_grad():  # torch.func.grad ignores the outer no_grad
        for x, y in moved:
            size = batch_size_of(y)
            for start in range(0, size, chunk_size):
                # used in this iteration only, so the loop variable cannot go stale
                cut = lambda t: t[start : start + chunk_size]  # noqa: E731, B023
                grads, losses = per_example(theta, _map(cut, x), _map(cut, y))  # each (c, *shape); (c,)
                c = losses.shape[0]
                sq_norms = torch.zeros(c, dtype=torch.float64, device=device)
                for name, a, b in zip(space.names, offsets[:-1], offsets[1:], strict=True):
                    g = grads[name].reshape(c, -1)  # (c, numel)
                    sum_grad[a:b] += g.sum(0)  # in the model dtype: sum(dtype=float64) costs 10× more on CPU
                    sq_norms += torch.linalg.vector_norm(g, dim=1).to(torch.float64) ** 2
                    del grads[name]  # free each block once reduced
                losses = losses.to(torch.float64)
                sum_sq_norm += sq_norms.sum()
                sum_loss += losses.sum()
                nonfinite += (~torch.isfinite(sq_norms) | ~torch.isfinite(losses)).sum()
                count += c
    return GradientMoments(
        sum_grad=sum_grad,
        sum_sq_norm=sum_sq_norm,
        sum_loss=sum_loss,
        count=count,
        num_nonfinite=int(nonfinite),
        dtype=_dtype_name(dtype),
        chunk_size=chunk_size,
        mode=mode,
        method="vmap",
    )


METHODS = ("auto", "linear", "vmap")


@dataclass(frozen=True)
class NoiseResult:
    """Gradient-noise statistics of a probe set (see :func:`noise_statistics`).

    Attributes:
        num_examples: ``n``.
        loss: mean loss ``(1/n) Σᵢ ℓᵢ``.
        grad_norm: ``‖ḡ‖``, the norm of the gradient of the mean loss.
        mean_sq_grad_norm: ``(1/n) Σᵢ ‖gᵢ‖²``; ``noise_trace`` is this minus
            ``grad_norm²``, so their ratio shows how much cancelled.
        noise_trace: ``tr(Σ)`` (population covariance over the probe set), ≥ 0.
        noise_trace_clamped: the difference came out negative (rounding: the
            gradients are nearly identical) and was clamped to 0.
        noise_scale: ``tr(Σ)/‖ḡ‖²`` (McCandlish et al.'s ``B_simple`` on the probe set).
        noise_scale_debiased: ``S/|G|²`` from the unbiased estimators
            ``S = n·tr(Σ)/(n−1)``, ``|G|² = ‖ḡ‖² − tr(Σ)/(n−1)``; NaN when ``|G|² ≤ 0``
            or ``n < 2`` (the probe set does not resolve the gradient).
        lr: the training learning rate ``η`` (NaN when not given).
        batch_size: the training batch size ``B`` (``None`` when not given).
        temperature: ``η/(2B)``.
        gd_regularizer: ``(η/4)‖ḡ‖²`` (needs ``lr`` only).
        sgd_regularizer: ``(η/(4B))·tr(Σ)``.
        modified_loss_term: ``gd_regularizer + sgd_regularizer``.
        num_nonfinite: examples whose loss or gradient was not finite.
        dtype: the model dtype the gradients were computed in (sums are float64).
        chunk_size: examples per vectorized gradient computation.
        mode: ``"eval"`` or ``"train"``.
    """

    num_examples: int
    loss: float
    grad_norm: float
    mean_sq_grad_norm: float
    noise_trace: float
    noise_trace_clamped: bool
    noise_scale: float
    noise_scale_debiased: float
    lr: float
    batch_size: int | None
    temperature: float
    gd_regularizer: float
    sgd_regularizer: float
    modified_loss_term: float
    num_nonfinite: int
    dtype: str
    chunk_size: int
    mode: str


def _ratio(num: float, den: float) -> float:
    """``num/den`` with ``x/0 = inf`` for ``x > 0`` and ``0/0 = NaN``."""
    if den > 0:
        return num / den
    return math.inf if num > 0 else math.nan


def noise_statistics(
    moments: GradientMoments, *, lr: float | None = None, batch_size: int | None = None
) -> NoiseResult:
    """Noise trace, noise scale and SGD's implicit-regularization terms from gradient moments.

    With ``ḡ = Σgᵢ/n`` and ``tr(Σ) = Σ‖gᵢ‖²/n − ‖ḡ‖²`` (float64; the difference
    cancels when the per-example gradients nearly agree, so it is clamped at 0 and
    ``noise_trace_clamped`` says when that happened; its absolute rounding error is
    about ``ε·mean_sq_grad_norm`` with ``ε`` the model dtype's machine epsilon):

    - ``noise_scale = tr(Σ)/‖ḡ‖²``: McCandlish et al.'s (2018) ``B_simple``
      (``inf`` at a zero gradient with nonzero noise);
    - ``temperature = η/(2B)``: the convention of Chaudhari & Soatto (2018), whose
      SGD diffusion has ``β⁻¹ = η/(2B)``; Jastrzębski et al. (2017) call ``η/B`` the
      noise scale, so halve their values to compare;
    - ``gd_regularizer = (η/4)‖ḡ‖²`` and ``sgd_regularizer = (η/(4B))·tr(Σ)``: Smith
      et al. (2021) show that SGD with small learning rate ``η`` and random
      shuffling follows, in expectation, the modified loss
      ``L + (η/4)‖∇L‖² + ((N−B)/(N−1))·(η/(4B))·tr(Σ)`` (their ``Γ`` is ``tr(Σ)``),
      for a training set of ``N`` examples. The finite-population factor
      ``(N−B)/(N−1)`` is taken as 1 here (``N ≫ B``); multiply ``sgd_regularizer`` by
      it when ``B`` is not small against ``N``. Both terms are evaluated on the probe
      set, which stands in for the training set.

    Args:
        moments: from :func:`gradient_moments`, summed over shards.
        lr: the training learning rate ``η`` (> 0); without it the regularizers are NaN.
        batch_size: the training batch size ``B`` (≥ 1); without it (or ``lr``)
            ``temperature``, ``sgd_regularizer`` and ``modified_loss_term`` are NaN.

    Raises:
        ValueError: if the moments hold no example, ``lr`` is not a positive finite
            number, or ``batch_size`` is not a positive integer.
    """
    n = moments.count
    if n < 1:
        raise ValueError(f"moments hold no examples (count={n}); compute them over a non-empty probe set")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got lr={lr}; pass None to skip the regularizers")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(
            f"batch_size must be a positive integer, got batch_size={batch_size}; pass None to skip the regularizers"
        )
    grad_sq = float(moments.mean_grad.square().sum())
    mean_sq = float(moments.sum_sq_norm) / n
    raw_trace = mean_sq - grad_sq
    clamped = raw_trace < 0
    noise_trace = raw_trace if math.isnan(raw_trace) else max(raw_trace, 0.0)
    if n >= 2:
        signal = grad_sq - noise_trace / (n - 1)  # unbiased |G|²
        debiased = (n * noise_trace / (n - 1)) / signal if signal > 0 else math.nan
    else:
        debiased = math.nan
    nan = math.nan
    eta = float(lr) if lr is not None else nan
    batch = int(batch_size) if batch_size is not None else None
    both = lr is not None and batch is not None
    gd_reg = eta / 4 * grad_sq if lr is not None else nan
    sgd_reg = eta / (4 * batch) * noise_trace if lr is not None and batch is not None else nan
    temperature = eta / (2 * batch) if lr is not None and batch is not None else nan
    return NoiseResult(
        num_examples=n,
        loss=float(moments.sum_loss) / n,
        grad_norm=math.sqrt(grad_sq),
        mean_sq_grad_norm=mean_sq,
        noise_trace=noise_trace,
        noise_trace_clamped=clamped,
        noise_scale=_ratio(noise_trace, grad_sq),
        noise_scale_debiased=debiased,
        lr=eta,
        batch_size=batch,
        temperature=temperature,
        gd_regularizer=gd_reg,
        sgd_regularizer=sgd_reg,
        modified_loss_term=gd_reg + sgd_reg if both else nan,
        num_nonfinite=moments.num_nonfinite,
        dtype=moments.dtype,
        chunk_size=moments.chunk_size,
        mode=moments.mode,
    )
