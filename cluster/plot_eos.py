"""Edge-of-stability figure: sharpness per checkpoint against the optimizer's stability threshold.

One call, :func:`plot_eos`, from a :class:`probe.eos.EosSeries`; written with
:func:`cluster.figures.save_png` (Agg backend, atomic write).
"""

from __future__ import annotations

import os
from pathlib import Path

from cluster.figures import plt, save_png
from probe.eos import EosSeries

__all__ = ["plot_eos", "THRESHOLD_LABELS"]

# How each optimizer's threshold reads on the figure (probe.eos.stability_threshold).
THRESHOLD_LABELS = {
    "gd": "2/η",
    "momentum": "(2+2β)/((1−d)η)",
    "nesterov": "(2+2β)/((1+2β)η)",
    "adam": "(2+2β₁)/((1−β₁)η)",
}


def plot_eos(series: EosSeries, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """λ_max per checkpoint step with the stability threshold (top) and their ratio (bottom).

    The threshold is drawn as a step line, so a learning-rate schedule shows as
    jumps; the ratio panel marks 1 (the edge) and a ±15% band around it.

    Args:
        series: an :class:`~probe.eos.EosSeries`.
        path: where to write the PNG.
        title: figure title; defaults to the optimizer and its momentum.

    Returns:
        The path written.
    """
    steps = series.steps
    lam, thr, ratio = series.lambda_max.numpy(), series.thresholds.numpy(), series.ratios.numpy()
    preconditioned = series.optimizer == "adam"
    fig, (ax, ax_ratio) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1], "hspace": 0.08}
    )
    ax.plot(steps, lam, "o-", color="C0", ms=3.5, lw=1.2, label="λ_max(P⁻¹H)" if preconditioned else "λ_max(H)")
    label = f"threshold {THRESHOLD_LABELS[series.optimizer]}"
    ax.step(steps, thr, where="post", color="C3", ls="--", lw=1.2, label=label)
    ax.set_ylabel("preconditioned sharpness" if preconditioned else "sharpness λ_max")
    ax.set_ylim(0, max(lam.max(), thr.max()) * 1.15)
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    ax_ratio.axhspan(0.85, 1.15, color="C3", alpha=0.08, lw=0, label="±15%")
    ax_ratio.axhline(1.0, color="C3", ls="--", lw=1.0)
    ax_ratio.plot(steps, ratio, "o-", color="C2", ms=3, lw=1.0, label="λ_max / threshold")
    ax_ratio.set_ylabel("ratio")
    ax_ratio.set_xlabel("training step")
    ax_ratio.set_ylim(0, max(1.3, ratio.max() * 1.1))
    ax_ratio.legend(loc="best")
    ax_ratio.grid(alpha=0.3)
    momentum = "" if series.optimizer == "gd" else f", β={series.momentum:g}"
    ax.set_title(title or f"Edge of stability: {series.optimizer}{momentum}, {len(steps)} checkpoints")
    return save_png(fig, path)
