"""probe.eos: stability thresholds, the preconditioned operator, warm starts, and the edge of stability on digits.

References: closed forms for the thresholds; simulations of the optimizers
(``torch.optim.SGD`` itself, and Adam with a frozen preconditioner) on quadratics
with known spectra, just below and just above each threshold; dense ``eig(P⁻¹A)``;
cold-start Lanczos; and the phenomenon of Cohen et al. 2021 on real data: a tanh
MLP trained by full-batch gradient descent on 500 digits with MSE on one-hot
targets at η = 0.1 sharpens from λ_max ≈ 8 to 2/η = 20 and then stays there.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from test_operators_contract import OperatorContract  # the one contract suite (tests/probe/)

from cluster.data import digits_tensors
from probe.eigen import eigenvalues
from probe.eos import (
    EosPoint,
    EosSeries,
    PreconditionedOperator,
    adam_preconditioner,
    eos_point,
    eos_series,
    lambda_max_warm,
    stability_threshold,
)
from probe.hessian import HessianOperator
from probe.models import digits_mlp
from probe.operators import DenseOperator


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=seeded(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def with_spectrum(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Dense symmetric float64 ``Q diag(eigs) Qᵀ`` with a seeded orthogonal Q."""
    q = orthogonal(eigs.numel(), seed)
    a = (q * eigs) @ q.T
    return (a + a.T) / 2


# ---------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    "optimizer,lr,momentum,kwargs,expected",
    [
        ("gd", 0.1, None, {}, 20.0),
        ("gd", 0.01, 0.0, {}, 200.0),
        ("momentum", 0.01, 0.9, {}, 3.8 / 0.01),
        ("momentum", 0.01, 0.5, {"dampening": 0.5}, 3.0 / (0.5 * 0.01)),
        ("nesterov", 0.01, 0.9, {}, 3.8 / (2.8 * 0.01)),
        ("adam", 1e-3, None, {}, 38.0 / 1e-3),  # Cohen et al. 2022: 38/η for β₁ = 0.9
        ("adam", 1e-3, 0.0, {}, 2.0 / 1e-3),
    ],
)
def test_threshold_closed_forms(optimizer, lr, momentum, kwargs, expected):
    assert stability_threshold(optimizer, lr, momentum, **kwargs) == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        (("sgd", 0.1), {}, "optimizer must be one of ('gd', 'momentum', 'nesterov', 'adam'), got optimizer='sgd'"),
        (("gd", 0.0), {}, "lr must be positive and finite, got lr=0.0"),
        (("gd", float("nan")), {}, "lr must be positive and finite, got lr=nan"),
        (("gd", 0.1, 0.9), {}, "optimizer='gd' has no momentum, got momentum=0.9; use optimizer='momentum'"),
        (("momentum", 0.1), {}, "optimizer='momentum' needs momentum"),
        (("nesterov", 0.1, 1.0), {}, "momentum must be in [0, 1), got momentum=1.0"),
        (("adam", 0.1, -0.1), {}, "momentum (β₁ for adam) must be in [0, 1), got momentum=-0.1"),
        (("momentum", 0.1, 0.9), {"dampening": 1.0}, "dampening must be in [0, 1), got dampening=1.0"),
        (("nesterov", 0.1, 0.9), {"dampening": 0.1}, "dampening applies to optimizer='momentum' only"),
    ],
)
def test_threshold_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        stability_threshold(*args, **kwargs)


QUAD_EIGS = torch.linspace(4.0, 10.0, 12, dtype=torch.float64)  # λ_max = 10, all positive
SIM_STEPS = 600
MARGIN = 0.03  # run at (1 ∓ 3%) of the critical step size


def simulate_torch(a: torch.Tensor, lr: float, steps: int, **sgd_kwargs) -> float:
    """‖θ_T‖/‖θ_0‖ for ``torch.optim.SGD(**sgd_kwargs)`` on ``½θᵀAθ`` from a seeded θ_0."""
    theta = torch.randn(a.shape[0], generator=seeded(3), dtype=torch.float64)
    start = theta.norm().item()
    theta.requires_grad_(True)
    opt = torch.optim.SGD([theta], lr=lr, **sgd_kwargs)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * theta @ (a @ theta)).backward()
        opt.step()
    return theta.detach().norm().item() / start


