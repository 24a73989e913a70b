"""Faults on the real service (issue 7, item 3): a driver killed mid-job and re-run, a write
that fails like a full disk, and an audit that keeps failing while it serves metrics.

Everything here is real: ``python -m cluster.cli`` subprocesses, Parquet files on disk,
signals (SIGKILL, SIGTERM), a file-size limit set with ``setrlimit`` in the child, and
HTTP scrapes of the metrics endpoint.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from compare import assert_close, by_task  # tests/cluster/compare.py
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families

from cluster.job import run_job
from cluster.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
KINDS = ("eigenvalues", "trace", "spectrum")
# 2 checkpoints × 3 probes = 6 tasks, each a few tenths of a second on 768 examples
PROBES = [
    {"kind": "eigenvalues", "k": 2},
    {"kind": "trace", "matvecs": 48},
    {"kind": "spectrum", "runs": 2, "steps": 30},
]
VALUES = {
    "eigenvalues": ["eigenvalues", "residuals"],
    "trace": ["trace", "trace_stderr"],
    "spectrum": ["ritz_values", "ritz_weights", "density", "lambda_min", "lambda_max"],
}


def cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, env=env, text=True, **kwargs)


def stop(proc: subprocess.Popen) -> None:
    """Kill ``proc`` (by its pid) if it is still running, and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def parts(root: Path) -> list[Path]:
    """Visible result files of the job's kinds."""
    return sorted(p for kind in KINDS for p in (root / kind).glob("*/part-*.parquet"))


def read(root: Path, kind: str):
    return ds.dataset(root / kind, format="parquet", partitioning="hive").to_table()


# --- 1. the driver killed mid-job, then re-run --------------------------------------


