"""The Parquet result store (cluster/store.py): rows readable with plain
``pyarrow.parquet.read_table`` (what pandas calls) and no options, declared schemas,
idempotent task-keyed writes, atomicity and errors that name the folder. Other readers and
folders of the earlier layout: test_results_readers.py."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.schema import FAILURES_SCHEMA, KIND_FIELDS, RUNS_SCHEMA, SCHEMA_VERSION, schema_for
from cluster.store import ResultStore, RowColumnsError, StoreError

KINDS = sorted(KIND_FIELDS)
CREATED = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)


def value_for(field: pa.Field, i: int):
    """A distinct, valid value of ``field``'s type (``i`` varies it)."""
    t = field.type
    if pa.types.is_string(t):
        return f"{field.name}-{i}"
    if pa.types.is_timestamp(t):
        return CREATED
    if pa.types.is_integer(t):
        return i + 1
    if pa.types.is_floating(t):
        return 0.5 + i
    if pa.types.is_boolean(t):
        return i % 2 == 0
    if pa.types.is_list(t):
        inner = pa.field("item", t.value_type)
        return [value_for(inner, i), value_for(inner, i + 1)]
    raise AssertionError(f"no test value for {field}")


def make_row(schema: pa.Schema, *, job: str = "audit", key: str = "task0", i: int = 0) -> dict:
    row = {f.name: value_for(f, i) for f in schema}
    row.update(job=job, schema_version=SCHEMA_VERSION)
    if "task_key" in schema.names:
        row["task_key"] = key
    if "run_id" in schema.names:
        row["run_id"] = f"run{i}"
    return row


def read_plain(folder) -> pa.Table:
    """A dataset as a reader without options sees it (pandas.read_parquet's call: hive inference on)."""
    return pq.read_table(folder)


def visible_files(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))


# --- writing and reading ------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_row_of_each_kind_reads_back_with_plain_pyarrow(tmp_path, kind):
    store = ResultStore(tmp_path / "results")
    row = make_row(schema_for(kind))
    path = store.write_result(kind, row)
    assert path == tmp_path / "results" / kind / "audit" / "part-task0.parquet"
    table = read_plain(tmp_path / "results" / kind)
    declared = schema_for(kind)
    assert sorted(table.schema.names) == sorted(declared.names)
    for f in declared:
        assert table.schema.field(f.name).type == f.type, f.name
    assert table.num_rows == 1
    assert table.to_pylist()[0] == row
    # Each file carries the declared schema itself, column order included.
    assert pq.read_schema(path).names == declared.names
    assert store.read(kind).to_pylist() == [row]


def test_runs_row_reads_back(tmp_path):
    store = ResultStore(tmp_path)
    rows = [make_row(RUNS_SCHEMA, i=i) for i in range(2)]
    for row in rows:
        store.write_run(row)
    table = read_plain(tmp_path / "runs")
    assert sorted(table.schema.names) == sorted(RUNS_SCHEMA.names)
    assert sorted(table.to_pylist(), key=lambda r: r["run_id"]) == rows
    assert sorted(p.name for p in (tmp_path / "runs" / "audit").glob("run-*.parquet")) == [
        "run-run0.parquet",
        "run-run1.parquet",
    ]


def test_failure_rows_read_back_one_file_per_task_and_run(tmp_path):
    store = ResultStore(tmp_path)
    rows = [make_row(FAILURES_SCHEMA, i=i) for i in range(2)]
    for row in rows:
        store.write_failure(row)
    store.write_failure(rows[0])  # the same task and run again: the same file
    table = read_plain(tmp_path / "failures")
    assert sorted(table.schema.names) == sorted(FAILURES_SCHEMA.names)
    assert sorted(table.to_pylist(), key=lambda r: r["run_id"]) == rows
    assert store.read("failures").num_rows == 2
    names = sorted(p.name for p in (tmp_path / "failures" / "audit").glob("fail-*.parquet"))
    assert names == ["fail-task0-run0.parquet", "fail-task0-run1.parquet"]  # one task, failed in two runs


def test_rows_of_several_tasks_and_jobs(tmp_path):
    store = ResultStore(tmp_path)
    schema = schema_for("trace")
    for job in ("alpha", "beta"):
        for i in range(3):
            store.write_result("trace", make_row(schema, job=job, key=f"{job}{i}", i=i))
    table = read_plain(tmp_path / "trace")
    assert table.num_rows == 6
    assert sorted(table.column("job").to_pylist()) == ["alpha"] * 3 + ["beta"] * 3
    assert store.done_task_keys("trace", "alpha") == {"alpha0", "alpha1", "alpha2"}
    assert store.done_task_keys("trace", "gamma") == set()
    assert store.done_task_keys("spectrum", "alpha") == set()


def test_same_task_key_written_twice_leaves_one_row(tmp_path):
    store = ResultStore(tmp_path)
    schema = schema_for("eigenvalues")
    store.write_result("eigenvalues", make_row(schema, key="same", i=0))
    store.write_result("eigenvalues", make_row(schema, key="same", i=1))
    table = read_plain(tmp_path / "eigenvalues")
    assert table.num_rows == 1
    assert table.column("num_matvecs").to_pylist() == [2]  # the second write replaced the first
    assert store.done_task_keys("eigenvalues", "audit") == {"same"}


def test_reading_a_kind_never_written_gives_an_empty_table_with_its_schema(tmp_path):
    store = ResultStore(tmp_path / "nothing-yet")
    assert store.read("spectrum").schema == schema_for("spectrum") and store.read("spectrum").num_rows == 0
    assert store.read("runs").schema == RUNS_SCHEMA


