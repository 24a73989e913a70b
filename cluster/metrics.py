"""Every Prometheus metric of the service, declared once.

Names carry the ``probe_`` prefix and base units (seconds); counters end in
``_total``. Labels stay bounded: ``job_name`` / ``series`` (names from specs), ``kind``
(probe kinds), ``outcome`` and ``reason`` (fixed vocabularies). Checkpoint paths
and hashes never become labels; they go to Parquet. The spec's name is ``job_name``,
not ``job``: Prometheus sets ``job`` (and ``instance``) on every scraped series
itself and would rename ours to ``exported_job``.

The driver and the audit service expose a private registry over HTTP with
:func:`serve`, bound to loopback unless told otherwise.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics", "serve", "FAILURE_REASONS", "DURATION_BUCKETS_S", "DEFAULT_PORT", "failure_category"]

DEFAULT_PORT = 9464  # the port OpenTelemetry/Prometheus exporters conventionally use

# Probe durations run from seconds (a small model's trace) to hours (SLQ on a large model).
DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
FAILURE_REASONS = ("bad_checkpoint", "bad_spec", "worker_lost", "non_finite", "placement", "write_failed", "other")
OUTCOMES = ("succeeded", "failed", "skipped")


def failure_category(message: str) -> str:
    """The bounded reason (one of :data:`FAILURE_REASONS`) for a failure message."""
    text = message.lower()
    if "checkpoint" in text:
        return "bad_checkpoint"
    if "worker died" in text or "worker lost" in text:
        return "worker_lost"
    if "non-finite" in text or " nan" in text:
        return "non_finite"
    if "cannot write results" in text:
        return "write_failed"
    return "other"


class Metrics:
    """The metric families, on their own registry (so tests and several services never collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.tasks = Counter("probe_tasks_total", "Probe tasks finished, by outcome.", ["job_name", "kind", "outcome"], registry=r)
        self.tasks_planned = Gauge("probe_tasks_planned", "Tasks in the current job run.", ["job_name"], registry=r)
        self.tasks_done = Gauge("probe_tasks_done", "Tasks of the current job run finished (any outcome).", ["job_name"], registry=r)
        self.hvps = Counter("probe_hvp_total", "Hessian-vector products computed.", ["job_name", "kind"], registry=r)
        self.duration = Histogram(
            "probe_task_duration_seconds", "Wall time of one probe task.", ["job_name", "kind"], buckets=DURATION_BUCKETS_S, registry=r
        )
        self.failures = Counter("probe_failures_total", "Task failures, by reason.", ["job_name", "reason"], registry=r)
        self.restarts = Counter("probe_worker_restarts_total", "Worker groups rebuilt after a worker died.", ["job_name"], registry=r)
        self.last_success = Gauge(
            "probe_last_success_timestamp_seconds", "Unix time of the last successful task.", ["job_name", "kind"], registry=r
        )
        self.audit_passes = Counter("probe_audit_passes_total", "Audit passes, by outcome.", ["job_name", "outcome"], registry=r)
        self.audit_last_pass = Gauge(
            "probe_audit_last_pass_timestamp_seconds", "Unix time of the last completed audit pass.", ["job_name"], registry=r
        )
        self.audit_last_success = Gauge(
            "probe_audit_last_success_timestamp_seconds", "Unix time of the last audit pass that completed (its task failures count in probe_failures_total).", ["job_name"], registry=r
        )
        self.audit_checkpoints = Gauge("probe_audit_checkpoints", "Checkpoints found by the last audit pass.", ["job_name"], registry=r)
        self.audit_pending = Gauge(
            "probe_audit_tasks_pending", "Tasks not yet stored after the last audit pass (failed or backing off).", ["job_name"], registry=r
        )
        self.lambda_max = Gauge("probe_lambda_max", "Latest top Hessian eigenvalue of the series.", ["series"], registry=r)
        self.trace = Gauge("probe_hessian_trace", "Latest Hessian trace estimate of the series.", ["series"], registry=r)
        self.eos_ratio = Gauge("probe_eos_ratio", "Latest λ_max / stability threshold of the series.", ["series"], registry=r)
        self.lambda_max_change = Gauge(
            "probe_lambda_max_relative_change",
            "(λ_max of the latest checkpoint − λ_max of the one before) / |λ_max of the one before|, per series.",
            ["series"], registry=r,
        )
        self.barrier = Gauge("probe_barrier_height", "Latest loss barrier height of the series.", ["series", "path"], registry=r)

    def failure(self, job: str, reason: str) -> None:
        """Count a failure; unknown reasons are folded into ``other`` to keep labels bounded."""
        self.failures.labels(job_name=job, reason=reason if reason in FAILURE_REASONS else "other").inc()

    def task_failed(self, job: str, kind: str, message: str) -> None:
        """Count a failed task, its reason classified from the message into :data:`FAILURE_REASONS`."""
        self.tasks.labels(job_name=job, kind=kind, outcome="failed").inc()
        self.failure(job, failure_category(message))

    def task_succeeded(self, job: str, kind: str, rows: list[dict], *, duration_s: float, num_matvecs: int,
                       timestamp_s: float) -> None:
        """Count a finished task and set the headline gauges of the series (``job``) from its rows."""
        self.tasks.labels(job_name=job, kind=kind, outcome="succeeded").inc()
        self.hvps.labels(job_name=job, kind=kind).inc(max(int(num_matvecs or 0), 0))
        self.duration.labels(job_name=job, kind=kind).observe(duration_s)
        self.last_success.labels(job_name=job, kind=kind).set(timestamp_s)
        for row in rows:
            if kind == "eigenvalues" and row.get("which") == "largest" and row.get("eigenvalues"):
                self.lambda_max.labels(series=job).set(row["eigenvalues"][0])
            elif kind == "sharpness" and row.get("measure") == "lambda_max":
                self.lambda_max.labels(series=job).set(row["value"])
            elif kind == "trace":
                self.trace.labels(series=job).set(row["trace"])
            elif kind == "barrier" and row.get("eval_set") == "probe":
                self.barrier.labels(series=job, path=row["path"]).set(row["barrier_height"])
        if kind == "eos" and rows:
            last = max(rows, key=lambda r: r["step"])
            self.eos_ratio.labels(series=job).set(last["ratio"])
            self.lambda_max.labels(series=job).set(last["lambda_max"])


def serve(metrics: Metrics, *, port: int = DEFAULT_PORT, addr: str = "127.0.0.1"):
    """Serve ``metrics`` at ``http://addr:port/metrics``; loopback unless ``addr`` says otherwise.

    Returns the ``(server, thread)`` pair from ``prometheus_client`` (``server.shutdown()`` stops it).
    """
    return start_http_server(port, addr=addr, registry=metrics.registry)