@pytest.mark.parametrize(
    "optimizer,momentum,sgd_kwargs",
    [
        ("gd", None, {}),
        ("momentum", 0.9, {"momentum": 0.9}),
        ("momentum", 0.5, {"momentum": 0.5, "dampening": 0.3}),
        ("nesterov", 0.9, {"momentum": 0.9, "nesterov": True}),
    ],
    ids=["gd", "heavy-ball-0.9", "heavy-ball-0.5-dampened", "nesterov-0.9"],
)
def test_threshold_separates_convergence_from_divergence(optimizer, momentum, sgd_kwargs):
    """torch's own optimizer on a quadratic with λ_max = 10: converges just below, diverges just above."""
    a = with_spectrum(QUAD_EIGS)
    dampening = sgd_kwargs.get("dampening", 0.0)
    critical_lr = stability_threshold(optimizer, 1.0, momentum, dampening=dampening) / 10.0  # threshold(η) = λ_max
    below = simulate_torch(a, (1 - MARGIN) * critical_lr, SIM_STEPS, **sgd_kwargs)
    above = simulate_torch(a, (1 + MARGIN) * critical_lr, SIM_STEPS, **sgd_kwargs)
    assert below < 1e-3, f"{optimizer}: ‖θ‖ shrank only to {below:.3g} just below the threshold"
    assert above > 1e3, f"{optimizer}: ‖θ‖ grew only to {above:.3g} just above the threshold"


def test_adam_threshold_bounds_preconditioned_sharpness():
    """Adam with a frozen P on ``½θᵀAθ``: λ_max(P⁻¹A) against (2+2β₁)/((1−β₁)η) decides stability."""
    a = with_spectrum(QUAD_EIGS)
    p = torch.linspace(0.5, 3.0, a.shape[0], dtype=torch.float64)
    lam = eigenvalues(PreconditionedOperator(DenseOperator(a), p), generator=seeded(0)).eigenvalues[0].item()
    beta1 = 0.9
    critical_lr = stability_threshold("adam", 1.0, beta1) / lam

    def ratio(lr: float) -> float:
        theta = torch.randn(a.shape[0], generator=seeded(3), dtype=torch.float64)
        start, m = theta.norm().item(), torch.zeros_like(theta)
        for _ in range(2000):  # β₁ = 0.9 rotates slowly: more steps than SGD needs
            m = beta1 * m + (1 - beta1) * (a @ theta)
            theta = theta - lr * m / p
        return theta.norm().item() / start

    assert ratio((1 - MARGIN) * critical_lr) < 1e-3
    assert ratio((1 + MARGIN) * critical_lr) > 1e3


def test_adam_preconditioner_reproduces_torch_adam_update():
    """θ_before − θ_after = η P⁻¹ m for torch.optim.Adam, with P from its state after the step."""
    g = seeded(0)
    a = with_spectrum(QUAD_EIGS)
    theta = torch.randn(a.shape[0], generator=g, dtype=torch.float64).requires_grad_(True)
    lr = 0.01
    opt = torch.optim.Adam([theta], lr=lr, betas=(0.8, 0.99), eps=1e-6)
    for _ in range(5):
        before = theta.detach().clone()
        opt.zero_grad()
        (0.5 * theta @ (a @ theta)).backward()
        opt.step()
        state = opt.state[theta]
        p = adam_preconditioner(state["exp_avg_sq"], state["step"], beta1=0.8, beta2=0.99, eps=1e-6)
        torch.testing.assert_close(before - theta.detach(), lr * state["exp_avg"] / p, rtol=1e-12, atol=0)
    plain = adam_preconditioner(
        [state["exp_avg_sq"]], 5, beta1=0.8, beta2=0.99, eps=1e-6, first_moment_correction=False
    )
    torch.testing.assert_close(p, plain * (1 - 0.8**5), rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "v,step,kwargs,message",
    [
        (torch.ones(3), 0, {}, "step must be ≥ 1 (Adam's state['step'] after its first update), got step=0"),
        (torch.ones(3), 1, {"beta2": 1.0}, "beta2 must be in [0, 1), got beta2=1.0"),
        (torch.ones(3), 1, {"eps": -1.0}, "eps must be ≥ 0, got eps=-1.0"),
        (torch.tensor([1.0, -1.0]), 1, {}, "exp_avg_sq must be finite and non-negative, got min=-1"),
    ],
)
def test_adam_preconditioner_errors(v, step, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        adam_preconditioner(v, step, **kwargs)


# ---------------------------------------------------------------------------- preconditioned operator


def test_preconditioned_eigenvalues_match_dense_eig_of_p_inverse_a():
    n = 60
    a = with_spectrum(torch.linspace(-3.0, 12.0, n, dtype=torch.float64), seed=1)
    p = 0.2 + torch.rand(n, generator=seeded(2), dtype=torch.float64) * 5
    dense = torch.linalg.eigvals(a / p[:, None])  # P⁻¹A: not symmetric, real spectrum
    assert dense.imag.abs().max().item() < 1e-10
    dense = dense.real.sort(descending=True).values
    op = PreconditionedOperator(DenseOperator(a), p)
    full = torch.linalg.eigvalsh(op @ torch.eye(n, dtype=torch.float64)).flip(0)
    torch.testing.assert_close(full, dense, rtol=1e-10, atol=1e-10)
    top = eigenvalues(op, 3, generator=seeded(0), return_eigenvectors=True)
    torch.testing.assert_close(top.eigenvalues, dense[:3], rtol=1e-10, atol=0)
    w = op.to_parameter_direction(top.eigenvectors[:, 0])  # eigenvector of P⁻¹A itself
    assert ((a @ w) / p - dense[0] * w).norm().item() < 1e-8 * dense[0].item()


def test_preconditioned_operator_errors():
    op = DenseOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=re.escape("diag must have shape (local_dim=4,), got (3,)")):
        PreconditionedOperator(op, torch.ones(3))
    with pytest.raises(ValueError, match=re.escape("diag must be positive and finite, got min=0; use eps > 0")):
        PreconditionedOperator(op, torch.tensor([1.0, 0.0, 1.0, 1.0]))


