"""``mode="train"`` in the loss evaluator and the gradient-noise layer identity.

Train mode means BatchNorm with each batch's own statistics and live dropout. The
references are direct float64 computations: ``model.train()`` and the weighted mean
of per-batch losses (on a copy of the model, so its running statistics may move),
with the same torch seed before each where dropout draws masks. A BatchNorm-only
model is deterministic in train mode and gives exact comparisons; a dropout model
shows that train mode differs from eval mode, redraws masks per evaluation, and
that ``dropout_seed`` fixes them.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probe.evaluate import Evaluator
from probe.noise import gradient_moments
from probe.pacbayes import pacbayes
from probe.params import ParameterSpace
from probe.sharpness import keskar_sharpness, sam_sharpness


def data(n: int = 30, sizes=(12, 10, 8)) -> list[tuple[Tensor, Tensor]]:
    """Three batches of unequal size (weights 12/30, 10/30, 8/30)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


def bn_model() -> nn.Module:
    """Linear → BatchNorm1d → Tanh → Linear in float64, running statistics away from their defaults."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).to(torch.float64)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].num_batches_tracked.fill_(5)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.eval()


def dropout_model() -> nn.Module:
    """Linear → BatchNorm1d → ReLU → Dropout(0.5) → Linear in float64."""
    torch.manual_seed(2)
    return (
        nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
        .to(torch.float64)
        .eval()
    )


def direct_train_loss(model: nn.Module, batches, flat: Tensor | None = None) -> Tensor:
    """``Σ_b (n_b/N) · mean loss of batch b`` with ``model.train()`` on a copy holding ``flat``."""
    m = copy.deepcopy(model)
    if flat is not None:
        ParameterSpace.of(m).set_flat(m, flat)
    m.train()
    total = sum(x.shape[0] for x, _ in batches)
    with torch.no_grad():
        return sum(x.shape[0] / total * F.cross_entropy(m(x), y) for x, y in batches)


def state_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------- BatchNorm: exact


def test_train_mode_loss_equals_batch_statistics_reference():
    model, batches = bn_model(), data()
    ev = Evaluator(model, F.cross_entropy, batches, mode="train")
    theta = ev.center()
    want = float(direct_train_loss(model, batches))
    assert ev.mode == "train" and not ev.recompute_bn
    assert ev.loss(theta) == pytest.approx(want, rel=1e-14)
    eval_loss = Evaluator(model, F.cross_entropy, batches).loss(theta)  # running statistics (recomputed)
    assert abs(eval_loss - want) > 1e-3
    # away from θ the statistics are those of the batches at the new point
    delta = 0.3 * torch.randn(ev.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert ev.loss(theta + delta) == pytest.approx(float(direct_train_loss(model, batches, theta + delta)), rel=1e-14)


def test_train_mode_losses_go_point_by_point_and_match_the_reference():
    model, batches = bn_model(), data()
    ev = Evaluator(model, F.cross_entropy, batches, mode="train", chunk_size=4)
    g = torch.Generator().manual_seed(5)
    points = ev.center() + 0.2 * torch.randn(6, ev.dim, generator=g, dtype=torch.float64)  # (6, dim)
    losses, errors = ev.losses(points)
    want = torch.stack([direct_train_loss(model, batches, p) for p in points]).detach()
    assert torch.allclose(losses, want, rtol=1e-14, atol=0)
    assert errors.shape == (6,) and bool(torch.isfinite(errors).all())
    assert ev.num_evaluations == 6


def test_train_mode_gradient_flows_through_the_batch_statistics():
    model, batches = bn_model(), data()
    ev = Evaluator(model, F.cross_entropy, batches, mode="train")
    theta = ev.center().requires_grad_(True)
    (got,) = torch.autograd.grad(ev.loss_with_grad(theta), theta)
    ref_model = copy.deepcopy(model).train()  # the parameters in ParameterSpace order: the model's own
    ref = sum(x.shape[0] / 30 * F.cross_entropy(ref_model(x), y) for x, y in batches)
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref, list(ref_model.parameters()))])
    assert list(ParameterSpace.of(model).names) == [n for n, _ in model.named_parameters()]
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    # in eval mode the gradient is another one (running statistics are constants)
    (eval_grad,) = torch.autograd.grad(
        Evaluator(model, F.cross_entropy, batches, recompute_bn=False).loss_with_grad(theta), theta
    )
    assert float((eval_grad - want).norm()) > 1e-3 * float(want.norm())


def test_running_statistics_and_training_flag_are_unchanged():
    model, batches = bn_model(), data()
    before = state_of(model)
    for flag in (False, True):
        model.train(flag)
        ev = Evaluator(model, F.cross_entropy, batches, mode="train")
        theta = ev.center()
        ev.loss(theta)
        ev.losses(torch.stack([theta, theta + 0.1]))
        t = theta.clone().requires_grad_(True)
        ev.loss_with_grad(t).backward()
        assert model.training is flag
        assert_unchanged(model, before)


def test_sharpness_and_pacbayes_run_on_the_train_mode_loss():
    model, batches = bn_model(), data()
    ev = Evaluator(model, F.cross_entropy, batches, mode="train")
    want = float(direct_train_loss(model, batches))
    k = keskar_sharpness(ev, epsilon=1e-3, steps=3, generator=torch.Generator().manual_seed(0))
    s = sam_sharpness(ev, rho=0.05, steps=3, generator=torch.Generator().manual_seed(0))
    p = pacbayes(ev, target=0.05, samples=4, generator=torch.Generator().manual_seed(0))
    assert k.base_loss == pytest.approx(want, rel=1e-14) and s.base_loss == pytest.approx(want, rel=1e-14)
    assert p.base_loss == pytest.approx(want, rel=1e-14)
    assert k.note == "" and s.note == "" and p.note == ""  # BatchNorm alone is deterministic
    # the perturbed loss SAM reports is the train-mode loss at its perturbation
    assert s.perturbed_loss == pytest.approx(
        float(direct_train_loss(model, batches, ev.center() + s.perturbation)), rel=1e-12
    )
    eval_sam = sam_sharpness(
        Evaluator(model, F.cross_entropy, batches), rho=0.05, steps=3, generator=torch.Generator().manual_seed(0)
    )
    assert abs(eval_sam.base_loss - s.base_loss) > 1e-3


# --------------------------------------------------------------------------- dropout: random


def test_dropout_train_mode_equals_the_reference_under_the_same_seed():
    model, batches = dropout_model(), data()
    ev = Evaluator(model, F.cross_entropy, batches, mode="train")
    torch.manual_seed(11)
    got = ev.loss(ev.center())
    torch.manual_seed(11)
    want = float(direct_train_loss(model, batches))
    assert got == pytest.approx(want, rel=1e-14)


def test_dropout_train_mode_differs_from_eval_and_varies_between_calls():
    model, batches = dropout_model(), data()
    before = state_of(model)
    ev = Evaluator(model, F.cross_entropy, batches, mode="train")
    theta = ev.center()
    values = [ev.loss(theta) for _ in range(4)]
    eval_loss = Evaluator(model, F.cross_entropy, batches, recompute_bn=False).loss(theta)
    assert len(set(values)) == 4 and all(abs(v - eval_loss) > 1e-6 for v in values)
    assert "masks redrawn at every evaluation" in ev.randomness_note
    k = keskar_sharpness(ev, epsilon=1e-3, steps=2, generator=torch.Generator().manual_seed(0))
    assert "train mode with live dropout" in k.note
    assert_unchanged(model, before)


def test_dropout_seed_fixes_the_masks_and_leaves_the_global_generator_alone():
    model, batches = dropout_model(), data()
    ev = Evaluator(model, F.cross_entropy, batches, mode="train", dropout_seed=3)
    theta = ev.center()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    values = [ev.loss(theta) for _ in range(3)] + ev.losses(torch.stack([theta, theta]))[0].tolist()
    assert torch.equal(torch.get_rng_state(), state)
    assert len(set(values)) == 1 and ev.randomness_note == ""
    torch.manual_seed(3)
    assert values[0] == pytest.approx(float(direct_train_loss(model, batches)), rel=1e-14)


def test_bad_mode_arguments_are_rejected():
    model, batches = bn_model(), data()
    with pytest.raises(ValueError, match=r"mode must be one of \('eval', 'train'\), got mode='test'"):
        Evaluator(model, F.cross_entropy, batches, mode="test")
    with pytest.raises(
        ValueError,
        match=r"recompute_bn=True .* mode='train' normalizes each batch by its own "
        r"statistics; pass recompute_bn=None",
    ):
        Evaluator(model, F.cross_entropy, batches, mode="train", recompute_bn=True)


# --------------------------------------------------------------------------- noise: the layer identity in train mode


def test_linear_identity_in_train_mode_matches_per_example_gradients_with_the_same_masks():
    """Dropout → Linear: the batched forward draws one mask row per example; the reference
    takes the same rows (same seed, same shape) and differentiates each example alone."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 3)).to(torch.float64).eval()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    torch.manual_seed(8)
    moments = gradient_moments(model, F.cross_entropy, [(x, y)], mode="train")
    torch.manual_seed(8)
    masks = F.dropout(torch.ones_like(x), 0.5, training=True)  # the draw the model's dropout made
    lin = model[1]
    grads, losses = [], []
    for i in range(9):
        loss = F.cross_entropy(lin(masks[i : i + 1] * x[i : i + 1]), y[i : i + 1])
        gw, gb = torch.autograd.grad(loss, [lin.weight, lin.bias])
        grads.append(torch.cat([gw.reshape(-1), gb]))
        losses.append(float(loss.detach()))
    G = torch.stack(grads)  # (9, dim)
    assert (moments.method, moments.mode) == ("linear", "train") and not model.training
    assert torch.allclose(moments.sum_grad, G.sum(0), rtol=1e-13, atol=1e-15)
    assert float(moments.sum_sq_norm) == pytest.approx(float(G.square().sum()), rel=1e-13)
    assert float(moments.sum_loss) == pytest.approx(math.fsum(losses), rel=1e-13)
