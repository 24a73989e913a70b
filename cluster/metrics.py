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

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cluster.errors import CATEGORIES
from cluster.kinds import KINDS

__all__ = ["Metrics", "serve", "hessian_lambda_max", "FAILURE_REASONS", "DURATION_BUCKETS_S", "DEFAULT_PORT"]

DEFAULT_PORT = 9464  # the port OpenTelemetry/Prometheus exporters conventionally use

# Probe durations run from seconds (a small model's trace) to hours (SLQ on a large model).
DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
FAILURE_REASONS = CATEGORIES  # the error types' categories (cluster/errors.py)
OUTCOMES = ("succeeded", "failed", "skipped")


class Metrics:
    """The metric families, on their own registry (so tests and several services never collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.tasks = Counter(
            "probe_tasks_total", "Probe tasks finished, by outcome.", ["job_name", "kind", "outcome"], registry=r
        )
        self.tasks_planned = Gauge("probe_tasks_planned", "Tasks in the current job run.", ["job_name"], registry=r)
        self.tasks_done = Gauge(
            "probe_tasks_done", "Tasks of the current job run finished (any outcome).", ["job_name"], registry=r
        )
        self.hvps = Counter("probe_hvp_total", "Hessian-vector products computed.", ["job_name", "kind"], registry=r)
        self.duration = Histogram(
            "probe_task_duration_seconds",
            "Wall time of one probe task.",
            ["job_name", "kind"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.failures = Counter("probe_failures_total", "Task failures, by reason.", ["job_name", "reason"], registry=r)
        self.restarts = Counter(
            "probe_worker_restarts_total", "Worker groups rebuilt after a worker died.", ["job_name"], registry=r
        )
        self.last_success = Gauge(
            "probe_last_success_timestamp_seconds",
            "Unix time of the last successful task.",
            ["job_name", "kind"],
            registry=r,
        )
        self.audit_passes = Counter(
            "probe_audit_passes_total", "Audit passes, by outcome.", ["job_name", "outcome"], registry=r
        )
        self.audit_last_pass = Gauge(
            "probe_audit_last_pass_timestamp_seconds",
            "Unix time of the last completed audit pass.",
            ["job_name"],
            registry=r,
        )
        self.audit_last_success = Gauge(
            "probe_audit_last_success_timestamp_seconds",
            "Unix time of the last audit pass that completed (its task failures count in probe_failures_total).",
            ["job_name"],
            registry=r,
        )
        self.audit_checkpoints = Gauge(
            "probe_audit_checkpoints", "Checkpoints found by the last audit pass.", ["job_name"], registry=r
        )
        self.audit_pending = Gauge(
            "probe_audit_tasks_pending",
            "Tasks not yet stored after the last audit pass (failed or backing off).",
            ["job_name"],
            registry=r,
        )
        self.lambda_max = Gauge(
            "probe_lambda_max",
            "Top eigenvalue of the Hessian (never a preconditioned one's) at the series' latest checkpoint.",
            ["series"],
            registry=r,
        )
        self.trace = Gauge(
            "probe_hessian_trace", "Latest Hessian trace estimate of the series.", ["series"], registry=r
        )
        self.eos_ratio = Gauge(
            "probe_eos_ratio", "Latest λ_max / stability threshold of the series.", ["series"], registry=r
        )
        self.lambda_max_change = Gauge(
            "probe_lambda_max_relative_change",
            "(λ_max of the latest checkpoint − λ_max of the one before) / |λ_max of the one before|, per series.",
            ["series"],
            registry=r,
        )
        self.barrier = Gauge(
            "probe_barrier_height", "Latest loss barrier height of the series.", ["series", "path"], registry=r
        )
        # per series: its checkpoints' order, and the (step, index) of the checkpoint each headline gauge shows
        self._order: dict[str, dict[str, int]] = {}
        self._held: dict[tuple[str, str, tuple[tuple[str, str], ...]], tuple[int | None, int | None]] = {}
        self._lock = threading.Lock()

    def failure(self, job: str, reason: str) -> None:
        """Count a failure; unknown reasons are folded into ``other`` to keep labels bounded."""
        self.failures.labels(job_name=job, reason=reason if reason in FAILURE_REASONS else "other").inc()

    def task_failed(self, job: str, kind: str, category: str) -> None:
        """Count a failed task under its category (the error's type, :func:`cluster.errors.category_of`)."""
        self.tasks.labels(job_name=job, kind=kind, outcome="failed").inc()
        self.failure(job, category)

    def task_succeeded(
        self, job: str, kind: str, rows: list[dict], *, duration_s: float, num_matvecs: int, timestamp_s: float
    ) -> None:
        """Count a finished task and set the headline gauges of the series (``job``) from its rows."""
        self.tasks.labels(job_name=job, kind=kind, outcome="succeeded").inc()
        self.hvps.labels(job_name=job, kind=kind).inc(max(int(num_matvecs or 0), 0))
        self.duration.labels(job_name=job, kind=kind).observe(duration_s)
        self.last_success.labels(job_name=job, kind=kind).set(timestamp_s)
        gauges = KINDS[kind].headline.gauges if kind in KINDS else None
        for row in rows:
            lam = hessian_lambda_max(kind, row)
            if lam is not None:
                self._set_latest("lambda_max", job, row, lam)
            for g in gauges(row) if gauges else ():
                if g.latest == "checkpoint":
                    self._set_latest(g.name, job, row, g.value, g.labels)
                else:  # the newest row's value
                    getattr(self, g.name).labels(series=job, **dict(g.labels)).set(g.value)

    def series_order(self, job: str, checkpoints: list[str]) -> None:
        """The checkpoints of series ``job`` in order (the job's): the headline gauges follow the
        latest of them where rows carry no training step."""
        self._order[job] = {c: i for i, c in enumerate(checkpoints)}

    def _position(self, job: str, row: dict) -> tuple[int | None, int | None]:
        """``(step, index in the series)`` of the checkpoint a row is about; None where unknown."""
        step, checkpoint = row.get("step"), row.get("checkpoint")
        index = None if checkpoint is None else self._order.get(job, {}).get(checkpoint)
        return (None if step is None else int(step)), index

    def _set_latest(
        self, gauge: str, job: str, row: dict, value: float, labels: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """Set gauge ``gauge`` (an attribute name) of series ``job`` to ``value`` unless it shows a
        later checkpoint of the series: later by training step where both steps are known, else by
        the series' checkpoint order (:meth:`series_order`); where neither tells, the newer task
        wins (a re-run of one checkpoint). Groups finish tasks in any order: an earlier
        checkpoint's task that finishes last does not overwrite the latest checkpoint's value."""
        key = (gauge, job, labels)
        new = self._position(job, row)
        with self._lock:  # the driver's groups report from their own threads
            held = self._held.get(key)
            if held is not None:
                (step, index), (held_step, held_index) = new, held
                if step is not None and held_step is not None and step != held_step:
                    if step < held_step:
                        return
                elif index is not None and held_index is not None and index < held_index:
                    return
            self._held[key] = new
            getattr(self, gauge).labels(series=job, **dict(labels)).set(value)


def hessian_lambda_max(kind: str, row: dict) -> float | None:
    """The Hessian's largest eigenvalue in a result row, or None where the row has none.

    Each kind says where its rows hold one (:attr:`cluster.kinds.Headline.lambda_max`):
    ``eigenvalues`` (``which: largest``), ``sharpness`` (measure ``lambda_max``),
    ``critical`` and ``eos`` rows, except Adam's: those hold λ_max(P⁻¹H) of the
    preconditioned Hessian, not the Hessian's.
    """
    read = KINDS[kind].headline.lambda_max if kind in KINDS else None
    return read(row) if read is not None else None


def serve(metrics: Metrics, *, port: int = DEFAULT_PORT, addr: str = "127.0.0.1"):
    """Serve ``metrics`` at ``http://addr:port/metrics``; loopback unless ``addr`` says otherwise.

    Returns the ``(server, thread)`` pair from ``prometheus_client`` (``server.shutdown()`` stops it).
    """
    return start_http_server(port, addr=addr, registry=metrics.registry)
