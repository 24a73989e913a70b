"""probe.noise against closed forms and per-example autograd loops, in float64.

Exact references:

- linear least squares, ``ℓᵢ = (xᵢᵀw + b − yᵢ)²`` (``F.mse_loss`` on one example with
  one output): ``gᵢ = 2(xᵢᵀw + b − yᵢ)·(xᵢ, 1)`` in closed form;
- a digits MLP (and one with BatchNorm, in eval mode): per-example gradients from a
  plain Python loop, one ``torch.autograd.grad`` per example, and the full-batch
  gradient of the mean loss;
- ``tr(Σ)`` from the two-pass form ``(1/n) Σᵢ ‖gᵢ − ḡ‖²``, which does not cancel,
  against the module's one-pass ``mean‖gᵢ‖² − ‖ḡ‖²``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cluster.data import digits_tensors
from probe.models import digits_mlp
from probe.noise import GradientMoments, default_chunk_size, gradient_moments, noise_statistics
from probe.params import ParameterSpace

NUM_EXAMPLES = 200
SPLIT_AT = 120  # two batches of unequal size


def rel(a: Tensor | float, b: Tensor | float) -> float:
    """Relative difference ``‖a − b‖ / ‖b‖``."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def flat_params(model: nn.Module, names: list[str] | None = None) -> list[nn.Parameter]:
    named = dict(model.named_parameters())
    return [named[n] for n in (names or list(named))]


def loop_gradients(model: nn.Module, loss_fn, x, y, names: list[str] | None = None) -> tuple[Tensor, Tensor]:
    """Per-example flat gradients ``(n, dim)`` and losses ``(n,)`` by one autograd call per example."""
    params = flat_params(model, names)
    grads, losses = [], []
    for i in range(len(y)):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        losses.append(loss.detach())
    return torch.stack(grads), torch.stack(losses)


def two_pass_trace(G: Tensor) -> Tensor:
    """``(1/n) Σᵢ ‖gᵢ − ḡ‖²`` for rows ``gᵢ`` of ``G``."""
    return (G - G.mean(0)).square().sum(1).mean()


@pytest.fixture(scope="module")
def digits64() -> tuple[Tensor, Tensor]:
    x, y = digits_tensors(split="train")
    return x[:NUM_EXAMPLES].to(torch.float64), y[:NUM_EXAMPLES]


@pytest.fixture(scope="module")
def mlp64(digits64) -> nn.Module:
    """``digits_mlp(hidden=16)`` in float64 after 20 full-batch GD steps, weights exactly float32-representable."""
    x, y = digits64
    torch.manual_seed(0)
    model = digits_mlp(hidden=16).to(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.float32).to(torch.float64))
            p.grad = None
    return model.eval()


@pytest.fixture(scope="module")
def mlp_reference(mlp64, digits64) -> tuple[Tensor, Tensor]:
    return loop_gradients(mlp64, F.cross_entropy, *digits64)


def split(x: Tensor, y: Tensor, at: int = SPLIT_AT) -> list[tuple[Tensor, Tensor]]:
    return [(x[:at], y[:at]), (x[at:], y[at:])]


def assert_same_moments(a: GradientMoments, b: GradientMoments, tol: float = 1e-12) -> None:
    assert a.count == b.count
    assert rel(a.sum_grad, b.sum_grad) <= tol
    assert rel(a.sum_sq_norm, b.sum_sq_norm) <= tol
    assert rel(a.sum_loss, b.sum_loss) <= tol


# --------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("bias", [False, True])
def test_linear_least_squares_matches_the_closed_form(bias):
    g = torch.Generator().manual_seed(1)
    n, d = 37, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=bias).to(torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    residual = (model(x) - y).detach()  # (n, 1)
    features = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1) if bias else x
    G = 2 * residual * features  # (n, d[+1]): gᵢ = 2(xᵢᵀw + b − yᵢ)(xᵢ, 1)
    moments = gradient_moments(model, F.mse_loss, split(x, y, 20), chunk_size=8)
    result = noise_statistics(moments)
    exact_trace = two_pass_trace(G)
    exact_grad_sq = G.mean(0).square().sum()
    assert rel(moments.sum_grad, G.sum(0)) < 1e-10
    assert rel(moments.sum_sq_norm, G.square().sum()) < 1e-10
    assert rel(moments.sum_loss, residual.square().sum()) < 1e-10
    assert rel(result.noise_trace, exact_trace) < 1e-10
    assert rel(result.grad_norm, exact_grad_sq.sqrt()) < 1e-10
    assert rel(result.noise_scale, exact_trace / exact_grad_sq) < 1e-10
    assert result.num_examples == n and result.num_nonfinite == 0 and not result.noise_trace_clamped


