"""``probe report RESULTS_DIR``: a results folder as PNG figures and one self-contained HTML page.

:func:`write_report` reads every dataset of a results folder (``runs/``, one folder
per probe kind, and ``failures/`` when present) through :mod:`cluster.report_data`,
draws the figures with the plot modules (:mod:`cluster.figures`,
:mod:`cluster.plot_barrier`, :mod:`cluster.plot_surface`, :mod:`cluster.plot_eos`)
from probe records rebuilt out of the rows, and writes ``figures/*.png`` plus
``index.html`` into the output folder.

The page stands alone: figures are embedded as ``data:image/png;base64`` URIs, the
style sheet is inline, and there is no script, font or network reference, so it
can be mailed or archived as one file. Every string taken from the data (job
names, checkpoint paths, options, failure reasons) is HTML-escaped. Files are
written under a temporary name and renamed, so an interrupted report never leaves
a partial ``index.html``. A figure that cannot be drawn (for example a loss grid
that is all NaN) is reported on the page in its place instead of stopping the report.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
import os
import re
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

from cluster.checkpoints import CANONICAL_WEIGHTS
from cluster.figures import plot_density, plt, save_png
from cluster.plot_barrier import plot_barriers
from cluster.plot_eos import plot_eos
from cluster.plot_surface import plot_surface
from cluster.records import barrier_from_row, eos_series_from_rows, floats, spectrum_from_row, surface_from_row
from cluster.report_data import failures as _failures
from cluster.report_data import read_rows as _read_rows
from cluster.report_data import run_failures as _run_failures

__all__ = ["write_report", "REPORT_KINDS"]

# Sections in page order (the probe kinds the job runners write).
REPORT_KINDS = ("eigenvalues", "trace", "sharpness", "spectrum", "barrier", "surface", "eos", "pacbayes", "noise",
                "critical")
MAX_LIST_ITEMS = 8  # list cells (eigenvalues, residuals) show this many entries, then "+N more"
_FIGURE_NAME = re.compile(r"^(spectrum|barrier|surface|eos)-\d{3}-[A-Za-z0-9._-]*\.png$")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;max-width:1400px;
padding:1rem 2rem;color:#1d2330;background:#fff}
h1{font-size:1.6rem;margin:.4rem 0}h2{border-bottom:2px solid #3a6ea5;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.85rem;display:block;overflow-x:auto}
th,td{border:1px solid #c9d1dc;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#e8eef6}tr:nth-child(even) td{background:#f7f9fc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code{font-size:.78rem;word-break:break-all}
figure{margin:1rem 0;padding:.5rem;border:1px solid #dde3ea;background:#fcfdff}
figure img{max-width:min(100%,1100px);height:auto;display:block}
figcaption{font-size:.85rem;color:#46505f;margin-top:.3rem}
.meta{color:#46505f;font-size:.9rem}
.meta dt{font-weight:600;float:left;clear:left;width:11rem}.meta dd{margin-left:11rem}
.bad{color:#a3141c;font-weight:600}.ok{color:#1b7a35;font-weight:600}.warn{color:#8a5a00}
nav a{margin-right:1rem}
"""


class _Raw(str):
    """A fragment of HTML built here (trusted); every other cell value is escaped."""


def _e(value) -> str:
    return value if isinstance(value, _Raw) else html.escape("" if value is None else str(value), quote=True)


def _num(x, fmt: str = ".6g") -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    try:
        return format(x, fmt)
    except (TypeError, ValueError):
        return str(x)


def _pm(value, stderr) -> str:
    if stderr is None or (isinstance(stderr, float) and math.isnan(stderr)):
        return _num(value)
    return f"{_num(value)} ± {_num(stderr, '.2g')}"


def _values(xs) -> str:
    if not xs:
        return "—"
    shown = ", ".join(_num(x, ".5g") for x in xs[:MAX_LIST_ITEMS])
    return shown + (f" … (+{len(xs) - MAX_LIST_ITEMS} more)" if len(xs) > MAX_LIST_ITEMS else "")


def _time(ts) -> str:
    if ts is None:
        return "—"
    if isinstance(ts, dt.datetime):
        if ts.tzinfo is not None:
            ts = ts.astimezone(dt.UTC)
        return ts.strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(ts)


