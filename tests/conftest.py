"""Shared fixtures for the operator tests: digits data in float64, a briefly trained
MLP, and exact dense references built with ``torch.func``.

Model initialisation draws from torch's global generator; every fixture seeds it
inside ``torch.random.fork_rng`` so the global state of other tests is untouched.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian

from cluster.data import digits_tensors
from probe.models import digits_mlp

# The tests multiply small matrices, where a second intra-op thread gains little and,
# on a busy 2-core machine, OpenMP threads spinning for a descheduled peer made the
# suite 5x slower (113 s against 22 s). OMP_NUM_THREADS, when set, still decides.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

NUM_PROBE_EXAMPLES = 300
MLP_HIDDEN = 16  # digits_mlp(hidden=16): 64·16+16 + 16·16+16 + 16·10+10 = 1,482 parameters


def seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build ``factory()`` in float64 with its initialisation drawn from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory().to(torch.float64)


@pytest.fixture(scope="session")
def seeded_model() -> Callable[..., nn.Module]:
    """``seeded_model(factory, seed=0)``: ``factory()`` in float64, initialised from ``seed``."""
    return lambda factory, seed=0: seeded(factory, seed)


@pytest.fixture(scope="session")
def digits64() -> tuple[Tensor, Tensor]:
    """The first 300 training digits: inputs ``(300, 64)`` float64, labels ``(300,)`` int64."""
    x, y = digits_tensors(split="train")
    return x[:NUM_PROBE_EXAMPLES].to(torch.float64), y[:NUM_PROBE_EXAMPLES]


@pytest.fixture(scope="session")
def trained_mlp_state(digits64) -> dict[str, Tensor]:
    """State dict of ``digits_mlp(hidden=16)`` in float64 after 30 full-batch GD steps on ``digits64``."""
    x, y = digits64
    model = seeded(lambda: digits_mlp(hidden=MLP_HIDDEN), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(30):  # full-batch GD: away from initialisation, far from converged
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def make_trained_mlp(trained_mlp_state) -> Callable[[], nn.Module]:
    """``make_trained_mlp()``: a fresh float64 ``digits_mlp(hidden=16)`` with the trained weights."""

    def make() -> nn.Module:
        model = digits_mlp(hidden=MLP_HIDDEN).to(torch.float64)
        model.load_state_dict(trained_mlp_state)
        return model

    return make


@pytest.fixture
def trained_mlp(make_trained_mlp) -> nn.Module:
    """A fresh float64 ``digits_mlp(hidden=16)`` after 30 full-batch GD steps (same weights every time)."""
    return make_trained_mlp()


def _flat_loss(model: nn.Module, loss_fn, x, y, names: Sequence[str]) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``(f, θ0)`` with ``f(θ) = loss_fn(model(x; θ), y)`` over the named parameters, others fixed."""
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    numels = [named[n].numel() for n in names]
    theta0 = torch.cat([named[n].detach().reshape(-1) for n in names])

    def f(theta: Tensor) -> Tensor:
        chunks = torch.split(theta, numels)
        return loss_fn(
            functional_call(model, {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}, (x,)), y
        )

    return f, theta0


@pytest.fixture(scope="session")
def dense_hessian() -> Callable[..., Tensor]:
    """``dense_hessian(model, loss_fn, x, y, names=None)``: ``torch.func.hessian`` of the loss on all of ``(x, y)``.

    ``names`` selects parameters (default: all trainable ones, in module order).
    The model is evaluated in whatever mode it is in.
    """

    def compute(model, loss_fn, x, y, names=None) -> Tensor:
        names = names or [n for n, p in model.named_parameters() if p.requires_grad]
        f, theta0 = _flat_loss(model, loss_fn, x, y, names)
        return hessian(f)(theta0).detach()

    return compute


@pytest.fixture(scope="session")
def flat_loss() -> Callable[..., tuple[Callable[[Tensor], Tensor], Tensor]]:
    """``flat_loss(model, loss_fn, x, y, names=None) -> (f, θ0)``, the loss as a function of a flat vector."""

    def make(model, loss_fn, x, y, names=None):
        names = names or [n for n, p in model.named_parameters() if p.requires_grad]
        return _flat_loss(model, loss_fn, x, y, names)

    return make


def rel_err(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` (Frobenius)."""
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="session")
def relative_error() -> Callable[[Tensor, Tensor], float]:
    """``relative_error(a, ref) = ||a - ref||_F / ||ref||_F``."""
    return rel_err
