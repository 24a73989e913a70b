"""The audit service on real checkpoint folders: discovery, skip-by-content, failures
recorded with their reason, backoff, the lock between concurrent audits, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
import yaml
from checkpoint_files import save_step  # tests/cluster/checkpoint_files.py
from safetensors.torch import load_file, save_file

from cluster.audit import AuditLock, Auditor, parse_duration
from cluster.checkpoints import CheckpointError
from cluster.cli import main
from cluster.metrics import Metrics
from cluster.spec import load_spec
from cluster.store import ResultStore

PROBES = [{"kind": "eigenvalues", "k": 1}, {"kind": "trace", "matvecs": 12}, {"kind": "eos"}]
KINDS = ("eigenvalues", "trace", "eos")


def save_checkpoint(folder: Path, step: int) -> Path:
    return save_step(folder, step, hidden=8)


def write_spec(tmp_path: Path, folder: Path, name: str = "audited", probes=None) -> Path:
    spec = {
        "name": name,
        "model": {"factory": "probe.models:digits_mlp", "kwargs": {"hidden": 8}, "checkpoints": [str(folder)]},
        "data": {"factory": "cluster.data:digits", "num_examples": 96, "batch_size": 48},
        "precision": "float64",
        "probes": probes or PROBES,
        "output": {"path": str(tmp_path / "results")},
        "seed": 3,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def rows(spec_path: Path, kind: str) -> list[dict]:
    return ResultStore(load_spec(spec_path).output.path).read(kind).to_pylist()


quiet = dict(progress=lambda m: None)


def test_parse_duration_accepts_units_and_refuses_nonsense():
    assert parse_duration("90s") == 90
    assert parse_duration("30m") == 1800
    assert parse_duration("1h30m") == 5400
    assert parse_duration("2d") == 172800
    assert parse_duration("45") == 45
    for bad in ("", "5x", "m30", "1h 30m", "0s", "-3m"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_a_checkpoint_appearing_between_passes_gets_exactly_one_new_row_per_probe(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in (1, 2):
        save_checkpoint(folder, step)
    spec_path = write_spec(tmp_path, folder)
    auditor = Auditor(load_spec(spec_path), **quiet)

    first = auditor.run_pass()
    assert (first.checkpoints, first.ran, first.failed) == (2, 5, 0)  # 2 × (eigenvalues, trace) + one eos series
    before = {k: rows(spec_path, k) for k in KINDS}
    assert all(len(before[k]) == 2 for k in KINDS)

    again = auditor.run_pass()  # nothing new: nothing runs, nothing is written
    assert (again.ran, again.stored) == (0, 5)
    assert {k: len(rows(spec_path, k)) for k in KINDS} == {k: 2 for k in KINDS}

    new = save_checkpoint(folder, 10)  # natural order: step-10 comes after step-2
    third = auditor.run_pass()
    assert (third.checkpoints, third.ran, third.failed) == (3, 3, 0)
    after = {k: rows(spec_path, k) for k in KINDS}
    for k in KINDS:
        assert len(after[k]) == 3
        added = [r for r in after[k] if r["task_key"] not in {b["task_key"] for b in before[k]}]
        assert [r["checkpoint"] for r in added] == [str(new)]
        # rows already stored are untouched (same run that wrote them)
        assert {r["run_id"] for r in after[k] if r["checkpoint"] != str(new)} == {b["run_id"] for b in before[k]}
    (eos_new,) = [r for r in after["eos"] if r["checkpoint"] == str(new)]
    assert eos_new["step"] == 10 and eos_new["lr"] == 0.5
    # the eos row equals λ_max of the eigenvalue probe on the same checkpoint (a cold start this time)
    (eig_new,) = [r for r in after["eigenvalues"] if r["checkpoint"] == str(new)]
    assert eos_new["lambda_max"] == pytest.approx(eig_new["eigenvalues"][0], rel=1e-6)


def test_changed_probe_config_is_audited_again(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    save_checkpoint(folder, 1)
    spec_path = write_spec(tmp_path, folder, probes=[{"kind": "trace", "matvecs": 12}])
    assert Auditor(load_spec(spec_path), **quiet).run_pass().ran == 1
    spec_path = write_spec(tmp_path, folder, probes=[{"kind": "trace", "matvecs": 15}])
    assert Auditor(load_spec(spec_path), **quiet).run_pass().ran == 1
    assert sorted(json.loads(r["probe_config"])["matvecs"] for r in rows(spec_path, "trace")) == [12, 15]


def test_truncated_checkpoint_is_recorded_as_failed_and_the_others_succeed(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in (1, 2):
        save_checkpoint(folder, step)
    bad = save_checkpoint(folder, 3)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    spec_path = write_spec(tmp_path, folder, probes=PROBES[:2])
    metrics = Metrics()
    now = [time.time()]
    auditor = Auditor(load_spec(spec_path), metrics=metrics, clock=lambda: now[0], **quiet)

    report = auditor.run_pass()
    assert (report.checkpoints, report.ran, report.failed) == (3, 4, 2)
    for kind in ("eigenvalues", "trace"):
        assert sorted(Path(r["checkpoint"]).name for r in rows(spec_path, kind)) == [
            "step-1.safetensors",
            "step-2.safetensors",
        ]
    failures = rows(spec_path, "failures")
    assert sorted(f["kind"] for f in failures) == ["eigenvalues", "trace"]
    for f in failures:
        assert f["checkpoint"] == str(bad) and f["category"] == "bad_checkpoint"
        assert str(bad) in f["reason"] and "safetensors" in f["reason"]
    fam = {
        s.name: s.value
        for m in metrics.registry.collect()
        for s in m.samples
        if s.labels.get("reason") == "bad_checkpoint"
    }
    assert fam["landscape_probe_failures_total"] == 2

    # at once: both failed tasks back off; nothing runs, nothing new fails
    report = auditor.run_pass()
    assert (report.ran, report.failed, report.backing_off) == (0, 0, 2)
    assert report.retry_at == pytest.approx(max(f["created_at"].timestamp() for f in failures) + 300, abs=5)
    # after the first backoff (5 min) they are retried, fail again, and wait twice as long
    # (failures are stamped with the real time, about `start`; the injected clock runs ahead)
    start = now[0]
    now[0] = start + 310
    report = auditor.run_pass()
    assert (report.ran, report.failed, report.backing_off) == (0, 2, 0)
    now[0] = start + 500
    assert auditor.run_pass().backing_off == 2
    now[0] = start + 610
    assert auditor.run_pass().failed == 2
    assert [auditor.backoff_delay(n) for n in (1, 2, 3, 10, 100)] == [300, 600, 1200, 6 * 3600, 6 * 3600]

    # a fixed checkpoint is a new content hash: audited at once, no backoff
    save_checkpoint(folder, 3)
    report = auditor.run_pass()
    assert (report.ran, report.failed, report.backing_off) == (2, 0, 0)
    assert len(rows(spec_path, "trace")) == 3


def test_empty_folder_is_an_empty_series_and_a_missing_path_is_an_error(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    spec_path = write_spec(tmp_path, folder)
    messages = []
    report = Auditor(load_spec(spec_path), progress=messages.append).run_pass()
    assert (report.checkpoints, report.ran, report.failed) == (0, 0, 0)
    assert any("holds no checkpoint yet" in m for m in messages)
    spec_path = write_spec(tmp_path, tmp_path / "no-such-folder")
    with pytest.raises(CheckpointError, match="no-such-folder"):
        Auditor(load_spec(spec_path), **quiet).run_pass()


def test_the_audit_lock_makes_a_second_holder_wait(tmp_path):
    waiting, acquired = [], threading.Event()

    def second():
        with AuditLock(tmp_path, "job/1", progress=waiting.append):
            acquired.set()

    with AuditLock(tmp_path, "job/1"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.5)
        assert not acquired.is_set()
        assert waiting and f"pid {os.getpid()}" in waiting[0]
    t.join(timeout=10)
    assert acquired.is_set()
    assert [p.name for p in tmp_path.iterdir()] == [".audit-job%2F1.lock"]


def test_two_concurrent_audits_do_no_work_twice_and_write_no_duplicate_rows(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in (1, 2, 3):
        save_checkpoint(folder, step)
    spec_path = write_spec(tmp_path, folder)
    cmd = [sys.executable, "-m", "cluster.cli", "audit", str(spec_path), "--once"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for k in KINDS:
        got = rows(spec_path, k)
        assert len(got) == 3 and len({r["task_key"] for r in got}) == 3
    runs = rows(spec_path, "runs")
    assert len(runs) == 2
    assert sum(r["num_done"] for r in runs) == 7  # 3 × (eigenvalues, trace) + one eos series: each run once
    assert sorted(r["num_done"] for r in runs)[0] == 0
    waited = [o for o in outputs if "is held by pid" in o]
    assert len(waited) <= 1 and all("7 already stored" in o for o in waited)


def test_headline_gauges_follow_the_latest_checkpoint_of_the_series(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in (2, 10, 9):
        save_checkpoint(folder, step)
    spec_path = write_spec(tmp_path, folder)
    metrics = Metrics()
    Auditor(load_spec(spec_path), metrics=metrics, **quiet).run_pass()
    samples = {
        (s.name, s.labels.get("series") or s.labels.get("job_name")): s.value
        for m in metrics.registry.collect()
        for s in m.samples
    }
    by = lambda kind: {Path(r["checkpoint"]).name: r for r in rows(spec_path, kind)}  # noqa: E731
    eig, tr, eos = by("eigenvalues"), by("trace"), by("eos")
    latest, before = "step-10.safetensors", "step-9.safetensors"
    assert samples[("landscape_probe_lambda_max", "audited")] == eig[latest]["eigenvalues"][0]
    assert samples[("landscape_probe_hessian_trace", "audited")] == tr[latest]["trace"]
    assert samples[("landscape_probe_eos_ratio", "audited")] == eos[latest]["ratio"]
    lam, lam0 = eig[latest]["eigenvalues"][0], eig[before]["eigenvalues"][0]
    assert samples[("landscape_probe_lambda_max_relative_change", "audited")] == pytest.approx(
        (lam - lam0) / abs(lam0), rel=1e-12
    )
    assert samples[("landscape_probe_audit_checkpoints", "audited")] == 3
    assert samples[("landscape_probe_audit_tasks_pending", "audited")] == 0
    assert samples[("landscape_probe_audit_passes_total", "audited")] == 1


def test_a_pass_that_cannot_run_is_counted_and_retried_with_backoff(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    save_checkpoint(folder, 1)
    spec_path = write_spec(tmp_path, folder)
    (tmp_path / "results").write_text("a file where the results folder should be")
    metrics, messages = Metrics(), []
    auditor = Auditor(load_spec(spec_path), metrics=metrics, progress=messages.append)
    auditor.run(every_s=0.05, max_passes=3)
    failed = metrics.audit_passes.labels(job_name="audited", outcome="failed")._value.get()
    assert failed == 3
    assert sum("audit pass failed" in m for m in messages) == 3
    assert any("(3 in a row)" in m and "retrying in 0 s" in m for m in messages)
    with pytest.raises(OSError):  # one-shot audits report the error instead
        auditor.run(None)


def test_passes_that_cannot_run_are_retried_after_1_2_4_minutes_capped_and_reset_by_a_success(tmp_path):
    """The waits the loop asks for, recorded instead of slept: the retry schedule itself."""
    folder = tmp_path / "ckpts"
    folder.mkdir()  # no checkpoint yet: a pass that can run is quick and succeeds
    spec_path = write_spec(tmp_path, folder)
    results = tmp_path / "results"
    fails = [True] * 8 + [False, True, True, False]  # outcome of passes 1..12

    def set_up(pass_fails: bool) -> None:  # a file where the results folder should be: the pass cannot run
        if results.is_dir():
            shutil.rmtree(results)
        if pass_fails:
            results.write_text("a file where the results folder should be")
        elif results.exists():
            results.unlink()

    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        set_up(fails[len(waits)])  # the next pass's outcome

    set_up(fails[0])
    metrics, messages = Metrics(), []
    auditor = Auditor(load_spec(spec_path), metrics=metrics, progress=messages.append)
    auditor.run(every_s=3600, max_passes=len(fails), sleep=sleep)
    assert auditor.passes == 12 and len(waits) == 11  # no wait after the last pass
    # passes 1-8 fail: 1, 2, 4, 8, 16, 32 min, then capped at the next scheduled pass (every_s)
    assert waits[:8] == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert 3600 - 60 < waits[8] <= 3600  # pass 9 succeeds: back on the cadence, less its own duration
    assert waits[9:11] == [60, 120]  # passes 10, 11 fail: the backoff starts again at 1 min
    retries = [m for m in messages if "audit pass failed" in m]
    assert len(retries) == 10 and "(2 in a row)" in retries[-1] and "retrying in 120 s" in retries[-1]
    outcomes = {
        s.labels["outcome"]: s.value
        for m in metrics.registry.collect()
        for s in m.samples
        if s.name == "landscape_probe_audit_passes_total"
    }
    assert outcomes == {"failed": 10, "succeeded": 2}


def test_pass_retry_delay_doubles_from_a_minute_up_to_the_schedule():
    got = [Auditor.pass_retry_delay(n, every_s=86400) for n in range(1, 14)]
    assert got == [60 * 2**k for k in range(11)] + [86400, 86400]
    assert [Auditor.pass_retry_delay(n, every_s=90) for n in (1, 2, 3)] == [60, 90, 90]


def test_a_failing_task_backs_off_5_10_20_minutes_up_to_6_hours_by_its_stored_failures(tmp_path):
    """retry_at of a pass is the last stored failure of the task plus min(5 min · 2^(n−1), 6 h)
    for n stored failures: the history is the failures dataset, so a restarted audit keeps it."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    bad = save_checkpoint(folder, 1)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated: every attempt fails at load
    spec_path = write_spec(tmp_path, folder, probes=[{"kind": "trace", "matvecs": 12}])
    spec = load_spec(spec_path)
    assert Auditor(spec, **quiet).run_pass().failed == 1
    store = ResultStore(spec.output.path)
    (first,) = store.read("failures").to_pylist()
    last = datetime(2030, 1, 1, tzinfo=UTC)  # later than the real failure: the latest one counts
    expected_min = [5, 10, 20, 40, 80, 160, 320, 360, 360, 360]
    for n, minutes in enumerate(expected_min, start=1):
        if n > 1:  # one more stored failure of the same task, the latest so far
            last += timedelta(hours=7)
            store.write_failure({**first, "run_id": f"earlier-{n}", "created_at": last})
        history = store.read("failures").to_pylist()
        assert len(history) == n
        t_last = max(r["created_at"] for r in history).timestamp()
        for now in (t_last, t_last + minutes * 60 - 1):  # still waiting: nothing runs, nothing new is stored
            report = Auditor(spec, clock=lambda now=now: now, **quiet).run_pass()  # a fresh auditor: as after a restart
            assert (report.ran, report.failed, report.backing_off) == (0, 0, 1)
            assert report.retry_at - t_last == pytest.approx(minutes * 60, abs=1e-3), n
    assert len(store.read("failures")) == len(expected_min)


