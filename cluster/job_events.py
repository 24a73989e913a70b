"""What a job does on each driver event (:class:`cluster.driver.Events`): follow live progress,
write Parquet, update Prometheus metrics, report progress lines (and ``landscape_probe.job``
log records). One handler per concern, called in that order."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cluster.driver import Events, Failed, JobSummary, Retry, Stored
from cluster.logs import log_line
from cluster.metrics import Metrics
from cluster.progress import ProgressHub
from cluster.schema import SCHEMA_VERSION
from cluster.store import ResultStore

__all__ = ["HubEvents", "StoreEvents", "MetricsEvents", "ProgressEvents", "now", "short"]

job_log = logging.getLogger("landscape_probe.job")


def now() -> datetime:
    """The current time in UTC (timezone-aware)."""
    return datetime.now(UTC)


def short(path: str) -> str:
    """A checkpoint's folder and file name, for progress lines."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


class HubEvents(Events):
    """Task starts and ends to the live-progress hub (:class:`cluster.progress.ProgressHub`)."""

    def __init__(self, hub: ProgressHub) -> None:
        self.hub = hub

    def started(self, task, attempts: int, group: int) -> None:
        self.hub.started(task, attempts, group)

    def stored(self, outcome: Stored, rows: list[dict]) -> None:
        self.hub.finished(outcome.task, "succeeded", outcome.record.get("num_matvecs"))

    def failed(self, outcome: Failed) -> None:
        self.hub.finished(outcome.task, "failed")

    def retrying(self, outcome: Retry) -> None:
        self.hub.finished(outcome.task, "retry")


class StoreEvents(Events):
    """Result rows and failure rows into the job's Parquet store."""

    def __init__(self, store: ResultStore, job: str, run_id: str) -> None:
        self.store, self.job, self.run_id = store, job, run_id

    def stored(self, outcome: Stored, rows: list[dict]) -> None:
        task = outcome.task
        if task.row_keys:  # one stored file per checkpoint's row (eos series)
            for r in rows:
                self.store.write_result(task.kind, [r])
        else:
            self.store.write_result(task.kind, rows)

    def failed(self, outcome: Failed) -> None:
        task = outcome.task
        for key in task.row_keys or (task.key,):
            self.store.write_failure(
                {
                    "run_id": self.run_id,
                    "job": self.job,
                    "task_key": key,
                    "kind": task.kind,
                    "checkpoint": task.checkpoint,
                    "checkpoint_sha256": task.checkpoint_sha256,
                    "probe_config": json.dumps(task.options, sort_keys=True),
                    "category": outcome.category,
                    "reason": str(outcome.error),
                    "attempts": outcome.attempts,
                    "created_at": now(),
                    "schema_version": SCHEMA_VERSION,
                }
            )


class MetricsEvents(Events):
    """Task counters, durations, products, failures by category and the headline gauges."""

    def __init__(self, metrics: Metrics, job: str, hub: ProgressHub | None = None) -> None:
        self.metrics, self.job, self.hub = metrics, job, hub

    def stored(self, outcome: Stored, rows: list[dict]) -> None:
        record = outcome.record
        # the products the hub counted while the task ran are in the counter already
        counted = self.hub.take_counted(outcome.task.key) if self.hub is not None else 0
        self.metrics.task_succeeded(
            self.job,
            outcome.task.kind,
            rows,
            duration_s=record["duration_s"],
            num_matvecs=max(int(record.get("num_matvecs", 0) or 0) - counted, 0),
            timestamp_s=time.time(),
        )
        self.metrics.tasks_done.labels(job_name=self.job).inc()

    def failed(self, outcome: Failed) -> None:
        self.metrics.task_failed(self.job, outcome.task.kind, outcome.category)
        self.metrics.tasks_done.labels(job_name=self.job).inc()

    def retrying(self, outcome: Retry) -> None:
        self.metrics.restarts.labels(job_name=self.job).inc()

    def job_error(self, error: BaseException) -> None:
        from cluster.errors import category_of

        self.metrics.failure(self.job, category_of(error))  # placement, a result write: under its type


class ProgressEvents(Events):
    """One line per task event: to ``progress`` and, with its fields, as a ``landscape_probe.job``
    record (once when ``progress`` is :func:`cluster.logs.log_line`, as in the CLI)."""

    def __init__(self, progress: Callable[[str], None], job: str, summary: JobSummary, total: int, t0: float) -> None:
        self.progress, self.job, self.summary, self.total, self.t0 = progress, job, summary, total, t0

    def _say(self, level: int, line: str, event: str, task, **fields) -> None:
        if self.progress is not log_line:
            self.progress(line)
        base = {"job": self.job, "event": event, "task_key": task.key, "kind": task.kind}
        job_log.log(level, line, extra={"fields": {**base, "checkpoint": task.checkpoint, **fields}})

    def stored(self, outcome: Stored, rows: list[dict]) -> None:
        t, record, attempts = outcome.task, outcome.record, outcome.attempts
        n = self.summary.num_done + self.summary.num_failed
        elapsed = time.perf_counter() - self.t0
        self._say(
            logging.INFO,
            f"[{self.job}] {n}/{self.total} {t.kind} @ {short(t.checkpoint)}: {record['duration_s']:.1f} s, "
            f"{record.get('num_matvecs', 0)} HVPs{f', attempt {attempts}' if attempts > 1 else ''}; "
            f"elapsed {elapsed:.0f} s",
            "task_succeeded",
            t,
            done=n,
            total=self.total,
            duration_s=record["duration_s"],
            num_matvecs=record.get("num_matvecs", 0),
            attempts=attempts,
            elapsed_s=round(elapsed, 3),
        )

    def failed(self, outcome: Failed) -> None:
        t = outcome.task
        self._say(
            logging.INFO,  # the CLI reports the job's failures on stderr itself
            f"[{self.job}] FAILED {t.kind} @ {t.checkpoint}: {outcome.error}",
            "task_failed",
            t,
            category=outcome.category,
            reason=str(outcome.error),
            attempts=outcome.attempts,
        )

    def retrying(self, outcome: Retry) -> None:
        t = outcome.task
        self._say(
            logging.INFO,
            f"[{self.job}] worker lost on {t.kind} @ {t.checkpoint}: {outcome.error}; "
            f"restarting (attempt {outcome.attempts + 1})",
            "task_retrying",
            t,
            reason=str(outcome.error),
            attempts=outcome.attempts,
        )
