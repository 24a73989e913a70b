"""Trend figures: a quantity against the training step across a run's checkpoints.

One call, :func:`plot_trend`, draws one line per :class:`TrendSeries` (a job, a
quantity and how it was measured) on a shared training-step axis, with ±2
standard-error bars where the estimate has a standard error (Hutchinson traces,
average-case sharpness); written with :func:`cluster.figures.save_png` (Agg
backend, atomic write). The series themselves are built from result rows by
:func:`cluster.report_trends.trend_series`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.figures import plt, save_png

__all__ = ["TrendPoint", "TrendSeries", "plot_trend"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_STYLES = ("-", "--", "-.", ":")


@dataclass(frozen=True)
class TrendPoint:
    """One checkpoint's value of a series.

    Attributes:
        step: the checkpoint's training step (the rows' ``step`` column).
        value: the quantity at that checkpoint (NaN where the probe stored a non-finite value).
        stderr: its standard error, or None where the estimate has none.
        checkpoint: the checkpoint's run-relative name (``checkpoint_name``, else its file name).
    """

    step: int
    value: float
    stderr: float | None
    checkpoint: str


@dataclass(frozen=True)
class TrendSeries:
    """One line of a trend figure: a quantity of one job, measured one way, over training steps.

    Attributes:
        quantity: what is plotted (``λ_max``, ``trace``, ``sharpness: keskar``, ...): one figure each.
        job: the job's name.
        definition: how it was measured (``eigenvalues (Lanczos)``, ``hutchinson``, ...), with the
            options that tell apart several probes of one kind in a job.
        points: one per checkpoint, in step order.
    """

    quantity: str
    job: str
    definition: str
    points: tuple[TrendPoint, ...]

    @property
    def steps(self) -> list[int]:
        """The training steps of the points, in order."""
        return [p.step for p in self.points]

    @property
    def values(self) -> list[float]:
        """The values of the points, in step order."""
        return [p.value for p in self.points]

    @property
    def label(self) -> str:
        """The legend entry: ``job · definition``."""
        return f"{self.job} · {self.definition}"


def plot_trend(
    series: Sequence[TrendSeries],
    path: str | os.PathLike,
    *,
    title: str,
    ylabel: str,
    reference: tuple[float, str] | None = None,
) -> Path:
    """Each series against the training step, one line (and marker style) per series.

    Args:
        series: the lines to draw; they share the figure's quantity and units.
        path: where to write the PNG.
        title: the figure title.
        ylabel: the y-axis label (the quantity).
        reference: an optional horizontal line ``(y, label)``, e.g. ``(1.0, "edge of stability")``.

    Returns:
        The path written.

    Raises:
        ValueError: if ``series`` is empty or holds no point.
    """
    if not any(s.points for s in series):
        raise ValueError("plot_trend needs at least one series with a point; got none")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, s in enumerate(series):
        steps, values = s.steps, s.values
        err = [2 * p.stderr if p.stderr is not None and math.isfinite(p.stderr) else 0.0 for p in s.points]
        style: dict[str, Any] = dict(  # later series drawn thinner and smaller, so lines that coincide stay visible
            color=f"C{i % 10}",
            marker=_MARKERS[i % len(_MARKERS)],
            ls=_STYLES[(i // 10) % len(_STYLES)],
            ms=max(3.0, 8.0 - 1.2 * i),
            lw=max(1.0, 2.6 - 0.4 * i),
            label=s.label.replace("$", r"\$"),  # a $ in a job name would start mathtext
        )
        if any(err):
            ax.errorbar(steps, values, yerr=err, capsize=3, **style)
        else:
            ax.plot(steps, values, **style)
    if reference is not None:
        ax.axhline(reference[0], color="0.35", ls="--", lw=1.0, label=reference[1])
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return save_png(fig, path)
