"""The job driver (cluster/job.py) without Ray: the in-process and multiprocess
backends end to end, re-runs, failures, the failure policy and the ``probe run`` CLI."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys

import pyarrow.dataset as ds
import pytest
import torch
import torch.nn.functional as F
from compare import assert_close, by_task  # tests/cluster/compare.py
from safetensors.torch import load_file, save_file

from cluster.checkpoints import file_sha256
from cluster.cli import main as cli_main
from cluster.groups import ProcessGroup, TaskError, WorkerLost
from cluster.job import FailurePolicy, run_job
from cluster.runners import measure_symmetry
from cluster.spec import PROBE_OPTIONS, load_spec
from cluster.worker import probe_subset, task_seed
from probe.eigen import eigenvalues
from probe.hessian import HessianOperator
from probe.models import digits_mlp
from probe.slq_deflated import deflated_spectral_density
from probe.trace import trace

RTOL = 1e-10
KINDS = ("eigenvalues", "trace", "spectrum")
LIGHT_PROBES = [{"kind": "eigenvalues", "k": 3}, {"kind": "trace", "matvecs": 30}]


def read(root, kind):
    """Rows of ``kind`` read the way a user would: plain pyarrow, hive partitions."""
    return ds.dataset(root / kind, format="parquet", partitioning="hive").to_table()


@pytest.fixture
def single_thread_children(monkeypatch):
    """Spawned workers inherit one OpenMP thread each (two cores, shared)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


# --- the in-process backend end to end ---------------------------------------------


def test_local_job_writes_rows_per_kind_reports_progress_and_reruns_as_no_op(make_spec, checkpoints, tmp_path):
    spec = load_spec(make_spec())
    out = tmp_path / "results"
    messages: list[str] = []
    summary = run_job(spec, backend="local", progress=messages.append)

    assert (summary.num_tasks, summary.num_done, summary.num_skipped, summary.num_failed) == (6, 6, 0, 0)
    assert summary.ok and summary.restarts == 0 and summary.output == str(out)
    assert messages[0] == (
        "[digits-test] 2 checkpoint(s) × 3 probe(s) = 6 task(s); 0 already stored; "
        "1 group(s) of 1 worker(s) (local); 192 probe examples"
    )
    assert messages[1].startswith("[digits-test] size: ") and "per worker: parameters" in messages[1]
    assert [m.split(" ")[1] for m in messages[2:8]] == [f"{i}/6" for i in range(1, 7)]
    assert all(" HVPs" in m and "elapsed" in m for m in messages[2:8])
    assert messages[-1].startswith("[digits-test] done: 6 run, 0 skipped, 0 failed, 0 restart(s) in ")
    assert messages[-1].endswith(f"results in {out}")

    shas = {file_sha256(p) for p in checkpoints}
    first = {}
    for index, kind in enumerate(KINDS):
        table = read(out, kind)
        first[kind] = table
        rows = table.to_pylist()
        assert len(rows) == 2
        assert {r["checkpoint_sha256"] for r in rows} == shas
        assert {r["checkpoint"] for r in rows} == {str(p) for p in checkpoints}
        resolved = spec.probes[index].resolved()
        for r in rows:
            assert json.loads(r["probe_config"]) == resolved
            assert r["job"] == "digits-test" and r["run_id"] == summary.run_id
            assert r["seed"] == task_seed(7, index)
            assert (r["dtype"], r["mode"], r["world_size"], r["attempts"], r["device"]) == (
                "float64",
                "eval",
                1,
                1,
                "cpu",
            )
            assert r["num_examples"] == 192 and r["model_factory"] == "probe.models:digits_mlp"
            assert r["num_matvecs"] > 0 and r["duration_s"] >= 0
        assert len({r["data_sha256"] for r in rows}) == 1
    eig = first["eigenvalues"].to_pylist()[0]
    assert len(eig["eigenvalues"]) == 3 and eig["eigenvalues"] == sorted(eig["eigenvalues"], reverse=True)

    # A re-run finds every task stored: nothing runs, no row is added or changed.
    again: list[str] = []
    rerun = run_job(load_spec(make_spec()), backend="local", progress=again.append)
    assert (rerun.num_done, rerun.num_skipped, rerun.num_failed) == (0, 6, 0)
    assert "6 already stored" in again[0] and "size:" in again[1] and len(again) == 3
    for kind in KINDS:
        assert read(out, kind).to_pylist() == first[kind].to_pylist()

    runs = sorted(read(out, "runs").to_pylist(), key=lambda r: r["started_at"])
    assert [r["run_id"] for r in runs] == [summary.run_id, rerun.run_id]
    assert [r["status"] for r in runs] == ["succeeded", "succeeded"]
    assert [(r["num_tasks"], r["num_done"], r["num_skipped"], r["num_failed"]) for r in runs] == [
        (6, 6, 0, 0),
        (6, 0, 6, 0),
    ]
    assert json.loads(runs[0]["spec"])["name"] == "digits-test" and json.loads(runs[0]["failures"]) == []


