"""The exact Hessian-vector product of a model split into stages over a pipeline of workers.

A model that is a sequence of stages (an ``nn.Sequential`` of children run one
after the other: embedding, blocks, head — :func:`probe.gpt.gpt`, or pieces that
also take the batch inputs, see :mod:`cluster.pipeline_layout`) is cut into
contiguous ranges, one per worker (:func:`stage_bounds`, balanced by the
parameters each stage multiplies with, or by those it holds). Each worker holds
only its range's parameters and its slice of every Lanczos vector; a parameter
shared with an earlier stage (a head tied to the embedding) is *borrowed*: the
owner lends its slice of each vector at the start of a product and adds the
borrower's contribution back at the end (:func:`stage_layout`).

``Hv = ∇_θ ⟨∇_θ L, v⟩`` (reverse over reverse, as the single-process
:class:`probe.hessian.HessianOperator`), cut at the stage boundaries into four
sweeps per micro-batch, each stage keeping its graphs in between:

1. forward ``0 → K−1``: activations ``h_{k+1} = F_k(h_k; θ_k)``; the last stage adds
   the weighted loss;
2. backward ``K−1 → 0`` with ``create_graph``: cotangents ``g_k = ∂L/∂h_k`` go
   down, each stage keeps ``∂L/∂θ_k`` as a differentiable function of its input
   activation and incoming cotangent;
3. forward ``0 → K−1`` (the reverse of 2): stage ``k`` differentiates
   ``⟨∂L/∂θ_k, v_k⟩ + ⟨g_k, ā_k⟩`` (``ā_k`` received from stage ``k−1``) with respect
   to its incoming cotangent (sent on as ``ā_{k+1}``), its input activation and its
   parameters;
4. backward ``K−1 → 0`` (the reverse of 1): adjoints of the activations travel
   down through the forward graphs and complete each stage's ``(Hv)_k``.

Micro-batches and schedules. Each probe batch is cut along its first dimension
into ``micro_batches`` micro-batches, each weighted exactly by its share of the
examples (or of the counted tokens under ``weighting="tokens"``), so the operator
is unchanged. (Under ``weighting="examples"`` a batch whose integer targets hold
ignored entries, ``-100``, stays whole: were its loss a token mean, the example
shares would not reproduce it; use ``weighting="tokens"`` for language models.)
``schedule="overlap"`` (default) runs the sweeps GPipe-style: sweep
1 for every micro-batch of a batch, then sweep 2 for all of them in reverse; then
sweep 3 for every (column, micro-batch) of the block in order and sweep 4 for all
of them in reverse, so stage ``k`` works on one item while stage ``k+1`` works on
the previous one. Sends are non-blocking (:class:`cluster.pipeline_comm.Outbox`),
receives blocking. ``schedule="sequential"`` runs one micro-batch (and one column)
through all stages at a time, as before micro-batching: only one stage computes at
any moment.

Memory per stage. Sweeps 1–2 do not depend on ``v``: while the graphs fit
``graph_memory_bytes`` (every stage of the pipeline must agree; they decide
together) they are kept and built once for all products; otherwise one probe
batch's micro-batch graphs are held at a time and rebuilt on every product. On
top of the graphs, the overlap schedule keeps, for a block of ``k`` columns, ``k``
activation-sized sweep-3 adjoints per micro-batch (``k`` times one batch's
stage-input activations) and the sends still in flight (at most as many).

Point-to-point messages carry activation-sized tensors; products are summed over
data-parallel replicas of the same stage (``data_group``), inner products over the
stages of one pipeline (``pipe_group``). The same code runs in-process workers
under torch.multiprocessing, Ray actors, gloo or NCCL (with gloo, CUDA activations
travel through host memory).

Mode policy as :mod:`probe.model_operator`: each stage builds its sweeps 1–2 inside
``model_mode(stage, mode)``. ``mode="eval"`` (default) uses BatchNorm running
statistics and no dropout; ``mode="train"`` uses batch statistics and live dropout
(each stage draws its own masks in sweep 1, which sweeps 2–4 differentiate), keeps
no graph between products (every product block redraws the masks, as the
single-process operator does), builds and consumes each batch's graphs inside one
``model_mode`` and restores the stage's running statistics after it. In train mode
batch statistics are those of a micro-batch, so ``micro_batches`` defaults to 1
there (a larger count changes the operator of a model with BatchNorm).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cluster.pipeline_comm import Outbox, recv, recv_shaped
from cluster.pipeline_layout import (
    StagedSequential,
    StageLayout,
    build_stage,
    run_children,
    split_batch_rows,
    stage_bounds,
    stage_layout,
    stage_parameter_names,
)
from probe.batches import IGNORE_INDEX, outputs_of, weigh_batches
from probe.model_operator import MODES, SavedBytes, model_mode
from probe.operators import CurvatureOperator

__all__ = [
    "PipelineHessian",
    "SCHEDULES",
    "StageLayout",
    "StagedSequential",
    "build_stage",
    "grid_groups",
    "stage_bounds",
    "stage_layout",
    "stage_parameter_names",
]

SCHEDULES = ("overlap", "sequential")
DEFAULT_MICRO_BATCHES = 4


class _Graph:
    """One micro-batch's sweeps 1–2 on this stage: the leaves and graphs sweeps 3–4 differentiate."""

    __slots__ = ("h_leaf", "out", "c_leaf", "grads_h", "grads_theta")

    def __init__(self, h_leaf, out, c_leaf, grads_h, grads_theta) -> None:
        self.h_leaf, self.out, self.c_leaf = h_leaf, out, c_leaf
        self.grads_h, self.grads_theta = grads_h, grads_theta


