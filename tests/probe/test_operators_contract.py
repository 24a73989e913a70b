"""The contract every curvature operator passes (probe/operators.py and its subclasses).

One suite, :class:`OperatorContract`; each operator is a subclass whose differences
are class attributes (how to build it, its dimension, its cached batches). The
contract: linearity, symmetry, determinism, dtype and device kept (float32 and
float64), ``matvec`` agreeing with the columns of ``matmat``, and wrong shapes,
dtypes and devices rejected with a message that names expected and got.
"""

from __future__ import annotations

import re
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from probe.ggn import GGNOperator
from probe.hessian import HessianOperator
from probe.models import digits_cnn, digits_mlp
from probe.operators import CurvatureOperator, DenseOperator, inner, norm

# float32 and float64 on the CPU, and on CUDA where a GPU is present.
PLACEMENTS = [
    pytest.param((dtype, device), id=f"{str(dtype).removeprefix('torch.')}-{device}")
    for device in ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    for dtype in (torch.float32, torch.float64)
]
OTHER_DTYPE = {torch.float32: torch.float64, torch.float64: torch.float32}


@pytest.fixture(scope="module", autouse=True)
def exact_cuda_kernels():
    """On CUDA the contract is checked with deterministic, full-precision cuDNN kernels.

    With cuDNN's defaults, measured on an H200: the CNN Hessian's ``check_determinism()``
    is ~4e-8 in float32 and ~1e-16 in float64 (the convolution backward uses atomics),
    and float32 convolutions run in TF32, so linearity holds only to 5e-5 (2e-7 without
    TF32). No effect on the CPU.
    """
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.allow_tf32
    cudnn.deterministic, cudnn.allow_tf32 = True, False
    yield
    cudnn.deterministic, cudnn.allow_tf32 = saved


def gaussian(op: CurvatureOperator, *shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=op.dtype, device=op.device)


