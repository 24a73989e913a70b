"""probe.sharpness against closed forms on quadratic losses, and the reparameterization trap on real data.

Exact references. On ``L(θ) = ½(θ−θ*)ᵀA(θ−θ*) + c`` (float64):

- SAM one step from ``θ = θ* + d``: ``g = Ad``, ``δ = ρg/‖g‖``, so
  ``L(θ+δ) − L(θ) = ρ‖g‖ + ρ² gᵀAg / (2‖g‖²)``;
- SAM maximum over the L2 ball at ``θ*``: ``ρ² λ_max(A)/2``; from ``θ* + d`` the
  trust-region solution ``δ = (μI − A)⁻¹Ad`` with ``μ > λ_max``, ``‖δ‖ = ρ`` (μ by bisection);
- Keskar box maximum for diagonal ``A`` (separable, convex): each coordinate at the
  corner ``δ_i = sign(d_i) w_i``, ``w_i = ε(|θ_i|+1)``: ``Σ a_i((|d_i| + w_i)² − d_i²)/2``;
- adaptive worst case at ``θ*``: ``ρ² λ_max(CAC)/2`` (p = 2) and, for diagonal ``A``,
  ``ρ² Σ a_i c_i²/2`` (p = ∞), ``C = diag(|θ*|)``;
- average case: ``E ½δᵀAδ = ½ tr(A Cov δ)``: ``σ² tr(A)/2``; adaptive ``ρ² Σ A_ii c_i²/2``
  (Gaussian u) and ``ρ² Σ A_ii c_i²/6`` (uniform u).

Stochastic values are checked within 3 standard errors over fixed seeds and by
"error shrinks as samples grow", never against snapshot numbers.
"""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cluster.data import digits_tensors
from probe.evaluate import Evaluator
from probe.hessian import HessianOperator
from probe.models import digits_mlp
from probe.operators import DenseOperator
from probe.sharpness import (
    MEASURES,
    adaptive_sharpness,
    average_sharpness,
    keskar_sharpness,
    lambda_max,
    sam_sharpness,
)

SPECTRUM = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.1], dtype=torch.float64)
OFFSET = 0.3  # c in L = ½(θ−θ*)ᵀA(θ−θ*) + c: Keskar's 1 + L(θ) denominator is then not 1
RHO = 0.05


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Quadratic:
    """``L(θ) = ½(θ−θ*)ᵀA(θ−θ*) + c`` as a differentiable callable of a flat vector."""

    def __init__(self, a: Tensor, theta_star: Tensor, c: float = OFFSET) -> None:
        self.a, self.theta_star, self.c = a, theta_star, c

    def __call__(self, theta: Tensor) -> Tensor:
        d = theta - self.theta_star
        return 0.5 * d @ (self.a @ d) + self.c


@pytest.fixture
def dense(known_spectrum) -> Quadratic:
    """A dense A with spectrum SPECTRUM in a random basis; θ* away from 0 with distinct magnitudes."""
    a = known_spectrum(SPECTRUM, seed=3).matrix
    return Quadratic(a, torch.tensor([1.0, -2.0, 0.5, 3.0, -0.7, 1.5], dtype=torch.float64))


@pytest.fixture
def diagonal() -> Quadratic:
    return Quadratic(torch.diag(SPECTRUM), torch.tensor([1.0, -2.0, 0.5, 3.0, -0.7, 1.5], dtype=torch.float64))


def off_minimum(q: Quadratic) -> Tensor:
    return q.theta_star + torch.tensor([0.3, -0.1, 0.2, 0.05, -0.4, 0.1], dtype=torch.float64)


