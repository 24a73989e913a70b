"""probe.eigen against the exact spectrum of digits-model Hessians.

Truth: ``torch.linalg.eigh`` of the dense float64 ``torch.func.hessian`` (see
``conftest.py``). Targets (issue 2): top-5 and bottom-3 eigenvalues to 1e-8
relative in float64 and 1e-4 in float32, with ``eigenvalues()``'s defaults.
"""

from __future__ import annotations

import math

import pytest
import torch

from probe.eigen import eigenvalues, power_iteration
from probe.operators import DenseOperator

TOP_K, BOTTOM_K = 5, 3
REL_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}
DTYPES = [torch.float64, torch.float32]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_reference(problem, which: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` wanted eigenvalues (sorted as ``eigenvalues()`` sorts them) and their eigenvectors."""
    idx = torch.arange(problem.dim - 1, problem.dim - 1 - k, -1) if which == "largest" else torch.arange(k)
    return problem.eigenvalues[idx], problem.eigenvectors[:, idx]


@pytest.fixture(scope="module", params=DTYPES, ids=["float64", "float32"])
def extremes(request, digits_problem):
    """Top-5 and bottom-3 eigenpairs of one problem in one dtype, with defaults (tol, max_steps)."""
    dtype = request.param
    op = digits_problem.operators[dtype]
    top = eigenvalues(op, TOP_K, which="largest", generator=seeded(0), return_eigenvectors=True)
    bottom = eigenvalues(op, BOTTOM_K, which="smallest", generator=seeded(1), return_eigenvectors=True)
    return digits_problem, dtype, {"largest": top, "smallest": bottom}


@pytest.mark.parametrize("which,k", [("largest", TOP_K), ("smallest", BOTTOM_K)])
def test_extreme_eigenvalues_match_dense_eigh(extremes, which, k):
    problem, dtype, results = extremes
    result = results[which]
    ref, _ = dense_reference(problem, which, k)
    assert result.which == which and result.method == "lanczos"
    assert result.eigenvalues.dtype == torch.float64 and result.eigenvalues.shape == (k,)
    assert result.converged, f"{problem.name}/{dtype}: not converged in {result.num_steps} steps"
    rel = ((result.eigenvalues - ref).abs() / ref.abs()).max().item()
    assert rel < REL_TOL[dtype], f"{problem.name}/{dtype} {which}: max relative error {rel:.3g}"


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_measured_residuals_match_dense_residuals(extremes, which):
    """``return_eigenvectors=True`` reports ``‖Hy − θy‖``; recompute it with the dense float64 Hessian."""
    problem, dtype, results = extremes
    result = results[which]
    assert result.residuals_exact
    y = result.eigenvectors.to(torch.float64)
    assert y.shape == (problem.dim, len(result.eigenvalues))
    assert torch.allclose(y.norm(dim=0), torch.ones(y.shape[1], dtype=torch.float64), atol=10 * torch.finfo(dtype).eps)
    dense = (problem.hessian @ y - y * result.eigenvalues).norm(dim=0)
    # The operator's own products carry rounding of order eps·‖H‖ (measured: ~1·eps·‖H‖ in float32).
    floor = 10 * torch.finfo(dtype).eps * problem.spectral_norm
    assert torch.all((result.residuals - dense).abs() <= 1e-6 * dense + floor), (result.residuals, dense)
    # And the residuals honour the requested tolerance.
    assert torch.all(dense <= result.tol * problem.spectral_norm + floor)


def test_eigenvectors_align_with_dense_eigenvectors(extremes):
    problem, dtype, results = extremes
    for which, k in (("largest", TOP_K), ("smallest", BOTTOM_K)):
        result = results[which]
        ref_vals, ref_vecs = dense_reference(problem, which, k)
        y = result.eigenvectors.to(torch.float64)
        y = y / y.norm(dim=0)  # unit in float64 (a float32 unit vector is unit only to ~1e-7)
        cos = (ref_vecs * y).sum(0).abs()
        others = problem.eigenvalues
        for i in range(k):
            theta = result.eigenvalues[i]
            # Gap from θ to the rest of the spectrum (all eigenvalues but the matched one).
            gap = (others - theta).abs().sort().values[1].item()
            residual = (problem.hessian @ y[:, i] - theta * y[:, i]).norm().item()
            # Davis-Kahan: sin∠(y, u) ≤ ‖Hy − θy‖ / gap (a theorem for every pair, clustered or not).
            sin = math.sqrt(max(0.0, 1 - cos[i].item() ** 2))
            assert sin <= residual / gap + 1e-7, f"{which}[{i}]: sin {sin:.3g} > r/gap {residual / gap:.3g}"
        if which == "largest":
            # The top five are well separated (gaps > 5% of ‖H‖): near-perfect alignment.
            assert torch.all(cos > 1 - 1e-6), f"{problem.name}/{dtype}: |cos| {cos.tolist()}"


def test_same_seed_same_numbers(mlp_problem):
    op = mlp_problem.operators[torch.float64]
    a = eigenvalues(op, 3, generator=seeded(7))
    b = eigenvalues(op, 3, generator=seeded(7))
    c = eigenvalues(op, 3, generator=seeded(8))
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.residuals, b.residuals)
    assert a.num_steps == b.num_steps and a.num_matvecs == b.num_matvecs
    assert not torch.equal(a.eigenvalues, c.eigenvalues)  # another start vector: other rounding...
    assert torch.allclose(a.eigenvalues, c.eigenvalues, rtol=1e-10, atol=0)  # ...same eigenvalues


def test_residual_bounds_equal_measured_residuals(mlp_problem):
    """Without eigenvectors the residuals are Lanczos bounds β_m|s_mi|; with full reorth they are the residuals."""
    op = mlp_problem.operators[torch.float64]
    bounds = eigenvalues(op, TOP_K, tol=1e-4, generator=seeded(3))
    measured = eigenvalues(op, TOP_K, tol=1e-4, generator=seeded(3), return_eigenvectors=True)
    assert not bounds.residuals_exact and measured.residuals_exact
    assert bounds.eigenvectors is None
    assert torch.equal(bounds.eigenvalues, measured.eigenvalues)
    assert measured.num_matvecs == bounds.num_matvecs + TOP_K
    big = measured.residuals > 1e-9 * mlp_problem.spectral_norm  # above rounding, comparable
    assert big.any()
    assert torch.allclose(bounds.residuals[big], measured.residuals[big], rtol=1e-4, atol=0)


def test_warm_start_at_an_eigenvector_converges_at_once(mlp_problem):
    op = mlp_problem.operators[torch.float64]
    u = mlp_problem.eigenvectors[:, -1]
    result = eigenvalues(op, 1, start=u.clone())
    assert result.num_steps <= 2 and result.converged
    assert abs(result.eigenvalues[0].item() - mlp_problem.eigenvalues[-1].item()) <= 1e-12 * mlp_problem.spectral_norm


def test_fewer_reachable_eigenvalues_than_asked_is_reported(known_spectrum):
    """Three distinct eigenvalues: the Krylov space has dimension 3, so k=5 cannot be met."""
    spec = known_spectrum(torch.tensor([3.0] * 20 + [2.0] * 20 + [1.0] * 20))
    result = eigenvalues(spec.op, 5, generator=seeded(0))
    assert not result.converged
    assert result.num_steps == 3
    assert torch.allclose(result.eigenvalues, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), rtol=1e-12)
    assert "only 3 eigenvalues are reachable" in result.note


def test_power_iteration_agrees_with_dense_lambda_max_to_its_tolerance(mlp_problem):
    """Power iteration stops when the Rayleigh quotient changes by ≤ tol relative.

    Its error e_t ≈ c·ρ^{2t} (ρ = |λ₂/λ₁|) shrinks by (1 − ρ²) per step, so on stopping
    e ≤ tol·λ₁/(1 − ρ²): the tolerance bounds the error up to that factor, not by itself.
    """
    op = mlp_problem.operators[torch.float64]
    lam = mlp_problem.eigenvalues.flip(0)  # descending; the largest magnitudes here are the top ones
    assert lam[0] > lam.abs()[1:].max()
    tol = 1e-6
    result = power_iteration(op, 2, tol=tol, max_iter=1000, generator=seeded(0))
    assert result.converged and result.method == "power"
    for i in range(2):
        rho = (lam[i + 1] / lam[i]).item()
        rel = abs(result.eigenvalues[i].item() - lam[i].item()) / lam[i].item()
        assert rel <= 1.5 * tol / (1 - rho**2), f"λ_{i + 1}: relative error {rel:.3g}"
        assert rel <= 1e-4
    v = result.eigenvectors[:, 0]
    dense = (mlp_problem.hessian @ v - result.eigenvalues[0] * v).norm()
    assert torch.allclose(result.residuals[0], dense, rtol=1e-8)


def test_power_iteration_reports_non_convergence(mlp_problem):
    result = power_iteration(mlp_problem.operators[torch.float64], 1, tol=1e-12, max_iter=3, generator=seeded(0))
    assert not result.converged
    assert result.num_matvecs == 3 + 1  # iterations plus the residual product


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"which": "biggest"}, r"which must be one of \('largest', 'smallest'\), got which='biggest'"),
        ({"k": 0}, r"k must be in \[1, dim=30\], got k=0; lower k"),
        ({"k": 31}, r"k must be in \[1, dim=30\], got k=31; lower k"),
        ({"tol": 0.0}, r"tol must be positive, got tol=0.0"),
        ({"k": 4, "max_steps": 3}, r"max_steps must be in \[k=4, dim=30\], got max_steps=3"),
        ({"max_steps": 31}, r"max_steps must be in \[k=1, dim=30\], got max_steps=31"),
    ],
)
def test_eigenvalues_rejects_bad_arguments(kwargs, match):
    op = DenseOperator(torch.eye(30, dtype=torch.float64))
    with pytest.raises(ValueError, match=match):
        eigenvalues(op, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k": 0}, r"k must be in \[1, dim=30\], got k=0; lower k"),
        ({"tol": -1.0}, r"tol and max_iter must be positive, got tol=-1.0, max_iter=100"),
        ({"max_iter": 0}, r"tol and max_iter must be positive, got tol=0.001, max_iter=0"),
    ],
)
def test_power_iteration_rejects_bad_arguments(kwargs, match):
    op = DenseOperator(torch.eye(30, dtype=torch.float64))
    with pytest.raises(ValueError, match=match):
        power_iteration(op, **kwargs)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_selective_reorthogonalization_finds_the_same_extreme_eigenvalues(mlp_problem, which):
    op = mlp_problem.operators[torch.float64]
    exact = mlp_problem.eigenvalues
    want = exact[-4:].flip(0) if which == "largest" else exact[:4]
    r = eigenvalues(op, 4, which=which, reorth="selective", max_steps=400, generator=torch.Generator().manual_seed(5))
    assert r.converged
    scale = float(exact.abs().max())
    assert torch.allclose(r.eigenvalues, want, rtol=0, atol=1e-8 * scale)
    with pytest.raises(ValueError, match="reorth must be 'full' or 'selective' for eigenvalues"):
        eigenvalues(op, 1, reorth="none")
