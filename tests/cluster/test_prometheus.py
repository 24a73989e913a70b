"""A real Prometheus server (Debian's ``prometheus``) scrapes a running ``probe audit``;
the headline values it stores equal the Parquet rows. ``promtool`` lints the exposition.

``.ci/run`` installs the package; without it these tests fail, saying so.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from conftest import free_port  # tests/cluster/conftest.py
from safetensors.torch import save_file
from services import need, query, ready, start_prometheus, stop, wait_for  # tests/services.py

from cluster.store import ResultStore
from probe.models import digits_mlp


@pytest.fixture
def audited_folder(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    paths = []
    for step in (5, 20, 100):
        with torch.random.fork_rng():
            torch.manual_seed(step)
            model = digits_mlp(hidden=8)
        path = folder / f"step-{step}.safetensors"
        save_file(model.state_dict(), str(path), metadata={"lr": "0.5", "step": str(step)})
        paths.append(path)
    spec = {
        "name": "watched",
        "model": {"factory": "probe.models:digits_mlp", "kwargs": {"hidden": 8}, "checkpoints": [str(folder)]},
        "data": {"factory": "cluster.data:digits", "num_examples": 96, "batch_size": 48},
        "precision": "float64",
        "probes": [
            {"kind": "eigenvalues", "k": 1},
            {"kind": "trace", "matvecs": 12},
            {"kind": "eos"},
            {"kind": "barrier", "between": [str(paths[0]), str(paths[-1])], "points": 7},
        ],
        "output": {"path": str(tmp_path / "results")},
        "seed": 1,
    }
    spec_path = tmp_path / "watched.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    return spec_path, paths


def test_prometheus_scrapes_the_audit_and_its_headlines_equal_the_parquet_rows(tmp_path, audited_folder):
    spec_path, paths = audited_folder
    metrics_port = free_port()
    prom, base, prom_log = start_prometheus(tmp_path, metrics_port)  # scrapes the audit's endpoint once it is up
    audit_log = tmp_path / "audit.log"
    audit = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "audit",
            str(spec_path),
            "--every",
            "1h",
            "--metrics-port",
            str(metrics_port),
        ],
        stdout=open(audit_log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    procs = [(audit, audit_log), (prom, prom_log)]
    try:
        wait_for("Prometheus to be ready", lambda: ready(base), 60, procs)
        # a sample scraped after the first pass finished
        wait_for(
            "a scrape after the first audit pass",
            lambda: query(base, 'landscape_probe_audit_passes_total{job_name="watched",outcome="succeeded"} >= 1'),
            180,
            procs,
        )
        (up,) = query(base, 'up{job="landscape-probe"}')
        assert up["value"][1] == "1"
        # the audit's own endpoint stays on loopback
        assert "metrics at http://127.0.0.1:" in audit_log.read_text()

        store = ResultStore(tmp_path / "results")
        latest = str(paths[-1])
        eig = {r["checkpoint"]: r for r in store.read("eigenvalues").to_pylist()}
        tr = {r["checkpoint"]: r for r in store.read("trace").to_pylist()}
        eos = {r["checkpoint"]: r for r in store.read("eos").to_pylist()}
        (barrier,) = store.read("barrier").to_pylist()
        lam, lam_before = eig[latest]["eigenvalues"][0], eig[str(paths[-2])]["eigenvalues"][0]
        expected = {
            'landscape_probe_lambda_max{series="watched"}': lam,
            'landscape_probe_hessian_trace{series="watched"}': tr[latest]["trace"],
            'landscape_probe_eos_ratio{series="watched"}': eos[latest]["ratio"],
            'landscape_probe_barrier_height{series="watched",path="linear"}': barrier["barrier_height"],
            'landscape_probe_lambda_max_relative_change{series="watched"}': (lam - lam_before) / abs(lam_before),
            'landscape_probe_audit_checkpoints{job_name="watched"}': 3,
            'landscape_probe_audit_tasks_pending{job_name="watched"}': 0,
        }
        for expr, value in expected.items():
            (sample,) = query(base, expr)
            # exact: the exposition and the query API both print shortest round-trip decimals
            assert float(sample["value"][1]) == value, expr
        hvps = sum(float(s["value"][1]) for s in query(base, 'landscape_probe_hvp_total{job_name="watched"}'))
        stored = sum(
            r["num_matvecs"]
            for kind in ("eigenvalues", "trace", "eos", "barrier")
            for r in store.read(kind).to_pylist()
            if "num_matvecs" in r
        )
        assert hvps == stored
        tasks = query(base, 'sum(landscape_probe_tasks_total{job_name="watched",outcome="succeeded"})')
        assert float(tasks[0]["value"][1]) == 3 * 2 + 1 + 1
    finally:
        for p, _ in procs:
            stop(p)
    assert audit.returncode == 0, audit_log.read_text()[-3000:]
    assert "SIGTERM: stopping after this pass" in audit_log.read_text()


def test_promtool_accepts_the_exposition(tmp_path, audited_folder):
    """``promtool check metrics`` lints names, units, suffixes and help text of every family."""
    promtool = need("promtool", "prometheus")
    from prometheus_client import generate_latest

    from cluster.audit import Auditor
    from cluster.metrics import Metrics
    from cluster.spec import load_spec

    spec_path, _ = audited_folder
    metrics = Metrics()
    Auditor(load_spec(spec_path), metrics=metrics, progress=lambda m: None).run_pass()
    metrics.failure("watched", "bad_checkpoint")
    metrics.restarts.labels(job_name="watched").inc()
    text = generate_latest(metrics.registry)
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), (
        lint.stdout + lint.stderr
    ).decode()
