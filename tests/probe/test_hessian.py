"""HessianOperator (probe/hessian.py) and its base ModelOperator (probe/model_operator.py).

References are exact and in float64: the dense Hessian of the mean loss over the
whole probe set from ``torch.func.hessian`` through ``torch.func.functional_call``.
"""

from __future__ import annotations

import re
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad

from probe.ggn import GGNOperator
from probe.hessian import HessianOperator
from probe.model_operator import batch_size_of, move_batch
from probe.models import digits_cnn

# Unequal batch sizes over the 300 probe examples.
SIZES = (37, 150, 113)
TOL = 1e-10  # relative agreement with the dense reference (measured ~1e-15)


def split(x, y, sizes):
    """``(inputs, targets)`` batches of the given sizes, in order."""
    bounds = torch.tensor((0, *sizes)).cumsum(0).tolist()
    assert bounds[-1] == len(y)
    return [(x[a:b], y[a:b]) for a, b in pairwise(bounds)]


def gaussian_block(dim, k, seed, dtype=torch.float64):
    return torch.randn(dim, k, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def param_slices(model) -> dict[str, slice]:
    """Where each parameter sits in the flat vector of all parameters, in module order."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out


@pytest.fixture(scope="module")
def mlp_dense(make_trained_mlp, digits64, dense_hessian):
    """Dense Hessian ``(1482, 1482)`` of the mean cross-entropy of the trained MLP over 300 digits."""
    x, y = digits64
    return dense_hessian(make_trained_mlp(), F.cross_entropy, x, y)


@pytest.fixture(scope="module")
def cnn_case(digits64, dense_hessian, seeded_model):
    """A digits_cnn, its first 128 examples in batches (29, 99), and its dense Hessian ``(838, 838)``.

    Fewer examples than for the MLP: float64 convolutions under vmap are slow on CPU.
    """
    x, y = digits64[0][:128], digits64[1][:128]
    model = seeded_model(digits_cnn, seed=1)
    return model, split(x, y, (29, 99)), dense_hessian(model, F.cross_entropy, x, y)


# --- agreement with the dense Hessian --------------------------------------------------


def test_mlp_matches_dense_hessian(trained_mlp, digits64, mlp_dense, relative_error):
    H = HessianOperator(trained_mlp, F.cross_entropy, split(*digits64, SIZES))
    V = gaussian_block(H.dim, 5, seed=0)
    assert H.dim == mlp_dense.shape[0] == 1482
    assert relative_error(H @ V, mlp_dense @ V) < TOL


def test_cnn_matches_dense_hessian(cnn_case, relative_error):
    model, batches, dense = cnn_case
    H = HessianOperator(model, F.cross_entropy, batches)
    V = gaussian_block(H.dim, 5, seed=1)
    assert H.dim == 838
    assert relative_error(H @ V, dense @ V) < TOL


# --- weighting of unequal batches ---------------------------------------------------


def test_unequal_batches_weighted_by_size(trained_mlp, digits64, mlp_dense, relative_error):
    x, y = digits64
    batches = split(x, y, SIZES)
    H = HessianOperator(trained_mlp, F.cross_entropy, batches)
    assert H.weights == [37 / 300, 150 / 300, 113 / 300]
    assert H.batch_sizes == list(SIZES) and H.num_examples == H.total_examples == 300

    V = gaussian_block(H.dim, 3, seed=2)
    reference = mlp_dense @ V
    assert relative_error(H @ V, reference) < TOL
    one_batch = HessianOperator(trained_mlp, F.cross_entropy, [(x, y)])
    assert relative_error(H @ V, one_batch @ V) < 1e-12

    # The peers' mistakes, computed explicitly from one operator per batch (each the
    # Hessian of its own batch mean): their sum is ~3x too large, and their unweighted
    # mean over-weights the 37-example batch.
    per_batch = [HessianOperator(trained_mlp, F.cross_entropy, [b]) @ V for b in batches]
    naive_sum = sum(per_batch)
    unweighted_mean = naive_sum / len(batches)
    assert relative_error(naive_sum, reference) > 1.5  # measured 1.93
    assert relative_error(unweighted_mean, reference) > 0.05  # measured 0.13
    weighted = sum(n / 300 * hv for n, hv in zip(SIZES, per_batch, strict=True))
    assert relative_error(weighted, reference) < TOL


def test_total_examples_scales_weights(trained_mlp, digits64, relative_error):
    batches = split(*digits64, SIZES)
    H = HessianOperator(trained_mlp, F.cross_entropy, batches)
    H2 = HessianOperator(trained_mlp, F.cross_entropy, batches, total_examples=600)
    assert H2.weights == [n / 600 for n in SIZES]
    V = gaussian_block(H.dim, 2, seed=3)
    assert relative_error(H2 @ V, 0.5 * (H @ V)) < 1e-14
    loss, g = H.loss_and_gradient()
    loss2, g2 = H2.loss_and_gradient()
    assert torch.allclose(loss2, 0.5 * loss, rtol=1e-14, atol=0)
    assert relative_error(g2, 0.5 * g) < 1e-14


def test_shards_with_global_total_sum_to_full_operator(trained_mlp, digits64, relative_error):
    """Data parallelism: two shards, each weighted by the global count, add up to the whole."""
    batches = split(*digits64, SIZES)
    full = HessianOperator(trained_mlp, F.cross_entropy, batches)
    shard_a = HessianOperator(trained_mlp, F.cross_entropy, batches[:2], total_examples=300)
    shard_b = HessianOperator(trained_mlp, F.cross_entropy, batches[2:], total_examples=300)
    V = gaussian_block(full.dim, 2, seed=4)
    assert relative_error(shard_a @ V + shard_b @ V, full @ V) < 1e-12
    (la, ga), (lb, gb), (lf, g) = shard_a.loss_and_gradient(), shard_b.loss_and_gradient(), full.loss_and_gradient()
    assert torch.allclose(la + lb, lf, rtol=1e-13, atol=0)
    assert relative_error(ga + gb, g) < 1e-12


def test_loss_and_gradient_match_torch_func(trained_mlp, digits64, flat_loss, relative_error):
    x, y = digits64
    H = HessianOperator(trained_mlp, F.cross_entropy, split(x, y, SIZES))
    loss, g = H.loss_and_gradient()
    f, theta0 = flat_loss(trained_mlp, F.cross_entropy, x, y)
    assert loss.dtype == g.dtype == torch.float64 and g.shape == (H.dim,)
    assert torch.allclose(loss, f(theta0).detach(), rtol=1e-13, atol=0)
    assert relative_error(g, grad(f)(theta0)) < 1e-12


# --- graph cache ----------------------------------------------------------------------


def test_partial_graph_cache_gives_identical_products(trained_mlp, digits64):
    x, y = digits64
    batches = split(x, y, (75, 75, 75, 75))  # equal sizes: equal graph bytes per batch
    full = HessianOperator(trained_mlp, F.cross_entropy, batches)
    assert full.num_cached_batches == 4
    assert full.graph_bytes >= x.nbytes  # the first Linear saves its input (all of x's storage)
    per_batch = full.graph_bytes / 4
    partial = HessianOperator(trained_mlp, F.cross_entropy, batches, graph_memory_bytes=int(2.5 * per_batch))
    assert partial.num_cached_batches == 2
    assert partial.graph_bytes == pytest.approx(2 * per_batch)
    none = HessianOperator(trained_mlp, F.cross_entropy, batches, graph_memory_bytes=0)
    assert none.num_cached_batches == 0 and none.graph_bytes == 0

    V = gaussian_block(full.dim, 3, seed=5)
    reference = full @ V
    assert torch.equal(partial @ V, reference)
    assert torch.equal(none @ V, reference)
    assert torch.equal(partial @ V, reference)  # rebuilt graphs stay identical on reuse


def test_graph_bytes_grow_with_batch(trained_mlp, digits64):
    x, y = digits64
    small = HessianOperator(trained_mlp, F.cross_entropy, [(x[:50], y[:50])])
    large = HessianOperator(trained_mlp, F.cross_entropy, [(x.clone(), y)])
    assert 0 < small.graph_bytes < large.graph_bytes


def test_num_matvecs_counts_columns(trained_mlp, digits64):
    H = HessianOperator(trained_mlp, F.cross_entropy, split(*digits64, SIZES))
    assert H.num_matvecs == 0
    H @ gaussian_block(H.dim, 3, seed=6)
    H @ gaussian_block(H.dim, 1, seed=7)[:, 0]
    assert H.num_matvecs == 4


# --- mode policy: BatchNorm and dropout ---------------------------------------------


@pytest.fixture
def bn_dropout_model(seeded_model, digits64):
    """A digits MLP with BatchNorm1d and Dropout, non-trivial running statistics, left in train mode."""
    model = seeded_model(
        lambda: nn.Sequential(
            nn.Flatten(), nn.Linear(64, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.5), nn.Linear(12, 10)
        ),
        seed=2,
    )
    g = torch.Generator().manual_seed(8)
    bn = model[2]
    bn.running_mean.copy_(0.3 * torch.randn(12, generator=g, dtype=torch.float64))
    bn.running_var.copy_(0.5 + torch.rand(12, generator=g, dtype=torch.float64))
    model.train()
    return model


def test_eval_mode_default_uses_running_stats_and_restores_training(
    bn_dropout_model, digits64, dense_hessian, relative_error
):
    model = bn_dropout_model
    x, y = digits64
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    H = HessianOperator(model, F.cross_entropy, split(x, y, SIZES))
    assert H.mode == "eval"
    V = gaussian_block(H.dim, 3, seed=9)
    HV = H @ V
    assert torch.equal(H @ V, HV)
    assert H.check_determinism(generator=torch.Generator().manual_seed(10)) == 0.0
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():  # running statistics not updated
        assert torch.equal(v, stats[k]), k

    model.eval()
    reference = dense_hessian(model, F.cross_entropy, x, y) @ V
    assert relative_error(HV, reference) < TOL


def test_train_mode_restores_eval_flag(bn_dropout_model, digits64):
    model = bn_dropout_model.eval()
    H = HessianOperator(model, F.cross_entropy, split(*digits64, SIZES), mode="train", graph_memory_bytes=0)
    H @ gaussian_block(H.dim, 2, seed=11)
    assert not any(m.training for m in model.modules())


def test_train_mode_dropout_is_nondeterministic(bn_dropout_model, digits64):
    H = HessianOperator(bn_dropout_model, F.cross_entropy, split(*digits64, SIZES), mode="train", graph_memory_bytes=0)
    assert H.check_determinism(generator=torch.Generator().manual_seed(12)) > 1e-3


def test_train_mode_dropout_revealed_with_default_graph_cache(bn_dropout_model, digits64):
    H = HessianOperator(bn_dropout_model, F.cross_entropy, split(*digits64, SIZES), mode="train")
    assert H.num_cached_batches == 0  # train mode keeps no graph: masks are redrawn per product
    assert H.check_determinism(generator=torch.Generator().manual_seed(12)) > 1e-3


def test_train_mode_leaves_running_statistics_untouched(bn_dropout_model, digits64):
    before = {k: v.clone() for k, v in bn_dropout_model.state_dict().items()}
    H = HessianOperator(bn_dropout_model, F.cross_entropy, split(*digits64, SIZES), mode="train")
    H.matvec(torch.ones(H.dim, dtype=torch.float64))
    H.loss_and_gradient()
    for k, v in bn_dropout_model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


# --- parameter subsets: diagonal blocks -----------------------------------------------


@pytest.mark.parametrize("layer", ["1", "3", "5"])
def test_layer_operator_is_diagonal_block(trained_mlp, digits64, mlp_dense, layer):
    """Per-layer spectra: the layer's operator, made dense, has the block's eigenvalues."""
    sl = param_slices(trained_mlp)
    idx = torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in (f"{layer}.weight", f"{layer}.bias")])
    block = mlp_dense[idx][:, idx]
    H = HessianOperator(trained_mlp, F.cross_entropy, split(*digits64, SIZES), params=[layer])
    assert H.space.names == (f"{layer}.weight", f"{layer}.bias") and H.dim == len(idx)
    dense_op = H @ torch.eye(H.dim, dtype=torch.float64)
    assert ((dense_op - block).norm() / block.norm()).item() < TOL
    ours, ref = torch.linalg.eigvalsh((dense_op + dense_op.T) / 2), torch.linalg.eigvalsh(block)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < TOL


def test_two_layer_selection_keeps_cross_terms_in_module_order(trained_mlp, digits64, mlp_dense, relative_error):
    sl = param_slices(trained_mlp)
    names = ("1.weight", "1.bias", "5.weight", "5.bias")
    idx = torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in names])
    H = HessianOperator(trained_mlp, F.cross_entropy, split(*digits64, SIZES), params=["5", "1"])
    assert H.space.names == names
    V = gaussian_block(H.dim, 3, seed=13)
    assert relative_error(H @ V, mlp_dense[idx][:, idx] @ V) < TOL


# --- errors ---------------------------------------------------------------------------


def test_empty_probe_set_rejected(trained_mlp):
    with pytest.raises(ValueError, match=r"the probe set is empty: pass at least one \(inputs, targets\) batch"):
        HessianOperator(trained_mlp, F.cross_entropy, [])


def test_unknown_mode_rejected(trained_mlp, digits64):
    with pytest.raises(ValueError, match=re.escape("mode must be one of ('eval', 'train'), got mode='inference'")):
        HessianOperator(trained_mlp, F.cross_entropy, [digits64], mode="inference")


def test_unknown_parameter_selection_lists_valid_names(trained_mlp, digits64):
    expected = (
        "parameter selection 'fc1' matches no trainable parameter; "
        "valid names: 1.weight, 1.bias, 3.weight, 3.bias, 5.weight, 5.bias"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        HessianOperator(trained_mlp, F.cross_entropy, [digits64], params=["1", "fc1"])


def test_no_trainable_parameters_rejected(trained_mlp, digits64):
    trained_mlp.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters to probe \(all have requires_grad=False\)"):
        HessianOperator(trained_mlp, F.cross_entropy, [digits64])


@pytest.mark.parametrize("total", [0, -5])
def test_non_positive_total_examples_rejected(trained_mlp, digits64, total):
    with pytest.raises(ValueError, match=rf"total_examples must be positive, got {total}"):
        HessianOperator(trained_mlp, F.cross_entropy, [digits64], total_examples=total)


# --- batch helpers ----------------------------------------------------------------------


def test_batch_size_of_reads_targets():
    assert batch_size_of(torch.zeros(7, 3)) == 7
    assert batch_size_of(torch.tensor(2.0)) == 1
    assert batch_size_of({"labels": torch.zeros(5), "mask": torch.zeros(9)}) == 5
    assert batch_size_of([0, 1, 2]) == 3


def test_move_batch_casts_floating_tensors_only():
    batch = {"x": torch.zeros(2, dtype=torch.float32), "ids": (torch.arange(3), torch.ones(1, dtype=torch.float16))}
    moved = move_batch(batch, torch.float64, torch.device("cpu"))
    assert moved["x"].dtype == torch.float64
    assert moved["ids"][0].dtype == torch.int64 and moved["ids"][1].dtype == torch.float64
    assert isinstance(moved["ids"], tuple)


# --- language-model batches: dict layouts and token weighting --------------------------------


class KeywordMLP(nn.Module):
    """The MLP behind a Hugging Face style interface: keyword inputs, an output object with ``.logits``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pixels, attention_mask=None):
        return type("Output", (), {"logits": self.inner(pixels)})()


