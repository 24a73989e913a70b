"""probe.lanczos on dense float64 matrices with known spectra (``Q diag(λ) Qᵀ``, random orthogonal Q)."""

from __future__ import annotations

import pytest
import torch

from probe.lanczos import REORTH_MODES, LanczosProcess, lanczos
from probe.operators import DenseOperator

N = 300


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uniform_spectrum(n: int = N, lo: float = 0.1, hi: float = 2.0) -> torch.Tensor:
    return torch.linspace(lo, hi, n, dtype=torch.float64)


def outlier_spectrum(n: int = N) -> torch.Tensor:
    """Three well-separated outliers above a bulk in [0, 1]: the Ritz values of the
    outliers converge within a few steps, which is what makes plain Lanczos lose
    orthogonality (Paige 1971)."""
    bulk = torch.rand(n - 3, generator=seeded(1), dtype=torch.float64)
    return torch.cat([torch.tensor([100.0, 50.0, 20.0], dtype=torch.float64), bulk])


def gaussian_start(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, generator=seeded(seed), dtype=torch.float64)


def measured_orthogonality_loss(result, run: int) -> float:
    """``max_{i≠j} |q_iᵀ q_j|`` recomputed from the returned basis (all columns kept)."""
    n = int(result.num_steps[run]) + (0 if bool(result.breakdown[run]) else 1)
    q = result.basis[:n, :, run]  # (n, dim)
    gram = q @ q.T
    return (gram - torch.eye(n, dtype=torch.float64)).abs().max().item()


def copies_near(values: torch.Tensor, target: float, rel: float = 1e-6) -> int:
    return int(((values - target).abs() <= rel * abs(target)).sum())


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("reorth", ["full", "selective"])
def test_basis_tridiagonalizes_the_matrix(known_spectrum, reorth):
    """T = QᵀAQ is the returned tridiagonal, and A Q_m = Q_m T + β_m q_{m+1} e_mᵀ."""
    spec = known_spectrum(uniform_spectrum())
    m, k = 25, 3
    result = lanczos(spec.op, gaussian_start(N, k, seed=0), m, reorth=reorth)
    assert result.alphas.shape == (k, m) and result.betas.shape == (k, m)
    assert result.basis.shape == (m + 1, N, k)
    scale = spec.eigenvalues.abs().max().item()
    for r in range(k):
        q = result.basis[:m, :, r].T  # (N, m)
        t = result.tridiagonal(r)
        assert t.dtype == torch.float64
        assert torch.equal(t, t.T)
        assert torch.equal(t, torch.triu(torch.tril(t, 1), -1))  # tridiagonal
        assert (q.T @ spec.matrix @ q - t).abs().max().item() < 1e-12 * scale
        residual = spec.matrix @ q - q @ t  # only the last column survives
        expected = torch.zeros_like(residual)
        expected[:, -1] = result.betas[r, m - 1] * result.basis[m, :, r]
        assert (residual - expected).abs().max().item() < 1e-12 * scale


def test_start_vector_is_normalized_and_its_norm_kept(known_spectrum):
    spec = known_spectrum(uniform_spectrum())
    start = 3.0 * gaussian_start(N, 2, seed=4)
    result = lanczos(spec.op, start, 5)
    assert torch.allclose(result.start_norms, start.norm(dim=0), rtol=1e-14)
    assert torch.allclose(result.basis[0], start / start.norm(dim=0), rtol=0, atol=1e-15)
    assert result.num_matvecs == 5 * 2


# --------------------------------------------------------------------------- orthogonality


def test_full_reorthogonalization_keeps_the_basis_orthonormal(known_spectrum):
    spec = known_spectrum(outlier_spectrum())
    result = lanczos(spec.op, gaussian_start(N, 2, seed=0), 150, reorth="full")
    assert torch.all(result.orthogonality_loss < 1e-12), result.orthogonality_loss
    for r in range(2):
        assert result.orthogonality_loss[r].item() == pytest.approx(measured_orthogonality_loss(result, r), abs=1e-15)
        values = result.ritz(r).values
        assert copies_near(values, 100.0) == 1 and copies_near(values, 50.0) == 1  # no ghosts


def test_no_reorthogonalization_loses_orthogonality_and_makes_ghosts(known_spectrum):
    spec = known_spectrum(outlier_spectrum())
    start = gaussian_start(N, 2, seed=0)
    result = lanczos(spec.op, start, 150, reorth="none", keep_basis=True)
    assert torch.all(result.orthogonality_loss > 1e-6), result.orthogonality_loss
    for r in range(2):
        assert result.orthogonality_loss[r].item() == pytest.approx(measured_orthogonality_loss(result, r), abs=1e-15)
        # λ = 100 is simple, yet the Ritz values hold several converged copies of it.
        assert copies_near(result.ritz(r).values, 100.0) >= 2
    # Without keep_basis (the default for "none") nothing is stored and the loss is unknown.
    light = lanczos(spec.op, start, 150, reorth="none")
    assert light.basis is None and torch.all(torch.isnan(light.orthogonality_loss))
    assert torch.equal(light.alphas, result.alphas) and torch.equal(light.betas, result.betas)