class OperatorContract:
    """Tests every operator passes. Subclasses set ``dim`` and implement ``build``."""

    dim: int
    # Relative tolerance of identities that hold exactly in exact arithmetic.
    rtol = {torch.float32: 2e-5, torch.float64: 1e-12}

    def build(self, dtype: torch.dtype, device: torch.device, data, seeded_model) -> CurvatureOperator:
        raise NotImplementedError

    @pytest.fixture(scope="class", params=PLACEMENTS)
    @classmethod
    def op(cls, request, digits64, seeded_model) -> CurvatureOperator:
        dtype, device = request.param
        return cls().build(dtype, torch.device(device), digits64, seeded_model)

    def test_shape_is_dim_by_dim(self, op):
        assert op.shape == (self.dim, self.dim)
        assert op.dim == op.local_dim == self.dim

    def test_linearity(self, op):
        x, y = gaussian(op, self.dim, seed=1), gaussian(op, self.dim, seed=2)
        a, b = 1.7, -0.3
        lhs = op @ (a * x + b * y)
        rhs = a * (op @ x) + b * (op @ y)
        scale = abs(a) * norm(op, op @ x) + abs(b) * norm(op, op @ y)
        assert (norm(op, lhs - rhs) / scale).item() < self.rtol[op.dtype]

    def test_symmetry(self, op):
        x, y = gaussian(op, self.dim, seed=3), gaussian(op, self.dim, seed=4)
        ax, ay = op @ x, op @ y
        gap = (inner(op, y, ax) - inner(op, x, ay)).abs()
        scale = norm(op, y) * norm(op, ax) + norm(op, x) * norm(op, ay)
        assert (gap / scale).item() < self.rtol[op.dtype]

    def test_determinism(self, op):
        v = gaussian(op, self.dim, seed=5)
        assert torch.equal(op @ v, op @ v)
        assert op.check_determinism(generator=torch.Generator().manual_seed(6)) == 0.0

    def test_keeps_dtype_and_device(self, op, request):
        dtype, device = request.node.callspec.params["op"]
        assert op.dtype == dtype and op.device.type == device
        v = gaussian(op, self.dim, seed=7)
        V = gaussian(op, self.dim, 3, seed=8)
        for out, shape in ((op.matvec(v), (self.dim,)), (op.matmat(V), (self.dim, 3)), (op @ V, (self.dim, 3))):
            assert out.shape == shape
            assert out.dtype == dtype
            assert out.device.type == device

    def test_matvec_matches_matmat_columns(self, op):
        V = gaussian(op, self.dim, 3, seed=9)
        block = op.matmat(V)
        cols = torch.stack([op.matvec(V[:, j]) for j in range(3)], dim=1)
        assert (norm(op, block - cols) / norm(op, cols)).max().item() < self.rtol[op.dtype]

    def test_matmul_dispatches_on_ndim(self, op):
        V = gaussian(op, self.dim, 2, seed=10)
        assert torch.equal(op @ V[:, 0], op.matvec(V[:, 0]))
        assert torch.equal(op @ V, op.matmat(V))

    @pytest.mark.parametrize(
        ("method", "extra", "expected"),
        [
            ("matvec", (1,), r"matvec expects a tensor of shape \(local_dim={dim},\), got shape \({bad},\)"),
            ("matvec", (-1,), r"matvec expects a tensor of shape \(local_dim={dim},\), got shape \({bad},\)"),
            ("matmat", (1, 2), r"matmat expects a tensor of shape \(local_dim={dim}, k\), got shape \({bad}, 2\)"),
        ],
    )
    def test_wrong_length_rejected(self, op, method, extra, expected):
        bad = self.dim + extra[0]
        x = gaussian(op, bad, *extra[1:], seed=11)
        with pytest.raises(ValueError, match=expected.format(dim=self.dim, bad=bad)):
            getattr(op, method)(x)

    def test_wrong_rank_rejected(self, op):
        d = self.dim
        with pytest.raises(ValueError, match=rf"matmat expects .*\(local_dim={d}, k\), got shape \({d},\)"):
            op.matmat(gaussian(op, d, seed=12))
        with pytest.raises(ValueError, match=rf"matvec expects .*\(local_dim={d},\), got shape \({d}, 1\)"):
            op.matvec(gaussian(op, d, 1, seed=12))
        with pytest.raises(ValueError, match=rf"matmat expects .*\(local_dim={d}, k\), got shape \({d}, 2, 1\)"):
            op @ gaussian(op, d, 2, 1, seed=12)

    def test_wrong_dtype_rejected(self, op):
        other = OTHER_DTYPE[op.dtype]
        v = torch.zeros(self.dim, dtype=other, device=op.device)
        expected = re.escape(f"operator dtype is {op.dtype}, got a vector of dtype {other}")
        with pytest.raises(ValueError, match=expected):
            op.matvec(v)
        with pytest.raises(ValueError, match=expected):
            op.matmat(v.unsqueeze(1))

    def test_wrong_device_rejected(self, op):
        v = torch.zeros(self.dim, dtype=op.dtype, device="meta")
        with pytest.raises(ValueError, match=re.escape(f"operator device is {op.device}, got a vector on meta")):
            op.matvec(v)


class TestDenseOperator(OperatorContract):
    dim = 40

    def build(self, dtype, device, data, seeded_model):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64)
        return DenseOperator((a + a.T).to(dtype=dtype, device=device))


class ModelOperatorContract(OperatorContract):
    """Operators built from a digits model, a loss and two batches of unequal size."""

    operator_cls = HessianOperator
    factory = staticmethod(digits_mlp)
    loss_fn = staticmethod(F.cross_entropy)
    op_kwargs: dict = {}
    batch_sizes = (23, 41)
    expected_cached_batches = 2

    def build(self, dtype, device, data, seeded_model):
        x, y = data
        model = seeded_model(self.factory, seed=0).to(dtype=dtype, device=device)
        cuts = torch.tensor(self.batch_sizes).cumsum(0).tolist()
        batches = [(x[a:b], y[a:b]) for a, b in zip([0, *cuts[:-1]], cuts, strict=True)]
        return self.operator_cls(model, self.loss_fn, batches, **self.op_kwargs)

    def test_caches_expected_batches(self, op):
        assert op.num_cached_batches == self.expected_cached_batches


