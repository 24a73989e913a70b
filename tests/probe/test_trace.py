"""probe.trace (Hutchinson, Hutch++) against exact traces.

References: the trace of the dense float64 digits-MLP Hessian (``torch.func.hessian``)
and dense matrices with known spectra. Stochastic claims are tested as "error
shrinks as samples grow" over several fixed seeds, never as snapshot numbers.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from counting import CountingOperator, seeded

from probe.operators import DenseOperator
from probe.trace import METHODS, hutchinson, hutchpp, trace

ESTIMATORS = {"hutchinson": hutchinson, "hutch++": hutchpp}
SEEDS = range(8)


def mean_abs_error(estimator, op, exact: float, num_matvecs: int, seeds=None) -> tuple[float, float]:
    """Mean |estimate − exact| and mean reported stderr over ``seeds`` (default ``SEEDS``)."""
    results = [estimator(op, num_matvecs, generator=seeded(s)) for s in (seeds or SEEDS)]
    return (
        statistics.fmean(abs(r.trace - exact) for r in results),
        statistics.fmean(r.trace_stderr for r in results),
    )


# --------------------------------------------------------------------------- digits MLP Hessian


@pytest.mark.parametrize("method", METHODS)
def test_estimate_within_three_standard_errors_of_the_exact_hessian_trace(mlp_problem, method):
    op = mlp_problem.operators[torch.float64]
    exact = mlp_problem.hessian.trace().item()
    for seed in range(4):
        result = trace(op, method=method, num_matvecs=102, generator=seeded(seed))
        assert result.method == method
        assert result.num_matvecs == 102
        assert math.isfinite(result.trace_stderr) and result.trace_stderr > 0
        z = (result.trace - exact) / result.trace_stderr
        assert abs(z) < 3, f"seed {seed}: estimate {result.trace:.4f}, exact {exact:.4f}, z = {z:.2f}"


@pytest.mark.parametrize("method,min_ratio", [("hutchinson", 2.0), ("hutch++", 3.0)])
def test_error_shrinks_as_probes_grow(mlp_problem, method, min_ratio):
    """Hutchinson's error falls like 1/√m (expected ratio 3 from m=10 to 90), Hutch++'s
    faster on a decaying spectrum (up to 1/m: ratio 9)."""
    op = mlp_problem.operators[torch.float64]
    exact = mlp_problem.hessian.trace().item()
    mae_small, _ = mean_abs_error(ESTIMATORS[method], op, exact, 10 if method == "hutchinson" else 12)
    mae_large, _ = mean_abs_error(ESTIMATORS[method], op, exact, 90)
    assert mae_large < mae_small / min_ratio, f"{method}: mean |error| {mae_small:.3f} -> {mae_large:.3f}"


def test_hutchinson_stderr_shrinks_like_inverse_sqrt_probes(mlp_problem):
    op = mlp_problem.operators[torch.float64]
    exact = mlp_problem.hessian.trace().item()
    _, se_small = mean_abs_error(hutchinson, op, exact, 10)
    _, se_large = mean_abs_error(hutchinson, op, exact, 90)
    assert 2.2 < se_small / se_large < 3.8, f"stderr ratio {se_small / se_large:.2f}, expected √9 = 3"


def test_hutchpp_beats_hutchinson_at_equal_budget_on_the_hessian(mlp_problem):
    op = mlp_problem.operators[torch.float64]
    exact = mlp_problem.hessian.trace().item()
    seeds = range(16)  # a mean absolute error over a handful of seeds is too noisy to rank the two
    mae_h, se_h = mean_abs_error(hutchinson, op, exact, 90, seeds)
    mae_pp, se_pp = mean_abs_error(hutchpp, op, exact, 90, seeds)
    assert mae_pp < mae_h / 1.5 and se_pp < se_h / 1.5, (mae_h, mae_pp, se_h, se_pp)


# --------------------------------------------------------------------------- known spectra


def test_hutchpp_beats_hutchinson_at_equal_budget_on_a_decaying_spectrum(known_spectrum):
    """λᵢ = 1/i²: the sketch captures the head exactly, leaving a remainder of tiny variance."""
    lam = 1.0 / torch.arange(1, 501, dtype=torch.float64) ** 2
    spec = known_spectrum(lam, seed=1)
    exact = lam.sum().item()
    mae_h, _ = mean_abs_error(hutchinson, spec.op, exact, 60)
    mae_pp, _ = mean_abs_error(hutchpp, spec.op, exact, 60)
    assert mae_pp < mae_h / 10, (mae_h, mae_pp)


def test_hutchinson_is_exact_on_a_diagonal_matrix():
    """Rademacher probes: zᵀDz = Σ dᵢ zᵢ² = tr D for every probe, so the spread is zero."""
    d = torch.linspace(-3, 5, 40, dtype=torch.float64)
    result = hutchinson(DenseOperator(torch.diag(d)), 20, generator=seeded(0))
    assert result.trace == pytest.approx(d.sum().item(), rel=1e-14)
    assert result.trace_stderr <= 1e-13


def test_hutchinson_stderr_matches_the_rademacher_variance(known_spectrum):
    """Var[zᵀAz] = 2(‖A‖_F² − Σᵢ Aᵢᵢ²) for Rademacher z; the stderr must estimate √(Var/m)."""
    spec = known_spectrum(torch.linspace(-1, 2, 200, dtype=torch.float64), seed=2)
    a = spec.matrix
    sd = math.sqrt(2 * ((a**2).sum() - (torch.diagonal(a) ** 2).sum()).item())
    m = 800
    result = hutchinson(spec.op, m, generator=seeded(0))
    assert result.trace_stderr * math.sqrt(m) == pytest.approx(sd, rel=0.1)
    assert abs(result.trace - a.trace().item()) < 3 * result.trace_stderr


def test_hutchpp_is_exact_when_the_sketch_spans_the_space(known_spectrum):
    """dim = 12 and a budget of 60: the sketch has 12 columns. When the Rademacher
    sketch has full rank, tr(QᵀAQ) is the whole trace and the remainder is zero;
    when it happens to be singular (a 12×12 ±1 matrix often is), the remainder's
    Hutchinson term must still cover the error."""
    spec = known_spectrum(torch.linspace(-1, 2, 12, dtype=torch.float64), seed=3)
    exact = spec.eigenvalues.sum().item()
    exact_runs = 0
    for seed in range(10):
        result = hutchpp(spec.op, 60, generator=seeded(seed))
        if result.trace_stderr <= 1e-12:
            assert result.trace == pytest.approx(exact, abs=1e-12)
            assert result.sketch_trace == pytest.approx(exact, abs=1e-12)
            exact_runs += 1
        else:
            assert abs(result.trace - exact) < 3 * result.trace_stderr
    assert exact_runs >= 7


@pytest.mark.parametrize("method,num_matvecs", [("hutchinson", 37), ("hutch++", 37), ("hutch++", 102)])
def test_num_matvecs_is_what_the_operator_saw(known_spectrum, method, num_matvecs):
    spec = known_spectrum(torch.linspace(0, 1, 150, dtype=torch.float64), seed=4)
    op = CountingOperator(spec.matrix)
    result = trace(op, method=method, num_matvecs=num_matvecs, generator=seeded(0), block_size=5)
    assert result.num_matvecs == op.columns == num_matvecs
    if method == "hutch++":
        s = num_matvecs // 3
        assert result.num_samples == num_matvecs - 2 * s


@pytest.mark.parametrize("method", METHODS)
def test_block_size_does_not_change_the_estimate(known_spectrum, method):
    spec = known_spectrum(torch.linspace(0, 1, 150, dtype=torch.float64), seed=5)
    a = trace(spec.op, method=method, num_matvecs=30, generator=seeded(1), block_size=1)
    b = trace(spec.op, method=method, num_matvecs=30, generator=seeded(1), block_size=8)
    assert a.trace == pytest.approx(b.trace, rel=1e-12)
    assert a.trace_stderr == pytest.approx(b.trace_stderr, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_numbers(known_spectrum, method):
    spec = known_spectrum(torch.linspace(0, 1, 150, dtype=torch.float64), seed=6)
    a = trace(spec.op, method=method, num_matvecs=30, generator=seeded(9))
    b = trace(spec.op, method=method, num_matvecs=30, generator=seeded(9))
    c = trace(spec.op, method=method, num_matvecs=30, generator=seeded(10))
    assert (a.trace, a.trace_stderr) == (b.trace, b.trace_stderr)
    assert a.trace != c.trace


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda op: hutchinson(op, 1), r"num_matvecs must be at least 2 for a standard error, got num_matvecs=1"),
        (lambda op: hutchpp(op, 5), r"num_matvecs must be at least 6 for a standard error, got num_matvecs=5"),
        (lambda op: hutchinson(op, 10, block_size=0), r"block_size must be at least 1, got block_size=0"),
        (lambda op: hutchpp(op, 10, block_size=0), r"block_size must be at least 1, got block_size=0"),
        (
            lambda op: trace(op, method="hutch", num_matvecs=10),
            r"method must be one of \('hutchinson', 'hutch\+\+', 'xtrace', 'krylov-hutch\+\+'\), got method='hutch'",
        ),
        (
            lambda op: trace(op, method="hutch++", num_matvecs=3),
            r"num_matvecs must be at least 6 for a standard error, got num_matvecs=3",
        ),
    ],
)
def test_bad_arguments_are_rejected(call, match):
    op = DenseOperator(torch.eye(20, dtype=torch.float64))
    with pytest.raises(ValueError, match=match):
        call(op)
