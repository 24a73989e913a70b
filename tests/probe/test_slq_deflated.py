"""probe.slq_deflated (deflated SLQ) against exact float64 references.

References: dense matrices with known spectra (a few large outliers above a
bulk that crosses zero) and the dense float64 digits-MLP Hessian from
``torch.func.hessian``. Comparisons with plain SLQ are at equal products: the
deflated estimator's first pass plus its runs cost exactly what plain SLQ's runs
cost, counted by the operator.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import threading

import pytest
import torch
from counting import CountingOperator, seeded

from probe.operators import CurvatureOperator, DenseOperator
from probe.slq import spectral_density
from probe.slq_deflated import DeflatedOperator, deflated_spectral_density

OUTLIERS = (8.0, 12.0, 18.0, 25.0, 40.0)


def outlier_spectrum(n: int = 300, negative_outliers: tuple[float, ...] = ()) -> torch.Tensor:
    """A bulk in [-0.3, 1] (20% of it negative) with the large ``OUTLIERS`` above it."""
    tail = len(OUTLIERS) + len(negative_outliers)
    neg = (n - tail) // 5
    return torch.cat(
        [
            torch.tensor(negative_outliers, dtype=torch.float64),
            torch.linspace(-0.3, -0.01, neg, dtype=torch.float64),
            torch.linspace(0.01, 1.0, n - tail - neg, dtype=torch.float64),
            torch.tensor(OUTLIERS, dtype=torch.float64),
        ]
    )


def exact_moments(lam: torch.Tensor) -> dict:
    return {
        1: lam.mean().item(),
        2: (lam**2).mean().item(),
        "negative_mass": ((-lam).clamp_min(0).sum() / lam.abs().sum()).item(),
    }


def estimates(result) -> dict:
    return {1: result.moment(1)[0], 2: result.moment(2)[0], "negative_mass": result.negative_mass()[0]}


def compare_over_seeds(op, exact: dict, seeds: int, *, runs: int, steps: int, first_steps: int) -> tuple[dict, dict]:
    """Per seed, deflated and plain SLQ at equal products; returns ``(deflated, plain)`` lists per quantity."""
    plain_runs = (first_steps + runs * steps) // steps
    assert plain_runs * steps == first_steps + runs * steps, "choose first_steps a multiple of steps"
    deflated, plain = {q: [] for q in exact}, {q: [] for q in exact}
    for seed in range(seeds):
        d = deflated_spectral_density(op, runs=runs, steps=steps, first_steps=first_steps, generator=seeded(seed))
        p = spectral_density(op, runs=plain_runs, steps=steps, generator=seeded(10_000 + seed))
        assert d.num_matvecs == p.num_matvecs == plain_runs * steps
        for q in exact:
            deflated[q].append(estimates(d)[q])
            plain[q].append(estimates(p)[q])
    return deflated, plain


@pytest.fixture(scope="module")
def outliers(known_spectrum):
    return known_spectrum(outlier_spectrum(), seed=3)


@pytest.fixture(scope="module")
def outlier_comparison(outliers):
    """40 seeds of deflated (first pass 40 steps + 8 runs × 20) and plain SLQ (10 runs × 20) on ``outliers``."""
    exact = exact_moments(outliers.eigenvalues)
    return exact, *compare_over_seeds(outliers.op, exact, 40, runs=8, steps=20, first_steps=40)


@pytest.fixture(scope="module")
def mlp_dense(mlp_problem):
    """The exact digits-MLP Hessian as a dense operator (cheap products for many seeds)."""
    return DenseOperator(mlp_problem.hessian)


# --------------------------------------------------------------------------- the point masses


def test_auto_deflates_exactly_the_outliers_with_the_dense_eigenvalues(outliers):
    result = deflated_spectral_density(outliers.op, runs=4, steps=20, first_steps=40, generator=seeded(0))
    assert result.k == len(OUTLIERS) and result.k_negative == 0
    exact = torch.tensor(OUTLIERS, dtype=torch.float64)
    assert ((result.deflated_values - exact).abs() / exact).max().item() < 1e-8
    assert torch.all(result.deflated_residuals <= 1e-6 * result.deflated_values.abs())
    assert result.first_pass_steps == 40 and result.first_pass_matvecs == 40


def test_a_given_k_stops_the_first_pass_once_the_top_k_converge(outliers):
    result = deflated_spectral_density(outliers.op, runs=4, steps=20, k=3, first_steps=100, generator=seeded(1))
    assert result.k == 3
    assert result.first_pass_steps < 100  # stopped at convergence
    exact = torch.tensor(OUTLIERS[-3:], dtype=torch.float64)
    assert ((result.deflated_values - exact).abs() / exact).max().item() < 1e-8
    assert result.num_matvecs == result.first_pass_steps + 4 * 20


def test_point_masses_equal_the_top_eigenvalues_of_the_digits_hessian(mlp_problem):
    """On the model's own Hessian-vector products (float64), not the dense matrix."""
    op = mlp_problem.operators[torch.float64]
    result = deflated_spectral_density(op, runs=2, steps=10, k=5, first_steps=80, generator=seeded(0))
    assert result.k == 5
    top = mlp_problem.eigenvalues[-5:]
    assert ((result.deflated_values - top).abs() / top.abs()).max().item() < 1e-8
    assert result.num_matvecs == result.first_pass_steps + 2 * 10


