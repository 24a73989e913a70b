"""probe/symmetry.py: the symmetry defect |uᵀHv − vᵀHu| / |uᵀHv| of an operator, and its warning."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from cluster.data import digits_tensors
from probe.hessian import HessianOperator
from probe.models import digits_mlp
from probe.operators import DenseOperator
from probe.symmetry import WARN_FACTOR, SymmetryWarning, symmetry_defect, unit_roundoff

N = 40


def symmetric(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (a + a.T) / 2


def test_a_symmetric_float64_matrix_has_a_defect_at_rounding_level():
    r = symmetry_defect(DenseOperator(symmetric(N, 0)), torch.Generator().manual_seed(1))
    assert r.defect <= 1e-14 and r.num_matvecs == 2
    assert r.unit_roundoff == 2.0**-53 and r.dtype == "float64" and r.threshold == WARN_FACTOR * 2.0**-53
    assert not r.exceeds and r.note == ""
    assert r.uhv == pytest.approx(r.vhu, rel=1e-14)


def test_an_asymmetric_matrix_gives_the_closed_form_defect_for_the_drawn_vectors():
    eps = 1e-9
    a = symmetric(N, 0)
    noise = torch.randn(N, N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    op = DenseOperator(a + eps * noise)  # asymmetric far below DenseOperator's symmetry_tol (1e-6)
    r = symmetry_defect(op, torch.Generator().manual_seed(2), warn=False)
    # the same draw: two Gaussian columns (u, v) from the same seed
    uv = op.random_vectors(2, generator=torch.Generator().manual_seed(2), kind="gaussian")
    u, v = uv[:, 0], uv[:, 1]
    closed = abs(eps * (u @ noise @ v - v @ noise @ u)) / abs(u @ (a + eps * noise) @ v)
    assert r.defect == pytest.approx(float(closed), rel=1e-5)  # the closed form's own rounding: ~1e-16/1e-9
    assert r.defect > 1e-11 and r.exceeds


def test_every_worker_of_a_sharded_draw_uses_the_shared_helpers(monkeypatch):
    """Vectors come from op.random_vectors and the dots pass through op.allreduce (once, both dots)."""
    op = DenseOperator(symmetric(N, 3))
    calls = []
    original = op.allreduce
    monkeypatch.setattr(op, "allreduce", lambda t: calls.append(tuple(t.shape)) or original(t))
    symmetry_defect(op, torch.Generator().manual_seed(0))
    assert calls == [(2,)]


def test_a_float64_mlp_hessian_is_symmetric_to_rounding():
    x, y = digits_tensors()
    x, y = x[:160].double(), y[:160]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits_mlp(hidden=16).double()
    op = HessianOperator(model, F.cross_entropy, [(x[:100], y[:100]), (x[100:], y[100:])])
    with warnings.catch_warnings():
        warnings.simplefilter("error", SymmetryWarning)
        r = symmetry_defect(op, torch.Generator().manual_seed(0))
    assert r.defect <= 1e-12  # measured 1e-15 (median over seeds 6e-16, ~5 unit roundoffs)
    assert op.num_matvecs == 2


def test_a_float32_mlp_hessian_is_symmetric_to_float32_rounding_without_a_warning():
    x, y = digits_tensors()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits_mlp(hidden=16)
    op = HessianOperator(model, F.cross_entropy, [(x[:160], y[:160])])
    with warnings.catch_warnings():
        warnings.simplefilter("error", SymmetryWarning)
        r = symmetry_defect(op, torch.Generator().manual_seed(0))
    assert r.unit_roundoff == unit_roundoff(torch.float32) and 1e-9 < r.defect < r.threshold  # measured ~3e-7


def test_a_float64_hugging_face_llama_is_symmetric_only_to_float32_level_and_warns():
    transformers = pytest.importorskip("transformers")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from probe.gpt import lm_loss

    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[:2, :-1], "labels": ids[:2, 1:]}, {"input_ids": ids[2:, :-1], "labels": ids[2:, 1:]}]
    with sdpa_kernel([SDPBackend.MATH]):  # the CPU flash kernel has no double backward
        op = HessianOperator(model, lm_loss, batches)
        assert op.dtype == torch.float64
        with pytest.warns(
            SymmetryWarning,
            match=r"operator symmetric only to .* \(float64 rounding 1\.1e-16\): "
            r"parts of the model compute in lower precision",
        ):
            r = symmetry_defect(op, torch.Generator().manual_seed(0))
    assert r.defect > 1e-10  # measured 8.4e-9 here (median over 20 seeds 1e-7): float32 RMSNorm/rotary
    assert r.exceeds and "Hugging Face RMSNorm/rotary" in r.note and f"{r.defect:.1e}" in r.note


def test_a_non_finite_operator_gives_nan_and_says_so():
    m = symmetric(N, 0)
    m[0, 0] = math.inf
    r = symmetry_defect(DenseOperator(m), torch.Generator().manual_seed(0), warn=False)
    assert math.isnan(r.defect) and r.exceeds and "not finite" in r.note
