"""Results every reader opens (schema version 4): pandas, pyarrow, polars and DuckDB read each
dataset of a results folder without options and agree row for row, ``job`` a plain string;
``cluster.results.load`` gives a pandas DataFrame with ``step`` and ``checkpoint_name``; folders
of the earlier layout (``<kind>/job=<name>/``) read with the store and ``load`` and migrate."""

from __future__ import annotations

import math
from pathlib import Path
from urllib.parse import quote

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from test_store import make_row  # tests/cluster/test_store.py

from cluster.report_data import read_rows
from cluster.results import DATASETS, ResultsError, kinds, load, main, migrate
from cluster.schema import FAILURES_SCHEMA, KIND_FIELDS, RUNS_SCHEMA, SCHEMA_VERSION, schema_for
from cluster.store import ResultStore

# Job names that would trip a layout: spaces, '=', a leading digit, '_' and '.' (hidden to readers), '/', '%', none.
HOSTILE_JOBS = ["audit", "my job", "a=b", "2024", "_private", ".dot", "x/y%z", ""]


def _flat_list_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if pa.types.is_list(f.type) and not pa.types.is_nested(f.type.value_type)]


def _key(dataset: str) -> str:
    return "run_id" if dataset == "runs" else "task_key"


def _canon(key, job, *lists) -> tuple:
    """One row as comparable text: doubles by repr (NaN equals NaN), lists as tuples, None as None."""
    return (key, job, *(None if v is None else tuple(repr(float(x)) for x in v) for v in lists))


def read_all(folder: Path, dataset: str) -> dict[str, list[tuple]]:
    """Every reader's rows of one dataset folder (sorted canonical tuples), each reader called without
    options; each reader's own type of ``job`` is checked to be a plain string on the way."""
    key, lists = _key(dataset), _flat_list_columns(pq.read_schema(next(folder.glob("*/*.parquet"))))
    cols = [key, "job", *lists]
    got: dict[str, list[tuple]] = {}

    for name, table in (("pyarrow.dataset", ds.dataset(folder).to_table()), ("pq.read_table", pq.read_table(folder))):
        assert table.schema.field("job").type == pa.string(), name
        got[name] = sorted(_canon(*r) for r in zip(*(table.column(c).to_pylist() for c in cols), strict=True))

    frame = pd.read_parquet(folder)
    assert pd.api.types.is_string_dtype(frame["job"]) and not isinstance(frame["job"].dtype, pd.CategoricalDtype)
    got["pandas"] = sorted(
        _canon(r[0], r[1], *(None if v is None else list(v) for v in r[2:]))
        for r in frame[cols].itertuples(index=False, name=None)
    )

    for name, pframe in (
        ("polars glob", pl.read_parquet(f"{folder}/**/*.parquet")),
        ("polars folder", pl.scan_parquet(folder).collect()),
    ):
        assert pframe.schema["job"] == pl.String, name
        got[name] = sorted(_canon(*r) for r in pframe.select(cols).iter_rows())

    rel = duckdb.sql(f"SELECT * FROM read_parquet('{folder}/**/*.parquet')")
    assert dict(zip(rel.columns, rel.types, strict=True))["job"] == "VARCHAR"
    got["duckdb"] = sorted(_canon(*r) for r in rel.select(*cols).fetchall())
    return got


def assert_readers_agree(root: Path, dataset: str, expected_rows: int | None = None) -> list[tuple]:
    got = read_all(root / dataset, dataset)
    reference = got["pyarrow.dataset"]
    for name, rows in got.items():
        assert rows == reference, (dataset, name)
    frame = load(root, dataset)
    loaded = sorted(
        _canon(*r)
        for r in frame[[_key(dataset), "job", *_flat_list_columns(schema_or_runs(dataset))]].itertuples(
            index=False, name=None
        )
    )
    assert loaded == reference, (dataset, "cluster.results.load")
    if expected_rows is not None:
        assert len(reference) == expected_rows, dataset
    return reference


def schema_or_runs(dataset: str) -> pa.Schema:
    return {"runs": RUNS_SCHEMA, "failures": FAILURES_SCHEMA}.get(dataset) or schema_for(dataset)