def test_negative_outliers_are_deflated_when_asked(known_spectrum):
    lam = outlier_spectrum(negative_outliers=(-20.0, -9.0))
    spec = known_spectrum(lam, seed=4)
    result = deflated_spectral_density(spec.op, runs=4, steps=20, negative="auto", first_steps=60, generator=seeded(2))
    assert result.k_negative == 2 and result.k == 2 + len(OUTLIERS)
    exact = torch.tensor((-20.0, -9.0) + OUTLIERS, dtype=torch.float64)
    assert ((result.deflated_values - exact).abs() / exact.abs()).max().item() < 1e-8
    plain_neg = deflated_spectral_density(spec.op, runs=4, steps=20, first_steps=60, generator=seeded(2))
    assert plain_neg.k_negative == 0 and plain_neg.k == len(OUTLIERS)


def test_an_unconverged_k_deflates_only_what_converged_and_says_so(outliers):
    result = deflated_spectral_density(outliers.op, runs=2, steps=10, k=5, first_steps=6, generator=seeded(0))
    assert result.k < 5
    assert "raise first_steps" in result.note


# --------------------------------------------------------------------------- the result


def test_every_run_holds_the_point_masses_and_weights_sum_to_one(outliers):
    runs, steps = 5, 20
    result = deflated_spectral_density(outliers.op, runs=runs, steps=steps, first_steps=40, generator=seeded(3))
    dim, k = outliers.op.dim, result.k
    bulk_max = float(outliers.eigenvalues[: -len(OUTLIERS)].max())
    for v, w in zip(result.ritz_values, result.ritz_weights, strict=True):
        assert torch.all(v[1:] >= v[:-1])  # ascending, as SpectrumResult says
        assert w.sum().item() == pytest.approx(1.0, abs=1e-12)
        masses = v > bulk_max + 1e-6  # the bulk's Ritz values never re-find a deflated outlier
        assert int(masses.sum()) == k
        assert torch.allclose(v[masses], result.deflated_values, rtol=0, atol=0)
        assert torch.allclose(w[masses], torch.full((k,), 1 / dim, dtype=torch.float64), rtol=0, atol=0)
    # The grid ends 3σ below the lowest Ritz value and the whole bulk lies within 1.3σ of it,
    # so the Gaussian tails cut there hold a few 1e-4 of the mass (as for plain SLQ).
    assert torch.trapezoid(result.density, result.grid).item() == pytest.approx(1.0, abs=1e-3)
    assert result.lambda_max == pytest.approx(max(OUTLIERS), rel=1e-12)
    assert result.dim == dim and result.runs == runs and result.steps == steps


def test_products_are_counted_exactly(known_spectrum):
    spec = known_spectrum(outlier_spectrum(), seed=3)
    op = CountingOperator(spec.matrix)
    result = deflated_spectral_density(op, runs=6, steps=15, first_steps=30, generator=seeded(4))
    assert op.columns == result.num_matvecs == result.first_pass_matvecs + 6 * 15 == 30 + 90