def direct_operator(spec, checkpoint) -> HessianOperator:
    """The float64 Hessian of the spec's probe set at ``checkpoint``, built directly (not through a worker)."""
    dataset, indices, _ = probe_subset(spec)
    batches = [
        torch.utils.data.default_collate([dataset[i] for i in indices[j : j + 50].tolist()])
        for j in range(0, len(indices), 50)
    ]
    model = digits_mlp(hidden=16)
    model.load_state_dict(load_file(str(checkpoint)))
    return HessianOperator(model.to(torch.float64), F.cross_entropy, batches)


def test_local_job_records_equal_the_estimators_run_directly(make_spec, checkpoints):
    """The job's wiring (probe subset, batching, precision, seeds) reproduces a direct computation exactly."""
    spec = load_spec(make_spec(probes=LIGHT_PROBES))
    summary = run_job(spec, backend="local", progress=lambda m: None)
    op = direct_operator(spec, checkpoints[0])
    eig = eigenvalues(
        op,
        3,
        **{k: PROBE_OPTIONS["eigenvalues"][k] for k in ("which", "tol", "max_steps")},
        generator=torch.Generator().manual_seed(task_seed(7, 0)),
    )
    tr = trace(op, num_matvecs=30, generator=torch.Generator().manual_seed(task_seed(7, 1)))
    mine = [r for r in summary.records if r["checkpoint"] == str(checkpoints[0])]
    eig_row = next(r for r in mine if "eigenvalues" in r)
    trace_row = next(r for r in mine if "trace" in r)
    # float64 tasks add the two products of their symmetry check (probe/symmetry.py)
    assert eig_row["eigenvalues"] == eig.eigenvalues.tolist() and eig_row["num_matvecs"] == eig.num_matvecs + 2
    assert (trace_row["trace"], trace_row["trace_stderr"]) == (tr.trace, tr.trace_stderr)


def test_local_backend_refuses_several_workers(make_spec):
    spec = load_spec(make_spec(cluster={"num_workers": 2}))
    with pytest.raises(ValueError, match="backend 'local' runs one worker, got cluster.num_workers=2"):
        run_job(spec, backend="local", progress=lambda m: None)


# --- the multiprocess backend --------------------------------------------------------


@pytest.mark.usefixtures("single_thread_children")
def test_process_backend_with_two_workers_matches_local(make_spec, tmp_path):
    local = run_job(
        load_spec(make_spec(output=tmp_path / "local", probes=LIGHT_PROBES)), backend="local", progress=lambda m: None
    )
    spec = load_spec(make_spec(output=tmp_path / "process", probes=LIGHT_PROBES, cluster={"num_workers": 2}))
    messages: list[str] = []
    summary = run_job(spec, backend="process", progress=messages.append)
    assert local.num_done == summary.num_done == 4 and summary.num_failed == 0
    assert "1 group(s) of 2 worker(s) (process)" in messages[0]
    for kind, cols in {"eigenvalues": ["eigenvalues"], "trace": ["trace", "trace_stderr"]}.items():
        table = read(tmp_path / "process", kind)
        assert set(table.column("world_size").to_pylist()) == {2}
        assert_close(by_task(table, cols), by_task(read(tmp_path / "local", kind), cols), RTOL)


