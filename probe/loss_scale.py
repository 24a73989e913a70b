"""Dynamic-range safeguards for Hessian-vector products computed in float16.

float16 has 10 mantissa bits (unit roundoff ``2⁻¹¹ ≈ 4.9e-4``, finer than bfloat16's
``2⁻⁸``) but only five exponent bits: normal numbers span ``6.1e-5 .. 65504`` and
subnormals reach down to ``6.0e-8``. A gradient or product entry outside that range
underflows to zero or overflows to infinity, so a float16 product is formed at a scale:

- the loss inside the graph is multiplied by a power of two ``S`` (the *loss scale*),
  in float32 (a float16 loss times ``S`` would overflow for losses above ``65504/S``);
  every gradient in the graph, and every product, is then ``S`` times the true one;
- the vector is multiplied by a power of two ``c`` before it is rounded to float16, so
  its largest entry lies in ``[1, 2)`` (a unit vector over 10⁹ parameters has entries
  near ``3e-5``, already subnormal);
- the float16 product is unscaled by ``w_b/(S·c)`` in the float32 (or float64)
  accumulator. Both factors are powers of two, so scaling and unscaling are exact.

``S`` is static when given, else chosen from the first probe batch's gradient: the
largest gradient entry is placed at ``2^TARGET_EXPONENT = 16``, which leaves 28 binades
below it before entries underflow and room above it for products, which exceed the
gradient where the curvature is large and the gradient small. Measured at
``2^8`` instead (2-core x86_64, torch 2.13.0+cpu), the largest entry of a float16 product
with a Rademacher vector came within 2.9x of float16's 65504 on all-MiniLM-L6-v2
(cosine-similarity loss) and 5.7x on a trained 60k-parameter Llama; at ``2^4`` that
headroom is 46x and 91x. ``S`` is
bounded by ``[2⁻²⁴, 2¹⁵]``: the backward pass seeds the float16 loss with the cotangent ``S``,
which must itself be a finite, nonzero float16 number. A product that comes out non-finite
(an overflow: the vector was finite) lowers ``S`` by ``BACKOFF`` and is recomputed, at
most ``MAX_RETRIES`` times, after which :class:`Float16RangeError` says what to do.

Normalization layers run in float32 (:class:`float32_norms`, as automatic mixed precision
keeps them): the double backward of layer normalization multiplies by ``rstd³``, which
overflows float16 once an input's standard deviation is below about 1/40, whatever the
loss scale (measured: every product of all-MiniLM-L6-v2 was NaN at every loss scale from
2¹⁰ down to 2⁻¹⁴ without it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = [
    "BACKOFF",
    "MAX_RETRIES",
    "MAX_SCALE",
    "MIN_SCALE",
    "TARGET_EXPONENT",
    "Float16RangeError",
    "check_loss_scale",
    "choose_loss_scale",
    "float32_loss",
    "float32_norms",
    "vector_scale",
]

MAX_SCALE = 2.0**15  # the seed cotangent S of a float16 loss must be a finite float16 number (max 65504)
MIN_SCALE = 2.0**-24  # float16's smallest subnormal: a smaller seed is zero
TARGET_EXPONENT = 4  # the largest gradient entry at 2**4 = 16; see the module docstring
BACKOFF = 2.0**4  # each overflow divides S by 16
MAX_RETRIES = 6  # at most 2**24 below the first choice before giving up
_FIX = "probe in precision: bfloat16 (float32's exponent range) or float32"


class Float16RangeError(FloatingPointError, ValueError):
    """A float16 loss, gradient or product is outside float16's range at every allowed loss scale."""


def check_loss_scale(scale: float) -> float:
    """``scale`` as a float, checked to be a power of two in ``[MIN_SCALE, MAX_SCALE]``.

    Raises:
        ValueError: for any other value, naming the bounds.
    """
    s = float(scale)
    if not (MIN_SCALE <= s <= MAX_SCALE) or math.frexp(s)[0] != 0.5:
        raise ValueError(
            f"loss_scale must be a power of two between 2**-24 and 2**15 (a finite float16 seed that scales "
            f"exactly), got {scale!r}"
        )
    return s


