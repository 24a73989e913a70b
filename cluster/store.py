"""The Parquet result store: atomic, idempotent writes readable with plain ``pyarrow.dataset``.

Layout: ``<root>/<kind>/job=<job>/part-<task_key>.parquet``,
``<root>/runs/job=<job>/run-<run_id>.parquet`` and
``<root>/failures/job=<job>/fail-<task_key>-<run_id>.parquet``. A file is written under a hidden
name (``.tmp-…``, which ``pyarrow.dataset`` ignores), flushed, then renamed into
place, so a reader never sees a partial file and an interrupted write leaves
nothing visible. The file name of a result is its task key (job, checkpoint
content, probe options, seed, precision, mode, data), so re-running a job rewrites
the same files instead of adding rows. A ``_SUCCESS`` marker is touched in the
partition after each write.

A result row must match its kind's declared columns (``cluster/schema.py``: the common
columns plus ``Kind.columns``): a key the schema does not declare (a misspelled column)
and a missing non-nullable column are refused with :class:`RowColumnsError`, naming the
kind and the keys, before anything is written; a nullable column the row omits is
written as null. (``pa.Table.from_pylist`` alone would silently drop the undeclared key.)
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cluster.errors import ProbeError
from cluster.schema import FAILURES_SCHEMA, RUNS_SCHEMA, schema_for

__all__ = ["ResultStore", "StoreError", "RowColumnsError", "check_row"]

_JOB_PARTITIONING = ds.partitioning(pa.schema([("job", pa.string())]), flavor="hive")


class StoreError(ProbeError, OSError):
    """A result that could not be written; earlier results are untouched."""

    category = "write_failed"


class RowColumnsError(ProbeError, pa.ArrowInvalid):
    """A result row whose keys do not match its kind's declared columns: a bug in the kind's runner
    (or the driver), not bad input (category ``other``). Also an ``ArrowInvalid``, what writing
    the row would raise for a missing non-nullable column."""

    category = "other"


def check_row(kind: str, schema: pa.Schema, row: dict) -> dict:
    """``row`` with every declared column: refused when it holds an undeclared key or lacks a
    non-nullable column; a missing nullable column becomes None.

    Raises:
        RowColumnsError: naming the kind, the offending keys and where columns are declared.
    """
    names = set(schema.names)
    undeclared = sorted(k for k in row if k not in names)
    if undeclared:
        raise RowColumnsError(
            f"result row of probe kind {kind!r} has undeclared column(s) {', '.join(map(repr, undeclared))}: "
            f"a misspelled key or a column missing from the kind's columns (cluster/kinds/{kind}.py); "
            "nothing was written"
        )
    missing = [f.name for f in schema if not f.nullable and f.name not in row]
    if missing:
        raise RowColumnsError(
            f"result row of probe kind {kind!r} lacks the required column(s) {', '.join(map(repr, missing))}; "
            "nothing was written"
        )
    return {name: row.get(name) for name in schema.names}


def _partition(name: str) -> str:
    # URI-encoded (pyarrow decodes hive segments as URIs), so any job name reads back unchanged.
    return "job=" + quote(name, safe="")


class ResultStore:
    """Results of jobs under one root folder.

    Args:
        root: the ``output.path`` folder (created on first write).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _write(self, table: pa.Table, folder: Path, name: str) -> Path:
        final = folder / name
        tmp = folder / f".tmp-{name}-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            (folder / "_SUCCESS").touch()
        except BaseException as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise StoreError(
                    f"cannot write results to {str(folder)!r}: {exc.strerror or exc}; earlier results are intact"
                ) from exc
            raise
        return final

    def write_result(self, kind: str, row: dict | list[dict]) -> Path:
        """Write the row(s) of one task of ``kind`` (the file is named by the rows' ``task_key``).

        Raises:
            RowColumnsError: for a row with an undeclared key or without a required column
                (:func:`check_row`); nothing is written.
            StoreError: when the file cannot be written.
        """
        rows = row if isinstance(row, list) else [row]
        schema = schema_for(kind)
        rows = [check_row(kind, schema, r) for r in rows]
        table = pa.Table.from_pylist(rows, schema=schema)
        first = rows[0]
        return self._write(table, self.root / kind / _partition(first["job"]), f"part-{first['task_key']}.parquet")

    def write_run(self, row: dict) -> Path:
        """Write the ``runs`` row of one job run."""
        table = pa.Table.from_pylist([row], schema=RUNS_SCHEMA)
        return self._write(table, self.root / "runs" / _partition(row["job"]), f"run-{row['run_id']}.parquet")

    def write_failure(self, row: dict) -> Path:
        """Write the ``failures`` row of one task given up on in one run."""
        table = pa.Table.from_pylist([row], schema=FAILURES_SCHEMA)
        return self._write(
            table, self.root / "failures" / _partition(row["job"]), f"fail-{row['task_key']}-{row['run_id']}.parquet"
        )

    def done_task_keys(self, kind: str, job: str) -> set[str]:
        """Task keys already stored for ``kind`` and ``job`` (from the file names: no data read)."""
        folder = self.root / kind / _partition(job)
        if not folder.is_dir():
            return set()
        return {p.name[len("part-") : -len(".parquet")] for p in folder.glob("part-*.parquet")}

    def read(self, kind: str) -> pa.Table:
        """All rows of ``kind`` (every job), with the ``job`` partition column.

        Files written under an older schema version lack the columns added since
        (``checkpoint_name``, ``step``, ``lr`` in version 2): the union of the files'
        schemas and the current one is read, so such a column reads as null.
        """
        folder = self.root / kind
        declared = {"runs": RUNS_SCHEMA, "failures": FAILURES_SCHEMA}.get(kind) or schema_for(kind)
        if not folder.is_dir():
            return declared.empty_table()
        dataset = ds.dataset(folder, format="parquet", partitioning=_JOB_PARTITIONING)
        schemas = [f.physical_schema for f in dataset.get_fragments()]
        if not schemas:
            return declared.empty_table()
        try:
            schema = pa.unify_schemas([*schemas, declared, pa.schema([("job", pa.string())])])
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column whose type changed: the files' own view
            return dataset.to_table()
        return ds.dataset(folder, schema=schema, format="parquet", partitioning=_JOB_PARTITIONING).to_table()
