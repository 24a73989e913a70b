"""Where each pipeline stage sits: its children, its slice of the flat vector, the parameters it shares.

A staged model is an ``nn.Sequential`` whose children run one after the other. A
child may declare the class attribute ``takes_inputs = True``: it is then called
``child(h, inputs)`` with the batch's model inputs (every stage of a pipeline has
them) and ``h`` the previous child's output (``None`` for the model's first child);
other children are called ``child(h)``, the model's first child ``child(inputs)``
(``child(**inputs)`` for a dict). :class:`StagedSequential` runs such a model in one
process (the single-process reference, ``probe.hessian.HessianOperator`` on it).

Flat layout. The full model's flat vector is its ``parameters()`` order
(trainable ones; a parameter that appears in several children counted once, at its
first occurrence), which is what :class:`probe.params.ParameterSpace` and so the
single-process operators use. Because the children are contiguous, the parameters
first met in a stage's children form one contiguous slice: the stage *owns* them.
A stage that uses a parameter owned by an earlier stage (a language model head tied
to the embedding) *borrows* it: it gets the owner's slice of every vector and sends
its contribution to each product back to the owner (:class:`StageLayout`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from probe.batches import batch_size_of

__all__ = [
    "BALANCES",
    "Borrowed",
    "Lent",
    "StageLayout",
    "StagedSequential",
    "build_stage",
    "child_costs",
    "run_children",
    "split_batch_rows",
    "stage_bounds",
    "stage_layout",
    "stage_parameter_names",
]


def run_children(children: Sequence[nn.Module], h: Any, inputs: Any, *, first: bool) -> Any:
    """Run ``children`` in order on ``h``; ``first``: they start the model (``h`` is ignored then)."""
    for i, child in enumerate(children):
        if getattr(child, "takes_inputs", False):
            h = child(None if first and i == 0 else h, inputs)
        elif first and i == 0:
            h = child(**inputs) if isinstance(inputs, Mapping) else child(inputs)
        else:
            h = child(h)
    return h


class StagedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose children may take the batch inputs (``takes_inputs = True``).

    ``model(inputs)`` (or ``model(**inputs)``) runs the children as a pipeline would, in one process.
    A stage :func:`build_stage` made carries its :class:`StageLayout` as ``pipeline_layout``.
    """

    pipeline_layout: StageLayout | None = None

    def forward(self, inputs: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        return run_children(list(self), None, kwargs if inputs is None else inputs, first=True)


def _trainable(model: nn.Module) -> list[tuple[int, str, nn.Parameter]]:
    """``(child index, full name, parameter)`` for every use of a trainable parameter, duplicates included."""
    out = []
    for i, child in enumerate(model.children()):
        for name, p in child.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                out.append((i, f"{i}.{name}", p))
    return out


BALANCES = ("compute", "parameters")


def child_costs(model: nn.Sequential, balance: str = "compute") -> list[int]:
    """Each child's weight in :func:`stage_bounds`.

    ``"compute"``: the parameters each child multiplies with, every use counted (a head tied to
    the embedding counts in the head's child) and embedding tables not at all (a lookup, no
    matmul): proportional to the child's matmul FLOPs per token. Measured on GPT-2 small
    (``bench/bench_pipeline.py``): balanced by parameters, 2 stages did 17% and 83% of the
    FLOPs (the tied 50257 × 768 head is free by parameters, the embedding costly).
    ``"parameters"``: the parameters each child holds, a shared one counted once, in the child
    that first uses it (memory).
    """
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    seen: set[int] = set()
    sizes = []
    for child in model.children():
        size = 0
        if balance == "parameters":
            for p in child.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    size += p.numel()
        else:
            for module in child.modules():
                if not isinstance(module, nn.Embedding):
                    size += sum(p.numel() for p in module.parameters(recurse=False))
        sizes.append(size)
    if balance == "compute" and not any(sizes):  # nothing multiplies: balance the memory instead
        return child_costs(model, "parameters")
    return sizes


def stage_bounds(model: nn.Sequential, num_stages: int, balance: str = "compute") -> list[tuple[int, int]]:
    """Contiguous child ranges ``[(start, stop), ...]``, one per stage, minimizing the largest stage's
    cost (:func:`child_costs`: matmul parameters by default, or parameters held).

    Raises:
        ValueError: when there are fewer children than stages, or for an unknown ``balance``.
    """
    sizes = child_costs(model, balance)
    n = len(sizes)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n} stage modules over {num_stages} workers; use 1 to {n} workers")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    # best[k][i]: the smallest possible largest stage when the first i children form k stages
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(1, num_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds, i = [], n
    for k in range(num_stages, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    return bounds[::-1]


@dataclass(frozen=True)
class Borrowed:
    """A parameter a stage uses but an earlier stage owns.

    Attributes:
        name: its name in the stage module (``build_stage``'s numbering: children from 0).
        full_name: the same use's name in the full model.
        owner: the owning stage; ``owner_name`` its full-model name (first occurrence).
        offset: where it starts in the full flat vector; ``owner_offset`` where in the owner's slice.
        numel: its length.
    """

    name: str
    full_name: str
    owner: int
    owner_name: str
    offset: int
    owner_offset: int
    numel: int


@dataclass(frozen=True)
class Lent:
    """A parameter a stage owns and a later stage borrows: ``borrower`` gets rows
    ``owner_offset : owner_offset + numel`` of the owner's slice of every vector."""

    borrower: int
    owner_name: str
    owner_offset: int
    numel: int


@dataclass(frozen=True)
class StageLayout:
    """One stage of a pipeline (see the module docstring).

    Attributes:
        index: the stage's index; ``bounds`` its children ``[start, stop)`` of the full model.
        names: the parameters it owns, by full-model name, in flat order.
        offset, dim: where its slice starts in the full flat vector and its length (owned only).
        total_dim: the full flat vector's length.
        borrowed: parameters it uses that earlier stages own (ordered by owner, then offset).
        lent: its parameters that later stages borrow (ordered by borrower, then offset).
    """

    index: int
    bounds: tuple[int, int]
    names: tuple[str, ...]
    offset: int
    dim: int
    total_dim: int
    borrowed: tuple[Borrowed, ...] = ()
    lent: tuple[Lent, ...] = ()

    def local_name(self, full_name: str) -> str:
        """The stage module's name for a full-model name of one of its children's parameters."""
        child, rest = full_name.split(".", 1)
        return f"{int(child) - self.bounds[0]}.{rest}"


def stage_layout(model: nn.Sequential, num_stages: int, balance: str = "compute") -> list[StageLayout]:
    """Every stage's :class:`StageLayout` (children from :func:`stage_bounds`), from the full model
    or its skeleton (the meta device will do: only identities and shapes are read)."""
    bounds = stage_bounds(model, num_stages, balance)
    stage_of = [k for k, (a, b) in enumerate(bounds) for _ in range(a, b)]
    uses = _trainable(model)
    first: dict[int, tuple[int, str, int]] = {}  # id -> (owner stage, owner name, flat offset)
    owned: list[list[str]] = [[] for _ in bounds]
    dims = [0] * len(bounds)
    for child, name, p in uses:
        if id(p) not in first:
            k = stage_of[child]
            first[id(p)] = (k, name, sum(dims))  # stages own contiguous slices, in order
            owned[k].append(name)
            dims[k] += p.numel()
    starts = [sum(dims[:k]) for k in range(len(bounds))]
    borrowed: list[dict[int, Borrowed]] = [{} for _ in bounds]
    for child, name, p in uses:
        k = stage_of[child]
        owner, owner_name, off = first[id(p)]
        if owner != k and id(p) not in borrowed[k]:
            local = f"{child - bounds[k][0]}.{name.split('.', 1)[1]}"
            borrowed[k][id(p)] = Borrowed(local, name, owner, owner_name, off, off - starts[owner], p.numel())
    lent: list[list[Lent]] = [[] for _ in bounds]
    for k, mine in enumerate(borrowed):
        for b in mine.values():
            lent[b.owner].append(Lent(k, b.owner_name, b.owner_offset, b.numel))
    return [
        StageLayout(
            index=k,
            bounds=bounds[k],
            names=tuple(owned[k]),
            offset=starts[k],
            dim=dims[k],
            total_dim=sum(dims),
            borrowed=tuple(sorted(borrowed[k].values(), key=lambda b: (b.owner, b.offset))),
            lent=tuple(sorted(lent[k], key=lambda e: (e.borrower, e.owner_offset))),
        )
        for k in range(len(bounds))
    ]


def stage_parameter_names(model: nn.Sequential, bounds: tuple[int, int]) -> list[str]:
    """The ``state_dict`` names of the parameters in children ``bounds`` (as the full model names them;
    a parameter shared with an earlier stage is listed under this stage's name for it)."""
    a, b = bounds
    return [f"{i}.{n}" for i in range(a, b) for n, _ in model[i].named_parameters()]


def build_stage(
    model: nn.Sequential, num_stages: int, stage: int, balance: str = "compute"
) -> tuple[nn.Module, int, int]:
    """This stage's children as one module (the others are dropped), its parameter offset and the total dim.

    The module is a :class:`StagedSequential` carrying its :class:`StageLayout` as ``pipeline_layout``,
    which :class:`cluster.pipeline.PipelineHessian` reads when it is given no ``layout``.
    """
    layout = stage_layout(model, num_stages, balance)[stage]
    a, b = layout.bounds
    part = StagedSequential(*[model[i] for i in range(a, b)])
    part.pipeline_layout = layout  # a plain attribute: survives to_empty() and .to()
    return part, layout.offset, layout.total_dim


def _split_rows(x: Any, sizes: list[int], n: int) -> list[Any]:
    """``x`` split into ``len(sizes)`` pieces along dim 0 (tensors whose first dimension is ``n``; others repeated)."""
    if isinstance(x, Tensor) and x.ndim > 0 and x.shape[0] == n:
        return list(torch.split(x, sizes))
    if isinstance(x, Mapping):
        parts = {k: _split_rows(v, sizes, n) for k, v in x.items()}
        return [{k: v[i] for k, v in parts.items()} for i in range(len(sizes))]
    if isinstance(x, (tuple, list)):
        parts = [_split_rows(v, sizes, n) for v in x]
        return [type(x)(p[i] for p in parts) for i in range(len(sizes))]
    return [x] * len(sizes)


def split_batch_rows(batch: tuple[Any, Any], pieces: int) -> list[tuple[Any, Any]]:
    """An ``(inputs, targets)`` pair cut along dim 0 into ``min(pieces, examples)`` near-equal
    micro-batches (the first ``examples % pieces`` one row longer)."""
    x, y = batch
    n = batch_size_of(y)
    m = max(1, min(pieces, n))
    sizes = [n // m + (1 if i < n % m else 0) for i in range(m)]
    if m == 1:
        return [batch]
    return list(zip(_split_rows(x, sizes, n), _split_rows(y, sizes, n), strict=True))
