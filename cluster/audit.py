"""The audit service: probe every checkpoint of a folder once, now or on a schedule.

``probe audit SPEC --once`` runs one pass (and, with ``--pushgateway URL`` or
``$PROMETHEUS_PUSHGATEWAY``, pushes its metrics to a Prometheus Pushgateway, since it
exits before any scrape); ``--every 30m`` runs a pass, sleeps, and repeats until
stopped (SIGTERM or SIGINT end it after the current pass), serving ``/metrics``. A pass:

1. takes the job's audit lock (``output.path/.audit-<job>.lock``, an exclusive
   ``flock``): a second audit of the same job waits for the first and then finds
   its work stored, so two audits never run a task twice or write a row twice;
2. discovers checkpoints (``model.checkpoints``: files, folders, globs, sharded
   safetensors indexes, training-run folders of ``checkpoint-N/`` subfolders) and
   hashes their contents; an existing folder or a glob that matches nothing yet is
   an empty series, not an error (a warning line; the checkpoint gauge reads 0);
3. plans the job's tasks and leaves out those stored already (the task key covers
   the checkpoint's content hash and the probe's resolved options, so a changed
   probe config or a rewritten checkpoint is audited again) and those backing off;
4. runs the rest through :func:`cluster.job.run_job`, which stores each result as
   it finishes and records each failure (``output.path/failures/``) with its reason;
5. sets the series' headline gauges from the stored rows of its latest checkpoint
   and the audit progress metrics.

Backoff: a task that failed ``n`` times is retried no sooner than
``min(base · 2^(n−1), cap)`` after its last failure (defaults 5 min and 6 h),
counted from the ``failures`` dataset, so the schedule survives restarts. A pass
that cannot run at all (cluster unreachable, results folder unwritable) is
retried after 1, 2, 4, … minutes, never later than the next scheduled pass.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from cluster.checkpoints import CheckpointError, checkpoint_sha256, expand_checkpoints, hashed_files
from cluster.job import choose_backend, run_job
from cluster.kinds import KINDS
from cluster.metrics import PUSH_JOB, Metrics
from cluster.plan import Task
from cluster.spec import JobSpec
from cluster.store import ResultStore

__all__ = ["parse_duration", "AuditLock", "PassReport", "Auditor", "audit_main", "BACKOFF_BASE_S", "BACKOFF_CAP_S"]

BACKOFF_BASE_S = 300.0
BACKOFF_CAP_S = 6 * 3600.0
PASS_RETRY_BASE_S = 60.0

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in a duration like ``90s``, ``30m``, ``1h30m`` or ``2d`` (a bare number is seconds).

    Raises:
        ValueError: naming the text and the accepted form.
    """
    t = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", t)
        if not parts or "".join(n + u for n, u in parts) != t:
            raise ValueError(f"duration {text!r} not understood; write e.g. 90s, 30m, 1h30m or 2d")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return seconds


class AuditLock:
    """An exclusive ``flock`` on ``<root>/.audit-<job>.lock``, held for one pass.

    The lock file is never deleted (deleting a lock file lets two holders race);
    it holds the current holder's host and pid for the waiting message. The kernel
    drops the lock when the holder dies, so a crashed audit never blocks the next.
    """

    def __init__(self, root: str | os.PathLike, job: str, *, progress: Callable[[str], None] = print) -> None:
        self.path = Path(root) / f".audit-{quote(job, safe='')}.lock"
        self.progress = progress
        self._file = None

    def __enter__(self) -> AuditLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            self.progress(f"audit lock {self.path.name} is held by {holder}; waiting for its pass to finish")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


@dataclass
class PassReport:
    """What one audit pass did."""

    checkpoints: int = 0
    ran: int = 0
    stored: int = 0
    failed: int = 0
    backing_off: int = 0
    duration_s: float = 0.0
    failures: list[dict] = field(default_factory=list)
    retry_at: float | None = None  # earliest time a backing-off task may run again

    @property
    def ok(self) -> bool:
        return self.failed == 0


