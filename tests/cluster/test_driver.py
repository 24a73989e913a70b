"""The driver as values: the failure policy's decisions, one attempt's outcome, the order of
event handlers, and pending-task planning, each without Ray, processes or files."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.checkpoints import CheckpointError
from cluster.driver import (
    Decision,
    Events,
    Failed,
    FailurePolicy,
    GroupSlot,
    JobSummary,
    Retry,
    Stored,
    SummaryEvents,
    attempt,
    run_tasks,
)
from cluster.groups import TaskError, WorkerLost
from cluster.plan import Task, pending_tasks


@dataclass(frozen=True)
class FakeTask:
    key: str
    kind: str = "trace"
    checkpoint: str = "c.safetensors"
    row_keys: tuple = ()

    def payload(self) -> dict:
        return {"key": self.key}


class FakeGroup:
    """Answers each task by a script: a record, or an exception to raise."""

    built = 0

    def __init__(self, script: dict) -> None:
        FakeGroup.built += 1
        self.script, self.closed, self.info = script, False, [{"device": "cpu"}]

    def run(self, payload: dict) -> dict:
        answer = self.script[payload["key"]].pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def close(self) -> None:
        self.closed = True


def test_policy_restarts_a_lost_worker_while_attempts_remain_and_fails_everything_else():
    policy = FailurePolicy(max_restarts=2)
    assert [policy.decide(WorkerLost("x"), a) for a in (1, 2, 3)] == [Decision.RESTART, Decision.RESTART, Decision.FAIL]
    assert policy.decide(TaskError("bad", category="bad_checkpoint"), 1) is Decision.FAIL
    assert Decision.RESTART == "restart"  # the values read as the words they always were


def test_one_attempt_is_a_value():
    slot = GroupSlot(
        lambda: FakeGroup(
            {"a": [{"duration_s": 1.0}], "b": [TaskError("no", category="non_finite")], "c": [WorkerLost("gone")]}
        )
    )
    ok = attempt(slot, FakeTask("a"), 1, FailurePolicy())
    assert isinstance(ok, Stored) and ok.record == {"duration_s": 1.0} and ok.device == "cpu"
    failed = attempt(slot, FakeTask("b"), 1, FailurePolicy())
    assert isinstance(failed, Failed) and failed.category == "non_finite" and slot.group is not None
    retry = attempt(slot, FakeTask("c"), 1, FailurePolicy())
    assert isinstance(retry, Retry) and slot.group is None  # a lost worker's group is dropped
    unusable = GroupSlot(lambda: FakeGroup({"d": [TaskError("stuck", group_usable=False)]}))
    assert isinstance(attempt(unusable, FakeTask("d"), 1, FailurePolicy()), Failed) and unusable.group is None


class Recorder(Events):
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def stored(self, outcome, rows):
        self.log.append((self.name, "stored", outcome.task.key, len(rows)))

    def failed(self, outcome):
        self.log.append((self.name, "failed", outcome.task.key, outcome.category))

    def retrying(self, outcome):
        self.log.append((self.name, "retrying", outcome.task.key, outcome.attempts))

    def job_error(self, error):
        self.log.append((self.name, "job_error", type(error).__name__))


def test_run_tasks_sends_each_outcome_to_every_handler_in_order():
    script = {"a": [{"x": 1}], "b": [WorkerLost("gone"), {"x": 2}], "c": [TaskError("bad", category="bad_checkpoint")]}
    groups = []

    def make(i):
        groups.append(FakeGroup(script))
        return groups[-1]

    log: list = []
    summary = JobSummary("r", "j", "out", num_tasks=3)
    errors = run_tasks(
        [FakeTask("a"), FakeTask("b"), FakeTask("c")],
        num_groups=1,
        make_group=make,
        policy=FailurePolicy(1),
        rows_of=lambda o: [{"k": o.task.key}] * 2,
        handlers=[Recorder("first", log), Recorder("second", log), SummaryEvents(summary)],
    )
    assert errors == []
    assert log == [
        ("first", "stored", "a", 2),
        ("second", "stored", "a", 2),
        ("first", "retrying", "b", 1),
        ("second", "retrying", "b", 1),
        ("first", "stored", "b", 2),
        ("second", "stored", "b", 2),
        ("first", "failed", "c", "bad_checkpoint"),
        ("second", "failed", "c", "bad_checkpoint"),
    ]
    assert (summary.num_done, summary.num_failed, summary.restarts) == (2, 1, 1) and len(summary.records) == 4
    assert len(groups) == 2 and all(g.closed for g in groups)  # rebuilt after the lost worker, closed at the end


def test_a_handler_that_fails_stops_its_group_as_a_job_error():
    class FailingStore(Events):
        def stored(self, outcome, rows):
            raise CheckpointError("cannot write")  # any typed error: the job stops with it

    log: list = []
    errors = run_tasks(
        [FakeTask("a"), FakeTask("b")],
        num_groups=1,
        make_group=lambda i: FakeGroup({"a": [{"x": 1}], "b": [{"x": 2}]}),
        policy=FailurePolicy(),
        rows_of=lambda o: [{}],
        handlers=[FailingStore(), Recorder("after", log)],
    )
    assert [type(e).__name__ for e in errors] == ["CheckpointError"]
    assert log == [("after", "job_error", "CheckpointError")]  # later handlers saw no stored event


def test_pending_tasks_drop_what_is_stored_and_shrink_series_to_their_missing_rows():
    plain = Task("a.pt", "sha-a", "trace", {}, 0, "k1")
    series = Task(
        "c.pt",
        "sha-c",
        "eos",
        {"series": ["a.pt", "b.pt", "c.pt"], "series_steps": [10, 20, 30]},
        1,
        "k-series",
        ("r1", "r2", "r3"),
    )
    todo = pending_tasks([plain, series], {"trace": {"k1"}, "eos": {"r2"}})
    assert len(todo) == 1
    (left,) = todo
    assert left.row_keys == ("r1", "r3") and left.options["series"] == ["a.pt", "c.pt"]
    assert left.options["series_steps"] == [10, 30] and left.key != series.key
    assert pending_tasks([plain, series], {"trace": set(), "eos": set()}) == [plain, series]
    assert pending_tasks([plain, series], {"trace": {"k1"}, "eos": {"r1", "r2", "r3"}}) == []