def trust_region_max(a: Tensor, d: Tensor, rho: float) -> float:
    """``max_{‖δ‖≤ρ} ½(d+δ)ᵀA(d+δ) − ½dᵀAd`` for PSD ``A`` (easy case), by bisection on μ."""
    lam, q = torch.linalg.eigh(a)
    c = q.T @ d
    lo, hi = float(lam[-1]), float(lam[-1]) + float((a @ d).norm()) / rho + 1.0

    def step(mu: float) -> Tensor:
        return (lam * c) / (mu - lam)  # δ in the eigenbasis

    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(step(mid).norm()) > rho else (lo, mid)
    x = c + step(hi)
    return float(0.5 * (lam * x**2).sum() - 0.5 * (lam * c**2).sum())


# --------------------------------------------------------------------------- lambda_max


def test_lambda_max_is_the_top_eigenvalue_of_the_operator(known_spectrum):
    op = known_spectrum(SPECTRUM, seed=1).op
    r = lambda_max(op, generator=seeded(0))
    assert r.measure == "lambda_max" and r.measure in MEASURES
    assert r.value == pytest.approx(4.0, rel=1e-10)
    assert r.num_matvecs > 0 and r.note == ""
    assert math.isnan(r.base_loss) and math.isnan(r.stderr)
    assert r.params == {"tol": 1e-6, "max_steps": None, "seed": 0}


# --------------------------------------------------------------------------- SAM


def test_sam_one_step_matches_its_closed_form_off_the_minimum(dense):
    theta = off_minimum(dense)
    g = dense.a @ (theta - dense.theta_star)
    expected = RHO * g.norm() + RHO**2 * (g @ dense.a @ g) / (2 * g.norm() ** 2)
    r = sam_sharpness(dense, theta, rho=RHO)
    assert r.measure == "sam"
    assert r.value == pytest.approx(float(expected), rel=1e-12)
    torch.testing.assert_close(r.perturbation, RHO * g / g.norm(), rtol=1e-12, atol=0)
    assert r.base_loss == pytest.approx(float(dense(theta)), rel=1e-14)
    assert r.perturbed_loss == pytest.approx(r.base_loss + r.value, rel=1e-14)
    assert (r.num_evaluations, r.num_gradients) == (2, 2)
    assert r.params == {"rho": RHO, "norm": "l2", "steps": 1, "step_size": RHO, "seed": None}


def test_sam_one_step_at_an_exact_minimum_reports_the_zero_gradient(dense):
    r = sam_sharpness(dense, dense.theta_star, rho=RHO, generator=seeded(0))
    assert "gradient is zero" in r.note
    # a random direction on the sphere: between the extreme Rayleigh quotients
    assert RHO**2 * 0.1 / 2 <= r.value <= RHO**2 * 4.0 / 2
    assert float(r.perturbation.norm()) == pytest.approx(RHO, rel=1e-12)


def test_sam_multi_step_reaches_the_ball_maximum_at_the_minimum(dense):
    r = sam_sharpness(dense, dense.theta_star, rho=RHO, steps=60, generator=seeded(0))
    assert r.value == pytest.approx(RHO**2 * 4.0 / 2, rel=1e-8)
    assert float(r.perturbation.norm()) <= RHO * (1 + 1e-12)
    assert r.losses.shape == (60,) and r.num_gradients == 61


def test_sam_multi_step_solves_the_trust_region_problem_off_the_minimum(dense):
    theta = off_minimum(dense)
    exact = trust_region_max(dense.a, theta - dense.theta_star, RHO)
    one = sam_sharpness(dense, theta, rho=RHO)
    many = sam_sharpness(dense, theta, rho=RHO, steps=60)
    assert many.value == pytest.approx(exact, rel=1e-8)
    assert one.value < many.value <= exact * (1 + 1e-12)


