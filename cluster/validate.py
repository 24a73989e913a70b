"""``probe validate SPEC``: the resolved spec, the task plan and the memory estimate, without running.

Everything the driver checks and plans before it starts a worker, in the same order and with the
same functions (:mod:`cluster.job`): the spec is loaded with its overrides, the factories are
imported, the checkpoints are found and hashed, the model is checked (``precision: auto``
resolved), the probe set is built and hashed, the tasks are planned (:func:`cluster.plan.plan_tasks`)
and compared with what ``output.path`` already stores (:func:`cluster.plan.pending_tasks`), and the
memory estimate is made for this host (:func:`cluster.estimate.estimate`, its graph measured on
one batch as a run measures it). No Ray instance starts and nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from cluster.spec import JobSpec

__all__ = ["resolved_spec", "validate_spec"]


def resolved_spec(spec: JobSpec) -> dict:
    """The spec as plain data with every default filled in (each probe's options resolved)."""
    d = spec.to_dict()
    d["probes"] = [{"kind": p.kind, **p.resolved()} for p in spec.probes]
    return d


def validate_spec(spec_path: str | Path, overrides: list[str], *, out: Callable[[str], None] = print) -> int:
    """Print the resolved spec, the task plan and the memory estimate of a spec; run nothing.

    Returns:
        0 when the spec is valid and fits this host; 3 when its workers would not fit this host's
        memory (the code ``probe run`` would exit with).

    Raises:
        SpecError, CheckpointError: a bad spec, factory, checkpoint or probe set, one line each.
    """
    from cluster.checkpoints import checkpoint_sha256
    from cluster.estimate import ResourceError, check_fits, estimate
    from cluster.job import CheckpointNames, choose_backend, prepare_model
    from cluster.plan import pending_tasks, plan_tasks
    from cluster.probe_data import probe_subset
    from cluster.run_folders import checkpoint_entries
    from cluster.spec import import_factory, load_spec
    from cluster.store import ResultStore

    spec = load_spec(spec_path, overrides)
    if spec.model.factory is not None:  # the checks of cluster.job.preflight, each done once
        import_factory(spec.model.factory, key="model.factory")
    if isinstance(spec.loss, dict):
        import_factory(spec.loss["factory"], key="loss.factory")
    entry_of = checkpoint_entries(spec.model.checkpoints)
    checkpoints = [(p, checkpoint_sha256(p)) for p in entry_of]
    names = CheckpointNames(entry_of, [p for p, _ in checkpoints])
    spec = prepare_model(spec, [p for p, _ in checkpoints], lambda m: None)
    _, indices, data_sha = probe_subset(spec)
    out(f"# {spec_path}: valid; resolved (defaults filled in, paths made absolute)")
    out(yaml.safe_dump(resolved_spec(spec), sort_keys=False).rstrip())

    tasks = plan_tasks(spec, checkpoints, data_sha, names.infos)
    store = ResultStore(spec.output.path)
    done = {kind: store.done_task_keys(kind, spec.name) for kind in {t.kind for t in tasks}}
    todo = {id(t): p for t, p in zip(tasks, [pending_tasks([t], done)[:1] for t in tasks], strict=True)}
    num_todo = sum(1 for p in todo.values() if p)
    backend = choose_backend(spec)
    group = spec.cluster.group_size or spec.cluster.num_workers
    out(
        f"\n# plan: {len(checkpoints)} checkpoint(s) × {len(spec.probes)} probe(s) = {len(tasks)} task(s); "
        f"{len(tasks) - num_todo} stored, {num_todo} to run under {spec.output.path}; "
        f"{spec.cluster.num_workers // group} group(s) of {group} worker(s) ({backend}); {len(indices)} probe examples"
    )
    for t in tasks:
        pending = todo[id(t)]
        if not pending:
            state = "stored"
        elif t.row_keys and len(pending[0].row_keys) < len(t.row_keys):
            state = f"run {len(pending[0].row_keys)} of {len(t.row_keys)} rows"
        else:
            state = "run"
        where = names.columns(t.checkpoint)["checkpoint_name"] or Path(t.checkpoint).name
        series = f" (series of {len(t.row_keys)})" if t.row_keys else ""
        out(f"  {state:<8} probes[{t.probe_index}] {t.kind:<12} {where}{series}  key {t.key}")

    if not checkpoints:
        return 0
    here = spec.cluster.num_workers if backend in ("local", "process") or not spec.cluster.address else 0
    est = estimate(spec, checkpoints[0][0], workers_here=here)
    out(f"\n# memory estimate ({checkpoints[0][0]}): {est.summary()}")
    for name, nbytes in est.probe_bytes.items():
        out(f"  probes[{name}] vectors {nbytes / 1e9:.3f} GB per worker")
    if here:
        try:
            check_fits(est)
        except ResourceError as exc:
            out(f"# does not fit: {exc}")
            return exc.exit_code
    return 0
