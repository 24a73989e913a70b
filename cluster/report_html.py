"""The report page's pieces: escaping and number formatting, table cells, the inline style
sheet, and the figures folder (PNG files embedded into the page as base64 URIs)."""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from cluster.checkpoints import CANONICAL_WEIGHTS
from cluster.figures import plot_density, plt, save_png
from cluster.plot_barrier import plot_barriers
from cluster.plot_eos import plot_eos
from cluster.plot_surface import plot_surface
from cluster.records import barrier_from_row, eos_series_from_rows, floats, spectrum_from_row, surface_from_row

MAX_LIST_ITEMS = 8  # list cells (eigenvalues, residuals) show this many entries, then "+N more"


_FIGURE_NAME = re.compile(r"^(spectrum|barrier|surface|eos|trend)-\d{3}-[A-Za-z0-9._-]*\.png$")


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
    return (
        str(row.get("job")),
        step is None,
        step or 0,
        _natural(str(row.get("checkpoint"))),
        str(row.get("task_key")),
    )


def _natural(text: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def _code(text) -> _Raw:
    return _Raw(f"<code>{_e(text)}</code>") if text else _Raw("—")


def _table(headers: list[str], rows: Iterable[list], numeric: Iterable[int] = ()) -> str:
    numeric = set(numeric)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if i in numeric else ''}>{_e(c)}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _mpl(text: str) -> str:
    """Text for a matplotlib title: ``$`` would start mathtext."""
    return str(text).replace("$", r"\$")


def _slug(*parts) -> str:
    text = "-".join(_ckpt_name(p) for p in parts if p)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60].strip("._-") or "x"


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
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)} <span class=meta>({_e(path.name)})</span></figcaption></figure>"
        )

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


def _by(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return groups