class TestHessianMLP(ModelOperatorContract):
    dim = 3466  # 64·32+32 + 32·32+32 + 32·10+10


class TestHessianCNN(ModelOperatorContract):
    factory = staticmethod(digits_cnn)
    dim = 838  # 4·9+4 + 4·4·9+4 + 4·16·10+10


class TestGGNMLP(ModelOperatorContract):
    operator_cls = GGNOperator
    dim = 3466


class TestHessianOneLayer(ModelOperatorContract):
    op_kwargs = {"params": ["3"]}  # the hidden-to-hidden Linear(32, 32)
    dim = 32 * 32 + 32


class TestHessianRecomputed(ModelOperatorContract):
    op_kwargs = {"graph_memory_bytes": 0}  # every product rebuilds every graph
    expected_cached_batches = 0
    dim = 3466


class TestHessianUnbatched(ModelOperatorContract):
    op_kwargs = {"batched": False}  # one backward per column
    dim = 3466


class TestDenseOperatorConstruction:
    """DenseOperator's own checks (not part of the contract)."""

    def test_non_square_rejected(self):
        with pytest.raises(ValueError, match=r"matrix must be square, got shape \(3, 4\)"):
            DenseOperator(torch.zeros(3, 4))

    def test_asymmetric_rejected_with_way_out(self):
        a = torch.eye(3, dtype=torch.float64)
        a[0, 1] = 0.5
        with pytest.raises(ValueError, match=r"relative asymmetry 0\.5 > symmetry_tol=1e-06; symmetrize"):
            DenseOperator(a)

    def test_random_vectors_unknown_kind_rejected(self):
        op = DenseOperator(torch.eye(3))
        with pytest.raises(ValueError, match=r"kind must be 'rademacher' or 'gaussian', got kind='uniform'"):
            op.random_vectors(2, generator=torch.Generator().manual_seed(0), kind="uniform")

    def test_random_vectors_are_seeded_and_rademacher(self):
        op = DenseOperator(torch.eye(50, dtype=torch.float64))
        a = op.random_vectors(4, generator=torch.Generator().manual_seed(1))
        b = op.random_vectors(4, generator=torch.Generator().manual_seed(1))
        assert a.shape == (50, 4) and torch.equal(a, b)
        assert set(a.unique().tolist()) == {-1.0, 1.0}


def test_random_vectors_of_a_large_dimension_are_drawn_in_blocks_identically_for_every_shard(monkeypatch):
    """Above RANDOM_CHUNK_ROWS the draw is blockwise (memory O(block + shard)); every sharding sees the same vectors."""
    import probe.operators as ops

    monkeypatch.setattr(ops, "RANDOM_CHUNK_ROWS", 64)  # small blocks, so a small operator exercises the path

    class Slice(ops.CurvatureOperator):
        def __init__(self, dim, lo, hi):
            self.dim, self.local_dim, self.dtype, self.device = dim, hi - lo, torch.float64, torch.device("cpu")
            self._s = slice(lo, hi)

        @property
        def local_slice(self):
            return self._s

    dim = 64 * 5 + 7  # a tail shorter than one block
    for kind in ("gaussian", "rademacher"):
        whole = Slice(dim, 0, dim).random_vectors(3, generator=torch.Generator().manual_seed(1), kind=kind)
        bounds = [0, 50, 64, 200, dim]
        parts = [
            Slice(dim, a, b).random_vectors(3, generator=torch.Generator().manual_seed(1), kind=kind)
            for a, b in pairwise(bounds)
        ]
        assert torch.equal(torch.cat(parts), whole)
        assert whole.shape == (dim, 3) and whole.std() > 0.5