# --- failures -----------------------------------------------------------------------


@pytest.mark.parametrize("max_restarts", [0, 1, 3])
def test_failure_policy_restarts_lost_workers_until_the_budget_is_spent(max_restarts):
    policy = FailurePolicy(max_restarts)
    lost = WorkerLost("a worker process exited")
    decisions = [policy.decide(lost, attempt) for attempt in range(1, max_restarts + 3)]
    assert decisions == ["restart"] * max_restarts + ["fail", "fail"]


@pytest.mark.parametrize("error", [TaskError("checkpoint mismatch"), ValueError("nan"), RuntimeError("x")])
def test_failure_policy_fails_errors_a_restart_cannot_fix(error):
    assert FailurePolicy(5).decide(error, 1) == "fail"


def test_failure_policy_default_budget():
    assert FailurePolicy().max_restarts == 3


@pytest.fixture
def checkpoint_missing_a_key(checkpoints, tmp_path):
    state = load_file(str(checkpoints[0]))
    del state["3.bias"]
    path = tmp_path / "missing-key.safetensors"
    save_file(state, str(path))
    return path


def test_checkpoint_missing_a_key_fails_its_task_and_the_others_succeed(
    make_spec, checkpoints, checkpoint_missing_a_key, tmp_path
):
    path = make_spec(probes=[{"kind": "eigenvalues", "k": 2}])
    spec = load_spec(path, [f"model.checkpoints=[{checkpoint_missing_a_key}, {checkpoints[1]}]"])
    messages: list[str] = []
    summary = run_job(spec, backend="local", progress=messages.append)

    assert (summary.num_tasks, summary.num_done, summary.num_failed, summary.restarts) == (2, 1, 1, 0)
    assert not summary.ok
    (failure,) = summary.failures
    assert failure["checkpoint"] == str(checkpoint_missing_a_key) and failure["kind"] == "eigenvalues"
    assert "missing keys ['3.bias']" in failure["reason"] and str(checkpoint_missing_a_key) in failure["reason"]
    assert any(m.startswith("[digits-test] FAILED eigenvalues @ ") and "'3.bias'" in m for m in messages)
    out = tmp_path / "results"
    assert read(out, "eigenvalues").column("checkpoint").to_pylist() == [str(checkpoints[1])]
    (run,) = read(out, "runs").to_pylist()
    assert run["status"] == "failed" and run["num_failed"] == 1
    assert "3.bias" in json.loads(run["failures"])[0]["reason"]

    # The failed task was not stored, so a re-run tries it again (and only it).
    rerun = run_job(spec, backend="local", progress=lambda m: None)
    assert (rerun.num_skipped, rerun.num_done, rerun.num_failed) == (1, 0, 1)


def test_process_group_reads_every_reply_of_a_failed_task():
    group = ProcessGroup.__new__(ProcessGroup)  # the driver side only: replies are scripted
    pipes = [multiprocessing.Pipe() for _ in range(2)]
    group.conns, group.procs = [driver for driver, _ in pipes], []
    for rank, (_, worker) in enumerate(pipes):
        worker.send(("error", "checkpoint 'bad.safetensors' does not match model.factory\ntraceback"))
        worker.send(("ok", {"rank": rank, "trace": 1.0}))
    with pytest.raises(TaskError, match="bad.safetensors"):
        group.run({"checkpoint": "bad.safetensors"})
    assert group.run({"checkpoint": "good.safetensors"}) == {"rank": 0, "trace": 1.0}


