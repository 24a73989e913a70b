"""Live progress (cluster/progress.py, cluster/progress_worker.py, cluster/logs.py): a held
spectrum task scraped over HTTP mid-task, stalls, the worker hook's batching and the JSON log lines."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from types import SimpleNamespace

import pytest
import yaml
from scraping import scrape  # tests/cluster/scraping.py
from slow_loss import GATE  # tests/cluster/slow_loss.py

from cluster.cli import main
from cluster.job import run_job
from cluster.logs import JsonFormatter, configure, reset
from cluster.metrics import Metrics, serve
from cluster.progress import ProgressHub, ProgressMetrics, ProgressOptions, expected_products
from cluster.progress_worker import ProgressClient, TaskProgress
from cluster.spec import load_spec
from cluster.store import ResultStore

JOB = "slow"
GROUP = (("group", "0"), ("job_name", JOB))
HVPS = ("landscape_probe_hvp_total", (("job_name", JOB), ("kind", "spectrum")))
PROGRESS = ("landscape_probe_task_progress_ratio", GROUP)
ETA = ("landscape_probe_task_eta_seconds", GROUP)
STALLED = ("landscape_probe_task_stalled", GROUP)
STALLS = ("landscape_probe_task_stalls_total", (("job_name", JOB), ("kind", "spectrum")))
WAIT_S = 120  # an upper bound for conditions that hold within a second or two; never a measurement


def scrape_until(port: int, condition) -> dict:
    """Scrape until ``condition(samples)`` holds (the hub handles workers' messages on its own thread)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        samples = scrape(port)
        if condition(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


@pytest.fixture
def served():
    metrics = Metrics()
    server, _ = serve(metrics, port=0)
    yield metrics, server.server_port
    server.shutdown()


@pytest.fixture
def slow_spec(tmp_path, checkpoints):
    """A spectrum task in train mode (the loss runs for every product) whose loss ``slow_loss:gated``
    holds its 20th call (of about 90) until the test opens the gate."""
    spec = {
        "name": JOB,
        "model": {"factory": "probe.models:digits_mlp", "kwargs": {"hidden": 16}, "checkpoints": [str(checkpoints[0])]},
        "data": {"factory": "cluster.data:digits", "num_examples": 96, "batch_size": 48},
        "precision": "float64",
        "mode": "train",
        "loss": {"factory": "slow_loss:gated"},
        "probes": [{"kind": "spectrum", "runs": 2, "steps": 20, "deflate": 0}],
        "cluster": {"backend": "local"},
        "output": {"path": str(tmp_path / "results")},
        "seed": 7,
    }
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(spec))
    GATE.reset(at=20)
    yield load_spec(path)
    GATE.open()  # never leave the worker held


def start_job(spec, metrics, options: ProgressOptions) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["summary"] = run_job(
                spec, backend="local", metrics=metrics, progress=lambda m: None, progress_options=options
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_products_and_progress_move_before_a_slow_spectrum_task_ends(slow_spec, served):
    metrics, port = served
    thread, out = start_job(slow_spec, metrics, ProgressOptions(interval_s=0))
    assert GATE.reached.wait(WAIT_S), out.get("error")  # the worker is held part-way through the task

    mid = scrape_until(port, lambda s: s.get(HVPS, 0) > 0 and s.get(PROGRESS, 0) > 0)
    assert thread.is_alive() and not ResultStore(slow_spec.output.path).done_task_keys("spectrum", JOB)
    assert mid[HVPS] > 0 and 0 < mid[PROGRESS] < 1
    assert math.isfinite(mid[ETA]) and mid[ETA] > 0 and mid[STALLED] == 0
    assert mid[("landscape_probe_lanczos_steps_total", (("job_name", JOB), ("kind", "spectrum")))] >= 1
    assert ("landscape_probe_tasks_done", (("job_name", JOB),)) in mid and mid[
        ("landscape_probe_tasks_done", (("job_name", JOB),))
    ] == 0

    GATE.open()
    thread.join(WAIT_S)
    assert not thread.is_alive() and "error" not in out
    end = scrape(port)
    (record,) = out["summary"].records
    # counted as they happened plus the rest at the end: each product once
    assert (
        end[HVPS]
        == record["num_matvecs"]
        == expected_products("spectrum", {"runs": 2, "steps": 20, "deflate": 0})
        == 42
    )
    assert end[PROGRESS] == 1 and end[ETA] == 0
    assert end[HVPS] >= mid[HVPS]


def test_a_task_without_progress_is_reported_stalled_and_recovers(slow_spec, served, caplog):
    metrics, port = served
    caplog.set_level(logging.INFO, logger="landscape_probe")
    thread, out = start_job(slow_spec, metrics, ProgressOptions(interval_s=0, stall_after_s=0.2))
    assert GATE.reached.wait(WAIT_S), out.get("error")

    held = scrape_until(port, lambda s: s.get(STALLED) == 1)
    assert held[STALLED] == 1 and held[STALLS] >= 1 and thread.is_alive()
    stalls = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "stalled"]
    assert stalls and stalls[0].levelno == logging.WARNING and "stalled: no progress for" in stalls[0].getMessage()
    assert stalls[0].fields["kind"] == "spectrum" and stalls[0].fields["products"] > 0

    GATE.open()
    thread.join(WAIT_S)
    assert not thread.is_alive() and "error" not in out
    assert scrape(port)[STALLED] == 0
    assert any(getattr(r, "fields", {}).get("event") == "resumed" for r in caplog.records)


def test_stall_detection_reports_once_per_stall_and_clears_on_progress():
    now = [0.0]
    metrics = Metrics()
    hub = ProgressHub("j", metrics=metrics, options=ProgressOptions(stall_after_s=900), clock=lambda: now[0])
    task = SimpleNamespace(key="k1", kind="trace", checkpoint="a.pt", options={"matvecs": 98})
    hub.started(task, 1, group=0)
    stalled = ProgressMetrics.of(metrics.registry)
    now[0] = 899.0
    assert hub.check_stalls() == []
    now[0] = 900.0
    assert hub.check_stalls() == ["k1"] and hub.check_stalls() == []  # reported once
    assert stalled.stalled.labels(job_name="j", group="0")._value.get() == 1
    hub.update({"task": "k1", "products": 50, "steps": 0})
    assert stalled.stalled.labels(job_name="j", group="0")._value.get() == 0
    assert stalled.progress.labels(job_name="j", group="0")._value.get() == 0.5  # 50 of 98 + 2 symmetry products
    assert metrics.hvps.labels(job_name="j", kind="trace")._value.get() == 50
    now[0] = 1799.0
    assert hub.check_stalls() == []
    now[0] = 1800.0
    assert hub.check_stalls() == ["k1"]  # a second stall of the same task
    assert stalled.stalls.labels(job_name="j", kind="trace")._value.get() == 2
    assert hub.finished(task, "succeeded", 100) == 50 and hub.take_counted("k1") == 50 and hub.take_counted("k1") == 0
    assert hub.check_stalls(now=10_000.0) == []  # finished tasks never stall


def test_the_worker_hook_batches_messages_and_counts_each_pass_once():
    now, sent, ray = [0.0], [], []
    hook = TaskProgress(sent.append, "k", interval_s=1.0, on_products=ray.append, clock=lambda: now[0])
    for _ in range(100):  # a burst within one interval: one message
        hook.products(2)
    assert len(sent) == 1 and sent[0]["products"] == 2
    now[0] = 1.0
    hook.steps(1, 10)
    assert len(sent) == 2 and sent[-1]["products"] == 200 and sent[-1]["steps"] == 1
    for step in range(2, 11):
        hook.steps(step, 10)
    hook.steps(1, 5)  # a second pass starts again at 1
    hook.flush()
    assert sent[-1] == {"task": "k", "products": 200, "steps": 11, "step": 1, "steps_total": 5}
    assert sum(ray) == 200 and hook.sent_products == 200


def test_an_unreachable_driver_never_fails_the_task():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens
    client = ProgressClient(["127.0.0.1", port], "00" * 16)
    client({"task": "k", "products": 1})
    client({"task": "k", "products": 2})  # quiet after the first failure
    client.close()


def test_a_client_without_the_key_is_refused_and_the_hub_keeps_serving():
    hub = ProgressHub("j", options=ProgressOptions()).start()
    try:
        task = SimpleNamespace(key="k", kind="trace", checkpoint="a.pt", options={"matvecs": 10})
        hub.started(task, 1, group=0)
        channel = hub.channel("k")
        ProgressClient(channel["address"], "11" * 16)({"task": "k", "products": 5})  # wrong key: refused
        good = ProgressClient(channel["address"], channel["authkey"])
        good({"task": "k", "products": 3})
        deadline = time.monotonic() + WAIT_S
        while hub.running["k"].products != 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hub.running["k"].products == 3
        good.close()
    finally:
        hub.close()


def test_json_log_lines_parse_back_with_their_fields(make_spec, capsys):
    path = make_spec(name="logged", probes=[{"kind": "trace", "matvecs": 6}], cluster={"backend": "local"})
    assert main(["run", str(path), "--log-format", "json"]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.err.splitlines()]
    assert captured.out == ""  # every line is a record on stderr
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert all(r["logger"].startswith("landscape_probe.") for r in records)
    events = [r.get("event") for r in records]
    assert events.count("task_started") == 2 and events.count("task_succeeded") == 2
    done = [r for r in records if r.get("event") == "task_succeeded"]
    assert {r["kind"] for r in done} == {"trace"} and all(r["num_matvecs"] == 8 and r["job"] == "logged" for r in done)
    assert records[0]["message"].startswith("[logged] 2 checkpoint(s) × 1 probe(s)")
    assert records[-1]["message"].startswith("[logged] done: 2 run")
    assert not logging.getLogger("landscape_probe").handlers  # the CLI removed what it installed


def test_text_log_lines_are_the_progress_lines_on_stdout(make_spec, capsys):
    path = make_spec(name="texted", probes=[{"kind": "trace", "matvecs": 6}], cluster={"backend": "local"})
    assert main(["run", str(path), "--stall-after", "600"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("[texted] 2 checkpoint(s) × 1 probe(s)") and lines[-1].startswith("[texted] done:")
    assert (
        sum("started trace @" in line for line in lines) == 2 and sum(" HVPs; elapsed" in line for line in lines) == 2
    )
    assert captured.err == ""


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_a_bad_stall_time_exits_2_naming_the_flag(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "spec.yaml", "--stall-after", value])
    assert exc.value.code == 2
    assert "--stall-after" in capsys.readouterr().err


def test_the_json_formatter_keeps_the_fields_and_the_exception():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("landscape_probe.x", logging.ERROR, __file__, 1, "m %d", (1,), sys.exc_info())
    record.fields = {"job": "j", "event": "e"}
    out = json.loads(JsonFormatter().format(record))
    assert (
        out["message"] == "m 1"
        and out["level"] == "error"
        and out["job"] == "j"
        and "ValueError: boom" in out["exception"]
    )


def test_configure_rejects_an_unknown_format():
    with pytest.raises(ValueError, match="--log-format must be one of text, json, got 'xml'"):
        configure("xml")
    reset()


def test_spawned_workers_report_progress_over_the_channel(make_spec, monkeypatch, caplog):
    """Under torch.multiprocessing the workers are other processes: rank 0's messages cross the socket."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    caplog.set_level(logging.INFO, logger="landscape_probe")
    spec = load_spec(
        make_spec(
            name="spawned",
            probes=[{"kind": "spectrum", "runs": 2, "steps": 30}],
            cluster={"num_workers": 2, "backend": "process"},
        )
    )
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, checkpoints=spec.model.checkpoints[:1]))
    metrics = Metrics()
    summary = run_job(
        spec,
        backend="process",
        metrics=metrics,
        progress=lambda m: None,
        progress_options=ProgressOptions(interval_s=0),
    )
    (record,) = summary.records
    seen = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "progress"]
    assert seen and all(0 < f["products"] <= record["num_matvecs"] and f["job"] == "spawned" for f in seen)
    assert [f["lanczos_steps"] for f in seen] == sorted(f["lanczos_steps"] for f in seen)
    assert metrics.hvps.labels(job_name="spawned", kind="spectrum")._value.get() == record["num_matvecs"]


def test_expected_products_count_the_deflation_first_pass_and_the_symmetry_check():
    # deflate: auto (the spectrum default) adds a first pass of max(steps, 80) steps
    assert expected_products("spectrum", {"runs": 2, "steps": 20}) == 2 * 20 + 80 + 2
    assert expected_products("spectrum", {"runs": 2, "steps": 20, "deflate": 5}) == 2 * 20 + 100 + 2
    assert expected_products("trace", {"matvecs": 30, "symmetry_check": False}) == 30


def test_closing_a_hub_whose_accept_thread_has_left_returns():
    """The accept thread may leave its loop without accepting the hub's own wake-up (it saw the
    stop flag after a worker's connection): closing must not wait for a handshake nobody answers."""
    import threading

    hub = ProgressHub("gone", options=ProgressOptions())
    hub._accept = lambda: None  # an accept thread that has already left its loop
    hub.start()
    closer = threading.Thread(target=hub.close, daemon=True)
    closer.start()
    closer.join(timeout=30)
    assert not closer.is_alive(), "ProgressHub.close() hung on its own wake-up connection"


def test_a_closed_hub_leaves_no_thread_behind():
    """Every job (every audit pass) opens a hub: its accept and watch threads must end with it."""
    import threading

    before = set(threading.enumerate())
    for _ in range(3):
        hub = ProgressHub("leak", options=ProgressOptions()).start()
        hub.close()
    assert [t.name for t in threading.enumerate() if t not in before] == []