# --- the demo's results ----------------------------------------------------------------


def test_pandas_polars_and_duckdb_read_every_dataset_of_the_demo(demo):
    from test_demo import EXPECTED_ROWS

    out, _, _ = demo
    results = out / "results"
    assert kinds(results) == sorted([*EXPECTED_ROWS, "runs"])  # every probe kind of the product, and runs
    assert not list(results.glob("*/job=*")), "the demo wrote folders of the earlier layout"
    jobs = set()
    for dataset in kinds(results):
        rows = assert_readers_agree(results, dataset, EXPECTED_ROWS.get(dataset))  # runs: one per job and demo
        jobs |= {r[1] for r in rows}
    assert jobs == {"geometry", "trajectory"}

    eig = load(results, "eigenvalues")
    assert len(eig) == EXPECTED_ROWS["eigenvalues"] and eig["step"].dtype == pd.Int64Dtype()
    assert all(isinstance(v, list) and all(isinstance(x, float) for x in v) for v in eig["eigenvalues"])
    assert eig["checkpoint_name"].notna().all() and (eig["schema_version"] == SCHEMA_VERSION).all()
    eos = load(results, "eos")  # one row per checkpoint of run A: the series plots against step as loaded
    assert eos["step"].notna().all() and eos["step"].is_monotonic_increasing and eos["step"].is_unique
    assert list(pd.read_parquet(results / "eos").sort_values("step")["ratio"]) == list(eos["ratio"])


# --- the layout, written by the store ---------------------------------------------------


def test_every_reader_reads_jobs_with_hostile_names_as_the_store_wrote_them(tmp_path):
    store = ResultStore(tmp_path)
    for i, job in enumerate(HOSTILE_JOBS):
        store.write_result("eigenvalues", make_row(schema_for("eigenvalues"), job=job, key=f"k{i}", i=i))
        store.write_run(make_row(RUNS_SCHEMA, job=job, i=i))
        store.write_failure(make_row(FAILURES_SCHEMA, job=job, key=f"k{i}", i=i))
    folders = sorted(p.name for p in (tmp_path / "eigenvalues").iterdir())
    assert folders == sorted(["audit", "my%20job", "a%3Db", "2024", "%5Fprivate", "%2Edot", "x%2Fy%25z", "%"])
    for dataset in ("eigenvalues", "runs", "failures"):
        rows = assert_readers_agree(tmp_path, dataset, len(HOSTILE_JOBS))
        assert sorted(r[1] for r in rows) == sorted(HOSTILE_JOBS)
        assert sorted(store.read(dataset).column("job").to_pylist()) == sorted(HOSTILE_JOBS)
    assert all(store.done_task_keys("eigenvalues", job) == {f"k{i}"} for i, job in enumerate(HOSTILE_JOBS))


def test_load_keeps_steps_as_integers_lists_as_lists_and_sorts_by_job_and_step(tmp_path):
    store, schema = ResultStore(tmp_path), schema_for("eigenvalues")
    for key, job, step, name in [
        ("c", "b-run", 30, "checkpoint-30"),
        ("a", "a-run", 20, "checkpoint-20"),
        ("b", "a-run", 10, "checkpoint-10"),
        ("d", "a-run", None, "final.safetensors"),  # a checkpoint without a known step
    ]:
        row = make_row(schema, job=job, key=key)
        row.update(step=step, checkpoint_name=name, eigenvalues=[float(len(key)), 0.5], residuals=[])
        store.write_result("eigenvalues", row)
    frame = load(tmp_path, "eigenvalues")
    assert list(frame.columns) == schema.names
    assert list(frame["task_key"]) == ["b", "a", "d", "c"]
    assert frame["step"].dtype == pd.Int64Dtype() and frame["step"].isna().tolist() == [False, False, True, False]
    assert [int(s) for s in frame["step"].dropna()] == [10, 20, 30]
    assert list(frame["checkpoint_name"]) == ["checkpoint-10", "checkpoint-20", "final.safetensors", "checkpoint-30"]
    assert frame["eigenvalues"].tolist() == [[1.0, 0.5]] * 4 and frame["residuals"].tolist() == [[]] * 4
    assert str(frame["created_at"].dtype) == "datetime64[us, UTC]"
    # the kind's own folder is taken too
    assert load(tmp_path / "eigenvalues", "eigenvalues")["task_key"].tolist() == ["b", "a", "d", "c"]


