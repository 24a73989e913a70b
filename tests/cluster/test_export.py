"""``probe export``: scalars of a real results folder (Parquet written through the store) logged to
TensorBoard, MLflow and Weights & Biases by their real libraries, offline, and read back."""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.export import ExportError, export_results, scalar_points
from cluster.schema import SCHEMA_VERSION
from cluster.store import ResultStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def row(kind: str, job: str, checkpoint: str, step: int | None, config: dict, n: int = 0, **columns) -> dict:
    return {
        "run_id": "r1",
        "job": job,
        "task_key": hashlib.sha256(f"{kind} {checkpoint} {sorted(config.items())}".encode()).hexdigest()[:24],
        "checkpoint": checkpoint,
        "checkpoint_sha256": "0" * 64,
        "checkpoint_name": Path(checkpoint).name,
        "step": step,
        "probe_config": json.dumps(config, sort_keys=True),
        "seed": 0,
        "created_at": T0 + timedelta(seconds=n),
        "schema_version": SCHEMA_VERSION,
        **columns,
    }


# run A: three checkpoints at steps 0, 50, 200; λ_max grows, trace shrinks
STEPS = (0, 50, 200)
LAMBDA = {0: 0.5, 50: 1.75, 200: 0.875}
TRACE = {0: 4.0, 50: 3.5, 200: 3.25}


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "results"
    store = ResultStore(root)
    for n, step in enumerate(STEPS):
        ck = f"ckpts/checkpoint-{step}"
        largest, smallest = {"which": "largest", "k": 2}, {"which": "smallest", "k": 3}
        store.write_result(
            "eigenvalues",
            row("eigenvalues", "run-a", ck, step, largest, n, which="largest", eigenvalues=[LAMBDA[step], 0.25]),
        )
        store.write_result(
            "eigenvalues",
            row("eigenvalues", "run-a", ck, step, smallest, n, which="smallest", eigenvalues=[-0.01, 0.02, 0.03]),
        )
        store.write_result("trace", row("trace", "run-a", ck, step, {}, n, trace=TRACE[step], trace_stderr=0.125))
        sharp = {"measures": ["keskar", "sam"], "epsilon": 1e-3}
        store.write_result(
            "sharpness",
            [
                row("sharpness", "run-a", ck, step, sharp, n, measure="keskar", value=0.1 * (n + 1), epsilon=1e-3),
                row("sharpness", "run-a", ck, step, sharp, n, measure="sam", value=float("nan")),
            ],
        )
    # run B: checkpoints without a training step (logged at checkpoint indices, in measuring order)
    store.write_result("eos", row("eos", "run-b", "b/late.pt", None, {}, 5, lambda_max=3.0, ratio=1.5, momentum=0.9))
    store.write_result("eos", row("eos", "run-b", "b/early.pt", None, {}, 1, lambda_max=2.0, ratio=1.0, momentum=0.9))
    # job "pair": two training runs in one job, both measured at step 10: one tracker run per folder
    for n, (ck, step, lam) in enumerate(
        (("x/run1/s5.pt", 5, 1.0), ("x/run1/s10.pt", 10, 2.0), ("y/run2/s10.pt", 10, 4.0))
    ):
        trace = row("trace", "pair", ck, step, {}, n, trace=lam)
        store.write_result("trace", {**trace, "checkpoint_name": Path(ck).name})
    return root


def test_points_cover_every_quantity_at_its_step(results):
    said: list[str] = []
    points = scalar_points(results, say=said.append)
    a = {(p.tag, p.step): p.value for p in points if p.job == "run-a"}
    for step in STEPS:
        assert a[("lambda_max", step)] == LAMBDA[step]
        assert a[("eigenvalues/k-2/which-largest/eigenvalue_1", step)] == LAMBDA[step]
        assert a[("eigenvalues/k-2/which-largest/eigenvalue_2", step)] == 0.25
        assert a[("eigenvalues/k-3/which-smallest/eigenvalue_1", step)] == -0.01
        assert a[("trace/trace", step)] == TRACE[step]
        assert a[("trace/trace_stderr", step)] == 0.125
    assert a[("sharpness/keskar/value", 50)] == pytest.approx(0.2)
    assert not any(t.startswith("sharpness/sam/") for t, _ in a)  # NaN left out
    assert not any(t.endswith("/epsilon") for t, _ in a)  # an option echoed in the rows, not a measurement
    b = {(p.tag, p.step): p.value for p in points if p.job == "run-b"}
    assert b == {
        ("eos/lambda_max", 0): 2.0,
        ("eos/ratio", 0): 1.0,
        ("eos/lambda_max", 1): 3.0,
        ("eos/ratio", 1): 1.5,
        ("lambda_max", 0): 2.0,
        ("lambda_max", 1): 3.0,
    }
    assert len(said) == 1 and "run-b" in said[0] and "checkpoint indices 0..1" in said[0]
    pair = {(p.series, p.tag, p.step): p.value for p in points if p.job == "pair"}
    assert pair == {("run1", "trace/trace", 5): 1.0, ("run1", "trace/trace", 10): 2.0, ("run2", "trace/trace", 10): 4.0}
    assert {p.series for p in points if p.job != "pair"} == {""}


