"""Live progress of running tasks: products and Lanczos steps as they happen, the fraction done,
the time left, stalls; as Prometheus metrics and ``landscape_probe`` log records.

Two halves joined by a small channel:

- in the worker, :class:`cluster.progress_worker.TaskProgress` is the
  :class:`probe.progress.ProgressHook` set on the task's operators. It counts every product
  and Lanczos step and sends the running totals at most every ``interval_s`` (default 1 s:
  one message per second, whatever the product rate) through a
  :class:`cluster.progress_worker.ProgressClient` (rank 0's; its peers run the same
  products in lockstep and only count them on their Ray worker counter);
- in the driver, :class:`ProgressHub` listens on a ``multiprocessing.connection`` socket
  (loopback by default, ``PROBE_PROGRESS_HOST`` for workers on other hosts; an HMAC
  handshake on a random key, then JSON messages: nothing is unpickled). It moves the
  product counter (``Metrics.hvps``) as products happen, sets the per-group progress, time
  left and stall gauges below, writes a log record every ``log_every`` steps and on every
  task event, and reports a task that made no progress for ``stall_after_s`` as stalled.

The same channel serves every backend (in-process, ``torch.multiprocessing``, Ray actors):
the driver sends its address and key with each task (:meth:`ProgressHub.channel`).

Metrics (on the job's registry; labels ``job_name`` and ``group``, the index of the worker
group, at most ``cluster.num_workers``): ``landscape_probe_task_progress_ratio``,
``landscape_probe_task_eta_seconds``, ``landscape_probe_task_stalled``,
``landscape_probe_task_last_progress_timestamp_seconds``; and by ``job_name`` and ``kind``,
``landscape_probe_task_stalls_total`` and ``landscape_probe_lanczos_steps_total``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = [
    "ProgressOptions",
    "ProgressHub",
    "ProgressMetrics",
    "expected_products",
    "DEFAULT_STALL_AFTER_S",
    "set_defaults",
    "defaults",
]

log = logging.getLogger("landscape_probe.progress")

# 15 minutes: longer than loading a multi-GB checkpoint or one product of a large model on a
# pipeline, short enough that a hang pages within the quarter hour
DEFAULT_STALL_AFTER_S = 900.0


@dataclass(frozen=True)
class ProgressOptions:
    """How progress is reported.

    Args:
        stall_after_s: a running task with no new product or Lanczos step for this long is
            reported as stalled (default 900 s: :data:`DEFAULT_STALL_AFTER_S`). Spectrum,
            eigenvalues and trace tasks are watched from their start (model loading
            included), other kinds once they have made a product (a surface or barrier task
            evaluates losses, which report nothing).
        interval_s: the least time between two messages of one worker (default 1 s; 0 sends
            one per product, for tests).
        log_every: a progress log record every this many Lanczos steps (products, for
            estimators without steps); default 10.
        bar: draw a progress bar (tqdm) on stderr; the CLI sets it when stderr is a terminal.
    """

    stall_after_s: float = DEFAULT_STALL_AFTER_S
    interval_s: float = 1.0
    log_every: int = 10
    bar: bool = False

    def __post_init__(self) -> None:
        if not self.stall_after_s > 0:
            raise ValueError(f"stall_after_s must be > 0 seconds, got {self.stall_after_s}; e.g. 900")
        if self.interval_s < 0:
            raise ValueError(f"interval_s must be >= 0 seconds, got {self.interval_s}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")


_defaults = ProgressOptions()


def set_defaults(*, reset: bool = False, **changes: Any) -> ProgressOptions:
    """Change the options :func:`cluster.job.run_job` uses when it is given none (the CLI's flags);
    ``reset=True`` goes back to :class:`ProgressOptions`' own first."""
    global _defaults
    _defaults = ProgressOptions(**{**(ProgressOptions() if reset else _defaults).__dict__, **changes})
    return _defaults


def defaults() -> ProgressOptions:
    """The options :func:`cluster.job.run_job` uses when it is given none."""
    return _defaults


def expected_products(kind: str, options: dict) -> int | None:
    """About how many products a task of ``kind`` with ``options`` (the kind's defaults fill in
    the rest) takes, as its :class:`~cluster.kinds.base.Kind` says; None where unknown. Two more
    for the symmetry check where it is on. The fraction done is products over this, held below 1
    until the task ends (Lanczos stops early on convergence or breakdown).
    """
    from cluster.kinds import KINDS  # the kinds import the runners: loaded on first use

    k = KINDS.get(kind)
    if k is None or k.products is None:
        return None
    o = {**k.options, **options}
    return k.products(o) + (2 if k.uses_hessian and o["symmetry_check"] is not False else 0)


# ------------------------------------------------------------------------------------ driver half


class ProgressMetrics:
    """The live-progress metric families, once per registry (:meth:`of`)."""

    _by_registry: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry) -> None:
        group = ["job_name", "group"]
        self.progress = Gauge(
            "landscape_probe_task_progress_ratio",
            "Fraction of the running task done (products over those expected), 0..1, per worker group.",
            group,
            registry=registry,
        )
        self.eta = Gauge(
            "landscape_probe_task_eta_seconds",
            "Estimated time left of the running task (NaN while unknown), per worker group.",
            group,
            registry=registry,
        )
        self.stalled = Gauge(
            "landscape_probe_task_stalled",
            "1 while the group's running task has made no progress for the stall time, else 0.",
            group,
            registry=registry,
        )
        self.last_progress = Gauge(
            "landscape_probe_task_last_progress_timestamp_seconds",
            "Unix time of the group's last progress (task start, product, Lanczos step).",
            group,
            registry=registry,
        )
        self.stalls = Counter(
            "landscape_probe_task_stalls_total", "Tasks reported as stalled.", ["job_name", "kind"], registry=registry
        )
        self.steps = Counter(
            "landscape_probe_lanczos_steps_total", "Lanczos steps taken.", ["job_name", "kind"], registry=registry
        )

    @classmethod
    def of(cls, registry: CollectorRegistry) -> ProgressMetrics:
        """The families on ``registry``, registered on first use."""
        if registry not in cls._by_registry:
            cls._by_registry[registry] = cls(registry)
        return cls._by_registry[registry]