def test_sam_through_an_evaluator_matches_the_callable(dense):
    """A module whose output is θ itself, with the quadratic as its loss_fn: Evaluator and callable agree."""

    class Identity(nn.Module):
        def __init__(self, theta: Tensor) -> None:
            super().__init__()
            self.theta = nn.Parameter(theta.clone())

        def forward(self, x: Tensor) -> Tensor:
            return self.theta.expand(x.shape[0], -1)  # (examples, dim)

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        d = out - dense.theta_star
        return (0.5 * ((d @ dense.a) * d).sum(-1) + dense.c).mean()

    theta = off_minimum(dense)
    model = Identity(theta).double()
    x = torch.zeros(3, 1, dtype=torch.float64)
    evaluator = Evaluator(model, loss_fn, [(x[:2], torch.zeros(2)), (x[2:], torch.zeros(1))])
    via_eval = sam_sharpness(evaluator, rho=RHO, steps=10)
    via_call = sam_sharpness(dense, theta, rho=RHO, steps=10)
    assert via_eval.value == pytest.approx(via_call.value, rel=1e-12)
    avg_eval = average_sharpness(evaluator, sigma=0.1, num_samples=40, generator=seeded(2))  # vmapped losses
    avg_call = average_sharpness(dense, theta, sigma=0.1, num_samples=40, generator=seeded(2))
    assert avg_eval.value == pytest.approx(avg_call.value, rel=1e-10)
    assert avg_eval.stderr == pytest.approx(avg_call.stderr, rel=1e-8)


def test_sam_keeps_the_dtype_in_float32(dense):
    q32 = Quadratic(dense.a.float(), dense.theta_star.float())
    r = sam_sharpness(q32, off_minimum(dense).float(), rho=RHO, steps=5)
    assert r.perturbation.dtype == torch.float32
    assert r.value == pytest.approx(trust_region_max(dense.a, off_minimum(dense) - dense.theta_star, RHO), rel=1e-3)


# --------------------------------------------------------------------------- Keskar


def test_keskar_box_maximum_at_the_minimum_of_a_diagonal_quadratic(diagonal):
    eps = 1e-3
    w = eps * (diagonal.theta_star.abs() + 1)
    exact = 100 * float((SPECTRUM * w**2).sum() / 2) / (1 + OFFSET)
    r = keskar_sharpness(diagonal, diagonal.theta_star, epsilon=eps, generator=seeded(0))
    assert r.measure == "keskar"
    assert r.value == pytest.approx(exact, rel=1e-10)
    torch.testing.assert_close(r.perturbation.abs(), w, rtol=1e-14, atol=0)  # a corner of the box
    assert "gradient is zero" in r.note
    assert r.params["epsilon"] == eps and r.params["steps"] == 20 and r.params["step_size"] == pytest.approx(0.125)


def test_keskar_box_maximum_off_the_minimum_of_a_diagonal_quadratic(diagonal):
    eps = 1e-2
    theta = off_minimum(diagonal)
    d = theta - diagonal.theta_star
    w = eps * (theta.abs() + 1)
    increase = float((SPECTRUM * ((d.abs() + w) ** 2 - d**2)).sum() / 2)
    r = keskar_sharpness(diagonal, theta, epsilon=eps)
    assert r.value == pytest.approx(100 * increase / (1 + float(diagonal(theta))), rel=1e-10)
    torch.testing.assert_close(r.perturbation, torch.sign(d) * w, rtol=1e-14, atol=0)
    assert r.note == ""


# --------------------------------------------------------------------------- adaptive


def test_adaptive_worst_l2_at_the_minimum_is_the_top_eigenvalue_of_cac(dense):
    c = dense.theta_star.abs()
    exact = RHO**2 * float(torch.linalg.eigvalsh(c[:, None] * dense.a * c[None, :])[-1]) / 2
    r = adaptive_sharpness(dense, dense.theta_star, kind="worst", p=2, rho=RHO, steps=80, generator=seeded(0))
    assert r.measure == "adaptive" and r.params["kind"] == "worst" and r.params["norm"] == "l2"
    assert r.value == pytest.approx(exact, rel=1e-8)
    assert float((r.perturbation / c).norm()) <= RHO * (1 + 1e-12)


def test_adaptive_worst_linf_at_the_minimum_of_a_diagonal_quadratic(diagonal):
    rho = 0.01
    c = diagonal.theta_star.abs()
    exact = rho**2 * float((SPECTRUM * c**2).sum()) / 2
    r = adaptive_sharpness(diagonal, diagonal.theta_star, kind="worst", p="inf", rho=rho, generator=seeded(0))
    assert r.value == pytest.approx(exact, rel=1e-10)
    torch.testing.assert_close(r.perturbation.abs(), rho * c, rtol=1e-14, atol=0)