class TestPreconditionedDense(OperatorContract):
    """PreconditionedOperator passes the operator contract (wrapping a dense symmetric matrix)."""

    dim = 40

    def build(self, dtype, device, data, seeded_model):
        a = torch.randn(self.dim, self.dim, generator=seeded(0), dtype=torch.float64)
        p = 0.5 + torch.rand(self.dim, generator=seeded(1), dtype=torch.float64)
        return PreconditionedOperator(DenseOperator((a + a.T).to(dtype=dtype, device=device)), p)


# ---------------------------------------------------------------------------- warm starts

WARM_DIM = 300
WARM_BULK = torch.linspace(-1.0, 5.0, WARM_DIM - 2, dtype=torch.float64)


def top_two(l1: float, l2: float) -> torch.Tensor:
    """A fixed eigenbasis with top eigenvalues ``l1`` (first column) and ``l2`` (second) over a bulk in [-1, 5]."""
    return with_spectrum(torch.cat([torch.tensor([l1, l2], dtype=torch.float64), WARM_BULK]))


def test_warm_start_saves_matvecs_on_perturbed_series():
    """Ten matrices, each a 1e-3 perturbation of the last: warm Lanczos needs fewer products, same λ_max."""
    g = seeded(1)
    a = top_two(10.0, 9.0)
    matrices = []
    for _ in range(10):
        e = torch.randn(WARM_DIM, WARM_DIM, generator=g, dtype=torch.float64) * 1e-3 / WARM_DIM**0.5
        a = a + (e + e.T) / 2
        matrices.append(a)
    series = {
        warm: eos_series(
            [(i, 0.1, m) for i, m in enumerate(matrices)], DenseOperator, warm_start=warm, generator=seeded(0)
        )
        for warm in (False, True)
    }
    exact = torch.stack([torch.linalg.eigvalsh(m)[-1] for m in matrices])
    for s in series.values():
        torch.testing.assert_close(s.lambda_max, exact, rtol=1e-8, atol=0)
        assert all(p.converged for p in s.points)
    cold = sum(p.num_matvecs for p in series[False].points[1:])
    warm = sum(p.num_matvecs for p in series[True].points[1:])
    print(f"perturbed series: {warm} matvecs warm vs {cold} cold over 9 warm-startable points")
    assert warm <= 0.75 * cold
    assert [p.warm_started for p in series[True].points] == [False] + [True] * 9


