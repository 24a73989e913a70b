"""Load (issue 7, item 4): the metrics endpoint under a burst of 1,000 scrapes, and one
audit pass over 200 small checkpoints.

Real components only: the ``prometheus_client`` HTTP server on loopback, real
safetensors files and Parquet datasets on disk. Figures are printed (run with ``-s``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from checkpoint_files import save_step  # tests/cluster/checkpoint_files.py
from prometheus_client.parser import text_string_to_metric_families

from cluster.audit import Auditor
from cluster.job import run_job
from cluster.metrics import FAILURE_REASONS, Metrics, serve
from cluster.spec import load_spec
from cluster.store import ResultStore

SCRAPES = 1_000
WARMUP = 50
POOL = 8
RSS_BOUND_MB = 50.0
CHECKPOINTS = 200


def _proc_status(field: str) -> int:
    """An integer field of /proc/self/status (VmRSS in kB, Threads as a count)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/self/status")


def _threads(before: set[threading.Thread]) -> tuple[int, int]:
    """(Python threads started since ``before`` and still alive, OS threads of this process).

    Python threads are counted by identity: threads other tests of the session left behind may
    end at any moment, and must not count for or against the server."""
    return len([t for t in threading.enumerate() if t not in before]), _proc_status("Threads")


def _settle(before: set[threading.Thread], baseline: tuple[int, int], timeout_s: float = 10.0) -> tuple[int, int]:
    """Thread counts, polled until they are back at ``baseline`` (new Python threads exactly, OS
    threads at most) or ``timeout_s`` passes (a handler thread may still be closing its socket
    when the client has its answer)."""
    deadline = time.monotonic() + timeout_s
    now = _threads(before)
    while (now[0] != baseline[0] or now[1] > baseline[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
        now = _threads(before)
    return now


def _scrape(port: int) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.status, response.read()


def _populate(metrics: Metrics, make_spec) -> None:
    """A registry like a live service's: one real local job, then a few more jobs'
    worth of label sets (jobs × kinds × outcomes, histograms observed, failures by reason)."""
    spec = load_spec(
        make_spec(
            name="loaded", probes=[{"kind": "eigenvalues", "k": 1}, {"kind": "trace", "matvecs": 6}], num_examples=64
        )
    )
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, checkpoints=spec.model.checkpoints[:1]))
    summary = run_job(spec, backend="local", progress=lambda m: None, metrics=metrics)
    assert (summary.num_done, summary.num_failed) == (2, 0)
    kinds = ("eigenvalues", "trace", "spectrum", "eos", "sharpness", "barrier")
    for j, job in enumerate(("audit-a", "audit-b", "sweep-c", "lm-d")):
        metrics.tasks_planned.labels(job_name=job).set(60)
        metrics.tasks_done.labels(job_name=job).set(40 + j)
        for i, kind in enumerate(kinds):
            for n, outcome in enumerate(("succeeded", "failed", "skipped")):
                metrics.tasks.labels(job_name=job, kind=kind, outcome=outcome).inc(1 + i + n)
            metrics.hvps.labels(job_name=job, kind=kind).inc(100 * (i + 1))
            for d in (0.5, 3.0, 20.0, 400.0, 9000.0):
                metrics.duration.labels(job_name=job, kind=kind).observe(d * (1 + j))
            metrics.last_success.labels(job_name=job, kind=kind).set(1.7e9 + i)
        for reason in FAILURE_REASONS:
            metrics.failure(job, reason)
        metrics.restarts.labels(job_name=job).inc(j)
        metrics.audit_passes.labels(job_name=job, outcome="succeeded").inc(10 + j)
        metrics.audit_checkpoints.labels(job_name=job).set(200)
        metrics.audit_pending.labels(job_name=job).set(j)
        metrics.lambda_max.labels(series=job).set(12.5 + j)
        metrics.trace.labels(series=job).set(300.0 + j)
        metrics.eos_ratio.labels(series=job).set(0.9)
        metrics.lambda_max_change.labels(series=job).set(0.01 * j)
        metrics.barrier.labels(series=job, path="linear").set(0.2)


