"""ParameterSpace (probe/params.py): selection, flat layout, (dim, k) blocks, get/set."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from probe.models import digits_cnn, digits_mlp
from probe.params import ParameterSpace


@pytest.fixture
def deep_model(seeded_model) -> nn.Module:
    """Twelve Linear layers named "0".."11", so that "1" is a prefix of "10" and "11" as text."""
    return seeded_model(lambda: nn.Sequential(*[nn.Linear(3, 3) for _ in range(12)]), seed=0)


def random_like(space: ParameterSpace, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in space.shapes]


@pytest.mark.parametrize(("factory", "dim"), [(digits_mlp, 3466), (digits_cnn, 838)])
def test_dim_counts_every_trainable_parameter(factory, dim):
    space = ParameterSpace.of(factory())
    assert space.dim == sum(space.numels) == dim


def test_flatten_unflatten_round_trip(deep_model):
    space = ParameterSpace.of(deep_model)
    tensors = random_like(space, seed=1)
    flat = space.flatten(tensors)
    assert flat.shape == (space.dim,)
    # layout: parameters back to back in module order, each row-major
    assert torch.equal(flat[:9], tensors[0].reshape(-1))
    assert torch.equal(flat[9:12], tensors[1])
    back = space.unflatten(flat)
    assert [t.shape for t in back] == list(space.shapes)
    assert all(torch.equal(a, b) for a, b in zip(back, tensors, strict=True))


def test_unflatten_vector_gives_views(deep_model):
    space = ParameterSpace.of(deep_model)
    flat = torch.zeros(space.dim, dtype=torch.float64)
    parts = space.unflatten(flat)
    parts[1][2] = 7.0  # 0.bias[2]
    assert flat[9 + 2].item() == 7.0


def test_unflatten_block_is_k_first(deep_model):
    space = ParameterSpace.of(deep_model)
    k = 4
    V = torch.randn(space.dim, k, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    blocks = space.unflatten(V)
    assert [b.shape for b in blocks] == [(k, *s) for s in space.shapes]
    for j in range(k):
        column = space.unflatten(V[:, j])
        assert all(torch.equal(b[j], c) for b, c in zip(blocks, column, strict=True))


def test_unflatten_wrong_length_rejected(deep_model):
    space = ParameterSpace.of(deep_model)
    expected = rf"expected a vector with leading dimension dim={space.dim}, got shape \(5, 2\)"
    with pytest.raises(ValueError, match=expected):
        space.unflatten(torch.zeros(5, 2))


def test_selection_by_prefix_respects_dot_boundary(deep_model):
    space = ParameterSpace.of(deep_model, ["1"])
    assert space.names == ("1.weight", "1.bias")  # not "10.*" or "11.*"
    assert space.dim == 12


def test_selection_by_exact_name_and_str(deep_model):
    assert ParameterSpace.of(deep_model, ["10.bias"]).names == ("10.bias",)
    assert ParameterSpace.of(deep_model, "11").names == ("11.weight", "11.bias")


def test_selection_keeps_module_order(deep_model):
    space = ParameterSpace.of(deep_model, ["11.bias", "2", "0.weight"])
    assert space.names == ("0.weight", "2.weight", "2.bias", "11.bias")
    assert space.parameters(deep_model)[0] is deep_model[0].weight


def test_frozen_parameters_are_excluded(deep_model):
    deep_model[0].requires_grad_(False)
    space = ParameterSpace.of(deep_model)
    assert "0.weight" not in space.names and len(space.names) == 22
    expected = r"parameter selection '0' matches no trainable parameter; valid names: 1\.weight"
    with pytest.raises(ValueError, match=expected):
        ParameterSpace.of(deep_model, ["0"])


def test_unknown_selection_lists_valid_names():
    model = digits_cnn()
    valid = "1.weight, 1.bias, 4.weight, 4.bias, 7.weight, 7.bias"
    expected = f"parameter selection 'conv' matches no trainable parameter; valid names: {valid}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        ParameterSpace.of(model, ["conv"])


def test_empty_selection_rejected(deep_model):
    with pytest.raises(ValueError, match=r"parameter selection is empty; pass None"):
        ParameterSpace.of(deep_model, [])
    deep_model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters to probe \(all have requires_grad=False\)"):
        ParameterSpace.of(deep_model)


def test_set_flat_writes_only_the_selection(deep_model):
    space = ParameterSpace.of(deep_model, ["3", "7"])
    before = {n: p.detach().clone() for n, p in deep_model.named_parameters()}
    vec = torch.randn(space.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    space.set_flat(deep_model, vec)
    assert torch.equal(space.get_flat(deep_model), vec)
    assert torch.equal(deep_model[3].weight.reshape(-1), vec[:9])
    for name, p in deep_model.named_parameters():
        if name not in space.names:
            assert torch.equal(p, before[name]), name


def test_get_flat_is_a_detached_copy(deep_model):
    space = ParameterSpace.of(deep_model)
    flat = space.get_flat(deep_model)
    assert not flat.requires_grad
    flat.zero_()
    assert deep_model[0].weight.abs().sum().item() > 0