# --------------------------------------------------------------------------- digits MLP


@pytest.mark.parametrize("method", ["vmap", "linear"])
def test_digits_moments_match_a_per_example_loop(mlp64, digits64, mlp_reference, method):
    x, y = digits64
    G, losses = mlp_reference
    moments = gradient_moments(mlp64, F.cross_entropy, split(x, y), method=method)
    assert moments.method == method
    result = noise_statistics(moments)
    assert result.num_examples == NUM_EXAMPLES
    assert rel(result.noise_trace, two_pass_trace(G)) < 1e-10
    assert rel(result.mean_sq_grad_norm, G.square().sum(1).mean()) < 1e-10
    assert rel(result.loss, losses.mean()) < 1e-12
    assert result.noise_trace > 0.5 * result.mean_sq_grad_norm  # not a degenerate case: noise dominates
    assert (result.dtype, result.mode) == ("float64", "eval")
    assert result.chunk_size == (64 if method == "vmap" else max(len(b[1]) for b in split(x, y)))


def test_digits_mean_gradient_is_the_full_batch_gradient(mlp64, digits64):
    x, y = digits64
    full = torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(mlp64(x), y), flat_params(mlp64))])
    moments = gradient_moments(mlp64, F.cross_entropy, split(x, y))
    assert moments.dim == full.numel()
    assert rel(moments.mean_grad, full) < 1e-12
    assert rel(noise_statistics(moments).grad_norm, full.norm()) < 1e-12


@pytest.mark.parametrize(
    "width,dtype,device,expected",
    [
        (16, torch.float64, "cpu", 64),  # small blocks: the 64 cap
        (1024, torch.float32, "cpu", 7),  # 4 MiB per example: 7 × 4 MiB ≤ 30 MiB
        (1024, torch.float64, "cpu", 3),
        (3000, torch.float64, "cpu", 1),  # 72 MB per example: one at a time, never 0
        (1024, torch.float32, "cuda", 64),  # a caching allocator: no cap
    ],
)
def test_default_chunk_size_keeps_cpu_blocks_within_30_mib(width, dtype, device, expected):
    space = ParameterSpace.of(nn.Linear(width, width, bias=False, device="meta"))
    assert default_chunk_size(space, dtype, device) == expected


def test_default_chunk_size_is_used_and_recorded(digits64):
    x, y = digits64
    model = nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 10))
    moments = gradient_moments(model, F.cross_entropy, [(x[:10].float(), y[:10])], method="vmap")
    assert moments.chunk_size == 7 and moments.count == 10


def test_model_is_left_untouched(mlp64, digits64):
    x, y = digits64
    before = {k: v.clone() for k, v in mlp64.state_dict().items()}
    mlp64.train()
    try:
        gradient_moments(mlp64, F.cross_entropy, split(x, y), chunk_size=32)
        assert mlp64.training
    finally:
        mlp64.eval()
    assert all(torch.equal(before[k], v) for k, v in mlp64.state_dict().items())
    assert all(p.grad is None for p in mlp64.parameters())


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("split_at", [1, 73, SPLIT_AT])
def test_moments_do_not_depend_on_chunks_or_batches(mlp64, digits64, chunk_size, split_at):
    x, y = digits64
    whole = gradient_moments(mlp64, F.cross_entropy, [(x, y)], chunk_size=NUM_EXAMPLES, method="vmap")
    other = gradient_moments(mlp64, F.cross_entropy, split(x, y, split_at), chunk_size=chunk_size, method="vmap")
    assert_same_moments(other, whole)
    assert other.chunk_size == chunk_size


