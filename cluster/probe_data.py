"""The probe data of a job: a data set's fixed, seeded subset and its content hash, and
Hugging Face causal-LM items with their labels shifted (``loss: causal_lm``).

The driver hashes the subset before any worker starts (the hash is in every task key
and row); each worker takes its index shard of the same subset (:mod:`cluster.worker`).
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import torch

from cluster.spec import JobSpec, SpecError, import_factory
from probe.batches import IGNORE_INDEX

__all__ = ["Shard", "probe_subset", "ShiftedLabels"]


class Shard(NamedTuple):
    """One worker's batches of a data set and the set's global counts.

    ``total_tokens`` (targets ``!= -100`` over the whole set) is counted only for a
    job weighted by tokens, else ``None``.
    """

    batches: list
    total_examples: int
    total_tokens: int | None
    sha256: str


def _leaves(item: Any) -> list:
    """The values of a dataset item in a fixed order: pairs and lists in order, dicts by sorted key."""
    if isinstance(item, dict):
        return [leaf for k in sorted(item) for leaf in _leaves(item[k])]
    if isinstance(item, (tuple, list)):
        return [leaf for v in item for leaf in _leaves(v)]
    return [item]


def probe_subset(spec: JobSpec, eval_set: str = "probe") -> tuple[Any, torch.Tensor, str]:
    """``(dataset, indices, sha256)``: the fixed, seeded subset of a data set and its content hash.

    ``eval_set`` is ``"probe"`` (``data.factory``) or a name under ``data.eval_sets``.

    Raises:
        SpecError: when the data factory fails or returns fewer than ``num_examples`` examples.
    """
    if eval_set == "probe":
        key, path, kwargs, count = "data.factory", spec.data.factory, spec.data.kwargs, spec.data.num_examples
    elif eval_set in spec.data.eval_sets:
        es = spec.data.eval_sets[eval_set]
        key, path, kwargs = f"data.eval_sets.{eval_set}.factory", es["factory"], es.get("kwargs", {})
        count = es.get("num_examples")
    else:
        raise SpecError(
            f"evaluation set {eval_set!r} is not defined; define it under data.eval_sets "
            f"(defined: {', '.join(['probe', *spec.data.eval_sets])})"
        )
    factory = import_factory(path, key=key)
    try:
        dataset = factory(**kwargs)
    except (ValueError, TypeError, OSError, ImportError, KeyError) as exc:  # the factory's own one-line reason
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"{key} {path!r} failed: {first}") from exc
    if spec.loss == "causal_lm":
        dataset = ShiftedLabels(dataset)
    n = len(dataset)
    if n == 0:
        raise SpecError(f"{key} {path!r} returned an empty dataset")
    count = n if count is None else count
    if count > n:
        raise SpecError(f"{key}: num_examples={count} exceeds the dataset size {n}; lower it")
    if spec.loss == "lm_cross_entropy" and _causal(spec):
        _refuse_unshifted(dataset[0], key)
    g = torch.Generator().manual_seed(spec.seed)
    indices = torch.randperm(n, generator=g)[:count].sort().values
    h = hashlib.sha256()
    h.update(indices.numpy().tobytes())
    for i in indices.tolist():
        for t in _leaves(dataset[i]):  # (x, y) pairs hash as they always did
            h.update(torch.as_tensor(t).detach().cpu().contiguous().numpy().tobytes())
    return dataset, indices, h.hexdigest()


class ShiftedLabels:
    """A dataset of Hugging Face causal-LM items (``labels`` equal to ``input_ids``, unshifted) with
    each item's labels moved one position left and ``-100`` appended, so that position t's logits
    are scored against token t+1 exactly as transformers' own causal-LM loss does; the last
    position (and any ``-100`` already there) counts for nothing."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        if not isinstance(item, dict) or "labels" not in item:
            raise SpecError(
                f"loss causal_lm needs dict items with 'labels' (token ids, Hugging Face's unshifted "
                f"convention), got {type(item).__name__}"
                f"{' keys ' + str(sorted(item)) if isinstance(item, dict) else ''}"
            )
        labels = torch.as_tensor(item["labels"])
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[..., :-1] = labels[..., 1:]
        return {**item, "labels": shifted}


def _causal(spec: JobSpec) -> bool:
    """Whether the model predicts the next token: any factory model (the built-in GPT is causal),
    an hf model whose class is a causal LM. A masked LM scores labels equal to its inputs legitimately."""
    m = spec.model
    if m.hf is None:
        return True
    if m.hf_class != "auto":
        return m.hf_class == "causal_lm"
    from cluster.hf import config_path

    try:
        import json as _json

        archs = _json.loads(config_path(m.checkpoints[0], m.hf).read_text()).get("architectures") or []
    except Exception:  # noqa: BLE001 - a run folder: the driver's checks name its faults
        return False
    return any("CausalLM" in a or "LMHead" in a for a in archs)


def _refuse_unshifted(item, key: str) -> None:
    """``lm_cross_entropy`` scores position t against label t: labels equal to input_ids are
    Hugging Face's unshifted convention and would train the model to copy its input."""
    if isinstance(item, dict) and "labels" in item and "input_ids" in item:
        labels, ids = torch.as_tensor(item["labels"]), torch.as_tensor(item["input_ids"])
        if labels.shape == ids.shape and bool((labels == ids).all()):
            raise SpecError(
                f"{key}: labels equal input_ids (Hugging Face's unshifted causal-LM convention), which "
                "loss lm_cross_entropy would score as copying the input; use loss: causal_lm, which shifts them"
            )
