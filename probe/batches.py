"""Probe batches: their layouts, how a model is called on them, and how they are weighted.

A batch is either

- an ``(inputs, targets)`` pair, where ``inputs`` is a tensor, a tuple or list
  (passed as one argument, ``model(inputs)``) or a dict of tensors (passed as
  keywords, ``model(**inputs)``, e.g. ``{"input_ids", "attention_mask"}``), or
- one dict holding the targets under ``"labels"`` (Hugging Face style): the model
  gets the other entries as keywords and the loss gets ``labels`` as given (no
  shift: the data, or the loss, aligns positions).

A model may return its outputs as a tensor or as an object with a ``.logits``
tensor (or a mapping with ``"logits"``); the loss is ``loss_fn(outputs, targets)``.
When a pair's inputs themselves hold ``"labels"``, the model computes its own loss
and the whole output goes to the loss function (:func:`model_loss` takes its ``.loss``).

Weighting. Every operator and evaluator is of the mean loss over the whole probe
set, each batch's mean loss ``ℓ_b`` entering with weight ``c_b / C``:

- ``weighting="examples"`` (default): ``c_b`` = examples in the batch (the first
  dimension of its targets), ``C`` = all probe examples; right for losses that are
  means over examples (``F.cross_entropy``, ``F.mse_loss``);
- ``weighting="tokens"``: ``c_b`` = targets not equal to ``ignore_index`` (default
  ``-100``, PyTorch's and Hugging Face's convention), ``C`` = all such targets; with
  a loss that is the mean over a batch's counted tokens (``probe.gpt.lm_loss``)
  this is the mean over every probe token, ``L = (1/T) Σ_b T_b ℓ_b``, however
  tokens are spread over sequences and batches. Batches without a counted token
  contribute nothing and are dropped (their mean loss is 0/0).

``C`` defaults to the local count; a worker holding one shard of a data-parallel
probe set passes the global one (``total_examples`` or ``total_tokens``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "Batch",
    "LossFn",
    "IGNORE_INDEX",
    "WEIGHTINGS",
    "WeightedBatches",
    "batch_size_of",
    "call_model",
    "model_loss",
    "move_batch",
    "outputs_of",
    "prepare_batches",
    "split_batch",
    "token_count",
    "weigh_batches",
]

Batch = tuple[Any, Any]
LossFn = Callable[[Tensor, Any], Tensor]
IGNORE_INDEX = -100
WEIGHTINGS = ("examples", "tokens")
LABELS = "labels"


def split_batch(batch: Any) -> Batch:
    """``(inputs, targets)`` of a batch given as a pair or as a dict with a ``"labels"`` entry.

    Raises:
        ValueError: for a dict without ``"labels"`` or anything that is not a pair.
    """
    if isinstance(batch, Mapping):
        if LABELS not in batch:
            raise ValueError(
                f"a dict batch must hold its targets under 'labels', got keys {sorted(batch)}; "
                f"add a 'labels' entry or pass (inputs, targets) pairs"
            )
        return {k: v for k, v in batch.items() if k != LABELS}, batch[LABELS]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    what = (
        f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
    )
    raise ValueError(f"each batch must be an (inputs, targets) pair or a dict with a 'labels' entry, got {what}")


def batch_size_of(targets: Any) -> int:
    """Number of examples in a batch, read from its targets (first dimension)."""
    if isinstance(targets, Tensor):
        return int(targets.shape[0]) if targets.ndim > 0 else 1
    if isinstance(targets, dict):
        return batch_size_of(next(iter(targets.values())))
    return len(targets)


def token_count(targets: Any, ignore_index: int = IGNORE_INDEX) -> int:
    """Number of targets that count towards a token-mean loss: entries not equal to ``ignore_index``.

    Raises:
        ValueError: unless ``targets`` is an integer tensor (token ids).
    """
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex():
        got = f"a {targets.dtype} tensor" if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(
            f"weighting='tokens' counts integer targets (token ids, {ignore_index} where ignored), got {got}; "
            f"use weighting='examples' for other targets"
        )
    return int((targets != ignore_index).sum())


def move_batch(x: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """Move a batch (tensor, dict or tuple of tensors) to ``device``; floating tensors take ``dtype``."""
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    if isinstance(x, dict):
        return {k: move_batch(v, dtype, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(move_batch(v, dtype, device) for v in x)
    return x


def outputs_of(out: Any) -> Any:
    """The output tensor of a model's return value: the value itself, or its ``.logits``
    (an object such as a Hugging Face ``ModelOutput``, or a mapping with ``"logits"``)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    return out


