"""Reading a results folder for ``probe report``: the rows of each dataset and the failed tasks.

Read through :meth:`cluster.store.ResultStore.read`, which takes both folder layouts
(``<kind>/<job>/`` and the ``<kind>/job=<job>/`` of schema versions up to 3); ``failures/``
files may differ in columns, so they are read with the union of their schemas. Failed tasks
are merged from the ``runs`` rows' ``failures`` JSON and the ``failures`` dataset, each
failure once.
"""

from __future__ import annotations

import json
from pathlib import Path

from cluster.store import ResultStore

__all__ = ["read_rows", "run_failures", "failures"]


def read_rows(root: Path, kind: str) -> list[dict]:
    """Rows of one dataset (empty when the folder is absent or holds no rows).

    Files may differ in columns (``failures``; results written before a schema version
    added columns, such as ``checkpoint_name``, ``step`` and ``lr`` in version 2), so the
    union of their schemas is read: a column a file lacks reads as null.
    """
    table = ResultStore(root).read(kind)
    return table.to_pylist() if table.num_rows else []


def run_failures(run: dict) -> list[dict]:
    """The entries of a runs row's ``failures`` JSON (a list of ``{task, checkpoint, kind, reason}``)."""
    text = run.get("failures") or "[]"
    try:
        items = json.loads(text)
    except ValueError:
        return [{"reason": f"unreadable failures JSON: {text}"}]
    items = items if isinstance(items, list) else [items]
    return [item if isinstance(item, dict) else {"reason": str(item)} for item in items]


def failures(runs: list[dict], failure_rows: list[dict]) -> list[dict]:
    """Failed tasks from the runs rows' ``failures`` JSON and the ``failures`` dataset, without repeats."""
    seen: dict[tuple, dict] = {}

    def add(entry: dict, source: str) -> None:
        key = tuple(str(entry.get(k) or "") for k in ("run_id", "job", "kind", "checkpoint", "reason"))
        if key not in seen:
            seen[key] = {**entry, "source": source}
            return
        known = seen[key]  # the same failure from both sources: fill in what the first lacked (category, ...)
        known.update({k: v for k, v in entry.items() if v not in (None, "") and not known.get(k)})
        known["source"] += f", {source}" if source not in known["source"] else ""

    for run in runs:
        for item in run_failures(run):
            add({"run_id": run.get("run_id"), "job": run.get("job"), **item}, "runs")
    for row in failure_rows:
        add(row, "failures dataset")
    return sorted(seen.values(), key=lambda f: tuple(str(f.get(k) or "") for k in ("job", "kind", "checkpoint")))
