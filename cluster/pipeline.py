"""The exact Hessian-vector product of a model split into stages over a pipeline of workers.

A model that is a sequence of stages (an ``nn.Sequential`` whose children map one
tensor to the next: embedding, blocks, head — :func:`probe.gpt.gpt`) is cut into
contiguous ranges, one per worker (:func:`stage_bounds`, balanced by parameter
count). Each worker holds only its range's parameters and its slice of every
Lanczos vector (the slice of the flat parameter vector its parameters occupy).

``Hv = ∇_θ ⟨∇_θ L, v⟩`` (reverse over reverse, as the single-process
:class:`probe.hessian.HessianOperator`), cut at the stage boundaries into four
sweeps per batch, each stage keeping its graphs in between:

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

Sweeps 1–2 do not depend on ``v``: they run once per batch and product block (or
once for all products while the graphs fit ``graph_memory_bytes``), sweeps 3–4 once
per column. Point-to-point messages carry activation-sized tensors (a shape header,
then the payload); products are summed over data-parallel replicas of the same
stage (``data_group``), inner products over the stages of one pipeline
(``pipe_group``). The same code runs in-process workers under torch.multiprocessing,
Ray actors, gloo or NCCL (with gloo, CUDA activations travel through host memory).

Mode policy as :mod:`probe.model_operator`: each stage builds its sweeps 1–2 inside
``model_mode(stage, mode)``. ``mode="eval"`` (default) uses BatchNorm running
statistics and no dropout; ``mode="train"`` uses batch statistics and live dropout
(each stage draws its own masks in sweep 1, which sweeps 2–4 differentiate), keeps
no graph between products (every product block redraws the masks, as the
single-process operator does) and restores the stage's running statistics after
every build.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from probe.batches import weigh_batches
from probe.model_operator import MODES, SavedBytes, model_mode
from probe.operators import CurvatureOperator

__all__ = ["stage_bounds", "PipelineHessian", "stage_parameter_names"]

_HEADER = 8  # a shape header: ndim then up to 7 sizes


def stage_bounds(model: nn.Sequential, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous child ranges ``[(start, stop), ...]``, one per stage, minimizing the largest stage's parameter count.

    Raises:
        ValueError: when there are fewer children than stages.
    """
    sizes = [sum(p.numel() for p in child.parameters()) for child in model]
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


def stage_parameter_names(model: nn.Sequential, bounds: tuple[int, int]) -> list[str]:
    """The ``state_dict`` names of the parameters in children ``bounds`` (as the full model names them)."""
    a, b = bounds
    return [f"{i}.{n}" for i in range(a, b) for n, _ in model[i].named_parameters()]


def _wire(device: torch.device) -> torch.device:
    """Where messages travel: on the device with NCCL, through host memory with gloo (no CUDA point-to-point)."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _send(t: Tensor, dst: int) -> None:
    wire = _wire(t.device)
    header = torch.zeros(_HEADER, dtype=torch.long)
    header[0] = t.ndim
    header[1 : 1 + t.ndim] = torch.tensor(t.shape, dtype=torch.long)
    dist.send(header.to(wire), dst)
    dist.send(t.detach().to(wire).contiguous(), dst)


def _recv(src: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    wire = _wire(device)
    header = torch.zeros(_HEADER, dtype=torch.long, device=wire)
    dist.recv(header, src)
    shape = header[1 : 1 + int(header[0])].tolist()
    out = torch.empty(shape, dtype=dtype, device=wire)
    dist.recv(out, src)
    return out.to(device)


class _BatchGraph:
    """One batch's sweeps 1–2 on this stage: the leaves and graphs sweeps 3–4 differentiate."""

    def __init__(self, h_leaf, out, c_leaf, grads_h, grads_theta) -> None:
        self.h_leaf, self.out, self.c_leaf = h_leaf, out, c_leaf
        self.grads_h, self.grads_theta = grads_h, grads_theta


