"""Mixed precision: bfloat16 and float16 products, float32/float64 vectors and sums, float64 scalars.

References are exact and in float64: the dense Hessian (``torch.func.hessian``) of a float64
twin that holds exactly the 16-bit model's weights, on inputs both see alike. Tolerances come
from each format's unit roundoff ``u`` (bfloat16 ``2⁻⁸ ≈ 3.9e-3``, float16 ``2⁻¹¹ ≈ 4.9e-4``): one
product's relative error is a small multiple of ``u`` (the rounding of the activations and
gradients it passes through), so products must agree within ``TOL_UNITS·u`` and, to show they
really ran in 16 bits, differ by more than ``u/100``.
"""

from __future__ import annotations

import re
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cluster.spec import SpecError, parse_spec
from probe.eigen import eigenvalues
from probe.hessian import HessianOperator
from probe.lanczos import lanczos
from probe.loss_scale import MAX_RETRIES, Float16RangeError
from probe.models import digits_mlp

SIZES = (37, 150, 113)  # unequal batches over the 300 probe examples
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TOL_UNITS = 4  # measured: 0.71u (bfloat16) and 0.74u (float16) on the trained digits MLP


def split(x, y, sizes=SIZES):
    bounds = torch.tensor((0, *sizes)).cumsum(0).tolist()
    return [(x[a:b], y[a:b]) for a, b in pairwise(bounds)]


