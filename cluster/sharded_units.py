"""Layer units, their flat parameter shards and the differentiable collectives between them.

Support for :mod:`cluster.sharded_hvp`. A *unit* is a module whose parameters are
gathered together (one transformer block, the embedding, ...): its trainable
parameters, flattened in module order and padded to ``world·m`` entries, are split
into ``world`` equal shards of ``m`` entries; rank ``r`` keeps entries
``[r·m, (r+1)·m)``. Parameters that belong to no unit form the *root* unit, gathered
for the whole forward pass (as FSDP does with its root). A parameter reached under
two units (tied weights) goes to the root unit.

:class:`Gather` (all-gather; backward: reduce-scatter) and :class:`Scatter`
(reduce-scatter; backward: all-gather) are each other's adjoints and are
differentiable to any order, so double backward runs through them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Gather", "Scatter", "Unit", "default_units", "build_units", "all_gather", "reduce_scatter"]

# torch 2.13 renamed the tensor collectives; older releases (e.g. on GPU images) have only the old names.
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Gather(torch.autograd.Function):
    """``(m,)`` shard → ``(world·m,)`` full flat vector. Backward: reduce-scatter (sum over ranks, keep the shard)."""

    @staticmethod
    def forward(ctx, shard: Tensor, group, world: int) -> Tensor:  # noqa: D102
        ctx.group, ctx.world = group, world
        full = shard.new_empty(world * shard.numel())
        all_gather(full, shard.detach().contiguous(), group=group)
        return full

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return Scatter.apply(grad.contiguous(), ctx.group, ctx.world), None, None


class Scatter(torch.autograd.Function):
    """``(world·m,)`` per-rank contributions → ``(m,)`` shard of their sum. Backward: all-gather."""

    @staticmethod
    def forward(ctx, full: Tensor, group, world: int) -> Tensor:  # noqa: D102
        ctx.group, ctx.world = group, world
        out = full.new_empty(full.numel() // world)
        reduce_scatter(out, full.detach().contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return Gather.apply(grad.contiguous(), ctx.group, ctx.world), None, None


@dataclass
class Unit:
    """One unit: where its parameters live in the modules and in the flat vectors.

    Attributes:
        name: the module's name (``""`` for the root unit).
        module: the module whose forward hooks gather and release the unit.
        shapes, numels, offsets: of each parameter in the unit's flat vector.
        slots: ``(owner module, attribute, parameter index, the released parameter)`` for every
            place a parameter is registered (a tied parameter has several).
        natural: for each entry of the unit's flat vector, its index in the model's flat
            parameter vector (:class:`probe.params.ParameterSpace` order).
        n: entries in the unit's flat vector; ``m``: entries per shard (``ceil(n/world)``);
            ``count``: this rank's entries that are not padding.
        shard: this rank's ``(m,)`` shard, a leaf that requires grad.
    """

    name: str
    module: nn.Module
    shapes: list[torch.Size] = field(default_factory=list)
    numels: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    slots: list[tuple[nn.Module, str, int, nn.Parameter]] = field(default_factory=list)
    natural: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    n: int = 0
    m: int = 0
    count: int = 0
    shard: Tensor = field(default_factory=lambda: torch.empty(0))

    def counts(self, world: int) -> list[int]:
        """Non-padding entries of each rank's shard."""
        return [max(0, min(self.m, self.n - r * self.m)) for r in range(world)]


def default_units(model: nn.Module) -> list[str]:
    """The outermost modules that are items of an ``nn.ModuleList`` or ``nn.Sequential`` (the layers) and hold
    trainable parameters: the blocks of a Hugging Face decoder (``model.layers.0``, ...), every stage of
    :func:`probe.gpt.gpt`. Everything else forms the root unit."""
    names: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        is_list = isinstance(module, nn.ModuleList | nn.Sequential) and len(module) > 1
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if is_list and any(p.requires_grad for p in child.parameters()):
                names.append(full)
            else:
                visit(full + ".", child)

    visit("", model)
    return names


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def build_units(model: nn.Module, unit_names: list[str], rank: int, world: int) -> list[Unit]:
    """Units (root first when it has parameters) with this rank's shards; the model's trainable parameters
    are replaced by empty placeholders, so only the shards stay in memory.

    Raises:
        ValueError: for an unknown, empty or nested unit name.
    """
    modules = dict(model.named_modules())
    for u in unit_names:
        if u not in modules or u == "":
            raise ValueError(f"unit {u!r} is not a submodule of the model; pass names from model.named_modules()")
        if any(o != u and u.startswith(o + ".") for o in unit_names):
            raise ValueError(f"unit {u!r} is nested in another unit; pass non-overlapping modules")
    named = [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    natural_offset: dict[int, int] = {}
    total = 0
    for _, p in model.named_parameters():  # deduplicated: the flat vector of probe.params.ParameterSpace
        if p.requires_grad:
            natural_offset[id(p)], total = total, total + p.numel()

    def unit_of(name: str) -> str:
        return next((u for u in unit_names if name.startswith(u + ".")), "")

    home: dict[int, str] = {}
    for n, p in named:
        u = unit_of(n)
        home[id(p)] = u if home.get(id(p), u) == u else ""  # reached under two units: the root holds it
    units = {u: Unit(u, modules[u]) for u in ["", *unit_names]}
    index: dict[int, tuple[Unit, int]] = {}
    for n, p in named:
        unit = units[home[id(p)]]
        if id(p) not in index:
            index[id(p)] = (unit, len(unit.shapes))
            unit.shapes.append(p.shape)
            unit.numels.append(p.numel())
            unit.offsets.append(unit.n)
            unit.n += p.numel()
        owner, attr = _owner(model, n)
        unit.slots.append((owner, attr, index[id(p)][1], p))
    params = {id(p): p for _, p in named}
    out = []
    for unit in units.values():
        if unit.n == 0:
            continue
        members = sorted((i, pid) for pid, (u, i) in index.items() if u is unit)
        flat = torch.cat([params[pid].detach().reshape(-1) for _, pid in members])
        unit.natural = torch.cat(
            [torch.arange(natural_offset[pid], natural_offset[pid] + params[pid].numel()) for _, pid in members]
        )
        unit.m = -(-unit.n // world)
        unit.count = unit.counts(world)[rank]
        shard = flat.new_zeros(unit.m)
        shard[: unit.count] = flat[rank * unit.m : rank * unit.m + unit.count]
        unit.shard = shard.requires_grad_(True)
        out.append(unit)
    for _, p in named:
        p.data = p.data.new_empty(0)  # released: the operator owns the shards (FSDP does the same)
    return out