def test_tensorboard_event_files_read_back(results, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    export_results(results, "tensorboard", out=out, run_name="sweep", say=lambda _: None)
    acc = EventAccumulator(str(out / "sweep-run-a"))
    acc.Reload()
    lam = acc.Scalars("lambda_max")
    assert [e.step for e in lam] == list(STEPS)
    assert [e.value for e in lam] == pytest.approx([LAMBDA[s] for s in STEPS], rel=1e-7)
    assert [e.value for e in acc.Scalars("trace/trace")] == pytest.approx([TRACE[s] for s in STEPS], rel=1e-7)
    assert "sharpness/keskar/value" in acc.Tags()["scalars"]
    b = EventAccumulator(str(out / "sweep-run-b"))
    b.Reload()
    assert [(e.step, e.value) for e in b.Scalars("eos/ratio")] == [(0, 1.0), (1, 1.5)]


def test_mlflow_file_store_read_back(results, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "mlruns"
    export_results(results, "mlflow", out=out, say=lambda _: None)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading a file store needs the same opt-in
    client = MlflowClient(tracking_uri=out.resolve().as_uri())
    experiment = client.get_experiment_by_name("landscape-probe")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"run-a", "run-b", "pair-run1", "pair-run2"}
    pair = client.get_metric_history(runs["pair-run2"].info.run_id, "trace/trace")
    assert [(m.step, m.value) for m in pair] == [(10, 4.0)]
    history = client.get_metric_history(runs["run-a"].info.run_id, "lambda_max")
    assert sorted((m.step, m.value) for m in history) == [(s, LAMBDA[s]) for s in STEPS]
    which = client.get_metric_history(runs["run-a"].info.run_id, "eigenvalues/k-3/which-smallest/eigenvalue_1")
    assert [(m.step, m.value) for m in sorted(which, key=lambda m: m.step)] == [(s, -0.01) for s in STEPS]
    assert runs["run-a"].data.tags["landscape_probe.job"] == "run-a"


def wandb_records(run_file: Path):
    """The records of a W&B run file (a LevelDB-style log: 7-byte header, 32 KiB blocks,
    records with crc32 / length / type), parsed with wandb's own protobuf definitions."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_read_back(results, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    export_results(results, "wandb", out=out, say=lambda _: None)
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 4
    histories = {}
    for f in files:
        records = list(wandb_records(f))
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert len(runs) == 1, (f, f.stat().st_size, [r.WhichOneof("record_type") for r in records])
        name = runs[0].display_name
        logged = [
            {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        histories[name] = {h["_step"]: h for h in logged}  # W&B's own step key
    a = histories["run-a"]
    assert sorted(a) == list(STEPS)
    for s in STEPS:
        assert a[s]["lambda_max"] == LAMBDA[s]
        assert a[s]["trace/trace"] == TRACE[s]
    assert {s: h["eos/ratio"] for s, h in histories["run-b"].items()} == {0: 1.0, 1: 1.5}


def test_cli_export(results, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert main(["export", str(results), "--to", "tensorboard", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "to tensorboard" in printed and "checkpoint indices" in printed
    acc = EventAccumulator(str(out / "run-a"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("lambda_max")] == list(STEPS)


def test_cli_export_bad_inputs(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere"), "--to", "mlflow"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--to", "mlflow"]) == 2
    assert "holds no results" in capsys.readouterr().err


def test_missing_backend_names_the_extra(results, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import raises ImportError
    with pytest.raises(ExportError, match=r"pip install 'landscape-probe\[wandb\]'"):
        export_results(results, "wandb", say=lambda _: None)
    with pytest.raises(ExportError, match="--to must be one of tensorboard, mlflow, wandb, got 'csv'"):
        export_results(results, "csv")
