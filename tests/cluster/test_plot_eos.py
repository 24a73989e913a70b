"""cluster.plot_eos: the edge-of-stability figure is written as a PNG from a series record."""

from __future__ import annotations

import matplotlib.image
import pytest

from cluster.plot_eos import plot_eos
from probe.eos import EosPoint, EosSeries, stability_threshold


def synthetic_series(optimizer: str, momentum: float) -> EosSeries:
    """Sharpness rising to the threshold and hovering, with a learning-rate drop half way."""
    points = []
    for i in range(20):
        lr = 0.1 if i < 10 else 0.05
        threshold = stability_threshold(optimizer, lr, momentum if optimizer != "gd" else None)
        lam = threshold * min(0.4 + 0.08 * i, 1.02 if i % 2 else 0.97)
        points.append(
            EosPoint(
                100 * i,
                lr,
                optimizer,
                momentum,
                lam,
                threshold,
                lam / threshold,
                15,
                1e-6,
                True,
                i > 0,
                "preconditioned" if optimizer == "adam" else "hessian",
            )
        )
    return EosSeries(tuple(points), optimizer, momentum)


@pytest.mark.parametrize("optimizer,momentum", [("gd", 0.0), ("adam", 0.9)])
def test_plot_eos_writes_a_png(tmp_path, optimizer, momentum):
    path = plot_eos(synthetic_series(optimizer, momentum), tmp_path / "figs" / "eos.png", title=None)
    assert path == tmp_path / "figs" / "eos.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 600 and height > 400
    assert not list(path.parent.glob(".*.tmp"))  # written atomically, no temporary left
