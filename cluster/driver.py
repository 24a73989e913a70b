"""The job driver's machinery as values: decisions, attempt outcomes and event handlers.

:func:`cluster.job.run_job` plans a job (pure functions in :mod:`cluster.job`), then
hands each pending task to :func:`run_tasks`, which runs them on worker groups.
One attempt of a task is :func:`attempt`, which returns a value:

- :class:`Stored`: the task's record (rows not yet written);
- :class:`Failed`: the error, its category (``cluster.errors.category_of``) and the
  attempts spent;
- :class:`Retry`: the group lost a worker and the policy grants another attempt.

What follows from an outcome (Parquet rows, failure rows, Prometheus metrics,
progress lines, the summary) is done by the handlers of :class:`Events`, called in
that order; each handler is one small class with a method per event, so storage,
metrics and progress stay apart and are tested apart. The failure policy returns
a :class:`Decision`.
"""

from __future__ import annotations

import enum
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster.errors import category_of
from cluster.groups import TaskError, WorkerLost

__all__ = [
    "Decision",
    "FailurePolicy",
    "Stored",
    "Failed",
    "Retry",
    "Outcome",
    "attempt",
    "Events",
    "JobSummary",
    "SummaryEvents",
    "run_tasks",
]


class Decision(enum.StrEnum):
    """What a failed attempt leads to."""

    RESTART = "restart"  # rebuild the group, run the task again
    FAIL = "fail"  # record the failure, go on with the next task


@dataclass(frozen=True)
class FailurePolicy:
    """Decides what a failed task attempt leads to: :attr:`Decision.RESTART` for a lost worker
    while attempts remain, :attr:`Decision.FAIL` otherwise or for task errors that a restart
    cannot fix (a bad checkpoint, a non-finite loss)."""

    max_restarts: int = 3

    def decide(self, error: BaseException, attempts: int) -> Decision:
        if isinstance(error, WorkerLost) and attempts <= self.max_restarts:
            return Decision.RESTART
        return Decision.FAIL


@dataclass(frozen=True)
class Stored:
    """A task whose record was written: its ``record``, after ``attempts`` attempts, on ``device``."""

    task: Any
    record: dict
    attempts: int
    device: str


@dataclass(frozen=True)
class Failed:
    """A task that failed for good: the last ``error`` after ``attempts`` attempts."""

    task: Any
    error: BaseException
    attempts: int

    @property
    def category(self) -> str:
        return category_of(self.error)


@dataclass(frozen=True)
class Retry:
    """A task that lost its worker and runs again (:attr:`Decision.RESTART`)."""

    task: Any
    error: BaseException
    attempts: int


Outcome = Stored | Failed | Retry


class Group(Protocol):
    info: list

    def run(self, task: dict) -> dict: ...

    def close(self) -> None: ...


class GroupSlot:
    """One worker group, built on first use and rebuilt after a worker is lost."""

    def __init__(self, make: Callable[[], Group]) -> None:
        self._make = make
        self.group: Group | None = None

    def get(self) -> Group:
        if self.group is None:
            self.group = self._make()
        return self.group

    def discard(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


def attempt(
    slot: GroupSlot, task, attempts: int, policy: FailurePolicy, on_start: Callable[[Any, int], None] | None = None
) -> Outcome:
    """Run one attempt of ``task`` on the slot's group; the group is dropped when it may be unusable."""
    try:
        group = slot.get()
        if on_start:
            on_start(task, attempts)
        record = group.run(task.payload())
    except (WorkerLost, TaskError) as exc:
        if isinstance(exc, WorkerLost) or not getattr(exc, "group_usable", True):
            slot.discard()
        if policy.decide(exc, attempts) is Decision.RESTART:
            return Retry(task, exc, attempts)
        return Failed(task, exc, attempts)
    return Stored(task, record, attempts, str(group.info[0].get("device", "cpu")))


class Events:
    """Handlers of the driver's events; every method is optional (a no-op here)."""

    def started(self, task: Any, attempts: int, group: int) -> None:
        """Attempt ``attempts`` of ``task`` starts on group ``group`` (its index, ``0..num_groups-1``)."""

    def stored(self, outcome: Stored, rows: list[dict]) -> None:
        """A task finished; ``rows`` are its complete result rows."""

    def failed(self, outcome: Failed) -> None:
        """A task failed for good."""

    def retrying(self, outcome: Retry) -> None:
        """A task lost a worker and runs again."""

    def job_error(self, error: BaseException) -> None:
        """A group could not continue (placement, a result write): the job stops with this error."""


@dataclass
class JobSummary:
    """What a job did: task counts by outcome, restarts, the failures and the stored records."""

    run_id: str
    job: str
    output: str
    num_tasks: int = 0
    num_done: int = 0
    num_skipped: int = 0
    num_failed: int = 0
    restarts: int = 0
    failures: list[dict] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.num_failed == 0


class SummaryEvents(Events):
    """Counts outcomes into a :class:`JobSummary` (thread-safe: groups run concurrently)."""

    def __init__(self, summary: JobSummary) -> None:
        self.summary = summary
        self._lock = threading.Lock()

    def stored(self, outcome: Stored, rows: list[dict]) -> None:
        with self._lock:
            self.summary.num_done += 1
            self.summary.records.extend(rows)

    def failed(self, outcome: Failed) -> None:
        t = outcome.task
        with self._lock:
            self.summary.num_failed += 1
            self.summary.failures.append(
                {"task": t.key, "checkpoint": t.checkpoint, "kind": t.kind, "reason": str(outcome.error)}
            )

    def retrying(self, outcome: Retry) -> None:
        with self._lock:
            self.summary.restarts += 1


def run_tasks(
    todo: Sequence,
    *,
    num_groups: int,
    make_group: Callable[[int], Group],
    policy: FailurePolicy,
    rows_of: Callable[[Stored], list[dict]],
    handlers: Sequence[Events],
    on_start: Callable[[Any, int], None] | None = None,
) -> list[BaseException]:
    """Run ``todo`` on ``num_groups`` groups taking tasks from one queue; returns the errors that
    stopped a group (each also sent to the handlers' ``job_error``)."""
    work: queue.Queue = queue.Queue()
    for t in todo:
        work.put(t)
    errors: list[BaseException] = []

    def emit(event: str, *args) -> None:
        for h in handlers:
            getattr(h, event)(*args)

    def serve(index: int) -> None:
        slot = GroupSlot(lambda: make_group(index))
        try:
            while True:
                try:
                    task = work.get_nowait()
                except queue.Empty:
                    return
                attempts = 0
                while True:
                    attempts += 1
                    emit("started", task, attempts, index)
                    outcome = attempt(slot, task, attempts, policy, on_start)
                    if isinstance(outcome, Retry):
                        emit("retrying", outcome)
                        continue
                    if isinstance(outcome, Failed):
                        emit("failed", outcome)
                    else:
                        emit("stored", outcome, rows_of(outcome))
                    break
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller in the driver thread
            errors.append(exc)
            emit("job_error", exc)
        finally:
            slot.discard()

    threads = [threading.Thread(target=serve, args=(i,), daemon=True) for i in range(num_groups)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return errors
