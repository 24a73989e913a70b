"""Block Lanczos (``eigenvalues(..., block_size=b)``) against dense references, and block products.

Truth: matrices with known spectra (``known_spectrum``) and the dense float64 digits
Hessians of ``conftest.py``. The block estimators (trace, SLQ, block Lanczos) must hand
the operator blocks of columns, so that a model operator's own policy applies (one
batched backward per block on CUDA, one backward per column on the CPU).
"""

from __future__ import annotations

import pytest
import torch
from counting import CountingOperator, seeded

from probe.block_lanczos import BlockLanczosProcess
from probe.eigen import eigenvalues
from probe.operators import CurvatureOperator, DenseOperator
from probe.slq import spectral_density
from probe.slq_deflated import deflated_spectral_density
from probe.trace import hutchinson, hutchpp
from probe.trace_lowrank import krylov_hutchpp, xtrace

TRIPLE = [10.0, 10.0, 10.0]  # a top eigenvalue of multiplicity 3


class BlockRecorder(CountingOperator):
    """A counting dense operator that also records the width of every ``matmat`` block."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__(matrix)
        self.widths: list[int] = []

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.widths.append(V.shape[1])
        return super()._matmat(V)


def bulk(n: int, lo: float = -1.0, hi: float = 5.0) -> torch.Tensor:
    return torch.linspace(lo, hi, n, dtype=torch.float64)


def top(values: torch.Tensor, k: int) -> torch.Tensor:
    return values.sort(descending=True).values[:k]


def check_against_dense(result, matrix: torch.Tensor, ref: torch.Tensor, spectrum: torch.Tensor) -> None:
    """Converged; measured residuals equal the dense ones and meet tol; each value within its residual
    of the reference (Weyl/Bauer-Fike) and within r²/gap where separated (Parlett §11.7)."""
    scale = float(spectrum.abs().max())
    assert result.converged, result.note
    y = result.eigenvectors.to(torch.float64)
    dense = (matrix @ y - y * result.eigenvalues).norm(dim=0)
    floor = 100 * torch.finfo(torch.float64).eps * scale
    assert torch.all((result.residuals - dense).abs() <= 1e-6 * dense + floor)
    assert torch.all(dense <= result.tol * scale + floor)
    err = (result.eigenvalues - ref).abs()
    assert torch.all(err <= dense + floor), (err, dense)
    for i, theta in enumerate(result.eigenvalues.tolist()):
        others = spectrum[(spectrum - ref[i]).abs() > 1e-9 * scale]  # a repeated value is not its own gap
        gap = float((others - theta).abs().min())
        assert err[i] <= dense[i] ** 2 / gap + floor


def test_block_finds_a_triple_top_eigenvalue_that_a_single_vector_misses(known_spectrum):
    """A single start vector spans one direction of a 3-dimensional eigenspace: its Krylov
    space holds one copy of λ=10, and it reports the next eigenvalues, converged, as the
    second and third. A block of b ≥ 3 columns sees the whole eigenspace."""
    lam = torch.cat([torch.tensor(TRIPLE + [9.0, 8.5], dtype=torch.float64), bulk(195)])
    spec = known_spectrum(lam, seed=3)
    ref = top(lam, 5)
    single = eigenvalues(spec.op, 3, generator=seeded(0))
    assert single.converged and single.eigenvalues[0].item() == pytest.approx(10.0, abs=1e-9)
    assert single.eigenvalues[1].item() < 9.5, "single-vector Lanczos found a second copy (rounding)"
    for b in (3, 4, 5):
        r = eigenvalues(spec.op, 5, block_size=b, generator=seeded(0), return_eigenvectors=True)
        assert r.block_size == b and r.num_steps * b >= r.num_matvecs - 5 - b
        check_against_dense(r, spec.matrix, ref, lam)
        assert r.orthogonality_loss < 1e-12


@pytest.mark.parametrize("b", [2, 3, 6])
def test_clustered_top_eigenvalues_match_the_dense_spectrum(known_spectrum, b):
    """A cluster 10, 10−1e-4, 10−2e-4 above a bulk, plus two outliers: the block result matches
    the dense spectrum to its residuals (and to r²/gap for the separated outliers)."""
    lam = torch.cat([torch.tensor([10.0, 10.0 - 1e-4, 10.0 - 2e-4, 7.0, 6.5], dtype=torch.float64), bulk(245)])
    spec = known_spectrum(lam, seed=4)
    r = eigenvalues(spec.op, 5, block_size=b, tol=1e-8, generator=seeded(1), return_eigenvectors=True)
    check_against_dense(r, spec.matrix, top(lam, 5), lam)


def test_smallest_eigenvalues_with_a_block(known_spectrum):
    lam = torch.cat([torch.tensor([-3.0, -3.0, -2.0], dtype=torch.float64), bulk(120, 0.0, 4.0)])
    spec = known_spectrum(lam, seed=5)
    r = eigenvalues(spec.op, 3, which="smallest", block_size=2, generator=seeded(2), return_eigenvectors=True)
    check_against_dense(r, spec.matrix, lam.sort().values[:3], lam)


@pytest.mark.parametrize("b", [2, 5])
def test_top_eigenvalues_of_digits_hessians_match_dense_eigh(digits_problem, b):
    """float64 digits Hessians (MLP 2,410 and CNN 838 parameters): top 5 and bottom 3, 1e-8 relative."""
    op = digits_problem.operators[torch.float64]
    for which, k in (("largest", 5), ("smallest", 3)):
        r = eigenvalues(op, k, which=which, block_size=b, generator=seeded(0), return_eigenvectors=True)
        exact = digits_problem.eigenvalues
        ref = exact.flip(0)[:k] if which == "largest" else exact[:k]
        assert r.converged, f"{digits_problem.name} {which} b={b}: {r.note}"
        rel = ((r.eigenvalues - ref).abs() / ref.abs()).max().item()
        assert rel < 1e-8, f"{digits_problem.name} {which} b={b}: relative error {rel:.3g}"
        y = r.eigenvectors
        dense = (digits_problem.hessian @ y - y * r.eigenvalues).norm(dim=0)
        floor = 10 * torch.finfo(torch.float64).eps * digits_problem.spectral_norm
        assert torch.all((r.residuals - dense).abs() <= 1e-6 * dense + floor)
        assert torch.all(dense <= r.tol * digits_problem.spectral_norm + floor)


def test_float32_digits_hessian_with_a_block(mlp_problem):
    r = eigenvalues(mlp_problem.operators[torch.float32], 5, block_size=4, generator=seeded(0))
    ref = mlp_problem.eigenvalues.flip(0)[:5]
    assert r.converged
    assert ((r.eigenvalues - ref).abs() / ref.abs()).max().item() < 1e-4


def test_block_steps_apply_the_operator_to_blocks(known_spectrum):
    """Every block step is one ``matmat`` of ``b`` columns (a deflated block can only be narrower)."""
    lam = torch.cat([torch.tensor([9.0, 8.0, 7.0], dtype=torch.float64), bulk(97)])
    op = BlockRecorder(known_spectrum(lam, seed=6).matrix)
    r = eigenvalues(op, 3, block_size=4, generator=seeded(0))
    assert op.widths == [4] * r.num_steps
    assert op.columns == r.num_matvecs == 4 * r.num_steps


def test_a_block_on_a_hessian_operator_matches_single_vector_lanczos(mlp_problem):
    """Through the model operator (one backward per column on the CPU), same eigenvalues."""
    op = mlp_problem.operators[torch.float64]
    one = eigenvalues(op, 3, tol=1e-9, generator=seeded(0))
    block = eigenvalues(op, 3, tol=1e-9, block_size=3, generator=seeded(0))
    assert torch.allclose(one.eigenvalues, block.eigenvalues, rtol=1e-12, atol=0)


def test_invariant_block_krylov_space_is_reported(known_spectrum):
    """Three distinct eigenvalues of multiplicity 20: a block of 2 reaches 2 directions of each, 6 in all."""
    spec = known_spectrum(torch.tensor([3.0] * 20 + [2.0] * 20 + [1.0] * 20))
    r = eigenvalues(spec.op, 8, block_size=2, generator=seeded(0))
    assert not r.converged
    assert len(r.eigenvalues) == 6
    assert torch.allclose(r.eigenvalues, torch.tensor([3.0, 3.0, 2.0, 2.0, 1.0, 1.0], dtype=torch.float64))
    assert "start block's Krylov space is invariant" in r.note and "only 6 eigenvalues" in r.note


def test_the_basis_never_exceeds_the_dimension(known_spectrum):
    """A 10 × 10 matrix with a block of 4: the last block is cut to the 2 columns left."""
    spec = known_spectrum(torch.arange(1.0, 11.0))
    r = eigenvalues(spec.op, 10, block_size=4, tol=1e-10, generator=seeded(0))
    assert r.converged and torch.allclose(r.eigenvalues, torch.arange(10.0, 0.0, -1.0, dtype=torch.float64))
    assert r.num_matvecs <= 12


def test_host_basis_and_warm_start(known_spectrum):
    lam = torch.cat([torch.tensor([10.0, 10.0, 8.0], dtype=torch.float64), bulk(77)])
    spec = known_spectrum(lam, seed=7)
    device = eigenvalues(spec.op, 3, block_size=3, generator=seeded(4))
    host = eigenvalues(spec.op, 3, block_size=3, generator=seeded(4), basis="host")
    assert host.basis_storage == "host"
    assert torch.allclose(device.eigenvalues, host.eigenvalues, rtol=1e-13, atol=0)
    warm = eigenvalues(spec.op, 1, block_size=2, start=spec.eigenvectors[:, 0].clone(), generator=seeded(4))
    assert warm.converged and warm.num_steps == 1
    assert warm.eigenvalues[0].item() == pytest.approx(10.0, abs=1e-12)


def test_same_seed_same_numbers(mlp_problem):
    op = mlp_problem.operators[torch.float64]
    a = eigenvalues(op, 3, block_size=2, generator=seeded(7))
    b = eigenvalues(op, 3, block_size=2, generator=seeded(7))
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.num_matvecs == b.num_matvecs


def test_basis_memory_budget_lowers_block_steps(known_spectrum):
    lam = torch.cat([torch.tensor([9.0, 8.0], dtype=torch.float64), bulk(98)])
    op = known_spectrum(lam, seed=8).op
    vector_bytes = 100 * 8
    r = eigenvalues(op, 2, block_size=2, max_steps=20, basis_memory_bytes=11 * vector_bytes, generator=seeded(0))
    assert r.num_steps <= 4 and "max_steps lowered from 20 to 4" in r.note
    with pytest.raises(ValueError, match=r"holds fewer than k\+block_size=5 basis vectors"):
        eigenvalues(op, 3, block_size=2, basis_memory_bytes=4 * vector_bytes)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"block_size": 0}, r"block_size must be an integer in \[1, dim=30\], got block_size=0"),
        ({"block_size": 31}, r"block_size must be an integer in \[1, dim=30\], got block_size=31"),
        ({"block_size": 2, "reorth": "selective"}, r"block_size > 1 needs reorth='full', got reorth='selective'"),
        ({"k": 5, "block_size": 2, "max_steps": 2}, r"max_steps must be in \[ceil\(k/b\)=3, ceil\(dim/b\)=15\]"),
        ({"block_size": 4, "max_steps": 9}, r"in \[ceil\(k/b\)=1, ceil\(dim/b\)=8\], got max_steps=9"),
    ],
)
def test_block_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eigenvalues(DenseOperator(torch.eye(30, dtype=torch.float64)), **kwargs)


def test_process_rejects_a_bad_start_block():
    op = DenseOperator(torch.eye(6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"start must have shape \(local_dim=6, b\) with b ≥ 1, got \(5, 2\)"):
        BlockLanczosProcess(op, torch.ones(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="the start block is zero"):
        BlockLanczosProcess(op, torch.zeros(6, 2, dtype=torch.float64))


def test_block_estimators_hand_the_operator_blocks(known_spectrum):
    """Trace estimators apply ``block_size`` columns per ``matmat``; SLQ (plain and deflated) all
    runs per step; none loops column by column. The products counted equal those reported."""
    lam = torch.cat([torch.tensor([20.0, 15.0], dtype=torch.float64), bulk(198, 0.0, 1.0)])
    matrix = known_spectrum(lam, seed=9).matrix
    for name, widths in (
        ("hutchinson", {8}),
        ("hutch++", {8}),
        ("xtrace", {8}),
        ("krylov-hutch++", {4}),  # the Krylov block (krylov_block=4), then probes in blocks of 8
        ("slq", {6}),
        ("deflated-slq", {6}),  # after the one-vector first pass
    ):
        op = BlockRecorder(matrix)
        spent = _estimators_one(name, op)
        assert op.columns == spent, name
        assert widths <= set(op.widths), (name, op.widths)
        single = [w for w in op.widths if w == 1]
        allowed = {"deflated-slq": 40}.get(name, 0)  # the first pass is single-vector Lanczos
        assert len(single) <= allowed, (name, op.widths)


def _estimators_one(name: str, op: CurvatureOperator) -> int:
    g = seeded(0)
    if name == "hutchinson":
        return hutchinson(op, 40, generator=g, block_size=8).num_matvecs
    if name == "hutch++":
        return hutchpp(op, 48, generator=g, block_size=8).num_matvecs
    if name == "xtrace":
        return xtrace(op, 40, generator=g, block_size=8).num_matvecs
    if name == "krylov-hutch++":
        return krylov_hutchpp(op, 48, generator=g, block_size=8).num_matvecs
    if name == "slq":
        return spectral_density(op, runs=6, steps=10, generator=g).num_matvecs
    return deflated_spectral_density(op, runs=6, steps=10, k=2, generator=g).num_matvecs
