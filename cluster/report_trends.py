"""The report's trends over training: λ_max, trace, sharpness measures, barrier heights and the
edge-of-stability ratio against the training step across a run's checkpoints.

:func:`trend_series` turns the rows of a results folder (as :mod:`cluster.report_data`
reads them) into :class:`~cluster.plot_trends.TrendSeries`: one per quantity, job and
definition (how the quantity was measured: ``eigenvalues (Lanczos)`` or ``eos (gd)`` for
λ_max, the method for a trace, the path and evaluation set for a barrier). λ_max is read
from every kind whose headline declares the Hessian's λ_max (:class:`cluster.kinds.Headline`,
the value behind the ``lambda_max`` gauge), so the figure and the dashboard agree on it. Several probes
of one kind in a job that differ in their options are told apart by those options. The x
coordinate is the rows' ``step`` column (the training step of the checkpoint, or of a
barrier's second endpoint); a checkpoint measured more than once (an audit re-running a
series) counts once, with its newest row. Rows without a step cannot be placed and are
counted on the page instead. :func:`trends_section` draws one figure per quantity with
:func:`cluster.plot_trends.plot_trend` and says in one line when a quantity has one
checkpoint only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cluster.kinds import KINDS
from cluster.plot_trends import TrendPoint, TrendSeries, plot_trend
from cluster.report_html import _e, _Figures, _label, _mpl, _num, _table
from cluster.results import differing_options

__all__ = ["trend_series", "trends_section", "TREND_KINDS"]

# Options that name the checkpoints a task covered rather than how it measured: ignored when
# telling apart probes of one kind (an audit's eos rows carry a longer series each pass).
_PLACEMENT_OPTIONS = frozenset({"series", "series_steps", "between"})

_SHARPNESS_ORDER = ("lambda_max", "keskar", "sam", "adaptive", "average")


@dataclass(frozen=True)
class _Quantity:
    name: str  # figure title and y label
    slug: str  # in the PNG's file name
    order: int
    reference: tuple[float, str] | None = None
    note: str = ""


_LAMBDA_MAX = _Quantity("λ_max", "lambda_max", 0, note="largest Hessian eigenvalue")
_LAMBDA_MAX_P = _Quantity("λ_max(P⁻¹H)", "lambda_max_preconditioned", 1, note="Adam-preconditioned sharpness")
_TRACE = _Quantity("trace", "trace", 2, note="Hessian trace; bars ±2 standard errors")
_BARRIER = _Quantity("barrier height", "barrier_height", 20, note="plotted at the step of each path's second endpoint")
_EOS = _Quantity("EoS ratio", "eos_ratio", 30, (1.0, "edge of stability (ratio 1)"), "λ_max / stability threshold")


def _measure(measure: str) -> _Quantity:
    order = 10 + (_SHARPNESS_ORDER.index(measure) if measure in _SHARPNESS_ORDER else len(_SHARPNESS_ORDER))
    return _Quantity(f"sharpness: {measure}", f"sharpness-{measure}", order, note="bars ±2 standard errors")


def _float(x) -> float | None:
    """A stored number as a float (None stays None: no value stored)."""
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


# Each kind's rows as (quantity, definition, value, stderr) entries; a row may feed several quantities.
_Entry = tuple[_Quantity, str, float | None, float | None]


def _eos_how(r: dict) -> str:
    optimizer = str(r.get("optimizer") or "gd")
    momentum = _float(r.get("momentum"))
    return optimizer if optimizer == "gd" or momentum is None else f"{optimizer}, β={momentum:g}"


def _eos(r: dict) -> list[_Entry]:
    how = _eos_how(r)
    ratio = (_EOS, how, _float(r.get("ratio")), None)
    if r.get("optimizer") == "adam":  # λ_max(P⁻¹H): not the Hessian's (its headline λ_max is None)
        return [(_LAMBDA_MAX_P, f"eos ({how})", _float(r.get("lambda_max")), None), ratio]
    return [ratio]


def _trace(r: dict) -> list[_Entry]:
    return [(_TRACE, str(r.get("method") or "trace"), _float(r.get("trace")), _float(r.get("trace_stderr")))]


def _sharpness(r: dict) -> list[_Entry]:
    measure = str(r.get("measure") or "?")
    if measure == "lambda_max":  # the Hessian's λ_max: on the λ_max figure (its headline)
        return []
    return [(_measure(measure), "sharpness", _float(r.get("value")), _float(r.get("stderr")))]


def _barrier(r: dict) -> list[_Entry]:
    how = f"{r.get('path')} path, {r.get('eval_set')} set"
    return [(_BARRIER, how, _float(r.get("barrier_height")), None)]


# Each kind's own trend quantities; λ_max comes from every kind whose headline declares the
# Hessian's λ_max (Kind.headline.lambda_max, the value the landscape_probe_lambda_max gauge shows).
_OWN: dict[str, Callable[[dict], list[_Entry]]] = {
    "trace": _trace,
    "sharpness": _sharpness,
    "barrier": _barrier,
    "eos": _eos,
}
_LAMBDA_DEFINITIONS = {
    "eigenvalues": lambda r: "eigenvalues (Lanczos)",
    "critical": lambda r: "critical (Lanczos)",
    "sharpness": lambda r: "sharpness (lambda_max measure)",
    "eos": lambda r: f"eos ({_eos_how(r)})",
}


def _lambda_max(kind: str, read: Callable[[dict], float | None]) -> Callable[[dict], list[_Entry]]:
    define = _LAMBDA_DEFINITIONS.get(kind, lambda r: kind)

    def entries(r: dict) -> list[_Entry]:
        value = _float(read(r))
        return [] if value is None else [(_LAMBDA_MAX, define(r), value, None)]

    return entries


def _sources() -> dict[str, list[Callable[[dict], list[_Entry]]]]:
    sources: dict[str, list[Callable[[dict], list[_Entry]]]] = {}
    for name, kind in KINDS.items():
        if kind.headline.lambda_max is not None:
            sources.setdefault(name, []).append(_lambda_max(name, kind.headline.lambda_max))
        if name in _OWN:
            sources.setdefault(name, []).append(_OWN[name])
    return sources


_SOURCES = _sources()

# The probe kinds whose rows feed the trend figures.
TREND_KINDS = tuple(_SOURCES)


def _options(row: dict) -> dict:
    """The row's probe options that say how it measured (not which checkpoints it covered)."""
    try:
        config = json.loads(row.get("probe_config") or "{}")
    except ValueError:
        return {"probe_config": row.get("probe_config")}
    if not isinstance(config, dict):
        return {"probe_config": config}
    return {k: v for k, v in config.items() if k not in _PLACEMENT_OPTIONS}