def test_merging_shards_equals_the_whole(mlp64, digits64):
    x, y = digits64
    whole = gradient_moments(mlp64, F.cross_entropy, [(x, y)])
    a = gradient_moments(mlp64, F.cross_entropy, [(x[:SPLIT_AT], y[:SPLIT_AT])], chunk_size=16, method="vmap")
    b = gradient_moments(mlp64, F.cross_entropy, [(x[SPLIT_AT:], y[SPLIT_AT:])], chunk_size=64, method="vmap")
    assert_same_moments(a.merge(b), whole)
    assert_same_moments(a + b, whole)
    assert (a + b).chunk_size == 64
    # An all-reduce of the packed sums, as a sharded caller does it.
    shards = [a, b]
    reduced = [m.all_reduced(lambda t: torch.stack([s.to_tensor() for s in shards]).sum(0)) for m in shards]
    for m in reduced:
        assert_same_moments(m, whole)
        assert m.num_nonfinite == 0
    packed = whole.to_tensor()
    assert packed.dtype == torch.float64 and packed.shape == (whole.dim + 4,)
    back = GradientMoments.from_tensor(packed, dtype=torch.float64, chunk_size=64)
    assert_same_moments(back, whole, tol=0.0)
    assert (back.dtype, back.chunk_size, back.mode) == ("float64", 64, "eval")


def test_merge_and_unpack_reject_mismatches(mlp64, digits64):
    x, y = digits64
    a = gradient_moments(mlp64, F.cross_entropy, [(x[:10], y[:10])])
    b = gradient_moments(mlp64, F.cross_entropy, [(x[:10], y[:10])], params=["5"])
    with pytest.raises(ValueError, match=r"cannot merge moments with different dim: 1482 and 170"):
        a.merge(b)
    c = GradientMoments.from_tensor(a.to_tensor(), dtype="float32", chunk_size=64)
    with pytest.raises(ValueError, match=r"different dtype: 'float64' and 'float32'"):
        a + c
    with pytest.raises(ValueError, match=r"packed must be a 1-D tensor of length dim \+ 4 .*got shape \(4,\)"):
        GradientMoments.from_tensor(torch.zeros(4), dtype=torch.float64, chunk_size=64)


@pytest.mark.parametrize("names", [["5"], ["1.weight", "3"]])
def test_parameter_subset_is_the_slice_of_the_full_gradients(mlp64, digits64, mlp_reference, names):
    x, y = digits64
    G, _ = mlp_reference
    all_names = [n for n, _ in mlp64.named_parameters()]
    chosen = [n for n in all_names if any(n == s or n.startswith(s + ".") for s in names)]
    columns = []
    offset = 0
    for n, p in mlp64.named_parameters():
        if n in chosen:
            columns.append(torch.arange(offset, offset + p.numel()))
        offset += p.numel()
    G_sub = G[:, torch.cat(columns)]
    moments = gradient_moments(mlp64, F.cross_entropy, split(x, y), params=names, chunk_size=50)
    assert moments.dim == G_sub.shape[1]
    assert rel(moments.sum_grad, G_sub.sum(0)) < 1e-12
    assert rel(noise_statistics(moments).noise_trace, two_pass_trace(G_sub)) < 1e-10


def test_float32_agrees_with_float64(mlp64, digits64):
    x, y = digits64
    model32 = digits_mlp(hidden=16).to(torch.float32).eval()
    model32.load_state_dict({k: v.to(torch.float32) for k, v in mlp64.state_dict().items()})  # the same weights
    r64 = noise_statistics(gradient_moments(mlp64, F.cross_entropy, split(x, y)))
    m32 = gradient_moments(model32, F.cross_entropy, split(x.to(torch.float32), y))
    r32 = noise_statistics(m32)
    assert m32.sum_grad.dtype == torch.float64 and r32.dtype == "float32"
    for field in ("grad_norm", "noise_trace", "noise_scale", "loss"):
        assert rel(getattr(r32, field), getattr(r64, field)) < 1e-5, field


