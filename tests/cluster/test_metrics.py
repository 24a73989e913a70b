"""Metrics of a job, scraped over HTTP on loopback and compared with its Parquet rows."""

from __future__ import annotations

import dataclasses

import pytest
from scraping import scrape  # tests/cluster/scraping.py

from cluster.job import run_job
from cluster.metrics import FAILURE_REASONS, Metrics, serve
from cluster.spec import load_spec
from cluster.store import ResultStore


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
    spec = load_spec(
        make_spec(name="metered", probes=[{"kind": "eigenvalues", "k": 2}, {"kind": "trace", "matvecs": 12}])
    )
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, checkpoints=spec.model.checkpoints[:1]))
    summary = run_job(spec, backend="local", progress=lambda m: None, metrics=metrics)
    samples = scrape(server.server_port)
    store = ResultStore(summary.output)
    eig = store.read("eigenvalues").to_pylist()[0]
    tr = store.read("trace").to_pylist()[0]
    lam = samples[("landscape_probe_lambda_max", (("series", "metered"),))]
    assert lam == pytest.approx(eig["eigenvalues"][0], rel=1e-12)
    assert samples[("landscape_probe_hessian_trace", (("series", "metered"),))] == pytest.approx(tr["trace"], rel=1e-12)
    ok = (("job_name", "metered"), ("kind", "eigenvalues"), ("outcome", "succeeded"))
    assert samples[("landscape_probe_tasks_total", ok)] == 1
    hvps = samples[("landscape_probe_hvp_total", (("job_name", "metered"), ("kind", "eigenvalues")))]
    assert hvps == eig["num_matvecs"]
    assert samples[("landscape_probe_tasks_planned", (("job_name", "metered"),))] == 2
    assert samples[("landscape_probe_tasks_done", (("job_name", "metered"),))] == 2
    # labels stay bounded: no path or hash ever becomes a label value
    # (build_info's revision is the checkout's commit: one value per process, not per checkpoint)
    values = {v for (name, labels), _ in samples.items() if name != "landscape_probe_build_info" for _, v in labels}
    assert not any("/" in v or len(v) >= 40 for v in values)
    # a re-run counts the stored tasks as skipped
    run_job(spec, backend="local", progress=lambda m: None, metrics=metrics)
    skipped = (("job_name", "metered"), ("kind", "trace"), ("outcome", "skipped"))
    assert scrape(server.server_port)[("landscape_probe_tasks_total", skipped)] == 1


def test_failures_are_counted_by_a_bounded_reason(served):
    metrics, server = served
    from cluster.checkpoints import CheckpointError
    from cluster.errors import category_of

    # the category is the error's type, not words in its message
    metrics.task_failed("j", "trace", category_of(CheckpointError("a file that cannot be used")))
    metrics.task_failed("j", "trace", category_of(RuntimeError("checkpoint 'x' is not a valid safetensors file")))
    metrics.failure("j", "a reason nobody declared")
    samples = scrape(server.server_port)
    assert samples[("landscape_probe_failures_total", (("job_name", "j"), ("reason", "bad_checkpoint")))] == 1
    assert samples[("landscape_probe_failures_total", (("job_name", "j"), ("reason", "other")))] == 2
    reasons = {dict(labels).get("reason") for (name, labels) in samples if name == "landscape_probe_failures_total"}
    assert reasons <= set(FAILURE_REASONS)


def _gauge(metrics: Metrics, name: str, series: str = "s") -> float | None:
    return metrics.registry.get_sample_value(name, {"series": series})


def _succeeded(metrics: Metrics, kind: str, rows: list[dict]) -> None:
    metrics.task_succeeded("s", kind, rows, duration_s=1.0, num_matvecs=0, timestamp_s=0.0)


def _eos_row(checkpoint: str, step: int, lam: float, optimizer: str) -> dict:
    return {
        "checkpoint": checkpoint,
        "checkpoint_name": checkpoint,
        "step": step,
        "optimizer": optimizer,
        "lambda_max": lam,
        "ratio": lam / 20,
    }


