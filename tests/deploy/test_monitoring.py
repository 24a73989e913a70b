"""The monitoring manifests under ``deploy/`` agree with the metrics the project exports.

- Every metric name in the alert rules, their tests, the scrape config and the
  Grafana dashboard is a sample name of ``cluster.metrics.Metrics().registry``, and
  every label they select, group by or print is one that metric declares.
- The alert rules cover staleness, stability (the EoS ratio), λ_max jumps and
  failures; the dashboard is well formed and has a panel on each headline metric.
- ``promtool`` checks the rules and config and runs the rule unit tests.

The Kubernetes, Ray and CLI side of ``deploy/`` is checked in ``test_manifests.py``.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from monitoring_files import (
    DASHBOARD,
    PREFIX,
    PROMETHEUS,
    PROMETHEUS_METRICS,
    TARGET_LABELS,
    alert_rules,
    check_labels,
    dashboard_exprs,
    dashboard_json,
    declared_labels,
    label_values_selector,
    load_yaml_docs,
    promql_labels,
    promql_metrics,
    sample_names,
)
from services import need  # tests/services.py


def test_metric_names_are_declared_in_cluster_metrics():
    declared = sample_names() | PROMETHEUS_METRICS
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        used.setdefault(f"alerts.yml:{rule['alert']}", set()).update(promql_metrics(rule["expr"]))
    tests = load_yaml_docs(PROMETHEUS / "alerts_test.yml")[0]
    for case in tests["tests"]:
        for series in case.get("input_series", []):
            used.setdefault("alerts_test.yml", set()).update(promql_metrics(series["series"]))
    for expr in dashboard_exprs():
        used.setdefault(DASHBOARD.name, set()).update(promql_metrics(label_values_selector(expr)))
    unknown = {where: sorted(names - declared) for where, names in used.items() if names - declared}
    # Names written anywhere else (annotations, regexes in label matchers, descriptions).
    in_text = sample_names(with_families=True)
    for path in (PROMETHEUS / "alerts.yml", PROMETHEUS / "alerts_test.yml", PROMETHEUS / "prometheus.yml", DASHBOARD):
        names = set(re.findall(r"(?<![\w-])landscape_probe_[a-z0-9_]+", path.read_text()))
        if names - in_text:
            unknown[f"{path.name} (text)"] = sorted(names - in_text)
    assert not unknown, f"metric names not exposed by cluster.metrics.Metrics: {unknown}"
    assert used[DASHBOARD.name] and all(used[f"alerts.yml:{r['alert']}"] for r in alert_rules())


def test_labels_are_declared_in_cluster_metrics():
    declared = declared_labels()
    problems = []
    for rule in alert_rules():
        printed = set(re.findall(r"\$labels\.(\w+)", json.dumps(rule.get("annotations", {}))))
        problems += check_labels(f"alerts.yml:{rule['alert']}", rule["expr"], printed, declared)
    for panel in dashboard_json()["panels"]:
        for target in panel.get("targets", []):
            printed = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            problems += check_labels(f"{DASHBOARD.name}:{panel['title']}", target["expr"], printed, declared)
    for var in dashboard_json()["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q.strip())
            assert m, f"{DASHBOARD.name}: variable {var['name']} is not label_values(SELECTOR, LABEL)"
            names = promql_metrics(m.group(1)) or set(re.findall(r"landscape_probe_\w+", m.group(1)))
            lacking = [n for n in names if m.group(2) not in declared.get(n, set())]
            assert not lacking, (
                f"{DASHBOARD.name}: variable {var['name']} reads label {m.group(2)!r} that {lacking} lack"
            )
    for case in load_yaml_docs(PROMETHEUS / "alerts_test.yml")[0]["tests"]:
        for series in case.get("input_series", []):
            ((metric, labels),) = promql_labels(series["series"])
            if metric.startswith(PREFIX):
                extra = labels - declared.get(metric, set()) - TARGET_LABELS
                problems += [f"alerts_test.yml: {metric} has no label {label!r}" for label in sorted(extra)]
    assert not problems, "\n".join(problems)


def test_promql_name_extraction_catches_a_wrong_name():
    # The check above is only as good as this extractor.
    declared = sample_names()
    assert promql_metrics(
        'sum by (le, kind) (rate(landscape_probe_task_duration_seconds_bucket{job=~"$job"}[1h]))'
    ) == {"landscape_probe_task_duration_seconds_bucket"}
    assert promql_metrics("time() - landscape_probe_audit_last_success_timestamp_seconds > 5400") == {
        "landscape_probe_audit_last_success_timestamp_seconds"
    }
    assert promql_metrics(
        "increase(landscape_probe_failures_total[1h]) > 0"
        " or (landscape_probe_failures_total unless landscape_probe_failures_total offset 1h)"
    ) == {"landscape_probe_failures_total"}
    for wrong in (
        "landscape_probe_eos_ratios > 1.1",
        "rate(landscape_probe_tasks[5m])",
        "landscape_probe_task_duration_seconds > 1",
        "probe_eos_ratio > 1.1",  # the old prefix: the blackbox exporter's namespace
    ):
        assert promql_metrics(wrong) - declared, wrong


def test_alert_rules_watch_staleness_stability_jumps_and_failures():
    exprs = {rule["alert"]: " ".join(rule["expr"].split()) for rule in alert_rules()}
    assert any("landscape_probe_eos_ratio > 1.1" in e for e in exprs.values())
    assert any(re.search(r"abs\(landscape_probe_lambda_max_relative_change\) > 0\.\d+", e) for e in exprs.values())
    assert any("increase(landscape_probe_failures_total[1h]) > 0" in e for e in exprs.values())
    for rule in alert_rules():
        assert rule.get("labels", {}).get("severity") and rule.get("annotations", {}).get("summary"), rule["alert"]


def test_dashboard_structure():
    d = dashboard_json()
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in d["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    exprs = " ".join(dashboard_exprs())
    for needed in (
        "landscape_probe_lambda_max",
        "landscape_probe_hessian_trace",
        "landscape_probe_eos_ratio",
        "landscape_probe_barrier_height",
        "landscape_probe_tasks_total",
        "landscape_probe_failures_total",
        "landscape_probe_hvp_total",
        "landscape_probe_task_duration_seconds_bucket",
        "landscape_probe_audit_last_pass_timestamp_seconds",
        # trends over training (test_trend_panels.py)
        "landscape_probe_checkpoint_lambda_max",
        "landscape_probe_checkpoint_hessian_trace",
        "landscape_probe_checkpoint_eos_ratio",
        "landscape_probe_checkpoint_sharpness",
        "landscape_probe_checkpoint_barrier_height",
    ):
        assert re.search(rf"\b{needed}\b", exprs), f"the dashboard has no panel on {needed}"
    assert "histogram_quantile(" in exprs
    eos = next(p for p in d["panels"] if any("landscape_probe_eos_ratio" in t["expr"] for t in p.get("targets", [])))
    steps = eos["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert any(s["value"] == 1.0 for s in steps), "the EoS panel needs its 1.0 threshold"
    assert eos["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off"


@pytest.mark.parametrize(
    "args",
    [
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts_test.yml"),
        ("check", "config", "prometheus.yml"),
    ],
    ids=" ".join,
)
def test_promtool(args):
    result = subprocess.run(
        [need("promtool", "prometheus"), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
