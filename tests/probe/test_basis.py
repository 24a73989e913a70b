"""probe.basis: every basis store gives the device store's numbers, blocks stay bounded, the budget falls back.

References: dense float64 matrices with known spectra (``known_spectrum``), whose
Lanczos results with the default :class:`DeviceBasis` are the baseline, and the
digits-MLP Hessian with its dense ``eigh``. The disk store's own tests are in
``tests/cluster/test_basis_disk.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from probe.basis import BasisStore, DeviceBasis, HostBasis, resolve_basis
from probe.eigen import eigenvalues, power_iteration
from probe.lanczos import LanczosProcess, lanczos
from probe.operators import DenseOperator
from probe.slq import reorth_within_budget, spectral_density

N = 240


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def outlier_spectrum(n: int = N) -> Tensor:
    """Three separated outliers above a bulk in [0, 1]: their Ritz values converge early (ghosts without reorth)."""
    bulk = torch.rand(n - 3, generator=seeded(1), dtype=torch.float64)
    return torch.cat([torch.tensor([100.0, 50.0, 20.0], dtype=torch.float64), bulk])


def gaussian_start(n: int, k: int, seed: int) -> Tensor:
    return torch.randn(n, k, generator=seeded(seed), dtype=torch.float64)


class CountingBasis(HostBasis):
    """A host store that records every block it hands out, and hands out copies only.

    Copies mean the process cannot hold a view of more than it asked for, so the
    recorded block sizes bound what the process has of the basis on the device.
    """

    name = "counting"

    def __init__(self, *, block_size: int | None) -> None:
        super().__init__(block_size=block_size)
        self.rows_read: list[int] = []

    def get(self, start: int, stop: int, run: int | None = None) -> Tensor:
        self.rows_read.append(stop - start)
        return super().get(start, stop, run).clone()


# Stores other than the default, as (id, factory); each must reproduce DeviceBasis().
STORES = [
    ("device-blocks-of-4", lambda: DeviceBasis(block_size=4)),
    ("host-default", lambda: HostBasis()),
    ("host-blocks-of-3", lambda: HostBasis(block_size=3)),
    ("host-one-block", lambda: HostBasis(block_size=None)),
    ("counting-blocks-of-5", lambda: CountingBasis(block_size=5)),
]
STORE_PARAMS = [pytest.param(make, id=name) for name, make in STORES]


def assert_same_lanczos(got, ref, *, tol: float = 1e-12) -> None:
    scale = float(ref.alphas.abs().max())
    assert torch.equal(got.num_steps, ref.num_steps) and torch.equal(got.breakdown, ref.breakdown)
    assert (got.alphas - ref.alphas).abs().max().item() <= tol * scale
    assert (got.betas - ref.betas).abs().max().item() <= tol * scale
    for r in range(ref.num_runs):
        a, b = got.ritz(r), ref.ritz(r)
        assert (a.values - b.values).abs().max().item() <= tol * scale, r
        assert (a.weights - b.weights).abs().max().item() <= tol, r
    # The loss is made of rounding errors: stores agree on its size, not on its digits.
    assert torch.allclose(got.orthogonality_loss, ref.orthogonality_loss, rtol=0.1, atol=1e-13)
    assert got.basis.shape == ref.basis.shape
    assert (got.basis.to(ref.basis.device) - ref.basis).abs().max().item() <= 1e-10


# --------------------------------------------------------------------------- same numbers as the device store


@pytest.mark.parametrize("make_store", STORE_PARAMS)
@pytest.mark.parametrize("reorth", ["full", "selective"])
def test_lanczos_with_any_store_matches_the_device_store(known_spectrum, make_store, reorth):
    spec = known_spectrum(outlier_spectrum())
    start = gaussian_start(N, 3, seed=0)
    ref = lanczos(spec.op, start, 60, reorth=reorth)
    store = make_store()
    got = lanczos(spec.op, start, 60, reorth=reorth, basis=store)
    assert ref.basis_storage == "device" and got.basis_storage == store.name
    assert_same_lanczos(got, ref)
    assert torch.all(got.orthogonality_loss < 1e-7)  # the projections really ran against the store
    for r in range(3):  # and still give exact eigenvalues where the Ritz values converged
        assert torch.isclose(got.ritz(r).values[-1], torch.tensor(100.0, dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("make_store", STORE_PARAMS)
def test_no_reorthogonalization_with_a_kept_basis_is_identical(known_spectrum, make_store):
    """Without projections the store only receives vectors: the coefficients are bit-identical."""
    spec = known_spectrum(outlier_spectrum())
    start = gaussian_start(N, 2, seed=1)
    ref = lanczos(spec.op, start, 80, reorth="none", keep_basis=True)
    got = lanczos(spec.op, start, 80, reorth="none", keep_basis=True, basis=make_store())
    assert torch.equal(got.alphas, ref.alphas) and torch.equal(got.betas, ref.betas)
    assert torch.all(ref.orthogonality_loss > 1e-6)  # orthogonality lost, and measured the same through blocks
    assert torch.allclose(got.orthogonality_loss, ref.orthogonality_loss, rtol=1e-12, atol=1e-15)


def test_breakdown_is_the_same_in_every_store(known_spectrum):
    distinct = torch.tensor([-2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    spec = known_spectrum(distinct.repeat_interleave(N // 4))
    start = gaussian_start(N, 2, seed=2)
    for _, make in STORES:
        result = lanczos(spec.op, start, 30, basis=make())
        assert result.num_steps.tolist() == [4, 4] and result.breakdown.tolist() == [True, True]
        assert torch.allclose(result.ritz(1).values, distinct, rtol=0, atol=1e-13)


def test_stores_grow_when_no_capacity_is_given(known_spectrum):
    """A bare LanczosProcess does not know how many steps come: stores start at 16 vectors and grow."""
    spec = known_spectrum(outlier_spectrum())
    start = gaussian_start(N, 2, seed=3)
    processes = [LanczosProcess(spec.op, start), LanczosProcess(spec.op, start, basis=HostBasis(block_size=6))]
    for _ in range(40):
        for p in processes:
            p.step()
    ref, got = (p.result() for p in processes)
    assert got.basis_storage == "host" and got.basis.shape == (41, N, 2)
    assert_same_lanczos(got, ref)


def test_device_store_capacity_is_capped_at_the_step_count():
    store = DeviceBasis()
    store.allocate(2, 5, torch.float64, torch.device("cpu"), capacity=21)
    for j in range(21):
        store.put(j, torch.full((2, 5), float(j), dtype=torch.float64))
    assert store._buf.shape == (2, 21, 5)  # 16, then 21 rather than 32
    assert torch.equal(store.view(21)[1, :, 0], torch.arange(21, dtype=torch.float64))
    host = HostBasis()
    host.allocate(2, 5, torch.float64, torch.device("cpu"), capacity=21)
    assert host._buf.shape == (21, 2, 5)  # reserved at once


@pytest.mark.parametrize("make_store", STORE_PARAMS)
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_eigenvalues_with_any_store_match_the_device_store(known_spectrum, make_store, which):
    lam = torch.cat([torch.linspace(-3, -1, 20, dtype=torch.float64), outlier_spectrum(N - 20)])
    spec = known_spectrum(lam, seed=5)
    ref = eigenvalues(spec.op, 3, which=which, generator=seeded(4), return_eigenvectors=True)
    store = make_store()
    got = eigenvalues(spec.op, 3, which=which, generator=seeded(4), return_eigenvectors=True, basis=store)
    assert got.basis_storage == store.name and ref.basis_storage == "device"
    assert got.converged and got.num_steps == ref.num_steps and got.num_matvecs == ref.num_matvecs
    assert torch.allclose(got.eigenvalues, ref.eigenvalues, rtol=1e-12, atol=0)
    exact = torch.sort(lam, descending=(which == "largest")).values[:3]
    assert torch.all((got.eigenvalues - exact).abs() <= got.residuals + 1e-12)  # |λ − θ| ≤ ‖Ay − θy‖
    assert (got.eigenvectors - ref.eigenvectors).abs().max().item() < 1e-10
    assert torch.allclose(got.residuals, ref.residuals, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("make_store", STORE_PARAMS)
def test_spectral_density_with_any_store_matches_the_device_store(known_spectrum, make_store):
    spec = known_spectrum(outlier_spectrum(), seed=6)
    ref = spectral_density(spec.op, runs=4, steps=40, generator=seeded(7))
    store = make_store()
    got = spectral_density(spec.op, runs=4, steps=40, generator=seeded(7), basis=store)
    assert got.basis_storage == store.name and got.reorth == "full" and got.note == ""
    for a, b in zip(got.ritz_values, ref.ritz_values, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(got.ritz_weights, ref.ritz_weights, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert torch.allclose(got.density, ref.density, rtol=1e-9, atol=1e-12)


def test_digits_hessian_through_a_host_store_matches_the_device_store(mlp_problem):
    op = mlp_problem.operators[torch.float64]
    ref = eigenvalues(op, 2, which="largest", generator=seeded(8))
    got = eigenvalues(op, 2, which="largest", generator=seeded(8), basis=HostBasis(block_size=7))
    assert got.basis_storage == "host" and got.num_steps == ref.num_steps
    assert torch.allclose(got.eigenvalues, ref.eigenvalues, rtol=1e-12, atol=0)
    assert torch.allclose(got.eigenvalues, mlp_problem.eigenvalues.flip(0)[:2], rtol=1e-9, atol=0)
    ref_slq = spectral_density(op, runs=2, steps=30, generator=seeded(9))
    got_slq = spectral_density(op, runs=2, steps=30, generator=seeded(9), basis=HostBasis(block_size=7))
    for a, b in zip(got_slq.ritz_values, ref_slq.ritz_values, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * mlp_problem.spectral_norm)


# --------------------------------------------------------------------------- bounded blocks


@pytest.mark.parametrize("reorth", ["full", "selective"])
def test_projections_read_the_store_in_bounded_blocks(known_spectrum, reorth):
    spec = known_spectrum(outlier_spectrum())
    steps = 50
    store = CountingBasis(block_size=4)
    result = lanczos(spec.op, gaussian_start(N, 2, seed=10), steps, reorth=reorth, basis=store)
    assert result.num_steps.tolist() == [steps, steps]
    assert store.rows_read and max(store.rows_read) == 4  # never more than a block of the 51 vectors
    # Full reorthogonalization reads all n vectors twice (coefficients, update) at step n: ≥ Σ 2n rows.
    if reorth == "full":
        assert sum(store.rows_read) >= sum(2 * n for n in range(1, steps + 1))


def test_ritz_vectors_and_eigenvectors_are_formed_in_blocks(known_spectrum):
    spec = known_spectrum(outlier_spectrum())
    store = CountingBasis(block_size=3)
    got = eigenvalues(spec.op, 2, generator=seeded(11), return_eigenvectors=True, basis=store)
    assert max(store.rows_read) == 3 and got.num_steps > 3
    # The blocked Ritz vectors are the eigenvectors of 100 and 50 (eigenvectors 0 and 1 of the spectrum).
    assert got.residuals_exact and torch.all(got.residuals <= 1e-6 * 100)
    overlap = (spec.eigenvectors[:, :2].T @ got.eigenvectors).diagonal().abs()
    assert torch.allclose(overlap, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-8)


def test_device_store_reads_the_whole_basis_in_one_block(known_spectrum):
    """The default store keeps today's single batched products (a counting device store sees one block per call)."""

    class CountingDevice(DeviceBasis):
        def __init__(self):
            super().__init__()
            self.rows_read: list[int] = []

        def get(self, start, stop, run=None):
            self.rows_read.append(stop - start)
            return super().get(start, stop, run)

    spec = known_spectrum(outlier_spectrum())
    store = CountingDevice()
    lanczos(spec.op, gaussian_start(N, 1, seed=12), 20, basis=store)
    assert max(store.rows_read) == 21  # the orthogonality check reads all 21 vectors at once