def gaussian_block(dim, k, seed, dtype=torch.float32):
    return torch.randn(dim, k, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def twins(state, x, dtype):
    """``digits_mlp(hidden=16)`` in ``dtype`` with ``state`` rounded to it, its float64 twin with exactly
    those weights, and inputs rounded to ``dtype`` (in float64)."""
    model16 = digits_mlp(hidden=16).to(dtype)
    model16.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    model64 = digits_mlp(hidden=16).to(torch.float64)
    model64.load_state_dict({k: v.to(torch.float64) for k, v in model16.state_dict().items()})  # exact
    return model16, model64, x.to(dtype).to(torch.float64)


@pytest.fixture(scope="module")
def make_case(trained_mlp_state, digits64, dense_hessian):
    """``make_case(dtype)``: a 16-bit trained MLP, its float64 twin, batches and the twin's dense
    Hessian ``(1482, 1482)`` (built once per dtype)."""
    cache = {}

    def make(dtype):
        if dtype not in cache:
            x, y = digits64
            model16, model64, x = twins(trained_mlp_state, x, dtype)
            cache[dtype] = (dtype, model16, model64, split(x, y), dense_hessian(model64, F.cross_entropy, x, y))
        return cache[dtype]

    return make


@pytest.fixture(params=[torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def case(request, make_case):
    return make_case(request.param)


@pytest.fixture
def fp16_case(make_case):
    return make_case(torch.float16)


def test_products_match_the_dense_float64_hessian_within_unit_roundoff(case, relative_error):
    dtype, model16, model64, batches, dense = case
    H = HessianOperator(model16, F.cross_entropy, batches)
    assert (H.dtype, H.param_dtype) == (torch.float32, dtype)
    assert (H.loss_scale is not None) == (dtype == torch.float16)
    V = gaussian_block(H.dim, 4, seed=17)
    HV = H @ V
    assert HV.dtype == torch.float32
    u = UNIT_ROUNDOFF[dtype]
    assert u / 100 < relative_error(HV.double(), dense @ V.double()) < TOL_UNITS * u
    loss, g = H.loss_and_gradient()  # unscaled (float16: the loss scale undone), in float32
    assert loss.dtype == g.dtype == torch.float32
    x = torch.cat([b[0] for b in batches])
    assert abs(loss.item() - F.cross_entropy(model64(x), torch.cat([b[1] for b in batches])).item()) < 10 * u


def test_float64_vectors_over_a_16_bit_model(case, relative_error):
    """accumulate_dtype=float64: vectors and sums in float64; the product's error is still the format's."""
    dtype, model16, _, batches, dense = case
    H = HessianOperator(model16, F.cross_entropy, batches, accumulate_dtype=torch.float64)
    V = gaussian_block(H.dim, 2, seed=18, dtype=torch.float64)
    HV = H @ V
    assert (H.dtype, HV.dtype) == (torch.float64, torch.float64)
    assert relative_error(HV, dense @ V) < TOL_UNITS * UNIT_ROUNDOFF[dtype]


def test_batches_are_weighted_and_summed_in_float32(case, relative_error):
    """The three-batch operator equals Σ_b w_b·(batch b's 16-bit product) formed in float64, to float32
    rounding: neither the weights nor the sum went through the 16-bit format."""
    _, model16, _, batches, _ = case
    H = HessianOperator(model16, F.cross_entropy, batches, loss_scale=None)
    V = gaussian_block(H.dim, 2, seed=18)
    per_batch = [HessianOperator(model16, F.cross_entropy, [b], loss_scale=H.loss_scale) @ V for b in batches]
    summed = sum(w * hv.double() for w, hv in zip(H.weights, per_batch, strict=True))
    assert relative_error((H @ V).double(), summed) < 1e-6


def test_lanczos_scalars_and_tridiagonal_are_float64_with_float32_vectors(case):
    dtype, model16, _, batches, dense = case
    H = HessianOperator(model16, F.cross_entropy, batches)
    start = H.random_vectors(2, generator=torch.Generator().manual_seed(0))
    assert start.dtype == torch.float32
    res = lanczos(H, start, 6)
    assert res.alphas.dtype == res.betas.dtype == torch.float64
    assert res.tridiagonal(0).dtype == torch.float64
    assert res.ritz(0).values.dtype == res.ritz(0).weights.dtype == torch.float64
    assert res.basis is not None and res.basis.dtype == torch.float32
    top = eigenvalues(H, 1, generator=torch.Generator().manual_seed(0)).eigenvalues
    assert top.dtype == torch.float64
    ref = torch.linalg.eigvalsh(dense)[-1].item()
    assert abs(top[0].item() - ref) / ref < TOL_UNITS * UNIT_ROUNDOFF[dtype]  # measured 0.31u, 0.065u


def test_float64_accumulation_over_a_float32_model(trained_mlp_state, digits64, relative_error):
    model32 = digits_mlp(hidden=16)
    model32.load_state_dict({k: v.to(torch.float32) for k, v in trained_mlp_state.items()})
    batches = [(bx.to(torch.float32), by) for bx, by in split(*digits64)]
    H32 = HessianOperator(model32, F.cross_entropy, batches)
    H = HessianOperator(model32, F.cross_entropy, batches, accumulate_dtype=torch.float64)
    assert (H.dtype, H.param_dtype, H32.dtype) == (torch.float64, torch.float32, torch.float32)
    V = gaussian_block(H.dim, 2, seed=19)
    assert relative_error(H @ V.to(torch.float64), (H32 @ V).to(torch.float64)) < 1e-5


@pytest.mark.parametrize(
    ("dtype", "message"),
    [
        (
            torch.bfloat16,
            "accumulate_dtype must be torch.float32 or torch.float64, got torch.bfloat16; "
            "estimators must not run in 16-bit formats",
        ),
        (
            torch.float32,
            "accumulate_dtype=torch.float32 is narrower than the parameters' torch.float64; pass None or torch.float64",
        ),
    ],
)
def test_bad_accumulate_dtype_rejected(trained_mlp, digits64, dtype, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        HessianOperator(trained_mlp, F.cross_entropy, [digits64], accumulate_dtype=dtype)


# --- float16 dynamic range: loss scaling, overflow ----------------------------------------------

TINY = 2.0**-16  # a loss this small has float16 gradients below the subnormal range (6e-8)


def tiny_loss(outputs, targets):
    return F.cross_entropy(outputs, targets) * TINY


def test_loss_scaling_recovers_products_whose_gradients_underflow(fp16_case, relative_error):
    _, model16, _, batches, dense = fp16_case
    V = gaussian_block(dense.shape[0], 2, seed=21)
    reference = (dense * TINY) @ V.double()  # exact: TINY is a power of two
    unscaled = HessianOperator(model16, tiny_loss, batches, loss_scale=1.0) @ V
    assert relative_error(unscaled.double(), reference) > 0.1  # measured 0.55: the products underflowed
    H = HessianOperator(model16, tiny_loss, batches)  # the scale chosen from the first gradient
    assert H.loss_scale is not None and H.loss_scale >= 2.0**14
    assert relative_error((H @ V).double(), reference) < TOL_UNITS * UNIT_ROUNDOFF[torch.float16]


def test_an_overflowing_product_lowers_the_scale_and_recomputes(fp16_case, relative_error):
    _, model16, _, batches, dense = fp16_case

    def big_loss(outputs, targets):  # 64 x cross-entropy: gradients near 4, at 2**15 beyond float16's 65504
        return F.cross_entropy(outputs, targets) * 64

    H = HessianOperator(model16, big_loss, batches, loss_scale=2.0**15)
    V = gaussian_block(H.dim, 2, seed=22)
    HV = H @ V
    assert H.loss_scale is not None and H.rescales >= 1 and H.loss_scale < 2.0**15
    assert H.num_matvecs == 2  # retries are not counted as products
    assert relative_error(HV.double(), 64 * dense @ V.double()) < TOL_UNITS * UNIT_ROUNDOFF[torch.float16]
    rescales = H.rescales
    _ = H @ V  # the lowered scale stays: no more retries
    assert H.rescales == rescales


class SteepRsqrt(nn.Module):
    """``rsqrt(1e-4 + x²)``: values up to 100 (finite in float16), derivatives up to 100³ (not)."""

    def forward(self, x):
        return torch.rsqrt(1e-4 + x * x)


def steep_model() -> nn.Module:
    torch.manual_seed(0)
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.mul_(1e-3)
        lin.bias.zero_()
    return nn.Sequential(lin, SteepRsqrt()).half()


def test_a_product_that_overflows_at_every_scale_raises_one_clear_error():
    x, y = torch.randn(8, 4).half(), torch.zeros(8, 2)
    model = steep_model()
    H = HessianOperator(model, F.mse_loss, [(x, y)], loss_scale=1.0)
    message = f"overflowed at every loss scale down to {2.0 ** (-4 * MAX_RETRIES):g} ({MAX_RETRIES} backoffs"
    with pytest.raises(Float16RangeError, match=re.escape(message)) as info:
        _ = H @ torch.ones(H.dim)
    assert "probe in precision: bfloat16" in str(info.value)
    # choosing the scale meets the same overflow in the first gradient, and says so
    with pytest.raises(Float16RangeError, match="overflows float16 even at loss scale"):
        HessianOperator(model, F.mse_loss, [(x, y)])
    # a non-finite vector is the caller's: NaN out, no retries
    fresh = HessianOperator(model, F.mse_loss, [(x, y)], loss_scale=1.0)
    out = fresh @ torch.full((fresh.dim,), float("nan"))
    assert bool(out.isnan().all()) and fresh.rescales == 0 and fresh.loss_scale == 1.0


def test_loss_scale_is_checked():
    x, y = torch.randn(8, 4), torch.zeros(8, 2)
    with pytest.raises(ValueError, match=re.escape("loss_scale applies to float16 models only")):
        HessianOperator(nn.Linear(4, 2), F.mse_loss, [(x, y)], loss_scale=8.0)
    with pytest.raises(ValueError, match=re.escape("loss_scale must be a power of two between 2**-24 and 2**15")):
        HessianOperator(nn.Linear(4, 2).half(), F.mse_loss, [(x.half(), y)], loss_scale=3.0)


def test_layer_norm_double_backward_runs_in_float32_in_a_float16_model(relative_error):
    """Inputs of small spread (rstd ~100) make float16 LayerNorm's double backward overflow (rstd³);
    the operator computes normalization in float32, so the products stay accurate."""
    torch.manual_seed(0)
    first = nn.Linear(6, 8)
    with torch.no_grad():
        first.weight.mul_(0.01)
        first.bias.zero_()
    model64 = nn.Sequential(first, nn.LayerNorm(8), nn.Linear(8, 3)).double()
    model16 = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)).half()
    model16.load_state_dict({k: v.half() for k, v in model64.state_dict().items()})
    model64.load_state_dict({k: v.double() for k, v in model16.state_dict().items()})
    x = torch.randn(32, 6).half()
    y = torch.randint(0, 3, (32,))
    V = gaussian_block(sum(p.numel() for p in model16.parameters()), 2, seed=3)
    ref = HessianOperator(model64, F.cross_entropy, [(x.double(), y)]) @ V.double()
    HV = HessianOperator(model16, F.cross_entropy, [(x, y)]) @ V
    assert bool(torch.isfinite(HV).all())
    assert relative_error(HV.double(), ref) < 10 * TOL_UNITS * UNIT_ROUNDOFF[torch.float16]


# --- the spec: precision float16, vector_dtype --------------------------------------------------


def raw_spec(**top) -> dict:
    spec = {
        "name": "mixed",
        "model": {"factory": "probe.models:digits_mlp", "kwargs": {"hidden": 8}, "checkpoints": ["a.safetensors"]},
        "data": {"factory": "cluster.data:digits", "num_examples": 32, "batch_size": 16},
        "probes": [{"kind": "eigenvalues", "k": 1}],
    }
    return {**spec, **top}


def test_spec_accepts_float16_and_vector_dtype():
    spec = parse_spec(raw_spec(precision="float16", vector_dtype="float64"))
    assert (spec.precision, spec.vector_dtype) == ("float16", "float64")
    assert parse_spec(spec.to_dict()) == spec
    assert parse_spec(raw_spec()).vector_dtype is None


@pytest.mark.parametrize(
    ("top", "message"),
    [
        (
            {"vector_dtype": "bfloat16"},
            "vector_dtype must be one of float32, float64 (default: float32 for 16-bit precisions, the "
            "parameters' dtype otherwise), got 'bfloat16'",
        ),
        (
            {"precision": "float64", "vector_dtype": "float32"},
            "vector_dtype: float32 is narrower than precision: float64; use float64 or leave it out",
        ),
        ({"precision": "half"}, "precision must be one of auto, float32, float64, bfloat16, float16, got 'half'"),
    ],
)
def test_spec_rejects_bad_precision_settings_in_one_line(top, message):
    with pytest.raises(SpecError, match=re.escape(message)) as info:
        parse_spec(raw_spec(**top))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("precision", "vector_dtype", "expected"),
    [
        ("float16", None, (torch.float16, torch.float32)),
        ("float16", "float64", (torch.float16, torch.float64)),
        ("float32", "float64", (torch.float32, torch.float64)),
        ("bfloat16", None, (torch.bfloat16, torch.float32)),
    ],
)
def test_worker_builds_the_operator_in_the_spec_precisions(precision, vector_dtype, expected):
    from cluster.worker import ProbeWorker

    worker = ProbeWorker(raw_spec(precision=precision, vector_dtype=vector_dtype))
    worker.setup()
    model, _ = worker.build_model("init")
    op = worker.operator(model)
    assert isinstance(op, HessianOperator)
    assert (op.param_dtype, op.dtype) == expected
    assert torch.isfinite(op @ op.random_vectors(1, generator=torch.Generator().manual_seed(0))[:, 0]).all()
