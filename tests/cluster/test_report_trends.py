"""``probe report``'s trends over training: a real five-checkpoint training run probed by a local
job, rendered by the CLI, its λ_max-against-step figure checked as data, as a PNG and in headless
Chromium; and the series rules (newest row per checkpoint, probes told apart by their options,
rows without a step counted, one checkpoint only: no figure) on rows read back from Parquet.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from chromium import browse, chromium, page_errors  # tests/cluster/chromium.py
from safetensors.torch import save_file

from cluster.cli import main
from cluster.data import digits_tensors
from cluster.job import run_job
from cluster.plot_trends import TrendSeries
from cluster.report_data import read_rows
from cluster.report_html import _Figures
from cluster.report_trends import TREND_KINDS, trend_series, trends_section
from cluster.spec import load_spec
from cluster.store import ResultStore
from probe.models import digits_mlp

STEPS = (0, 20, 40, 60, 80)
LR = 0.5
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train(folder: Path) -> list[Path]:
    """Full-batch SGD on 256 digits, a checkpoint (``step-N.safetensors``, lr and step in the
    metadata) at each of STEPS: one training run, as a trainer would leave it."""
    folder.mkdir(parents=True)
    x, y = digits_tensors(split="train")
    x, y = x[:256], y[:256]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits_mlp(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    paths = []
    for step in range(STEPS[-1] + 1):
        if step in STEPS:
            path = folder / f"step-{step}.safetensors"
            save_file(model.state_dict(), str(path), metadata={"lr": str(LR), "step": str(step)})
            paths.append(path)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return paths


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trends")
    ckpts = _train(tmp / "run")
    root = tmp / "results"
    spec = {
        "name": "trend-run",
        "model": {"factory": "probe.models:digits_mlp", "kwargs": {"hidden": 8}, "checkpoints": [str(tmp / "run")]},
        "data": {"factory": "cluster.data:digits", "num_examples": 128, "batch_size": 64},
        "precision": "float64",
        "probes": [
            {"kind": "eigenvalues", "k": 1, "tol": 1e-3},
            {"kind": "trace", "method": "hutchinson", "matvecs": 8},
            {"kind": "barrier", "between": [str(ckpts[0]), str(ckpts[-1])], "points": 5},
        ],
        "output": {"path": str(root)},
        "seed": 3,
    }
    path = tmp / "trend-run.yaml"
    path.write_text(yaml.safe_dump(spec))
    summary = run_job(load_spec(path), backend="local", progress=lambda m: None)
    assert summary.ok, summary.failures
    out = tmp / "report"
    assert main(["report", str(root), "--out", str(out)]) == 0
    index = out / "index.html"
    return SimpleNamespace(root=root, ckpts=ckpts, index=index, html=index.read_text(encoding="utf-8"))


def _data(root: Path) -> dict[str, list[dict]]:
    return {kind: read_rows(root, kind) for kind in TREND_KINDS}


def _one(series: list[TrendSeries], quantity: str) -> TrendSeries:
    found = [s for s in series if s.quantity == quantity]
    assert len(found) == 1, [(s.quantity, s.definition) for s in series]
    return found[0]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR", path.name
    return struct.unpack(">II", data[16:24])


def _lambda_png(run) -> Path:
    pngs = sorted((run.index.parent / "figures").glob("trend-*-lambda_max.png"))
    assert len(pngs) == 1, pngs
    return pngs[0]


def test_lambda_max_series_has_a_point_per_checkpoint_in_step_order_with_the_stored_values(run):
    series = trend_series(_data(run.root))
    lam = _one(series, "λ_max")
    assert (lam.job, lam.definition) == ("trend-run", "eigenvalues (Lanczos)")
    assert lam.steps == list(STEPS)
    assert [p.checkpoint for p in lam.points] == [f"step-{s}.safetensors" for s in STEPS]
    stored = {r["step"]: r["eigenvalues"][0] for r in ResultStore(run.root).read("eigenvalues").to_pylist()}
    assert lam.values == [stored[s] for s in STEPS]
    assert len(set(lam.values)) == len(STEPS) and all(v > 0 for v in lam.values)  # training moved the curvature
    trace = _one(series, "trace")
    assert trace.steps == list(STEPS) and all(p.stderr is not None and p.stderr > 0 for p in trace.points)
    barrier = _one(series, "barrier height")  # one task between the first and last checkpoint
    assert barrier.steps == [STEPS[-1]] and barrier.definition == "linear path, probe set"


def test_report_writes_the_lambda_max_png_and_embeds_it_in_the_trends_section(run):
    png = _lambda_png(run)
    width, height = _png_size(png)
    assert width > 400 and height > 250
    from matplotlib.image import imread

    rgb = imread(png)[..., :3]
    assert (rgb < 0.9).any(axis=-1).mean() > 0.02, "the λ_max figure is nearly blank"
    section = re.search(r'<section id="trends">(.*?)</section>', run.html, re.S)
    assert section, "no trends section"
    body = section.group(1)
    assert 'href="#trends"' in run.html
    assert len(re.findall(r"<img\b", body)) == 2  # λ_max and trace; the barrier has one checkpoint
    assert png.name in body
    # the one-checkpoint quantity: one line instead of a figure
    notes = re.findall(r'<p class="meta trend-note">(.*?)</p>', body)
    assert notes == ["barrier height: one checkpoint only per series (step 80), no trend figure."]
    assert "<td>trend-run</td><td>eigenvalues (Lanczos)</td><td class=num>5</td><td>0 … 80</td>" in body


# Added to a copy of the page (the report itself has no script): after load, each image's
# state as JSON in a <pre>, for --dump-dom to print.
_IMAGE_STATE = """<script>addEventListener("load", () => {
  const state = [...document.images].map(i => ({alt: i.alt, complete: i.complete,
    width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().width}));
  const pre = document.createElement("pre"); pre.id = "image-state";
  pre.textContent = JSON.stringify(state); document.body.append(pre);
});</script>"""


def test_chromium_loads_and_renders_the_lambda_max_figure(run, tmp_path):
    exe = chromium()
    page = tmp_path / "page" / "index.html"
    page.parent.mkdir()
    page.write_text(run.html.replace("</body>", _IMAGE_STATE + "</body>"), encoding="utf-8")
    dom = browse(exe, page, tmp_path / "profile", "--dump-dom", "--window-size=1280,2000")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert page_errors(dom.stderr) == []
    found = re.search(r'<pre id="image-state">(.*?)</pre>', dom.stdout, re.S)
    assert found, "the load handler did not run: " + dom.stdout[-500:]
    state = json.loads(html.unescape(found.group(1)))
    lam = [s for s in state if s["alt"].startswith("λ_max against training step")]
    assert len(lam) == 1, [s["alt"] for s in state]
    assert lam[0]["complete"] and (lam[0]["width"], lam[0]["height"]) == _png_size(_lambda_png(run))
    assert lam[0]["shown"] > 300, "the figure takes no room on the page"
    assert all(s["complete"] and s["width"] > 0 for s in state), state
    headings = re.findall(r"<h2>(.*?)</h2>", dom.stdout)
    assert headings[:2] == ["Runs", "Trends over training"], headings


def _row(**kw) -> dict:
    base = {
        "job": "j",
        "checkpoint": "run/step-1.safetensors",
        "checkpoint_name": "step-1.safetensors",
        "which": "largest",
        "probe_config": json.dumps({"k": 1, "which": "largest"}),
        "created_at": datetime(2025, 1, 1, tzinfo=UTC),
    }
    return {**base, **kw}


def test_series_rules_on_rows_read_back_from_parquet(run, tmp_path):
    """Newest row per checkpoint, probes told apart by their options, rows without a step counted."""
    root = tmp_path / "results"
    shutil.copytree(run.root, root)
    store = ResultStore(root)
    rows = store.read("eigenvalues").to_pylist()
    later = datetime.now(UTC) + timedelta(days=1)
    # an audit re-measured step 40: its newer row wins
    redo = {**next(r for r in rows if r["step"] == 40), "task_key": "redo40", "eigenvalues": [123.0]}
    redo["created_at"] = later
    # a second eigenvalues probe with other options (k=2) at two steps: its own series
    other = [
        {**r, "task_key": f"k2-{r['step']}", "probe_config": json.dumps({**json.loads(r["probe_config"]), "k": 2})}
        for r in rows
        if r["step"] in (0, 80)
    ]
    nostep = {**rows[0], "task_key": "nostep", "step": None}
    for r in [redo, *other, nostep]:
        store.write_result("eigenvalues", r)

    data = _data(root)
    lam = [s for s in trend_series(data) if s.quantity == "λ_max"]
    assert [(s.definition, s.steps) for s in lam] == [
        ("eigenvalues (Lanczos) [k=1]", list(STEPS)),
        ("eigenvalues (Lanczos) [k=2]", [0, 80]),
    ]
    assert lam[0].values[STEPS.index(40)] == 123.0
    body = trends_section(data, _Figures(tmp_path / "figures")) or ""
    assert "λ_max: 1 result rows have no training step" in body
    assert len(list((tmp_path / "figures").glob("trend-*-lambda_max.png"))) == 1

    one = trends_section({"eigenvalues": [_row(step=7, eigenvalues=[2.0])]}, _Figures(tmp_path / "f2"))
    assert one is not None and "λ_max: one checkpoint only per series (step 7), no trend figure." in one
    assert "<img" not in one and not (tmp_path / "f2").exists()
    assert trends_section({"surface": [_row(step=1)]}, _Figures(tmp_path / "f3")) is None
