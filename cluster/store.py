"""The Parquet result store: atomic, idempotent writes that every Parquet reader opens without options.

Layout (schema version 4): ``<root>/<kind>/<job>/part-<task_key>.parquet``,
``<root>/runs/<job>/run-<run_id>.parquet`` and
``<root>/failures/<job>/fail-<task_key>-<run_id>.parquet``. Every row carries ``job`` as a
plain string column, and the job's folder is named by the job alone (URI-encoded; a leading
``.`` or ``_`` encoded too, so no job's folder is hidden), with no ``key=value`` hive segment.
That is what lets ``pandas.read_parquet(folder)``, ``pyarrow.parquet.read_table``,
``pyarrow.dataset``, polars (``pl.read_parquet(folder)``, ``pl.scan_parquet(f"{folder}/**/*.parquet")``),
DuckDB (``read_parquet('folder/**/*.parquet')``) and Spark read a dataset without options
and agree: readers that infer hive partitions find none, so ``job`` comes from the files
only. (Up to version 3 the folders were ``job=<job>/``: the key named the column again,
pyarrow typed it as a dictionary and pandas refused to merge it with the files' string
column. Dropping the column from the files instead would have left ``job`` to each reader's
partition inference: a category in pandas, absent from a polars glob.)

Folders of the earlier layout (``job=<job>/``) stay readable: :meth:`ResultStore.read` reads
them with the hive key typed as a string (a file that lacks ``job`` takes it from the
folder), :meth:`ResultStore.done_task_keys` counts their tasks as stored, a rewrite of such a
task moves it into the new folder, and :meth:`ResultStore.migrate` moves a whole results
folder to the new layout (then pandas reads it too).

A file is written under a hidden name (``.tmp-…``, which Parquet readers ignore), flushed,
then renamed into place, so a reader never sees a partial file and an interrupted write
leaves nothing visible. The file name of a result is its task key (job, checkpoint
content, probe options, seed, precision, mode, data), so re-running a job rewrites
the same files instead of adding rows. A ``_SUCCESS`` marker is touched in the
job's folder after each write.

A result row must match its kind's declared columns (``cluster/schema.py``: the common
columns plus ``Kind.columns``): a key the schema does not declare (a misspelled column)
and a missing non-nullable column are refused with :class:`RowColumnsError`, naming the
kind and the keys, before anything is written; a nullable column the row omits is
written as null. (``pa.Table.from_pylist`` alone would silently drop the undeclared key.)
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from cluster.errors import ProbeError
from cluster.schema import FAILURES_SCHEMA, RUNS_SCHEMA, schema_for

__all__ = ["ResultStore", "StoreError", "RowColumnsError", "check_row"]

# Job folders of the layout before schema version 4 (``job=<job>/``), read with the hive key typed
# as a string: the files' own ``job`` column, or the folder's value for a file without one.
_LEGACY_PREFIX = "job="
_LEGACY_PARTITIONING = ds.partitioning(pa.schema([("job", pa.string())]), flavor="hive")
_HIDDEN = (".", "_")  # names Parquet readers skip: temporary files, _SUCCESS


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


def _folder(name: str) -> str:
    """A job's folder: its name URI-encoded (no ``/``, no ``=``, so never a hive segment), a leading
    ``.`` or ``_`` encoded as well, so that no reader skips the folder as hidden; an empty name is
    ``%``, which encodes no other name."""
    text = quote(name, safe="")
    return f"%{ord(text[0]):02X}{text[1:]}" if text.startswith(_HIDDEN) else text or "%"


def _legacy_folder(name: str) -> str:
    """A job's folder in the layout before schema version 4."""
    return _LEGACY_PREFIX + quote(name, safe="")


def _is_legacy(folder: Path) -> bool:
    return folder.name.startswith(_LEGACY_PREFIX)


def _visible(folder: Path, pattern: str = "*.parquet") -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith(_HIDDEN))


def _job_folders(dataset: Path) -> list[Path]:
    return sorted(p for p in dataset.iterdir() if p.is_dir() and not p.name.startswith(_HIDDEN))


