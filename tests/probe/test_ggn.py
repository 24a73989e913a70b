"""GGNOperator (probe/ggn.py) against the dense ``Jᵀ H_L J`` in float64.

``J`` comes from ``torch.func.jacrev`` of the outputs over all probe examples and
``H_L`` from ``torch.func.hessian`` of the mean loss with respect to the outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from probe.ggn import GGNOperator
from probe.hessian import HessianOperator

NUM_EXAMPLES = 150
SIZES = (40, 110)  # unequal batches
TOL = 1e-10


def mse_onehot(outputs, targets):
    """Mean squared error against one-hot labels (mean over examples and classes)."""
    return F.mse_loss(outputs, F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype))


LOSSES = {"cross_entropy": F.cross_entropy, "mse": mse_onehot}


def split(x, y):
    a = SIZES[0]
    return [(x[:a], y[:a]), (x[a:], y[a:])]


def dense_ggn(model, loss_fn, x, y) -> torch.Tensor:
    """``Jᵀ H_L J`` with ``J = ∂ vec(outputs) / ∂θ`` and ``H_L = ∂² loss / ∂ vec(outputs)²``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    numels = [p.numel() for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def outputs(theta):
        chunks = torch.split(theta, numels)
        return functional_call(
            model, {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}, (x,)
        ).reshape(-1)

    z0 = outputs(theta0).detach()
    J = jacrev(outputs)(theta0)  # (N·C, P)
    H_L = hessian(lambda z: loss_fn(z.view(len(y), -1), y))(z0)  # (N·C, N·C)
    return J.T @ H_L @ J


def gaussian_block(dim, k, seed):
    return torch.randn(dim, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def densify(op) -> torch.Tensor:
    return op @ torch.eye(op.dim, dtype=op.dtype)


@pytest.fixture(scope="module")
def probe_set(digits64):
    return digits64[0][:NUM_EXAMPLES], digits64[1][:NUM_EXAMPLES]


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_matches_dense_jt_hl_j(trained_mlp, probe_set, relative_error, loss):
    x, y = probe_set
    G = GGNOperator(trained_mlp, LOSSES[loss], split(x, y))
    reference = dense_ggn(trained_mlp, LOSSES[loss], x, y)
    V = gaussian_block(G.dim, 5, seed=0)
    assert relative_error(G @ V, reference @ V) < TOL


def test_psd_for_cross_entropy_where_hessian_is_not(trained_mlp, probe_set):
    batches = split(*probe_set)
    G = densify(GGNOperator(trained_mlp, F.cross_entropy, batches))
    eig_g = torch.linalg.eigvalsh((G + G.T) / 2)
    assert eig_g[0].item() >= -1e-10
    assert eig_g[-1].item() > 1e-2  # not trivially zero
    # The Hessian at the same point is indefinite, so PSD is a property of the GGN.
    H = densify(HessianOperator(trained_mlp, F.cross_entropy, batches))
    assert torch.linalg.eigvalsh((H + H.T) / 2)[0].item() < -1e-2  # measured -0.13


def test_differs_from_hessian_for_nonlinear_model(trained_mlp, probe_set, relative_error):
    batches = split(*probe_set)
    G = GGNOperator(trained_mlp, mse_onehot, batches)
    H = HessianOperator(trained_mlp, mse_onehot, batches)
    V = gaussian_block(G.dim, 3, seed=1)
    assert relative_error(G @ V, H @ V) > 1e-3


def test_equals_hessian_for_linear_model_with_mse(probe_set, seeded_model):
    x, y = probe_set
    model = seeded_model(lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), seed=3)
    batches = split(x, y)
    G = densify(GGNOperator(model, mse_onehot, batches))
    H = densify(HessianOperator(model, mse_onehot, batches))

    # Closed form for L = 1/(N·C) Σ_i ||W x_i + b - t_i||², θ = (W row-major, b):
    # ∂²L/∂W∂W = 2/(NC) I_C ⊗ XᵀX, ∂²L/∂W∂b = 2/(NC) I_C ⊗ Xᵀ1, ∂²L/∂b∂b = 2/C I_C.
    n, c = len(y), 10
    eye = torch.eye(c, dtype=torch.float64)
    ww = torch.kron(eye, x.T @ x)
    wb = torch.kron(eye, x.sum(0).unsqueeze(1))  # (C·64, C)
    exact = (2 / (n * c)) * torch.cat([torch.cat([ww, wb], 1), torch.cat([wb.T, n * eye], 1)], 0)

    assert G.shape == H.shape == exact.shape == (650, 650)
    assert ((G - exact).norm() / exact.norm()).item() < 1e-12
    assert ((H - exact).norm() / exact.norm()).item() < 1e-12
