"""A data-parallel curvature operator whose vectors are sharded over a process group.

Every worker of a ``torch.distributed`` group holds a replica of the model and its
own slice of the probe data, and stores only a contiguous slice (1/N) of every
vector the estimators handle (the Lanczos basis above all). One product

1. gathers the input block's shards into full vectors (``all_gather``),
2. applies the worker's local operator, built on its data shard with
   ``total_examples`` set to the global example count, so its contribution is
   already weighted by ``n_b / N_global``,
3. sums the contributions over workers and keeps this worker's slice
   (``reduce_scatter_tensor``, on NCCL and gloo alike).

``allreduce`` sums partial inner products, so the estimators in :mod:`probe` run
unchanged: every worker executes the same code in lockstep (SPMD), and only
scalars ever leave the group. Random start vectors are drawn in full from the
shared seed and sliced (see ``CurvatureOperator.random_vectors``), so results do
not depend on the number of workers beyond rounding.
"""

from __future__ import annotations

import time
from itertools import pairwise

import torch
import torch.distributed as dist
from torch import Tensor

from probe.evaluate import Evaluator
from probe.operators import CurvatureOperator

__all__ = ["ShardedOperator", "ShardedEvaluator", "shard_bounds"]

# torch 2.13 renamed the tensor collectives; older releases (e.g. on GPU images) have only the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def shard_bounds(dim: int, world_size: int) -> list[int]:
    """Boundaries of ``world_size`` contiguous shards of ``range(dim)``, sizes differing by at most one."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    base, extra = divmod(dim, world_size)
    bounds = [0]
    for r in range(world_size):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return bounds


class ShardedOperator(CurvatureOperator):
    """Wrap a worker-local operator into one whose vectors are sharded over ``group``.

    Args:
        local: this worker's operator on its data shard (its weights must already
            use the global example count, e.g. ``HessianOperator(...,
            total_examples=N_global)``); its ``matmat`` takes full vectors.
        group: the process group (default: the world group).

    Raises:
        RuntimeError: if ``torch.distributed`` is not initialized.
    """

    def __init__(self, local: CurvatureOperator, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized; call init_process_group first")
        self.local = local
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.dim = local.dim
        self.dtype = local.dtype
        self.device = local.device
        self.bounds = shard_bounds(self.dim, self.world_size)
        self._slice = slice(self.bounds[self.rank], self.bounds[self.rank + 1])
        self.local_dim = self._slice.stop - self._slice.start
        self._max_shard = max(b - a for a, b in pairwise(self.bounds))
        self._even = all(b - a == self._max_shard for a, b in pairwise(self.bounds))
        self.num_collectives = 0
        self.collective_s = 0.0  # wall time inside collectives (includes waiting for slower peers)

    @property
    def local_slice(self) -> slice:
        return self._slice

    @property
    def num_matvecs(self) -> int:
        # every operator it wraps (model operators, PreconditionedOperator) counts its products
        return self.local.num_matvecs  # pyright: ignore[reportAttributeAccessIssue]

    def _collective(self, fn, *args) -> None:
        t0 = time.perf_counter()
        fn(*args, group=self.group)
        self.collective_s += time.perf_counter() - t0
        self.num_collectives += 1

    def allreduce(self, t: Tensor) -> Tensor:
        t = t.clone()
        self._collective(dist.all_reduce, t)
        return t

    def _pad(self, full: Tensor) -> Tensor:
        """``(dim, k)`` → ``(world·max_shard, k)``, each shard at the start of its block (no copy when even)."""
        if self._even:
            return full.contiguous()
        padded = full.new_zeros(self.world_size * self._max_shard, full.shape[1])
        for r, (a, b) in enumerate(pairwise(self.bounds)):
            padded[r * self._max_shard : r * self._max_shard + (b - a)] = full[a:b]
        return padded

    def _unpad(self, padded: Tensor) -> Tensor:
        if self._even:
            return padded
        m = self._max_shard
        return torch.cat([padded[r * m : r * m + (b - a)] for r, (a, b) in enumerate(pairwise(self.bounds))])

    def gather(self, V: Tensor) -> Tensor:
        """Full vectors ``(dim, k)`` from every worker's shard ``(local_dim, k)``."""
        k = V.shape[1]
        mine = V.new_zeros(self._max_shard, k)
        mine[: V.shape[0]] = V
        out = V.new_empty(self.world_size * self._max_shard, k)
        self._collective(_all_gather, out, mine)
        return self._unpad(out)

    def _matmat(self, V: Tensor) -> Tensor:
        full = self.local.matmat(self.gather(V))  # (dim, k): this worker's weighted contribution
        out = full.new_empty(self._max_shard, full.shape[1])
        # Sum over workers and keep this worker's slice: (N−1)/N of the block moves per worker, half an all-reduce.
        self._collective(_reduce_scatter, out, self._pad(full))
        return out[: self.local_dim]


