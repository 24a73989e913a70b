"""PNG figures of loss surfaces (:class:`probe.surface.SurfaceResult`): one call per figure.

A 1-D surface is a line plot of the loss (and the error rate on a second axis when
the task has classes). A 2-D surface gets two panels, as Li et al. (2018) draw
them: a contour plot of the loss over (α, β) and a 3-D surface. Surfaces often
rise steeply towards the grid's edges, which would flatten everything near the
minimum; both 2-D panels therefore clip the loss at its 95th percentile over the
grid and say so in the title. Non-finite grid points are left blank.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from cluster.figures import plt, save_png
from probe.surface import SurfaceResult

__all__ = ["plot_surface"]

CLIP_PERCENTILE = 95.0
NUM_LEVELS = 30


def _axis_label(result: SurfaceResult, i: int) -> str:
    symbol = "αβ"[i]
    if result.directions == "eigen" and i < len(result.eigenvalues):
        return f"{symbol}  (eigenvector {i + 1}, λ={result.eigenvalues[i]:.3g})"
    if result.directions == "pca" and i < len(result.explained_variance_ratio):
        return f"{symbol}  (PC {i + 1}, {100 * result.explained_variance_ratio[i]:.1f}% of variance)"
    return f"{symbol}  (direction {i + 1})"


def _default_title(result: SurfaceResult) -> str:
    return (
        f"{result.dims}-D loss surface: {result.directions} directions, {result.normalization} normalization"
        f"{', 1-D params fixed' if result.ignore_1d else ''}"
    )


def _plot_1d(result: SurfaceResult, title: str):
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    alphas = np.asarray(result.alphas)
    ax.plot(alphas, result.loss.numpy(), color="C0", lw=1.5, label="loss")
    ax.set_xlabel(_axis_label(result, 0))
    ax.set_ylabel("loss", color="C0")
    err = result.error.numpy()
    if np.isfinite(err).any():
        ax_err = ax.twinx()
        ax_err.plot(alphas, 100 * err, color="C3", lw=1.2, ls="--", label="error")
        ax_err.set_ylabel("error rate (%)", color="C3")
        ax_err.set_ylim(0, 100)
    ax.set_title(title)
    return fig


def _plot_2d(result: SurfaceResult, title: str):
    loss = result.loss.numpy()  # (A, B): rows follow alpha
    finite = np.isfinite(loss)
    top = float(np.percentile(loss[finite], CLIP_PERCENTILE)) if finite.any() else 1.0
    bottom = float(loss[finite].min()) if finite.any() else 0.0
    if top <= bottom:
        top = bottom + max(abs(bottom), 1.0) * 1e-6
    clipped = np.where(finite, np.minimum(loss, top), np.nan)
    a_grid, b_grid = np.meshgrid(np.asarray(result.alphas), np.asarray(result.betas), indexing="ij")
    fig = plt.figure(figsize=(12, 5))
    ax = fig.add_subplot(1, 2, 1)
    levels = np.linspace(bottom, top, NUM_LEVELS)
    filled = ax.contourf(a_grid, b_grid, clipped, levels=levels, cmap="viridis")
    ax.contour(a_grid, b_grid, clipped, levels=levels[::3], colors="k", linewidths=0.4)
    fig.colorbar(filled, ax=ax, label="loss")
    if result.trajectory_coordinates is not None:
        path = result.trajectory_coordinates.numpy()
        ax.plot(path[:, 0], path[:, 1], "o-", color="C3", ms=3, lw=1, label="trajectory")
        ax.legend(loc="upper right")
    ax.plot([0], [0], "w*", ms=10)
    ax.set_xlabel(_axis_label(result, 0))
    ax.set_ylabel(_axis_label(result, 1))
    ax.set_title("contours")
    ax3 = fig.add_subplot(1, 2, 2, projection="3d")
    ax3.plot_surface(a_grid, b_grid, clipped, cmap="viridis", linewidth=0, antialiased=True)
    for axis in (ax3.xaxis, ax3.yaxis):
        axis.set_major_locator(MaxNLocator(5))
    ax3.set_xlabel("α")
    ax3.set_ylabel("β")
    ax3.set_zlabel("loss")
    ax3.set_title("surface")
    fig.suptitle(f"{title}\nloss clipped at its {CLIP_PERCENTILE:g}th percentile ({top:.3g})")
    return fig


def plot_surface(result: SurfaceResult, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw a 1-D surface as a line plot, a 2-D one as contour and 3-D panels; write a PNG.

    Args:
        result: a :class:`~probe.surface.SurfaceResult` (from ``surface`` or ``loss_surface``).
        path: where to write the PNG (written atomically; parent folders created).
        title: figure title; defaults to the directions and normalization used.

    Returns:
        The path written.

    Raises:
        TypeError: if ``result`` is not a :class:`~probe.surface.SurfaceResult`.
    """
    if not isinstance(result, SurfaceResult):
        raise TypeError(
            f"result must be a SurfaceResult, got {type(result).__name__}; compute one with probe.surface.loss_surface"
        )
    title = title or _default_title(result)
    fig = _plot_1d(result, title) if result.dims == 1 else _plot_2d(result, title)
    return save_png(fig, path)
