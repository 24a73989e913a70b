"""XTrace and Krylov-aware Hutch++ (probe.trace_lowrank) against dense references.

References: matrices ``Q diag(λ) Qᵀ`` with known spectra (ten outliers over a decaying
bulk, the shape of a classifier's Hessian) and the dense float64 Hessian of the digits
MLP. Stochastic claims are checked over many fixed seeds: the mean of the estimates
within three standard errors of the exact trace, the variance against Hutch++'s at the
same number of products, and the reported standard error against the actual spread.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from counting import CountingOperator, seeded

from probe.operators import DenseOperator
from probe.trace import hutchpp, trace
from probe.trace_lowrank import krylov_hutchpp, xtrace

NEW = {
    "xtrace": lambda op, m, g: xtrace(op, m, generator=g),
    "xtrace-rademacher": lambda op, m, g: xtrace(op, m, generator=g, kind="rademacher"),
    "krylov-hutch++": lambda op, m, g: krylov_hutchpp(op, m, generator=g),
}
ON_HESSIAN = ("xtrace", "krylov-hutch++")  # products with the 2,410-dimensional Hessian dominate the file's time
BUDGET = 60
SEEDS = range(200)


def spread(estimator, op, budget: int, seeds) -> dict:
    """Mean and standard deviation of the estimates over ``seeds``, and the mean reported stderr."""
    results = [estimator(op, budget, seeded(s)) for s in seeds]
    traces = [r.trace for r in results]
    assert all(r.num_matvecs <= budget for r in results)
    return {
        "mean": statistics.fmean(traces),
        "sd": statistics.stdev(traces),
        "stderr": statistics.fmean(r.trace_stderr for r in results),
        "n": len(results),
    }


@pytest.fixture(scope="module")
def outliers(known_spectrum):
    """Ten outliers (20 down to 5) over a bulk ``1/i`` on 300 dimensions, and every estimator's spread."""
    lam = torch.cat([torch.linspace(20, 5, 10, dtype=torch.float64), 1 / torch.arange(1, 291, dtype=torch.float64)])
    spec = known_spectrum(lam, seed=11)
    runs = {name: spread(f, spec.op, BUDGET, SEEDS) for name, f in NEW.items()}
    runs["hutch++"] = spread(lambda op, m, g: hutchpp(op, m, generator=g), spec.op, BUDGET, SEEDS)
    return lam.sum().item(), runs


@pytest.fixture(scope="module")
def hessian_runs(mlp_problem):
    """XTrace and Krylov-aware Hutch++ on the dense float64 digits-MLP Hessian (2,410 parameters), 16 seeds each."""
    op = DenseOperator(mlp_problem.hessian)
    return mlp_problem.hessian.trace().item(), {name: spread(NEW[name], op, BUDGET, range(16)) for name in ON_HESSIAN}


# --------------------------------------------------------------------------- statistics over seeds


CASES = [("outliers", name) for name in NEW] + [("hessian_runs", name) for name in ON_HESSIAN]


@pytest.mark.parametrize("reference,name", CASES)
def test_mean_over_seeds_is_within_three_standard_errors_of_the_exact_trace(request, reference, name):
    exact, runs = request.getfixturevalue(reference)
    r = runs[name]
    z = (r["mean"] - exact) / (r["sd"] / math.sqrt(r["n"]))
    assert abs(z) < 3, f"{name} on {reference}: mean {r['mean']:.5f}, exact {exact:.5f}, z = {z:.2f}"


@pytest.mark.parametrize("name", NEW)
def test_variance_is_well_below_hutchpp_at_equal_products_on_outliers(outliers, name):
    """Measured over 200 seeds: Hutch++'s variance is about 2.5× that of each new estimator here."""
    _, runs = outliers
    ratio = (runs["hutch++"]["sd"] / runs[name]["sd"]) ** 2
    assert ratio > 1.8, f"{name}: variance ratio Hutch++/{name} = {ratio:.2f}"


@pytest.mark.parametrize("reference,name", CASES)
def test_reported_stderr_tracks_the_spread_over_seeds(request, reference, name):
    """XTrace's leave-one-out error estimate is an estimate (its terms are exchangeable, not
    independent); both it and the Hutchinson stderr must match the actual spread within 2×."""
    _, runs = request.getfixturevalue(reference)
    r = runs[name]
    ratio = r["sd"] / r["stderr"]
    assert 0.5 < ratio < 2, f"{name} on {reference}: spread {r['sd']:.4f}, mean reported stderr {r['stderr']:.4f}"


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "estimator",
    [
        lambda op, g: xtrace(op, 20, generator=g),  # 10 test vectors: each leave-one-out sketch spans 9 ≥ 6
        lambda op, g: xtrace(op, 20, generator=g, kind="rademacher"),
        lambda op, g: krylov_hutchpp(op, 40, generator=g),  # blocks of 4: A Ω and A² Ω cover the range
    ],
)
def test_exact_when_the_rank_is_within_the_sketch(known_spectrum, estimator):
    lam = torch.zeros(200, dtype=torch.float64)
    lam[:6] = torch.tensor([9.0, 4.0, 2.5, -1.5, -3.0, 0.7], dtype=torch.float64)  # indefinite, rank 6
    spec = known_spectrum(lam, seed=12)
    for seed in range(3):
        result = estimator(spec.op, seeded(seed))
        assert result.trace == pytest.approx(lam.sum().item(), abs=1e-9)
        assert result.trace_stderr <= 1e-9