def float32_loss(loss_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``loss_fn`` with its value upcast to float32, so ``loss * S`` is formed without float16 overflow."""

    def upcast(outputs, targets) -> Tensor:
        loss = loss_fn(outputs, targets)
        return loss.float() if loss.dtype == torch.float16 else loss

    upcast.__wrapped__ = loss_fn  # pyright: ignore[reportFunctionMemberAccess]
    return upcast


_NORMS = frozenset(
    {
        F.layer_norm,
        F.group_norm,
        F.rms_norm,
        torch.layer_norm,
        torch.group_norm,
        torch.rms_norm,
        torch.native_layer_norm,
    }
)


def _up(a):
    return a.float() if isinstance(a, Tensor) and a.dtype == torch.float16 else a


class float32_norms(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch's own modes
    """While active, layer, group and RMS normalization of float16 tensors compute in float32
    (inputs, weight and bias upcast; the output rounded back to float16), so their first and
    second derivatives do too. Other calls pass through unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _NORMS and args and isinstance(args[0], Tensor) and args[0].dtype == torch.float16:
            out = func(*map(_up, args), **{k: _up(v) for k, v in kwargs.items()})
            return out.to(torch.float16) if isinstance(out, Tensor) else tuple(o.to(torch.float16) for o in out)
        return func(*args, **kwargs)


def _max_abs(tensors: Sequence[Tensor]) -> float:
    return max((t.detach().abs().max().float().item() for t in tensors if t.numel()), default=0.0)


def choose_loss_scale(loss: Tensor, params: Sequence[Tensor]) -> float:
    """The loss scale for a float16 model, from the gradient of ``loss`` (the first probe batch's,
    float32, with its graph): ``S`` puts the largest entry of ``S·∇loss`` at ``2^TARGET_EXPONENT``.

    Gradients that underflow to zero at ``S = 1`` are taken again at ``S = 2⁸, 2¹⁵``; ones that
    overflow, at ``S = 2⁻⁸, 2⁻¹⁶, 2⁻²⁴``. A gradient that is zero at every scale (a loss that does
    not depend on the parameters here) leaves ``S = 1``.

    Raises:
        Float16RangeError: when the loss itself is not finite, or the gradient overflows even at ``2⁻²⁴``.
    """
    if not torch.isfinite(loss).all():
        raise Float16RangeError(
            f"the loss of the first probe batch is {loss.item()} in float16: the model's activations exceed "
            f"float16's range (max 65504); {_FIX}"
        )
    scale = 1.0
    for _ in range(8):
        grads = torch.autograd.grad(loss * scale, list(params), retain_graph=True, allow_unused=True)
        peak = _max_abs([g for g in grads if g is not None])
        if not math.isfinite(peak):
            if scale <= MIN_SCALE:
                break
            scale = max(scale / 2.0**8, MIN_SCALE)
        elif peak == 0.0:
            if scale >= MAX_SCALE:
                return 1.0
            scale = min(scale * 2.0**8, MAX_SCALE)
        else:
            exponent = math.frexp(peak)[1] - 1  # peak in [2**exponent, 2**(exponent+1))
            return min(max(scale * 2.0 ** (TARGET_EXPONENT - exponent), MIN_SCALE), MAX_SCALE)
    raise Float16RangeError(
        f"the gradient of the first probe batch overflows float16 even at loss scale {scale:g}; {_FIX}"
    )


def vector_scale(V: Tensor) -> float:
    """The power of two ``c`` that puts the largest entry of ``c·V`` in ``[1, 2)`` (1 for a zero or
    non-finite ``V``)."""
    peak = V.detach().abs().max().item() if V.numel() else 0.0
    if peak == 0.0 or not math.isfinite(peak):
        return 1.0
    return 2.0 ** (1 - math.frexp(peak)[1])


def overflow_message(scale: float, retries: int) -> str:
    """The error for a product that stays non-finite after ``retries`` backoffs down to ``scale``."""
    return (
        f"a float16 Hessian-vector product overflowed at every loss scale down to {scale:g} ({retries} backoffs "
        f"of {BACKOFF:g}x): the curvature times the vector exceeds float16's range (max 65504); {_FIX}"
    )
