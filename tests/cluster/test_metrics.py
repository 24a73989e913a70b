"""Metrics of a job, scraped over HTTP on loopback and compared with its Parquet rows."""

from __future__ import annotations

import dataclasses
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.job import run_job
from cluster.metrics import FAILURE_REASONS, Metrics, serve
from cluster.spec import load_spec
from cluster.store import ResultStore


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def served():
    metrics = Metrics()
    server, _ = serve(metrics, port=0)
    yield metrics, server
    server.shutdown()


def test_endpoint_binds_to_loopback_by_default(served):
    _, server = served
    assert server.server_address[0] == "127.0.0.1"


def test_job_metrics_match_the_parquet_rows(make_spec, checkpoints, served):
    metrics, server = served
    spec = load_spec(make_spec(name="metered", probes=[{"kind": "eigenvalues", "k": 2}, {"kind": "trace", "matvecs": 12}]))
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, checkpoints=spec.model.checkpoints[:1]))
    summary = run_job(spec, backend="local", progress=lambda m: None, metrics=metrics)
    samples = scrape(server.server_port)
    store = ResultStore(summary.output)
    eig = store.read("eigenvalues").to_pylist()[0]
    tr = store.read("trace").to_pylist()[0]
    assert samples[("probe_lambda_max", (("series", "metered"),))] == pytest.approx(eig["eigenvalues"][0], rel=1e-12)
    assert samples[("probe_hessian_trace", (("series", "metered"),))] == pytest.approx(tr["trace"], rel=1e-12)
    ok = (("job_name", "metered"), ("kind", "eigenvalues"), ("outcome", "succeeded"))
    assert samples[("probe_tasks_total", ok)] == 1
    hvps = samples[("probe_hvp_total", (("job_name", "metered"), ("kind", "eigenvalues")))]
    assert hvps == eig["num_matvecs"]
    assert samples[("probe_tasks_planned", (("job_name", "metered"),))] == 2
    assert samples[("probe_tasks_done", (("job_name", "metered"),))] == 2
    # labels stay bounded: no path or hash ever becomes a label value
    values = {v for (_, labels), _ in samples.items() for _, v in labels}
    assert not any("/" in v or len(v) >= 40 for v in values)
    # a re-run counts the stored tasks as skipped
    run_job(spec, backend="local", progress=lambda m: None, metrics=metrics)
    skipped = (("job_name", "metered"), ("kind", "trace"), ("outcome", "skipped"))
    assert scrape(server.server_port)[("probe_tasks_total", skipped)] == 1


def test_failures_are_counted_by_a_bounded_reason(served):
    metrics, server = served
    metrics.task_failed("j", "trace", "checkpoint 'x.safetensors' is not a valid safetensors file")
    metrics.task_failed("j", "trace", "something unexpected")
    metrics.failure("j", "a reason nobody declared")
    samples = scrape(server.server_port)
    assert samples[("probe_failures_total", (("job_name", "j"), ("reason", "bad_checkpoint")))] == 1
    assert samples[("probe_failures_total", (("job_name", "j"), ("reason", "other")))] == 2
    reasons = {dict(labels).get("reason") for (name, labels) in samples if name == "probe_failures_total"}
    assert reasons <= set(FAILURE_REASONS)
