"""``probe report RESULTS_DIR``: a results folder as PNG figures and one self-contained HTML page.

:func:`write_report` reads every dataset of a results folder (``runs/``, one folder
per probe kind, and ``failures/`` when present) through :mod:`cluster.report_data`,
draws the figures with the plot modules (:mod:`cluster.figures`,
:mod:`cluster.plot_barrier`, :mod:`cluster.plot_surface`, :mod:`cluster.plot_eos`)
from probe records rebuilt out of the rows, and writes ``figures/*.png`` plus
``index.html`` into the output folder. Its "Trends over training" section
(:mod:`cluster.report_trends`, :mod:`cluster.plot_trends`) plots λ_max, the trace,
each sharpness measure, barrier heights and the edge-of-stability ratio against the
training step across a run's checkpoints (``figures/trend-*.png``).

The page stands alone: figures are embedded as ``data:image/png;base64`` URIs, the
style sheet is inline, and there is no script, font or network reference, so it
can be mailed or archived as one file. Every string taken from the data (job
names, checkpoint paths, options, failure reasons) is HTML-escaped. Files are
written under a temporary name and renamed, so an interrupted report never leaves
a partial ``index.html``. A figure that cannot be drawn (for example a loss grid
that is all NaN) is reported on the page in its place instead of stopping the report.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cluster.report_data import failures as _failures
from cluster.report_data import read_rows as _read_rows
from cluster.report_html import _CSS, _e, _Figures, _order, _time
from cluster.report_sections import _SECTIONS, _failures_section, _runs_section
from cluster.report_trends import trends_section

__all__ = ["write_report", "REPORT_KINDS"]


# Sections in page order (the probe kinds the job runners write).
REPORT_KINDS = (
    "eigenvalues",
    "trace",
    "sharpness",
    "spectrum",
    "barrier",
    "surface",
    "eos",
    "pacbayes",
    "noise",
    "critical",
)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("landscape-probe")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(results_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Render every result under ``results_dir`` into ``out_dir/figures/*.png`` and ``out_dir/index.html``.

    The page holds a header (folder, jobs, rows per kind, UTC time, library version),
    the runs table, the trends over training (one figure per quantity measured at two or
    more checkpoints, against the training step, one line per job and definition), one
    section per probe kind present (tables, and figures for spectra, barriers, surfaces
    and edge-of-stability series) and the failed tasks
    (from the runs rows and, when present, the ``failures`` dataset). It embeds its
    figures as base64 PNGs and references nothing outside itself.

    Args:
        results_dir: a job's ``output.path`` (the folder holding ``runs/`` and one folder per kind).
        out_dir: where to write; default ``results_dir/report``.

    Returns:
        The path of the written ``index.html``.

    Raises:
        FileNotFoundError: if ``results_dir`` is not a folder or holds no results.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"results folder {str(root)!r} does not exist or is not a folder; pass a job's output.path, "
            f"or run `probe run SPEC` first"
        )
    runs = _read_rows(root, "runs")
    data = {kind: _read_rows(root, kind) for kind in REPORT_KINDS}
    failures = _failures(runs, _read_rows(root, "failures"))
    if not runs and not failures and not any(data.values()):
        raise FileNotFoundError(f"no results found under {str(root)!r}; run `probe run SPEC` first")

    out = Path(out_dir) if out_dir is not None else root / "report"
    figs = _Figures(out / "figures")
    figs.folder.mkdir(parents=True, exist_ok=True)
    present = [k for k in REPORT_KINDS if data[k]]
    jobs = sorted({str(r.get("job")) for rows in [runs, failures, *data.values()] for r in rows})
    counts = ", ".join(f"{k} {len(data[k])}" for k in present) or "none"
    trends = trends_section(data, figs)
    sections = ["runs", *(["trends"] if trends is not None else []), *present, "failures"]

    body = [
        f"<h1>Loss-landscape report</h1><dl class=meta><dt>results folder</dt><dd><code>{_e(root)}</code></dd>",
        f"<dt>jobs</dt><dd>{len(jobs)}: {_e(', '.join(jobs))}</dd>",
        f"<dt>runs</dt><dd>{len(runs)}</dd>"
        f"<dt>result rows</dt><dd>{sum(len(v) for v in data.values())} ({_e(counts)})</dd>",
        f"<dt>failed tasks</dt><dd>{len(failures)}</dd>",
        f"<dt>generated</dt><dd>{_e(_time(dt.datetime.now(dt.UTC)))}</dd>",
        f"<dt>library</dt><dd>landscape-probe {_e(_version())}</dd></dl>",
        "<nav>" + "".join(f'<a href="#{k}">{_e(k)}</a>' for k in sections) + "</nav>",
        '<section id="runs"><h2>Runs</h2>',
        _runs_section(runs) if runs else "<p>No runs rows.</p>",
        "</section>",
    ]
    if trends is not None:
        body += ['<section id="trends"><h2>Trends over training</h2>', trends, "</section>"]
    for kind in present:
        heading, render = _SECTIONS[kind]
        rows = sorted(data[kind], key=_order)
        body += [
            f'<section id="{kind}"><h2>{_e(heading)} <small>({_e(kind)}, {len(rows)} rows)</small></h2>',
            render(rows, figs),
            "</section>",
        ]
    body += ['<section id="failures"><h2>Failed tasks</h2>', _failures_section(failures), "</section>"]

    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Loss-landscape report: {_e(root.name)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
    index = out / "index.html"
    _write_atomic(index, page)
    figs.remove_stale()
    return index