def test_cli_audit_once_and_bad_duration(tmp_path, capsys):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    save_checkpoint(folder, 1)
    spec_path = write_spec(tmp_path, folder, probes=PROBES[:1])
    assert main(["audit", str(spec_path), "--once"]) == 0
    assert "audit pass 1: 1 checkpoint(s), 1 task(s) run" in capsys.readouterr().out
    assert main(["audit", str(spec_path), "--every", "soon"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("probe audit: --every: duration 'soon' not understood") and err.count("\n") == 1
    bad = folder / "step-2.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(["audit", str(spec_path), "--once"]) == 1


def test_sharded_checkpoint_in_the_folder_is_audited_like_its_single_file_twin(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    single = save_checkpoint(folder, 4)
    sharded = folder / "sharded"
    sharded.mkdir()
    state = load_file(str(single))
    names = sorted(state)
    save_file({k: state[k] for k in names[:2]}, str(sharded / "m-1.safetensors"), metadata={"lr": "0.5", "step": "4"})
    save_file({k: state[k] for k in names[2:]}, str(sharded / "m-2.safetensors"))
    index = sharded / "m.safetensors.index.json"
    index.write_text(
        json.dumps({"weight_map": {k: "m-1.safetensors" if i < 2 else "m-2.safetensors" for i, k in enumerate(names)}})
    )
    spec_path = write_spec(tmp_path, folder, probes=PROBES[:1])
    spec = load_spec(spec_path)
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, checkpoints=(str(folder), str(sharded))))
    report = Auditor(spec, **quiet).run_pass()
    assert (report.checkpoints, report.ran, report.failed) == (2, 2, 0)
    got = {r["checkpoint"]: r["eigenvalues"][0] for r in rows(spec_path, "eigenvalues")}
    assert set(got) == {str(single), str(index)}
    assert got[str(index)] == pytest.approx(got[str(single)], rel=1e-10)


def test_a_changed_config_json_beside_the_weights_is_audited_again(tmp_path):
    """The content hash covers a folder's config.json, and the audit's hash cache watches it too."""
    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    weights = save_checkpoint(run / "checkpoint-1", 1)
    (run / "checkpoint-1" / "config.json").write_text('{"hidden": 8}')
    torch.save({"state": {}}, run / "checkpoint-1" / "optimizer.pt")
    spec_path = write_spec(tmp_path, run, probes=[{"kind": "trace", "matvecs": 12}])
    auditor = Auditor(load_spec(spec_path), **quiet)
    assert (auditor.run_pass().ran, auditor.run_pass().ran) == (1, 0)
    (run / "checkpoint-1" / "config.json").write_text('{"hidden": 8, "note": "another model"}')
    assert auditor.run_pass().ran == 1
    got = rows(spec_path, "trace")
    assert [r["checkpoint"] for r in got] == [str(weights)] * 2 and len({r["checkpoint_sha256"] for r in got}) == 2
    assert {r["checkpoint_name"] for r in got} == {"checkpoint-1"} and {r["step"] for r in got} == {1}