@dataclass
class _Running:
    """What the hub knows about one running task."""

    kind: str
    checkpoint: str
    group: int
    attempt: int
    expected: int | None
    started: float
    last_progress: float
    products: int = 0
    steps: int = 0
    step: int = 0
    steps_total: int | None = None
    logged_at: int = 0
    stalled: bool = False
    fraction: float = 0.0


class ProgressHub:
    """The driver's end: turns workers' messages into metrics, log records and stall reports.

    Args:
        job: the job's name (``job_name`` label, ``job`` field of log records).
        metrics: the job's :class:`cluster.metrics.Metrics` (its ``hvps`` counter and registry); None: logs only.
        options: :class:`ProgressOptions`.
        num_tasks: tasks this run runs (the progress bar's length).
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        job: str,
        *,
        metrics: Any = None,
        options: ProgressOptions | None = None,
        num_tasks: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job, self.metrics, self.options, self.clock = job, metrics, options or defaults(), clock
        self.gauges = ProgressMetrics.of(metrics.registry) if metrics is not None else None
        self.running: dict[str, _Running] = {}
        self.counted: dict[str, int] = {}  # products of succeeded tasks counted while they ran
        self.finished_tasks = 0
        self.num_tasks = num_tasks
        self._lock = threading.Lock()
        self._listener: Listener | None = None
        self._authkey = secrets.token_bytes(16)
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._bar = _Bar(num_tasks) if self.options.bar else None

    # -- the channel

    def start(self) -> ProgressHub:
        """Open the channel and start the stall watchdog; returns self."""
        host = os.environ.get("PROBE_PROGRESS_HOST", "127.0.0.1")
        self._listener = Listener((host, 0), authkey=self._authkey)
        self._spawn(self._accept, "progress-accept")
        self._spawn(self._watch, "progress-stalls")
        return self

    def channel(self, task_key: str) -> dict:
        """What a worker needs to report task ``task_key``'s progress (plain data, sent with the task)."""
        if self._listener is None:
            return {}
        host, port = self._listener.address  # pyright: ignore[reportGeneralTypeIssues]
        return {
            "task": task_key,
            "address": [host, port],
            "authkey": self._authkey.hex(),
            "interval_s": self.options.interval_s,
        }

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn = self._listener.accept()
            except (OSError, EOFError):  # closed, or a client that failed the handshake
                if self._stop.is_set():
                    return
                continue
            except Exception as exc:  # noqa: BLE001 - e.g. AuthenticationError: ignore that client
                log.debug("progress channel refused a client: %s", exc)
                continue
            self._spawn(self._read, "progress-read", conn)

    def _read(self, conn: Connection) -> None:
        with conn:
            while not self._stop.is_set():
                try:
                    message = json.loads(conn.recv_bytes(1 << 16))
                except (OSError, EOFError, ValueError):
                    return
                if isinstance(message, dict):
                    self.update(message)

    def _watch(self) -> None:
        period = min(max(self.options.stall_after_s / 4, 0.05), 5.0)
        while not self._stop.wait(period):
            self.check_stalls()

    def close(self) -> None:
        """Stop listening and end the hub's threads; running tasks' gauges are left as they are.

        Closing a listening socket does not wake a thread blocked in ``accept()`` on Linux, so
        the hub connects to itself once first: without it every job (every audit pass) would
        leave its accept thread behind. The wake-up is a bare TCP connection, closed at once:
        a ``Client`` would wait for the handshake's challenge, forever when the accept thread
        has just left its loop (it saw the stop flag after a worker's connection), which hung
        a job's end in CI."""
        self._stop.set()
        if self._listener is not None:
            host, port = self._listener.address
            try:
                socket.create_connection((host, port), timeout=1.0).close()
            except OSError:  # the accept thread may be gone already: nothing to wake
                pass
            self._listener.close()
        for t in self._threads[:2]:  # accept and stall watch first: then no reader can start
            t.join(timeout=5)
        for t in self._threads[2:]:  # readers end with their (finished) workers' connections
            t.join(timeout=2)
        if self._bar is not None:
            self._bar.close()

    # -- events

    def started(self, task: Any, attempt: int, group: int) -> None:
        """Task ``task`` (a :class:`cluster.plan.Task`) starts its ``attempt`` on group ``group``."""
        now = self.clock()
        with self._lock:
            self.running[task.key] = _Running(
                task.kind, task.checkpoint, group, attempt, expected_products(task.kind, task.options), now, now
            )
        self._set_gauges(group, progress=0.0, eta=math.nan, stalled=0)
        log.info(
            "[%s] started %s @ %s (group %d, attempt %d)",
            self.job,
            task.kind,
            task.checkpoint,
            group,
            attempt,
            extra=self._fields("task_started", task.key),
        )

    def update(self, message: dict) -> None:
        """A worker's message (:class:`cluster.progress_worker.TaskProgress`): running totals of one task."""
        key = str(message.get("task"))
        now = self.clock()
        with self._lock:
            r = self.running.get(key)
            if r is None:  # a late message of a finished task
                return
            new_products = max(int(message.get("products", 0)) - r.products, 0)
            new_steps = max(int(message.get("steps", 0)) - r.steps, 0)
            r.products += new_products
            r.steps += new_steps
            r.step, r.steps_total = int(message.get("step", 0)), message.get("steps_total")
            resumed = r.stalled and (new_products or new_steps)
            if new_products or new_steps:
                r.last_progress, r.stalled = now, False
            r.fraction = self._fraction(r)
            eta = (now - r.started) * (1 - r.fraction) / r.fraction if r.fraction > 0 else math.nan
            log_now = (r.steps or r.products) // self.options.log_every > r.logged_at
            if log_now:
                r.logged_at = (r.steps or r.products) // self.options.log_every
        if self.metrics is not None and new_products:
            self.metrics.hvps.labels(job_name=self.job, kind=r.kind).inc(new_products)
        if self.gauges is not None and new_steps:
            self.gauges.steps.labels(job_name=self.job, kind=r.kind).inc(new_steps)
        self._set_gauges(r.group, progress=r.fraction, eta=eta, stalled=0 if not r.stalled else 1)
        if resumed:
            log.info(
                "[%s] %s @ %s progresses again", self.job, r.kind, r.checkpoint, extra=self._fields("resumed", key)
            )
        if log_now:
            log.info(
                "[%s] %s @ %s: %d products, %d Lanczos steps, %.0f%% done, about %s left",
                self.job,
                r.kind,
                r.checkpoint,
                r.products,
                r.steps,
                100 * r.fraction,
                "?" if math.isnan(eta) else f"{eta:.0f} s",
                extra=self._fields("progress", key, eta_s=None if math.isnan(eta) else round(eta, 3)),
            )
        self._show_bar()

    def finished(self, task: Any, outcome: str, num_matvecs: int | None = None) -> int:
        """Task ``task`` ended (``outcome``: ``succeeded``, ``failed`` or ``retry``); returns the
        products already counted for it, so the caller adds only the rest."""
        with self._lock:
            r = self.running.pop(task.key, None)
            if outcome != "retry":
                self.finished_tasks += 1
            if r is not None and outcome == "succeeded":
                self.counted[task.key] = r.products
        if r is None:
            return 0
        done = outcome == "succeeded"
        self._set_gauges(r.group, progress=1.0 if done else r.fraction, eta=0.0 if done else math.nan, stalled=0)
        log.debug(  # the job's own record of the event (cluster.job_events.ProgressEvents) is the INFO one
            "[%s] %s %s @ %s after %.1f s: %d products, %d Lanczos steps",
            self.job,
            outcome,
            r.kind,
            r.checkpoint,
            self.clock() - r.started,
            max(r.products, num_matvecs or 0),
            r.steps,
            extra=self._fields(f"task_{outcome}", task.key, r=r),
        )
        self._show_bar()
        return r.products

    def take_counted(self, key: str) -> int:
        """The products of succeeded task ``key`` already added to the product counter (once)."""
        with self._lock:
            return self.counted.pop(key, 0)

    def check_stalls(self, now: float | None = None) -> list[str]:
        """Report the running tasks without progress for ``stall_after_s`` (once each, until they
        progress again); returns their keys."""
        now = self.clock() if now is None else now
        stalled = []
        with self._lock:
            for key, r in self.running.items():
                # kinds that may run long without a product (surface, barrier: loss evaluations) are
                # watched once they have made one; the product kinds from their start
                watched = r.expected is not None or r.products > 0
                if watched and not r.stalled and now - r.last_progress >= self.options.stall_after_s:
                    r.stalled = True
                    stalled.append((key, r))
        for key, r in stalled:
            if self.gauges is not None:
                self.gauges.stalled.labels(job_name=self.job, group=str(r.group)).set(1)
                self.gauges.stalls.labels(job_name=self.job, kind=r.kind).inc()
            log.warning(
                "[%s] %s @ %s stalled: no progress for %.0f s (stall time %g s; %d products so far)",
                self.job,
                r.kind,
                r.checkpoint,
                now - r.last_progress,
                self.options.stall_after_s,
                r.products,
                extra=self._fields("stalled", key, r=r),
            )
        return [k for k, _ in stalled]

    # -- helpers

    def _show_bar(self) -> None:
        if self._bar is not None:
            with self._lock:
                n = self.finished_tasks + sum(t.fraction for t in self.running.values())
            self._bar.show(n)

    @staticmethod
    def _fraction(r: _Running) -> float:
        if r.expected:
            return min(r.products / r.expected, 0.99)
        if r.steps_total:
            return min(r.step / r.steps_total, 0.99)
        return 0.0

    def _set_gauges(self, group: int, *, progress: float, eta: float, stalled: int) -> None:
        if self.gauges is None:
            return
        labels = {"job_name": self.job, "group": str(group)}
        self.gauges.progress.labels(**labels).set(progress)
        self.gauges.eta.labels(**labels).set(eta)
        self.gauges.stalled.labels(**labels).set(stalled)
        self.gauges.last_progress.labels(**labels).set(time.time())

    def _fields(self, event: str, key: str, r: _Running | None = None, **more: Any) -> dict:
        """The structured fields of a log record (``extra``): what the JSON format writes."""
        r = r or self.running.get(key)
        fields: dict[str, Any] = {"job": self.job, "event": event, "task_key": key}
        if r is not None:
            fields.update(
                kind=r.kind,
                checkpoint=r.checkpoint,
                group=r.group,
                attempt=r.attempt,
                products=r.products,
                lanczos_steps=r.steps,
                fraction=round(r.fraction, 4),
            )
        fields.update(more)
        return {"fields": fields}


BAR_FORMAT = "{l_bar}{bar}| {n:.2f}/{total} tasks [{elapsed}<{remaining}]"


class _Bar:
    """A tqdm bar over the run's tasks (fractions of running tasks included), on stderr."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="task", dynamic_ncols=True, bar_format=BAR_FORMAT)

    def show(self, n: float) -> None:
        self.bar.n = round(n, 3)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
