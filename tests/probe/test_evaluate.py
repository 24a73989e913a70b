"""Evaluator (probe/evaluate.py): batch layouts, token weighting and bfloat16 models.

References are direct float64 evaluations over the whole probe set at once.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cluster.data import tokens_tensors
from probe.evaluate import Evaluator
from probe.gpt import gpt, lm_loss
from probe.hessian import HessianOperator
from probe.models import digits_mlp

SIZES = (37, 150, 113)


def split(x, y, sizes=SIZES):
    bounds = torch.tensor((0, *sizes)).cumsum(0).tolist()
    return [(x[a:b], y[a:b]) for a, b in pairwise(bounds)]


def masked_labels(y):
    """-100 at 30 of the first batch's 37 examples and 10 of the third's (260 counted of 300)."""
    y = y.clone()
    y[:30] = -100
    y[200:210] = -100
    return y


def points_around(center, count, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return center + scale * torch.randn(count, center.numel(), generator=g, dtype=center.dtype)


def test_token_weighted_loss_and_error_are_means_over_counted_targets(trained_mlp, digits64):
    x, y = digits64
    y = masked_labels(y)
    ev = Evaluator(trained_mlp, F.cross_entropy, split(x, y), weighting="tokens")
    assert ev.num_tokens == 260 and ev.num_examples == 300
    counted = y != -100
    with torch.no_grad():
        out = trained_mlp(x)
    loss, error = ev.loss_and_error(ev.center())
    assert loss == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-13)
    assert error == pytest.approx(((out.argmax(-1) != y) & counted).sum().item() / 260, rel=1e-13)
    by_examples = Evaluator(trained_mlp, F.cross_entropy, split(x, y)).loss(ev.center())
    assert abs(by_examples - loss) / loss > 1e-3


def test_token_weighted_gradient_is_the_operators(trained_mlp, digits64, relative_error):
    batches = split(digits64[0], masked_labels(digits64[1]))
    ev = Evaluator(trained_mlp, F.cross_entropy, batches, weighting="tokens")
    theta = ev.center().requires_grad_(True)
    (g,) = torch.autograd.grad(ev.loss_with_grad(theta), theta)
    _, reference = HessianOperator(trained_mlp, F.cross_entropy, batches, weighting="tokens").loss_and_gradient()
    assert relative_error(g, reference) < 1e-12


@pytest.fixture(scope="module")
def lm_evaluators():
    """A float64 GPT on padded Markov-chain sequences, batches of 3 and 5: evaluators by tokens and by examples."""
    ids, targets = tokens_tensors(num_sequences=8, seq_len=6, vocab=16, min_len=2, seed=4)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = gpt(vocab=16, dim=8, layers=2, heads=2, max_len=6).to(torch.float64)
    batches = [(ids[:3], targets[:3]), (ids[3:], targets[3:])]
    return model, ids, targets, {w: Evaluator(model, lm_loss, batches, weighting=w) for w in ("tokens", "examples")}


def test_lm_loss_and_token_error_rate_over_all_tokens(lm_evaluators):
    model, ids, targets, evs = lm_evaluators
    ev = evs["tokens"]
    assert ev.classification  # integer targets
    with torch.no_grad():
        logits = model(ids)  # (8, 6, 16)
    counted = targets != -100
    loss, error = ev.loss_and_error(ev.center())
    assert loss == pytest.approx(lm_loss(logits, targets).item(), rel=1e-13)
    assert error == pytest.approx(
        ((logits.argmax(-1) != targets) & counted).sum().item() / counted.sum().item(), rel=1e-13
    )


@pytest.mark.parametrize("weighting", ["tokens", "examples"])
def test_vmapped_losses_equal_point_by_point_for_sequence_targets(lm_evaluators, weighting):
    ev = lm_evaluators[3][weighting]
    points = points_around(ev.center(), 5, seed=5)
    losses, errors = ev.losses(points)
    pairs = [ev.loss_and_error(p) for p in points]
    assert torch.allclose(losses, torch.tensor([a for a, _ in pairs], dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.allclose(errors, torch.tensor([b for _, b in pairs], dtype=torch.float64), rtol=1e-12, atol=1e-15)


class KeywordMLP(nn.Module):
    """Keyword inputs and a ``{"logits": ...}`` mapping as output."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pixels):
        return {"logits": self.inner(pixels)}


def test_labels_dicts_evaluate_like_pairs(trained_mlp, digits64):
    x, y = digits64
    plain = Evaluator(trained_mlp, F.cross_entropy, split(x, y))
    keyed = Evaluator(
        KeywordMLP(trained_mlp), F.cross_entropy, [{"pixels": bx, "labels": by} for bx, by in split(x, y)]
    )
    assert keyed.classification and keyed.space.names == tuple(f"inner.{n}" for n in plain.space.names)
    points = points_around(plain.center(), 3, seed=6)
    for a, b in zip(plain.losses(points), keyed.losses(points), strict=True):
        assert torch.allclose(a, b, rtol=1e-14, atol=0)


def test_bf16_model_takes_float32_points_and_sums_in_float64(trained_mlp_state, digits64):
    model16 = digits_mlp(hidden=16).to(torch.bfloat16)
    model16.load_state_dict({k: v.to(torch.bfloat16) for k, v in trained_mlp_state.items()})
    model64 = digits_mlp(hidden=16).to(torch.float64)
    model64.load_state_dict({k: v.to(torch.float64) for k, v in model16.state_dict().items()})
    x, y = digits64
    x = x.to(torch.bfloat16).to(torch.float64)
    ev = Evaluator(model16, F.cross_entropy, split(x, y))
    ref = Evaluator(model64, F.cross_entropy, split(x, y))
    center = ev.center()
    assert (ev.dtype, ev.param_dtype, center.dtype) == (torch.float32, torch.bfloat16, torch.float32)
    assert torch.equal(center.to(torch.float64), ref.center())  # exact: bf16 values are float32 values
    points = points_around(center, 3, seed=7)
    losses, _ = ev.losses(points)
    expected, _ = ref.losses(points.to(torch.bfloat16).to(torch.float64))  # the points the model runs at
    assert losses.dtype == torch.float64
    assert torch.allclose(losses, expected, rtol=2e-2, atol=0)  # bfloat16 forward passes: measured 3.2e-3