def _differing(configs: list[dict]) -> dict[str, str]:
    """For each options JSON, the ``key=value`` text of the options that differ between them."""
    keys = differing_options(configs)
    return {
        json.dumps(c, sort_keys=True): ", ".join(f"{k}={json.dumps(c.get(k), sort_keys=True)}" for k in keys)
        for c in configs
    }


def _collect(data: dict[str, list[dict]]) -> tuple[list[tuple[_Quantity, TrendSeries]], dict[_Quantity, int]]:
    """The series of every trend quantity, and per quantity the number of rows without a step."""
    # (quantity, job, definition) -> options JSON -> step -> (created_at, point)
    found: dict[tuple[_Quantity, str, str], dict[str, dict[int, tuple[str, TrendPoint]]]] = {}
    configs: dict[tuple[_Quantity, str, str], dict[str, dict]] = {}
    unplaced: dict[_Quantity, int] = {}
    rank: dict[tuple[_Quantity, str, str], int] = {}  # legend order: the kinds' order in _SOURCES
    for index, (kind, sources) in enumerate(_SOURCES.items()):
        for row in data.get(kind) or []:
            for quantity, definition, value, stderr in [e for source in sources for e in source(row)]:
                if value is None:
                    continue
                step = row.get("step")
                if step is None:
                    unplaced[quantity] = unplaced.get(quantity, 0) + 1
                    continue
                key = (quantity, str(row.get("job")), definition)
                rank.setdefault(key, index)
                options = _options(row)
                text = json.dumps(options, sort_keys=True)
                configs.setdefault(key, {})[text] = options
                point = TrendPoint(int(step), value, stderr, _label(row))
                created = str(row.get("created_at") or "")
                at = found.setdefault(key, {}).setdefault(text, {})
                if int(step) not in at or at[int(step)][0] <= created:  # the newest row of a checkpoint wins
                    at[int(step)] = (created, point)
    series = []
    for key, by_config in found.items():
        quantity, job, definition = key
        suffix = _differing(list(configs[key].values())) if len(by_config) > 1 else {}
        for text, points in by_config.items():
            extra = suffix.get(text)
            name = f"{definition} [{extra}]" if extra else definition
            ordered = tuple(p for _, (_, p) in sorted(points.items()))
            series.append((rank[key], quantity, TrendSeries(quantity.name, job, name, ordered)))
    series.sort(key=lambda rqs: (rqs[1].order, rqs[1].name, rqs[2].job, rqs[0], rqs[2].definition))
    return [(q, s) for _, q, s in series], unplaced