def test_without_deflation_it_is_plain_slq(outliers):
    a = deflated_spectral_density(outliers.op, runs=3, steps=12, k=0, generator=seeded(5))
    b = spectral_density(outliers.op, runs=3, steps=12, generator=seeded(5))
    assert a.k == 0 and a.first_pass_matvecs == 0 and a.num_matvecs == b.num_matvecs
    for x, y in zip(a.ritz_values + a.ritz_weights, b.ritz_values + b.ritz_weights, strict=True):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-14)


def test_the_deflated_operator_annihilates_its_basis_and_keeps_the_complement(outliers):
    u = outliers.eigenvectors[:, -2:]
    op = DeflatedOperator(outliers.op, u)
    v = torch.randn(op.dim, 3, generator=seeded(6), dtype=torch.float64)
    pv = op.project(v)
    assert (u.T @ pv).abs().max().item() < 1e-13
    assert (op.matmat(u)).abs().max().item() < 1e-12
    expected = pv.T @ outliers.matrix @ pv
    assert torch.allclose(pv.T @ op.matmat(pv), expected, rtol=1e-12, atol=1e-12)


class ThreadShard(CurvatureOperator):
    """Worker ``rank`` of ``shards.size`` threads that each hold a contiguous slice of every vector.

    ``allreduce`` and the gather inside ``matmat`` meet at a barrier and sum (or
    concatenate) the workers' parts in rank order, so every worker gets the same bits,
    as a collective would give them.
    """

    def __init__(self, matrix: torch.Tensor, rank: int, shards: Shards) -> None:
        self.matrix, self.rank, self.shards = matrix, rank, shards
        self.dim = matrix.shape[0]
        self._slice = slice(shards.bounds[rank], shards.bounds[rank + 1])
        self.local_dim = self._slice.stop - self._slice.start
        self.dtype, self.device = matrix.dtype, matrix.device

    @property
    def local_slice(self) -> slice:
        return self._slice

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        parts = self.shards.exchange(self.rank, t)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        full = torch.cat(self.shards.exchange(self.rank, V))
        return self.matrix[self._slice] @ full


class Shards:
    def __init__(self, dim: int, size: int) -> None:
        self.size = size
        self.bounds = [dim * r // size for r in range(size + 1)]
        self._slots: list = [None] * size
        self._barrier = threading.Barrier(size, timeout=60)

    def exchange(self, rank: int, t: torch.Tensor) -> list:
        self._slots[rank] = t
        self._barrier.wait()
        parts = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before every worker has read them all
        return parts


def test_sharded_vectors_give_the_single_process_result(outliers):
    """Three workers, each holding a third of every vector and of the first pass's Ritz vectors, find
    the same outliers (top and bottom) and the same Ritz values as one process."""
    matrix = outliers.matrix
    kwargs = dict(runs=3, steps=15, negative="auto", first_steps=40)
    single = deflated_spectral_density(outliers.op, generator=seeded(9), **kwargs)
    shards = Shards(matrix.shape[0], 3)
    results: list = [None] * 3

    def work(rank: int) -> None:
        try:
            op = ThreadShard(matrix, rank, shards)
            results[rank] = deflated_spectral_density(op, generator=seeded(9), **kwargs)
        except BaseException as exc:  # reported below; an aborted barrier releases the other workers
            results[rank] = exc
            shards._barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
        assert r.k == single.k and r.num_matvecs == single.num_matvecs
        assert torch.allclose(r.deflated_values, single.deflated_values, rtol=1e-12, atol=0)
        for x, y in zip(r.ritz_values + r.ritz_weights, single.ritz_values + single.ritz_weights, strict=True):
            assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)
    assert all(torch.equal(r.ritz_values[0], results[0].ritz_values[0]) for r in results)  # identical bits


# --------------------------------------------------------------------------- unbiased, and less variance


def test_first_two_moments_are_unbiased_over_seeds(outlier_comparison):
    exact, deflated, _ = outlier_comparison
    for q in (1, 2):
        mean = statistics.mean(deflated[q])
        stderr = statistics.stdev(deflated[q]) / math.sqrt(len(deflated[q]))
        assert stderr > 0
        assert abs(mean - exact[q]) < 3 * stderr, f"q={q}: {mean:.8g} ± {stderr:.3g} vs exact {exact[q]:.8g}"