@pytest.mark.parametrize(("p", "moment"), [(2, 1.0), (math.inf, 1.0 / 3.0)], ids=["l2-gaussian", "linf-uniform"])
def test_adaptive_average_at_the_minimum_within_three_standard_errors(dense, p, moment):
    rho = 0.1
    c = dense.theta_star.abs()
    exact = rho**2 * moment * float((torch.diagonal(dense.a) * c**2).sum()) / 2
    for seed in range(4):
        r = adaptive_sharpness(
            dense, dense.theta_star, kind="average", p=p, rho=rho, num_samples=200, generator=seeded(seed)
        )
        assert abs(r.value - exact) <= 3 * r.stderr
        assert r.losses.shape == (200,) and r.num_evaluations == 201 and r.perturbation is None


@pytest.mark.parametrize("kind", ["worst", "average"])
def test_adaptive_leaves_zero_coordinates_fixed(dense, kind):
    center = dense.theta_star.clone()
    center[[1, 4]] = 0.0
    seen = []

    def recording(theta: Tensor) -> Tensor:
        seen.append(theta.detach().clone())
        return dense(theta)

    adaptive_sharpness(recording, center, kind=kind, p=2, rho=RHO, steps=5, num_samples=4, generator=seeded(0))
    moved = torch.stack(seen) - center
    assert bool((moved[:, [1, 4]] == 0).all())
    assert bool((moved[:, [0, 2, 3, 5]] != 0).any())


# --------------------------------------------------------------------------- average case


def test_average_within_three_standard_errors_of_sigma_squared_trace(dense):
    sigma = 0.1
    exact = sigma**2 * float(SPECTRUM.sum()) / 2
    for seed in range(4):
        r = average_sharpness(dense, dense.theta_star, sigma=sigma, num_samples=256, generator=seeded(seed))
        assert r.measure == "average"
        assert abs(r.value - exact) <= 3 * r.stderr
    assert r.params == {"sigma": sigma, "distribution": "gaussian", "num_samples": 256, "antithetic": False, "seed": 3}


def test_average_error_and_stderr_shrink_as_samples_grow(dense):
    sigma = 0.1
    exact = sigma**2 * float(SPECTRUM.sum()) / 2

    def errors(m: int) -> tuple[float, float]:
        rs = [
            average_sharpness(dense, dense.theta_star, sigma=sigma, num_samples=m, generator=seeded(s))
            for s in range(8)
        ]
        return statistics.fmean(abs(r.value - exact) for r in rs), statistics.fmean(r.stderr for r in rs)

    err_small, se_small = errors(16)
    err_large, se_large = errors(1024)
    assert err_large < err_small / 3  # expected ratio √64 = 8
    assert se_large == pytest.approx(se_small / 8, rel=0.3)


def test_antithetic_pairs_cancel_the_gradient_term_off_the_minimum(dense):
    sigma = 0.1
    theta = dense.theta_star + 4 * (off_minimum(dense) - dense.theta_star)  # gradient term dominates the variance
    exact = sigma**2 * float(SPECTRUM.sum()) / 2  # the linear term has mean zero
    plain = average_sharpness(dense, theta, sigma=sigma, num_samples=128, generator=seeded(0))
    paired = average_sharpness(dense, theta, sigma=sigma, num_samples=128, antithetic=True, generator=seeded(0))
    assert abs(paired.value - exact) <= 3 * paired.stderr
    assert paired.stderr < plain.stderr / 2


# --------------------------------------------------------------------------- non-finite losses