# --------------------------------------------------------------------------- memory budget


def test_budget_below_the_basis_falls_back_to_no_reorthogonalization_and_keeps_the_moments(known_spectrum):
    spec = known_spectrum(outlier_spectrum(300), seed=4)
    runs, steps, p = 16, 80, 300
    required = runs * (steps + 1) * p * 8
    result = spectral_density(spec.op, runs=runs, steps=steps, generator=seeded(6), basis_memory_bytes=required - 1)
    assert result.reorth == "none" and result.basis_storage == "none"
    assert torch.all(torch.isnan(result.orthogonality_loss))
    for words in (
        f"needs {required} bytes",
        f"basis_memory_bytes={required - 1}",
        "reorth='none'",
        "ghosts",
        "weights are split",
        "degree < 2*steps",
        "Ubaru, Chen & Saad 2017",
    ):
        assert words in result.note, words
    ghosts = [int(((v - 100).abs() < 1e-6).sum()) for v in result.ritz_values]
    assert min(ghosts) >= 2, ghosts  # the fallback really ran without reorthogonalization
    for v, w in zip(result.ritz_values, result.ritz_weights, strict=True):  # the ghosts share the outlier's weight
        assert 0 < w[(v - 100).abs() < 1e-6].sum().item() < 0.05
    exact = {1: spec.eigenvalues.sum().item() / p, 2: (spec.eigenvalues**2).sum().item() / p}
    for q, ref in exact.items():
        est, stderr = result.moment(q)
        assert 0 < stderr and abs(est - ref) < 3 * stderr, f"q={q}: {est:.6g} ± {stderr:.3g} vs exact {ref:.6g}"