def test_dict_batches_match_tensor_batches(mlp64, digits64):
    x, y = digits64

    class DictInput(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixels: Tensor) -> Tensor:  # dict inputs arrive as keywords
            return self.inner(pixels)

    wrapped = DictInput(mlp64)
    plain = gradient_moments(mlp64, F.cross_entropy, split(x, y), chunk_size=32)
    dict_batches = [({"pixels": bx}, by) for bx, by in split(x, y)]
    from_dicts = gradient_moments(wrapped, F.cross_entropy, dict_batches, chunk_size=32)
    assert_same_moments(from_dicts, plain)
    labelled = gradient_moments(
        wrapped, F.cross_entropy, [{"pixels": bx, "labels": by} for bx, by in split(x, y)], chunk_size=32
    )
    assert_same_moments(labelled, plain)


def test_nonfinite_examples_are_counted_not_hidden(mlp64, digits64):
    x, y = digits64
    x = x[:20].clone()
    x[3, 0] = math.inf
    moments = gradient_moments(mlp64, F.cross_entropy, [(x, y[:20])], chunk_size=8)
    result = noise_statistics(moments)
    assert moments.num_nonfinite == 1 and result.num_nonfinite == 1
    assert not math.isfinite(result.noise_trace)


# --------------------------------------------------------------------------- BatchNorm and modes


