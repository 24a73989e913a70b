"""Planning a job: its tasks (checkpoints × probes, pairwise and per-series probes as one task
each), their storage keys and what of them is not stored yet. Pure: nothing here runs a probe
or starts a worker; :mod:`cluster.job` runs what this plans."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from cluster.checkpoints import CheckpointError, CheckpointInfo, checkpoint_info, checkpoint_sha256
from cluster.kinds import KINDS
from cluster.runners import task_seed
from cluster.spec import JobSpec

__all__ = ["Task", "plan_tasks", "pending_tasks"]


@dataclass(frozen=True)
class Task:
    """One unit of work: a probe kind with its resolved options on one checkpoint (or a pair, or a
    series), its index in the spec's probes and its storage key."""

    checkpoint: str
    checkpoint_sha256: str
    kind: str
    options: dict
    probe_index: int
    key: str
    # Kinds stored one row per checkpoint of a series (eos): the storage key of each
    # checkpoint's row, in ``options["series"]`` order; a re-run or an audit only
    # measures the checkpoints whose row is missing.
    row_keys: tuple[str, ...] = ()
    # where the workers report this task's progress while it runs (cluster.progress.ProgressHub.channel)
    progress: dict = field(default_factory=dict, compare=False, repr=False)

    def payload(self) -> dict:
        """What is sent to workers."""
        return {
            "checkpoint": self.checkpoint,
            "kind": self.kind,
            "options": self.options,
            "probe_index": self.probe_index,
            **({"progress": self.progress} if self.progress else {}),
        }


def _model_ident(spec: JobSpec) -> list:
    """What the model is built from, as the task key sees it (a factory's key is as it always was)."""
    m = spec.model
    if m.factory is not None:
        return [m.factory, m.kwargs]
    return [m.source, {"hf_class": m.hf_class, "attn_implementation": m.attn_implementation}]


def _task_key(spec: JobSpec, ckpt_sha: str, kind: str, options: dict, probe_index: int, data_sha: str) -> str:
    """The storage key of a task: a hash of every input that changes its result, so that a changed
    input re-runs the task instead of reusing a stale row.

    It covers the checkpoint's contents, the kind and resolved options, the seed, precision, mode,
    model, loss, the probe set's contents (``data_sha``), ``data.batch_size`` (train-mode batch
    statistics and BatchNorm re-estimation along paths depend on it) and the definitions of the
    evaluation sets the probe reads (``options["eval_sets"]`` other than ``probe``).
    """
    eval_sets = {n: spec.data.eval_sets.get(n) for n in options.get("eval_sets") or [] if n != "probe"}
    ident = json.dumps(
        [
            spec.name,
            ckpt_sha,
            kind,
            options,
            task_seed(spec.seed, probe_index),
            spec.precision if spec.vector_dtype is None else f"{spec.precision}/vectors:{spec.vector_dtype}",
            spec.mode,
            *_model_ident(spec),
            spec.loss,
            data_sha,
            spec.data.batch_size,
            eval_sets,
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def _sha(path: str, kind: str) -> str:
    if path == "init":
        return "init"
    if not Path(path).is_file():
        raise CheckpointError(f"{kind} endpoint {path!r} does not exist; give a checkpoint file or 'init'")
    return checkpoint_sha256(path)


def plan_tasks(
    spec: JobSpec, checkpoints: list[tuple[str, str]], data_sha: str, infos: dict[str, CheckpointInfo] | None = None
) -> list[Task]:
    """Tasks for ``checkpoints`` (``(path, sha256)`` pairs) × the spec's probes, in checkpoint order.

    A pairwise probe (barrier) is one task over its endpoints (``Kind.checkpoint_options``;
    its row's ``checkpoint`` is the last endpoint; the task key covers every endpoint's
    contents). A per-series probe (eos) is one task over the series with a row (and a
    storage key) per checkpoint; its ``series_steps`` are the checkpoints' training steps
    (``infos``, else :func:`cluster.checkpoints.checkpoint_info`), a checkpoint's index
    where unknown. A probe whose ``Kind.series`` says so (surface's PCA directions) gets
    the job's checkpoints as ``options["series"]``.
    """
    infos = infos if infos is not None else {}
    tasks = []
    for path, sha in checkpoints:
        for i, p in enumerate(spec.probes):
            kind = KINDS[p.kind]
            if kind.pairwise or kind.per_series:
                continue
            options = p.resolved()
            if kind.series is not None and kind.series(options):  # e.g. PCA of the checkpoint trajectory
                options = {**options, "series": [c for c, _ in checkpoints]}
            tasks.append(Task(path, sha, p.kind, options, i, _task_key(spec, sha, p.kind, options, i, data_sha)))
    for i, p in enumerate(spec.probes):
        kind = KINDS[p.kind]
        if kind.per_series and checkpoints:  # one task over the series, in order (warm starts), one row per checkpoint
            steps = [(infos.get(c) or checkpoint_info(c)).step for c, _ in checkpoints]
            steps = [i if s is None else s for i, s in enumerate(steps)]
            options = {**p.resolved(), "series": [c for c, _ in checkpoints], "series_steps": steps}
            row_keys = tuple(_task_key(spec, sha, p.kind, p.resolved(), i, data_sha) for _, sha in checkpoints)
            key = hashlib.sha256("".join(row_keys).encode()).hexdigest()[:24]
            tasks.append(Task(checkpoints[-1][0], checkpoints[-1][1], p.kind, options, i, key, row_keys))
        if kind.pairwise:
            options = p.resolved()
            ends = [e for name in kind.checkpoint_options for e in options[name]]
            shas = [_sha(e, p.kind) for e in ends]
            key = _task_key(spec, "".join(shas), p.kind, options, i, data_sha)
            tasks.append(Task(ends[-1], shas[-1], p.kind, options, i, key))
    return tasks


def _pending(task: Task, done: set[str]) -> Task | None:
    """``task`` reduced to what is not stored yet, or None when nothing is left."""
    if not task.row_keys:
        return None if task.key in done else task
    keep = [i for i, k in enumerate(task.row_keys) if k not in done]
    if not keep:
        return None
    if len(keep) == len(task.row_keys):
        return task
    o = task.options
    options = {**o, "series": [o["series"][i] for i in keep], "series_steps": [o["series_steps"][i] for i in keep]}
    row_keys = tuple(task.row_keys[i] for i in keep)
    return replace(
        task, options=options, row_keys=row_keys, key=hashlib.sha256("".join(row_keys).encode()).hexdigest()[:24]
    )


def pending_tasks(tasks: list[Task], done: dict[str, set[str]]) -> list[Task]:
    """The tasks (or the parts of series tasks) whose rows are not stored yet, in plan order."""
    return [p for p in (_pending(t, done[t.kind]) for t in tasks) if p is not None]
