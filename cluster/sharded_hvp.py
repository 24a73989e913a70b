"""The exact Hessian-vector product of a model whose every layer is sharded over a process group.

For models that fit no single device and are no known family (so they cannot be
cut into pipeline stages, :mod:`cluster.pipeline`): each rank of a
``torch.distributed`` group keeps a ``1/world`` shard of every layer's flat
parameters (:mod:`cluster.sharded_units`, FSDP's layout) and the matching entries of
every vector the estimators handle, and runs its own slice of the probe data.

``Hv = ∇_θ ⟨∇_θ L, v⟩`` (reverse over reverse, as :class:`probe.hessian.HessianOperator`):

1. forward: a forward pre-hook on each layer all-gathers its parameters
   (:class:`~cluster.sharded_units.Gather`, whose backward reduce-scatters) and
   points the layer at views of them; a forward hook points it back at empty
   placeholders;
2. backward with ``create_graph``: the gradient of this rank's share of the loss,
   reduce-scattered, so every rank ends with its shard of the *global* gradient,
   a differentiable function of every rank's shards;
3. per column ``v``: ``∂⟨g, v⟩/∂θ`` on this rank's shard (the reduce-scatter's
   adjoint all-gathers ``v``; the gather's adjoint reduce-scatters ``Hv``).

Memory. Autograd would keep every layer's gathered parameters alive (linear
layers save their weight for backward, in the forward and again in the graph the
``create_graph`` backward records). A saved-tensor hook replaces every saved view
of a gathered parameter by a small handle and all-gathers the layer again when a
backward sweep unpacks it (the last gathered layer is reused while consecutive
unpacks ask for it), so a rank holds its shards, one or two layers' full
parameters at a time, and the activations and gradient graphs of its data
(:attr:`ShardedHessian.graph_bytes`, measured with the hook). The product is
exact: the same arithmetic as the single-process operator up to the order of
summation over ranks.

Coordinates. The operator's global vector is a permutation of the model's flat
parameter vector (:class:`probe.params.ParameterSpace` order): rank-major (rank 0's
entries of every layer, in layer order, then rank 1's, ...), so that each rank's
entries are the contiguous :attr:`~ShardedHessian.local_slice`, as the estimators
expect. Eigenvalues, traces and spectral densities do not depend on the order;
:attr:`ShardedHessian.natural_index` maps local entries to the model's order.

Requirements: every rank builds the model with the same parameter values, passes
the same number of batches (ranks may hold different examples and batch sizes,
weighted by ``total_examples``) and runs the same code path, so that the
collectives issued inside autograd pair up. Parameters and vectors are float32 or
float64. The collectives run wherever the parameters are (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cluster.sharded_units import Gather, Unit, all_gather, build_units, default_units
from probe.batches import call_model, weigh_batches
from probe.model_operator import MODES, model_mode
from probe.operators import CurvatureOperator

__all__ = ["ShardedHessian"]

DEFAULT_GRAPH_MEMORY_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class _Handle:
    """A saved view of a gathered layer, kept as its geometry in place of its data."""

    unit: int
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class ShardedHessian(CurvatureOperator):
    """Exact Hessian of the mean loss with parameters and vectors sharded over ``group``.

    Args:
        model: the network, with the same parameter values on every rank. Its trainable
            parameters are released (replaced by empty tensors) once sharded: the
            operator owns them from then on.
        loss_fn: ``loss_fn(outputs, targets)``, the *mean* loss of a batch.
        batches: this rank's share of the probe set (the same number of batches on every rank).
        units: names of the modules whose parameters are gathered together (the layers);
            default :func:`~cluster.sharded_units.default_units`. Parameters outside them
            form the root unit, gathered for the whole forward pass.
        total_examples: the example count over every rank (default: the local counts summed over ranks).
        weighting, total_tokens: as :class:`probe.model_operator.ModelOperator`.
        group: the process group (default: the world).
        mode: ``"eval"`` (default) or ``"train"`` (no graph kept; see :mod:`probe.model_operator`).
        graph_memory_bytes: budget for the gradient graphs kept between products (the
            largest rank's measured bytes decide, so every rank keeps the same batches).

    Raises:
        RuntimeError: if ``torch.distributed`` is not initialized.
        ValueError: for an unknown ``mode``, a bad unit, a dtype other than float32/float64,
            or ranks holding different numbers of batches.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        batches: Sequence,
        *,
        units: Sequence[str] | None = None,
        total_examples: int | None = None,
        weighting: str = "examples",
        total_tokens: int | None = None,
        group: dist.ProcessGroup | None = None,
        mode: str = "eval",
        graph_memory_bytes: int = DEFAULT_GRAPH_MEMORY_BYTES,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized; call init_process_group first")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
        first = next((p for p in model.parameters() if p.requires_grad), None)
        if first is None or first.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"ShardedHessian needs float32 or float64 parameters, got {None if first is None else first.dtype}; "
                f"convert the model with .float() or .double()"
            )
        self.model, self.loss_fn, self.mode, self.group = model, loss_fn, mode, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.dtype, self.device = first.dtype, first.device
        prepared = weigh_batches(
            batches,
            self.dtype,
            self.device,
            weighting=weighting,
            total_examples=total_examples,
            total_tokens=total_tokens,
        )
        weights = prepared.weights
        if (total_tokens if weighting == "tokens" else total_examples) is None:  # the local count: sum it over ranks
            total = torch.tensor([float(prepared.total)], dtype=torch.float64, device=self.device)
            dist.all_reduce(total, group=group)
            weights = [w * prepared.total / total.item() for w in weights]
        n = len(prepared.batches)
        counts = torch.tensor([n, -n], device=self.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
        if counts[0] != n or -counts[1] != n:
            raise ValueError(
                f"every rank must pass the same number of batches (rank {self.rank} has {n}, "
                f"others between {-int(counts[1])} and {int(counts[0])}); split the probe set evenly"
            )
        self.batches, self.weights = prepared.batches, weights
        self.unit_names = list(default_units(model) if units is None else units)
        self.units: list[Unit] = build_units(model, self.unit_names, self.rank, self.world_size)
        self.shards = [u.shard for u in self.units]
        per_rank = [sum(u.counts(self.world_size)[r] for u in self.units) for r in range(self.world_size)]
        self.dim = sum(per_rank)
        self.local_dim = per_rank[self.rank]
        start = sum(per_rank[: self.rank])
        self._slice = slice(start, start + self.local_dim)
        self.natural_index = torch.cat(
            [u.natural[self.rank * u.m : self.rank * u.m + u.count] for u in self.units]
        )  # local entry → index in the model's flat parameter vector
        self._active = False
        self._live: dict[int, tuple[int, weakref.ref]] = {}
        self._cache: tuple[int, Tensor] | None = None
        self.num_matvecs = 0
        self.num_gathers = 0  # all-gathers of a layer's parameters (forward and re-gathers)
        self.graph_bytes = 0  # bytes autograd saved for the kept graphs, gathered parameters excluded
        self.handle_bytes = 0  # bytes of gathered-parameter views autograd would have saved
        self._seen: set[tuple[int, int]] = set()
        for i, u in enumerate(self.units):
            u.module.register_forward_pre_hook(self._pre_hook(i))
            u.module.register_forward_hook(self._post_hook(i))
        self.graph_memory_bytes = 0 if mode == "train" else graph_memory_bytes
        self._kept: list[list[Tensor]] = []
        with model_mode(model, mode):
            for batch, w in zip(self.batches, self.weights, strict=True):
                before = self.graph_bytes
                grads = self._build(batch, w)
                largest = torch.tensor([float(self.graph_bytes)], dtype=torch.float64, device=self.device)
                dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
                if largest.item() > self.graph_memory_bytes:
                    self.graph_bytes = before
                    del grads
                    break
                self._kept.append(grads)

    # ------------------------------------------------------------------ protocol

    @property
    def local_slice(self) -> slice:
        return self._slice

    @property
    def num_cached_batches(self) -> int:
        """How many batches keep their gradient graph between products (the rest are rebuilt)."""
        return len(self._kept)

    def allreduce(self, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t

    # ------------------------------------------------------------------ gathering

    def _gathered(self, i: int, full: Tensor) -> None:
        """Remember that ``full`` is layer ``i``'s gathered vector, so saved views of it become handles."""
        self._live = {k: v for k, v in self._live.items() if v[1]() is not None}
        self._live[full.untyped_storage().data_ptr()] = (i, weakref.ref(full))
        self.num_gathers += 1

    def _pre_hook(self, i: int):
        def hook(_module, _args) -> None:
            self._enter(i)

        return hook

    def _post_hook(self, i: int):
        def hook(_module, _args, _out) -> None:
            self._exit(i)

        return hook

    def _enter(self, i: int) -> None:
        if not self._active:
            return
        u = self.units[i]
        full = Gather.apply(u.shard, self.group, self.world_size)
        self._gathered(i, full)
        views = [full.narrow(0, o, n).view(s) for o, n, s in zip(u.offsets, u.numels, u.shapes, strict=True)]
        for owner, attr, j, _ in u.slots:
            owner._parameters[attr] = views[j]  # pyright: ignore[reportArgumentType]

    def _exit(self, i: int) -> None:
        if not self._active:
            return
        for owner, attr, _, placeholder in self.units[i].slots:
            owner._parameters[attr] = placeholder

    def _regather(self, i: int) -> Tensor:
        """Layer ``i``'s full flat parameters again (every rank asks in the same order: the same graph)."""
        if self._cache is not None and self._cache[0] == i:
            return self._cache[1]
        u = self.units[i]
        full = u.shard.new_empty(self.world_size * u.m)
        with torch.no_grad():
            all_gather(full, u.shard.detach(), group=self.group)
        self._gathered(i, full)
        self._cache = (i, full)
        return full

    def _pack(self, t: Tensor):
        storage = t.untyped_storage()
        entry = self._live.get(storage.data_ptr())
        if entry is not None:
            full = entry[1]()
            if full is not None and full.untyped_storage().data_ptr() == storage.data_ptr():
                self.handle_bytes += t.numel() * t.element_size()
                return _Handle(entry[0], int(t.storage_offset()), tuple(t.shape), tuple(t.stride()))
        key = (storage.data_ptr(), storage.nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.graph_bytes += key[1]
        return t

    def _unpack(self, packed):
        if isinstance(packed, _Handle):
            return self._regather(packed.unit).as_strided(packed.size, packed.stride, packed.offset)
        return packed

    @contextlib.contextmanager
    def _sharded(self) -> Iterator[None]:
        """Layers gather on entry, saved gathered views become handles."""
        self._active = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._active = False
            self._cache = None

    # ------------------------------------------------------------------ products

    def _build(self, batch, weight: float) -> list[Tensor]:
        """This rank's shard of the weighted gradient of ``batch``'s loss, summed over ranks, with its graph."""
        x, y = batch
        with torch.enable_grad(), self._sharded():
            loss = self.loss_fn(call_model(self.model, x), y) * weight
            grads = torch.autograd.grad(loss, self.shards, create_graph=True, allow_unused=True)
        return [torch.zeros_like(s) if g is None else g for g, s in zip(grads, self.shards, strict=True)]

    def _split(self, v: Tensor) -> list[Tensor]:
        """A local column → one padded ``(m,)`` piece per layer."""
        out, at = [], 0
        for u in self.units:
            piece = v.new_zeros(u.m)
            piece[: u.count] = v[at : at + u.count]
            out.append(piece)
            at += u.count
        return out

    def _matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        out = torch.zeros_like(V)
        columns = [self._split(V[:, j]) for j in range(k)]
        rebuild = len(self._kept) < len(self.batches)
        with model_mode(self.model, self.mode) if rebuild else contextlib.nullcontext():
            for i, (batch, w) in enumerate(zip(self.batches, self.weights, strict=True)):
                grads = self._kept[i] if i < len(self._kept) else self._build(batch, w)
                for j, vs in enumerate(columns):
                    s = torch.stack([(g * v).sum() for g, v in zip(grads, vs, strict=True)]).sum()
                    with self._sharded():
                        hv = torch.autograd.grad(s, self.shards, retain_graph=True, allow_unused=True)
                    parts = [
                        torch.zeros(u.count, dtype=self.dtype, device=self.device) if h is None else h[: u.count]
                        for h, u in zip(hv, self.units, strict=True)
                    ]
                    out[:, j] += torch.cat(parts)
        self.num_matvecs += k
        return out

    def gradient(self) -> Tensor:
        """This rank's shard of the gradient of the mean loss (local entries, operator order)."""
        g = torch.zeros(self.local_dim, dtype=self.dtype, device=self.device)
        with model_mode(self.model, self.mode):
            for i, (batch, w) in enumerate(zip(self.batches, self.weights, strict=True)):
                grads = self._kept[i] if i < len(self._kept) else self._build(batch, w)
                g += torch.cat([gi.detach()[: u.count] for gi, u in zip(grads, self.units, strict=True)])
        return g
