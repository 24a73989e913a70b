"""The dashboard's "trends over training" panels plot λ_max, trace, EoS ratio, sharpness and
barrier height against the training step, one line per series.

A real Prometheus (Debian's) scrapes ``cluster.metrics.Metrics`` holding per-checkpoint
values of two series; each trend panel's own query runs against it as Grafana would send
it (instant, ``$series`` = all, ``$__range`` = 1h), and the panel's own transformations,
applied by :func:`grafana_transform` (a model of Grafana's merge, groupingToMatrix,
organize, convertFieldType and sortBy: no Grafana runs here), give one ascending ``step``
column and one column per line with exactly the values that were set. Steps that left
the exporter's window stay on the panel while they are inside the dashboard's range.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
from monitoring_files import dashboard_json
from services import query, ready, start_prometheus, stop, wait_for  # tests/services.py

import cluster.metrics
from cluster.metrics import STEP_WINDOW, Metrics, serve

QUANTITIES = {  # metric -> what the panel's title says it plots
    "landscape_probe_checkpoint_lambda_max": "λ_max",
    "landscape_probe_checkpoint_hessian_trace": "trace",
    "landscape_probe_checkpoint_eos_ratio": "Edge-of-stability",
    "landscape_probe_checkpoint_sharpness": "Sharpness",
    "landscape_probe_checkpoint_barrier_height": "barrier",
}
STEPS = (100, 200, 300, 400, 500)


def trend_panels() -> dict[str, dict]:
    panels = {}
    for p in dashboard_json()["panels"]:
        for metric in QUANTITIES:
            if any(metric in t["expr"] for t in p.get("targets", [])):
                panels[metric] = p
    return panels


def rows(step: int, scale: float) -> dict[str, list[dict]]:
    """Result rows of every kind the trend panels show, at ``step``."""
    x = scale * step
    return {
        "eigenvalues": [{"step": step, "which": "largest", "eigenvalues": [x, x / 2]}],
        "eos": [{"step": step, "optimizer": "gd", "lambda_max": x + 1, "ratio": x / 1000}],  # λ_max: eigenvalues wins
        "trace": [{"step": step, "trace": 10 * x}],
        "sharpness": [
            {"step": step, "measure": "sam", "steps": 1, "value": x / 10},
            {"step": step, "measure": "sam", "steps": 5, "value": x / 5},
        ],
        "barrier": [{"step": step, "eval_set": "probe", "path": "linear", "barrier_height": x / 100}],
    }


def expected(series: dict[str, float], steps=STEPS) -> dict[str, dict[str, dict[int, float]]]:
    """metric -> line -> step -> value, as the panels should draw it."""
    out: dict[str, dict[str, dict[int, float]]] = {m: {} for m in QUANTITIES}
    for name, scale in series.items():
        for step in steps:
            x = scale * step
            for metric, line, value in (
                ("landscape_probe_checkpoint_lambda_max", name, x),
                ("landscape_probe_checkpoint_hessian_trace", name, 10 * x),
                ("landscape_probe_checkpoint_eos_ratio", name, x / 1000),
                ("landscape_probe_checkpoint_sharpness", f"{name}/sam/1", x / 10),
                ("landscape_probe_checkpoint_sharpness", f"{name}/sam/5", x / 5),
                ("landscape_probe_checkpoint_barrier_height", f"{name}/linear", x / 100),
            ):
                out[metric].setdefault(line, {})[step] = value
    return out


def grafana_transform(panel: dict, result: list[dict]) -> dict[str, list]:
    """The panel's transformations over an instant table query's result (one row per series:
    its labels and ``Value``), as columns: a model of what Grafana hands the trend panel."""
    table = [{**r["metric"], "Value": float(r["value"][1])} for r in result]  # "merge": one frame
    columns: dict[str, list] = {}
    for t in panel["transformations"]:
        o = t["options"]
        if t["id"] == "merge":
            continue
        if t["id"] == "groupingToMatrix":
            row_values = list(dict.fromkeys(r[o["rowField"]] for r in table))
            col_values = list(dict.fromkeys(r[o["columnField"]] for r in table))
            cells = {(r[o["rowField"]], r[o["columnField"]]): r[o["valueField"]] for r in table}
            columns = {f"{o['rowField']}\\{o['columnField']}": row_values}
            for c in col_values:
                columns[c] = [cells.get((rv, c)) for rv in row_values]
        elif t["id"] == "organize":
            columns = {o.get("renameByName", {}).get(k, k): v for k, v in columns.items()}
        elif t["id"] == "convertFieldType":
            for c in o["conversions"]:
                assert c["destinationType"] == "number"
                columns[c["targetField"]] = [float(v) for v in columns[c["targetField"]]]
        elif t["id"] == "sortBy":
            (key,) = o["sort"]
            order = sorted(range(len(columns[key["field"]])), key=columns[key["field"]].__getitem__)
            order = order[::-1] if key.get("desc") else order
            columns = {k: [v[i] for i in order] for k, v in columns.items()}
        else:
            raise AssertionError(f"{panel['title']}: transformation {t['id']} is not modelled here")
    return columns


def test_each_quantity_has_a_trend_panel_over_the_training_step():
    panels = trend_panels()
    assert set(panels) == set(QUANTITIES), "a trend panel per quantity"
    for metric, panel in panels.items():
        assert QUANTITIES[metric] in panel["title"] and "training step" in panel["title"], panel["title"]
        assert panel["type"] == "trend" and panel["options"]["xField"] == "step", panel["title"]
        (target,) = panel["targets"]
        assert target["instant"] and target["format"] == "table", panel["title"]
        # every checkpoint scraped in the dashboard's range, one line per series (label_join)
        assert f'last_over_time({metric}{{series=~"$series"}}[$__range])' in target["expr"]
        assert target["expr"].startswith("label_join(") and '"line", "/", "series"' in target["expr"]
        ids = [t["id"] for t in panel["transformations"]]
        assert ids[:2] == ["merge", "groupingToMatrix"] and "convertFieldType" in ids and ids[-1] == "sortBy"


@pytest.fixture
def prometheus_scraping(tmp_path):
    """``(metrics, query, wait)``: a Metrics registry served on loopback, a function running an
    instant query on a real Prometheus that scrapes it every second, and a poll until a check holds."""
    metrics = Metrics()
    server, _ = serve(metrics, port=0)
    proc, base, log = start_prometheus(tmp_path, server.server_port)

    def wait(what: str, check) -> None:
        wait_for(what, check, 120, [(proc, log)])

    wait("Prometheus to be ready", lambda: ready(base))
    try:
        yield metrics, partial(query, base), wait
    finally:
        server.shutdown()
        stop(proc)


def panel_query(panel: dict) -> str:
    (target,) = panel["targets"]
    return target["expr"].replace("$series", ".*").replace("$__range", "1h")


def test_trend_panels_draw_the_values_of_each_step_from_a_real_prometheus(prometheus_scraping, monkeypatch):
    metrics, query, wait = prometheus_scraping
    series = {"run-a": 0.01, "run-b": 0.02}
    window = 3  # small, so the test also sees steps leave the exporter's window
    monkeypatch.setattr(cluster.metrics, "STEP_WINDOW", window)
    assert STEP_WINDOW > window
    for step in STEPS[:window]:
        for name, scale in series.items():
            for kind, kind_rows in rows(step, scale).items():
                metrics.checkpoint_values(name, kind, kind_rows)
    panels = trend_panels()
    first = panel_query(panels["landscape_probe_checkpoint_lambda_max"])
    wait("the first steps to be scraped", lambda: len(query(first)) == len(series) * window)
    for step in STEPS[window:]:  # two more steps: the two oldest leave the exporter
        for name, scale in series.items():
            for kind, kind_rows in rows(step, scale).items():
                metrics.checkpoint_values(name, kind, kind_rows)
    exported = {
        s.labels["step"]
        for m in metrics.registry.collect()
        for s in m.samples
        if s.name == "landscape_probe_checkpoint_lambda_max"
    }
    assert exported == {str(s) for s in STEPS[-window:]}  # bounded: the latest `window` steps only
    wait("the last step to be scraped", lambda: len(query(first)) == len(series) * len(STEPS))

    want = expected(series)
    for metric, panel in panels.items():
        columns = grafana_transform(panel, query(panel_query(panel)))
        assert columns.pop("step") == [float(s) for s in STEPS], panel["title"]  # x: ascending steps
        assert set(columns) == set(want[metric]), panel["title"]  # one line per series (and path/measure)
        for line, values in columns.items():
            got = dict(zip(STEPS, values, strict=True))
            assert all(math.isclose(got[s], v, rel_tol=1e-12) for s, v in want[metric][line].items()), (
                panel["title"],
                line,
            )