def test_warm_start_sees_an_eigenvalue_crossing():
    """The old top eigenvector is still an eigenvector, now of the second eigenvalue.

    Started exactly from it (``mix=0``) Lanczos sits in an invariant subspace and
    returns the overtaken eigenvalue; the smallest allowed random part (1000·tol)
    and the default find the new top. (``mix=1e-4`` = 100·tol stopped on 9.8 when
    tried by hand: hence the 1000·tol floor.)
    """
    old_top = orthogonal(WARM_DIM, 0)[:, 0]
    op = DenseOperator(top_two(9.8, 10.3))
    assert lambda_max_warm(op, old_top, mix=0.0, generator=seeded(0)).eigenvalues[0].item() == pytest.approx(9.8)
    for seed in range(3):
        for mix in (1e-3, None):
            found = lambda_max_warm(op, old_top, mix=mix, generator=seeded(seed))
            assert found.eigenvalues[0].item() == pytest.approx(10.3, rel=1e-10)


def test_warm_start_errors():
    op = DenseOperator(torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=re.escape("previous must have shape (local_dim=5,), got (4,)")):
        lambda_max_warm(op, torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=re.escape("previous must be finite and non-zero")):
        lambda_max_warm(op, torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=re.escape("mix must be 0 or at least 1000·tol=0.001, got mix=0.0001")):
        lambda_max_warm(op, torch.ones(5, dtype=torch.float64), mix=1e-4)
    with pytest.raises(ValueError, match=re.escape("mix must be finite and ≥ 0, got mix=-1")):
        lambda_max_warm(op, torch.ones(5, dtype=torch.float64), mix=-1)


# ---------------------------------------------------------------------------- points and series


def test_eos_point_for_adam_uses_the_preconditioned_sharpness():
    a = with_spectrum(QUAD_EIGS)
    p = torch.linspace(0.5, 3.0, a.shape[0], dtype=torch.float64)
    point = eos_point(DenseOperator(a), 1e-3, step=7, optimizer="adam", preconditioner=p, generator=seeded(0))
    exact = torch.linalg.eigvals(a / p[:, None]).real.max().item()
    assert point.sharpness == "preconditioned" and point.momentum == 0.9 and point.step == 7
    assert point.lambda_max == pytest.approx(exact, rel=1e-10)
    assert point.threshold == pytest.approx(38.0 / 1e-3)
    assert point.ratio == pytest.approx(exact * 1e-3 / 38.0, rel=1e-10)
    assert point.converged and point.residual < 1e-6 * exact and not point.warm_started


def test_eos_series_for_adam_takes_a_preconditioner_per_checkpoint():
    mats = [with_spectrum(QUAD_EIGS * s) for s in (1.0, 1.1)]
    p = torch.linspace(0.5, 3.0, QUAD_EIGS.numel(), dtype=torch.float64)
    series = eos_series(
        [(0, 1e-3, 0), (10, 1e-3, 1)],
        lambda i: DenseOperator(mats[i]),
        optimizer="adam",
        make_preconditioner=lambda i: p,
        generator=seeded(0),
    )
    exact = torch.tensor([torch.linalg.eigvals(m / p[:, None]).real.max() for m in mats], dtype=torch.float64)
    torch.testing.assert_close(series.lambda_max, exact, rtol=1e-10, atol=0)
    assert series.points[0].eigenvector is None and series.points[1].eigenvector is not None


@pytest.mark.parametrize(
    "checkpoints,kwargs,message",
    [
        ([(5, 0.1, 0), (5, 0.1, 0)], {}, "checkpoint steps must increase, got step=5 after step=5"),
        ([], {}, "checkpoints is empty"),
        ([(0, 0.1, 0)], {"optimizer": "adam"}, "make_preconditioner is required for optimizer='adam'"),
        ([(0, 0.1, 0)], {"make_preconditioner": lambda s: None}, "and rejected otherwise; got optimizer='gd'"),
    ],
)
def test_eos_series_errors(checkpoints, kwargs, message):
    make = lambda _: DenseOperator(torch.eye(3, dtype=torch.float64))  # noqa: E731
    with pytest.raises(ValueError, match=re.escape(message)):
        eos_series(checkpoints, make, **kwargs)


def test_eos_point_preconditioner_errors():
    op = DenseOperator(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=re.escape("optimizer='adam' needs preconditioner")):
        eos_point(op, 0.1, step=0, optimizer="adam")
    with pytest.raises(ValueError, match=re.escape("preconditioner applies to optimizer='adam' only")):
        eos_point(op, 0.1, step=0, preconditioner=torch.ones(3))


# ---------------------------------------------------------------------------- edge of stability on digits