def test_budget_that_holds_the_basis_keeps_reorthogonalization(known_spectrum):
    spec = known_spectrum(outlier_spectrum(), seed=4)
    runs, steps = 3, 30
    required = runs * (steps + 1) * N * 8
    fits = spectral_density(spec.op, runs=runs, steps=steps, generator=seeded(1), basis_memory_bytes=required)
    plain = spectral_density(spec.op, runs=runs, steps=steps, generator=seeded(1))
    assert fits.reorth == "full" and fits.note == "" and fits.basis_storage == "device"
    assert all(torch.equal(a, b) for a, b in zip(fits.ritz_values, plain.ritz_values, strict=True))
    host = spectral_density(
        spec.op,
        runs=runs,
        steps=steps,
        generator=seeded(1),
        basis="host",
        reorth="selective",
        basis_memory_bytes=required - 8,
    )
    assert host.reorth == "none" and "in the host store" in host.note


def test_reorth_within_budget_decisions():
    assert reorth_within_budget("full", 100, 100, "device") == ("full", "")
    assert reorth_within_budget("none", 10**12, 0, "device") == ("none", "")
    used, note = reorth_within_budget("selective", 101, 100, "device")
    assert used == "none" and note.startswith(
        "reorth='selective' needs 101 bytes for the Lanczos basis in the device store"
    )


