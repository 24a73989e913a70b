"""probe.slq (stochastic Lanczos quadrature) against exact float64 references.

References: the dense digits-MLP Hessian from ``torch.func.hessian`` (moments
``tr(H^q)/p``, quadratic forms ``vᵀH^q v``) and dense matrices with known spectra.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from probe.operators import DenseOperator
from probe.slq import SIGMA_FRACTION, spectral_density


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def per_run_moment(result, q: int) -> torch.Tensor:
    return torch.stack([(w * v**q).sum() for v, w in zip(result.ritz_values, result.ritz_weights, strict=True)])


def gapped_spectrum(n: int = 400) -> torch.Tensor:
    """30% of the eigenvalues in [-1, -0.1], 70% in [0.1, 2]: no eigenvalue near 0."""
    neg = int(0.3 * n)
    return torch.cat(
        [torch.linspace(-1, -0.1, neg, dtype=torch.float64), torch.linspace(0.1, 2, n - neg, dtype=torch.float64)]
    )


@pytest.fixture(scope="module")
def mlp_density(mlp_problem):
    """SLQ of the digits-MLP Hessian with the default 80 steps and 16 runs."""
    return spectral_density(mlp_problem.operators[torch.float64], runs=16, steps=80, generator=seeded(1))


# --------------------------------------------------------------------------- quadrature and moments


def test_quadrature_moments_equal_dense_quadratic_forms_per_run(mlp_problem):
    """Σⱼ wⱼ θⱼ^q = vᵀH^q v/‖v‖² for every run and every q < 2m (the start vectors are
    the Rademacher vectors ``op.random_vectors`` draws from the same seed)."""
    op = mlp_problem.operators[torch.float64]
    runs, m = 4, 20
    result = spectral_density(op, runs=runs, steps=m, generator=seeded(0))
    v = op.random_vectors(runs, generator=seeded(0), kind="rademacher")  # (p, runs)
    powered = v.clone()  # H^q v, computed with the dense Hessian
    for q in range(2 * m):
        exact = (v * powered).sum(0) / (v * v).sum(0)
        quad = per_run_moment(result, q)
        rel = ((quad - exact).abs() / exact.abs()).max().item()
        assert rel < 1e-10, f"q={q}: relative error {rel:.3g}"
        powered = mlp_problem.hessian @ powered


def test_first_two_moments_match_trace_and_frobenius_within_three_stderr(mlp_problem, mlp_density):
    p = mlp_problem.dim
    exact = {1: mlp_problem.hessian.trace().item() / p, 2: (mlp_problem.hessian**2).sum().item() / p}
    for q, ref in exact.items():
        est, stderr = mlp_density.moment(q)
        assert stderr > 0
        assert abs(est - ref) < 3 * stderr, f"q={q}: {est:.6g} ± {stderr:.3g} vs exact {ref:.6g}"
        per_run = per_run_moment(mlp_density, q)
        assert est == pytest.approx(per_run.mean().item(), rel=1e-14)
        assert stderr == pytest.approx((per_run.std() / math.sqrt(mlp_density.runs)).item(), rel=1e-12)


def test_density_integrates_to_one_and_keeps_the_moments(mlp_density):
    """Gaussian smoothing keeps the mean and adds σ² to the second moment (σ is a standard deviation)."""
    grid, density, sigma = mlp_density.grid, mlp_density.density, mlp_density.sigma
    assert grid.shape == density.shape == mlp_density.density_stderr.shape == (1000,)
    assert torch.all(density >= 0)
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-4)
    m1, _ = mlp_density.moment(1)
    m2, _ = mlp_density.moment(2)
    assert torch.trapezoid(grid * density, grid).item() == pytest.approx(m1, abs=1e-4 * mlp_density.lambda_max)
    assert torch.trapezoid(grid**2 * density, grid).item() == pytest.approx(m2 + sigma**2, rel=1e-3)
    # The grid spans the Ritz extremes ± 3σ, and the default σ is 5% of the Ritz half-width.
    assert grid[0].item() == pytest.approx(mlp_density.lambda_min - 3 * sigma, rel=1e-12)
    assert grid[-1].item() == pytest.approx(mlp_density.lambda_max + 3 * sigma, rel=1e-12)
    assert sigma == pytest.approx(SIGMA_FRACTION * 0.5 * (mlp_density.lambda_max - mlp_density.lambda_min), rel=1e-12)


def test_ritz_extremes_bracket_inside_the_exact_spectrum(mlp_problem, mlp_density):
    lam = mlp_problem.eigenvalues
    assert lam[0].item() - 1e-10 <= mlp_density.lambda_min and mlp_density.lambda_max <= lam[-1].item() + 1e-10
    assert mlp_density.lambda_max == pytest.approx(lam[-1].item(), rel=1e-8)  # 80 steps converge the outlier


def test_moment_error_shrinks_as_runs_grow(mlp_problem):
    """Hutchinson-type error: expected ratio √(36/4) = 3 for both the estimate and its stderr."""
    op = mlp_problem.operators[torch.float64]
    p = mlp_problem.dim
    exact = {1: mlp_problem.hessian.trace().item() / p, 2: (mlp_problem.hessian**2).sum().item() / p}

    def mean_error_and_stderr(runs: int, q: int) -> tuple[float, float]:
        results = [spectral_density(op, runs=runs, steps=3, generator=seeded(100 + s)).moment(q) for s in range(8)]
        return statistics.fmean(abs(e - exact[q]) for e, _ in results), statistics.fmean(s for _, s in results)

    for q in (1, 2):
        err_few, se_few = mean_error_and_stderr(4, q)
        err_many, se_many = mean_error_and_stderr(36, q)
        assert err_many < err_few / 2, f"q={q}: mean |error| {err_few:.3g} -> {err_many:.3g}"
        assert 2 < se_few / se_many < 4.5, f"q={q}: stderr ratio {se_few / se_many:.2f}"


# --------------------------------------------------------------------------- negative spectrum


def test_negative_fraction_matches_the_dense_count(known_spectrum):
    spec = known_spectrum(gapped_spectrum(), seed=1)
    exact = (spec.eigenvalues < 0).double().mean().item()  # 0.3
    result = spectral_density(spec.op, runs=30, steps=40, generator=seeded(2))
    est, stderr = result.negative_fraction()
    assert 0 < stderr < 0.02
    assert abs(est - exact) < 3 * stderr, f"{est:.4f} ± {stderr:.4f} vs exact {exact}"


def test_negative_mass_matches_the_dense_share_of_negative_mass(known_spectrum):
    spec = known_spectrum(gapped_spectrum(), seed=1)
    lam = spec.eigenvalues
    exact = ((-lam).clamp_min(0).sum() / lam.abs().sum()).item()
    result = spectral_density(spec.op, runs=30, steps=40, generator=seeded(3))
    est, stderr = result.negative_mass()
    assert 0 < stderr < 0.02
    assert abs(est - exact) < 3 * stderr, f"{est:.4f} ± {stderr:.4f} vs exact {exact:.4f}"


def test_negative_mass_of_the_hessian_matches_dense(mlp_problem, mlp_density):
    lam = mlp_problem.eigenvalues
    exact = ((-lam).clamp_min(0).sum() / lam.abs().sum()).item()
    est, stderr = mlp_density.negative_mass()
    assert abs(est - exact) < 3 * stderr, f"{est:.4f} ± {stderr:.4f} vs exact {exact:.4f}"


def test_a_positive_semidefinite_matrix_has_no_negative_mass(known_spectrum):
    """Half the eigenvalues exactly 0: rounding-level negative Ritz values must not count."""
    lam = torch.cat([torch.zeros(100, dtype=torch.float64), torch.linspace(0.5, 3, 100, dtype=torch.float64)])
    result = spectral_density(known_spectrum(lam, seed=2).op, runs=5, steps=30, generator=seeded(0))
    assert result.negative_fraction()[0] == 0.0
    assert result.negative_mass()[0] < 1e-12


def test_log_abs_density_splits_the_weight_by_sign(known_spectrum):
    spec = known_spectrum(gapped_spectrum(), seed=1)
    result = spectral_density(spec.op, runs=10, steps=40, generator=seeded(4))
    grid, pos, neg = result.log_abs_density(sigma=0.05)
    negative_weight = torch.stack(
        [w[v < 0].sum() for v, w in zip(result.ritz_values, result.ritz_weights, strict=True)]
    ).mean()
    assert torch.trapezoid(neg, grid).item() == pytest.approx(negative_weight.item(), abs=2e-3)
    assert torch.trapezoid(pos, grid).item() == pytest.approx(1 - negative_weight.item(), abs=2e-3)
    # |λ| ≤ 1 on the negative side: its density has only the kernel's tail above log10(1) = 0.
    assert neg[grid > 4 * 0.05].max().item() < 1e-3 * neg.max().item()


# --------------------------------------------------------------------------- smoothing width


def test_sigma_is_a_standard_deviation_in_eigenvalue_units():
    """A single eigenvalue repeated: every run breaks down after one step, and the
    density is exactly the normal density N(c, sigma²)."""
    c, sigma = 2.5, 0.3
    op = DenseOperator(c * torch.eye(50, dtype=torch.float64))
    result = spectral_density(op, runs=3, steps=10, sigma=sigma, grid_points=1201, generator=seeded(0))
    assert result.breakdown.tolist() == [True, True, True]
    assert result.num_matvecs == 3
    for v, w in zip(result.ritz_values, result.ritz_weights, strict=True):
        assert torch.allclose(v, torch.tensor([c], dtype=torch.float64), rtol=1e-15)
        assert torch.allclose(w, torch.ones(1, dtype=torch.float64), rtol=1e-15)
    assert result.sigma == sigma
    g = result.grid
    normal = torch.exp(-0.5 * ((g - c) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    assert torch.allclose(result.density, normal, rtol=1e-12, atol=0)
    assert torch.all(result.density_stderr.abs() < 1e-12)  # identical runs
    # One standard deviation from the peak, the density has fallen by e^{-1/2}.
    assert g[600].item() == pytest.approx(c, abs=1e-12) and g[800].item() == pytest.approx(c + sigma, abs=1e-12)
    assert result.density[800].item() / result.density[600].item() == pytest.approx(math.exp(-0.5), rel=1e-12)


def test_scaling_the_matrix_scales_sigma_and_the_grid(known_spectrum):
    """SLQ of sA with sigma sσ is the SLQ of A with sigma σ in eigenvalue units: φ_{sA}(st) = φ_A(t)/s."""
    spec = known_spectrum(gapped_spectrum(200), seed=3)
    s = 10.0
    small = spectral_density(spec.op, runs=4, steps=20, sigma=0.05, generator=seeded(5))
    large = spectral_density(DenseOperator(s * spec.matrix), runs=4, steps=20, sigma=s * 0.05, generator=seeded(5))
    assert torch.allclose(large.grid, s * small.grid, rtol=1e-12, atol=1e-12)
    assert torch.allclose(s * large.density, small.density, rtol=1e-9, atol=1e-12)
    default_small = spectral_density(spec.op, runs=4, steps=20, generator=seeded(5))
    default_large = spectral_density(DenseOperator(s * spec.matrix), runs=4, steps=20, generator=seeded(5))
    assert default_large.sigma == pytest.approx(s * default_small.sigma, rel=1e-12)


# --------------------------------------------------------------------------- reproducibility and reorth


def test_same_seed_same_numbers(mlp_problem):
    op = mlp_problem.operators[torch.float64]
    a = spectral_density(op, runs=3, steps=10, generator=seeded(11))
    b = spectral_density(op, runs=3, steps=10, generator=seeded(11))
    c = spectral_density(op, runs=3, steps=10, generator=seeded(12))
    assert torch.equal(a.density, b.density) and torch.equal(a.grid, b.grid) and a.sigma == b.sigma
    assert all(torch.equal(x, y) for x, y in zip(a.ritz_values, b.ritz_values, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a.ritz_weights, b.ritz_weights, strict=True))
    assert not torch.equal(a.density, c.density)


def test_without_reorthogonalization_the_quadrature_moments_stay_exact(known_spectrum):
    """Plain Lanczos on outliers plus a bulk makes ghosts, yet its low quadrature moments stay exact (Paige)."""
    bulk = torch.rand(297, generator=seeded(1), dtype=torch.float64)
    spec = known_spectrum(torch.cat([torch.tensor([100.0, 50.0, 20.0], dtype=torch.float64), bulk]), seed=4)
    runs, p = 6, 300
    result = spectral_density(spec.op, runs=runs, steps=80, reorth="none", generator=seeded(6))
    assert result.reorth == "none" and torch.all(torch.isnan(result.orthogonality_loss))
    ghosts = [int(((v - 100).abs() < 1e-6).sum()) for v in result.ritz_values]
    assert min(ghosts) >= 2, ghosts  # orthogonality really was lost
    v = spec.op.random_vectors(runs, generator=seeded(6), kind="rademacher")
    for q in (0, 1, 2, 3):
        exact_per_run = spec.quadratic_form(v, q) / p
        assert torch.allclose(per_run_moment(result, q), exact_per_run, rtol=1e-10, atol=0), q


def test_without_reorthogonalization_the_first_two_moments_match_the_hessian(mlp_problem):
    op = mlp_problem.operators[torch.float64]
    p = mlp_problem.dim
    plain = spectral_density(op, runs=16, steps=80, reorth="none", generator=seeded(7))
    full = spectral_density(op, runs=16, steps=80, reorth="full", generator=seeded(7))
    exact = {1: mlp_problem.hessian.trace().item() / p, 2: (mlp_problem.hessian**2).sum().item() / p}
    for q, ref in exact.items():
        assert torch.allclose(per_run_moment(plain, q), per_run_moment(full, q), rtol=1e-10, atol=0)
        est, stderr = plain.moment(q)
        assert abs(est - ref) < 3 * stderr, f"q={q}: {est:.6g} ± {stderr:.3g} vs exact {ref:.6g}"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"runs": 0}, r"runs must be at least 1, got runs=0"),
        ({"steps": 0}, r"steps must be in \[1, dim=20\], got steps=0; choose a step count in that range"),
        ({"steps": 21}, r"steps must be in \[1, dim=20\], got steps=21; choose a step count in that range"),
        ({"sigma": 0.0}, r"sigma must be positive \(eigenvalue units\), got sigma=0.0"),
        ({"sigma": -1.0}, r"sigma must be positive \(eigenvalue units\), got sigma=-1.0"),
        ({"grid_points": 1}, r"grid_points must be at least 2, got grid_points=1"),
        ({"reorth": "partial"}, r"reorth must be one of \('full', 'selective', 'none'\), got reorth='partial'"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    op = DenseOperator(torch.diag(torch.linspace(0, 1, 20, dtype=torch.float64)))
    kwargs = {"steps": 5} | kwargs
    with pytest.raises(ValueError, match=match):
        spectral_density(op, **kwargs)
