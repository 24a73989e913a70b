"""``probe audit --once`` pushes its metrics to a real Prometheus Pushgateway (Debian's
``prometheus-pushgateway``, installed by ``make system``): a completed pass replaces the
audit's group, a failed pass updates only its pass counter and time (the last completed
pass's time stays for the staleness alert), an unreachable gateway costs a warning line,
not the exit status, and ``--every`` refuses ``--pushgateway``.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import yaml
from checkpoint_files import save_step  # tests/cluster/checkpoint_files.py
from conftest import free_port  # tests/cluster/conftest.py
from prometheus_client.parser import text_string_to_metric_families
from services import ready, start_pushgateway, stop, wait_for  # tests/services.py

from cluster.cli import main
from cluster.metrics import PUSH_JOB, build_labels
from cluster.store import ResultStore

NAME = "pushed"


def write_spec(tmp_path: Path, folder: Path, results: Path) -> Path:
    spec = {
        "name": NAME,
        "model": {"factory": "probe.models:digits_mlp", "kwargs": {"hidden": 8}, "checkpoints": [str(folder)]},
        "data": {"factory": "cluster.data:digits", "num_examples": 96, "batch_size": 48},
        "precision": "float64",
        "probes": [{"kind": "eigenvalues", "k": 1}, {"kind": "trace", "matvecs": 12}],
        "output": {"path": str(results)},
        "seed": 3,
    }
    path = tmp_path / f"{NAME}-{results.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def pushgateway(tmp_path):
    proc, url, log = start_pushgateway(tmp_path)
    try:
        wait_for("the Pushgateway to be ready", lambda: ready(url), 60, [(proc, log)])
        yield url
    finally:
        stop(proc)


def gateway_samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What Prometheus would scrape from the Pushgateway: our families, keyed by name and labels."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("landscape_probe_")
    }


def groups(url: str) -> list[dict]:
    """The Pushgateway's groups (its API): their grouping labels and metric names."""
    with urllib.request.urlopen(f"{url}/api/v1/metrics", timeout=5) as r:
        reply = json.load(r)
    assert reply["status"] == "success", reply
    return [
        {"labels": g["labels"], "names": {k for k in g if k not in ("labels", "push_time_seconds")}}
        for g in reply["data"]
    ]


def pick(samples: dict, name: str, **labels: str) -> dict[tuple, float]:
    return {k: v for k, v in samples.items() if k[0] == name and labels.items() <= dict(k[1]).items()}


def test_once_audit_pushes_to_a_real_pushgateway(tmp_path, pushgateway, capsys):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in (10, 20, 30):
        save_step(folder, step, hidden=8)
    results = tmp_path / "results"
    spec_path = write_spec(tmp_path, folder, results)

    assert main(["audit", str(spec_path), "--once", "--pushgateway", pushgateway]) == 0
    assert f"metrics pushed to {pushgateway} (job={PUSH_JOB}, audit={NAME})" in capsys.readouterr().err

    (group,) = groups(pushgateway)
    assert group["labels"] == {"job": PUSH_JOB, "audit": NAME}  # the grouping key
    assert {
        "landscape_probe_build_info",
        "landscape_probe_audit_passes_total",
        "landscape_probe_audit_last_success_timestamp_seconds",
        "landscape_probe_lambda_max",
        "landscape_probe_checkpoint_lambda_max",
        "landscape_probe_checkpoint_hessian_trace",
    } <= group["names"]
    samples = gateway_samples(pushgateway)
    key = {"job": PUSH_JOB, "audit": NAME}
    assert pick(samples, "landscape_probe_audit_passes_total", **key, job_name=NAME, outcome="succeeded")
    assert list(pick(samples, "landscape_probe_audit_passes_total", **key).values()) == [1.0]
    assert list(pick(samples, "landscape_probe_audit_checkpoints", **key, job_name=NAME).values()) == [3.0]
    (info,) = pick(samples, "landscape_probe_build_info", **key)
    assert {k: v for k, v in info[1] if k in build_labels()} == build_labels() and samples[info] == 1.0
    # the per-step gauges hold the stored rows, one per training step
    store = ResultStore(results)
    eig = {r["step"]: r["eigenvalues"][0] for r in store.read("eigenvalues").to_pylist()}
    trace = {r["step"]: r["trace"] for r in store.read("trace").to_pylist()}
    assert sorted(eig) == sorted(trace) == [10, 20, 30]
    for name, stored in (
        ("landscape_probe_checkpoint_lambda_max", eig),
        ("landscape_probe_checkpoint_hessian_trace", trace),
    ):
        pushed = {int(dict(k[1])["step"]): v for k, v in pick(samples, name, **key, series=NAME).items()}
        assert pushed == stored, name
    last_success = pick(samples, "landscape_probe_audit_last_success_timestamp_seconds", **key)
    assert len(last_success) == 1

    # A failed pass (the results folder is a file) pushes its counter and time only: the group
    # keeps the last completed pass's time, which ProbeAuditStale reads.
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the results folder should be")
    failing = write_spec(tmp_path, folder, blocked)
    assert main(["audit", str(failing), "--once", "--pushgateway", pushgateway]) != 0
    after = gateway_samples(pushgateway)
    passes = pick(after, "landscape_probe_audit_passes_total", **key)
    assert {dict(k[1])["outcome"]: v for k, v in passes.items()} == {"failed": 1.0}
    assert pick(after, "landscape_probe_audit_last_success_timestamp_seconds", **key) == last_success
    (last_pass,) = pick(after, "landscape_probe_audit_last_pass_timestamp_seconds", **key).values()
    assert last_pass > next(iter(last_success.values()))
    assert pick(after, "landscape_probe_checkpoint_lambda_max", **key) == pick(
        samples, "landscape_probe_checkpoint_lambda_max", **key
    )


def test_an_unreachable_pushgateway_costs_a_warning_not_the_exit_status(tmp_path, capsys):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    save_step(folder, 5, hidden=8)
    spec_path = write_spec(tmp_path, folder, tmp_path / "results")
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert main(["audit", str(spec_path), "--once", "--pushgateway", nowhere]) == 0
    err = capsys.readouterr().err
    assert f"probe audit: warning: could not push metrics to the Pushgateway {nowhere}:" in err
    assert ResultStore(tmp_path / "results").read("trace").num_rows == 1  # the results are stored


def test_the_environment_names_the_pushgateway_and_every_refuses_it(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    save_step(folder, 5, hidden=8)
    spec_path = write_spec(tmp_path, folder, tmp_path / "results")
    nowhere = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("PROMETHEUS_PUSHGATEWAY", nowhere)
    assert main(["audit", str(spec_path), "--once"]) == 0
    assert f"could not push metrics to the Pushgateway {nowhere}" in capsys.readouterr().err
    assert main(["audit", str(spec_path), "--every", "1h", "--pushgateway", nowhere]) == 2
    err = capsys.readouterr().err
    assert f"--pushgateway {nowhere}: only --once audits push" in err and "drop --pushgateway" in err
