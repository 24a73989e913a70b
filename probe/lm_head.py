"""A language-model head and token-mean cross-entropy whose Hessian-vector products hold no
tokens × vocabulary tensor beyond a few chunk-sized ones.

The loss is that of :func:`probe.gpt.lm_loss` on the logits ``Z = h Wᵀ``,

    L(h, W) = s · Σ_t [logsumexp(z_t) − z_t[y_t]],     s = 1/n,

over the ``n`` tokens whose target is not ``ignore_index`` (``h``: ``(T, d)`` hidden states
after the final norm, ``W``: ``(V, d)`` head weight, no bias). With ``P = softmax(Z)`` row
by row and ``Y`` the one-hot targets, its gradient is

    G = s·(P − Y),     ∇_h L = G W,     ∇_W L = Gᵀ h.

The plain head keeps ``Z``, ``log_softmax(Z)`` and the gradient's intermediates, several
``T × V`` tensors, in the graph that a Hessian-vector product differentiates again. Here
the loss is an ``autograd.Function`` that computes ``L`` chunk by chunk of tokens and saves
only ``h``, ``W``, the targets and one ``logsumexp`` per token. When a gradient may follow
(grad mode on, ``h`` or ``W`` requiring it) its forward pass also forms ``G W`` and ``Gᵀ h``
from the logits it already has, so the logits are computed once for loss and gradient,
as in the plain head. Its backward returns ``(∇_h L, ∇_W L)`` through a second
``autograd.Function`` (so ``create_graph=True`` works), scaling that gradient (or, on a
second backward through a retained graph, recomputing it by chunks). The second
Function's backward is the Hessian part: it recomputes ``Z`` per chunk and, given
adjoints ``(ḡ_h, ḡ_W)`` of the gradient,

    Ġ = ḡ_h Wᵀ + h ḡ_Wᵀ,     dZ = s·c·P ⊙ (Ġ − rowsum(P ⊙ Ġ)),
    d_h = dZ W + G ḡ_W,      d_W = dZᵀ h + Gᵀ ḡ_h,      d_c = s·⟨P − Y, Ġ⟩,

where ``c`` is the incoming gradient of the loss (``HessianOperator`` scales the loss by a
batch weight), ``G = s·c·(P − Y)`` here, and ``d_c`` the derivative with respect to ``c``.
The first terms of ``d_h``/``d_W`` go through ``G`` (softmax's Jacobian), the second are
direct. The forward pass holds two ``chunk × V`` buffers at a time (the logits and
``logsumexp``'s work space), a product two (``P`` and ``Ġ``, three for 16-bit inputs); the
gradient graph keeps ``O((T + V)·d)`` bytes, no logits.

Precision: float64 and float32 compute in their own dtype. For bfloat16/float16, the
logits are the head's matmul in that dtype (as the plain head's are), and the softmax,
the loss, ``G`` and the accumulation of ``∇_W``/``d_W`` over chunks are float32; results are
returned in the input's dtype.

Hugging Face models (:func:`chunked_head`): the output embedding's ``forward`` is replaced,
on that one module object, by one returning a :class:`HeadInput` marker that carries the
hidden states and the head's own weight; :func:`chunked_lm_loss` consumes it. Parameter
names and objects are untouched (tied embeddings stay one parameter), so operators'
flat layouts are the same as with the plain head.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from probe.batches import IGNORE_INDEX

__all__ = [
    "CHUNKED_HEAD_CLASSES",
    "DEFAULT_CHUNK_ELEMENTS",
    "HeadInput",
    "chunk_rows",
    "chunked_head",
    "chunked_lm_loss",
    "check_chunkable",
    "linear_cross_entropy",
]

# Logits per chunk (128 MiB in float32), chunk rows = DEFAULT_CHUNK_ELEMENTS // V (at least 1).
# Measured (bench/bench_vocab.py, 2-core x86_64 VM shared with other jobs, torch 2.13.0+cpu,
# 1,024 tokens, hidden 256, float32, V = 128,000): products of 262-token chunks (this default)
# took 4.27 s, of 512 and 1,024 tokens 4.25 s and 4.23 s, of 128 tokens 5.59 s; peak memory
# above setup 815 MB against 1,257 MB for 512 and 1,024 and 3,800 MB for the plain head.
DEFAULT_CHUNK_ELEMENTS = 2**25
# Config entries of models that transform the logits after the head (Gemma 2/3's tanh
# softcapping, Cohere's logit_scale, Granite's logits_scaling): the chunked head would drop it.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def chunk_rows(vocab: int, chunk: int | None = None) -> int:
    """Tokens per chunk: ``chunk`` when given, else ``DEFAULT_CHUNK_ELEMENTS // vocab`` (at least 1).

    Raises:
        ValueError: for a ``chunk`` below 1.
    """
    if chunk is None:
        return max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got chunk={chunk}; pass None for the default")
    return int(chunk)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype of softmax, loss and accumulation: float32 for 16-bit inputs, else their own."""
    return torch.float32 if dtype.itemsize < 4 else dtype