def test_dict_inputs_and_labels_dicts_give_the_same_products(trained_mlp, digits64, relative_error):
    x, y = digits64
    plain = HessianOperator(trained_mlp, F.cross_entropy, split(x, y, SIZES))
    wrapped = KeywordMLP(trained_mlp)
    mask = torch.ones(len(y))
    as_inputs = [({"pixels": bx, "attention_mask": mask[: len(by)]}, by) for bx, by in split(x, y, SIZES)]
    as_labels = [{"pixels": bx, "labels": by} for bx, by in split(x, y, SIZES)]
    V = gaussian_block(plain.dim, 3, seed=14)
    reference = plain @ V
    for batches in (as_inputs, as_labels):
        H = HessianOperator(wrapped, F.cross_entropy, batches)
        assert H.batch_sizes == list(SIZES)
        assert relative_error(H @ V, reference) < 1e-14
        loss, g = H.loss_and_gradient()
        assert torch.allclose(loss, plain.loss_and_gradient()[0], rtol=1e-14, atol=0)


def masked_labels(y: torch.Tensor) -> torch.Tensor:
    """Labels with -100 at 30 of the first batch's 37 examples and 10 of the third's: token counts
    (7, 150, 103) are far from proportional to the batch sizes (37, 150, 113)."""
    y = y.clone()
    y[:30] = -100
    y[200:210] = -100
    return y


