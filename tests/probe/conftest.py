"""Fixtures for the estimator tests (Lanczos, eigenvalues, trace, SLQ).

Two kinds of exact references:

- ``known_spectrum(eigenvalues, seed)``: a dense float64 matrix ``Q diag(λ) Qᵀ``
  with a seeded random orthogonal ``Q``, so every spectral quantity is known in
  closed form;
- ``mlp_problem`` / ``cnn_problem``: a digits MLP (2,410 parameters) and the small
  digits CNN (838 parameters), each trained a few dozen full-batch GD steps from a
  fixed seed, with the Hessian of the mean cross-entropy over a fixed probe set
  computed densely by ``torch.func.hessian`` and decomposed by ``torch.linalg.eigh``
  in float64.

The float32 model holds exactly the float64 model's weights rounded to float32
(and the float64 model is then reset to those rounded weights), so one float64
reference serves both precisions. The probe set is split into two batches of
unequal size, so the operators' exact weighting is part of every comparison.

Fixture names differ from those of the operator tests in ``tests/conftest.py``
so that neither set shadows the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian

from cluster.data import digits_tensors
from probe.hessian import HessianOperator
from probe.models import digits_cnn, digits_mlp
from probe.operators import DenseOperator

MLP_HIDDEN = 24  # digits_mlp(hidden=24): 64·24+24 + 24·24+24 + 24·10+10 = 2,410 parameters
MLP_EXAMPLES = 256
CNN_EXAMPLES = 128  # torch.func.hessian through convolutions is slow on CPU; keep the probe set small
TRAIN_STEPS = 40  # full-batch GD steps: away from initialisation, not at a minimum (negative eigenvalues remain)
TRAIN_LR = 0.5


def orthogonal(n: int, seed: int) -> Tensor:
    """A random ``(n, n)`` float64 orthogonal matrix drawn from ``seed`` (QR of a Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


@dataclass(frozen=True)
class KnownSpectrum:
    """A dense symmetric matrix with prescribed eigenvalues ``λ`` and eigenvectors ``Q``."""

    eigenvalues: Tensor  # (n,) as given
    eigenvectors: Tensor  # (n, n) columns
    matrix: Tensor  # (n, n) = Q diag(λ) Qᵀ, symmetrized
    op: DenseOperator

    def quadratic_form(self, v: Tensor, power: int) -> Tensor:
        """``vᵀ A^power v`` for each column of ``v`` (``(n, k)``), exactly from the eigendecomposition."""
        c = self.eigenvectors.T @ v  # (n, k)
        return ((c**2) * self.eigenvalues[:, None] ** power).sum(0)


@pytest.fixture(scope="session")
def known_spectrum() -> Callable[[Tensor, int], KnownSpectrum]:
    """``known_spectrum(eigenvalues, seed=0)``: a float64 :class:`KnownSpectrum` with a seeded random basis."""

    def make(eigenvalues: Tensor, seed: int = 0) -> KnownSpectrum:
        lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
        q = orthogonal(lam.numel(), seed)
        a = (q * lam) @ q.T
        a = (a + a.T) / 2
        return KnownSpectrum(lam, q, a, DenseOperator(a))

    return make


@dataclass(frozen=True)
class DigitsProblem:
    """A trained digits network, its probe batches and its exact float64 Hessian.

    Attributes:
        hessian: ``(p, p)`` float64 dense Hessian of the mean loss over all probe examples.
        eigenvalues: ``(p,)`` ascending, from ``torch.linalg.eigh(hessian)``.
        eigenvectors: ``(p, p)`` matching unit columns.
        operators: ``{torch.float64: HessianOperator, torch.float32: HessianOperator}``.
    """

    name: str
    hessian: Tensor
    eigenvalues: Tensor
    eigenvectors: Tensor
    operators: dict

    @property
    def dim(self) -> int:
        return self.hessian.shape[0]

    @property
    def spectral_norm(self) -> float:
        return float(self.eigenvalues.abs().max())


def _dense_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``torch.func.hessian`` of the mean cross-entropy over ``(x, y)`` w.r.t. the flat parameters."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    numels = [named[n].numel() for n in names]
    theta0 = torch.cat([named[n].detach().reshape(-1) for n in names])

    def loss(theta: Tensor) -> Tensor:
        params = {n: c.view(s) for n, c, s in zip(names, torch.split(theta, numels), shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return hessian(loss)(theta0).detach()


def _build_problem(
    name: str, factory: Callable[[], nn.Module], num_examples: int, split_at: int, seed: int
) -> DigitsProblem:
    x, y = digits_tensors(split="train")
    x, y = x[:num_examples].to(torch.float64), y[:num_examples]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = factory().to(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=TRAIN_LR)
    for _ in range(TRAIN_STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    # Share weights exactly: round to float32, then widen back (exact).
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.float32).to(torch.float64))
    model32 = factory().to(torch.float32).eval()
    model32.load_state_dict({k: v.to(torch.float32) for k, v in model.state_dict().items()})
    h = _dense_hessian(model, x, y)
    h = (h + h.T) / 2  # symmetric to rounding already; make eigh's input exactly symmetric
    evals, evecs = torch.linalg.eigh(h)
    # Two batches of unequal size: the operator must weight them by size to match the mean loss.
    batches = [(x[:split_at], y[:split_at]), (x[split_at:], y[split_at:])]
    ops = {
        torch.float64: HessianOperator(model, F.cross_entropy, batches),
        torch.float32: HessianOperator(model32, F.cross_entropy, [(bx.to(torch.float32), by) for bx, by in batches]),
    }
    return DigitsProblem(name, h, evals, evecs, ops)


@pytest.fixture(scope="session")
def mlp_problem() -> DigitsProblem:
    """``digits_mlp(hidden=24)`` (2,410 parameters) on 256 training digits in batches of 160 and 96."""
    return _build_problem("mlp", lambda: digits_mlp(hidden=MLP_HIDDEN), MLP_EXAMPLES, 160, seed=0)


@pytest.fixture(scope="session")
def cnn_problem() -> DigitsProblem:
    """``digits_cnn()`` (838 parameters) on 128 training digits in batches of 80 and 48."""
    return _build_problem("cnn", digits_cnn, CNN_EXAMPLES, 80, seed=0)


@pytest.fixture(scope="session", params=["mlp", "cnn"])
def digits_problem(request) -> DigitsProblem:
    """Both digits problems, one after the other."""
    return request.getfixturevalue(f"{request.param}_problem")