def test_driver_killed_mid_job_rerun_skips_stored_tasks_and_matches_an_uninterrupted_run(make_spec, tmp_path):
    spec_path = make_spec(name="killed", probes=PROBES, cluster={"num_workers": 1}, num_examples=768)
    out, ref = tmp_path / "results", tmp_path / "reference"

    proc = cli("run", str(spec_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        for _ in range(30_000):  # polls 2 ms apart: a bounded wait for the first result file
            if parts(out):
                break
            assert proc.poll() is None, f"the driver ended (exit {proc.returncode}) before writing a result"
            time.sleep(0.002)
        else:
            pytest.fail("no result file after 30,000 polls")
        os.kill(proc.pid, signal.SIGKILL)
        kill_s = time.monotonic() - t0
        proc.wait(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == -signal.SIGKILL
    at_kill = parts(out)
    assert 1 <= len(at_kill) < 6, [p.name for p in at_kill]

    # Nothing partial is visible: every visible file reads back whole; a temporary file the
    # kill may have left is hidden, and plain pyarrow.dataset does not see it.
    for p in at_kill:
        assert pq.read_table(p).num_rows == 1
    hidden = [p for kind in KINDS for p in (out / kind).glob("*/.tmp-*")]
    for kind in KINDS:
        if (out / kind).is_dir():
            files = ds.dataset(out / kind, format="parquet", partitioning="hive").files
            assert sorted(files) == sorted(str(p) for p in (out / kind).glob("*/part-*.parquet"))
            assert not any(Path(f).name.startswith(".") for f in files)
    assert not (out / "runs").exists()  # the killed run never finished

    rerun = cli("run", str(spec_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = rerun.communicate(timeout=120)
    finally:
        stop(rerun)
    assert rerun.returncode == 0, stderr[-2000:]
    lines = stdout.strip().splitlines()
    assert f"= 6 task(s); {len(at_kill)} already stored;" in lines[0]
    assert lines[-1].startswith(f"[killed] done: {6 - len(at_kill)} run, {len(at_kill)} skipped, 0 failed")
    for p in at_kill:  # the stored files were kept, not rewritten
        assert p.is_file()

    reference = cli(
        "run", str(spec_path), "--set", f"output.path={ref}", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _, stderr = reference.communicate(timeout=120)
    finally:
        stop(reference)
    assert reference.returncode == 0, stderr[-2000:]

    for kind in KINDS:
        got, want = read(out, kind), read(ref, kind)
        keys = got.column("task_key").to_pylist()
        assert len(keys) == 2 and len(set(keys)) == 2  # one row per task, no duplicates
        assert sorted(keys) == sorted(want.column("task_key").to_pylist())
        assert_close(by_task(got, VALUES[kind]), by_task(want, VALUES[kind]), rtol=1e-12)
    runs = read(out, "runs").to_pylist()
    assert [(r["num_done"], r["num_skipped"], r["status"]) for r in runs] == [
        (6 - len(at_kill), len(at_kill), "succeeded")
    ]
    print(
        f"\nkilled {kill_s:.2f} s after start with {len(at_kill)} of 6 part(s) visible, "
        f"{len(hidden)} hidden temporary file(s)"
    )


# --- 2. a write that fails like a full disk -----------------------------------------

FSIZE_LIMIT = 4096  # bytes; every Parquet file of the store is larger (a trace part is about 8 KB)


def limit_file_size() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_write_failing_with_efbig_fails_the_job_and_leaves_earlier_results_intact(make_spec, tmp_path):
    probes = [{"kind": "trace", "matvecs": 12}]
    out = tmp_path / "results"
    earlier = run_job(
        load_spec(make_spec(name="earlier", probes=probes, cluster={"num_workers": 1}, num_examples=96)),
        backend="local",
        progress=lambda m: None,
    )
    assert earlier.ok and earlier.num_done == 2
    kept = sorted((out / "trace" / "earlier").glob("part-*.parquet"))
    assert len(kept) == 2 and all(p.stat().st_size > FSIZE_LIMIT for p in kept)
    before = digest(kept)
    listing = sorted(p.relative_to(out) for p in out.rglob("*"))

    spec_path = make_spec(name="blocked", probes=probes, cluster={"num_workers": 1}, num_examples=96)
    t0 = time.monotonic()
    proc = cli("run", str(spec_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit_file_size)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        stop(proc)
    elapsed = time.monotonic() - t0

    # the job reports the failure: non-zero exit, one line naming the folder and the cause
    assert proc.returncode == 1, (stdout[-1000:], stderr[-1000:])
    reason = stderr.strip().splitlines()[-1]
    assert reason.startswith("probe run: cannot write results to ")
    assert "File too large" in reason and "earlier results are intact" in reason
    assert "/blocked'" in reason  # the job's folder
    assert not re.search(r"\] \d+/\d+ trace @ ", stdout)  # no task was reported done ("[job] 1/1 trace @ ...")

    # earlier results: the same bytes, readable; nothing of the failed job visible or left over
    assert digest(sorted((out / "trace" / "earlier").glob("part-*.parquet"))) == before
    table = read(out, "trace")
    assert table.num_rows == 2 and set(table.column("job").to_pylist()) == {"earlier"}
    assert sorted(p.relative_to(out) for p in out.rglob("*") if "blocked" not in p.relative_to(out).parts) == listing
    blocked = sorted(p.name for p in out.rglob("*") if "blocked" in p.relative_to(out).parts[:-1])
    assert blocked == [], blocked  # no part, no run row, no temporary file: each failed write cleaned up
    print(f"\nEFBIG at {FSIZE_LIMIT} B: exit {proc.returncode} after {elapsed:.1f} s; {reason}")


# --- 3. an audit that keeps failing backs off and keeps serving metrics ----------------


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_failing_audit_backs_off_keeps_serving_metrics_and_stops_on_sigterm(checkpoints, tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    data = checkpoints[0].read_bytes()
    (folder / "cut.safetensors").write_bytes(data[: len(data) // 2])
    name = "failing-audit"
    spec = {
        "name": name,
        "model": {"factory": "probe.models:digits_mlp", "kwargs": {"hidden": 16}, "checkpoints": [str(folder)]},
        "data": {"factory": "cluster.data:digits", "num_examples": 96, "batch_size": 48},
        "precision": "float64",
        "probes": [{"kind": "trace", "matvecs": 12}],
        "output": {"path": str(tmp_path / "results")},
        "seed": 3,
    }
    spec_path = tmp_path / "audit.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    port = free_port()
    log = tmp_path / "audit.log"
    failures = ("landscape_probe_failures_total", (("job_name", name), ("reason", "bad_checkpoint")))
    succeeded = ("landscape_probe_audit_passes_total", (("job_name", name), ("outcome", "succeeded")))
    failed_passes = ("landscape_probe_audit_passes_total", (("job_name", name), ("outcome", "failed")))
    pending = ("landscape_probe_audit_tasks_pending", (("job_name", name),))

    with open(log, "w") as f:
        proc = cli(
            "audit", str(spec_path), "--every", "2s", "--metrics-port", str(port), stdout=f, stderr=subprocess.STDOUT
        )
    try:
        for _ in range(300):  # polls 0.2 s apart: the endpoint comes up once the service has started
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                scrape(port)
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("no metrics endpoint after 300 polls")
        # then it answers every scrape, across several passes
        seen = []
        t1 = time.monotonic()
        while time.monotonic() - t1 < 7:
            seen.append(scrape(port))
            time.sleep(1)
        last = seen[-1]
        assert len(seen) >= 6
        counts = [s.get(failures, 0) for s in seen]
        assert counts == sorted(counts) and counts[-1] == 1, counts  # failed once, then backed off
        assert last[succeeded] >= 2 and last.get(failed_passes, 0) == 0
        assert last[pending] == 1
        assert last[("landscape_probe_audit_checkpoints", (("job_name", name),))] == 1

        t2 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        stop_s = time.monotonic() - t2
    finally:
        stop(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]  # the last pass had a task backing off, none failed
    assert "SIGTERM: stopping after this pass" in text
    assert "0 failed, 1 backing off (next retry in 5 min)" in text
    passes = text.count(f"[{name}] audit pass ")
    fail_rows = pq.read_table(next((tmp_path / "results" / "failures").glob("*"))).to_pylist()
    assert len(fail_rows) == 1 and fail_rows[0]["category"] == "bad_checkpoint"
    assert "cut.safetensors" in fail_rows[0]["reason"]
    print(
        f"\n{len(seen)} scrapes over {time.monotonic() - t1 - stop_s:.1f} s all answered; {passes} passes, "
        f"failures {counts}; SIGTERM → exit 0 in {stop_s:.2f} s"
    )
