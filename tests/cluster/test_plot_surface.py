"""Surface figures (cluster/plot_surface.py): PNGs for 1-D and 2-D surfaces, with and without classes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cluster.data import digits_tensors
from cluster.plot_surface import plot_surface
from probe.evaluate import Evaluator
from probe.models import digits_mlp
from probe.params import ParameterSpace
from probe.surface import loss_surface

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run():
    """A small digits MLP after 40 GD steps, its evaluator and the trajectory of flat parameters."""
    x, y = digits_tensors(split="train")
    x, y = x[:128].double(), y[:128]
    torch.manual_seed(0)
    model = digits_mlp(hidden=12).double()
    space = ParameterSpace.of(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    path = [space.get_flat(model)]
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        path.append(space.get_flat(model))
    return model, [(x, y)], path


def _png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("dims", [1, 2])
def test_random_direction_surfaces(tmp_path, run, dims):
    model, batches, _ = run
    ev = Evaluator(model, F.cross_entropy, batches)
    result = loss_surface(ev, dims=dims, resolution=11, span=1.0, generator=torch.Generator().manual_seed(0))
    _png(plot_surface(result, tmp_path / "figs" / f"surface_{dims}d.png"))


def test_pca_surface_with_trajectory(tmp_path, run):
    model, batches, path = run
    ev = Evaluator(model, F.cross_entropy, batches)
    result = loss_surface(ev, dims=2, resolution=11, span=5.0, directions="pca", trajectory=path)
    _png(plot_surface(result, tmp_path / "pca.png", title="digits MLP: PCA of the training run"))


def test_regression_surface_without_error_rate(tmp_path, run):
    model, batches, _ = run
    targets = [(x, F.one_hot(y, 10).double()) for x, y in batches]  # float targets: no error rate
    ev = Evaluator(model, F.mse_loss, targets)
    result = loss_surface(ev, dims=1, resolution=9, generator=torch.Generator().manual_seed(1))
    assert torch.isnan(result.error).all()
    _png(plot_surface(result, tmp_path / "mse.png"))


def test_rejects_other_records(tmp_path):
    with pytest.raises(TypeError, match=r"result must be a SurfaceResult, got dict"):
        plot_surface({}, tmp_path / "x.png")