def test_selective_reorthogonalization_keeps_semi_orthogonality(known_spectrum):
    spec = known_spectrum(outlier_spectrum())
    result = lanczos(spec.op, gaussian_start(N, 2, seed=0), 150, reorth="selective")
    assert torch.all(result.orthogonality_loss < 1e-7), result.orthogonality_loss
    for r in range(2):
        assert result.orthogonality_loss[r].item() == pytest.approx(measured_orthogonality_loss(result, r), abs=1e-15)
        values = result.ritz(r).values
        assert copies_near(values, 100.0) == 1 and copies_near(values, 50.0) == 1 and copies_near(values, 20.0) == 1


# --------------------------------------------------------------------------- breakdown


@pytest.mark.parametrize("reorth", REORTH_MODES)
def test_breakdown_on_four_distinct_eigenvalues_gives_exact_ritz_values(known_spectrum, reorth):
    distinct = torch.tensor([-2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    spec = known_spectrum(distinct.repeat_interleave(N // 4))
    start = gaussian_start(N, 3, seed=2)
    result = lanczos(spec.op, start, 40, reorth=reorth)
    assert result.alphas.shape[1] == 4  # all runs stopped: no further steps were taken
    assert result.num_steps.tolist() == [4, 4, 4]
    assert result.breakdown.tolist() == [True, True, True]
    assert result.num_matvecs == 4 * 3
    for r in range(3):
        pairs = result.ritz(r)
        assert torch.allclose(pairs.values, distinct, rtol=0, atol=1e-13)
        assert torch.all(pairs.residual_bounds == 0)
        # Weights: squared norm of the start vector's component in each eigenspace.
        v = start[:, r] / start[:, r].norm()
        c = (spec.eigenvectors.T @ v) ** 2
        expected = torch.stack([c[spec.eigenvalues == lam].sum() for lam in distinct])
        assert torch.allclose(pairs.weights, expected, rtol=0, atol=1e-13)


def test_breakdown_is_per_run(known_spectrum):
    """A start vector in a 2-dimensional invariant subspace stops after 2 steps; the others go on."""
    spec = known_spectrum(uniform_spectrum())
    start = gaussian_start(N, 3, seed=3)
    start[:, 1] = spec.eigenvectors[:, 10] + 2 * spec.eigenvectors[:, 200]
    result = lanczos(spec.op, start, 12)
    assert result.num_steps.tolist() == [12, 2, 12]
    assert result.breakdown.tolist() == [False, True, False]
    assert torch.all(result.alphas[1, 2:] == 0) and torch.all(result.betas[1, 1:] == 0)
    pairs = result.ritz(1)
    expected = spec.eigenvalues[[10, 200]]
    assert torch.allclose(pairs.values, expected, rtol=0, atol=1e-14)
    assert torch.allclose(pairs.weights, torch.tensor([0.2, 0.8], dtype=torch.float64), atol=1e-14)


def test_breakdown_in_a_three_dimensional_invariant_subspace_of_small_eigenvalues(known_spectrum):
    spec = known_spectrum(uniform_spectrum())
    start = (spec.eigenvectors[:, 0] - spec.eigenvectors[:, 50] + spec.eigenvectors[:, 70]).unsqueeze(1)
    result = lanczos(spec.op, start, 10)
    assert result.betas[0, 2].item() < 1e-13 * spec.eigenvalues.abs().max().item()  # numerically invariant
    assert result.num_steps.tolist() == [3] and bool(result.breakdown[0])


# --------------------------------------------------------------------------- quadrature


@pytest.mark.parametrize("reorth", REORTH_MODES)
def test_gauss_quadrature_reproduces_moments_below_degree_2m(known_spectrum, reorth):
    """Σᵢ wᵢ θᵢᵏ = vᵀAᵏv (unit v) for k < 2m, and not for k ≫ 2m."""
    spec = known_spectrum(uniform_spectrum(400))
    m, runs = 10, 3
    start = gaussian_start(400, runs, seed=5)
    start = start / start.norm(dim=0)
    result = lanczos(spec.op, start, m, reorth=reorth)
    for r in range(runs):
        pairs = result.ritz(r)
        assert pairs.weights.sum().item() == pytest.approx(1.0, abs=1e-14)
        for k in range(2 * m):
            exact = spec.quadratic_form(start[:, r : r + 1], k).item()
            quad = (pairs.weights * pairs.values**k).sum().item()
            assert abs(quad - exact) <= 1e-10 * abs(exact), (r, k, quad, exact)
        for k in (6 * m, 10 * m):  # beyond the rule's degree: a polynomial of degree k is not integrated exactly
            exact = spec.quadratic_form(start[:, r : r + 1], k).item()
            quad = (pairs.weights * pairs.values**k).sum().item()
            assert abs(quad - exact) > 1e-3 * abs(exact), (r, k, quad, exact)


def test_quadrature_of_a_non_unit_start_vector_scales_with_its_norm(known_spectrum):
    spec = known_spectrum(uniform_spectrum())
    start = 5.0 * gaussian_start(N, 1, seed=6)
    result = lanczos(spec.op, start, 6)
    pairs = result.ritz(0)
    for k in range(12):
        exact = spec.quadratic_form(start, k).item()
        quad = result.start_norms[0].item() ** 2 * (pairs.weights * pairs.values**k).sum().item()
        assert quad == pytest.approx(exact, rel=1e-11)


# --------------------------------------------------------------------------- runs together


@pytest.mark.parametrize("reorth", REORTH_MODES)
def test_runs_advanced_together_equal_runs_done_one_at_a_time(known_spectrum, reorth):
    """Same coefficients to rounding. (A block product may round differently from a
    single-column one; the uniform spectrum keeps all modes far from lost
    orthogonality, where such rounding differences would grow chaotically.)"""
    spec = known_spectrum(uniform_spectrum())
    start = gaussian_start(N, 3, seed=7)
    start[:, 2] = spec.eigenvectors[:, 0] - spec.eigenvectors[:, 299]  # breaks down after 2 steps
    m = 30
    together = lanczos(spec.op, start, m, reorth=reorth, keep_basis=True)
    for r in range(3):
        alone = lanczos(spec.op, start[:, r : r + 1], m, reorth=reorth, keep_basis=True)
        n = int(alone.num_steps[0])
        assert int(together.num_steps[r]) == n
        assert bool(together.breakdown[r]) == bool(alone.breakdown[0])
        assert torch.allclose(together.alphas[r, :n], alone.alphas[0, :n], rtol=1e-12, atol=1e-12)
        assert torch.allclose(together.betas[r, :n], alone.betas[0, :n], rtol=1e-12, atol=1e-12)
        assert torch.allclose(together.ritz(r).values, alone.ritz(0).values, rtol=1e-12, atol=1e-12)
        assert torch.allclose(together.ritz(r).weights, alone.ritz(0).weights, rtol=1e-10, atol=1e-14)
        assert together.orthogonality_loss[r].item() == pytest.approx(alone.orthogonality_loss[0].item(), abs=1e-12)
    assert together.num_steps[2].item() == 2 and bool(together.breakdown[2])


def test_process_steps_and_ritz_match_the_one_shot_result(known_spectrum):
    spec = known_spectrum(uniform_spectrum())
    start = gaussian_start(N, 2, seed=8)
    process = LanczosProcess(spec.op, start, reorth="full")
    for _ in range(8):
        process.step()
    assert process.steps_done == 8
    result = lanczos(spec.op, start, 8)
    for r in range(2):
        a, b = process.ritz(r), result.ritz(r)
        assert torch.equal(a.values, b.values) and torch.equal(a.weights, b.weights)
        assert torch.equal(a.residual_bounds, b.residual_bounds)


def test_residual_bounds_equal_true_ritz_residuals(known_spectrum):
    spec = known_spectrum(outlier_spectrum())
    result = lanczos(spec.op, gaussian_start(N, 1, seed=9), 20)
    pairs = result.ritz(0)
    ritz_vectors = result.basis[:20, :, 0].T @ pairs.vectors  # (N, 20)
    true = (spec.matrix @ ritz_vectors - ritz_vectors * pairs.values).norm(dim=0)
    assert torch.allclose(pairs.residual_bounds, true, rtol=1e-8, atol=1e-12 * 100)


# --------------------------------------------------------------------------- errors


def test_unknown_reorth_is_rejected():
    op = DenseOperator(torch.eye(10, dtype=torch.float64))
    match = r"reorth must be one of \('full', 'selective', 'none'\), got reorth='partial'"
    with pytest.raises(ValueError, match=match):
        lanczos(op, torch.ones(10, 1, dtype=torch.float64), 3, reorth="partial")


@pytest.mark.parametrize("num_steps", [0, 11])
def test_num_steps_out_of_range_is_rejected(num_steps):
    op = DenseOperator(torch.eye(10, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"num_steps must be in \[1, dim=10\], got num_steps={num_steps}"):
        lanczos(op, torch.ones(10, 1, dtype=torch.float64), num_steps)


def test_zero_start_vector_is_rejected():
    op = DenseOperator(torch.eye(10, dtype=torch.float64))
    start = torch.ones(10, 2, dtype=torch.float64)
    start[:, 1] = 0
    with pytest.raises(ValueError, match=r"a start vector is zero; draw start vectors with op.random_vectors"):
        lanczos(op, start, 3)


@pytest.mark.parametrize("shape", [(10,), (9, 1), (10, 1, 1)])
def test_wrong_start_shape_is_rejected(shape):
    op = DenseOperator(torch.eye(10, dtype=torch.float64))
    got = str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=rf"start must have shape \(local_dim=10, k\), got {got}"):
        lanczos(op, torch.ones(*shape, dtype=torch.float64), 3)


def test_reorthogonalization_without_basis_is_rejected():
    op = DenseOperator(torch.eye(10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"reorth='selective' needs the basis; pass keep_basis=True or reorth='none'"):
        lanczos(op, torch.ones(10, 1, dtype=torch.float64), 3, reorth="selective", keep_basis=False)
