"""Every Prometheus metric of the service, declared once.

Names carry the ``landscape_probe_`` prefix (:data:`PREFIX`; bare ``probe_*`` is the
blackbox exporter's namespace, which most Prometheus servers already scrape) and base
units (seconds); counters end in ``_total``. Labels stay bounded: ``job_name`` /
``series`` (names from specs), ``kind`` (probe kinds), ``outcome`` and ``reason``
(fixed vocabularies). Checkpoint paths and hashes never become labels; they go to
Parquet. The spec's name is ``job_name``, not ``job``: Prometheus sets ``job`` (and
``instance``) on every scraped series itself and would rename ours to ``exported_job``.

Trends over training: the ``landscape_probe_checkpoint_*`` gauges hold one value per
checkpoint, labelled with its training ``step`` (rows without a step set none), so a
dashboard can plot a quantity against the step (``deploy/grafana``). Their cardinality is
bounded: per series only the :data:`STEP_WINDOW` latest steps are exported (older ones are
removed from the registry; Prometheus keeps what it scraped), and their other labels
(``path``, ``measure``, ``ascent_steps``) come from the spec's options.

Every registry carries ``landscape_probe_build_info`` (value 1; labels ``version``,
``revision``, ``python``, ``torch``), the ``<namespace>_build_info`` convention of
Prometheus' own exporters. The driver and the audit service expose a private registry over
HTTP with :func:`serve`, bound to loopback unless told otherwise; a ``--once`` audit
:func:`push`-es its registry to a Pushgateway instead.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import threading
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    push_to_gateway,
    pushadd_to_gateway,
    start_http_server,
)

from cluster.errors import CATEGORIES
from cluster.kinds import KINDS

__all__ = [
    "Metrics",
    "serve",
    "push",
    "build_labels",
    "hessian_lambda_max",
    "FAILURE_REASONS",
    "DURATION_BUCKETS_S",
    "DEFAULT_PORT",
    "PREFIX",
    "PUSH_JOB",
    "STEP_WINDOW",
]

PREFIX = "landscape_probe_"
PUSH_JOB = "landscape-probe-audit"  # the Pushgateway's job: the audit Deployment's scrape job too
# Per series, the training steps the landscape_probe_checkpoint_* gauges export at a time
# (the latest ones): 64 checkpoints × a few quantities stays far below a Prometheus
# server's per-target series limits, and a dashboard's last_over_time() over its range
# still shows the steps that have left the window while they were scraped.
STEP_WINDOW = 64

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
            "landscape_probe_tasks_total",
            "Probe tasks finished, by outcome.",
            ["job_name", "kind", "outcome"],
            registry=r,
        )
        self.tasks_planned = Gauge(
            "landscape_probe_tasks_planned", "Tasks in the current job run.", ["job_name"], registry=r
        )
        self.tasks_done = Gauge(
            "landscape_probe_tasks_done",
            "Tasks of the current job run finished (any outcome).",
            ["job_name"],
            registry=r,
        )
        self.hvps = Counter(
            "landscape_probe_hvp_total", "Hessian-vector products computed.", ["job_name", "kind"], registry=r
        )
        self.duration = Histogram(
            "landscape_probe_task_duration_seconds",
            "Wall time of one probe task.",
            ["job_name", "kind"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.failures = Counter(
            "landscape_probe_failures_total", "Task failures, by reason.", ["job_name", "reason"], registry=r
        )
        self.restarts = Counter(
            "landscape_probe_worker_restarts_total",
            "Worker groups rebuilt after a worker died.",
            ["job_name"],
            registry=r,
        )
        self.last_success = Gauge(
            "landscape_probe_last_success_timestamp_seconds",
            "Unix time of the last successful task.",
            ["job_name", "kind"],
            registry=r,
        )
        self.audit_passes = Counter(
            "landscape_probe_audit_passes_total", "Audit passes, by outcome.", ["job_name", "outcome"], registry=r
        )
        self.audit_last_pass = Gauge(
            "landscape_probe_audit_last_pass_timestamp_seconds",
            "Unix time of the last completed audit pass.",
            ["job_name"],
            registry=r,
        )
        self.audit_last_success = Gauge(
            "landscape_probe_audit_last_success_timestamp_seconds",
            "Unix time of the last completed audit pass (its failed tasks count in landscape_probe_failures_total).",
            ["job_name"],
            registry=r,
        )
        self.audit_checkpoints = Gauge(
            "landscape_probe_audit_checkpoints", "Checkpoints found by the last audit pass.", ["job_name"], registry=r
        )
        self.audit_pending = Gauge(
            "landscape_probe_audit_tasks_pending",
            "Tasks not yet stored after the last audit pass (failed or backing off).",
            ["job_name"],
            registry=r,
        )
        self.lambda_max = Gauge(
            "landscape_probe_lambda_max",
            "Top eigenvalue of the Hessian (never a preconditioned one's) at the series' latest checkpoint.",
            ["series"],
            registry=r,
        )
        self.trace = Gauge(
            "landscape_probe_hessian_trace", "Latest Hessian trace estimate of the series.", ["series"], registry=r
        )
        self.eos_ratio = Gauge(
            "landscape_probe_eos_ratio", "Latest λ_max / stability threshold of the series.", ["series"], registry=r
        )
        self.lambda_max_change = Gauge(
            "landscape_probe_lambda_max_relative_change",
            "(λ_max of the latest checkpoint − λ_max of the one before) / |λ_max of the one before|, per series.",
            ["series"],
            registry=r,
        )
        self.barrier = Gauge(
            "landscape_probe_barrier_height",
            "Latest loss barrier height of the series.",
            ["series", "path"],
            registry=r,
        )
        # one value per checkpoint, labelled with its training step (trends over training)
        step = ["series", "step"]
        self.checkpoint_lambda_max = Gauge(
            "landscape_probe_checkpoint_lambda_max",
            "Top eigenvalue of the Hessian at the checkpoint of training step `step`.",
            step,
            registry=r,
        )
        self.checkpoint_trace = Gauge(
            "landscape_probe_checkpoint_hessian_trace",
            "Hessian trace estimate at the checkpoint of training step `step`.",
            step,
            registry=r,
        )
        self.checkpoint_eos_ratio = Gauge(
            "landscape_probe_checkpoint_eos_ratio",
            "λ_max / stability threshold at the checkpoint of training step `step`.",
            step,
            registry=r,
        )
        self.checkpoint_barrier = Gauge(
            "landscape_probe_checkpoint_barrier_height",
            "Loss barrier height of the path ending at the checkpoint of training step `step`.",
            [*step, "path"],
            registry=r,
        )
        self.checkpoint_sharpness = Gauge(
            "landscape_probe_checkpoint_sharpness",
            "Sharpness measure `measure` (with `ascent_steps` ascent steps) at the checkpoint of training step `step`.",
            [*step, "measure", "ascent_steps"],
            registry=r,
        )
        self.build_info = Gauge(
            "landscape_probe_build_info",
            "Always 1; the labels say which landscape-probe, Python and torch this process runs.",
            ["version", "revision", "python", "torch"],
            registry=r,
        )
        self.build_info.labels(**build_labels()).set(1)
        # per series: its checkpoints' order, and the (step, index) of the checkpoint each headline gauge shows
        self._order: dict[str, dict[str, int]] = {}
        self._held: dict[tuple[str, str, tuple[tuple[str, str], ...]], tuple[int | None, int | None]] = {}
        # per series: the steps exported, and per step the (gauge, labels) set and their λ_max priority
        self._steps: dict[str, dict[int, dict[tuple[str, tuple[tuple[str, str], ...]], int]]] = {}
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
        self.checkpoint_values(job, kind, rows)

    def checkpoint_values(self, job: str, kind: str, rows: list[dict]) -> None:
        """Set the ``landscape_probe_checkpoint_*`` gauges of series ``job`` from result rows of
        ``kind``: one value per training step (rows without a ``step`` set none).

        Where several kinds hold λ_max for one step, the higher
        :attr:`cluster.kinds.Headline.lambda_max_priority` wins (as for the headline gauge);
        otherwise the row given last wins (pass rows in creation order). Only the
        :data:`STEP_WINDOW` latest steps of a series are kept: a newer step removes the
        oldest step's series from the registry, and a step older than all kept ones is
        dropped once the window is full.
        """
        for row in rows:
            if row.get("step") is None:
                continue
            values = _checkpoint_values(kind, row)
            if not values:
                continue
            step = int(row["step"])
            with self._lock:
                held = self._admit(job, step)
                if held is None:
                    continue
                for gauge, value, labels, priority in values:
                    if held.get((gauge, labels), priority) > priority:
                        continue
                    held[(gauge, labels)] = priority
                    getattr(self, gauge).labels(series=job, step=str(step), **dict(labels)).set(value)

    def _admit(self, job: str, step: int) -> dict | None:
        """The held values of ``step`` in series ``job`` (made room for), or None: outside the window."""
        steps = self._steps.setdefault(job, {})
        if step not in steps and len(steps) >= STEP_WINDOW:
            oldest = min(steps)
            if step < oldest:
                return None
            for gauge, labels in steps.pop(oldest):
                getattr(self, gauge).remove(job, str(oldest), *(v for _, v in labels))
        return steps.setdefault(step, {})

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


def _checkpoint_values(kind: str, row: dict) -> list[tuple[str, float, tuple[tuple[str, str], ...], int]]:
    """``(gauge attribute, value, extra labels, priority)`` of the per-checkpoint gauges a row sets:
    the Hessian's λ_max, its kind's headline gauges (trace, EoS ratio, barrier on the probe set)
    and, for sharpness rows, the measure's value."""
    spec = KINDS.get(kind)
    out = []
    lam = hessian_lambda_max(kind, row)
    if lam is not None and spec is not None:
        out.append(("checkpoint_lambda_max", lam, (), spec.headline.lambda_max_priority))
    for g in spec.headline.gauges(row) if spec is not None and spec.headline.gauges else ():
        if f"checkpoint_{g.name}" in _CHECKPOINT_GAUGES:
            out.append((f"checkpoint_{g.name}", g.value, g.labels, 0))
    if kind == "sharpness" and row.get("value") is not None:
        steps = row.get("steps")
        labels = (("measure", str(row.get("measure"))), ("ascent_steps", "" if steps is None else str(int(steps))))
        out.append(("checkpoint_sharpness", row["value"], labels, 0))
    return out


