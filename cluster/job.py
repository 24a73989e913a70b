"""The job driver: expand a spec into tasks, run them on worker groups, store the records.

A job is checkpoints × probes. Each task runs SPMD on one worker group; with
``cluster.group_size < cluster.num_workers`` several groups take tasks from one
queue concurrently (fan-out over checkpoints and probes). Finished tasks are
written at once (see :mod:`cluster.store`), so a re-run skips them and adds no
rows. A worker that dies makes its group be rebuilt and the task re-run, as the
:class:`FailurePolicy` decides; the row's ``attempts`` column records it.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Callable

from pathlib import Path

from cluster.checkpoints import CheckpointError, CheckpointInfo, checkpoint_entries, checkpoint_info, checkpoint_sha256
from cluster.estimate import check_fits, estimate
from cluster.groups import LocalGroup, ProcessGroup, RayGroup, TaskError, WorkerLost
from cluster.errors import category_of
from cluster.metrics import FAILURE_REASONS, Metrics
from cluster.schema import SCHEMA_VERSION
from cluster.spec import JobSpec, import_factory
from cluster.store import ResultStore, StoreError
from cluster.worker import probe_subset, task_seed

__all__ = ["Task", "FailurePolicy", "JobSummary", "plan_tasks", "run_job", "choose_backend", "library_versions"]


@dataclass(frozen=True)
class Task:
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

    def payload(self) -> dict:
        """What is sent to workers."""
        return {"checkpoint": self.checkpoint, "kind": self.kind, "options": self.options, "probe_index": self.probe_index}


def library_versions() -> dict[str, str]:
    import numpy
    import pyarrow
    import torch

    versions = {"torch": torch.__version__, "numpy": numpy.__version__, "pyarrow": pyarrow.__version__}
    try:
        from importlib.metadata import version

        versions["landscape-probe"] = version("landscape-probe")
        versions["ray"] = version("ray")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        pass
    return versions


def _model_ident(spec: JobSpec) -> list:
    """What the model is built from, as the task key sees it (a factory's key is as it always was)."""
    m = spec.model
    if m.factory is not None:
        return [m.factory, m.kwargs]
    return [m.source, {"hf_class": m.hf_class, "attn_implementation": m.attn_implementation}]


def preflight(spec: JobSpec) -> None:
    """Every input check that needs no worker, for callers about to start a cluster: factories
    import, checkpoints exist (run folders included), the model builds from each (``model.hf``:
    config, attention, tensor names and shapes), and the data factory gives the probe set.

    Raises:
        SpecError, CheckpointError: one line naming the key or file and the fix.
    """
    if spec.model.factory is not None:
        import_factory(spec.model.factory, key="model.factory")
    if isinstance(spec.loss, dict):
        import_factory(spec.loss["factory"], key="loss.factory")
    from cluster.checkpoints import expand_checkpoints

    spec = prepare_model(spec, expand_checkpoints(spec.model.checkpoints), lambda m: None)
    probe_subset(spec)


def prepare_model(spec: JobSpec, paths: list[str], progress: Callable[[str], None] = print) -> JobSpec:
    """Checks of the model that need no worker, and ``precision: auto`` resolved.

    For ``model.hf`` every checkpoint's config must build (on the meta device) with an attention
    that has a double backward, and its weights' names and shapes (safetensors headers) must match
    it, ties allowed. ``auto`` precision becomes the first checkpoint's dtype (hf) or float32.

    Raises:
        CheckpointError: one line naming the file and the fix.
    """
    from cluster.hf import check_hf_checkpoint, resolve_precision

    hf = spec.model.hf is not None
    if hf:
        for p in paths:
            check_hf_checkpoint(p, hf_root=spec.model.hf, hf_class=spec.model.hf_class,
                                attn_implementation=spec.model.attn_implementation)
    precision, note = resolve_precision(spec.precision, hf, paths[0] if paths else None)
    if note:
        progress(f"[{spec.name}] {note}")
    return replace(spec, precision=precision) if precision != spec.precision else spec


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
        [spec.name, ckpt_sha, kind, options, task_seed(spec.seed, probe_index), spec.precision, spec.mode,
         *_model_ident(spec), spec.loss, data_sha, spec.data.batch_size, eval_sets],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


# Kinds that run once per spec entry over named checkpoints, not once per checkpoint.
PAIRWISE_KINDS = ("barrier", "eos")


def _sha(path: str) -> str:
    if path == "init":
        return "init"
    if not Path(path).is_file():
        raise CheckpointError(f"barrier endpoint {path!r} does not exist; give a checkpoint file or 'init'")
    return checkpoint_sha256(path)


def plan_tasks(spec: JobSpec, checkpoints: list[tuple[str, str]], data_sha: str,
               infos: dict[str, CheckpointInfo] | None = None) -> list[Task]:
    """Tasks for ``checkpoints`` (``(path, sha256)`` pairs) × the spec's probes, in checkpoint order.

    A barrier probe is one task over its two endpoints (its row's ``checkpoint`` is
    the second endpoint; the task key covers both endpoints' contents). An eos probe
    is one task over the series with a row (and a storage key) per checkpoint; its
    ``series_steps`` are the checkpoints' training steps (``infos``, else
    :func:`cluster.checkpoints.checkpoint_info`), a checkpoint's index where unknown.
    """
    infos = infos if infos is not None else {}
    tasks = []
    for path, sha in checkpoints:
        for i, p in enumerate(spec.probes):
            if p.kind in PAIRWISE_KINDS:
                continue
            options = p.resolved()
            if p.kind == "surface" and options["directions"] == "pca":  # PCA of the checkpoint trajectory
                options = {**options, "series": [c for c, _ in checkpoints]}
            tasks.append(Task(path, sha, p.kind, options, i, _task_key(spec, sha, p.kind, options, i, data_sha)))
    for i, p in enumerate(spec.probes):
        if p.kind == "eos" and checkpoints:  # one task over the series, in order (warm starts), one row per checkpoint
            steps = [(infos.get(c) or checkpoint_info(c)).step for c, _ in checkpoints]
            steps = [i if s is None else s for i, s in enumerate(steps)]
            options = {**p.resolved(), "series": [c for c, _ in checkpoints], "series_steps": steps}
            row_keys = tuple(_task_key(spec, sha, p.kind, p.resolved(), i, data_sha) for _, sha in checkpoints)
            key = hashlib.sha256("".join(row_keys).encode()).hexdigest()[:24]
            tasks.append(Task(checkpoints[-1][0], checkpoints[-1][1], p.kind, options, i, key, row_keys))
        if p.kind == "barrier":
            options = p.resolved()
            a, b = options["between"]
            sha_a, sha_b = _sha(a), _sha(b)
            key = _task_key(spec, sha_a + sha_b, p.kind, options, i, data_sha)
            tasks.append(Task(b, sha_b, p.kind, options, i, key))
    return tasks


@dataclass(frozen=True)
class FailurePolicy:
    """Decides what a failed task attempt leads to.

    ``decide`` returns ``"restart"`` (rebuild the group, run the task again) for a
    lost worker while attempts remain, and ``"fail"`` (record the failure, go on
    with the next task) otherwise or for task errors that a restart cannot fix.
    """

    max_restarts: int = 3

    def decide(self, error: BaseException, attempts: int) -> str:
        if isinstance(error, WorkerLost) and attempts <= self.max_restarts:
            return "restart"
        return "fail"


@dataclass
class JobSummary:
    run_id: str
    job: str
    output: str
    num_tasks: int = 0
    num_done: int = 0
    num_skipped: int = 0
    num_failed: int = 0
    restarts: int = 0
    failures: list[dict] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.num_failed == 0


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
    return replace(task, options=options, row_keys=row_keys, key=hashlib.sha256("".join(row_keys).encode()).hexdigest()[:24])


def _make_group(spec: JobSpec, size: int, backend: str, name: str):
    if backend == "local":
        return LocalGroup(spec.to_dict())
    if backend == "process":
        return ProcessGroup(spec.to_dict(), size)
    return RayGroup(
        spec.to_dict(),
        size,
        cpus_per_worker=spec.cluster.cpus_per_worker,
        gpus_per_worker=spec.cluster.gpus_per_worker,
        placement_timeout_s=spec.cluster.placement_timeout_s,
        name=name,
    )


def _short(path: str) -> str:
    """A checkpoint's folder and file name, for progress lines."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def choose_backend(spec: JobSpec) -> str:
    """``cluster.backend``, with ``auto`` resolved: one worker and no address runs in-process, else Ray."""
    if spec.cluster.backend != "auto":
        return spec.cluster.backend
    return "local" if spec.cluster.num_workers == 1 and not spec.cluster.address else "ray"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def run_job(
    spec: JobSpec,
    *,
    backend: str = "ray",
    progress: Callable[[str], None] = print,
    on_task_start: Callable[[Task, int], None] | None = None,
    policy: FailurePolicy | None = None,
    metrics: Metrics | None = None,
    checkpoints: list[tuple[str, str]] | None = None,
    exclude: Callable[[Task], bool] | None = None,
) -> JobSummary:
    """Run every task of ``spec`` not already stored; returns a summary.

    Args:
        backend: ``"ray"`` (actors; Ray must be initialized by the caller),
            ``"process"`` (torch.multiprocessing) or ``"local"`` (one worker in
            this process; ``num_workers`` must be 1).
        progress: receives one-line progress messages.
        on_task_start: called with ``(task, attempt)`` as a task starts (for tests
            and fault injection).
        metrics: Prometheus metrics to update as tasks finish (see :mod:`cluster.metrics`).
        checkpoints: ``(path, sha256)`` pairs to use instead of expanding
            ``model.checkpoints`` (the audit service discovers and hashes them itself).
        exclude: tasks for which this returns True are left out of this run (not
            run, not counted as skipped; the audit's backoff).

    Raises:
        SpecError, CheckpointError: before any work starts, for a bad spec,
            missing checkpoints or an unusable probe set.
        PlacementError: when Ray cannot place the worker groups.
        ResourceError: when the workers on this host would not fit its memory (the
            estimate is printed first; nothing is written).
    """
    policy = policy or FailurePolicy(spec.cluster.max_restarts)
    t_start = time.perf_counter()
    started_at = _now()
    run_id = uuid.uuid4().hex[:16]
    store = ResultStore(spec.output.path)
    versions = library_versions()
    # factories that do not import fail here, before any worker starts, naming the spec key
    if spec.model.factory is not None:
        import_factory(spec.model.factory, key="model.factory")
    if isinstance(spec.loss, dict):
        import_factory(spec.loss["factory"], key="loss.factory")
    # each checkpoint with the entry it came from (its run-relative name depends on it); an audit's
    # discovered checkpoints may lack some entries' (a folder with none yet)
    entry_of = checkpoint_entries(spec.model.checkpoints, missing_ok=checkpoints is not None)
    if checkpoints is None:
        checkpoints = [(p, checkpoint_sha256(p)) for p in entry_of]
    infos: dict[str, CheckpointInfo] = {p: checkpoint_info(p, entry_of.get(p)) for p, _ in checkpoints}

    def info_columns(path: str) -> dict:
        """The common checkpoint_name, step and lr columns of a row about ``path``."""
        if path not in infos:  # a barrier endpoint outside model.checkpoints, or 'init'
            infos[path] = checkpoint_info(path, entry_of.get(path))
        info = infos[path]
        return {"checkpoint_name": info.name, "step": info.step, "lr": info.lr}

    paths = [p for p, _ in checkpoints]
    spec = prepare_model(spec, paths, progress)
    est = None
    if checkpoints:
        # workers on this host: all of them unless they go to a cluster at an address
        here = spec.cluster.num_workers if backend in ("local", "process") or not spec.cluster.address else 0
        est = estimate(spec, checkpoints[0][0], workers_here=here)
        if here:
            check_fits(est)
    _, indices, data_sha = probe_subset(spec)
    tasks = plan_tasks(spec, checkpoints, data_sha, infos)
    if exclude is not None:
        tasks = [t for t in tasks if not exclude(t)]
    summary = JobSummary(run_id, spec.name, spec.output.path, num_tasks=len(tasks))
    done = {kind: store.done_task_keys(kind, spec.name) for kind in {t.kind for t in tasks}}
    pending = {t.key: _pending(t, done[t.kind]) for t in tasks}
    todo = [p for p in pending.values() if p is not None]
    summary.num_skipped = len(tasks) - len(todo)
    group_size = spec.cluster.group_size or spec.cluster.num_workers
    num_groups = max(1, spec.cluster.num_workers // group_size)
    if backend == "local" and spec.cluster.num_workers != 1:
        raise ValueError(f"backend 'local' runs one worker, got cluster.num_workers={spec.cluster.num_workers}")
    progress(
        f"[{spec.name}] {len(paths)} checkpoint(s) × {len(spec.probes)} probe(s) = {len(tasks)} task(s); "
        f"{summary.num_skipped} already stored; {num_groups} group(s) of {group_size} worker(s) ({backend}); "
        f"{len(indices)} probe examples"
    )
    if est is not None:
        progress(f"[{spec.name}] {est.summary()}")
    if metrics:
        for reason in FAILURE_REASONS:  # every reason exported from 0, so increase() sees the first failure
            metrics.failures.labels(job_name=spec.name, reason=reason)
        metrics.tasks_planned.labels(job_name=spec.name).set(len(todo))
        metrics.series_order(spec.name, paths)  # the headline gauges follow the latest checkpoint
        metrics.tasks_done.labels(job_name=spec.name).set(0)
        for t in tasks:
            if pending[t.key] is None:
                metrics.tasks.labels(job_name=spec.name, kind=t.kind, outcome="skipped").inc()
    lock = threading.Lock()
    work: queue.Queue[Task] = queue.Queue()
    for t in todo:
        work.put(t)

    def base_row(task: Task) -> dict:
        return {
            "run_id": run_id,
            "job": spec.name,
            "task_key": task.key,
            "checkpoint": task.checkpoint,
            "checkpoint_sha256": task.checkpoint_sha256,
            **info_columns(task.checkpoint),
            "probe_config": json.dumps(task.options, sort_keys=True),
            "seed": task_seed(spec.seed, task.probe_index),
            "schema_version": SCHEMA_VERSION,
            "model_factory": spec.model.source,
            "data_sha256": data_sha,
            "num_examples": len(indices),
            "dtype": spec.precision,
            "mode": spec.mode,
            "versions": json.dumps(versions, sort_keys=True),
        }

    def _record_failure(task: Task, reason: str, category: str, attempts: int) -> None:
        keys = task.row_keys or (task.key,)
        for key in keys:
            store.write_failure({
                "run_id": run_id, "job": spec.name, "task_key": key, "kind": task.kind,
                "checkpoint": task.checkpoint, "checkpoint_sha256": task.checkpoint_sha256,
                "probe_config": json.dumps(task.options, sort_keys=True), "category": category,
                "reason": reason, "attempts": attempts, "created_at": _now(), "schema_version": SCHEMA_VERSION,
            })

    def serve(group_index: int) -> None:
        group = None
        try:
            while True:
                try:
                    task = work.get_nowait()
                except queue.Empty:
                    return
                attempts = 0
                while True:
                    attempts += 1
                    try:
                        if group is None:
                            group = _make_group(spec, group_size, backend, f"probe-{spec.name}-g{group_index}")
                        if on_task_start:
                            on_task_start(task, attempts)
                        record = group.run(task.payload())
                    except (WorkerLost, TaskError) as exc:
                        decision = policy.decide(exc, attempts)
                        unusable = isinstance(exc, WorkerLost) or not getattr(exc, "group_usable", True)
                        if unusable and group is not None:
                            group.close()
                            group = None
                        if decision == "restart":
                            if metrics:
                                metrics.restarts.labels(job_name=spec.name).inc()
                            with lock:
                                summary.restarts += 1
                            progress(f"[{spec.name}] worker lost on {task.kind} @ {task.checkpoint}: {exc}; restarting (attempt {attempts + 1})")
                            continue
                        with lock:
                            summary.num_failed += 1
                            summary.failures.append({"task": task.key, "checkpoint": task.checkpoint, "kind": task.kind, "reason": str(exc)})
                        progress(f"[{spec.name}] FAILED {task.kind} @ {task.checkpoint}: {exc}")
                        _record_failure(task, str(exc), category_of(exc), attempts)
                        if metrics:
                            metrics.task_failed(spec.name, task.kind, category_of(exc))
                            metrics.tasks_done.labels(job_name=spec.name).inc()
                        break
                    common = {**base_row(task), **{k: v for k, v in record.items() if k != "rows"},
                              "created_at": _now(), "attempts": attempts,
                              "checkpoint_metadata": json.dumps(record.get("checkpoint_metadata", {}), sort_keys=True),
                              "device": str(group.info[0].get("device", "cpu"))}
                    # rows about their own checkpoint (eos: one per checkpoint of the series) take its
                    # name, step and lr; a probe's own step or lr (eos, noise: the one it used) wins
                    rows = [{**common, **(info_columns(r["checkpoint"]) if "checkpoint" in r else {}), **r}
                            for r in record.get("rows", [{}])]
                    if task.row_keys:  # one stored file per checkpoint's row
                        keys = dict(zip(task.options["series"], task.row_keys))
                        for r in rows:
                            r["task_key"] = keys[r["checkpoint"]]
                            store.write_result(task.kind, [r])
                    else:
                        store.write_result(task.kind, rows)
                    if metrics:
                        metrics.task_succeeded(spec.name, task.kind, rows, duration_s=record["duration_s"],
                                               num_matvecs=record.get("num_matvecs", 0), timestamp_s=time.time())
                        metrics.tasks_done.labels(job_name=spec.name).inc()
                    with lock:
                        summary.num_done += 1
                        summary.records.extend(rows)
                        n = summary.num_done + summary.num_failed
                    progress(
                        f"[{spec.name}] {n}/{len(todo)} {task.kind} @ {_short(task.checkpoint)}: "
                        f"{record['duration_s']:.1f} s, {record.get('num_matvecs', 0)} HVPs"
                        f"{f', attempt {attempts}' if attempts > 1 else ''}; elapsed {time.perf_counter() - t_start:.0f} s"
                    )
                    break
        finally:
            if group is not None:
                group.close()

    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            serve(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the driver thread
            errors.append(exc)
            if metrics:  # a job-level failure (placement, a result write): counted under its type
                metrics.failure(spec.name, category_of(exc))

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(num_groups)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    status = "failed" if errors or summary.num_failed else "succeeded"
    try:
        store.write_run({
            "run_id": run_id,
            "job": spec.name,
            "started_at": started_at,
            "finished_at": _now(),
            "status": status,
            "num_tasks": summary.num_tasks,
            "num_done": summary.num_done,
            "num_skipped": summary.num_skipped,
            "num_failed": summary.num_failed,
            "restarts": summary.restarts,
            "failures": json.dumps(summary.failures + [{"reason": str(e)} for e in errors]),
            "spec": json.dumps(spec.to_dict(), sort_keys=True, default=str),
            "versions": json.dumps(versions, sort_keys=True),
            "schema_version": SCHEMA_VERSION,
        })
    except StoreError:
        if errors:  # the first error (e.g. the result write that failed) is the one to report
            raise errors[0] from None
        raise
    if errors:
        raise errors[0]
    progress(
        f"[{spec.name}] done: {summary.num_done} run, {summary.num_skipped} skipped, {summary.num_failed} failed, "
        f"{summary.restarts} restart(s) in {time.perf_counter() - t_start:.1f} s; results in {spec.output.path}"
    )
    return summary