def _or_zeros(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


class PipelineHessian(CurvatureOperator):
    """Hessian of the mean loss of a stage-split model, on this worker's stage.

    Args:
        stage: this worker's stage (its children as one module; :func:`build_stage`).
        loss_fn: ``loss_fn(outputs, targets)`` (used on the last stage).
        batches: ``(inputs, targets)`` pairs; every stage of a pipeline gets the same
            batches (the first stage and ``takes_inputs`` children read the inputs, the
            last stage the targets).
        stage_index, ranks: this stage's index and the global ranks of the pipeline's
            stages in order.
        layout: this stage's :class:`StageLayout` (owned and borrowed parameters, offset,
            dim). Default: the ``pipeline_layout`` :func:`build_stage` attached to the
            module, else every parameter of ``stage`` is owned and ``offset``/``dim`` must be given.
        offset, dim: where this stage's parameters start in the full flat vector, and its
            length (checked against ``layout`` when both are given).
        total_examples: example count over every data-parallel replica (weights ``n_b/N``).
        weighting, total_tokens: ``"tokens"`` weights batches by their targets ``!= -100``
            over ``total_tokens`` (language models), as :func:`probe.batches.weigh_batches`.
        pipe_group: the group of this pipeline's stages (inner products, and the stages'
            joint decision to keep graphs); required when there are data replicas.
        data_group: the group of this stage's replicas (products summed), or None.
        graph_memory_bytes: keep the sweeps' graphs across products while their saved
            tensors fit on every stage (measured with saved-tensor hooks); rebuild them per
            product otherwise (always in train mode).
        mode: ``"eval"`` (default) or ``"train"``; see the module docstring.
        schedule: ``"overlap"`` (default, GPipe-style) or ``"sequential"``.
        micro_batches: micro-batches per probe batch (fewer when a batch has fewer
            examples). Default: ``DEFAULT_MICRO_BATCHES`` (4) for the overlap schedule in
            eval mode, 1 otherwise. Measured (``bench/bench_pipeline.py --compare``: GPT-2 small,
            one batch of 8 × 128 tokens, float32, 2 compute-balanced stages of 1 thread on a
            shared 2-core x86_64 VM, torch 2.13.0+cpu; docs/benchmarks.md): 0.77-0.78× the
            sequential schedule's time per product at 2 and 4 micro-batches, 0.84 at 8, where
            smaller matrix products cost more CPU time than the smaller bubble saves. 4 keeps the
            bubble ``(K-1)/(M+K-1)`` at 20% for 2 stages on devices where micro-batches stay efficient.

    Raises:
        RuntimeError: if ``torch.distributed`` is not initialized.
        ValueError: for an unknown ``mode`` or ``schedule``, ``micro_batches < 1``, or
            ``offset``/``dim`` that contradict ``layout`` (or are missing without one).
    """

    def __init__(
        self,
        stage: nn.Module,
        loss_fn,
        batches: Sequence,
        *,
        stage_index: int,
        ranks: Sequence[int],
        offset: int | None = None,
        dim: int | None = None,
        layout: StageLayout | None = None,
        total_examples: int | None = None,
        pipe_group=None,
        data_group=None,
        graph_memory_bytes: int = 2 << 30,
        weighting: str = "examples",
        total_tokens: int | None = None,
        mode: str = "eval",
        schedule: str = "overlap",
        micro_batches: int | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized; call init_process_group first")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got schedule={schedule!r}")
        if micro_batches is not None and micro_batches < 1:
            raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
        self.mode, self.schedule = mode, schedule
        self.stage, self.loss_fn = stage, loss_fn
        self._children = list(stage) if isinstance(stage, nn.Sequential) else [stage]
        layout = layout if layout is not None else getattr(stage, "pipeline_layout", None)
        self.layout = layout
        if layout is not None:
            if (offset is not None and offset != layout.offset) or (dim is not None and dim != layout.total_dim):
                raise ValueError(
                    f"offset={offset}, dim={dim} contradict the stage layout (offset {layout.offset}, "
                    f"dim {layout.total_dim}); pass the layout's values or leave them out"
                )
            named = dict(stage.named_parameters(remove_duplicate=False))
            self.params = [named[layout.local_name(n)] for n in layout.names]
            self._borrowed = [named[b.name] for b in layout.borrowed]
            offset, dim = layout.offset, layout.total_dim
        else:
            if offset is None or dim is None:
                raise ValueError("pass offset and dim, or a layout (see cluster.pipeline.stage_layout)")
            self.params = [p for p in stage.parameters() if p.requires_grad]
            self._borrowed = []
        self._ext = self.params + self._borrowed  # what sweeps differentiate: owned, then borrowed
        self._shapes = [p.shape for p in self._ext]
        self._numels = [p.numel() for p in self._ext]
        first = self._ext[0]
        self.dtype, self.device = first.dtype, first.device
        self.k, self.ranks = stage_index, list(ranks)
        self.first, self.last = stage_index == 0, stage_index == len(ranks) - 1
        self.local_dim = sum(p.numel() for p in self.params)
        self.dim = dim
        self._slice = slice(offset, offset + self.local_dim)
        self.pipe_group, self.data_group = pipe_group, data_group
        w = weigh_batches(
            batches,
            self.dtype,
            self.device,
            weighting=weighting,
            total_examples=total_examples,
            total_tokens=total_tokens,
        )
        self.batches, self.sizes, self.weights = w.batches, w.sizes, w.weights
        if micro_batches is None:
            micro_batches = DEFAULT_MICRO_BATCHES if schedule == "overlap" and mode == "eval" else 1
        self.micro_batches = micro_batches
        total = {"total_tokens" if weighting == "tokens" else "total_examples": w.total}
        self._groups: list[list[tuple[Any, float]]] = []  # per probe batch: its weighted micro-batches
        for batch, weight in zip(w.batches, w.weights, strict=True):
            micro = split_batch_rows(batch, 1 if self._whole(batch[1], weighting) else micro_batches)
            if len(micro) == 1:
                self._groups.append([(batch, weight)])
            else:
                mw = weigh_batches(micro, self.dtype, self.device, weighting=weighting, **total)
                self._groups.append(list(zip(mw.batches, mw.weights, strict=True)))
        # train mode: no graph kept, so every product block redraws the dropout masks
        self.graph_memory_bytes = 0 if mode == "train" else graph_memory_bytes
        self.graph_bytes = 0  # measured bytes of the kept graphs
        self.peak_graph_bytes = 0  # the largest set of graphs held at once
        self._kept: list[list[_Graph]] = []  # graphs of the first probe batches, while they fit
        self._closed = False  # a batch did not fit: keep no more
        self._outbox = Outbox()
        self.num_matvecs = 0

    @staticmethod
    def _whole(targets: Any, weighting: str) -> bool:
        """Whether a batch stays whole: under example weighting, integer targets with ignored entries.

        A token-mean loss over such a batch is not the example-weighted mean of its pieces'
        token means, while a per-example mean loss is: without knowing which, the batch is
        not cut. (Under token weighting every cut is exact.)
        """
        return (
            weighting == "examples"
            and isinstance(targets, Tensor)
            and not (targets.is_floating_point() or targets.is_complex())
            and bool((targets == IGNORE_INDEX).any())
        )

    @property
    def local_slice(self) -> slice:
        return self._slice

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches over all probe batches."""
        return sum(len(g) for g in self._groups)

    def allreduce(self, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, group=self.pipe_group)
        return t

    @property
    def _prev_rank(self) -> int:
        """Global rank of the previous stage; only stages after the first have one."""
        if self.first:
            raise RuntimeError("the first pipeline stage has no previous stage")
        return self.ranks[self.k - 1]

    @property
    def _next_rank(self) -> int:
        """Global rank of the next stage; only stages before the last have one."""
        if self.last:
            raise RuntimeError("the last pipeline stage has no next stage")
        return self.ranks[self.k + 1]

    # -------------------------------------------------------------- sweeps 1–2

    def _forward(self, batch, weight: float) -> tuple[Tensor | None, Tensor]:
        """Sweep 1 for one micro-batch: ``(input leaf, output)``; the last stage's output is its weighted loss."""
        x, y = batch
        h = None if self.first else recv(self._prev_rank, self.dtype, self.device, "forward").requires_grad_(True)
        out = run_children(self._children, h, x, first=self.first)
        if self.last:
            return h, weight * self.loss_fn(outputs_of(out), y)
        self._outbox.send(out, self._next_rank, "forward", header=True)
        return h, out

    def _backward(self, h: Tensor | None, out: Tensor) -> _Graph:
        """Sweep 2 for one micro-batch (given its sweep 1): ``∂L/∂(h, θ)`` with their graphs."""
        wrt = ([] if h is None else [h]) + self._ext
        if self.last:
            c = None
            grads = torch.autograd.grad(out, wrt, create_graph=True, allow_unused=True)
        else:
            c = recv_shaped(self._next_rank, out.shape, self.dtype, self.device, "cotangent").requires_grad_(True)
            grads = torch.autograd.grad(out, wrt, grad_outputs=c, create_graph=True, allow_unused=True)
        grads = [_or_zeros(g, p) for g, p in zip(grads, wrt, strict=True)]
        grads_h = None if h is None else grads[0]
        if grads_h is not None:
            self._outbox.send(grads_h, self._prev_rank, "cotangent")
        return _Graph(h, out, c, grads_h, grads[0 if h is None else 1 :])

    def _build(self, group: list[tuple[Any, float]]) -> list[_Graph]:
        """Sweeps 1–2 for one probe batch's micro-batches, in this operator's schedule."""
        if self.schedule == "sequential":
            return [self._backward(*self._forward(b, w)) for b, w in group]
        forwards = [self._forward(b, w) for b, w in group]
        return [self._backward(h, out) for h, out in reversed(forwards)][::-1]

    def _may_keep(self, nbytes: int) -> bool:
        """Whether every stage of the pipeline can keep one more batch's graphs (a collective)."""
        if self.graph_memory_bytes <= 0 or self._closed:
            return False
        fits = torch.tensor([int(self.graph_bytes + nbytes <= self.graph_memory_bytes)])
        if dist.get_backend(self.pipe_group) == "nccl":
            fits = fits.to(self.device)
        dist.all_reduce(fits, op=dist.ReduceOp.MIN, group=self.pipe_group)
        self._closed = not bool(fits.item())
        return not self._closed

    # -------------------------------------------------------------- sweeps 3–4

    def _add(self, row: Tensor, adjoints: Sequence[Tensor | None]) -> None:
        """Add per-parameter adjoints into one output row (``None``: the parameter is unused)."""
        start = 0
        for a, n, shape in zip(adjoints, self._numels, self._shapes, strict=True):
            if a is not None:
                row[start : start + n].view(shape).add_(a)
            start += n

    def _sweep3(self, g: _Graph, v: list[Tensor], row: Tensor) -> Tensor | None:
        """Adjoints of ``(∂L/∂θ_k, g_k)`` given ``(v_k, ā_k)``: sends ``ā_{k+1}``, adds ``θ̄`` into ``row``,
        returns this sweep's part of ``h̄_k`` (None on the first stage)."""
        s = sum((gt * vk).sum() for gt, vk in zip(g.grads_theta, v, strict=True))
        if g.h_leaf is not None:
            a_bar = recv_shaped(self._prev_rank, g.h_leaf.shape, self.dtype, self.device, "adjoint")
            s = s + (g.grads_h * a_bar).sum()
        wrt = ([] if g.c_leaf is None else [g.c_leaf]) + ([] if g.h_leaf is None else [g.h_leaf]) + self._ext
        adj = list(torch.autograd.grad(s, wrt, retain_graph=True, allow_unused=True))  # type: ignore[arg-type]
        if g.c_leaf is not None:
            self._outbox.send(_or_zeros(adj.pop(0), g.c_leaf), self._next_rank, "adjoint")
        h_bar = None if g.h_leaf is None else _or_zeros(adj.pop(0), g.h_leaf)
        self._add(row, adj)
        return h_bar

    def _sweep4(self, g: _Graph, h_bar: Tensor | None, row: Tensor) -> None:
        """The adjoint of this stage's output through its forward graph: completes ``θ̄`` and ``h̄_k`` (sent down)."""
        if not self.last:
            out_bar = recv_shaped(self._next_rank, g.out.shape, self.dtype, self.device, "output_adjoint")
            wrt = ([] if g.h_leaf is None else [g.h_leaf]) + self._ext
            adj = list(torch.autograd.grad(g.out, wrt, grad_outputs=out_bar, retain_graph=True, allow_unused=True))
            if g.h_leaf is not None:
                through = adj.pop(0)
                if through is not None:
                    h_bar = through if h_bar is None else through + h_bar
            self._add(row, adj)
        if h_bar is not None:  # every stage but the first
            self._outbox.send(h_bar, self._prev_rank, "output_adjoint")

    def _columns(self, graphs: list[_Graph], vs: list[list[Tensor]], out_t: Tensor) -> None:
        """Sweeps 3–4 for every column of the block over ``graphs``, in this operator's schedule."""
        if self.schedule == "sequential":
            for g in graphs:
                for j, v in enumerate(vs):
                    self._sweep4(g, self._sweep3(g, v, out_t[j]), out_t[j])
            return
        items = [(j, g) for j in range(len(vs)) for g in graphs]
        h_bars = [self._sweep3(g, vs[j], out_t[j]) for j, g in items]
        for (j, g), h_bar in zip(reversed(items), reversed(h_bars), strict=True):
            self._sweep4(g, h_bar, out_t[j])

    # -------------------------------------------------------------- products

    def _lend(self, V: Tensor) -> Tensor:
        """``V`` with the rows of borrowed parameters appended (received from their owners)."""
        if self.layout is None:
            return V
        for e in self.layout.lent:
            rows = V[e.owner_offset : e.owner_offset + e.numel]
            self._outbox.send(rows, self.ranks[e.borrower], "lend")
        got = [
            recv_shaped(self.ranks[b.owner], (b.numel, V.shape[1]), V.dtype, V.device, "lend")
            for b in self.layout.borrowed
        ]
        return torch.cat([V, *got]) if got else V

    def _give_back(self, out_t: Tensor) -> None:
        """Send borrowed parameters' products to their owners; add lent ones' back in (columns of ``out_t``)."""
        if self.layout is None:
            return
        start = self.local_dim
        for b in self.layout.borrowed:
            self._outbox.send(out_t[:, start : start + b.numel], self.ranks[b.owner], "give_back")
            start += b.numel
        for e in self.layout.lent:
            back = recv_shaped(
                self.ranks[e.borrower], (out_t.shape[0], e.numel), out_t.dtype, out_t.device, "give_back"
            )
            out_t[:, e.owner_offset : e.owner_offset + e.numel] += back

    def _matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        Vt = self._lend(V).T.contiguous()  # (k, ext): one row per column
        vs = [
            [c.view(s) for c, s in zip(torch.split(Vt[j], self._numels), self._shapes, strict=True)] for j in range(k)
        ]
        out_t = torch.zeros_like(Vt)
        with torch.enable_grad():
            # batch by batch, kept or not, so every product adds its terms in the same order (bitwise reproducible)
            if len(self._kept) == len(self._groups):
                for graphs in self._kept:
                    self._columns(graphs, vs, out_t)
            else:
                for i, group in enumerate(self._groups):
                    if i < len(self._kept):
                        self._columns(self._kept[i], vs, out_t)
                        continue
                    counter = SavedBytes()
                    with model_mode(self.stage, self.mode):
                        with counter.counting():
                            graphs = self._build(group)
                        self.peak_graph_bytes = max(self.peak_graph_bytes, self.graph_bytes + counter.bytes)
                        if i == len(self._kept) and self._may_keep(counter.bytes):
                            self._kept.append(graphs)
                            self.graph_bytes += counter.bytes
                        self._columns(graphs, vs, out_t)
                        del graphs  # in train mode: consumed inside its model_mode
        self._give_back(out_t)
        self._outbox.flush()
        out = out_t[:, : self.local_dim].contiguous()
        if self.data_group is not None:
            dist.all_reduce(out, group=self.data_group)
        self.num_matvecs += k
        return out.T


# ---------------------------------------------------------------- groups of workers without Ray


def grid_groups(num_stages: int, num_replicas: int) -> tuple[list[int], object, object, int, int]:
    """For this rank of a ``num_replicas × num_stages`` grid (rank = replica·stages + stage):
    ``(pipeline ranks, pipe_group, data_group, stage, replica)``.

    Every rank must call this (``new_group`` is collective), in the same order.
    """
    rank = dist.get_rank()
    stage, replica = rank % num_stages, rank // num_stages
    pipe_group = data_group = None
    for r in range(num_replicas):
        g = dist.new_group([r * num_stages + s for s in range(num_stages)])
        if r == replica:
            pipe_group = g
    for s in range(num_stages):
        g = dist.new_group([r * num_stages + s for r in range(num_replicas)])
        if s == stage:
            data_group = g
    ranks = [replica * num_stages + s for s in range(num_stages)]
    return ranks, pipe_group, data_group if num_replicas > 1 else None, stage, replica