def test_eigenvalues_budget_lowers_the_step_cap(known_spectrum):
    spec = known_spectrum(torch.linspace(0.0, 1.0, N, dtype=torch.float64))  # slow convergence: needs many steps
    budget = 21 * N * 8  # 21 vectors
    result = eigenvalues(spec.op, 1, generator=seeded(2), max_steps=100, basis_memory_bytes=budget)
    assert result.num_steps == 20 and not result.converged
    assert (
        "max_steps lowered from 100 to 20: 101 basis vectors exceed basis_memory_bytes=40320 in the device store"
        in result.note
    )
    assert "not converged after max_steps=20" in result.note
    roomy = eigenvalues(spec.op, 1, generator=seeded(2), max_steps=100, basis_memory_bytes=101 * N * 8)
    assert "lowered" not in roomy.note


def test_eigenvalues_budget_below_k_plus_one_vectors_is_rejected(known_spectrum):
    spec = known_spectrum(torch.linspace(0.0, 1.0, N, dtype=torch.float64))
    match = r"basis_memory_bytes=5000 holds fewer than k\+1=3 basis vectors \(needs 5760 bytes in the device store\)"
    with pytest.raises(ValueError, match=match):
        eigenvalues(spec.op, 2, basis_memory_bytes=5000)


# --------------------------------------------------------------------------- records and errors


