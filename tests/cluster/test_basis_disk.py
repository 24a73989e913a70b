"""cluster.basis.DiskBasis: the probe basis-store protocol on a memory-mapped file.

The reference is the default device store on a float64 matrix with a known
spectrum ``Q diag(λ) Qᵀ`` (the same construction as ``known_spectrum`` in
``tests/probe/conftest.py``, whose fixtures this folder does not see).
"""

from __future__ import annotations

import errno
import gc
import os

import pytest
import torch

import cluster.basis as disk_module
from cluster.basis import FILE_PREFIX, DiskBasis
from probe.basis import BasisStore
from probe.eigen import eigenvalues
from probe.lanczos import LanczosProcess, lanczos
from probe.operators import CurvatureOperator, DenseOperator
from probe.slq import spectral_density

N = 200


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def known_matrix(eigenvalues: torch.Tensor, seed: int = 0) -> tuple[DenseOperator, torch.Tensor]:
    """``(DenseOperator(Q diag(λ) Qᵀ), Q)`` with a seeded Haar-random orthogonal Q."""
    q, r = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=seeded(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    a = (q * eigenvalues) @ q.T
    return DenseOperator((a + a.T) / 2), q


def outliers(n: int = N) -> torch.Tensor:
    return torch.cat(
        [
            torch.tensor([100.0, 50.0, 20.0], dtype=torch.float64),
            torch.rand(n - 3, generator=seeded(1), dtype=torch.float64),
        ]
    )


def basis_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class Watching(CurvatureOperator):
    """Wraps an operator and lists ``folder`` at every product: what exists while Lanczos runs."""

    def __init__(self, op: CurvatureOperator, folder):
        self.op, self.folder, self.seen = op, folder, []
        self.dim, self.local_dim, self.dtype, self.device = op.dim, op.local_dim, op.dtype, op.device

    def _matmat(self, V):
        self.seen.append(basis_files(self.folder))
        return self.op.matmat(V)


# --------------------------------------------------------------------------- same numbers


def test_disk_store_satisfies_the_protocol(tmp_path):
    with DiskBasis(tmp_path) as store:
        assert isinstance(store, BasisStore) and store.name == "disk" and store.block_size == 8


@pytest.mark.parametrize("reorth", ["full", "selective"])
def test_lanczos_on_disk_matches_the_device_store(tmp_path, reorth):
    op, _ = known_matrix(outliers())
    start = torch.randn(N, 3, generator=seeded(0), dtype=torch.float64)
    ref = lanczos(op, start, 60, reorth=reorth)
    with DiskBasis(tmp_path, block_size=3) as store:
        got = lanczos(op, start, 60, reorth=reorth, basis=store)
        assert got.basis_storage == "disk"
        assert torch.equal(got.num_steps, ref.num_steps)
        assert (got.alphas - ref.alphas).abs().max().item() <= 1e-12 * 100
        assert (got.betas - ref.betas).abs().max().item() <= 1e-12 * 100
        for r in range(3):
            a, b = got.ritz(r), ref.ritz(r)
            assert torch.allclose(a.values, b.values, rtol=1e-12, atol=1e-12)
            assert torch.allclose(a.weights, b.weights, rtol=0, atol=1e-12)
        # The loss is made of rounding errors: stores agree on its size, not on its digits.
        assert torch.allclose(got.orthogonality_loss, ref.orthogonality_loss, rtol=0.1, atol=1e-13)
    # The basis view outlives the file (POSIX keeps the mapping).
    assert basis_files(tmp_path) == []
    assert (got.basis - ref.basis).abs().max().item() < 1e-10


def test_eigenvalues_and_density_on_disk_match_the_device_store(tmp_path):
    op, _ = known_matrix(torch.cat([torch.linspace(-3, -1, 20, dtype=torch.float64), outliers(N - 20)]), seed=5)
    with DiskBasis(tmp_path, block_size=4) as store:
        for which in ("largest", "smallest"):
            ref = eigenvalues(op, 3, which=which, generator=seeded(4), return_eigenvectors=True)
            got = eigenvalues(op, 3, which=which, generator=seeded(4), return_eigenvectors=True, basis=store)
            assert got.basis_storage == "disk" and got.num_steps == ref.num_steps
            assert torch.allclose(got.eigenvalues, ref.eigenvalues, rtol=1e-12, atol=0)
            assert (got.eigenvectors - ref.eigenvectors).abs().max().item() < 1e-10
        ref_slq = spectral_density(op, runs=4, steps=40, generator=seeded(7))
        got_slq = spectral_density(op, runs=4, steps=40, generator=seeded(7), basis=store)
    assert got_slq.basis_storage == "disk" and got_slq.reorth == "full"
    for a, b in zip(got_slq.ritz_values, ref_slq.ritz_values, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_slq.ritz_weights, ref_slq.ritz_weights, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- the file's life


def test_file_exists_during_the_run_and_is_gone_after(tmp_path):
    op, _ = known_matrix(outliers())
    watching = Watching(op, tmp_path)
    with DiskBasis(tmp_path) as store:
        result = lanczos(watching, torch.randn(N, 2, generator=seeded(2), dtype=torch.float64), 30, basis=store)
        assert len(watching.seen) == 30
        assert all(len(files) == 1 and files[0].startswith(FILE_PREFIX) for files in watching.seen), watching.seen
        assert store.path is not None and store.path.parent == tmp_path
        # The file holds the whole basis: 31 vectors × 2 runs × 200 float64 entries.
        assert store.path.stat().st_size == 31 * 2 * N * 8
        assert torch.equal(
            torch.from_file(str(store.path), size=31 * 2 * N, dtype=torch.float64).view(31, 2, N)[5, 1],
            result.basis[5, :, 1],
        )
    assert basis_files(tmp_path) == [] and store.path is None


def test_growth_and_reuse_leave_one_file(tmp_path):
    """A bare process grows the file (16 vectors, then 32); a second run replaces the first run's file."""
    op, _ = known_matrix(outliers())
    start = torch.randn(N, 2, generator=seeded(3), dtype=torch.float64)
    store = DiskBasis(tmp_path, block_size=5)
    process = LanczosProcess(op, start, basis=store)
    for _ in range(20):
        process.step()
        assert len(basis_files(tmp_path)) == 1
    assert store.path.stat().st_size == 32 * 2 * N * 8
    first = store.path
    ref = lanczos(op, start, 20)
    assert torch.allclose(process.result().alphas, ref.alphas, rtol=1e-12, atol=0)
    lanczos(op, start, 10, basis=store)
    assert basis_files(tmp_path) == [store.path.name] and store.path != first
    store.close()
    store.close()  # idempotent
    assert basis_files(tmp_path) == []


def test_garbage_collection_removes_the_file(tmp_path):
    op, _ = known_matrix(outliers())
    store = DiskBasis(tmp_path)
    lanczos(op, torch.randn(N, 1, generator=seeded(4), dtype=torch.float64), 10, basis=store)
    assert len(basis_files(tmp_path)) == 1
    del store
    gc.collect()
    assert basis_files(tmp_path) == []


def test_budget_counts_one_block_for_the_disk_store(tmp_path):
    """A budget below the device basis but above a disk block keeps full reorthogonalization on disk."""
    op, _ = known_matrix(outliers())
    runs, steps = 3, 30
    budget = runs * 4 * N * 8  # one block of 4 vectors per run
    with DiskBasis(tmp_path, block_size=4) as store:
        assert store.resident_bytes(runs, steps + 1, N, torch.float64) == budget
        on_disk = spectral_density(
            op, runs=runs, steps=steps, generator=seeded(1), basis=store, basis_memory_bytes=budget
        )
    on_device = spectral_density(op, runs=runs, steps=steps, generator=seeded(1), basis_memory_bytes=budget)
    assert on_disk.reorth == "full" and on_disk.note == "" and on_disk.basis_storage == "disk"
    assert on_device.reorth == "none" and "in the device store" in on_device.note


# --------------------------------------------------------------------------- errors name the folder


def test_missing_folder_and_a_file_are_rejected(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"DiskBasis folder {missing} does not exist; create it"):
        DiskBasis(missing)
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"DiskBasis folder {a_file} is not a folder"):
        DiskBasis(a_file)


def test_unwritable_folder_is_rejected_naming_it(tmp_path, monkeypatch):
    """The refusal comes from the file system where the file is created (simulated: CI runs as root,
    which permission bits do not bind)."""

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(disk_module.tempfile, "mkstemp", refuse)
    with pytest.raises(
        PermissionError,
        match=rf"DiskBasis folder {tmp_path} is not writable \(Permission denied\); "
        "pass a folder this process can write to",
    ):
        DiskBasis(tmp_path)


def test_no_space_is_an_error_naming_the_folder_and_leaves_no_file(tmp_path, monkeypatch):
    op, _ = known_matrix(outliers())
    start = torch.randn(N, 2, generator=seeded(5), dtype=torch.float64)
    store = DiskBasis(tmp_path)
    real = disk_module.shutil.disk_usage
    monkeypatch.setattr(disk_module.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    need = 11 * 2 * N * 8
    with pytest.raises(
        OSError,
        match=rf"no space for the Lanczos basis in DiskBasis folder {tmp_path}: "
        rf"needs {need} bytes, 1000 free",
    ) as info:
        lanczos(op, start, 10, basis=store)
    assert info.value.errno == errno.ENOSPC
    assert basis_files(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate")
def test_a_full_disk_at_reservation_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    """The file system refuses the reservation even though disk_usage said there was room."""
    op, _ = known_matrix(outliers())

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_module.os, "posix_fallocate", full)
    store = DiskBasis(tmp_path)
    with pytest.raises(OSError, match=rf"no space for the Lanczos basis in DiskBasis folder {tmp_path}"):
        lanczos(op, torch.randn(N, 1, generator=seeded(6), dtype=torch.float64), 10, basis=store)
    assert basis_files(tmp_path) == []