class _SumOverWorkers(torch.autograd.Function):
    """Forward: all-reduce sum. Backward: identity, because the parameter gradient of
    each worker's share is summed over workers by a hook on the parameters (see
    :class:`ShardedEvaluator`), which is where the full gradient must appear."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:  # noqa: D102
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return grad, None


class ShardedEvaluator(Evaluator):
    """An :class:`~probe.evaluate.Evaluator` over a data shard whose results are whole-set means.

    Each worker evaluates its shard (weights use the global example count); losses,
    error rates and gradients are summed over the group, and BatchNorm statistics
    re-estimated at a point are pooled over every worker's batches, so every
    worker sees exactly what one process with all the data would. Arguments as
    :class:`Evaluator` (``mode`` included), plus ``group``; the global count is required:
    ``total_examples``, or ``total_tokens`` with ``weighting="tokens"``. In train mode
    each worker's batches are normalized by their own batch statistics, so the loss is
    that of the batches the shards form (as a training step's would be), not of the
    batches one process would form from the whole set.
    """

    def __init__(self, *args, group: dist.ProcessGroup | None = None, **kwargs) -> None:
        if kwargs.get("weighting", "examples") == "tokens":
            if kwargs.get("total_tokens") is None:
                raise ValueError(
                    "ShardedEvaluator with weighting='tokens' needs total_tokens, the token count over every worker"
                )
        elif kwargs.get("total_examples") is None:
            raise ValueError("ShardedEvaluator needs total_examples, the example count over every worker")
        super().__init__(*args, **kwargs)
        self.group = group

    def _sum(self, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t

    def _bn_buffers(self, flat: Tensor) -> dict[str, Tensor]:
        buffers = super()._bn_buffers(flat)
        # Momentum-None statistics are means over batches: pool them over every worker's batches.
        for name, m in self.model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                prefix = f"{name}." if name else ""
                n = buffers[prefix + "num_batches_tracked"].to(buffers[prefix + "running_mean"].dtype)
                total = self._sum(n.reshape(1))
                for stat in ("running_mean", "running_var"):
                    buffers[prefix + stat] = self._sum(buffers[prefix + stat] * n) / total
                buffers[prefix + "num_batches_tracked"] = total.to(torch.long).reshape(())
        return buffers

    def _evaluate(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        if flat.requires_grad:
            flat = flat.view_as(flat)  # a fresh alias per call, so hooks never pile up
            flat.register_hook(self._sum)
        loss, err = super()._evaluate(flat)
        both = _SumOverWorkers.apply(torch.stack([loss, err]), self.group)
        return both[0], both[1]

    @torch.no_grad()
    def losses(self, points: Tensor) -> tuple[Tensor, Tensor]:
        if self.pointwise:  # BatchNorm re-estimation or train mode: per point through _evaluate, already summed
            return super().losses(points)
        losses, errors = super().losses(points)
        both = self._sum(torch.stack([losses, errors.nan_to_num(0.0)]).to(self.device))
        return both[0].cpu(), both[1].cpu() if self.classification else errors