def test_token_weighting_gives_the_hessian_of_the_mean_over_counted_targets(
    trained_mlp, digits64, dense_hessian, relative_error
):
    """F.cross_entropy ignores -100 and averages over the rest: a per-batch token mean. Weighted by
    tokens, the batches make the Hessian of the mean over all 260 counted targets of the probe set."""
    x, y = digits64
    y = masked_labels(y)
    batches = split(x, y, SIZES)
    H = HessianOperator(trained_mlp, F.cross_entropy, batches, weighting="tokens")
    assert H.batch_tokens == [7, 150, 103] and H.num_tokens == H.total_tokens == 260
    assert H.weights == [7 / 260, 150 / 260, 103 / 260] and H.batch_sizes == list(SIZES)
    reference = dense_hessian(trained_mlp, F.cross_entropy, x, y)
    V = gaussian_block(H.dim, 4, seed=15)
    assert relative_error(H @ V, reference @ V) < TOL
    # Example weights would over-weight the 7 tokens of the first batch.
    examples = HessianOperator(trained_mlp, F.cross_entropy, batches)
    assert relative_error(examples @ V, reference @ V) > 1e-2  # measured 0.099

    G = GGNOperator(trained_mlp, F.cross_entropy, batches, weighting="tokens")
    G_one = GGNOperator(trained_mlp, F.cross_entropy, [(x, y)])  # one batch: the mean over all counted targets
    assert relative_error(G @ V, G_one @ V) < 1e-12


def test_token_shards_with_the_global_count_sum_to_the_whole(trained_mlp, digits64, relative_error):
    x, y = digits64
    batches = split(x, masked_labels(y), SIZES)
    full = HessianOperator(trained_mlp, F.cross_entropy, batches, weighting="tokens")
    shards = [
        HessianOperator(trained_mlp, F.cross_entropy, part, weighting="tokens", total_tokens=260)
        for part in (batches[:2], batches[2:])
    ]
    V = gaussian_block(full.dim, 2, seed=16)
    assert relative_error(shards[0] @ V + shards[1] @ V, full @ V) < 1e-12
    (la, ga), (lb, gb), (lf, g) = shards[0].loss_and_gradient(), shards[1].loss_and_gradient(), full.loss_and_gradient()
    assert torch.allclose(la + lb, lf, rtol=1e-13, atol=0) and relative_error(ga + gb, g) < 1e-12


def test_unknown_weighting_rejected(trained_mlp, digits64):
    with pytest.raises(
        ValueError, match=re.escape("weighting must be one of ('examples', 'tokens'), got weighting='t'")
    ):
        HessianOperator(trained_mlp, F.cross_entropy, [digits64], weighting="t")
