"""The job driver: expand a spec into tasks, run them on worker groups, store the records.

A job is checkpoints × probes. Each task runs SPMD on one worker group; with
``cluster.group_size < cluster.num_workers`` several groups take tasks from one
queue concurrently (fan-out over checkpoints and probes). Finished tasks are
written at once (see :mod:`cluster.store`), so a re-run skips them and adds no
rows. A worker that dies makes its group be rebuilt and the task re-run, as the
:class:`FailurePolicy` decides; the row's ``attempts`` column records it.

Planning (:mod:`cluster.plan`: :func:`plan_tasks`, :func:`pending_tasks`, the task keys) is pure; running
(:func:`cluster.driver.run_tasks`) turns each attempt into a value and hands it to the
handlers of :mod:`cluster.job_events` (Parquet, metrics, progress) and the summary.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

from cluster.checkpoints import CheckpointInfo, checkpoint_entries, checkpoint_info, checkpoint_sha256
from cluster.driver import FailurePolicy, JobSummary, Stored, SummaryEvents, run_tasks
from cluster.estimate import check_fits, estimate
from cluster.groups import LocalGroup, ProcessGroup, RayGroup
from cluster.job_events import HubEvents, MetricsEvents, ProgressEvents, StoreEvents, now
from cluster.metrics import FAILURE_REASONS, Metrics
from cluster.plan import Task, pending_tasks, plan_tasks
from cluster.progress import ProgressHub, ProgressOptions
from cluster.schema import SCHEMA_VERSION
from cluster.spec import JobSpec, SpecError, import_factory
from cluster.store import ResultStore, StoreError
from cluster.worker import probe_subset, task_seed

__all__ = ["FailurePolicy", "JobSummary", "run_job", "choose_backend", "library_versions"]


def library_versions() -> dict[str, str]:
    """The versions of torch, numpy and pyarrow, and of landscape-probe and ray where installed."""
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
            check_hf_checkpoint(
                p,
                hf_root=spec.model.hf,
                hf_class=spec.model.hf_class,
                attn_implementation=spec.model.attn_implementation,
            )
    if hf and spec.cluster.stages > 1 and paths:
        spec = _stages_or_data_parallel(spec, paths[0], progress)
    precision, note = resolve_precision(spec.precision, hf, paths[0] if paths else None)
    if note:
        progress(f"[{spec.name}] {note}")
    return replace(spec, precision=precision) if precision != spec.precision else spec


def _stages_or_data_parallel(spec: JobSpec, checkpoint: str, progress: Callable[[str], None]) -> JobSpec:
    """``spec`` when its model.hf splits into ``cluster.stages`` pipeline stages (a family
    :mod:`cluster.hf_stages` knows, with at least as many pieces), else the same spec run
    data-parallel (``stages: 1``) with a note saying so.

    Raises:
        SpecError: when the model has fewer pieces (embedding, layers, head) than stages.
    """
    from cluster.hf import config_path, hf_skeleton
    from cluster.hf_stages import UnsupportedStages, pipeline_pieces

    m = spec.model
    skeleton = hf_skeleton(config_path(checkpoint, m.hf), m.hf_class, m.attn_implementation)
    try:
        pieces = pipeline_pieces(skeleton)
    except UnsupportedStages as exc:
        workers = spec.cluster.group_size or spec.cluster.num_workers
        progress(
            f"[{spec.name}] note: {str(exc).split(':')[0]}; running it data-parallel instead, each of the "
            f"{workers} workers of a group holding the whole model (cluster.stages: {spec.cluster.stages} not "
            "applied); for a model no worker can hold set cluster.shard_parameters: true"
        )
        return replace(spec, cluster=replace(spec.cluster, stages=1))
    if len(pieces) < spec.cluster.stages:
        raise SpecError(
            f"cluster.stages={spec.cluster.stages}: {type(skeleton).__name__} of {checkpoint!r} splits into "
            f"{len(pieces)} pieces (embedding, {len(pieces) - 2} layers, head); use at most {len(pieces)} stages"
        )
    return spec


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


def choose_backend(spec: JobSpec) -> str:
    """``cluster.backend``, with ``auto`` resolved: one worker and no address runs in-process, else Ray."""
    if spec.cluster.backend != "auto":
        return spec.cluster.backend
    return "local" if spec.cluster.num_workers == 1 and not spec.cluster.address else "ray"


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
    progress_options: ProgressOptions | None = None,
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
        progress_options: live progress (products and Lanczos steps as they happen, stall
            time, log cadence, progress bar; :class:`cluster.progress.ProgressOptions`);
            default :func:`cluster.progress.defaults` (the CLI's flags).

    Raises:
        SpecError, CheckpointError: before any work starts, for a bad spec,
            missing checkpoints or an unusable probe set.
        PlacementError: when Ray cannot place the worker groups.
        ResourceError: when the workers on this host would not fit its memory (the
            estimate is printed first; nothing is written).
    """
    policy = policy or FailurePolicy(spec.cluster.max_restarts)
    t_start, started_at, run_id = time.perf_counter(), now(), uuid.uuid4().hex[:16]
    store = ResultStore(spec.output.path)
    spec, checkpoints, names, est = _prepare(spec, checkpoints, backend, progress)
    _, indices, data_sha = probe_subset(spec)
    tasks = plan_tasks(spec, checkpoints, data_sha, names.infos)
    if exclude is not None:
        tasks = [t for t in tasks if not exclude(t)]
    todo = pending_tasks(tasks, {kind: store.done_task_keys(kind, spec.name) for kind in {t.kind for t in tasks}})
    summary = JobSummary(run_id, spec.name, spec.output.path, num_tasks=len(tasks), num_skipped=len(tasks) - len(todo))
    group_size = spec.cluster.group_size or spec.cluster.num_workers
    num_groups = max(1, spec.cluster.num_workers // group_size)
    if backend == "local" and spec.cluster.num_workers != 1:
        raise ValueError(f"backend 'local' runs one worker, got cluster.num_workers={spec.cluster.num_workers}")
    progress(
        f"[{spec.name}] {len(checkpoints)} checkpoint(s) × {len(spec.probes)} probe(s) = {len(tasks)} task(s); "
        f"{summary.num_skipped} already stored; {num_groups} group(s) of {group_size} worker(s) ({backend}); "
        f"{len(indices)} probe examples"
    )
    if est is not None:
        progress(f"[{spec.name}] {est.summary()}")
    if metrics:
        _metrics_start(metrics, spec.name, tasks, todo, [p for p, _ in checkpoints])
    rows = RowBuilder(spec, run_id, data_sha, len(indices), names)
    hub = ProgressHub(spec.name, metrics=metrics, options=progress_options, num_tasks=len(todo)).start()
    todo = [replace(t, progress=hub.channel(t.key)) for t in todo]
    handlers = [
        HubEvents(hub),  # first: it tells the metrics handler which products were counted as they happened
        StoreEvents(store, spec.name, run_id),
        *([MetricsEvents(metrics, spec.name, hub)] if metrics else []),
        SummaryEvents(summary),
        ProgressEvents(progress, spec.name, summary, len(todo), t_start),
    ]
    try:
        errors = run_tasks(
            todo,
            num_groups=num_groups,
            policy=policy,
            rows_of=rows.of,
            handlers=handlers,
            on_start=on_task_start,
            make_group=lambda i: _make_group(spec, group_size, backend, f"probe-{spec.name}-g{i}"),
        )
    finally:
        hub.close()
    _write_run(store, spec, summary, errors, started_at, rows.versions)
    if errors:
        raise errors[0]
    progress(
        f"[{spec.name}] done: {summary.num_done} run, {summary.num_skipped} skipped, {summary.num_failed} failed, "
        f"{summary.restarts} restart(s) in {time.perf_counter() - t_start:.1f} s; results in {spec.output.path}"
    )
    return summary


class CheckpointNames:
    """Each checkpoint's run-relative name, step and lr (the rows' common columns), from the
    spec entry it came from; asked lazily for paths outside the job's checkpoints (barrier ends)."""

    def __init__(self, entry_of: dict[str, str], paths: list[str]) -> None:
        self.entry_of = entry_of
        self.infos: dict[str, CheckpointInfo] = {p: checkpoint_info(p, entry_of.get(p)) for p in paths}

    def columns(self, path: str) -> dict:
        if path not in self.infos:  # a barrier endpoint outside model.checkpoints, or 'init'
            self.infos[path] = checkpoint_info(path, self.entry_of.get(path))
        info = self.infos[path]
        return {"checkpoint_name": info.name, "step": info.step, "lr": info.lr}


def _prepare(spec: JobSpec, checkpoints, backend: str, progress: Callable[[str], None]):
    """Every check before work: factories import, checkpoints found and hashed, the model checked
    (``precision: auto`` resolved), the memory estimate against this host. Returns
    ``(spec, checkpoints, names, estimate)``."""
    if spec.model.factory is not None:  # fail here, before any worker starts, naming the spec key
        import_factory(spec.model.factory, key="model.factory")
    if isinstance(spec.loss, dict):
        import_factory(spec.loss["factory"], key="loss.factory")
    # each checkpoint with the entry it came from (its run-relative name depends on it); an audit's
    # discovered checkpoints may lack some entries' (a folder with none yet)
    entry_of = checkpoint_entries(spec.model.checkpoints, missing_ok=checkpoints is not None)
    if checkpoints is None:
        checkpoints = [(p, checkpoint_sha256(p)) for p in entry_of]
    names = CheckpointNames(entry_of, [p for p, _ in checkpoints])
    spec = prepare_model(spec, [p for p, _ in checkpoints], progress)
    est = None
    if checkpoints:
        # workers on this host: all of them unless they go to a cluster at an address
        here = spec.cluster.num_workers if backend in ("local", "process") or not spec.cluster.address else 0
        est = estimate(spec, checkpoints[0][0], workers_here=here)
        if here:
            check_fits(est)
    return spec, checkpoints, names, est


def _metrics_start(metrics: Metrics, job: str, tasks: list[Task], todo: list[Task], paths: list[str]) -> None:
    for reason in FAILURE_REASONS:  # every reason exported from 0, so increase() sees the first failure
        metrics.failures.labels(job_name=job, reason=reason)
    metrics.tasks_planned.labels(job_name=job).set(len(todo))
    metrics.series_order(job, paths)  # the headline gauges follow the latest checkpoint
    metrics.tasks_done.labels(job_name=job).set(0)
    running = {t.key for t in todo} | {k for t in todo for k in t.row_keys}
    for t in tasks:
        if t.key not in running and not (set(t.row_keys) & running):
            metrics.tasks.labels(job_name=job, kind=t.kind, outcome="skipped").inc()


class RowBuilder:
    """A finished task's complete rows: provenance, the record's scalars, each row's own values."""

    def __init__(self, spec: JobSpec, run_id: str, data_sha: str, num_examples: int, names: CheckpointNames) -> None:
        self.spec, self.run_id, self.data_sha, self.num_examples, self.names = (
            spec,
            run_id,
            data_sha,
            num_examples,
            names,
        )
        self.versions = library_versions()

    def base(self, task: Task) -> dict:
        spec = self.spec
        return {
            "run_id": self.run_id,
            "job": spec.name,
            "task_key": task.key,
            "checkpoint": task.checkpoint,
            "checkpoint_sha256": task.checkpoint_sha256,
            **self.names.columns(task.checkpoint),
            "probe_config": json.dumps(task.options, sort_keys=True),
            "seed": task_seed(spec.seed, task.probe_index),
            "schema_version": SCHEMA_VERSION,
            "model_factory": spec.model.source,
            "data_sha256": self.data_sha,
            "num_examples": self.num_examples,
            "dtype": spec.precision,
            "mode": spec.mode,
            "versions": json.dumps(self.versions, sort_keys=True),
        }

    def of(self, outcome: Stored) -> list[dict]:
        task, record = outcome.task, outcome.record
        common = {
            **self.base(task),
            **{k: v for k, v in record.items() if k != "rows"},
            "created_at": now(),
            "attempts": outcome.attempts,
            "device": outcome.device,
            "checkpoint_metadata": json.dumps(record.get("checkpoint_metadata", {}), sort_keys=True),
        }
        # rows about their own checkpoint (eos: one per checkpoint of the series) take its
        # name, step and lr; a probe's own step or lr (eos, noise: the one it used) wins
        rows = [
            {**common, **(self.names.columns(r["checkpoint"]) if "checkpoint" in r else {}), **r}
            for r in record.get("rows", [{}])
        ]
        if task.row_keys:  # each checkpoint's row under its own storage key
            keys = dict(zip(task.options["series"], task.row_keys, strict=True))
            for r in rows:
                r["task_key"] = keys[r["checkpoint"]]
        return rows


def _write_run(
    store: ResultStore, spec: JobSpec, summary: JobSummary, errors: list[BaseException], started_at, versions: dict
) -> None:
    """The run's row in ``runs/``; if it cannot be written, the job's own first error is the one reported."""
    try:
        store.write_run(
            {
                "run_id": summary.run_id,
                "job": spec.name,
                "started_at": started_at,
                "finished_at": now(),
                "status": "failed" if errors or summary.num_failed else "succeeded",
                "num_tasks": summary.num_tasks,
                "num_done": summary.num_done,
                "num_skipped": summary.num_skipped,
                "num_failed": summary.num_failed,
                "restarts": summary.restarts,
                "failures": json.dumps(summary.failures + [{"reason": str(e)} for e in errors]),
                "spec": json.dumps(spec.to_dict(), sort_keys=True, default=str),
                "versions": json.dumps(versions, sort_keys=True),
                "schema_version": SCHEMA_VERSION,
            }
        )
    except StoreError:
        if errors:  # the first error (e.g. the result write that failed) is the one to report
            raise errors[0] from None
        raise
