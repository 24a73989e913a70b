"""Barriers along paths (probe/barrier.py) and curve training (probe/curves.py).

Exact references:

- a quadratic loss ``L(θ) = ½(θ−m)ᵀA(θ−m)`` computed by a real :class:`Evaluator`
  (a module that returns its parameter vector for every example, and a loss that
  evaluates the quadratic form), so ``L(φ(t))`` is a polynomial in ``t`` with known
  coefficients: degree 2 on the straight line, 4 on a Bézier curve. Maxima come from
  the roots of its derivative, integrals from its coefficients, and the trained bend
  from the closed-form minimizer of ``E_t L(φ(t))``;
- BatchNorm statistics recomputed by hand at each path point (weights set, running
  statistics reset, one train-mode pass with cumulative averaging, eval-mode loss);
- two digits MLPs trained from different seeds, for mode connectivity on real data.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cluster.data import digits_tensors
from probe.barrier import BarrierResult, barrier, barrier_measures
from probe.curves import BezierPath, LinearPath, PolychainPath, train_bend
from probe.evaluate import Evaluator
from probe.models import digits_mlp
from probe.params import ParameterSpace

DIM = 6


# ---------------------------------------------------------------- quadratic problem


class Echo(nn.Module):
    """Returns its parameter ``theta`` (``(DIM,)``) once per example: outputs ``(n, DIM)``."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(DIM, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.theta.expand(x.shape[0], DIM)