EOS_EXAMPLES = 500
EOS_HIDDEN = 32  # digits_mlp(hidden=32): 3,466 parameters
EOS_LR = 0.1  # 2/η = 20; λ_max starts near 8
EOS_STEPS = 3000
EOS_EVERY = 100  # 31 checkpoints
EOS_BAND = 0.15  # the "within 15% of 2/η"


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``½‖f(x) − y‖²`` summed over classes, mean over examples (Cohen et al. 2021's square loss)."""
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


@pytest.fixture(scope="module")
def digits_gd_run():
    """Full-batch GD at η = 0.1 in float64; state dicts every 100 steps (in memory)."""
    x, y = digits_tensors(split="train")
    x, targets = x[:EOS_EXAMPLES].to(torch.float64), F.one_hot(y[:EOS_EXAMPLES], 10).to(torch.float64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits_mlp(hidden=EOS_HIDDEN, activation="tanh").to(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=EOS_LR)
    checkpoints = []
    for step in range(EOS_STEPS + 1):
        if step % EOS_EVERY == 0:
            checkpoints.append((step, EOS_LR, copy.deepcopy(model.state_dict())))
        opt.zero_grad()
        half_squared_error(model(x), targets).backward()
        opt.step()
    probe_model = digits_mlp(hidden=EOS_HIDDEN, activation="tanh").to(torch.float64)

    def make_operator(state):
        probe_model.load_state_dict(state)
        return HessianOperator(probe_model, half_squared_error, [(x, targets)])

    return checkpoints, make_operator


@pytest.fixture(scope="module")
def digits_series(digits_gd_run) -> dict[bool, EosSeries]:
    checkpoints, make_operator = digits_gd_run
    return {
        warm: eos_series(checkpoints, make_operator, warm_start=warm, generator=seeded(0)) for warm in (True, False)
    }


def test_digits_gd_sharpens_then_hovers_at_two_over_eta(digits_series):
    series = digits_series[True]
    lam, ratio = series.lambda_max, series.ratios
    print("step  λ_max  ratio:", [(p.step, round(p.lambda_max, 2), round(p.ratio, 3)) for p in series.points])
    assert all(p.converged for p in series.points)
    torch.testing.assert_close(series.thresholds, torch.full_like(lam, 2 / EOS_LR))
    # Progressive sharpening: starts well below 2/η and rises monotonically until it gets close.
    assert ratio[0] < 0.5
    onset = int(torch.nonzero(ratio >= 1 - EOS_BAND)[0])
    assert onset >= 5, f"reached the edge after {series.steps[onset]} steps: no sharpening phase to see"
    assert bool((lam[1 : onset + 1] > lam[:onset]).all()), f"λ_max not rising before the edge: {lam[: onset + 1]}"
    # Edge of stability: from the onset on (the last half and more of the series), within 15% of 2/η.
    assert onset <= len(ratio) // 2
    late = ratio[onset:]
    assert bool(((late - 1).abs() <= EOS_BAND).all()), f"ratios after step {series.steps[onset]}: {late}"


def test_digits_warm_start_matches_cold_with_fewer_matvecs(digits_series):
    warm, cold = digits_series[True], digits_series[False]
    torch.testing.assert_close(warm.lambda_max, cold.lambda_max, rtol=1e-8, atol=0)
    print(f"digits series: {warm.num_matvecs} matvecs warm vs {cold.num_matvecs} cold")
    assert warm.num_matvecs < cold.num_matvecs


def test_eos_point_record_is_frozen():
    point = EosPoint(0, 0.1, "gd", 0.0, 1.0, 20.0, 0.05, 3, 0.0, True, False, "hessian")
    with pytest.raises(AttributeError):
        point.lambda_max = 2.0  # type: ignore[misc]


def test_non_finite_checkpoint_is_reported_and_the_next_starts_cold():
    finite = with_spectrum(QUAD_EIGS)
    broken = finite.clone()
    broken[0, 0] = float("nan")
    series = eos_series([(0, 0.1, finite), (1, 0.1, broken), (2, 0.1, finite)], DenseOperator, generator=seeded(0))
    bad = series.points[1]
    assert bad.lambda_max != bad.lambda_max and not bad.converged and bad.eigenvector is None
    assert "the operator's products are not finite" in bad.note
    assert not series.points[2].warm_started
    assert series.points[2].lambda_max == pytest.approx(10.0, rel=1e-10)