def test_lambda_max_gauge_is_the_hessians_never_adams_preconditioned_one():
    metrics = Metrics()
    _succeeded(metrics, "eos", [_eos_row("a", 10, 3.0, "gd")])
    assert _gauge(metrics, "landscape_probe_lambda_max") == 3.0
    # Adam's λ_max(P⁻¹H) at a later checkpoint: the eos ratio follows it, the Hessian's λ_max does not
    _succeeded(metrics, "eos", [_eos_row("b", 20, 900.0, "adam")])
    assert _gauge(metrics, "landscape_probe_lambda_max") == 3.0 and _gauge(metrics, "landscape_probe_eos_ratio") == 45.0
    for kind, row, want in [
        ("eigenvalues", {"which": "largest", "eigenvalues": [5.0, 4.0]}, 5.0),
        ("eigenvalues", {"which": "smallest", "eigenvalues": [-1.0]}, 5.0),  # not λ_max
        ("sharpness", {"measure": "lambda_max", "value": 6.0}, 6.0),
        ("sharpness", {"measure": "sam", "value": 0.1}, 6.0),
        ("critical", {"lambda_max": 7.0, "lambda_min": -0.5}, 7.0),
        ("eos", {"optimizer": "momentum", "lambda_max": 8.0, "ratio": 0.5}, 8.0),
    ]:
        _succeeded(metrics, kind, [{"checkpoint": "c", "checkpoint_name": "c", "step": 30, **row}])
        assert _gauge(metrics, "landscape_probe_lambda_max") == want, (kind, row)


def test_headline_gauges_show_the_latest_checkpoint_whatever_task_finishes_last():
    metrics = Metrics()
    metrics.series_order("s", ["early", "late"])
    late = {"checkpoint": "late", "checkpoint_name": "late", "step": 200}
    early = {"checkpoint": "early", "checkpoint_name": "early", "step": 100}
    _succeeded(metrics, "eigenvalues", [{**late, "which": "largest", "eigenvalues": [2.0]}])
    _succeeded(metrics, "trace", [{**late, "trace": 20.0}])
    # an earlier checkpoint's tasks finishing later (another group, or a re-run) do not overwrite it
    _succeeded(metrics, "eigenvalues", [{**early, "which": "largest", "eigenvalues": [1.0]}])
    _succeeded(metrics, "sharpness", [{**early, "measure": "lambda_max", "value": 1.5}])
    _succeeded(metrics, "trace", [{**early, "trace": 10.0}])
    assert _gauge(metrics, "landscape_probe_lambda_max") == 2.0
    assert _gauge(metrics, "landscape_probe_hessian_trace") == 20.0
    # the latest checkpoint measured again: its newer value is shown
    _succeeded(metrics, "sharpness", [{**late, "measure": "lambda_max", "value": 2.5}])
    assert _gauge(metrics, "landscape_probe_lambda_max") == 2.5
    # by step, not by the order of the rows in one task (an eos series)
    _succeeded(
        metrics,
        "eos",
        [
            {**late, "step": 300, "optimizer": "gd", "lambda_max": 3.0, "ratio": 0.3},
            {**early, "step": 250, "optimizer": "gd", "lambda_max": 9.0, "ratio": 0.9},
        ],
    )
    assert _gauge(metrics, "landscape_probe_lambda_max") == 3.0 and _gauge(metrics, "landscape_probe_eos_ratio") == 0.3


def test_without_steps_the_series_order_decides():
    metrics = Metrics()
    metrics.series_order("s", ["ckpt-a", "ckpt-b"])
    _succeeded(
        metrics, "eigenvalues", [{"checkpoint": "ckpt-b", "step": None, "which": "largest", "eigenvalues": [2.0]}]
    )
    _succeeded(
        metrics, "eigenvalues", [{"checkpoint": "ckpt-a", "step": None, "which": "largest", "eigenvalues": [1.0]}]
    )
    assert _gauge(metrics, "landscape_probe_lambda_max") == 2.0
