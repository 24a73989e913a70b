"""Barrier figure (cluster/plot_barrier.py): a PNG is written for lists and dicts of records."""

from __future__ import annotations

import math

import pytest
import torch

from cluster.plot_barrier import plot_barriers
from probe.barrier import BarrierResult, barrier_measures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(kind: str, eval_set: str, height: float, classes: bool = True) -> BarrierResult:
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    loss = 0.01 + height * torch.sin(math.pi * t) ** 2
    error = 0.4 * loss / (1 + loss) if classes else torch.full_like(t, float("nan"))
    m = barrier_measures(t, loss)
    return BarrierResult(
        eval_set=eval_set,
        path=kind,
        mode="eval",
        num_examples=100,
        t=t,
        loss=loss,
        error=error,
        loss_a=float(loss[0]),
        loss_b=float(loss[-1]),
        barrier_height=m.barrier_height,
        barrier_above_line=m.barrier_above_line,
        path_integral=m.path_integral,
        integration_rule=m.integration_rule,
        argmax_t=m.argmax_t,
        error_barrier_height=float(error.max() - error[0]) if classes else float("nan"),
        num_nonfinite=0,
        first_nonfinite_t=None,
    )


@pytest.mark.parametrize("classes", [True, False])
def test_plot_barriers_writes_png(tmp_path, classes):
    results = [
        _result(kind, split, h, classes)
        for kind, h in (("linear", 1.4), ("bezier", 0.02), ("polychain", 0.015))
        for split in ("train", "test")
    ]
    out = plot_barriers(results, tmp_path / "figs" / "barrier.png", title="digits MLP")
    assert out.is_file() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == PNG_MAGIC
    labelled = plot_barriers({"straight": results[0], "curve": results[2]}, tmp_path / "dict.png")
    assert labelled.read_bytes()[:8] == PNG_MAGIC


def test_plot_barriers_rejects_empty_and_foreign(tmp_path):
    with pytest.raises(ValueError, match=r"results is empty: pass at least one BarrierResult"):
        plot_barriers([], tmp_path / "x.png")
    with pytest.raises(TypeError, match=r"results\['a'\] must be a BarrierResult, got float"):
        plot_barriers({"a": 1.0}, tmp_path / "x.png")