def _ckpt_name(path) -> str:
    """A checkpoint path's short name: the file name, or the folder's for the weights a trainer
    names the same in every checkpoint folder (``checkpoint-200/model.safetensors``)."""
    text = "" if path is None else str(path)
    parts = text.rstrip("/").rsplit("/", 2)
    if len(parts) > 1 and parts[-1] in CANONICAL_WEIGHTS:
        return parts[-2]
    return parts[-1] or text


def _label(row: dict) -> str:
    """How a row's checkpoint is labelled: its ``checkpoint_name`` (run-relative, schema 2), else
    the short name of its path (rows written before the column existed)."""
    return row.get("checkpoint_name") or _ckpt_name(row.get("checkpoint"))


def _ckpt(path, name: str | None = None) -> _Raw:
    """A checkpoint cell: its name (``checkpoint_name``, else the file name), with the full path as the hover title."""
    return _Raw(f'<span title="{_e(path)}">{_e(name or _ckpt_name(path))}</span>') if path else _Raw("—")


def _cell(row: dict) -> _Raw:
    """A row's checkpoint cell."""
    return _ckpt(row.get("checkpoint"), _label(row))


def _order(row: dict) -> tuple:
    """Rows in job, then training order: step where known, then the checkpoint path naturally."""
    step = row.get("step")
    return (str(row.get("job")), step is None, step or 0, _natural(str(row.get("checkpoint"))), str(row.get("task_key")))


def _natural(text: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def _code(text) -> _Raw:
    return _Raw(f"<code>{_e(text)}</code>") if text else _Raw("—")


def _table(headers: list[str], rows: Iterable[list], numeric: Iterable[int] = ()) -> str:
    numeric = set(numeric)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{_e(c)}</td>' for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _mpl(text: str) -> str:
    """Text for a matplotlib title: ``$`` would start mathtext."""
    return str(text).replace("$", r"\$")


def _slug(*parts) -> str:
    text = "-".join(_ckpt_name(p) for p in parts if p)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60].strip("._-") or "x"


# ---------------------------------------------------------------- figures


