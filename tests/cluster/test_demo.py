"""The README's main command, end to end: ``probe demo`` in its own process, with its
own local Ray instance (2 workers), every probe kind, Parquet, metrics and the report."""

from __future__ import annotations

import pyarrow.dataset as ds

from cluster.schema import schema_for

# 2 final checkpoints (A, B) for geometry (sharpness: 5 rows each, SAM at 1 and n steps); 7 of run A for eos
EXPECTED_ROWS = {
    "eigenvalues": 4,
    "trace": 2,
    "spectrum": 2,
    "sharpness": 10,
    "surface": 2,
    "barrier": 4,
    "eos": 7,
    "pacbayes": 2,
    "noise": 2,
    "critical": 2,
}


# the demo fixture (two runs of `probe demo`, shared with test_results_readers.py): conftest.py


def test_demo_writes_every_kind_to_parquet_from_two_workers(demo):
    out, _, _ = demo
    for kind, n in EXPECTED_ROWS.items():
        table = ds.dataset(out / "results" / kind, format="parquet", partitioning="hive").to_table()
        assert table.num_rows == n, kind
        assert set(schema_for(kind).names) <= set(table.column_names)
        assert set(table.column("world_size").to_pylist()) == {2}
    runs = ds.dataset(out / "results" / "runs", format="parquet", partitioning="hive").to_table().to_pylist()
    assert {r["status"] for r in runs} == {"succeeded"}


def test_demo_prints_its_story_and_where_everything_is(demo):
    out, first, _ = demo
    for needle in (
        "[1/5] training",
        "[2/5] starting a local Ray instance with 2 workers",
        "metrics at http://127.0.0.1:",
        "[3/5] job 'geometry'",
        "[4/5] job 'trajectory'",
        "[5/5] writing the report",
        "λ_max",
        "barrier A ↔ B, bezier path",
        "edge of stability, run A",
        'landscape_probe_lambda_max{series="geometry"}',
    ):
        assert needle in first, needle
    assert f"report ........ {out / 'results' / 'report' / 'index.html'}" in first
    assert (out / "results" / "report" / "index.html").stat().st_size > 10_000
    assert sorted(p.name for p in (out / "specs").iterdir()) == ["geometry.yaml", "trajectory.yaml"]


def test_a_second_demo_finds_everything_stored_and_runs_nothing(demo):
    _, _, second = demo
    assert "19 task(s); 19 already stored" in second
    assert "1 task(s); 1 already stored" in second
    assert "done: 0 run, 19 skipped" in second
