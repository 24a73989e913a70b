"""The Hessian of the mean loss over a fixed probe set, as an operator on flat vectors.

``H = ∇²_θ L(θ)`` with ``L`` the example-weighted mean loss (see
:mod:`probe.model_operator`). Products are exact (no finite differences): double
backward (Pearlmutter 1994, "Fast exact multiplication by the Hessian") through
each batch's gradient graph, built once and reused while it fits the memory budget.
"""

from __future__ import annotations

import torch
from torch import Tensor

from probe.batches import call_model
from probe.model_operator import Batch, ModelOperator

__all__ = ["HessianOperator"]


class HessianOperator(ModelOperator):
    """Exact Hessian of the mean loss. Arguments as in :class:`probe.model_operator.ModelOperator`.

    Example:
        A least-squares loss ``½·mean‖Wx − y‖²`` over one input ``x = (1, 2)`` has the
        Hessian ``x xᵀ = [[1, 2], [2, 4]]`` in the weights of ``W`` (one output):

        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x, y = torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
        >>> H = HessianOperator(model, lambda out, target: 0.5 * (out - target).pow(2).sum(), [(x, y)])
        >>> H.dim
        2
        >>> H @ torch.tensor([1.0, 0.0], dtype=torch.float64)
        tensor([1., 2.], dtype=torch.float64)
    """

    def _build(self, batch: Batch, weight: float) -> tuple[Tensor, ...]:
        x, y = batch
        loss = self.loss_fn(call_model(self.model, x), y) * weight
        return torch.autograd.grad(loss, self.params, create_graph=True)

    def _apply(self, grads: tuple[Tensor, ...], vs: list[Tensor], k: int) -> tuple[Tensor, ...]:
        return self._grad(grads, self.params, vs, k)
