"""Barrier figure: loss (and error rate) along every path on one axis, as a PNG.

One call turns the :class:`~probe.barrier.BarrierResult` records of a comparison
(straight line against trained curves, train against test) into a figure: the left
panel shows the loss against the path position ``t``, the right panel the error rate
when any record has one. Colour marks the path kind, line style the evaluation set,
and each legend entry carries its raw barrier height.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cluster.figures import plt, save_png
from probe.barrier import BarrierResult

__all__ = ["plot_barriers"]

_COLORS = {"linear": "C3", "bezier": "C0", "polychain": "C2"}
_STYLES = ("-", "--", ":", "-.")


def _labelled(results: Sequence[BarrierResult] | Mapping[str, BarrierResult]) -> list[tuple[str, BarrierResult]]:
    items: list[tuple[str, BarrierResult]]
    if isinstance(results, Mapping):
        items = [(str(k), r) for k, r in results.items()]
    elif isinstance(results, BarrierResult):
        items = [(f"{results.path} · {results.eval_set}", results)]
    else:
        items = [(f"{r.path} · {r.eval_set}", r) for r in results]
    if not items:
        raise ValueError("results is empty: pass at least one BarrierResult (a list, or a dict label → result)")
    for label, r in items:
        if not isinstance(r, BarrierResult):
            raise TypeError(f"results[{label!r}] must be a BarrierResult, got {type(r).__name__}")
    return items


def plot_barriers(
    results: Sequence[BarrierResult] | Mapping[str, BarrierResult],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path:
    """Draw the loss (and error rate, when present) along all paths on one axis and write a PNG.

    Args:
        results: the records to draw, as a list (labelled ``"<path> · <eval set>"``) or a
            dict label → record.
        path: where to write the PNG (folders are created; the write is atomic).
        title: figure title; defaults to the mode policies of the records.

    Returns:
        The written path.

    Raises:
        ValueError: if ``results`` is empty.
        TypeError: if an entry is not a :class:`~probe.barrier.BarrierResult`.
    """
    items = _labelled(results)
    has_error = any(not all(math.isnan(e) for e in r.error.tolist()) for _, r in items)
    if has_error:
        fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    else:
        fig, ax_loss = plt.subplots(1, 1, figsize=(6, 4))
        ax_err = None
    eval_sets = list(dict.fromkeys(r.eval_set for _, r in items))
    for i, (label, r) in enumerate(items):
        color = _COLORS.get(r.path, f"C{3 + i}")
        style = _STYLES[eval_sets.index(r.eval_set) % len(_STYLES)]
        t = r.t.numpy()
        ax_loss.plot(
            t, r.loss.numpy(), color=color, ls=style, lw=1.5, label=f"{label} (barrier {r.barrier_height:.3g})"
        )
        if r.num_nonfinite and r.first_nonfinite_t is not None:
            ax_loss.axvline(r.first_nonfinite_t, color=color, ls=style, lw=0.8, alpha=0.6)
        if ax_err is not None and not math.isnan(r.error_barrier_height):
            ax_err.plot(t, 100 * r.error.numpy(), color=color, ls=style, lw=1.5, label=label)
    ax_loss.set_xlabel("path position t (0 = endpoint a, 1 = endpoint b)")
    ax_loss.set_ylabel("mean loss")
    ax_loss.set_xlim(0, 1)
    ax_loss.set_title("loss along the path")
    ax_loss.legend(fontsize="small")
    if ax_err is not None:
        ax_err.set_xlabel("path position t (0 = endpoint a, 1 = endpoint b)")
        ax_err.set_ylabel("error rate (%)")
        ax_err.set_xlim(0, 1)
        ax_err.set_ylim(bottom=0)
        ax_err.set_title("error rate along the path")
        ax_err.legend(fontsize="small")
    modes = ", ".join(dict.fromkeys(r.mode for _, r in items))
    fig.suptitle(title or f"Interpolation barriers (mode: {modes})")
    return save_png(fig, path)