class PipelineHessian(CurvatureOperator):
    """Hessian of the mean loss of a stage-split model, on this worker's stage.

    Args:
        stage: this worker's stage (the children ``stage_bounds`` gave it, as one module).
        loss_fn: ``loss_fn(outputs, targets)`` (used on the last stage).
        batches: ``(inputs, targets)`` pairs; every stage of a pipeline gets the same
            batches (stage 0 reads the inputs, the last stage the targets).
        stage_index, ranks: this stage's index and the global ranks of the pipeline's
            stages in order.
        offset, dim: where this stage's parameters start in the full flat vector, and its length.
        total_examples: example count over every data-parallel replica (weights ``n_b/N``).
        weighting, total_tokens: ``"tokens"`` weights batches by their targets ``!= -100``
            over ``total_tokens`` (language models), as :func:`probe.batches.weigh_batches`.
        pipe_group: the group of this pipeline's stages (inner products).
        data_group: the group of this stage's replicas (products summed), or None.
        graph_memory_bytes: keep the sweeps' graphs across products while their saved
            tensors fit (measured with saved-tensor hooks); rebuild them per product otherwise
            (always in train mode).
        mode: ``"eval"`` (default) or ``"train"``; see the module docstring.

    Raises:
        RuntimeError: if ``torch.distributed`` is not initialized.
        ValueError: for an unknown ``mode``.
    """

    def __init__(
        self,
        stage: nn.Module,
        loss_fn,
        batches: Sequence,
        *,
        stage_index: int,
        ranks: Sequence[int],
        offset: int,
        dim: int,
        total_examples: int | None = None,
        pipe_group=None,
        data_group=None,
        graph_memory_bytes: int = 2 << 30,
        weighting: str = "examples",
        total_tokens: int | None = None,
        mode: str = "eval",
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized; call init_process_group first")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
        self.mode = mode
        self.stage, self.loss_fn = stage, loss_fn
        self.params = [p for p in stage.parameters() if p.requires_grad]
        first = self.params[0]
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
        # train mode: no graph kept, so every product block redraws the dropout masks
        self.graph_memory_bytes = 0 if mode == "train" else graph_memory_bytes
        self.graph_bytes = 0  # measured bytes of the kept graphs
        self.peak_graph_bytes = 0  # the largest set of graphs held at once
        self._kept: list[_BatchGraph] | None = None
        self.num_matvecs = 0

    @property
    def local_slice(self) -> slice:
        return self._slice

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

    def _forward_backward(self, batch, weight: float) -> _BatchGraph:
        x, y = batch
        # sweep 1
        h_leaf = x if self.first else _recv(self._prev_rank, self.dtype, self.device).requires_grad_(True)
        out = self.stage(h_leaf)
        if self.last:
            out = weight * self.loss_fn(out, y)
        else:
            _send(out.detach(), self._next_rank)
        # sweep 2
        inputs = self.params if self.first else [h_leaf, *self.params]
        if self.last:
            c_leaf = None
            grads = torch.autograd.grad(out, inputs, create_graph=True, allow_unused=True)
        else:
            c_leaf = _recv(self._next_rank, self.dtype, self.device).requires_grad_(True)
            grads = torch.autograd.grad(out, inputs, grad_outputs=c_leaf, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, inputs, strict=True)]
        grads_h = None if self.first else grads[0]
        if grads_h is not None:
            _send(grads_h.detach(), self._prev_rank)
        return _BatchGraph(None if self.first else h_leaf, out, c_leaf, grads_h, grads[0 if self.first else 1 :])

    def _graphs(self):
        """Every batch's sweeps 1–2: the kept list, or built anew (one batch at a time in train mode)."""
        if self._kept is not None:
            return self._kept
        if self.mode == "train":
            return self._train_graphs()
        counter = SavedBytes()
        with model_mode(self.stage, self.mode), counter.counting():
            graphs = [self._forward_backward(b, w) for b, w in zip(self.batches, self.weights, strict=True)]
        self.peak_graph_bytes = max(self.peak_graph_bytes, counter.bytes)
        if counter.bytes <= self.graph_memory_bytes:
            self._kept, self.graph_bytes = graphs, counter.bytes
        return graphs

    def _train_graphs(self):
        """Train mode: one batch's graph at a time, used by the caller before the next is built.

        Train-mode BatchNorm writes its running statistics in place and autograd saves
        them, so the next batch's forward (or restoring them) would invalidate a graph
        still to be differentiated; each batch's graph is built and consumed inside one
        ``model_mode``, which restores the statistics before the next batch. Every
        stage runs the same order, so the messages pair up as in eval mode.
        """
        for batch, weight in zip(self.batches, self.weights, strict=True):
            counter = SavedBytes()
            with model_mode(self.stage, "train"):
                with counter.counting():
                    graph = self._forward_backward(batch, weight)
                self.peak_graph_bytes = max(self.peak_graph_bytes, counter.bytes)
                yield graph
                del graph

    # -------------------------------------------------------------- sweeps 3–4

    def _column(self, g: _BatchGraph, v: list[Tensor]) -> list[Tensor]:
        # sweep 3: adjoints of (∂L/∂θ_k, g_k) given (v_k, ā_k); outputs ā_{k+1}, h̄_k (via sweep 2), θ̄_k (via sweep 2)
        s = cast(
            Tensor, sum((gt * vk).sum() for gt, vk in zip(g.grads_theta, v, strict=True))
        )  # a stage has parameters
        if not self.first:
            a_bar = _recv(self._prev_rank, self.dtype, self.device)
            s = s + (g.grads_h * a_bar).sum()
        wrt = ([] if self.last else [g.c_leaf]) + ([] if self.first else [g.h_leaf]) + self.params
        adj = torch.autograd.grad(s, wrt, retain_graph=True, allow_unused=True)
        adj = [torch.zeros_like(w) if a is None else a for a, w in zip(adj, wrt, strict=True)]
        if not self.last:
            _send(adj[0], self._next_rank)
            adj = adj[1:]
        h_bar2 = None if self.first else adj[0]
        theta_bar = list(adj[0 if self.first else 1 :])
        # sweep 4: adjoint of this stage's output through the forward graph
        if self.last:
            h_bar = h_bar2
        else:
            out_bar = _recv(self._next_rank, self.dtype, self.device)
            wrt = ([] if self.first else [g.h_leaf]) + self.params
            adj = torch.autograd.grad(g.out, wrt, grad_outputs=out_bar, retain_graph=True, allow_unused=True)
            adj = [torch.zeros_like(w) if a is None else a for a, w in zip(adj, wrt, strict=True)]
            h_bar = None if h_bar2 is None else adj[0] + h_bar2  # h_bar2 is None on the first stage only
            theta_bar = [t + a for t, a in zip(theta_bar, adj[0 if self.first else 1 :], strict=True)]
        if h_bar is not None:  # every stage but the first
            _send(h_bar, self._prev_rank)
        return theta_bar

    def _matmat(self, V: Tensor) -> Tensor:
        shapes = [p.shape for p in self.params]
        numels = [p.numel() for p in self.params]
        out = torch.zeros_like(V)
        with torch.enable_grad():
            for g in self._graphs():
                for j in range(V.shape[1]):
                    v = [c.view(s) for c, s in zip(torch.split(V[:, j], numels), shapes, strict=True)]
                    out[:, j] += torch.cat([t.reshape(-1) for t in self._column(g, v)])
        if self.data_group is not None:
            dist.all_reduce(out, group=self.data_group)
        self.num_matvecs += V.shape[1]
        return out


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


def build_stage(model: nn.Sequential, num_stages: int, stage: int) -> tuple[nn.Module, int, int]:
    """This stage's children as one module (the others are dropped), its parameter offset and the total dim."""
    bounds = stage_bounds(model, num_stages)
    sizes = [sum(p.numel() for p in child.parameters() if p.requires_grad) for child in model]
    a, b = bounds[stage]
    offset, dim = sum(sizes[:a]), sum(sizes)
    return nn.Sequential(*[model[i] for i in range(a, b)]), offset, dim
