"""What the deploy tests need to read the monitoring manifests: their paths, the label and
metric names ``cluster.metrics`` declares, and the metric and label names a PromQL
expression uses (a small extractor, itself tested in ``test_monitoring.py``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.metrics import MetricWrapperBase

from cluster.metrics import PREFIX, Metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "landscape-probe.json"
# Non-probe metrics the rules may use: Prometheus's own scrape health.
PROMETHEUS_METRICS = {"up"}
# Labels Prometheus puts on every scraped series.
TARGET_LABELS = {"job", "instance"}
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2",
}


def load_yaml_docs(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# ------------------------------------------------------------- PromQL names


def declared_labels() -> dict[str, set[str]]:
    """Label names by sample name, for every metric of ``cluster.metrics.Metrics`` (counters
    expose ``_total``, histograms ``_bucket`` with ``le``, ``_sum`` and ``_count``), whether or
    not any series has been created yet."""
    metrics = [m for m in vars(Metrics()).values() if isinstance(m, MetricWrapperBase)]
    registered = {family.name for family in Metrics().registry.collect()}
    assert {m._name for m in metrics} == registered, "Metrics() registers metrics it does not keep as attributes"
    declared = {}
    for m in metrics:
        labels = set(m._labelnames)
        suffixes = {
            "counter": {"_total": labels, "_created": labels},
            "gauge": {"": labels},
            "histogram": {"_bucket": labels | {"le"}, "_sum": labels, "_count": labels, "_created": labels},
            "summary": {"": labels | {"quantile"}, "_sum": labels, "_count": labels, "_created": labels},
        }[m._type]
        declared.update({m._name + s: names for s, names in suffixes.items()})
    return declared


def sample_names(*, with_families: bool = False) -> set[str]:
    """Sample names the registry exposes; ``with_families`` adds histogram names as the
    exposition's TYPE lines spell them."""
    names = set(declared_labels())
    if with_families:
        names |= {n[: -len("_bucket")] for n in names if n.endswith("_bucket")}
    return names


def promql_metrics(expr: str) -> set[str]:
    """Metric names an expression selects (identifiers that are not functions, keywords,
    labels, durations or Grafana variables)."""
    s = re.sub(r"#[^\n]*", " ", expr)
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", s):
        if m.group(1).lower() not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def promql_labels(expr: str) -> list[tuple[str | None, set[str]]]:
    """(metric or None, label names) for each label matcher set and each by/without/on/
    ignoring clause of an expression (None: a clause, or a selector without a name)."""
    s = re.sub(r"#[^\n]*", " ", expr)
    found = []
    for m in re.finditer(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}", s):
        found.append((m.group(1), set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m.group(2)))))
    for m in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", s):
        found.append((None, {x.strip() for x in m.group(1).split(",") if x.strip()}))
    return found


def check_labels(where: str, expr: str, printed: set[str], declared: dict[str, set[str]]) -> list[str]:
    """Problems with the labels ``expr`` selects or groups by and those a template prints
    from its result: a landscape_probe_* metric's labels must be its own, not Prometheus's."""
    metrics = promql_metrics(expr)
    probe = {m for m in metrics if m.startswith(PREFIX)}
    own = set().union(*(declared.get(m, set()) for m in probe))
    allowed = own | ({"__name__"} | TARGET_LABELS if metrics - probe or not probe else set())
    problems = []
    for metric, labels in promql_labels(expr):
        if metric is not None and metric.startswith(PREFIX):
            bad = labels - declared.get(metric, set()) - {"__name__"}
        else:
            bad = labels - allowed - {"__name__"}
        problems += [f"{where}: label {label!r} is not one of {sorted(own or allowed)}" for label in sorted(bad)]
    problems += [
        f"{where}: prints label {label!r}, not one of {sorted(allowed)}" for label in sorted(printed - allowed)
    ]
    return problems


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml_docs(PROMETHEUS / "alerts.yml")[0]["groups"] for rule in group["rules"]]


def dashboard_json() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    d = dashboard_json()
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def label_values_selector(query: str) -> str:
    m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query.strip())
    return m.group(1) if m else query