def test_non_finite_losses_are_reported_not_dropped(dense):
    def blows_up(theta: Tensor) -> Tensor:  # NaN beyond distance 0.02 from θ*, finite gradient inside
        return dense(theta) + 0 * torch.log(0.02 - (theta - dense.theta_star).norm())

    avg = average_sharpness(blows_up, dense.theta_star, sigma=0.1, num_samples=8, generator=seeded(0))
    assert math.isnan(avg.value) and "8 of 8 perturbed losses were non-finite" in avg.note
    # steps of length 0.05 and 0.025 land outside (NaN, rejected, step halved); 0.0125 lands inside
    worst = sam_sharpness(blows_up, dense.theta_star + 0.001, rho=RHO, steps=3)
    assert "2 of 3 perturbed losses were non-finite" in worst.note
    assert int(torch.isnan(worst.losses).sum()) == 2 and math.isfinite(worst.value)

    def nan_gradient(theta: Tensor) -> Tensor:  # torch.where's unselected NaN branch poisons the gradient
        q = dense(theta)
        return torch.where((theta - dense.theta_star).norm() > 0.02, q * float("nan"), q)

    stopped = sam_sharpness(nan_gradient, dense.theta_star + 0.001, rho=RHO, steps=3)
    assert "gradient is non-finite after 0 steps" in stopped.note
    assert stopped.losses.numel() == 0 and math.isnan(stopped.value)

    def nan_everywhere(theta: Tensor) -> Tensor:
        return dense(theta) * float("nan")

    at_nan = keskar_sharpness(nan_everywhere, dense.theta_star)
    assert math.isnan(at_nan.value) and "loss at the center is nan" in at_nan.note


# --------------------------------------------------------------------------- reparameterization on real data

ALPHA = 5.0
ADAPTIVE_CASES = [("worst", 2, 0.1), ("worst", math.inf, 0.01), ("average", 2, 0.05), ("average", math.inf, 0.1)]