def test_metrics_endpoint_answers_a_burst_of_1000_scrapes_identically_with_bounded_memory_and_threads(make_spec):
    metrics = Metrics()
    _populate(metrics, make_spec)
    before = set(threading.enumerate())
    threads_before_server = _threads(before)  # (0, OS threads)
    server, thread = serve(metrics, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
        port = server.server_port
        status, reference = _scrape(port)
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(reference.decode())}
        # the registry is populated like a live one: the real job's rows and the extra label sets
        tasks = [s for s in families["landscape_probe_tasks"].samples if s.name == "landscape_probe_tasks_total"]
        assert len({s.labels["job_name"] for s in tasks}) == 5 and len(tasks) >= 4 * 6 * 3
        assert any(
            s.labels == {"job_name": "loaded", "kind": "trace", "outcome": "succeeded"} and s.value == 1 for s in tasks
        )
        buckets = [s for s in families["landscape_probe_task_duration_seconds"].samples if s.name.endswith("_bucket")]
        assert len(buckets) >= 4 * 6 * 14
        ref_digest = hashlib.sha256(reference).digest()

        def one(_: int) -> tuple[int, bytes, int]:
            status, body = _scrape(port)
            samples = sum(len(f.samples) for f in text_string_to_metric_families(body.decode()))
            return status, hashlib.sha256(body).digest(), samples

        ref_samples = sum(len(f.samples) for f in families.values())
        with ThreadPoolExecutor(POOL) as pool:  # warm-up: allocator, handler code paths, the pool
            assert all(r == (200, ref_digest, ref_samples) for r in pool.map(one, range(WARMUP)))
        baseline_threads = _settle(before, (1, threads_before_server[1] + 1))
        assert baseline_threads[0] == 1 and [t for t in threading.enumerate() if t not in before] == [thread], (
            "serve() adds one thread"
        )
        assert baseline_threads[1] <= threads_before_server[1] + 1
        rss_before_kb = _proc_status("VmRSS")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(POOL) as pool:
            results = list(pool.map(one, range(SCRAPES)))
        burst_s = time.perf_counter() - t0
        rss_after_kb = _proc_status("VmRSS")
        threads_after = _settle(before, baseline_threads)

        statuses = {s for s, _, _ in results}
        digests = {d for _, d, _ in results}
        counts = {n for _, _, n in results}
        growth_mb = (rss_after_kb - rss_before_kb) / 1024
        print(
            f"\nmetrics burst: {SCRAPES} scrapes from {POOL} threads in {burst_s:.2f} s "
            f"({SCRAPES / burst_s:.0f} scrapes/s); exposition {len(reference)} bytes, {ref_samples} samples; "
            f"RSS {rss_before_kb / 1024:.1f} -> {rss_after_kb / 1024:.1f} MB ({growth_mb:+.1f} MB); "
            f"threads (python, os) with server {baseline_threads} -> after burst {threads_after}"
        )
        assert len(results) == SCRAPES
        assert statuses == {200}
        assert digests == {ref_digest}, f"{len(digests)} distinct expositions while nothing changed"
        assert counts == {ref_samples}
        assert growth_mb < RSS_BOUND_MB
        assert threads_after[0] == 1, "handler threads left behind after the burst"
        assert threads_after[1] <= baseline_threads[1], "OS threads left behind after the burst"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()
    # with the server gone, the process is back to its thread count before serve()
    after = _settle(before, threads_before_server)
    assert after[0] == 0 and after[1] <= threads_before_server[1]


def _save(folder: Path, step: int) -> Path:
    return save_step(folder, step, hidden=4)


def test_one_audit_pass_over_200_checkpoints_writes_exactly_one_row_per_checkpoint_and_probe(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    paths = {str(_save(folder, step)) for step in range(CHECKPOINTS)}
    probes = [{"kind": "trace", "matvecs": 6}, {"kind": "eigenvalues", "k": 1, "tol": 1e-3}]
    kinds = [p["kind"] for p in probes]
    spec_path = tmp_path / "load.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "load-audit",
                "model": {"factory": "probe.models:digits_mlp", "kwargs": {"hidden": 4}, "checkpoints": [str(folder)]},
                "data": {"factory": "cluster.data:digits", "num_examples": 32, "batch_size": 32},
                "precision": "float64",
                "probes": probes,
                "output": {"path": str(tmp_path / "results")},
                "seed": 5,
            }
        )
    )
    auditor = Auditor(load_spec(spec_path), backend="local", progress=lambda m: None)

    report = auditor.run_pass()
    print(
        f"\naudit pass over {CHECKPOINTS} checkpoints × {len(probes)} probes ({', '.join(kinds)}): "
        f"{report.duration_s:.1f} s ({report.duration_s / (CHECKPOINTS * len(probes)) * 1000:.0f} ms/task); "
        f"ran {report.ran}, failed {report.failed}"
    )
    assert (report.checkpoints, report.ran, report.stored, report.failed, report.backing_off) == (
        CHECKPOINTS,
        CHECKPOINTS * len(probes),
        0,
        0,
        0,
    ), report.failures

    store = ResultStore(tmp_path / "results")
    for kind in kinds:
        rows = store.read(kind).to_pylist()
        assert len(rows) == CHECKPOINTS, kind
        assert len({r["task_key"] for r in rows}) == CHECKPOINTS, kind
        assert {r["checkpoint"] for r in rows} == paths, kind
        assert len({r["checkpoint_sha256"] for r in rows}) == CHECKPOINTS, kind
    # different seeds give different models: the estimates are not one value copied 200 times
    assert len({r["trace"] for r in store.read("trace").to_pylist()}) == CHECKPOINTS
    runs = store.read("runs").to_pylist()
    assert [r["num_done"] for r in runs] == [CHECKPOINTS * len(probes)]
    assert store.read("failures").num_rows == 0

    t0 = time.perf_counter()
    again = auditor.run_pass()  # everything is stored: nothing runs, nothing is written
    second_s = time.perf_counter() - t0
    print(f"second pass: {second_s:.1f} s, ran {again.ran}, already stored {again.stored}")
    assert (again.checkpoints, again.ran, again.stored, again.failed) == (CHECKPOINTS, 0, CHECKPOINTS * len(probes), 0)
    for kind in kinds:
        assert store.read(kind).num_rows == CHECKPOINTS