def test_xtrace_is_exact_when_its_test_vectors_span_the_space(known_spectrum):
    """dim = 12 ≤ 15 test vectors: each leave-one-out remainder has rank 1, where the
    normalized sample is exact."""
    spec = known_spectrum(torch.linspace(-1, 2, 12, dtype=torch.float64), seed=13)
    result = xtrace(spec.op, 30, generator=seeded(0))
    assert result.trace == pytest.approx(spec.eigenvalues.sum().item(), abs=1e-10)
    assert result.num_matvecs == 24


# --------------------------------------------------------------------------- the downdating


def naive_xtrace(a: torch.Tensor, omega: torch.Tensor, normalized: bool) -> torch.Tensor:
    """The leave-one-out estimates by definition: a fresh basis and projector for each left-out vector."""
    n, m = omega.shape
    y = a @ omega
    estimates = []
    for i in range(m):
        q, _ = torch.linalg.qr(torch.cat([y[:, :i], y[:, i + 1 :]], 1))
        p_omega = omega[:, i] - q @ (q.T @ omega[:, i])
        sample = p_omega @ a @ p_omega
        if normalized:
            sample = sample * (n - m + 1) / (p_omega @ p_omega)
        estimates.append((q.T @ a @ q).trace() + sample)
    return torch.stack(estimates)


@pytest.mark.parametrize("kind", ["sphere", "rademacher"])
def test_xtrace_downdating_equals_the_naive_leave_one_out_loop(known_spectrum, kind):
    lam = torch.cat([torch.tensor([30.0, 12.0, -8.0]), torch.linspace(-0.5, 1.0, 77)]).to(torch.float64)
    spec = known_spectrum(lam, seed=14)
    result = xtrace(spec.op, 24, generator=seeded(5), kind=kind)
    omega = spec.op.random_vectors(12, generator=seeded(5), kind="gaussian" if kind == "sphere" else "rademacher")
    if kind == "sphere":
        omega = omega * (80 / (omega**2).sum(0)).sqrt()
    estimates = naive_xtrace(spec.matrix, omega, normalized=kind == "sphere")
    assert result.trace == pytest.approx(estimates.mean().item(), rel=1e-10)
    assert result.trace_stderr == pytest.approx((estimates.std() / math.sqrt(12)).item(), rel=1e-8)
    assert result.num_samples == 12


# --------------------------------------------------------------------------- budget


@pytest.mark.parametrize(
    "method,num_matvecs,spent", [("xtrace", 37, 36), ("xtrace", 102, 102), ("krylov-hutch++", 37, 37)]
)
def test_products_spent_are_counted_and_within_budget(known_spectrum, method, num_matvecs, spent):
    spec = known_spectrum(torch.linspace(0, 1, 150, dtype=torch.float64), seed=15)
    op = CountingOperator(spec.matrix)
    result = trace(op, method=method, num_matvecs=num_matvecs, generator=seeded(0), block_size=5)
    assert result.method == method
    assert result.num_matvecs == op.columns == spent


@pytest.mark.parametrize(
    "krylov_block,sketch_fraction,samples", [(4, 0.5, 54), (1, 0.5, 51), (8, 0.7, 38), (2, 0.25, 78)]
)
def test_krylov_budget_split(known_spectrum, krylov_block, sketch_fraction, samples):
    """``floor(fraction · m)`` products, rounded down to whole blocks, build the Krylov space; the rest are probes."""
    spec = known_spectrum(torch.linspace(0, 1, 150, dtype=torch.float64), seed=16)
    op = CountingOperator(spec.matrix)
    r = krylov_hutchpp(op, 102, generator=seeded(0), krylov_block=krylov_block, sketch_fraction=sketch_fraction)
    assert (r.num_samples, r.num_matvecs, op.columns) == (samples, 102, 102)


def test_krylov_space_that_turns_invariant_hands_its_products_to_hutchinson():
    """A = I on 10 dimensions: Ω spans an invariant space, so one block is all the sketch can use."""
    op = CountingOperator(torch.eye(10, dtype=torch.float64))
    r = krylov_hutchpp(op, 30, generator=seeded(0))
    assert (r.num_samples, r.num_matvecs, op.columns) == (26, 30, 30)
    assert r.trace == pytest.approx(10.0, abs=3 * r.trace_stderr + 1e-12)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda op: xtrace(op, 3), r"num_matvecs must be at least 4 for a standard error, got num_matvecs=3"),
        (lambda op: xtrace(op, 10, kind="gaussian"), r"kind must be one of \('sphere', 'rademacher'\)"),
        (lambda op: krylov_hutchpp(op, 5), r"num_matvecs must be at least 6 for a standard error"),
        (lambda op: krylov_hutchpp(op, 10, krylov_block=0), r"krylov_block must be at least 1, got krylov_block=0"),
        (lambda op: krylov_hutchpp(op, 10, sketch_fraction=1.0), r"sketch_fraction must be in \(0, 1\)"),
        (lambda op: trace(op, method="xtrace", num_matvecs=10, block_size=0), r"block_size must be at least 1"),
    ],
)
def test_bad_arguments_are_rejected(call, match):
    op = DenseOperator(torch.eye(20, dtype=torch.float64))
    with pytest.raises(ValueError, match=match):
        call(op)