def test_moment_variance_is_far_below_plain_slq_at_equal_products(outlier_comparison):
    """Measured (these 40 seeds): plain/deflated variance 76× for the first moment, 1.6·10⁵× for the second."""
    _, deflated, plain = outlier_comparison
    assert statistics.variance(plain[1]) > 10 * statistics.variance(deflated[1])
    assert statistics.variance(plain[2]) > 1000 * statistics.variance(deflated[2])


def test_negative_mass_is_closer_to_exact_than_plain_slq_at_equal_products(outlier_comparison):
    exact, deflated, plain = outlier_comparison
    err_d = statistics.mean(abs(x - exact["negative_mass"]) for x in deflated["negative_mass"])
    err_p = statistics.mean(abs(x - exact["negative_mass"]) for x in plain["negative_mass"])
    assert err_d < err_p, f"deflated {err_d:.4g} vs plain {err_p:.4g}"


def replicates(result, size: int) -> list:
    """Split a result's runs into consecutive groups of ``size`` runs, each a result of its own."""
    return [
        dataclasses.replace(
            result,
            ritz_values=result.ritz_values[i : i + size],
            ritz_weights=result.ritz_weights[i : i + size],
            runs=size,
        )
        for i in range(0, result.runs, size)
    ]


def test_on_the_digits_hessian_unbiased_with_less_variance_and_negative_mass_error(mlp_problem, mlp_dense):
    """The exact MLP Hessian (top 5 eigenvalues: ~87% of ‖H‖_F²), 16 replicates of 120 products each.

    A replicate of the deflated estimator is 4 runs of 22 steps on the deflated operator
    plus the 32-step first pass, which the replicates share (its pairs have converged, so
    they are the same in every draw) but each is charged for; plain SLQ's replicate is
    5 runs of 24 steps. Batching the replicates into two calls keeps the dense products few.
    """
    exact = exact_moments(mlp_problem.eigenvalues)
    count = 16
    d = deflated_spectral_density(mlp_dense, runs=4 * count, steps=22, first_steps=32, generator=seeded(7))
    p = spectral_density(mlp_dense, runs=5 * count, steps=24, generator=seeded(8))
    assert d.first_pass_matvecs + 4 * 22 == 5 * 24 == 120
    assert d.k >= 5
    deflated = {q: [estimates(r)[q] for r in replicates(d, 4)] for q in exact}
    plain = {q: [estimates(r)[q] for r in replicates(p, 5)] for q in exact}
    for q in (1, 2):
        est, stderr = d.moment(q)
        assert abs(est - exact[q]) < 3 * stderr, f"q={q}: {est:.8g} ± {stderr:.3g} vs exact {exact[q]:.8g}"
    assert statistics.variance(plain[1]) > 3 * statistics.variance(deflated[1])
    assert statistics.variance(plain[2]) > 50 * statistics.variance(deflated[2])
    err_d = statistics.mean(abs(x - exact["negative_mass"]) for x in deflated["negative_mass"])
    err_p = statistics.mean(abs(x - exact["negative_mass"]) for x in plain["negative_mass"])
    assert err_d < err_p, f"deflated {err_d:.4g} vs plain {err_p:.4g}"


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"runs": 0}, r"runs must be at least 1, got runs=0"),
        ({"steps": 21}, r"steps must be in \[1, dim=20\], got steps=21"),
        ({"k": -1}, r"k must be a non-negative integer or 'auto', got k=-1"),
        ({"k": "all"}, r"k must be a non-negative integer or 'auto', got k='all'"),
        ({"negative": True}, r"negative must be a non-negative integer or 'auto', got negative=True"),
        ({"k": 15, "negative": 6}, r"k \+ negative must be at most dim=20, got 21"),
        ({"tol": 0.0}, r"tol must be positive, got tol=0.0"),
        ({"first_steps": 21}, r"first_steps must be in \[1, dim=20\], got first_steps=21"),
        ({"sigma": -1.0}, r"sigma must be positive \(eigenvalue units\), got sigma=-1.0"),
        ({"reorth": "partial"}, r"reorth must be one of \('full', 'selective', 'none'\), got reorth='partial'"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    op = DenseOperator(torch.diag(torch.linspace(0, 1, 20, dtype=torch.float64)))
    kwargs = {"steps": 5} | kwargs
    with pytest.raises(ValueError, match=match):
        deflated_spectral_density(op, **kwargs)