def test_load_errors_are_one_line_and_list_the_kinds_present(tmp_path):
    store = ResultStore(tmp_path)
    store.write_result("trace", make_row(schema_for("trace")))
    store.write_run(make_row(RUNS_SCHEMA))
    cases = [
        (tmp_path / "nowhere", "trace", f"no results folder {str(tmp_path / 'nowhere')!r}: give a job's output.path"),
        (tmp_path, "eigenvals", f"unknown result kind 'eigenvals'; kinds present in {str(tmp_path)!r}: runs, trace"),
        (tmp_path, "eigenvalues", f"no 'eigenvalues' results in {str(tmp_path)!r}; kinds present: runs, trace"),
        (tmp_path / "empty", "trace", None),
    ]
    (tmp_path / "empty").mkdir()
    for path, kind, message in cases:
        with pytest.raises(ResultsError) as info:
            load(path, kind)
        text = str(info.value)
        assert "\n" not in text and info.value.exit_code == 2
        assert text.startswith(message) if message else text.endswith("kinds present: none")
    assert "all kinds: " + ", ".join(DATASETS) in str(pytest.raises(ResultsError, load, tmp_path, "x").value)


# --- the earlier layout: <dataset>/job=<name>/, written as the store wrote it up to version 3 -------


def old_store_write(root: Path, dataset: str, job: str, name: str, rows: list[dict], schema: pa.Schema) -> Path:
    """One file as cluster/store.py wrote it until schema version 3: the hive folder ``job=`` + the
    URI-encoded name, ``job`` also a column of the file, a ``_SUCCESS`` marker beside it."""
    folder = root / dataset / ("job=" + quote(job, safe=""))
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / name)
    (folder / "_SUCCESS").touch()
    return folder / name


def old_row(kind: str, job: str, key: str, i: int) -> dict:
    row = make_row(schema_for(kind), job=job, key=key, i=i)
    row.update(schema_version=3, checkpoint_name=f"checkpoint-{10 * (i + 1)}", step=10 * (i + 1))
    return row


def old_results(root: Path) -> None:
    """An old results folder: two jobs of trace rows, one of them named with a space; a runs row;
    and a file of schema version 1 (no checkpoint_name, step, lr, hvp, layout, lm_head), which, as
    hand-written files may, also lacks ``job`` (its folder names it)."""
    for job in ("audit", "my job"):
        for i in range(2):
            old_store_write(
                root,
                "trace",
                job,
                f"part-{job[:2]}{i}.parquet",
                [old_row("trace", job, f"{job[:2]}{i}", i)],
                schema_for("trace"),
            )
    old_store_write(
        root, "runs", "audit", "run-run0.parquet", [make_row(RUNS_SCHEMA) | {"schema_version": 3}], RUNS_SCHEMA
    )
    v1 = {
        k: v
        for k, v in old_row("trace", "audit", "v1", 5).items()
        if k not in ("job", "checkpoint_name", "step", "lr", "hvp", "layout", "lm_head")
    }
    pq.write_table(pa.Table.from_pylist([v1 | {"schema_version": 1}]), root / "trace" / "job=audit" / "part-v1.parquet")