def test_results_record_where_the_basis_was_kept(known_spectrum):
    spec = known_spectrum(outlier_spectrum())
    start = gaussian_start(N, 1, seed=0)
    assert lanczos(spec.op, start, 5).basis_storage == "device"
    assert lanczos(spec.op, start, 5, basis="host").basis_storage == "host"
    assert lanczos(spec.op, start, 5, reorth="none").basis_storage == "none"
    assert lanczos(spec.op, start, 5, reorth="none", keep_basis=True, basis="host").basis_storage == "host"
    assert spectral_density(spec.op, runs=2, steps=5, generator=seeded(0), reorth="none").basis_storage == "none"
    assert eigenvalues(spec.op, 1, generator=seeded(0), basis="host").basis_storage == "host"
    assert power_iteration(spec.op, 1, generator=seeded(0)).basis_storage == "none"


def test_stores_satisfy_the_protocol():
    for _, make in STORES:
        assert isinstance(make(), BasisStore)
    assert isinstance(resolve_basis("device"), DeviceBasis) and isinstance(resolve_basis("host"), HostBasis)
    store = HostBasis()
    assert resolve_basis(store) is store


@pytest.mark.parametrize(
    "basis,match",
    [
        (
            "disk",
            r"basis must be one of \('device', 'host'\) or a BasisStore, got basis='disk'; a disk store needs a "
            r"folder: pass basis=cluster.basis.DiskBasis\(folder\)",
        ),
        ("gpu", r"basis must be one of \('device', 'host'\) or a BasisStore, got basis='gpu'$"),
        (
            3,
            r"basis must be one of \('device', 'host'\) or a BasisStore \(name, block_size, allocate, put, get, view, "
            r"resident_bytes, close\), got int",
        ),
    ],
)
def test_unknown_basis_is_rejected(basis, match):
    op = DenseOperator(torch.eye(10, dtype=torch.float64))
    with pytest.raises(ValueError, match=match):
        lanczos(op, torch.ones(10, 1, dtype=torch.float64), 3, basis=basis)


@pytest.mark.parametrize("block_size", [0, -2, 2.5])
def test_bad_block_size_is_rejected(block_size):
    match = (
        rf"block_size must be a positive number of vectors per run or None \(one block\), got block_size={block_size}"
    )
    with pytest.raises(ValueError, match=match):
        HostBasis(block_size=block_size)
    with pytest.raises(ValueError, match=match):
        DeviceBasis(block_size=block_size)


def test_negative_budget_and_unknown_reorth_are_rejected_before_the_budget():
    op = DenseOperator(torch.eye(10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"basis_memory_bytes must be non-negative or None, got basis_memory_bytes=-1"):
        spectral_density(op, steps=3, basis_memory_bytes=-1)
    with pytest.raises(
        ValueError, match=r"reorth must be one of \('full', 'selective', 'none'\), got reorth='partial'"
    ):
        spectral_density(op, steps=3, reorth="partial", basis_memory_bytes=0)


def test_ritz_vectors_need_the_basis(known_spectrum):
    spec = known_spectrum(outlier_spectrum())
    process = LanczosProcess(spec.op, gaussian_start(N, 1, seed=0), reorth="none")
    process.step()
    with pytest.raises(ValueError, match=r"Ritz vectors need the basis; pass keep_basis=True"):
        process.ritz_vectors(torch.ones(1, 1, dtype=torch.float64))
