"""PNG figures from result records: one call per figure.

Figures are drawn with matplotlib's non-interactive Agg backend, so they work on
headless machines. Each function takes a record from :mod:`probe` and a path, writes
the PNG atomically (temporary name, then rename) and returns the path.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from probe.slq import SpectrumResult  # noqa: E402

__all__ = ["plot_density", "save_png"]


def save_png(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` as a PNG (atomically: a temporary file, then a rename), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_density(result: SpectrumResult, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Spectral density on a linear axis (with ±2 standard-error band) and on a log-|λ| axis.

    Args:
        result: an SLQ :class:`~probe.slq.SpectrumResult`.
        path: where to write the PNG.
        title: figure title; defaults to the estimator settings.
    """
    fig, (ax, ax_log) = plt.subplots(1, 2, figsize=(11, 4))
    grid, dens, err = result.grid.numpy(), result.density.numpy(), result.density_stderr.numpy()
    ax.plot(grid, dens, color="C0", lw=1.2)
    if result.runs > 1:
        ax.fill_between(grid, (dens - 2 * err).clip(min=1e-300), dens + 2 * err, color="C0", alpha=0.25, lw=0)
    ax.set_yscale("log")
    ax.set_ylim(dens.max() * 1e-6, dens.max() * 3)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density (log scale)")
    ax.set_title("linear λ axis, ±2 s.e. band")
    u, pos, neg = (t.numpy() for t in result.log_abs_density())
    ax_log.plot(u, pos, color="C0", label="λ > 0")
    ax_log.plot(u, neg, color="C3", label="λ < 0")
    ax_log.set_xlabel("log10 |λ|")
    ax_log.set_ylabel("density")
    ax_log.set_title("log |λ| axis, by sign")
    ax_log.legend()
    fig.suptitle(
        title or f"SLQ density: {result.runs} runs × {result.steps} steps, σ={result.sigma:.3g}, reorth={result.reorth}"
    )
    return save_png(fig, path)
