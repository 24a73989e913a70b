"""A results folder as pandas DataFrames: ``cluster.results.load("results", "eigenvalues")``.

One row per stored result (per run for ``runs``, per given-up task for ``failures``), every
column of the kind's schema (``cluster/schema.py``), among them ``job``, ``step`` (the training
step, where known) and ``checkpoint_name`` (the checkpoint's name relative to its run folder:
``checkpoint-200`` or ``step-3.safetensors``). List columns (eigenvalues, grids, densities, loss
curves) hold Python lists, integer columns pandas' nullable integers (``step`` stays an integer
where some rows have none), ``created_at`` a UTC timestamp. Rows come sorted by job, step,
checkpoint and creation time, so a column plots against ``step`` as it is. Folders of every
layout the store wrote read alike (see :mod:`cluster.store`); rows older than a column read
it as missing, nothing is filled in.

The same folders read without this module too, with no options::

    pandas.read_parquet("results/eigenvalues")
    polars.read_parquet("results/eigenvalues/**/*.parquet")
    duckdb.sql("SELECT * FROM read_parquet('results/eigenvalues/**/*.parquet')")

A folder written before schema version 4 (``<kind>/job=<name>/``) reads with :func:`load` and the
store as it is; ``python -m cluster.results migrate results`` moves it to the current layout,
after which those readers open it as well.

pandas is an optional dependency: ``pip install 'landscape-probe[results]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from cluster.errors import ProbeError
from cluster.schema import KIND_FIELDS
from cluster.store import ResultStore

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ResultsError", "DATASETS", "kinds", "load", "migrate", "differing_options", "main"]

# Every dataset a results folder may hold: one per probe kind, plus the job runs and the failed tasks.
DATASETS = (*KIND_FIELDS, "runs", "failures")
_ORDER = ("job", "step", "checkpoint_name", "checkpoint", "created_at", "task_key")


class ResultsError(ProbeError, ValueError):
    """A results folder or kind that cannot be read; the message names the folder and what it holds."""

    category = "bad_spec"


def kinds(path: str | os.PathLike) -> list[str]:
    """The datasets a results folder holds (those with at least one result file), in name order."""
    root = Path(path)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name in DATASETS and any(p.glob("*/*.parquet")))


def differing_options(configs: list[dict], ignore: Collection[str] = ()) -> list[str]:
    """The option names, sorted, whose values differ between ``configs`` (the probe options of
    entries of one kind, as in ``probe_config``), less ``ignore``: what tells the entries apart."""
    keys = sorted({k for c in configs for k in c} - set(ignore))
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def _root(path: str | os.PathLike, kind: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise ResultsError(
            f"no results folder {str(root)!r}: give a job's output.path (the folder holding runs/, one folder per kind)"
        )
    if root.name == kind and not (root / kind).is_dir() and root.parent.is_dir():
        root = root.parent  # the kind's own folder was given: results/eigenvalues
    present = kinds(root)
    listed = ", ".join(present) if present else "none"
    if kind not in DATASETS:
        raise ResultsError(
            f"unknown result kind {kind!r}; kinds present in {str(root)!r}: {listed} (all kinds: {', '.join(DATASETS)})"
        )
    if kind not in present:
        raise ResultsError(f"no {kind!r} results in {str(root)!r}; kinds present: {listed}")
    return root


def _pandas():
    try:
        import pandas
    except ImportError as exc:
        raise ResultsError(
            "cluster.results.load needs pandas: pip install 'landscape-probe[results]' (or pandas)"
        ) from exc
    return pandas


def load(path: str | os.PathLike, kind: str) -> pd.DataFrame:
    """The rows of one dataset of a results folder, as a pandas DataFrame.

    Args:
        path: a job's ``output.path`` (``results``); the kind's own folder (``results/eigenvalues``)
            is taken too.
        kind: a probe kind (``eigenvalues``, ``trace``, ``eos``, ...), ``runs`` or ``failures``.

    Returns:
        One row per stored row, the dataset's columns in schema order (see the module's docstring).

    Raises:
        ResultsError: the folder is missing, the kind is unknown or the folder holds none of its
            results (the message lists the kinds present), or pandas is not installed.
    """
    pd = _pandas()
    table = ResultStore(_root(path, kind)).read(kind)
    table = table.sort_by([(c, "ascending") for c in _ORDER if c in table.column_names])
    nested = [f.name for f in table.schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]
    ints = {t: pd.Int64Dtype() for t in (pa.int8(), pa.int16(), pa.int32(), pa.int64())}
    frame = table.drop_columns(nested).to_pandas(types_mapper=ints.get)
    for name in nested:  # lists, not numpy arrays: what the row held, nested lists included
        frame[name] = pd.Series(table.column(name).to_pylist(), index=frame.index, dtype=object)
    return frame[table.column_names]


def migrate(path: str | os.PathLike) -> list[Path]:
    """Move a results folder written before schema version 4 to the current layout
    (:meth:`cluster.store.ResultStore.migrate`); run it while no job writes there.

    Returns:
        The job folders that received files.

    Raises:
        ResultsError: when ``path`` is not a folder.
    """
    root = Path(path)
    if not root.is_dir():
        raise ResultsError(f"no results folder {str(root)!r} to migrate: give a job's output.path")
    return ResultStore(root).migrate()


def main(argv: list[str] | None = None) -> int:
    """``python -m cluster.results migrate PATH``: move old job folders to the current layout."""
    parser = argparse.ArgumentParser(prog="python -m cluster.results", description="Results folders.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="move job=<name>/ folders to <name>/ (schema version 4)").add_argument("path")
    args = parser.parse_args(argv)
    try:
        moved = migrate(args.path)
    except ResultsError as exc:
        print(f"python -m cluster.results: {exc}", file=sys.stderr)
        return exc.exit_code
    for folder in moved:
        print(f"moved into {folder}")
    print(f"{len(moved)} job folder(s) moved to the current layout" if moved else "nothing to move")
    return 0


if __name__ == "__main__":
    sys.exit(main())