def _discover(entries: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Checkpoint files of ``entries``, and notes for entries that match nothing yet (a folder,
    a run folder whose ``checkpoint-N/`` hold no weights yet, or a glob)."""
    found, notes = [], []
    for entry in entries:
        try:
            found.extend(expand_checkpoints([entry]))
        except CheckpointError as exc:
            if Path(entry).is_dir() or any(ch in entry for ch in "*?["):
                why = str(exc).rsplit("; ", 1)[-1] if Path(entry).is_dir() else ""
                why = why if why.startswith("found") else ""
                notes.append(f"{entry!r} holds no checkpoint yet{f' ({why})' if why else ''}")
            else:
                raise
    return list(dict.fromkeys(found)), notes


class Auditor:
    """Audit passes over one job spec.

    Args:
        spec: the job spec; ``model.checkpoints`` names what to watch.
        backend: as for :func:`cluster.job.run_job`; ``"auto"`` chooses as ``probe run`` does.
        metrics: Prometheus metrics to update (job, audit progress and headline gauges).
        progress: receives one-line progress messages.
        clock: wall-clock seconds (injectable so backoff can be tested without waiting).
    """

    def __init__(
        self,
        spec: JobSpec,
        *,
        backend: str = "auto",
        metrics: Metrics | None = None,
        progress: Callable[[str], None] = print,
        clock: Callable[[], float] = time.time,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
    ) -> None:
        self.spec = spec
        self.backend = choose_backend(spec) if backend == "auto" else backend
        self.metrics = metrics
        self.progress = progress
        self.clock = clock
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.store = ResultStore(spec.output.path)
        self.passes = 0
        self._hashes: dict[str, tuple[tuple, str]] = {}  # path -> ((size, mtime_ns) per file, sha256)

    def _content_hash(self, path: str) -> str:
        """``checkpoint_sha256``, computed again only when the size or modification time of a file
        it covers (the file, an index's shards, the folder's config.json) changed: a pass over a
        folder of large checkpoints does not reread every one of them."""
        files = hashed_files(path)
        stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        cached = self._hashes.get(path)
        if cached is None or cached[0] != stamp:
            cached = self._hashes[path] = (stamp, checkpoint_sha256(path))
        return cached[1]

    def backoff_delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure of a task."""
        return min(self.backoff_base_s * 2 ** max(failures - 1, 0), self.backoff_cap_s)

    @staticmethod
    def pass_retry_delay(errors_in_row: int, every_s: float) -> float:
        """Seconds to wait after the ``errors_in_row``-th consecutive pass that could not run:
        1, 2, 4, … minutes, never later than the next scheduled pass (``every_s``)."""
        return min(PASS_RETRY_BASE_S * 2 ** (errors_in_row - 1), every_s)

    def _failure_history(self) -> dict[str, tuple[int, float]]:
        """``task_key -> (failures, unix time of the last one)`` for this job."""
        table = self.store.read("failures")
        history: dict[str, tuple[int, float]] = {}
        for row in table.select(["job", "task_key", "created_at"]).to_pylist():
            if row["job"] != self.spec.name:
                continue
            n, last = history.get(row["task_key"], (0, 0.0))
            history[row["task_key"]] = (n + 1, max(last, row["created_at"].timestamp()))
        return history

    def run_pass(self) -> PassReport:
        """One pass under the audit lock; returns what it did."""
        t0 = time.perf_counter()
        spec, name = self.spec, self.spec.name
        self.passes += 1
        report = PassReport()
        with AuditLock(spec.output.path, name, progress=self.progress):
            paths, notes = _discover(spec.model.checkpoints)
            for note in notes:
                self.progress(f"[{name}] audit: warning: {note}")
            checkpoints = []
            for p in paths:
                try:
                    checkpoints.append((p, self._content_hash(p)))
                except (OSError, CheckpointError) as exc:  # vanished or unreadable since listed
                    report.failed += 1
                    report.failures.append({"checkpoint": p, "kind": "discovery", "reason": str(exc)})
                    self.progress(f"[{name}] audit: cannot read {p!r}: {exc}")
                    if self.metrics:
                        self.metrics.failure(name, "bad_checkpoint")
            report.checkpoints = len(checkpoints)
            history, now = self._failure_history(), self.clock()
            retry_at: list[float] = []

            def backing_off(task: Task) -> bool:
                keys = task.row_keys or (task.key,)
                waits = [history[k][1] + self.backoff_delay(history[k][0]) for k in keys if k in history]
                if waits and min(waits) > now:
                    retry_at.append(min(waits))
                    return True
                return False

            summary = (
                run_job(
                    spec,
                    backend=self.backend,
                    progress=self.progress,
                    metrics=self.metrics,
                    checkpoints=checkpoints,
                    exclude=backing_off,
                )
                if checkpoints
                else None
            )
            if summary is not None:
                report.ran, report.stored = summary.num_done, summary.num_skipped
                report.failed += summary.num_failed
                report.failures += summary.failures
            report.backing_off = len(retry_at)
            report.retry_at = min(retry_at) if retry_at else None
            self._set_headlines([p for p, _ in checkpoints])
        report.duration_s = time.perf_counter() - t0
        if self.metrics:
            m = self.metrics
            m.audit_passes.labels(job_name=name, outcome="succeeded").inc()
            m.audit_last_pass.labels(job_name=name).set(self.clock())
            m.audit_last_success.labels(job_name=name).set(self.clock())
            m.audit_checkpoints.labels(job_name=name).set(report.checkpoints)
            m.audit_pending.labels(job_name=name).set(report.failed + report.backing_off)
        retry = ""
        if report.retry_at is not None:
            retry = f" (next retry in {max(report.retry_at - self.clock(), 0) / 60:.0f} min)"
        self.progress(
            f"[{name}] audit pass {self.passes}: {report.checkpoints} checkpoint(s), {report.ran} task(s) run, "
            f"{report.stored} already stored, {report.failed} failed, {report.backing_off} backing off{retry}; "
            f"{report.duration_s:.1f} s"
        )
        return report

    def _set_headlines(self, order: list[str]) -> None:
        """Headline gauges of the series from the stored rows of its latest checkpoints."""
        if not self.metrics or not order:
            return
        name, m = self.spec.name, self.metrics
        rank = {p: i for i, p in enumerate(order)}

        tables: dict[str, list[dict]] = {}

        def job_rows(kind: str) -> list[dict]:
            """The series' rows of ``kind``, in stored order."""
            if kind not in tables:
                t = self.store.read(kind)
                tables[kind] = [r for r in t.to_pylist() if r["job"] == name] if t.num_rows else []
            return tables[kind]

        def rows(kind: str) -> list[dict]:
            """Rows about the series' checkpoints, in checkpoint order (then creation)."""
            out = [r for r in job_rows(kind) if r["checkpoint"] in rank]
            return sorted(out, key=lambda r: (rank[r["checkpoint"]], r["created_at"]))

        lam: dict[str, float] = {}
        # the Hessian's λ_max (never Adam's λ_max(P⁻¹H)); where several kinds hold one for a
        # checkpoint, the kind of higher Headline.lambda_max_priority wins (eigenvalues over
        # sharpness over critical over eos)
        holders = sorted(
            ((k, k.headline.lambda_max) for k in KINDS.values() if k.headline.lambda_max is not None),
            key=lambda holder: holder[0].headline.lambda_max_priority,
        )
        for kind, lambda_max in holders:
            for r in rows(kind.name):
                value = lambda_max(r)
                if value is not None:
                    lam[r["checkpoint"]] = value
        series = sorted(lam, key=rank.__getitem__)
        if series:
            m.lambda_max.labels(series=name).set(lam[series[-1]])
            if len(series) > 1 and lam[series[-2]] != 0:
                m.lambda_max_change.labels(series=name).set((lam[series[-1]] - lam[series[-2]]) / abs(lam[series[-2]]))
        # the other gauges (Headline.gauges): the latest checkpoint's row, or the newest row
        latest: dict[tuple, float] = {}
        with_gauges = [(k, k.headline.gauges) for k in KINDS.values() if k.headline.gauges is not None]
        for kind, gauges in with_gauges:
            by_checkpoint = rows(kind.name)
            by_time = sorted(job_rows(kind.name), key=lambda r: r["created_at"])
            for latest_by, ordered in (("checkpoint", by_checkpoint), ("time", by_time)):
                for r in ordered:
                    for g in gauges(r):
                        if g.latest == latest_by:
                            latest[(g.name, g.labels)] = g.value
        for (gauge, labels), value in latest.items():
            getattr(m, gauge).labels(series=name, **dict(labels)).set(value)
        # one value per training step, from every row stored for the series: the trends over
        # training include checkpoints a run has deleted since (save_total_limit)
        for kind in dict.fromkeys(p.kind for p in self.spec.probes):
            m.checkpoint_values(name, kind, sorted(job_rows(kind), key=lambda r: r["created_at"]))

    def run(
        self,
        every_s: float | None = None,
        *,
        max_passes: int | None = None,
        stop: threading.Event | None = None,
        sleep: Callable[[float], object] | None = None,
    ) -> PassReport:
        """Run passes every ``every_s`` seconds (one pass when None) until ``stop`` is set or
        ``max_passes`` passes have run; returns the last pass's report.

        A pass that raises is counted (``outcome="failed"``) and retried after
        1, 2, 4, … minutes, capped at ``every_s`` (:meth:`pass_retry_delay`); with
        ``every_s=None`` it propagates. ``sleep(seconds)`` waits between passes
        (default ``stop.wait``, which returns early once ``stop`` is set); tests pass
        one that records the waits instead of waiting.
        """
        stop = stop or threading.Event()
        sleep = sleep or stop.wait
        errors_in_row, last = 0, PassReport()
        while not stop.is_set():
            started = time.monotonic()
            try:
                last = self.run_pass()
                errors_in_row = 0
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - a scheduled service must outlive one bad pass
                if self.metrics:
                    self.metrics.audit_passes.labels(job_name=self.spec.name, outcome="failed").inc()
                    self.metrics.audit_last_pass.labels(job_name=self.spec.name).set(self.clock())
                if every_s is None:
                    raise
                errors_in_row += 1
                wait = self.pass_retry_delay(errors_in_row, every_s)
                self.progress(
                    f"[{self.spec.name}] audit pass failed ({errors_in_row} in a row): "
                    f"{type(exc).__name__}: {exc}; retrying in {wait:.0f} s"
                )
            if every_s is None or (max_passes is not None and self.passes >= max_passes):
                break
            # passes start on a fixed cadence; a failed pass is retried after its backoff
            remaining = max(every_s - (time.monotonic() - started), 0.0) if errors_in_row == 0 else wait
            self.progress(f"[{self.spec.name}] next audit pass in {remaining:.0f} s")
            sleep(remaining)
        return last


def audit_main(args) -> int:
    """``probe audit``: exit 0 when the last pass had no failed task, 1 otherwise."""
    from cluster.metrics import DEFAULT_PORT, serve
    from cluster.spec import SpecError, load_spec

    spec = load_spec(args.spec, args.overrides)
    try:
        every = parse_duration(args.every) if args.every else None
    except ValueError as exc:
        raise SpecError(f"--every: {exc}") from None
    gateway = getattr(args, "pushgateway", None)
    if gateway and every:
        raise SpecError(
            f"--pushgateway {gateway}: only --once audits push (they exit before a scrape); "
            "an --every audit serves /metrics for Prometheus to scrape: drop --pushgateway"
        )
    gateway = None if every else gateway or os.environ.get("PROMETHEUS_PUSHGATEWAY") or None
    metrics = Metrics()
    auditor = Auditor(spec, metrics=metrics)
    if auditor.backend == "ray":
        from cluster.raytools import connect

        connect(spec.cluster.address, num_cpus=None)
    port = args.metrics_port if args.metrics_port is not None else (DEFAULT_PORT if every else None)
    server = None
    if port is not None:
        server, _ = serve(metrics, port=port, addr=args.metrics_addr)
        print(f"metrics at http://{args.metrics_addr}:{server.server_port}/metrics", file=sys.stderr, flush=True)
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        auditor.progress(f"[{spec.name}] {signal.Signals(signum).name}: stopping after this pass")
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if every else {}
    try:
        report = auditor.run(every, max_passes=args.max_passes, stop=stop)
    except Exception:
        if gateway:  # the failed pass's counter and time; the last completed pass's time stays
            _push(metrics, gateway, spec.name, families=("audit_passes", "audit_last_pass", "build_info"))
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if server is not None:
            server.shutdown()
    if gateway:
        _push(metrics, gateway, spec.name)
    return 0 if report.ok else 1


def _push(metrics: Metrics, gateway: str, audit: str, families: tuple[str, ...] | None = None) -> None:
    """Push to the Pushgateway; one line on stderr when that fails (the results are stored:
    the audit's exit status stays the pass's, and the staleness alert notices a missing push)."""
    from cluster.metrics import push

    try:
        push(metrics, gateway, audit=audit, families=families)
    except OSError as exc:
        print(f"probe audit: warning: could not push metrics to the Pushgateway {gateway}: {exc}", file=sys.stderr)
    else:
        print(f"metrics pushed to {gateway} (job={PUSH_JOB}, audit={audit})", file=sys.stderr, flush=True)