def test_row_missing_a_required_column_is_refused(tmp_path):
    row = make_row(schema_for("trace"))
    del row["checkpoint_sha256"]
    with pytest.raises(pa.ArrowInvalid, match="checkpoint_sha256"):
        ResultStore(tmp_path).write_result("trace", row)
    assert visible_files(tmp_path) == []


def test_row_with_an_undeclared_key_is_refused_naming_the_kind_and_key(tmp_path):
    row = make_row(schema_for("eigenvalues"))
    row["lamda_max"] = 1.0  # pa.Table.from_pylist would drop it silently
    with pytest.raises(
        RowColumnsError,
        match=r"result row of probe kind 'eigenvalues' has undeclared column\(s\) "
        r"'lamda_max'.*cluster/kinds/eigenvalues\.py",
    ) as info:
        ResultStore(tmp_path).write_result("eigenvalues", [make_row(schema_for("eigenvalues")), row])
    assert info.value.category == "other" and isinstance(info.value, pa.ArrowInvalid)
    assert visible_files(tmp_path) == []


def test_row_missing_a_nullable_column_is_written_with_null(tmp_path):
    row = make_row(schema_for("trace"))
    del row["symmetry_defect"], row["num_parameters"]
    ResultStore(tmp_path).write_result("trace", row)
    (back,) = read_plain(tmp_path / "trace").to_pylist()
    assert back["symmetry_defect"] is None and back["num_parameters"] is None and back["trace"] == row["trace"]


def test_job_name_with_unsafe_characters_reads_back_unchanged(tmp_path):
    store = ResultStore(tmp_path)
    store.write_result("trace", make_row(schema_for("trace"), job="my job"))
    assert read_plain(tmp_path / "trace").column("job").to_pylist() == ["my job"]
    assert [p.name for p in (tmp_path / "trace").iterdir()] == ["my%20job"]


def test_numeric_job_name_is_readable_by_the_store_and_refused_by_specs(tmp_path):
    store = ResultStore(tmp_path)
    store.write_result("trace", make_row(schema_for("trace"), job="2024"))
    assert store.read("trace").column("job").to_pylist() == ["2024"]
    assert read_plain(tmp_path / "trace").column("job").to_pylist() == ["2024"]  # a string: no hive key to infer
    # Specs still refuse such names (hive inference typed the earlier layout's job=2024/ as int32).
    from cluster.spec import SpecError, _check_name

    with pytest.raises(SpecError, match=r"name must start with a letter"):
        _check_name("2024")


# --- failures -----------------------------------------------------------------------


def interrupted_write(real):
    """A ``pq.write_table`` that writes the file, cuts it in half, then fails like a full disk."""

    def write_table(table, where, **kwargs):
        real(table, where, **kwargs)
        size = os.path.getsize(where)
        with open(where, "rb+") as f:
            f.truncate(size // 2)
        raise OSError(28, "No space left on device")

    return write_table


def test_interrupted_write_leaves_nothing_visible_and_earlier_results_intact(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    schema = schema_for("spectrum")
    first = make_row(schema, key="first")
    store.write_result("spectrum", first)
    monkeypatch.setattr(pq, "write_table", interrupted_write(pq.write_table))
    folder = tmp_path / "spectrum" / "audit"
    expected = f"cannot write results to {str(folder)!r}: No space left on device; earlier results are intact"
    with pytest.raises(StoreError, match=re.escape(expected)):
        store.write_result("spectrum", make_row(schema, key="second", i=1))
    # Nothing partial anywhere, not even hidden: the temporary file was removed.
    assert sorted(p.name for p in folder.iterdir()) == ["_SUCCESS", "part-first.parquet"]
    assert read_plain(tmp_path / "spectrum").to_pylist() == [first]
    assert store.done_task_keys("spectrum", "audit") == {"first"}


def test_interrupted_rewrite_keeps_the_previous_version_of_the_row(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    schema = schema_for("trace")
    old = make_row(schema, key="k", i=0)
    store.write_result("trace", old)
    monkeypatch.setattr(pq, "write_table", interrupted_write(pq.write_table))
    with pytest.raises(StoreError):
        store.write_result("trace", make_row(schema, key="k", i=5))
    assert read_plain(tmp_path / "trace").to_pylist() == [old]


def test_non_os_error_during_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)

    def write_table(table, where, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", write_table)
    with pytest.raises(KeyboardInterrupt):
        store.write_result("trace", make_row(schema_for("trace")))
    assert list((tmp_path / "trace" / "audit").iterdir()) == []


def unwritable_root(tmp_path):
    """A root under which writing fails.

    A read-only folder, or (as root, whom modes do not stop) a path under a file.
    """
    if os.geteuid() != 0:
        root = tmp_path / "readonly"
        root.mkdir()
        root.chmod(0o555)
        return root, root / "trace" / "audit"
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file, not a folder")
    root = blocker / "sub"
    return root, root / "trace" / "audit"


def test_unwritable_output_folder_gives_store_error_naming_the_folder(tmp_path):
    root, folder = unwritable_root(tmp_path)
    try:
        with pytest.raises(StoreError, match=re.escape(f"cannot write results to {str(folder)!r}: ")) as info:
            ResultStore(root).write_result("trace", make_row(schema_for("trace")))
        assert isinstance(info.value, OSError)  # callers catching OSError still see it
        with pytest.raises(StoreError, match=re.escape(str(root / "runs"))):
            ResultStore(root).write_run(make_row(RUNS_SCHEMA))
    finally:
        if root.is_dir():
            root.chmod(0o755)