# --- the command line ---------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_run_exits_0_and_prints_progress(make_spec, tmp_path):
    path = make_spec(probes=[{"kind": "trace", "matvecs": 10}], num_examples=60)
    proc = run_cli("run", str(path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("[digits-test] 2 checkpoint(s) × 1 probe(s) = 2 task(s); 0 already stored; ")
    assert "(local)" in lines[0]
    # progress names the checkpoint by folder and file
    assert any(line.startswith("[digits-test] 2/2 trace @ ") and "/mlp-seed" in line for line in lines)
    assert lines[-1].startswith("[digits-test] done: 2 run, 0 skipped, 0 failed")
    assert read(tmp_path / "results", "trace").num_rows == 2


def test_cli_run_rejects_an_unknown_key_with_exit_2_and_one_line(make_spec, tmp_path):
    proc = run_cli("run", str(make_spec(bogus=1)))
    assert proc.returncode == 2
    assert proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("probe run: unknown key 'bogus'; valid keys: name, model, data, probes,")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "data.num_exmples=3"], "probe run: unknown key 'data.num_exmples'; valid keys of data: "),
        (["--set", "cluster.num_workers=0"], "probe run: cluster.num_workers must be a positive integer, got 0"),
        (["--set", "model.checkpoints=[nowhere/*.pt]"], "probe run: checkpoint entry "),
        (["--set", "probes.0.kind=hessian"], "probe run: unknown probe kind 'hessian'; valid kinds: eigenvalues, "),
    ],
)
def test_cli_bad_input_exits_2_with_the_reason(make_spec, capsys, args, message):
    code = cli_main(["run", str(make_spec()), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert line.startswith(message)


def test_cli_missing_spec_file_exits_2(tmp_path, capsys):
    assert cli_main(["run", str(tmp_path / "absent.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"probe run: spec file {str(tmp_path / 'absent.yaml')!r} not found"


def test_basis_storage_is_chosen_in_the_spec_and_recorded(make_spec, tmp_path):
    """Host and disk bases give the device basis's numbers; a budget too small for the basis falls back to
    reorth none, and every row says where its basis lived."""
    rows = {}
    for name, options in [
        ("device", {"basis": "device"}),
        ("host", {"basis": "host"}),
        ("disk", {"basis": "disk"}),
        ("budget", {"basis_memory_bytes": 1000}),
    ]:
        out = tmp_path / name
        eig_options = {"basis_memory_bytes": 6 * 1482 * 8} if name == "budget" else options  # 6 vectors of 1,482
        probes = [
            {"kind": "spectrum", "runs": 2, "steps": 12, **options},
            {"kind": "eigenvalues", "k": 2, **eig_options},
        ]
        spec = load_spec(make_spec(name="bases", probes=probes, output=out))
        spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, checkpoints=spec.model.checkpoints[:1]))
        summary = run_job(spec, backend="local", progress=lambda m: None)
        assert summary.ok, summary.failures
        rows[name] = (read(out, "spectrum").to_pylist()[0], read(out, "eigenvalues").to_pylist()[0])
        if name == "disk":
            assert not list((out / ".scratch").iterdir())  # the disk basis is removed after the probe
    for name in ("device", "host", "disk"):
        spectrum, eig = rows[name]
        assert spectrum["basis_storage"] == eig["basis_storage"] == name
        for a, b in zip(spectrum["ritz_values"], rows["device"][0]["ritz_values"], strict=True):
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-12 * max(abs(y) for y in b)
        assert eig["eigenvalues"] == pytest.approx(rows["device"][1]["eigenvalues"], rel=1e-12)
    budget, eig = rows["budget"]
    assert budget["reorth"] == "none" and budget["basis_storage"] == "none" and "ghost" in budget["note"]
    assert eig["num_steps"] <= 5 and "max_steps" in eig["note"]  # eigenvalues shorten the run instead, and say so


def _with_data(spec, **changes):
    return dataclasses.replace(spec, data=dataclasses.replace(spec.data, **changes))


def test_task_key_covers_the_batch_size_and_the_eval_sets_a_probe_reads(make_spec, checkpoints):
    from cluster.plan import plan_tasks

    between = [str(checkpoints[0]), str(checkpoints[1])]
    test_set = {"factory": "cluster.data:digits", "kwargs": {"split": "test"}, "num_examples": 40}
    spec = _with_data(
        load_spec(
            make_spec(
                name="keys",
                probes=[
                    {"kind": "eigenvalues", "k": 2},
                    {"kind": "barrier", "between": between, "eval_sets": ["probe", "test"], "points": 3},
                ],
            )
        ),
        eval_sets={"test": test_set},
    )
    pairs = [(str(p), file_sha256(p)) for p in checkpoints]

    def keys(s):
        return {(t.kind, t.checkpoint): t.key for t in plan_tasks(s, pairs, "data-sha")}

    base = keys(spec)
    assert keys(spec) == base  # deterministic
    other_batch = keys(_with_data(spec, batch_size=64))
    assert set(other_batch.values()).isdisjoint(base.values())  # every task depends on the batch size
    other_test = keys(_with_data(spec, eval_sets={"test": {**test_set, "num_examples": 41}}))
    for (kind, ckpt), key in base.items():  # only the probe that reads the eval set changes
        assert (other_test[kind, ckpt] != key) == (kind == "barrier")
    unused = keys(_with_data(spec, eval_sets={"test": test_set, "extra": test_set}))
    assert unused == base  # an eval set nobody reads changes nothing


def test_a_changed_batch_size_reruns_stored_tasks(make_spec, checkpoints):
    spec = load_spec(make_spec(name="rebatch", probes=[{"kind": "eigenvalues", "k": 2}]))
    first = run_job(spec, backend="local", progress=lambda m: None)
    assert first.num_done == 2 and first.num_skipped == 0
    assert run_job(spec, backend="local", progress=lambda m: None).num_skipped == 2
    second = run_job(_with_data(spec, batch_size=64), backend="local", progress=lambda m: None)
    assert second.num_done == 2 and second.num_skipped == 0  # not the rows of batch size 50
    from pathlib import Path

    rows = read(Path(spec.output.path), "eigenvalues").to_pylist()
    assert len(rows) == 4 and len({r["task_key"] for r in rows}) == 4


@pytest.mark.parametrize("method", ["xtrace", "krylov-hutch++"])
def test_trace_jobs_run_the_low_rank_estimators_as_the_python_api_does(make_spec, checkpoints, method):
    spec = load_spec(make_spec(probes=[{"kind": "trace", "method": method, "matvecs": 30}]))
    summary = run_job(spec, backend="local", progress=lambda m: None)
    op = direct_operator(spec, checkpoints[0])
    g = torch.Generator().manual_seed(task_seed(7, 0))
    row = next(r for r in summary.records if r["checkpoint"] == str(checkpoints[0]))
    sym = measure_symmetry(op, {"symmetry_check": None}, g)  # its own generator, seeded from the task's
    tr = trace(op, method=method, num_matvecs=30, generator=g)
    assert row["method"] == method and (row["trace"], row["trace_stderr"]) == (tr.trace, tr.trace_stderr)
    assert row["num_matvecs"] == tr.num_matvecs + sym.num_matvecs


def test_spectrum_jobs_deflate_the_converged_top_eigenvalues_as_the_python_api_does(make_spec, checkpoints):
    """``deflate: auto``: the row says which estimator ran and how many point masses entered, and those
    equal the dense float64 Hessian's top eigenvalues; the Ritz values equal the direct computation's."""
    spec = load_spec(make_spec(probes=[{"kind": "spectrum", "runs": 2, "steps": 12}]))  # deflate: auto, the default
    summary = run_job(spec, backend="local", progress=lambda m: None)
    op = direct_operator(spec, checkpoints[0])
    g = torch.Generator().manual_seed(task_seed(7, 0))
    row = next(r for r in summary.records if r["checkpoint"] == str(checkpoints[0]))
    sym = measure_symmetry(op, {"symmetry_check": None}, g)
    d = deflated_spectral_density(op, runs=2, steps=12, k="auto", generator=g)
    assert row["estimator"] == "deflated-slq" and row["deflated"] == d.k >= 1
    assert row["num_matvecs"] == d.num_matvecs + sym.num_matvecs
    assert row["ritz_values"] == [v.tolist() for v in d.ritz_values]
    dense = torch.linalg.eigvalsh(op.matmat(torch.eye(op.dim, dtype=torch.float64)))
    torch.testing.assert_close(d.deflated_values, dense[-d.k :], rtol=1e-8, atol=0)
    plain = load_spec(make_spec(probes=[{"kind": "spectrum", "runs": 2, "steps": 12, "deflate": 0}]))
    row = run_job(plain, backend="local", progress=lambda m: None).records[0]
    assert (row["estimator"], row["deflated"]) == ("slq", 0)