def test_a_folder_of_the_earlier_layout_reads_with_the_store_load_and_the_report_reader(tmp_path):
    old_results(tmp_path)
    with pytest.raises(pa.ArrowTypeError, match="Field job has incompatible types"):
        pd.read_parquet(tmp_path / "trace")  # what the layout change is for
    store = ResultStore(tmp_path)
    table = store.read("trace")
    rows = {r["task_key"]: r for r in table.to_pylist()}
    assert table.schema.field("job").type == pa.string() and len(rows) == 5
    assert {k: r["job"] for k, r in rows.items()} == {
        "au0": "audit",
        "au1": "audit",
        "my0": "my job",
        "my1": "my job",
        "v1": "audit",
    }
    assert rows["au1"]["step"] == 20 and rows["au1"]["checkpoint_name"] == "checkpoint-20"
    assert rows["v1"]["step"] is None and rows["v1"]["hvp"] is None and rows["v1"]["schema_version"] == 1
    assert store.done_task_keys("trace", "audit") == {"au0", "au1", "v1"}
    assert store.done_task_keys("trace", "my job") == {"my0", "my1"}
    assert [r["run_id"] for r in read_rows(tmp_path, "runs")] == ["run0"]

    frame = load(tmp_path, "trace")
    assert sorted(frame["task_key"]) == sorted(rows) and frame["job"].tolist().count("audit") == 3
    assert frame.set_index("task_key").loc["au0", "step"] == 10 and pd.isna(
        frame.set_index("task_key").loc["v1", "step"]
    )


def test_a_task_of_the_earlier_layout_rewritten_moves_to_the_new_folder(tmp_path):
    old_results(tmp_path)
    store = ResultStore(tmp_path)
    again = old_row("trace", "audit", "au0", 7) | {"schema_version": SCHEMA_VERSION}
    path = store.write_result("trace", again)
    assert path == tmp_path / "trace" / "audit" / "part-au0.parquet"
    assert not (tmp_path / "trace" / "job=audit" / "part-au0.parquet").exists()
    assert store.done_task_keys("trace", "audit") == {"au0", "au1", "v1"}
    rows = [r for r in store.read("trace").to_pylist() if r["task_key"] == "au0"]
    assert [r["schema_version"] for r in rows] == [SCHEMA_VERSION]
    # a rewrite cut off between writing the new file and removing the old one: read once, the new copy
    old_store_write(
        tmp_path, "trace", "audit", "part-au0.parquet", [old_row("trace", "audit", "au0", 0)], schema_for("trace")
    )
    rows = [r for r in store.read("trace").to_pylist() if r["task_key"] == "au0"]
    assert [r["schema_version"] for r in rows] == [SCHEMA_VERSION]


def test_migrating_an_old_folder_keeps_every_row_and_every_reader_then_opens_it(tmp_path, capsys):
    old_results(tmp_path)
    before = {d: sorted(ResultStore(tmp_path).read(d).to_pylist(), key=str) for d in ("trace", "runs")}
    assert main(["migrate", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("3 job folder(s) moved to the current layout\n")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_dir()) == [
        "runs",
        "runs/audit",
        "trace",
        "trace/audit",
        "trace/my%20job",
    ]
    after = {d: sorted(ResultStore(tmp_path).read(d).to_pylist(), key=str) for d in ("trace", "runs")}
    assert after == before  # the v1 file too: written again with the job of its folder
    assert pq.read_table(tmp_path / "trace" / "audit" / "part-v1.parquet").column("job").to_pylist() == ["audit"]
    assert_readers_agree(tmp_path, "runs", 1)
    # trace holds files of two schema versions (v1 lacks six columns): pandas reads them all
    assert sorted(pd.read_parquet(tmp_path / "trace")["job"]) == ["audit"] * 3 + ["my job"] * 2
    assert migrate(tmp_path) == []  # nothing left to move
    assert main(["migrate", str(tmp_path / "nowhere")]) == 2
    assert "no results folder" in capsys.readouterr().err


def test_kinds_lists_the_datasets_holding_results(tmp_path):
    assert kinds(tmp_path / "nowhere") == []
    store = ResultStore(tmp_path)
    for kind in KIND_FIELDS:
        store.write_result(kind, make_row(schema_for(kind)))
    store.write_failure(make_row(FAILURES_SCHEMA))
    (tmp_path / "report").mkdir()
    assert kinds(tmp_path) == sorted([*KIND_FIELDS, "failures"])
    for kind in kinds(tmp_path):
        assert_readers_agree(tmp_path, kind, 1)
    assert math.isfinite(load(tmp_path, "trace")["trace"].iloc[0])