class _Figures:
    """Writes PNGs under ``folder`` and returns their ``<figure>`` HTML (base64-embedded)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.written: list[Path] = []
        self.count = 0  # figures asked for (drawn or not): the number in each file name

    def add(self, kind: str, name_parts: tuple, caption: str, draw: Callable[[Path], Path]) -> str:
        path = self.folder / f"{kind}-{self.count:03d}-{_slug(*name_parts)}.png"
        self.count += 1
        try:
            path = Path(draw(path))
        except OSError:  # the output folder, not the record: stop
            plt.close("all")
            raise
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop the report; the page says why
            plt.close("all")
            first = str(exc).splitlines()[0] if str(exc) else ""
            return f'<p class="warn">Figure not drawn for {_e(caption)}: {_e(type(exc).__name__)}: {_e(first)}</p>'
        self.written.append(path)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
                f"<figcaption>{_e(caption)} <span class=meta>({_e(path.name)})</span></figcaption></figure>")

    def remove_stale(self) -> None:
        """Delete figures of an earlier report that this one did not write."""
        keep = {p.name for p in self.written}
        for old in self.folder.glob("*.png"):
            if _FIGURE_NAME.match(old.name) and old.name not in keep:
                old.unlink(missing_ok=True)


def _spectrum_png(row: dict, title: str, path: Path) -> Path:
    result = spectrum_from_row(row)
    if result is not None:
        return plot_density(result, path, title=_mpl(title))
    # No Ritz data: the stored density alone, on a log y axis as plot_density draws it.
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(floats(row["grid"]), floats(row["density"]), color="C0", lw=1.2)
    ax.set(yscale="log", xlabel="eigenvalue λ", ylabel="density (log scale)", title=_mpl(title))
    return save_png(fig, path)


def _barrier_png(rows: list[dict], title: str, path: Path) -> Path:
    results = {f"{r.get('path')} · {r.get('eval_set')}": barrier_from_row(r) for r in rows}
    return plot_barriers(results, path, title=_mpl(title))


def _surface_png(row: dict, title: str, path: Path) -> Path:
    return plot_surface(surface_from_row(row), path, title=_mpl(title))


def _eos_png(rows: list[dict], title: str, path: Path) -> Path:
    return plot_eos(eos_series_from_rows(rows), path, title=_mpl(title))


# ---------------------------------------------------------------- sections


def _by(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return groups


def _section_eigenvalues(rows, _figs) -> str:
    return _table(
        ["job", "checkpoint", "which", "eigenvalues", "residuals", "converged", "matvecs", "note", "options"],
        [[r["job"], _cell(r), r.get("which"), _values(r.get("eigenvalues")), _values(r.get("residuals")),
          r.get("converged"), r.get("num_matvecs"), r.get("note") or "", _code(r.get("probe_config"))] for r in rows],
        numeric=[6],
    )


def _section_trace(rows, _figs) -> str:
    return _table(
        ["job", "checkpoint", "method", "trace ± stderr", "matvecs", "options"],
        [[r["job"], _cell(r), r.get("method"), _pm(r.get("trace"), r.get("trace_stderr")),
          r.get("num_matvecs"), _code(r.get("probe_config"))] for r in rows],
        numeric=[3, 4],
    )


def _section_sharpness(rows, _figs) -> str:
    return _table(
        ["job", "checkpoint", "measure", "value ± stderr", "base loss", "perturbed loss", "parameters",
         "evaluations", "matvecs", "note"],
        [[r["job"], _cell(r), r.get("measure"), _pm(r.get("value"), r.get("stderr")),
          _num(r.get("base_loss")), _num(r.get("perturbed_loss")), _code(r.get("params")), r.get("num_evaluations"),
          r.get("num_matvecs"), r.get("note") or ""] for r in rows],
        numeric=[3, 4, 5, 7, 8],
    )


def _section_pacbayes(rows, _figs) -> str:
    return _table(
        ["job", "checkpoint", "variant", "σ* ± stderr", "target", "E ΔL ± stderr", "E error", "KL", "prior", "δ",
         "bound (kl⁻¹)", "bound (√)", "note"],
        [[r["job"], _cell(r), r.get("variant"), _pm(r.get("sigma"), r.get("sigma_stderr")),
          _num(r.get("target")), _pm(r.get("expected_loss_increase"), r.get("expected_loss_increase_stderr")),
          _pm(r.get("expected_error"), r.get("expected_error_stderr")), _num(r.get("kl")), r.get("prior") or "",
          _num(r.get("delta")), _num(r.get("bound")), _num(r.get("bound_sqrt")), r.get("note") or ""] for r in rows],
        numeric=[3, 4, 5, 6, 7, 9, 10, 11],
    )


def _section_noise(rows, _figs) -> str:
    return _table(
        ["job", "checkpoint", "‖∇L‖", "tr(Σ)", "noise scale", "η", "B", "temperature η/2B", "(η/4)‖∇L‖²",
         "(η/4B) tr(Σ)", "note"],
        [[r["job"], _cell(r), _num(r.get("grad_norm")), _num(r.get("noise_trace")),
          _num(r.get("noise_scale")), _num(r.get("lr")), r.get("batch_size"), _num(r.get("temperature")),
          _num(r.get("gd_regularizer")), _num(r.get("sgd_regularizer")), r.get("note") or ""] for r in rows],
        numeric=[2, 3, 4, 5, 6, 7, 8, 9],
    )


def _section_critical(rows, _figs) -> str:
    return _table(
        ["job", "checkpoint", "label", "‖∇L‖ (threshold)", "λ_min", "λ_max", "negative mass ± stderr (threshold)",
         "matvecs", "rule"],
        [[r["job"], _cell(r), r.get("label"),
          f"{_num(r.get('grad_norm'))} ({_num(r.get('grad_norm_threshold'))})", _num(r.get("lambda_min")),
          _num(r.get("lambda_max")),
          f"{_pm(r.get('negative_mass'), r.get('negative_mass_stderr'))} "
          f"({_num(r.get('negative_mass_threshold'))})",
          r.get("num_matvecs"), r.get("rule") or ""] for r in rows],
        numeric=[3, 4, 5, 6, 7],
    )


def _section_spectrum(rows, figs: _Figures) -> str:
    table = _table(
        ["job", "checkpoint", "runs", "σ", "λ_min (Ritz)", "λ_max (Ritz)", "negative mass", "reorth", "matvecs"],
        [[r["job"], _cell(r), len(r.get("ritz_values") or []), _num(r.get("sigma"), ".3g"),
          _num(r.get("lambda_min")), _num(r.get("lambda_max")), _pm(r.get("negative_mass"), r.get("negative_mass_stderr")),
          r.get("reorth"), r.get("num_matvecs")] for r in rows],
        numeric=[2, 3, 4, 5, 6, 8],
    )
    parts = [table]
    for r in rows:
        title = f"{r['job']} · {_label(r)}: SLQ density, σ={_num(r.get('sigma'), '.3g')}"
        parts.append(figs.add("spectrum", (r["job"], r["checkpoint"]), title, partial(_spectrum_png, r, title)))
    return "".join(parts)


def _section_barrier(rows, figs: _Figures) -> str:
    table = _table(
        ["job", "path", "eval set", "endpoint a", "endpoint b", "loss a", "loss b", "barrier height",
         "above line", "non-finite", "bend steps"],
        [[r["job"], r.get("path"), r.get("eval_set"), _ckpt(r.get("endpoint_a")), _ckpt(r.get("endpoint_b")),
          _num(r.get("loss_a")), _num(r.get("loss_b")), _num(r.get("barrier_height")), _num(r.get("barrier_above_line")),
          r.get("num_nonfinite"), r.get("train_steps")] for r in rows],
        numeric=[5, 6, 7, 8, 9, 10],
    )
    parts = [table]
    for (job, _key), group in _by(rows, "job", "task_key").items():
        a, b = group[0].get("endpoint_a"), group[0].get("endpoint_b")
        title = f"{job}: {_ckpt_name(a)} → {_ckpt_name(b)}"
        parts.append(figs.add("barrier", (job, b), title, partial(_barrier_png, group, title)))
    return "".join(parts)


def _section_surface(rows, figs: _Figures) -> str:
    def min_loss(r):
        finite = [x for x in floats(r.get("loss")) if math.isfinite(x)]
        return min(finite) if finite else None

    table = _table(
        ["job", "checkpoint", "dims", "directions", "normalization", "grid points", "min loss", "non-finite", "note"],
        [[r["job"], _cell(r), r.get("dims"), r.get("directions"), r.get("normalization"),
          len(r.get("loss") or []), _num(min_loss(r)), r.get("num_nonfinite"), r.get("note") or ""] for r in rows],
        numeric=[2, 5, 6, 7],
    )
    parts = [table]
    for r in rows:
        dims = 2 if r.get("beta") else 1
        title = (f"{r['job']} · {_label(r)}: {dims}-D surface, {r.get('directions')} directions, "
                 f"{r.get('normalization')} normalization")
        parts.append(figs.add("surface", (r["job"], r["checkpoint"], f"{dims}d"), title, partial(_surface_png, r, title)))
    return "".join(parts)


def _section_eos(rows, figs: _Figures) -> str:
    table = _table(
        ["job", "checkpoint", "step", "lr", "lr from", "optimizer", "λ_max", "threshold", "ratio", "converged", "note"],
        [[r["job"], _cell(r), r.get("step"), _num(r.get("lr")), r.get("lr_source"), r.get("optimizer"),
          _num(r.get("lambda_max")), _num(r.get("threshold")), _num(r.get("ratio"), ".3f"), r.get("converged"),
          r.get("note") or ""] for r in rows],
        numeric=[2, 3, 6, 7, 8],
    )
    parts = [table]
    for (job, optimizer, _momentum), group in _by(rows, "job", "optimizer", "momentum").items():
        latest: dict = {}  # one point per checkpoint content: the newest (audits re-run series)
        for r in sorted(group, key=lambda r: str(r.get("created_at"))):
            latest[r.get("checkpoint_sha256")] = r
        series = sorted(latest.values(), key=lambda r: (r.get("step") is None, r.get("step") or 0))
        title = f"{job}: edge of stability ({optimizer}, {len(series)} checkpoints)"
        parts.append(figs.add("eos", (job, optimizer), title, partial(_eos_png, series, title)))
    return "".join(parts)


_SECTIONS = {
    "eigenvalues": ("Top and bottom eigenvalues", _section_eigenvalues),
    "trace": ("Hessian trace", _section_trace),
    "sharpness": ("Sharpness", _section_sharpness),
    "spectrum": ("Spectral density (SLQ)", _section_spectrum),
    "barrier": ("Interpolation barriers", _section_barrier),
    "surface": ("Loss surfaces", _section_surface),
    "eos": ("Edge of stability", _section_eos),
    "pacbayes": ("PAC-Bayes flatness and bound", _section_pacbayes),
    "noise": ("Gradient noise", _section_noise),
    "critical": ("Critical points", _section_critical),
}


def _runs_section(runs: list[dict]) -> str:
    def summary(r) -> str:
        items = _run_failures(r)
        if not items:
            return ""
        first = items[0]
        reason = str(first.get("reason", ""))
        more = f" (+{len(items) - 1} more)" if len(items) > 1 else ""
        return f"{len(items)}: {first.get('kind') or 'job'}: {reason[:160]}{'…' if len(reason) > 160 else ''}{more}"

    def status(s) -> _Raw:
        return _Raw(f'<span class="{"ok" if s == "succeeded" else "bad"}">{_e(s)}</span>')

    rows = sorted(runs, key=lambda r: (str(r.get("job")), str(r.get("started_at"))))
    return _table(
        ["job", "run_id", "status", "started", "finished", "tasks", "done", "skipped", "failed", "restarts", "failures"],
        [[r["job"], _code(r.get("run_id")), status(r.get("status")), _time(r.get("started_at")), _time(r.get("finished_at")),
          r.get("num_tasks"), r.get("num_done"), r.get("num_skipped"), r.get("num_failed"), r.get("restarts"), summary(r)]
         for r in rows],
        numeric=[5, 6, 7, 8, 9],
    )


def _failures_section(failures: list[dict]) -> str:
    if not failures:
        return "<p class=ok>No failed tasks.</p>"
    return _table(
        ["job", "kind", "checkpoint", "category", "reason", "run_id", "from"],
        [[f.get("job"), f.get("kind") or "—", _ckpt(f.get("checkpoint")),
          f.get("category") or "", f.get("reason"), _code(f.get("run_id")), f.get("source")] for f in failures],
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
    the runs table, one section per probe kind present (tables, and figures for
    spectra, barriers, surfaces and edge-of-stability series) and the failed tasks
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

    body = [
        f"<h1>Loss-landscape report</h1><dl class=meta><dt>results folder</dt><dd><code>{_e(root)}</code></dd>",
        f"<dt>jobs</dt><dd>{len(jobs)}: {_e(', '.join(jobs))}</dd>",
        f"<dt>runs</dt><dd>{len(runs)}</dd>"
        f"<dt>result rows</dt><dd>{sum(len(v) for v in data.values())} ({_e(counts)})</dd>",
        f"<dt>failed tasks</dt><dd>{len(failures)}</dd>",
        f"<dt>generated</dt><dd>{_e(_time(dt.datetime.now(dt.UTC)))}</dd>",
        f"<dt>library</dt><dd>landscape-probe {_e(_version())}</dd></dl>",
        "<nav>" + "".join(f'<a href="#{k}">{_e(k)}</a>' for k in ["runs", *present, "failures"]) + "</nav>",
        '<section id="runs"><h2>Runs</h2>', _runs_section(runs) if runs else "<p>No runs rows.</p>", "</section>",
    ]
    for kind in present:
        heading, render = _SECTIONS[kind]
        rows = sorted(data[kind], key=_order)
        body += [f'<section id="{kind}"><h2>{_e(heading)} <small>({_e(kind)}, {len(rows)} rows)</small></h2>',
                 render(rows, figs), "</section>"]
    body += ['<section id="failures"><h2>Failed tasks</h2>', _failures_section(failures), "</section>"]

    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Loss-landscape report: {_e(root.name)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")
    index = out / "index.html"
    _write_atomic(index, page)
    figs.remove_stale()
    return index