@pytest.fixture(scope="module")
def reparameterized() -> tuple[Evaluator, Evaluator, list]:
    """A digits ReLU MLP (3,466 parameters, float64) after 100 full-batch GD steps, and the same
    function with layer 1 (weight, bias) scaled by α = 5 and layer 2's weight by 1/α."""
    x, y = digits_tensors(split="train")
    x, y = x[:256].to(torch.float64), y[:256]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits_mlp(activation="relu").to(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[1].weight.mul_(ALPHA)  # Sequential(Flatten, Linear, ReLU, Linear, ReLU, Linear)
        scaled[1].bias.mul_(ALPHA)
        scaled[3].weight.div_(ALPHA)
    batches = [(x[:160], y[:160]), (x[160:], y[160:])]
    return Evaluator(model, F.cross_entropy, batches), Evaluator(scaled, F.cross_entropy, batches), batches


def test_reparameterization_keeps_the_loss_and_changes_lambda_max(reparameterized):
    plain, scaled, batches = reparameterized
    assert scaled.loss(scaled.center()) == pytest.approx(plain.loss(plain.center()), rel=1e-12)
    lam = [
        lambda_max(HessianOperator(e.model, F.cross_entropy, batches), generator=seeded(0)).value
        for e in (plain, scaled)
    ]
    assert abs(lam[1] - lam[0]) > 0.1 * lam[0]
    sam = [sam_sharpness(e).value for e in (plain, scaled)]
    assert abs(sam[1] - sam[0]) > 0.1 * sam[0]  # plain SAM is not invariant either


@pytest.mark.parametrize(("kind", "p", "rho"), ADAPTIVE_CASES, ids=lambda v: str(v))
def test_adaptive_sharpness_is_invariant_to_the_reparameterization(reparameterized, kind, p, rho):
    plain, scaled, _ = reparameterized
    r0, r1 = (adaptive_sharpness(e, kind=kind, p=p, rho=rho, generator=seeded(1)) for e in (plain, scaled))
    assert r0.value > 0
    assert r1.value == pytest.approx(r0.value, rel=1e-6)
    assert r1.base_loss == pytest.approx(r0.base_loss, rel=1e-12)


# --------------------------------------------------------------------------- errors


_Q = Quadratic(torch.diag(SPECTRUM), torch.tensor([1.0, -2.0, 0.5, 3.0, -0.7, 1.5], dtype=torch.float64))
_T = _Q.theta_star
ERROR_CASES = {
    "callable without center": (lambda: sam_sharpness(_Q), ValueError, r"center is required when loss is a callable"),
    "loss not callable": (
        lambda: sam_sharpness(42, _T),
        TypeError,
        r"loss must be an Evaluator or a callable.*got int",
    ),
    "center not 1-D": (
        lambda: sam_sharpness(_Q, _T[None]),
        ValueError,
        r"center must be a 1-D floating-point tensor, got shape \(1, 6\)",
    ),
    "rho zero": (
        lambda: sam_sharpness(_Q, _T, rho=0.0),
        ValueError,
        r"rho must be a positive finite number, got rho=0.0",
    ),
    "epsilon negative": (
        lambda: keskar_sharpness(_Q, _T, epsilon=-1e-3),
        ValueError,
        r"epsilon must be a positive finite number",
    ),
    "sigma infinite": (
        lambda: average_sharpness(_Q, _T, sigma=math.inf),
        ValueError,
        r"sigma must be a positive finite number, got sigma=inf",
    ),
    "steps zero": (lambda: sam_sharpness(_Q, _T, steps=0), ValueError, r"steps must be an integer >= 1, got steps=0"),
    "step_size negative": (
        lambda: sam_sharpness(_Q, _T, step_size=-1.0),
        ValueError,
        r"step_size must be a positive finite number",
    ),
    "p unknown": (
        lambda: adaptive_sharpness(_Q, _T, p=1),
        ValueError,
        r"p must be 2 or inf \(math.inf or 'inf'\), got p=1",
    ),
    "kind unknown": (
        lambda: adaptive_sharpness(_Q, _T, kind="mean"),
        ValueError,
        r"kind must be one of \('worst', 'average'\), got kind='mean'",
    ),
    "rho missing": (
        lambda: adaptive_sharpness(_Q, _T, kind="average"),
        ValueError,
        r"rho is required for kind='average', p=2.*0.05-0.4",
    ),
    "eta negative": (
        lambda: adaptive_sharpness(_Q, _T, eta=-0.1),
        ValueError,
        r"eta must be a finite number >= 0, got eta=-0.1",
    ),
    "all-zero center": (
        lambda: adaptive_sharpness(_Q, torch.zeros(6, dtype=torch.float64)),
        ValueError,
        r"every coordinate of center is 0.*pass eta > 0",
    ),
    "one sample": (
        lambda: average_sharpness(_Q, _T, sigma=0.1, num_samples=1),
        ValueError,
        r"num_samples must be an integer >= 2.*got num_samples=1",
    ),
    "odd antithetic": (
        lambda: average_sharpness(_Q, _T, sigma=0.1, num_samples=7, antithetic=True),
        ValueError,
        r"num_samples must be even with antithetic=True.*use 8",
    ),
    "loss not scalar": (
        lambda: sam_sharpness(lambda th: th * 2, _T),
        ValueError,
        r"loss\(flat\) must return a 0-dim tensor, got shape \(6,\)",
    ),
    "loss not differentiable": (
        lambda: sam_sharpness(lambda th: th.detach().sum(), _T),
        ValueError,
        r"loss\(flat\) is not differentiable in flat",
    ),
    "lambda_max tol": (
        lambda: lambda_max(DenseOperator(torch.eye(3, dtype=torch.float64)), tol=0.0),
        ValueError,
        r"tol must be positive",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_message(case):
    call, error, match = ERROR_CASES[case]
    with pytest.raises(error, match=match):
        call()


def test_error_for_a_center_of_the_wrong_dimension(reparameterized):
    plain, _, _ = reparameterized
    with pytest.raises(ValueError, match=r"center must have the evaluator's dim=3466 entries, got 5"):
        sam_sharpness(plain, torch.zeros(5, dtype=torch.float64))
