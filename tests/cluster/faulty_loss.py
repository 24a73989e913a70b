"""Loss factories for failure tests (importable as ``faulty_loss:NAME`` in specs)."""

from __future__ import annotations

import torch.nn.functional as F


def nan_curvature():
    """Cross-entropy plus ``sqrt(Σ (z − z.detach())²)``, which is 0: the loss is finite, but the
    derivative of √ at 0 is infinite and times the zero inner derivative gives NaN in every
    gradient and Hessian-vector product."""

    def loss(outputs, targets):
        return F.cross_entropy(outputs, targets) + (outputs - outputs.detach()).pow(2).sum().sqrt()

    return loss