class ResultStore:
    """Results of jobs under one root folder.

    Args:
        root: the ``output.path`` folder (created on first write).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _write(self, table: pa.Table, dataset: str, job: str, name: str) -> Path:
        path = self._write_file(table, self.root / dataset / _folder(job), name)
        try:  # the same task stored under the earlier layout: this file replaces it
            (self.root / dataset / _legacy_folder(job) / name).unlink(missing_ok=True)
        except OSError:
            pass  # left in place, it is still shadowed on reading (see _files)
        return path

    def _write_file(self, table: pa.Table, folder: Path, name: str) -> Path:
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
        return self._write(table, kind, first["job"], f"part-{first['task_key']}.parquet")

    def write_run(self, row: dict) -> Path:
        """Write the ``runs`` row of one job run."""
        table = pa.Table.from_pylist([row], schema=RUNS_SCHEMA)
        return self._write(table, "runs", row["job"], f"run-{row['run_id']}.parquet")

    def write_failure(self, row: dict) -> Path:
        """Write the ``failures`` row of one task given up on in one run."""
        table = pa.Table.from_pylist([row], schema=FAILURES_SCHEMA)
        return self._write(table, "failures", row["job"], f"fail-{row['task_key']}-{row['run_id']}.parquet")

    def done_task_keys(self, kind: str, job: str) -> set[str]:
        """Task keys already stored for ``kind`` and ``job`` (from the file names: no data read), in
        either layout's folder."""
        folders = (self.root / kind / _folder(job), self.root / kind / _legacy_folder(job))
        return {p.name[len("part-") : -len(".parquet")] for f in folders for p in _visible(f, "part-*.parquet")}

    def _files(self, dataset: Path) -> list[str]:
        """The visible Parquet files of one dataset, both layouts; a file of an earlier-layout folder
        that the job's new folder holds too (a rewrite cut off before the old copy went) is left out."""
        files = []
        for sub in _job_folders(dataset):
            new = dataset / _folder(unquote(sub.name[len(_LEGACY_PREFIX) :])) if _is_legacy(sub) else None
            files += [str(p) for p in _visible(sub) if new is None or not (new / p.name).exists()]
        return files

    def read(self, kind: str) -> pa.Table:
        """All rows of ``kind`` (every job; ``runs`` and ``failures`` too), in both layouts.

        Files written under an older schema version lack the columns added since
        (``checkpoint_name``, ``step``, ``lr`` in version 2; ``hvp``, ``layout``, ``lm_head`` in 3):
        the union of the files' schemas and the current one is read, so such a column reads as null.
        """
        folder = self.root / kind
        declared = {"runs": RUNS_SCHEMA, "failures": FAILURES_SCHEMA}.get(kind) or schema_for(kind)
        files = self._files(folder) if folder.is_dir() else []
        if not files:
            return declared.empty_table()
        options = {"format": "parquet", "partitioning": _LEGACY_PARTITIONING, "partition_base_dir": str(folder)}
        dataset = ds.dataset(files, **options)
        schemas = [f.physical_schema for f in dataset.get_fragments()]
        try:  # the declared columns with their declared types (a hand-written file's int64 or null cast),
            # then any column only some files hold
            unified = pa.unify_schemas([*schemas, declared], promote_options="permissive")
            schema = pa.schema([*declared, *(f for f in unified if f.name not in declared.names)])
            return ds.dataset(files, schema=schema, **options).to_table()
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):  # a type no cast bridges
            return dataset.to_table()  # the files' own view

    def migrate(self) -> list[Path]:
        """Move every job folder of the layout before schema version 4 (``<dataset>/job=<job>/``) to the
        job's plain folder, so that readers without options (pandas) read the root too.

        Files are moved, not rewritten, except one without a ``job`` column (written by hand),
        which is written again with the job of its folder. Where the new folder already holds a
        file of the same name (the task was rewritten since), that newer file is kept. Run it while
        no job writes to the root. Running it again finds nothing to do.

        Returns:
            The job folders that received files, in order.

        Raises:
            StoreError: when a file cannot be written (an ``OSError`` when one cannot be moved); the
                files not yet moved stay in place, and running it again goes on.
        """
        moved: list[Path] = []
        datasets = _job_folders(self.root) if self.root.is_dir() else []
        for old in (sub for dataset in datasets for sub in _job_folders(dataset) if _is_legacy(sub)):
            job = unquote(old.name[len(_LEGACY_PREFIX) :])
            new = old.parent / _folder(job)
            files = _visible(old)
            for path in files:
                if (new / path.name).exists():
                    path.unlink()
                elif "job" in pq.read_schema(path).names:
                    new.mkdir(exist_ok=True)
                    os.replace(path, new / path.name)
                else:
                    table = pq.ParquetFile(path).read()
                    self._write_file(
                        table.add_column(1, "job", pa.array([job] * table.num_rows, pa.string())), new, path.name
                    )
                    path.unlink()
            (old / "_SUCCESS").unlink(missing_ok=True)
            if files:
                (new / "_SUCCESS").touch()
                moved.append(new)
            try:
                old.rmdir()
            except OSError:
                pass  # not empty: a file the store did not write (kept where it is)
        return moved