_CHECKPOINT_GAUGES = ("checkpoint_trace", "checkpoint_eos_ratio", "checkpoint_barrier")


@functools.cache
def build_labels() -> dict[str, str]:
    """Labels of ``landscape_probe_build_info``: the installed package's ``version``, the git
    ``revision`` of the source checkout (``unknown`` outside one, e.g. in a wheel install or an
    image built without ``.git``), and the ``python`` and ``torch`` versions (read from package
    metadata: torch is not imported for it)."""

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {
        "version": version("landscape-probe"),
        "revision": _git_revision(Path(__file__).resolve().parents[1]) or "unknown",
        "python": platform.python_version(),
        "torch": version("torch"),
    }


def _git_revision(root: Path) -> str | None:
    """The commit ``root/.git`` has checked out, read from its files (no ``git`` process); None
    where ``root`` is no checkout or the files say nothing readable."""
    git = root / ".git"
    try:
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head.split(":", 1)[1].strip()
        common = git / "commondir"
        bases = [git] + ([(git / common.read_text().strip()).resolve()] if common.is_file() else [])
        for base in bases:
            if (base / ref).is_file():
                return (base / ref).read_text().strip() or None
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split(" ", 1)[0]
    except (OSError, IndexError):
        return None
    return None


def push(
    metrics: Metrics,
    gateway: str,
    *,
    audit: str,
    families: tuple[str, ...] | None = None,
    timeout_s: float = 10.0,
) -> None:
    """Push ``metrics`` to the Pushgateway at ``gateway`` (``http://host:9091`` or ``host:9091``)
    under job :data:`PUSH_JOB` and grouping key ``{audit: audit}``, as ``--once`` audits do
    (the process exits before any scrape).

    ``families=None`` replaces the group (PUT: a completed pass says everything). Otherwise
    only the named :class:`Metrics` attributes are pushed (POST) and the group's other
    families stay: a pass that failed updates its pass counter and time but keeps the last
    completed pass's ``landscape_probe_audit_last_success_timestamp_seconds`` that the
    staleness alert reads.

    Raises:
        OSError: the gateway cannot be reached or answers with an error (``URLError``).
    """
    key = {"audit": audit}
    if families is None:
        push_to_gateway(gateway, job=PUSH_JOB, registry=metrics.registry, grouping_key=key, timeout=timeout_s)
        return
    registry = CollectorRegistry()
    for name in families:
        registry.register(getattr(metrics, name))
    pushadd_to_gateway(gateway, job=PUSH_JOB, registry=registry, grouping_key=key, timeout=timeout_s)


def serve(metrics: Metrics, *, port: int = DEFAULT_PORT, addr: str = "127.0.0.1"):
    """Serve ``metrics`` at ``http://addr:port/metrics``; loopback unless ``addr`` says otherwise.

    Returns the ``(server, thread)`` pair from ``prometheus_client`` (``server.shutdown()`` stops it).
    """
    return start_http_server(port, addr=addr, registry=metrics.registry)