def trend_series(data: dict[str, list[dict]]) -> list[TrendSeries]:
    """Every trend series of a results folder's rows, in figure order.

    Args:
        data: rows per probe kind, as :func:`cluster.report_data.read_rows` returns them
            (kinds outside :data:`TREND_KINDS` are ignored).

    Returns:
        One :class:`~cluster.plot_trends.TrendSeries` per quantity, job and definition, its
        points in step order, one per checkpoint (the newest row where one was measured twice).
        λ_max comes from each kind's headline λ_max (``eigenvalues`` with ``which: largest``,
        sharpness's ``lambda_max`` measure, ``critical``, ``eos`` except Adam's, whose
        preconditioned λ_max is its own quantity); each other sharpness measure is a quantity;
        rows without a training step are left out.
    """
    return [s for _, s in _collect(data)[0]]


def _trend_png(series: list[TrendSeries], quantity: _Quantity, title: str, path: Path) -> Path:
    return plot_trend(series, path, title=_mpl(title), ylabel=_mpl(quantity.name), reference=quantity.reference)


def trends_section(data: dict[str, list[dict]], figs: _Figures) -> str | None:
    """The page's "Trends over training" section body, or None when no row feeds a trend.

    One figure per quantity with a series of two or more checkpoints; a quantity with one
    checkpoint only gets one line saying so, and rows without a step are counted.
    """
    found, unplaced = _collect(data)
    if not found and not unplaced:
        return None
    quantities: dict[_Quantity, list[TrendSeries]] = {}
    for quantity, s in found:
        quantities.setdefault(quantity, []).append(s)
    parts = [
        "<p>Each figure plots one quantity against the training step across the checkpoints of a run, "
        "one line per job and definition (how it was measured); a checkpoint measured more than once "
        "counts with its newest result.</p>"
    ]
    notes = []
    for quantity in sorted({*quantities, *unplaced}, key=lambda q: (q.order, q.name)):
        series = quantities.get(quantity, [])
        if unplaced.get(quantity):
            notes.append(
                f"{quantity.name}: {unplaced[quantity]} result rows have no training step (none in the "
                f"checkpoint's name, trainer_state.json or metadata) and are not plotted."
            )
        if not series:
            continue
        if max(len(s.points) for s in series) < 2:
            steps = sorted({p.step for s in series for p in s.points})
            where = f"step {steps[0]}" if len(steps) == 1 else f"steps {', '.join(map(str, steps))}"
            notes.append(f"{quantity.name}: one checkpoint only per series ({where}), no trend figure.")
            continue
        title = f"{quantity.name} against training step ({quantity.note})" if quantity.note else quantity.name
        parts.append(
            figs.add(
                "trend",
                (quantity.slug,),
                title,
                partial(_trend_png, series, quantity, f"{quantity.name} over training"),
            )
        )
    parts.append(_summary(quantities))
    parts += [f'<p class="meta trend-note">{_e(n)}</p>' for n in notes]
    return "".join(parts)


def _summary(quantities: dict[_Quantity, list[TrendSeries]]) -> str:
    rows = []
    for quantity in sorted(quantities, key=lambda q: (q.order, q.name)):
        for s in quantities[quantity]:
            first, last = s.points[0], s.points[-1]
            rows.append(
                [
                    quantity.name,
                    s.job,
                    s.definition,
                    len(s.points),
                    f"{first.step} … {last.step}" if len(s.points) > 1 else first.step,
                    _num(first.value),
                    _num(last.value),
                ]
            )
    return _table(
        ["quantity", "job", "definition", "checkpoints", "steps", "first value", "last value"], rows, numeric=[3, 5, 6]
    )