def _chunks(n: int, rows: int) -> Iterator[tuple[int, int]]:
    for a in range(0, n, rows):
        yield a, min(n, a + rows)


def _probs(h_c: Tensor, weight: Tensor, lse_c: Tensor) -> Tensor:
    """``softmax(h_c Wᵀ)`` in the accumulation dtype, from the saved ``logsumexp`` per row."""
    z = (h_c @ weight.T).to(_acc(h_c.dtype))  # (c, V)
    return z.sub_(lse_c.unsqueeze(1)).exp_()


def _grad_rows(p: Tensor, y_c: Tensor, scale: float | Tensor) -> Tensor:
    """``scale·(P − Y)`` in place of ``P``."""
    p.mul_(scale)
    rows = torch.arange(p.shape[0], device=p.device)
    p[rows, y_c] -= scale
    return p


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``(a ⊙ b).sum(1)`` of two ``(c, V)`` tensors without a ``(c, V)`` temporary; ``(c, 1)``."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).squeeze(2)


def _chunk_grads(
    h: Tensor, weight: Tensor, idx: Tensor, y: Tensor, rows: int, scale: Tensor | float, lse: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``scale·(G W, Gᵀ h)`` (``G = P − Y`` over the rows ``idx``) by chunks, and the per-row ``logsumexp``.

    With ``lse`` given it is reused; otherwise it is computed (the loss's forward pass).
    ``∇_W`` is accumulated in the accumulation dtype and returned in it.
    """
    acc, n = _acc(h.dtype), idx.numel()
    out_lse = torch.empty(n, dtype=acc, device=h.device) if lse is None else lse
    grad_h = torch.zeros_like(h)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    for a, b in _chunks(n, rows):
        h_c = h.index_select(0, idx[a:b])
        z = (h_c @ weight.T).to(acc)  # (c, V)
        if lse is None:
            out_lse[a:b] = torch.logsumexp(z, dim=1)
        g = _grad_rows(z.sub_(out_lse[a:b].unsqueeze(1)).exp_(), y[a:b], scale)  # P, then scale·(P − Y)
        grad_h.index_copy_(0, idx[a:b], g.to(h.dtype) @ weight)
        grad_w.addmm_(g.T, h_c.to(acc))
    return grad_h, grad_w, out_lse


class _LinearCE(torch.autograd.Function):
    """``s·Σ_t CE(h_t Wᵀ, y_t)`` over the counted tokens ``idx``, by chunks; saves no logits.

    With ``with_grad`` the forward pass also computes the gradient from the logits it has
    (``G W`` and ``Gᵀ h``, ``T × d`` and ``V × d``), which the first backward then only scales;
    they are dropped once used (a second backward through the same graph recomputes them).
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, idx: Tensor, y: Tensor, rows: int, with_grad: bool) -> Tensor:
        acc, n = _acc(h.dtype), idx.numel()
        if with_grad:
            grad_h, grad_w, lse = _chunk_grads(h, weight, idx, y, rows, 1.0 / max(n, 1), None)
            ctx.grads = (grad_h, grad_w.to(weight.dtype))
            # Σ_t lse_t − z_t[y_t]; z_t[y_t] = h_t · W[y_t], a (n, d) gather, not a logit matrix
            picked = (h.index_select(0, idx).to(acc) * weight.index_select(0, y).to(acc)).sum(1)
            total = lse.sum() - picked.sum()
        else:
            ctx.grads = None
            lse = torch.empty(n, dtype=acc, device=h.device)
            total = torch.zeros((), dtype=acc, device=h.device)
            for a, b in _chunks(n, rows):
                z = (h.index_select(0, idx[a:b]) @ weight.T).to(acc)  # (c, V)
                lse[a:b] = torch.logsumexp(z, dim=1)
                total += lse[a:b].sum() - z.gather(1, y[a:b].unsqueeze(1)).sum()
        ctx.save_for_backward(h, weight, idx, y, lse)
        ctx.rows = rows
        return (total / n).to(h.dtype)  # 0/0 = nan without counted tokens, as F.cross_entropy

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, idx, y, lse = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None
        grad_h, grad_w = _LinearCEGrad.apply(h, weight, grad_loss, idx, y, lse, ctx.rows, grads)
        return grad_h, grad_w, None, None, None, None


class _LinearCEGrad(torch.autograd.Function):
    """``(c·G W, c·Gᵀ h)``, ``c`` the loss's incoming gradient, from the forward pass's gradient when
    given, else by chunks; its backward is the Hessian-vector product."""

    @staticmethod
    def forward(
        ctx: Any,
        h: Tensor,
        weight: Tensor,
        c: Tensor,
        idx: Tensor,
        y: Tensor,
        lse: Tensor,
        rows: int,
        grads: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(h, weight, c, idx, y, lse)
        ctx.rows = rows
        ctx.set_materialize_grads(False)
        if grads is None:
            grad_h, grad_w, _ = _chunk_grads(h, weight, idx, y, rows, c.to(lse.dtype) / max(idx.numel(), 1), lse)
            return grad_h, grad_w.to(weight.dtype)
        if bool(c == 1):  # the common case (an unscaled loss): no copy
            return grads
        return grads[0] * c.to(h.dtype), grads[1] * c.to(weight.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, bar_h: Tensor | None, bar_w: Tensor | None) -> tuple[Tensor | None, ...]:
        h, weight, c, idx, y, lse = ctx.saved_tensors
        want_h, want_w, want_c = ctx.needs_input_grad[:3]
        if bar_h is None and bar_w is None:
            return (None,) * 8
        acc, n, dt = lse.dtype, idx.numel(), h.dtype
        s = 1.0 / max(n, 1)  # no counted token: no chunk, zero products
        scale = c.to(acc) * s
        d_h = torch.zeros_like(h) if want_h else None
        d_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        d_c = torch.zeros((), dtype=acc, device=h.device)
        for a, b in _chunks(n, ctx.rows):
            sel = idx[a:b]
            h_c, y_c = h.index_select(0, sel), y[a:b]
            p = _probs(h_c, weight, lse[a:b])  # (c, V)
            bh_c = bar_h.index_select(0, sel) if bar_h is not None else None
            # Ġ = ḡ_h Wᵀ + h ḡ_Wᵀ, accumulated in place where the dtypes allow
            if bh_c is None:
                assert bar_w is not None
                dot = (h_c @ bar_w.T).to(acc)
            else:
                dot = (bh_c @ weight.T).to(acc)
                if bar_w is not None:
                    if dot.dtype == dt:
                        dot.addmm_(h_c, bar_w.T)
                    else:
                        dot.add_(h_c @ bar_w.T)
            rowsum = _rowdot(p, dot)  # (c, 1)
            if want_c:  # ⟨G/c, Ġ⟩ = s·(Σ P⊙Ġ − Σ_t Ġ[t, y_t])
                d_c += s * (rowsum.sum() - dot.gather(1, y_c.unsqueeze(1)).sum())
            dz = dot.sub_(rowsum).mul_(p).mul_(scale)  # dZ, in place of Ġ
            g = _grad_rows(p, y_c, scale)  # G, in place of P
            if d_h is not None:
                part = dz.to(dt) @ weight
                if bar_w is not None:
                    part.addmm_(g.to(dt), bar_w)
                d_h.index_add_(0, sel, part)
            if d_w is not None:
                d_w.addmm_(dz.T, h_c.to(acc))
                if bh_c is not None:
                    d_w.addmm_(g.T, bh_c.to(acc))
        d_c_out = d_c.to(c.dtype) if want_c else None
        d_w_out = d_w.to(weight.dtype) if d_w is not None else None
        return d_h, d_w_out, d_c_out, None, None, None, None, None


def linear_cross_entropy(
    h: Tensor, weight: Tensor, targets: Tensor, *, chunk: int | None = None, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Token-mean cross-entropy of the logits ``h @ weight.T`` without holding them all.

    Equal to ``F.cross_entropy((h @ weight.T).reshape(-1, V), targets.reshape(-1),
    ignore_index=ignore_index)`` (:func:`probe.gpt.lm_loss`), with first and second
    derivatives (``create_graph=True`` then a Hessian-vector product) computed by chunks of
    ``chunk`` tokens: no tensor of more than ``chunk × V`` logits exists at any time.

    Args:
        h: hidden states ``(..., d)``, floating (float64, float32, bfloat16 or float16).
        weight: the head's weight ``(V, d)``, same dtype and device.
        targets: token ids ``(...)`` matching ``h``'s leading shape; ``ignore_index`` where not counted.
        chunk: tokens per chunk; default ``DEFAULT_CHUNK_ELEMENTS // V`` (see :func:`chunk_rows`).
        ignore_index: the target value that is not a token (default -100).

    Returns:
        The scalar mean loss in ``h``'s dtype (``nan`` when no token counts, as ``F.cross_entropy``).

    Raises:
        ValueError: for mismatched shapes or dtypes, non-integer targets or a bad ``chunk``.
    """
    if weight.ndim != 2 or h.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"h must be (..., d) and weight (V, d) with the same d, got h {tuple(h.shape)} and "
            f"weight {tuple(weight.shape)}"
        )
    if h.dtype != weight.dtype or not h.is_floating_point():
        raise ValueError(f"h and weight must share one floating dtype, got {h.dtype} and {weight.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.shape != h.shape[:-1]:
        raise ValueError(
            f"targets must be integer token ids of shape {tuple(h.shape[:-1])} (h's leading shape), "
            f"got a {targets.dtype} tensor of shape {tuple(targets.shape)}"
        )
    rows = chunk_rows(weight.shape[0], chunk)
    flat = targets.reshape(-1)
    idx = (flat != ignore_index).nonzero().squeeze(1)  # counted tokens
    h2 = h.reshape(-1, h.shape[-1])  # (T, d)
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCE.apply(h2, weight, idx, flat.index_select(0, idx).long(), rows, with_grad)


# causal LMs whose forward returns the output embedding's result as ``logits`` untouched, as the
# jobs of landscape-probe use the chunked head on them (tested against dense Hessians in
# tests/cluster/test_hf_models.py, transformers 5.x); others keep the plain head (OPT's forward calls
# ``.contiguous()`` on the logits, Gemma soft-caps them)
CHUNKED_HEAD_CLASSES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel"})


@dataclass(frozen=True)
class HeadInput:
    """What a model whose head runs under :func:`chunked_head` returns in place of logits:
    the hidden states the head was given, ``(..., d)``, and its weight ``(V, d)``."""

    hidden: Tensor
    weight: Tensor


def check_chunkable(model: nn.Module) -> nn.Linear:
    """The output embedding of a Hugging Face causal LM if the chunked head computes its loss exactly.

    Requires ``model.get_output_embeddings()`` to be a bias-free ``nn.Linear`` and the
    config (or its text config) to set none of ``final_logit_softcapping``, ``logit_scale``,
    ``logits_scaling`` (transforms applied to the logits after the head).

    Raises:
        ValueError: naming what stands in the way; use the plain head and ``probe.gpt.lm_loss`` then.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    name = type(model).__name__
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"the chunked LM head needs get_output_embeddings() to be an nn.Linear, got "
            f"{type(head).__name__} on {name}; use the plain head and lm_loss"
        )
    if head.bias is not None:
        raise ValueError(f"the chunked LM head has no bias, but {name}'s head has one; use the plain head and lm_loss")
    config = getattr(model, "config", None)
    configs = [config]
    text = getattr(config, "get_text_config", None)
    if callable(text):
        configs.append(text())
    for key in LOGIT_TRANSFORMS:
        for cfg in configs:
            value = getattr(cfg, key, None)
            if value is not None and not (key in ("logit_scale", "logits_scaling") and value == 1):
                raise ValueError(
                    f"{name} transforms its logits after the head ({key}={value}), which the chunked LM head "
                    f"does not; use the plain head and lm_loss"
                )
    return head


@contextmanager
def chunked_head(model: nn.Module) -> Iterator[nn.Linear]:
    """Run ``model`` with its output embedding returning a :class:`HeadInput` instead of logits.

    While active, ``model(**inputs)`` returns its usual output object whose ``.logits`` is a
    :class:`HeadInput` (``probe.batches.call_model`` then passes the whole output on), for
    :func:`chunked_lm_loss`. Only the head module's ``forward`` is replaced, on that object
    (an instance attribute, removed on exit); parameters, their names and tying are as
    before. Graphs built inside stay valid after exit, but an operator calls the model again
    (``loss_and_gradient``, graphs over ``graph_memory_bytes`` or in train mode, rebuilt per
    product): keep the context open while the operator is used, e.g.

        with chunked_head(model):
            H = HessianOperator(model, chunked_lm_loss, batches, weighting="tokens")
            ...  # every product, loss_and_gradient, Lanczos

    Do not pass ``labels`` to the model inside (its own loss would get the marker), and
    curvature operators that need the logits (the GGN) do not apply.

    Raises:
        ValueError: as :func:`check_chunkable`, or when the head is already patched.
    """
    head = check_chunkable(model)
    if "forward" in vars(head):
        raise ValueError(f"{type(model).__name__}'s head already has its forward replaced; enter chunked_head once")

    def forward(hidden: Tensor) -> HeadInput:
        return HeadInput(hidden, head.weight)

    head.forward = forward  # type: ignore[method-assign]
    try:
        yield head
    finally:
        del head.forward


def _head_input(outputs: Any) -> HeadInput | None:
    if isinstance(outputs, HeadInput):
        return outputs
    found = getattr(outputs, "logits", None)
    if found is None and isinstance(outputs, Mapping):
        found = outputs.get("logits")
    return found if isinstance(found, HeadInput) else None


def chunked_lm_loss(
    outputs: Any, targets: Tensor, *, chunk: int | None = None, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """:func:`probe.gpt.lm_loss` of a model run under :func:`chunked_head`, by :func:`linear_cross_entropy`.

    Args:
        outputs: a :class:`HeadInput`, or the model's output object holding one as ``.logits``.
        targets: ``(B, T)`` token ids aligned with the positions (no shift), ``-100`` where not counted.
        chunk: tokens per chunk (default: :func:`chunk_rows`).
        ignore_index: the target value that is not a token (default -100).

    Raises:
        ValueError: when ``outputs`` carries no :class:`HeadInput` (the model ran without :func:`chunked_head`).
    """
    found = _head_input(outputs)
    if found is None:
        raise ValueError(
            f"chunked_lm_loss needs the output of a model run under probe.lm_head.chunked_head, got "
            f"{type(outputs).__name__} without a HeadInput; enter chunked_head(model) or use lm_loss"
        )
    return linear_cross_entropy(found.hidden, found.weight, targets, chunk=chunk, ignore_index=ignore_index)