class Quadratic:
    """``L(θ) = ½(θ−m)ᵀA(θ−m)`` with an indefinite ``A`` (a straight line can then rise and fall)."""

    def __init__(self, eigenvalues: list[float], seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))
        self.A = (q * torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
        self.A = (self.A + self.A.T) / 2
        self.m = torch.randn(DIM, generator=g, dtype=torch.float64)
        self.g = g

    def __call__(self, theta: Tensor) -> Tensor:
        d = theta - self.m
        return 0.5 * d @ self.A @ d

    def loss_fn(self, out: Tensor, y: Tensor) -> Tensor:
        d = out - self.m  # (n, DIM)
        return 0.5 * ((d @ self.A) * d).sum(-1).mean()

    def evaluator(self) -> Evaluator:
        x = torch.zeros(3, 1, dtype=torch.float64)
        y = torch.zeros(3, dtype=torch.float64)  # float targets: not a classification task
        return Evaluator(Echo(), self.loss_fn, [(x[:2], y[:2]), (x[2:], y[2:])])

    def polynomial(self, nodes: list[Tensor]) -> np.ndarray:
        """Coefficients (ascending powers of t) of ``L(Σ_j t^j · nodes[j])``."""
        nodes = [n.clone() for n in nodes]
        nodes[0] = nodes[0] - self.m
        coef = np.zeros(2 * len(nodes) - 1)
        for i, u in enumerate(nodes):
            for j, v in enumerate(nodes):
                coef[i + j] += 0.5 * float(u @ self.A @ v)
        return coef


def line_nodes(a: Tensor, b: Tensor) -> list[Tensor]:
    return [a, b - a]  # a + t(b − a)


def bezier_nodes(a: Tensor, bend: Tensor, b: Tensor) -> list[Tensor]:
    return [a, 2 * (bend - a), a - 2 * bend + b]  # (1−t)²a + 2t(1−t)θ + t²b


def poly_max(coef: np.ndarray) -> tuple[float, float]:
    """``(max over [0, 1], argmax)`` of the polynomial with ascending coefficients ``coef``."""
    p = np.polynomial.Polynomial(coef)
    roots = p.deriv().roots()
    cands = [0.0, 1.0] + [r.real for r in roots if abs(r.imag) < 1e-12 and 0 <= r.real <= 1]
    values = [p(c) for c in cands]
    k = int(np.argmax(values))
    return float(values[k]), float(cands[k])


def chord_coef(coef: np.ndarray) -> np.ndarray:
    """Coefficients of ``L(t) − ((1−t)L(0) + t·L(1))``."""
    p = np.polynomial.Polynomial(coef)
    out = coef.copy()
    out[0] -= p(0.0)
    out[1] -= p(1.0) - p(0.0)
    return out


@pytest.fixture
def quadratic() -> Quadratic:
    return Quadratic([-2.0, -0.5, 0.3, 1.0, 2.0, 4.0], seed=1)


def _concave_line(quadratic: Quadratic, t_star: float) -> tuple[Tensor, Tensor]:
    """Endpoints whose straight line is concave in t with its maximum at ``t_star``."""
    g = quadratic.g
    evals, evecs = torch.linalg.eigh(quadratic.A)
    d = 2.0 * evecs[:, 0] + 0.3 * torch.randn(DIM, generator=g, dtype=torch.float64)  # mostly along λ = −2
    assert float(d @ quadratic.A @ d) < 0
    w = torch.randn(DIM, generator=g, dtype=torch.float64)
    ad = quadratic.A @ d
    w = w - (w @ ad) / (ad @ ad) * ad  # dᵀA w = 0, so L'(t*) = 0 below
    a = quadratic.m + w - t_star * d
    return a, a + d


# ---------------------------------------------------------------- closed forms


def test_straight_line_matches_closed_form_quadratic(quadratic):
    a, b = _concave_line(quadratic, t_star=0.3)
    res = barrier(LinearPath(a, b), {"q": quadratic.evaluator()}, points=11)["q"]
    coef = quadratic.polynomial(line_nodes(a, b))
    p = np.polynomial.Polynomial(coef)
    peak, where = poly_max(coef)
    assert where == pytest.approx(0.3, abs=1e-12)  # on the grid t = i/10
    scale = abs(peak) + abs(p(0.0)) + abs(p(1.0))
    np.testing.assert_allclose(res.loss.numpy(), p(res.t.numpy()), rtol=0, atol=1e-12 * scale)
    assert res.barrier_height == pytest.approx(peak - max(p(0.0), p(1.0)), abs=1e-12 * scale)
    assert res.argmax_t == pytest.approx(0.3, abs=1e-12)
    chord_peak, _ = poly_max(chord_coef(coef))
    assert res.barrier_above_line == pytest.approx(chord_peak, abs=1e-12 * scale)
    # Simpson (odd T) is exact for a quadratic in t.
    integral = sum(c / (k + 1) for k, c in enumerate(coef))
    assert res.integration_rule == "simpson"
    assert res.path_integral == pytest.approx(integral - (p(0.0) + p(1.0)) / 2, abs=1e-12 * scale)
    assert res.barrier_height > 0.2  # a real barrier (0.40), not a flat line
    assert res.mode == "eval" and res.path == "linear" and res.num_nonfinite == 0 and res.first_nonfinite_t is None
    assert torch.isnan(res.error).all() and math.isnan(res.error_barrier_height)  # no classes


def test_straight_line_off_grid_maximum_within_grid_bound(quadratic):
    a, b = _concave_line(quadratic, t_star=0.4321)
    points = 21
    res = barrier(LinearPath(a, b), {"q": quadratic.evaluator()}, points=points)["q"]
    coef = quadratic.polynomial(line_nodes(a, b))
    peak, _ = poly_max(coef)
    h = 1 / (points - 1)
    gap = peak - max(coef[0], coef.sum()) - res.barrier_height  # continuous minus grid maximum
    assert 0 <= gap <= abs(2 * coef[2]) * h**2 / 8 + 1e-12


@pytest.mark.parametrize("points", [41, 40])
def test_bezier_matches_closed_form_quartic(quadratic, points):
    a, b = _concave_line(quadratic, t_star=0.5)
    bend = (a + b) / 2 + 0.8 * torch.randn(DIM, generator=quadratic.g, dtype=torch.float64)
    res = barrier(BezierPath(a, b, bend), {"q": quadratic.evaluator()}, points=points)["q"]
    coef = quadratic.polynomial(bezier_nodes(a, bend, b))
    assert len(coef) == 5 and abs(coef[4]) > 1e-3  # a genuine quartic
    p = np.polynomial.Polynomial(coef)
    t = res.t.numpy()
    scale = float(np.abs(p(t)).max())
    np.testing.assert_allclose(res.loss.numpy(), p(t), rtol=0, atol=1e-12 * scale)

    # Grid maxima: at most max|L''|·h²/8 below the continuous maxima found by root finding.
    h = 1 / (points - 1)
    curvature = float(np.abs(p.deriv(2)(np.linspace(0, 1, 10001))).max()) * 1.01
    peak, _ = poly_max(coef)
    gap = peak - max(p(0.0), p(1.0)) - res.barrier_height
    assert 0 <= gap <= curvature * h**2 / 8 + 1e-12
    chord_peak, _ = poly_max(chord_coef(coef))
    gap_chord = chord_peak - res.barrier_above_line
    assert 0 <= gap_chord <= curvature * h**2 / 8 + 1e-12

    integral = sum(c / (k + 1) for k, c in enumerate(coef))
    exact = integral - (p(0.0) + p(1.0)) / 2
    if points % 2:
        # Composite Simpson on a quartic errs by exactly h⁴·L⁗/180 with L⁗ = 24·c₄.
        assert res.integration_rule == "simpson"
        assert res.path_integral == pytest.approx(exact + h**4 * 24 * coef[4] / 180, abs=1e-12 * scale)
    else:
        assert res.integration_rule == "trapezoid"
        assert res.path_integral == pytest.approx(
            float(np.trapezoid(p(t), t)) - (p(0.0) + p(1.0)) / 2, abs=1e-12 * scale
        )
        assert abs(res.path_integral - exact) <= curvature * h**2 / 12


def test_dense_grid_converges_to_continuous_barrier(quadratic):
    a, b = _concave_line(quadratic, t_star=0.5)
    bend = (a + b) / 2 + 0.8 * torch.randn(DIM, generator=quadratic.g, dtype=torch.float64)
    coef = quadratic.polynomial(bezier_nodes(a, bend, b))
    peak, _ = poly_max(coef)
    exact = peak - max(coef[0], coef.sum())
    gaps = [
        exact - barrier(BezierPath(a, b, bend), {"q": quadratic.evaluator()}, points=n)["q"].barrier_height
        for n in (5, 21, 201)
    ]
    assert gaps[0] >= gaps[1] >= gaps[2] >= 0
    assert gaps[2] < 1e-3 * abs(exact)


@pytest.mark.parametrize("cls", [LinearPath, BezierPath, PolychainPath])
def test_paths_hit_endpoints_and_formula(cls):
    g = torch.Generator().manual_seed(0)
    a, b, bend = (torch.randn(DIM, generator=g, dtype=torch.float64) for _ in range(3))
    path = cls(a, b) if cls is LinearPath else cls(a, b, bend)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    pts = path.points(t)
    assert torch.equal(pts[0], a) and torch.equal(pts[-1], b)
    expected = {
        LinearPath: lambda s: (1 - s) * a + s * b,
        BezierPath: lambda s: (1 - s) ** 2 * a + 2 * s * (1 - s) * bend + s**2 * b,
        PolychainPath: lambda s: (1 - 2 * s) * a + 2 * s * bend if s <= 0.5 else (2 - 2 * s) * bend + (2 * s - 1) * b,
    }[cls]
    for s, p in zip(t.tolist(), pts, strict=True):
        torch.testing.assert_close(p, expected(s), rtol=0, atol=1e-15)
    if cls is not LinearPath:
        mid = cls(a, b)  # bend initialized at the midpoint: the curve is the straight line
        torch.testing.assert_close(mid.points(t), LinearPath(a, b).points(t), rtol=0, atol=1e-15)


# Closed-form minimizers of E_t ½(φ(t)−m)ᵀA(φ(t)−m) over the bend θ (A positive definite):
# θ* = (∫c_θ·m − ∫c_θc_a·a − ∫c_θc_b·b) / ∫c_θ². Bézier: ∫c_θ = 1/3, ∫c_θ² = 2/15,
# ∫c_θc_a = ∫c_θc_b = 1/10. Polychain: 1/2, 1/3, 1/12.
OPTIMAL_BEND = {
    BezierPath: lambda a, b, m: 2.5 * m - 0.75 * (a + b),
    PolychainPath: lambda a, b, m: 1.5 * m - 0.25 * (a + b),
}


@pytest.mark.parametrize("cls", [BezierPath, PolychainPath])
def test_train_bend_finds_closed_form_optimum_and_error_shrinks_with_samples(cls):
    q = Quadratic([0.5, 1.0, 1.5, 2.0, 2.5, 3.0], seed=2)
    a = q.m + torch.randn(DIM, generator=q.g, dtype=torch.float64)
    b = q.m + torch.randn(DIM, generator=q.g, dtype=torch.float64)
    target = OPTIMAL_BEND[cls](a, b, q.m)
    start = cls(a, b)
    mean_errors = []  # relative distance to θ*, averaged over three seeds
    for t_per_step in (1, 16):
        errors = []
        for seed in range(3):
            run = train_bend(
                start,
                q,
                steps=200,
                lr=0.5,
                momentum=0.0,
                t_per_step=t_per_step,
                generator=torch.Generator().manual_seed(seed),
            )
            assert run.steps_done == 200 and run.nonfinite_step is None
            assert run.t_samples.shape == (200, t_per_step) and run.losses.shape == (200,)
            assert torch.equal(run.path.a, a) and torch.equal(run.path.b, b)
            errors.append(float((run.path.bend - target).norm() / (start.bend - target).norm()))
        mean_errors.append(sum(errors) / len(errors))
    # Fixed-step SGD stalls at a noise floor whose size falls with the samples per step
    # (measured about 0.2-0.3 with one t per step, 0.03-0.06 with 16).
    assert mean_errors[1] < 0.5 * mean_errors[0]
    assert mean_errors[1] < 0.1


def test_train_bend_through_evaluator_lowers_expected_loss():
    q = Quadratic([0.5, 1.0, 1.5, 2.0, 2.5, 3.0], seed=4)
    a = q.m + torch.randn(DIM, generator=q.g, dtype=torch.float64)
    b = q.m + torch.randn(DIM, generator=q.g, dtype=torch.float64)
    ev = q.evaluator()
    run = train_bend(
        BezierPath(a, b), ev, steps=100, lr=0.05, optimizer="adam", generator=torch.Generator().manual_seed(0)
    )
    before = barrier(run.initial_path, {"q": ev}, points=41)["q"].path_integral
    after = barrier(run.path, {"q": ev}, points=41)["q"].path_integral
    assert after < 0.5 * before


def test_train_bend_reports_nonfinite_loss_and_keeps_last_finite_bend():
    a = torch.ones(3, dtype=torch.float64)
    run = train_bend(
        BezierPath(a, a.clone()),
        lambda p: torch.log(p.sum()),
        steps=50,
        lr=10.0,
        momentum=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert run.nonfinite_step is not None and run.steps_done == run.nonfinite_step < 50
    assert run.losses.shape == (run.steps_done,) and torch.isfinite(run.losses).all()
    assert torch.isfinite(run.path.bend).all()


def test_nonfinite_losses_along_path_are_reported(quadratic):
    x = torch.zeros(2, 1, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.float64)
    ev = Evaluator(Echo(), lambda out, _: -torch.log(out[:, 0]).mean(), [(x, y)])
    a = torch.zeros(DIM, dtype=torch.float64)
    a[0] = 1.0
    b = -a  # θ₀ goes 1 → −1: log is −inf at t = ½ and NaN beyond
    res = barrier(LinearPath(a, b), {"q": ev}, points=5)["q"]
    assert res.num_nonfinite == 3 and res.first_nonfinite_t == 0.5
    assert math.isnan(res.barrier_height) and math.isnan(res.path_integral) and math.isnan(res.argmax_t)


# ---------------------------------------------------------------- mode connectivity on digits


def _train_digits(seed: int, x: Tensor, y: Tensor, steps: int = 200) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = digits_mlp(hidden=32, activation="relu").to(torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits_modes():
    xtr, ytr = digits_tensors(split="train")
    xte, yte = digits_tensors(split="test")
    xtr, xte = xtr.to(torch.float64), xte.to(torch.float64)
    model_a, model_b = _train_digits(0, xtr, ytr), _train_digits(1, xtr, ytr)
    evaluators = {
        "train": Evaluator(model_a, F.cross_entropy, [(xtr, ytr)]),
        "test": Evaluator(model_a, F.cross_entropy, [(xte, yte)]),
    }
    space = evaluators["train"].space
    return space.get_flat(model_a), space.get_flat(model_b), evaluators


def test_trained_curves_remove_most_of_the_linear_barrier(digits_modes):
    a, b, evaluators = digits_modes
    linear = barrier(LinearPath(a, b), evaluators, points=25)
    assert linear["train"].loss_a < 0.01 and linear["train"].loss_b < 0.01  # both endpoints fit the training set
    assert linear["train"].barrier_height > 0.5  # measured 1.36
    assert linear["train"].error_barrier_height > 0.2  # error rate rises by 45 points
    for cls in (BezierPath, PolychainPath):
        run = train_bend(
            cls(a, b),
            evaluators["train"],
            steps=200,
            lr=1e-2,
            optimizer="adam",
            generator=torch.Generator().manual_seed(0),
        )
        assert run.nonfinite_step is None
        curve = barrier(run.path, evaluators, points=25)
        assert curve["train"].barrier_height <= 0.25 * linear["train"].barrier_height  # Garipov et al. 2018
        assert curve["train"].path_integral <= 0.25 * linear["train"].path_integral
        assert curve["test"].barrier_height < linear["test"].barrier_height  # also on held-out data
        assert curve["test"].num_examples == 449 and curve["train"].num_examples == 1348
        assert torch.isfinite(curve["test"].error).all()


# ---------------------------------------------------------------- BatchNorm


def _bn_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def _recomputed_by_hand(model: nn.Module, flat: Tensor, batches) -> float:
    """Set weights, reset running statistics, one train-mode pass (cumulative average), eval-mode loss."""
    net = copy.deepcopy(model)
    ParameterSpace.of(net).set_flat(net, flat)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for x, _ in batches:
            net(x)
        net.eval()
        n = sum(len(y) for _, y in batches)
        return sum(len(y) / n * float(F.cross_entropy(net(x), y)) for x, y in batches)


def test_batchnorm_stale_statistics_give_a_different_wrong_barrier():
    x, y = digits_tensors(split="train")
    x = x.to(torch.float64)
    models = []
    for seed in (0, 1):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = _bn_mlp().to(torch.float64)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(150):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        models.append(net.eval())
    model_a, model_b = models
    batches = [(x[:800], y[:800]), (x[800:], y[800:])]  # unequal sizes: the recompute must weight them
    stale = Evaluator(model_a, F.cross_entropy, batches, recompute_bn=False)  # model a's running statistics
    fresh = Evaluator(model_a, F.cross_entropy, batches, recompute_bn=True)
    a, b = stale.center(), stale.space.get_flat(model_b)
    res = barrier(LinearPath(a, b), {"stale": stale, "recomputed": fresh}, points=11)
    s, r = res["stale"], res["recomputed"]
    assert (s.mode, r.mode) == ("eval", "eval+bn_recompute")

    # The recomputed curve is the correct one: it matches statistics re-estimated by hand.
    for t, loss in zip(r.t.tolist(), r.loss.tolist(), strict=True):
        assert loss == pytest.approx(_recomputed_by_hand(model_a, (1 - t) * a + t * b, batches), rel=1e-10)

    # Both endpoints fit the data once their own statistics are used; with a's they do not at b.
    assert r.loss_a < 0.01 and r.loss_b < 0.01
    assert s.loss_b > 1.0  # measured 2.51: b's weights with a's statistics
    assert r.barrier_height > 0.3  # measured 0.61
    assert s.barrier_height < 0.1  # measured 0.0: the stale endpoint b is the highest point
    assert abs(s.barrier_height - r.barrier_height) > 0.3
    mid = r.t.numel() // 2
    assert abs(float(s.loss[mid] - r.loss[mid])) > 0.5  # measured 1.48 against 0.61 at t = ½


# ---------------------------------------------------------------- measures and errors


def test_barrier_measures_on_known_curve():
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    v = torch.tensor([1.0, 2.0, 4.0, 2.0, 3.0], dtype=torch.float64)
    m = barrier_measures(t, v)
    assert m.barrier_height == 1.0  # 4 − max(1, 3)
    assert m.barrier_above_line == 2.0  # 4 − (1 + 3)/2 at t = ½
    assert m.integration_rule == "simpson" and m.argmax_t == 0.5
    assert m.path_integral == pytest.approx(0.25 / 3 * (1 + 4 * 2 + 2 * 4 + 4 * 2 + 3) - 2.0, abs=1e-15)


def test_result_is_frozen(quadratic):
    a, b = _concave_line(quadratic, 0.3)
    res = barrier(LinearPath(a, b), {"q": quadratic.evaluator()}, points=3)["q"]
    assert isinstance(res, BarrierResult) and res.points == 3
    with pytest.raises(AttributeError):
        res.barrier_height = 0.0


def test_errors_name_the_argument(quadratic):
    a = torch.zeros(DIM, dtype=torch.float64)
    ev = quadratic.evaluator()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"endpoint b must have the shape of endpoint a, \(6,\), got \(5,\)"):
        LinearPath(a, torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"endpoint a must be a flat 1-D parameter vector, got shape \(2, 3\)"):
        LinearPath(a.reshape(2, 3), a)
    with pytest.raises(ValueError, match=r"endpoint b must have endpoint a's dtype and device .*convert it"):
        LinearPath(a, a.to(torch.float32))
    with pytest.raises(ValueError, match=r"bend must have the shape of endpoint a"):
        BezierPath(a, a, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"endpoint a must be a floating-point tensor, got dtype torch.int64"):
        LinearPath(torch.zeros(DIM, dtype=torch.long), a)
    with pytest.raises(TypeError, match=r"endpoint a must be a torch.Tensor"):
        LinearPath([0.0] * DIM, a)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\].*got t=1.5"):
        LinearPath(a, a).points(torch.tensor([0.0, 1.5]))
    with pytest.raises(ValueError, match=r"points must be an integer >= 2 .*got points=1"):
        barrier(LinearPath(a, a), {"q": ev}, points=1)
    with pytest.raises(ValueError, match=r"evaluators is empty"):
        barrier(LinearPath(a, a), {}, points=5)
    with pytest.raises(TypeError, match=r"evaluators must be a mapping .*got Evaluator"):
        barrier(LinearPath(a, a), ev, points=5)
    short = torch.zeros(DIM - 1, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"evaluators\['q'\] has parameter dimension 6, but the path's endpoints have dim=5"
    ):
        barrier(LinearPath(short, short), {"q": ev}, points=5)
    with pytest.raises(TypeError, match=r"path must be a BezierPath or PolychainPath .*got LinearPath"):
        train_bend(LinearPath(a, a), ev, steps=1, lr=0.1, generator=gen)
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got steps=0"):
        train_bend(BezierPath(a, a), ev, steps=0, lr=0.1, generator=gen)
    with pytest.raises(ValueError, match=r"lr must be a positive finite number, got lr=-1"):
        train_bend(BezierPath(a, a), ev, steps=1, lr=-1, generator=gen)
    with pytest.raises(ValueError, match=r"optimizer must be one of \('sgd', 'adam'\), got optimizer='lbfgs'"):
        train_bend(BezierPath(a, a), ev, steps=1, lr=0.1, generator=gen, optimizer="lbfgs")
    with pytest.raises(ValueError, match=r"t_per_step must be an integer >= 1, got t_per_step=0"):
        train_bend(BezierPath(a, a), ev, steps=1, lr=0.1, generator=gen, t_per_step=0)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator"):
        train_bend(BezierPath(a, a), ev, steps=1, lr=0.1, generator=0)
    with pytest.raises(TypeError, match=r"loss must be an Evaluator .* or a callable"):
        train_bend(BezierPath(a, a), 3.0, steps=1, lr=0.1, generator=gen)
    with pytest.raises(ValueError, match=r"loss must return a scalar tensor"):
        train_bend(BezierPath(a, a), lambda p: p, steps=1, lr=0.1, generator=gen)
    with pytest.raises(ValueError, match=r"t and values must be 1-D of one length"):
        barrier_measures(torch.linspace(0, 1, 3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"need at least 2 positions"):
        barrier_measures(torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match=r"t must increase strictly from 0 to 1"):
        barrier_measures(torch.tensor([0.0, 0.7, 0.5, 1.0]), torch.zeros(4))