def bn_mlp() -> nn.Module:
    """A digits MLP with BatchNorm1d whose running statistics are away from their defaults."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 10)).to(torch.float64)
    x, _ = digits_tensors(split="test")
    model.train()
    with torch.no_grad():
        for start in range(0, 200, 50):
            model(x[start : start + 50].to(torch.float64))
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.eval()


def test_batchnorm_in_eval_mode_matches_the_loop(digits64):
    x, y = digits64
    x, y = x[:100], y[:100]
    model = bn_mlp()
    assert not torch.allclose(model[1].running_mean, torch.zeros(12, dtype=torch.float64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    G, losses = loop_gradients(model, F.cross_entropy, x, y)  # eval mode: running statistics
    moments = gradient_moments(model, F.cross_entropy, split(x, y, 60), chunk_size=16)
    result = noise_statistics(moments)
    assert rel(moments.sum_grad, G.sum(0)) < 1e-12
    assert rel(result.noise_trace, two_pass_trace(G)) < 1e-10
    assert rel(result.loss, losses.mean()) < 1e-12
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_mode_rejects_batchnorm(digits64):
    x, y = digits64
    with pytest.raises(ValueError, match=r"mode='train' is undefined .* BatchNorm.*use mode='eval'"):
        gradient_moments(bn_mlp(), F.cross_entropy, [(x[:10], y[:10])], mode="train")


def test_train_mode_draws_dropout_and_restores_the_mode(mlp64, digits64):
    x, y = digits64
    model = nn.Sequential(mlp64[:3], nn.Dropout(0.5), mlp64[3:]).eval()
    batches = split(x[:40], y[:40], 25)
    evaluated = gradient_moments(model, F.cross_entropy, batches)
    assert_same_moments(evaluated, gradient_moments(mlp64, F.cross_entropy, batches))  # eval: dropout off
    torch.manual_seed(0)
    trained = gradient_moments(model, F.cross_entropy, batches, mode="train")
    assert trained.mode == "train" and not model.training
    assert rel(trained.sum_grad, evaluated.sum_grad) > 1e-3


def test_train_mode_draws_one_dropout_mask_per_example():
    """Identical examples differ only through their masks: one mask per chunk would give tr(Σ) = 0."""
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 1, bias=False)).to(torch.float64)
    x = torch.ones(32, 8, dtype=torch.float64)
    y = torch.zeros(32, 1, dtype=torch.float64)
    torch.manual_seed(0)
    trained = noise_statistics(gradient_moments(model, F.mse_loss, [(x, y)], chunk_size=32, mode="train"))
    evaluated = noise_statistics(gradient_moments(model, F.mse_loss, [(x, y)], chunk_size=32))
    assert evaluated.noise_trace == 0.0
    assert trained.noise_trace > 0.1 * trained.mean_sq_grad_norm


def test_bad_arguments_are_rejected(mlp64, digits64):
    x, y = digits64
    with pytest.raises(ValueError, match=r"chunk_size must be at least 1, got chunk_size=0; pass None"):
        gradient_moments(mlp64, F.cross_entropy, [(x, y)], chunk_size=0)
    with pytest.raises(ValueError, match=r"mode must be one of \('eval', 'train'\), got mode='test'"):
        gradient_moments(mlp64, F.cross_entropy, [(x, y)], mode="test")
    with pytest.raises(ValueError, match=r"the probe set is empty"):
        gradient_moments(mlp64, F.cross_entropy, [])


# --------------------------------------------------------------------------- noise_statistics


def moments_of(G: Tensor, losses: Tensor | None = None) -> GradientMoments:
    """Moments of explicit per-example gradient rows ``G`` (``(n, dim)``)."""
    losses = torch.zeros(G.shape[0], dtype=torch.float64) if losses is None else losses
    scalars = [losses.sum(), G.square().sum(), G.new_tensor(float(G.shape[0])), G.new_tensor(0.0)]
    packed = torch.cat([G.sum(0), torch.stack(scalars)])  # the to_tensor() layout
    return GradientMoments.from_tensor(packed, dtype=torch.float64, chunk_size=1)


def test_noise_statistics_formulas():
    G = torch.tensor([[3.0, 0.0], [1.0, 2.0], [2.0, -1.0], [2.0, 3.0]], dtype=torch.float64)
    gbar = G.mean(0)  # (2, 1)
    grad_sq = float(gbar.square().sum())  # 5
    trace = float(two_pass_trace(G))  # (1 + 1 + 0 + 0)/4 + (1 + 1 + 4 + 4)/4 = 3
    assert (grad_sq, trace) == (5.0, 3.0)
    lr, batch = 0.2, 8
    losses = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    r = noise_statistics(moments_of(G, losses), lr=lr, batch_size=batch)
    assert r.loss == pytest.approx(3.0, rel=1e-15)
    assert r.grad_norm == pytest.approx(math.sqrt(5.0), rel=1e-15)
    assert r.mean_sq_grad_norm == pytest.approx(8.0, rel=1e-15)
    assert r.noise_trace == pytest.approx(3.0, rel=1e-15)
    assert r.noise_scale == pytest.approx(3.0 / 5.0, rel=1e-15)
    # McCandlish et al., Appendix A: S = n·tr/(n−1) = 4, |G|² = ‖ḡ‖² − tr/(n−1) = 4.
    assert r.noise_scale_debiased == pytest.approx(1.0, rel=1e-15)
    assert r.temperature == pytest.approx(lr / (2 * batch), rel=1e-15)
    assert r.gd_regularizer == pytest.approx(lr / 4 * 5.0, rel=1e-15)
    assert r.sgd_regularizer == pytest.approx(lr / (4 * batch) * 3.0, rel=1e-15)
    assert r.modified_loss_term == pytest.approx(lr / 4 * 5.0 + lr / (4 * batch) * 3.0, rel=1e-15)
    assert (r.lr, r.batch_size) == (lr, batch)


def test_regularizers_are_nan_without_lr_and_batch_size():
    G = torch.tensor([[3.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    none = noise_statistics(moments_of(G))
    assert none.batch_size is None
    for field in ("lr", "temperature", "gd_regularizer", "sgd_regularizer", "modified_loss_term"):
        assert math.isnan(getattr(none, field)), field
    lr_only = noise_statistics(moments_of(G), lr=0.1)
    assert lr_only.gd_regularizer == pytest.approx(0.1 / 4 * float(G.mean(0).square().sum()))
    for field in ("temperature", "sgd_regularizer", "modified_loss_term"):
        assert math.isnan(getattr(lr_only, field)), field
    batch_only = noise_statistics(moments_of(G), batch_size=4)
    assert math.isnan(batch_only.temperature) and math.isnan(batch_only.gd_regularizer)


def test_cancellation_is_clamped_and_reported():
    G = torch.full((5, 3), 0.1, dtype=torch.float64)  # identical gradients: tr(Σ) = 0
    packed = moments_of(G).to_tensor()
    packed[-3] *= 1 - 1e-15  # Σ‖gᵢ‖² a rounding error below n‖ḡ‖²
    r = noise_statistics(GradientMoments.from_tensor(packed, dtype=torch.float64, chunk_size=1))
    assert r.noise_trace == 0.0 and r.noise_trace_clamped
    assert r.noise_scale == 0.0 and r.noise_scale_debiased == 0.0
    exact = noise_statistics(moments_of(torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)))
    assert exact.noise_trace == 0.0 and not exact.noise_trace_clamped


def test_zero_gradient_gives_infinite_noise_scale():
    r = noise_statistics(moments_of(torch.tensor([[1.0, -2.0], [-1.0, 2.0]], dtype=torch.float64)))
    assert r.grad_norm == 0.0 and r.noise_trace == pytest.approx(5.0)
    assert r.noise_scale == math.inf and math.isnan(r.noise_scale_debiased)


def test_noise_statistics_rejects_bad_arguments():
    m = moments_of(torch.ones(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"lr must be a positive finite number, got lr=0"):
        noise_statistics(m, lr=0)
    with pytest.raises(ValueError, match=r"lr must be a positive finite number, got lr=nan"):
        noise_statistics(m, lr=math.nan)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got batch_size=0"):
        noise_statistics(m, lr=0.1, batch_size=0)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got batch_size=2.5"):
        noise_statistics(m, lr=0.1, batch_size=2.5)
    empty = GradientMoments.from_tensor(torch.zeros(6, dtype=torch.float64), dtype=torch.float64, chunk_size=1)
    with pytest.raises(ValueError, match=r"moments hold no examples \(count=0\)"):
        noise_statistics(empty)


# --- the layer identity for nn.Linear (method="linear") ---------------------------------


def _digits_batches(n: int = 120, sizes=(50, 40, 30)):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data[:n] / 16.0, dtype=torch.float64)
    y = torch.tensor(bunch.target[:n], dtype=torch.long)
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


def test_layer_identity_equals_formed_per_example_gradients_on_an_mlp():
    from probe.models import digits_mlp

    torch.manual_seed(0)
    model = digits_mlp(hidden=16).double()
    batches = _digits_batches()
    fast = gradient_moments(model, F.cross_entropy, batches)  # auto picks the identity for an all-Linear MLP
    slow = gradient_moments(model, F.cross_entropy, batches, method="vmap")
    assert (fast.method, slow.method) == ("linear", "vmap")
    assert fast.count == slow.count == 120
    torch.testing.assert_close(fast.sum_grad, slow.sum_grad, rtol=1e-12, atol=1e-14)
    assert float(fast.sum_sq_norm) == pytest.approx(float(slow.sum_sq_norm), rel=1e-12)
    assert float(fast.sum_loss) == pytest.approx(float(slow.sum_loss), rel=1e-13)
    # a parameter subset: only the selected layers' norms and gradient
    sub_fast = gradient_moments(model, F.cross_entropy, batches, params=["3"])
    sub_slow = gradient_moments(model, F.cross_entropy, batches, params=["3"], method="vmap")
    assert sub_fast.method == "linear"
    assert float(sub_fast.sum_sq_norm) == pytest.approx(float(sub_slow.sum_sq_norm), rel=1e-12)
    torch.testing.assert_close(sub_fast.sum_grad, sub_slow.sum_grad, rtol=1e-12, atol=1e-14)


def test_layer_identity_falls_back_where_it_does_not_apply():
    from probe.models import digits_cnn

    torch.manual_seed(0)
    cnn = digits_cnn().double()  # convolutions: not Linear
    assert gradient_moments(cnn, F.cross_entropy, _digits_batches(20, (20,))).method == "vmap"
    shared = torch.nn.Linear(64, 64).double()  # one Linear called twice: shared weights break the identity
    reused = torch.nn.Sequential(shared, torch.nn.Tanh(), shared, torch.nn.Linear(64, 10).double())
    r = gradient_moments(reused, F.cross_entropy, _digits_batches(20, (20,)))
    assert r.method == "vmap"
    with pytest.raises(ValueError, match="called more than once per forward"):
        gradient_moments(reused, F.cross_entropy, _digits_batches(20, (20,)), method="linear")
    with pytest.raises(ValueError, match="method must be one of"):
        gradient_moments(cnn, F.cross_entropy, _digits_batches(20, (20,)), method="fast")
