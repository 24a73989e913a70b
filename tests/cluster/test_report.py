"""``probe report``: a real results folder (every probe kind, a failed task, hostile strings)
rendered to PNGs and one self-contained HTML page, checked as text and in headless Chromium.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from chromium import browse, chromium, page_errors  # tests/cluster/chromium.py
from safetensors.torch import save_file

import cluster.report as report
from cluster.cli import main
from cluster.job import run_job
from cluster.report import REPORT_KINDS, write_report
from cluster.schema import SCHEMA_VERSION
from cluster.spec import load_spec
from cluster.store import ResultStore
from probe.models import digits_mlp

HOSTILE = "<script>alert(1)</script>"
HOSTILE_CKPT = "<img src=x onerror=alert(2)>.pt"
HOSTILE_REASON = "<b>boom</b> & \"quoted\" 'single'"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The fixture's figures: 2 spectra, 4 surfaces, 1 barrier task, 1 eos series, and 4 trends over its two
# checkpoints' steps (λ_max, trace, sharpness keskar, EoS ratio; the barrier has one step).
FIGURES = 12


def _spec(folder: Path, name: str, checkpoints: list[Path], probes: list[dict], output: Path) -> Path:
    spec = {
        "name": name,
        "model": {
            "factory": "probe.models:digits_mlp",
            "kwargs": {"hidden": 16},
            "checkpoints": [str(p) for p in checkpoints],
        },
        "data": {"factory": "cluster.data:digits", "num_examples": 128, "batch_size": 64},
        "precision": "float64",
        "probes": probes,
        "output": {"path": str(output)},
        "seed": 7,
    }
    path = folder / f"{name.replace(' ', '-')}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory, checkpoints):
    """One results folder: a job with every probe kind over two checkpoints, a job whose eos
    task fails (no learning rate), and hand-written rows whose strings are hostile HTML.
    """
    tmp = tmp_path_factory.mktemp("report")
    root = tmp / "results"
    probes = [
        {"kind": "eigenvalues", "k": 3},
        {"kind": "trace", "method": "hutchinson", "matvecs": 12},
        {"kind": "spectrum", "runs": 2, "steps": 15, "grid_points": 200},
        {"kind": "sharpness", "measures": ["lambda_max", "keskar"], "steps": 2},
        {
            "kind": "barrier",
            "between": [str(checkpoints[0]), str(checkpoints[1])],
            "path": ["linear", "bezier"],
            "points": 7,
            "train_steps": 3,
        },
        {"kind": "surface", "dims": 2, "resolution": 5},
        {"kind": "surface", "dims": 1, "resolution": 7},
        {"kind": "eos"},
        {"kind": "pacbayes", "samples": 4},
        {"kind": "noise", "batch_size": 16},
        {"kind": "critical", "runs": 2, "steps": 10},
    ]
    main_job = run_job(
        load_spec(_spec(tmp, "report-test", checkpoints, probes, root)), backend="local", progress=lambda m: None
    )
    assert main_job.ok, main_job.failures

    nolr = tmp / "nolr.safetensors"
    with torch.random.fork_rng():
        torch.manual_seed(3)
        save_file(digits_mlp(hidden=16).state_dict(), str(nolr))  # no "lr" in the metadata: eos fails
    failing = run_job(
        load_spec(_spec(tmp, "failing job", [nolr], [{"kind": "eos"}], root)), backend="local", progress=lambda m: None
    )
    assert failing.num_failed == 1

    now = datetime.now(UTC)
    ResultStore(root).write_run(
        {
            "run_id": "hostile0run",
            "job": HOSTILE,
            "started_at": now,
            "finished_at": now,
            "status": "failed",
            "num_tasks": 1,
            "num_done": 0,
            "num_skipped": 0,
            "num_failed": 1,
            "restarts": 0,
            "failures": json.dumps(
                [{"task": "k", "kind": "trace", "checkpoint": HOSTILE_CKPT, "reason": HOSTILE_REASON}]
            ),
            "spec": "{}",
            "versions": "{}",
            "schema_version": SCHEMA_VERSION,
        }
    )
    # The failures dataset's contract: at least job, kind, checkpoint, reason.
    folder = root / "failures" / f"job={quote(HOSTILE, safe='')}"
    folder.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "job": [HOSTILE],
                "kind": ["surface"],
                "checkpoint": [HOSTILE_CKPT],
                "reason": ["dataset says " + HOSTILE_REASON],
            }
        ),
        folder / "fail-hostile.parquet",
    )

    index = write_report(root)
    return SimpleNamespace(root=root, index=index, html=index.read_text(encoding="utf-8"), ckpts=checkpoints)


def _section(html: str, kind: str) -> str:
    match = re.search(rf'<section id="{kind}">(.*?)</section>', html, re.S)
    assert match, f"no section {kind!r} in the page"
    return match.group(1)


def _figures(results) -> list[Path]:
    return sorted((results.index.parent / "figures").glob("*.png"))


def test_index_is_written_under_results_report_with_a_header(results):
    assert results.index == results.root / "report" / "index.html"
    html = results.html
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert str(results.root) in html
    assert re.search(r"<dt>jobs</dt><dd>3:", html)  # report-test, failing job, the hostile one
    assert re.search(r"generated</dt><dd>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", html)
    assert "landscape-probe " in html
    assert not list(results.index.parent.glob(".*tmp*")), "temporary files left behind"


def test_a_section_per_kind_with_its_values(results):
    html = results.html
    for kind in REPORT_KINDS:
        assert f"({kind}, " in _section(html, kind)
    rows = {kind: ResultStore(results.root).read(kind).to_pylist() for kind in REPORT_KINDS}
    eig = _section(html, "eigenvalues")
    assert f"{rows['eigenvalues'][0]['eigenvalues'][0]:.5g}" in eig and "largest" in eig
    trace = _section(html, "trace")
    r = rows["trace"][0]
    assert f"{r['trace']:.6g} ± {r['trace_stderr']:.2g}" in trace
    sharp = _section(html, "sharpness")
    assert "keskar" in sharp and "lambda_max" in sharp
    assert all(f"{r['barrier_height']:.6g}" in _section(html, "barrier") for r in rows["barrier"])
    eos = _section(html, "eos")
    assert all(f"{r['lambda_max']:.6g}" in eos for r in rows["eos"])
    assert all(f"{r['sigma']:.6g} ± {r['sigma_stderr']:.2g}" in _section(html, "pacbayes") for r in rows["pacbayes"])
    assert all(f"{r['noise_trace']:.6g}" in _section(html, "noise") for r in rows["noise"])
    assert all(r["label"] in _section(html, "critical") for r in rows["critical"])
    runs = _section(html, "runs")
    assert "report-test" in runs and "succeeded" in runs and "failed" in runs


def test_figures_are_valid_pngs_one_per_spectrum_and_surface_and_one_per_barrier_task_and_series(results):
    from matplotlib.image import imread

    names = [p.name for p in _figures(results)]
    count = lambda kind: sum(n.startswith(kind + "-") for n in names)  # noqa: E731
    counts = tuple(count(k) for k in ("spectrum", "surface", "barrier", "eos", "trend"))
    assert counts == (2, 4, 1, 1, 4) and len(names) == FIGURES, names
    for path in _figures(results):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, path.name
        image = imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300
        rgb = image[..., :3]
        assert (rgb < 0.9).any(axis=-1).mean() > 0.02, f"{path.name} is nearly blank"
    assert "Figure not drawn" not in results.html


def test_trends_section_draws_each_quantity_over_both_checkpoints(results):
    trends = _section(results.html, "trends")
    alts = re.findall(r'<img\b[^>]*\balt="([^"]*)"', trends)
    assert [a.split(" against")[0] for a in alts] == [
        "λ_max",
        "trace",
        "sharpness: keskar",
        "EoS ratio",
    ]
    for definition in ("eigenvalues (Lanczos)", "sharpness (lambda_max measure)", "eos (gd)", "critical (Lanczos)"):
        assert f"<td>λ_max</td><td>report-test</td><td>{definition}</td><td class=num>2</td><td>0 … 100</td>" in trends
    # the barrier task is one row (at its second endpoint's step): a line, no figure
    assert "barrier height: one checkpoint only per series (step 100), no trend figure." in trends
    assert _section(results.html, "runs") and results.html.index('id="trends"') < results.html.index('id="eigenvalues"')


def test_page_is_self_contained_with_every_figure_embedded(results):
    html = results.html
    for needle in ('src="http', "src='http", "<link", "<script", "url(", "@import", "//fonts."):
        assert needle not in html, needle
    srcs = re.findall(r'<img\b[^>]*\bsrc="([^"]*)"', html)
    assert len(srcs) == len(_figures(results)) == FIGURES
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    assert embedded == {p.read_bytes() for p in _figures(results)}
    hrefs = re.findall(r'href="([^"]*)"', html)
    assert hrefs and all(h.startswith("#") for h in hrefs), hrefs


def test_strings_from_the_data_are_escaped(results):
    html = results.html
    assert HOSTILE not in html and "<img src=x" not in html and "<b>boom" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;boom&lt;/b&gt; &amp; &quot;quoted&quot; &#x27;single&#x27;" in html
    assert html.count("<img") == len(_figures(results))
    assert '"k": 3' not in html and "&quot;k&quot;: 3" in html  # probe_config JSON too


def test_failed_tasks_come_from_runs_rows_and_the_failures_dataset(results):
    failed = _section(results.html, "failures")
    assert "failing job" in failed and "set probes[eos].lr" in failed
    assert "dataset says &lt;b&gt;boom" in failed and "failures dataset" in failed
    assert failed.count("set probes[eos].lr") == 1, "a failure seen in both sources is listed once"
    files = (results.root / "failures").rglob("fail-*.parquet")
    stored = [r for f in files for r in pq.read_table(f).to_pylist() if r["job"] == "failing job"]
    for row in stored:  # jobs that write the failures dataset: its extra columns reach the page
        assert "runs, failures dataset" in failed and f"<td>{row['category']}</td>" in failed
    runs = _section(results.html, "runs")
    assert "1: eos: no learning rate" in runs


def test_an_interrupted_write_leaves_the_previous_page_and_no_partial_one(results, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert write_report(results.root, out) == out / "index.html"
    before = (out / "index.html").read_bytes()

    real_replace = os.replace

    def broken_replace(src, dst):  # the figures land; the page's final rename fails
        if Path(dst).name == "index.html":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(report.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(results.root, out)
    assert (out / "index.html").read_bytes() == before
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="disk full"):
        write_report(results.root, fresh)
    assert not (fresh / "index.html").exists()
    assert [p.name for p in fresh.iterdir() if p.is_file()] == [], "a temporary page was left behind"
    assert len(list((fresh / "figures").glob("*.png"))) == FIGURES


def test_a_record_that_cannot_be_drawn_is_reported_in_place_of_its_figure(results, tmp_path):
    root = tmp_path / "results"
    shutil.copytree(results.root, root, ignore=shutil.ignore_patterns("report"))
    row = next(r for r in ResultStore(root).read("surface").to_pylist() if r["beta"])
    row.update(task_key="broken", loss=row["loss"][:3])  # 3 values for a 5 x 5 grid
    ResultStore(root).write_result("surface", row)
    html = write_report(root).read_text(encoding="utf-8")
    assert len(re.findall(r"Figure not drawn for .*?RuntimeError: shape", html)) == 1
    assert html.count("<img") == FIGURES and len(list((root / "report" / "figures").glob("*.png"))) == FIGURES


def test_cli_report_exits_0_and_removes_stale_figures(results, tmp_path, capsys):
    out = tmp_path / "cli"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "surface-999-old.png").write_bytes(PNG_MAGIC)
    assert main(["report", str(results.root), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out / 'index.html'}"
    assert not (out / "figures" / "surface-999-old.png").exists()
    assert len(list((out / "figures").glob("*.png"))) == FIGURES


def test_missing_or_empty_folder_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["report", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("probe report: ") and str(missing) in err and "probe run SPEC" in err
    (tmp_path / "empty" / "runs").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no results found under .*empty.*; run `probe run SPEC` first"):
        write_report(tmp_path / "empty")
    assert not (tmp_path / "empty" / "report").exists()


def test_chromium_renders_the_page_with_its_figures(results, tmp_path):
    exe = chromium()
    shot = tmp_path / "shot.png"
    run = browse(
        exe,
        results.index,
        tmp_path / "profile1",
        f"--screenshot={shot}",
        "--window-size=1280,2400",
        "--hide-scrollbars",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert shot.is_file() and shot.read_bytes().startswith(PNG_MAGIC)
    assert page_errors(run.stderr) == []

    from matplotlib.image import imread

    rgb = (imread(shot)[..., :3] * 255).round().astype(np.int16)  # (2400, 1280, 3)
    assert rgb.shape[:2] == (2400, 1280)
    non_white = (rgb < 235).any(axis=-1).mean()
    colours = len(np.unique(rgb.reshape(-1, 3)[::7], axis=0))
    assert non_white > 0.05, f"only {non_white:.1%} of the screenshot is not white"
    assert colours > 200, f"only {colours} distinct colours: the figures did not render"
    # The first figures in view (trends over training, then spectral densities) draw their first line
    # in matplotlib's C0 blue (#1f77b4): nothing else on the page uses it, so it shows the embedded PNGs decoded.
    c0 = (np.abs(rgb - np.array([0x1F, 0x77, 0xB4])).max(axis=-1) <= 10).sum()
    assert c0 > 500, f"{c0} pixels of the density curve's colour: the embedded figures are not shown"

    dom = browse(exe, results.index, tmp_path / "profile2", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert page_errors(dom.stderr) == []
    imgs = re.findall(r"<img\b[^>]*>", dom.stdout)
    assert len(imgs) == FIGURES and all('src="data:image/png;base64,' in i for i in imgs)
    headings = re.findall(r"<h2>(.*?)</h2>", dom.stdout)
    for expected in (
        "Runs",
        "Trends over training",
        "Top and bottom eigenvalues",
        "Hessian trace",
        "Sharpness",
        "Spectral density",
        "Interpolation barriers",
        "Loss surfaces",
        "Edge of stability",
        "Failed tasks",
    ):
        assert any(h.startswith(expected) for h in headings), (expected, headings)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom.stdout and "<script" not in dom.stdout
