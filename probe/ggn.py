"""The generalized Gauss-Newton matrix ``G = Jᵀ H_L J`` (Schraudolph 2002).

``J`` is the Jacobian of the model outputs with respect to the parameters and
``H_L`` the Hessian of the loss with respect to the outputs, both per example and
weighted as in :mod:`probe.model_operator`. ``G`` drops the term of the Hessian
that involves the second derivatives of the network; it is positive semi-definite
whenever the loss is convex in the outputs (cross-entropy, MSE).

A product runs three passes through kept graphs: ``Jv`` by the double-backward
trick (differentiate ``u ↦ Jᵀu`` with respect to ``u``), ``H_L(Jv)`` by double
backward through the loss on the outputs, and ``Jᵀ(·)`` by one backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from probe.batches import call_model
from probe.model_operator import Batch, ModelOperator

__all__ = ["GGNOperator"]


@dataclass
class _GGNState:
    outputs: Tensor  # model outputs, graph to the parameters
    dummy: Tensor  # u, shaped like outputs
    jt_dummy: tuple[Tensor, ...]  # Jᵀu, a graph linear in u
    out_leaf: Tensor  # outputs detached, as a leaf
    loss_grad: tuple[Tensor, ...]  # ∂ℓ/∂outputs, graph to out_leaf


class GGNOperator(ModelOperator):
    """Generalized Gauss-Newton matrix of the mean loss. Arguments as in :class:`ModelOperator`."""

    def _build(self, batch: Batch, weight: float) -> _GGNState:
        x, y = batch
        outputs = call_model(self.model, x)
        dummy = torch.zeros_like(outputs, requires_grad=True)
        jt_dummy = torch.autograd.grad(outputs, self.params, grad_outputs=dummy, create_graph=True)
        out_leaf = outputs.detach().requires_grad_(True)
        loss = self.loss_fn(out_leaf, y) * weight
        loss_grad = torch.autograd.grad(loss, out_leaf, create_graph=True)
        return _GGNState(outputs, dummy, jt_dummy, out_leaf, loss_grad)

    def _apply(self, s: _GGNState, vs: list[Tensor], k: int) -> tuple[Tensor, ...]:
        (jv,) = self._grad(s.jt_dummy, [s.dummy], vs, k)  # (k, *outputs.shape)
        (hjv,) = self._grad(s.loss_grad, [s.out_leaf], [jv], k)
        return self._grad([s.outputs], self.params, [hjv], k)