def call_model(model: nn.Module, inputs: Any, state: dict[str, Tensor] | None = None) -> Any:
    """``model(**inputs)`` for a dict of inputs, ``model(inputs)`` otherwise, reduced by :func:`outputs_of`.

    With ``state`` the module runs with those parameters and buffers
    (``torch.func.functional_call``), its own left untouched.
    """
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})
    out = model(*args, **kwargs) if state is None else functional_call(model, state, args, kwargs)
    if isinstance(inputs, Mapping) and LABELS in inputs:
        return out  # the model was given its labels and computed its own loss: see model_loss
    return outputs_of(out)


def model_loss(outputs: Any, targets: Any = None) -> Tensor:
    """The loss a model returned itself (Hugging Face models given ``labels``: ``outputs.loss``).

    Use with batches whose *inputs* carry the labels, ``({"input_ids": ..., "labels": y}, y)``:
    :func:`call_model` then passes the model's whole output here. ``targets`` only count
    examples for the weighting.

    Raises:
        ValueError: when the output carries no loss.
    """
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if not isinstance(loss, Tensor):
        raise ValueError(
            "loss 'model' needs a model that returns its own loss when given labels (a Hugging Face "
            f"model's outputs.loss), got {type(outputs).__name__} without one; use another loss"
        )
    return loss


@dataclass(frozen=True)
class WeightedBatches:
    """A probe set ready for evaluation (see the module docstring).

    Attributes:
        batches: ``(inputs, targets)`` pairs on the device, floating tensors in the compute dtype.
        weights: ``c_b / C`` per batch.
        sizes: examples per batch.
        tokens: counted targets per batch (``weighting="tokens"``), else ``None``.
        weighting: ``"examples"`` or ``"tokens"``.
        total: ``C``, the denominator of the weights (examples or tokens).
    """

    batches: list[Batch]
    weights: list[float]
    sizes: list[int]
    tokens: list[int] | None
    weighting: str
    total: int


def weigh_batches(
    batches: Sequence[Any],
    dtype: torch.dtype,
    device: torch.device,
    *,
    weighting: str = "examples",
    total_examples: int | None = None,
    total_tokens: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> WeightedBatches:
    """Split, move, count and weight a probe set.

    Args:
        batches: pairs or ``"labels"`` dicts (see the module docstring).
        dtype: the compute dtype floating tensors take (the model's).
        device: where the batches go.
        weighting: ``"examples"`` (default) or ``"tokens"``.
        total_examples: ``C`` for ``weighting="examples"`` (default: the local count).
        total_tokens: ``C`` for ``weighting="tokens"`` (default: the local count).
        ignore_index: the target value that does not count as a token.

    Raises:
        ValueError: for an empty probe set, an unknown ``weighting``, a total given
            for the other weighting, a non-positive total, a malformed batch, or
            non-integer targets under ``weighting="tokens"``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got weighting={weighting!r}")
    if weighting == "examples" and total_tokens is not None:
        raise ValueError(
            f"total_tokens={total_tokens} is given with weighting='examples'; "
            f"pass weighting='tokens', or total_examples for example weighting"
        )
    if weighting == "tokens" and total_examples is not None:
        raise ValueError(
            f"total_examples={total_examples} is given with weighting='tokens'; "
            f"pass total_tokens, the token count over every shard"
        )
    batches = list(batches)
    if not batches:
        raise ValueError("the probe set is empty: pass at least one (inputs, targets) batch")
    pairs = [split_batch(b) for b in batches]
    moved = [(move_batch(x, dtype, device), move_batch(y, dtype, device)) for x, y in pairs]
    tokens = None
    if weighting == "tokens":
        counted = [(b, token_count(b[1], ignore_index)) for b in moved]
        local = sum(c for _, c in counted)
        if local == 0 and total_tokens is None:
            raise ValueError(
                f"the probe set has no target tokens: every target equals ignore_index={ignore_index}; "
                f"check the labels or pass ignore_index"
            )
        moved = [b for b, c in counted if c > 0]
        tokens = [c for _, c in counted if c > 0]
        counts, total, name = tokens, local if total_tokens is None else total_tokens, "total_tokens"
    else:
        counts = [batch_size_of(y) for _, y in moved]
        total, name = sum(counts) if total_examples is None else total_examples, "total_examples"
    if total <= 0:
        raise ValueError(f"{name} must be positive, got {total}")
    sizes = [batch_size_of(y) for _, y in moved]
    return WeightedBatches(moved, [c / total for c in counts], sizes, tokens, weighting, total)


def prepare_batches(
    batches: Sequence[Any], dtype: torch.dtype, device: torch.device, total_examples: int | None
) -> tuple[list[Batch], list[int], list[float]]:
    """Batches moved to ``device`` (floating tensors in ``dtype``), their example counts, and
    their weights ``n_b / N`` (``N`` = ``total_examples``, default the local count).

    Raises:
        ValueError: for an empty probe set, a malformed batch or a non-positive ``total_examples``.
    """
    w = weigh_batches(batches, dtype, device, total_examples=total_examples)
    return w.batches, w.sizes, w.weights
