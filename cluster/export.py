"""``probe export RESULTS --to tensorboard|mlflow|wandb``: every scalar of a results folder, at its training step.

A results folder is read through :class:`cluster.store.ResultStore` (never by globbing its
files) and turned into :class:`Point` values ``(job, tag, step, value)``:

- every ``float64`` column a kind declares (:attr:`cluster.kinds.Kind.columns`) except the
  options it echoes (:data:`SETTINGS`: sharpness ``epsilon``, ``rho``, ...), as
  ``<kind>/<column>``; a list column of eigenvalues as ``<kind>/eigenvalue_<i>`` (1-based, in the
  row's order: largest first for ``which: largest``);
- a kind whose task yields several rows (sharpness: one per measure; barrier: one per path and
  evaluation set) puts the row's labels (:attr:`cluster.kinds.Headline.row_labels`) in the tag:
  ``sharpness/keskar/value``, ``barrier/linear/probe/barrier_height``;
- two probe entries of one kind in one job (e.g. ``which: largest`` and ``which: smallest``) put
  the options that tell them apart in the tag, one segment each: ``eigenvalues/k-3/which-smallest/eigenvalue_1``;
- ``lambda_max``: the Hessian's λ_max of each checkpoint from the kind the audit trusts most
  (:attr:`cluster.kinds.Headline.lambda_max_priority`), one series whatever the kinds ran.

Each job is one run of the tracker (TensorBoard: a folder ``OUT/<run>``; MLflow: a run in the
experiment ``landscape-probe``; Weights & Biases: a run in the project ``landscape-probe``),
named after the job (``--run-name NAME``: ``NAME``, or ``NAME-<job>`` for several jobs). A job
whose checkpoints come from several training runs measured at one step (the demo's ``geometry``:
``run-a/step-800`` and ``run-b/step-800``) is one tracker run per folder, ``<job>-<folder>``
(a pairwise row, barrier, goes with its second endpoint's).

The x axis is the rows' ``step`` column (the training step of the checkpoint). A job with a
checkpoint whose step is unknown is logged at checkpoint indices instead (0, 1, ... in the
order the checkpoints were first measured, by ``created_at``), and one line says so.
NaN, infinite and null values are left out (a tracker would draw them as gaps or refuse them).

Each backend is an optional extra, imported only when used: ``tensorboard`` (the
``tensorboard`` package; written through ``torch.utils.tensorboard``), ``mlflow``
(``mlflow-skinny``) and ``wandb``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from cluster.errors import ProbeError
from cluster.kinds import KINDS
from cluster.metrics import hessian_lambda_max
from cluster.results import differing_options
from cluster.store import ResultStore

__all__ = ["Point", "ExportError", "BACKENDS", "SETTINGS", "scalar_points", "export_results"]

BACKENDS = ("tensorboard", "mlflow", "wandb")

# Float columns that echo an option of the probe (a setting, not a measurement): not exported.
SETTINGS: dict[str, frozenset[str]] = {
    "sharpness": frozenset({"epsilon", "rho", "sigma"}),
    "spectrum": frozenset({"sigma"}),
    "pacbayes": frozenset({"target", "delta", "prior_sigma"}),
    "eos": frozenset({"momentum"}),
    "critical": frozenset({"grad_norm_threshold", "negative_mass_threshold"}),
}

# list columns exported entry by entry: the extreme eigenvalues of a Lanczos run
_LIST_COLUMNS = {"eigenvalues": "eigenvalue"}
# options that never tell two probe entries apart (added by the planner)
_PLANNER_OPTIONS = {"series", "series_steps"}
_MLFLOW_EXPERIMENT = _WANDB_PROJECT = "landscape-probe"


class ExportError(ProbeError, ValueError):
    """A results folder or an export target that cannot be used (bad input: exit 2)."""

    category = "bad_spec"


@dataclass(frozen=True)
class Point:
    """One value to log: ``value`` of ``tag`` at training ``step`` in the run of ``job`` (and ``series``)."""

    job: str
    tag: str
    step: int
    value: float
    series: str = ""  # the training run within the job, where the job mixes runs at equal steps


def _part(value) -> str:
    """A tag segment every tracker accepts (MLflow: letters, digits, ``_ - . /`` and spaces)."""
    return re.sub(r"[^\w.\-]", "_", str(value), flags=re.ASCII)


def _finite(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _plain(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _qualifiers(rows: list[dict]) -> dict[str, str]:
    """probe_config -> the options that tell it apart from the job's other entries of its kind."""
    configs = {r["probe_config"] for r in rows}
    if len(configs) < 2:
        return dict.fromkeys(configs, "")
    parsed = {c: json.loads(c) for c in configs}
    differ = differing_options(list(parsed.values()), ignore=_PLANNER_OPTIONS)
    out = {c: "/".join(f"{_part(k)}-{_part(_plain(p.get(k)))}" for k in differ) for c, p in parsed.items()}
    if len(set(out.values())) < len(out):  # options equal but rows differ (another seed or precision)
        out = {c: f"cfg-{hashlib.sha256(c.encode()).hexdigest()[:6]}" for c in configs}
    return out


def _steps(rows: list[dict], job: str, say: Callable[[str], None]) -> Callable[[dict], int]:
    """How a job's rows map to the x axis: their ``step``, or checkpoint indices when a step is missing."""
    if all(r.get("step") is not None for r in rows):
        return lambda r: int(r["step"])
    first: dict[str, object] = {}
    for r in sorted(rows, key=lambda r: (r.get("created_at") is None, r.get("created_at") or 0)):
        first.setdefault(r["checkpoint"], r.get("created_at"))
    index = {c: i for i, c in enumerate(first)}
    missing = len({r["checkpoint"] for r in rows if r.get("step") is None})
    say(
        f"export: job {job!r}: {missing} checkpoint(s) without a training step; its values are logged at checkpoint "
        f"indices 0..{len(index) - 1} (the order they were first measured), not at training steps"
    )
    return lambda r: index[r["checkpoint"]]


def _row_points(kind: str, row: dict, prefix: str, step: int) -> Iterable[tuple[str, int, float]]:
    k = KINDS[kind]
    labels = [_part(row[name]) for name in k.headline.row_labels if row.get(name) is not None]
    base = "/".join([kind, *([prefix] if prefix else []), *labels])
    skip = SETTINGS.get(kind, frozenset())
    for field in k.columns:
        if field.name in skip:
            continue
        if pa.types.is_floating(field.type):
            value = _finite(row.get(field.name))
            if value is not None:
                yield f"{base}/{field.name}", step, value
        elif field.name in _LIST_COLUMNS and pa.types.is_list(field.type):
            for i, v in enumerate(row.get(field.name) or [], start=1):
                value = _finite(v)
                if value is not None:
                    yield f"{base}/{_LIST_COLUMNS[field.name]}_{i}", step, value


def scalar_points(results: str | os.PathLike, *, say: Callable[[str], None] = print) -> list[Point]:
    """Every scalar quantity of a results folder as :class:`Point` values (see the module docstring).

    Args:
        results: a job's ``output.path``.
        say: where the one line about steps replaced by checkpoint indices goes.

    Raises:
        ExportError: when the folder does not exist or holds no result of any kind.
    """
    if not Path(results).is_dir():
        raise ExportError(f"results folder {str(results)!r} does not exist; give a job's output.path")
    store = ResultStore(results)
    by_job: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    for kind in KINDS:
        for row in store.read(kind).to_pylist():
            by_job[row["job"]].append((kind, row))
    if not by_job:
        raise ExportError(
            f"results folder {str(results)!r} holds no results of any probe kind ({', '.join(KINDS)}); "
            "give a job's output.path after the job ran"
        )
    points: list[Point] = []
    for job in sorted(by_job):
        rows = by_job[job]
        qualify = {kind: _qualifiers([r for k, r in rows if k == kind]) for kind in KINDS}
        series = _series([r for _, r in rows])
        for label in sorted(set(series.values())):
            mine = [(k, r) for k, r in rows if series[r["checkpoint"]] == label]
            step_of = _steps([r for _, r in mine], job if not label else f"{job} ({label})", say)
            best: dict[int, tuple[int, float]] = {}  # step -> (priority, λ_max)
            for kind, row in mine:
                step = step_of(row)
                tags = _row_points(kind, row, qualify[kind][row["probe_config"]], step)
                points += [Point(job, t, s, v, label) for t, s, v in tags]
                lam, priority = _finite(hessian_lambda_max(kind, row)), KINDS[kind].headline.lambda_max_priority
                if lam is not None and (step not in best or priority > best[step][0]):
                    best[step] = (priority, lam)
            points += [Point(job, "lambda_max", s, v, label) for s, (_, v) in sorted(best.items())]
    return points


def _folder(row: dict) -> str:
    """The folder of a row's training run: its checkpoint path less the run-relative name."""
    path, name = row["checkpoint"], row.get("checkpoint_name")
    if name and path.endswith(name) and len(path) > len(name):
        return path[: -len(name)].rstrip("/\\")
    return str(Path(path).parent)


def _series(rows: list[dict]) -> dict[str, str]:
    """Each checkpoint's training-run label within the job: "" for all of them, unless the job
    holds checkpoints of several folders (runs) at one training step (two runs compared at step 800),
    then each folder's name (its path where names repeat)."""
    folder = {r["checkpoint"]: _folder(r) for r in rows}
    at: dict[int, set[str]] = defaultdict(set)
    for r in rows:
        if r.get("step") is not None:
            at[r["step"]].add(r["checkpoint"])
    if len(set(folder.values())) < 2 or all(len({folder[c] for c in cs}) < 2 for cs in at.values()):
        return dict.fromkeys(folder, "")
    names = {f: _part(Path(f).name or f) for f in set(folder.values())}
    if len(set(names.values())) < len(names):
        names = {f: _part(f.strip("/\\")) for f in names}
    return {c: names[f] for c, f in folder.items()}


def _missing(extra: str, package: str, exc: ImportError) -> ExportError:
    return ExportError(
        f"--to {extra} needs the {package!r} package ({exc}); install it with: pip install 'landscape-probe[{extra}]'"
    )


def _to_tensorboard(runs: dict[str, list[Point]], out: Path) -> list[str]:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch's writer needs the tensorboard package
        raise _missing("tensorboard", "tensorboard", exc) from None
    where = []
    for name, points in runs.items():
        writer = SummaryWriter(log_dir=str(out / name))
        try:
            for p in sorted(points, key=lambda p: (p.step, p.tag)):
                writer.add_scalar(p.tag, p.value, global_step=p.step)
        finally:
            writer.close()
        where.append(str(out / name))
    return where


def _mlflow_uri(out: str) -> str:
    """A tracking URI: ``out`` as given when it is one, else the file store in the folder ``out``."""
    if re.match(r"^[a-zA-Z][\w+.-]*:", out) and not re.match(r"^[a-zA-Z]:[\\/]", out):
        return out
    return Path(out).resolve().as_uri()


def _to_mlflow(runs: dict[str, list[Point]], uri: str) -> list[str]:
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise _missing("mlflow", "mlflow-skinny", exc) from None
    saved = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    if uri.startswith("file:"):  # the file store is in maintenance mode in MLflow 3: opted in for this write only
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(_MLFLOW_EXPERIMENT)
        eid = experiment.experiment_id if experiment else client.create_experiment(_MLFLOW_EXPERIMENT)
        where = []
        for name, points in runs.items():
            run = client.create_run(eid, run_name=name, tags={"landscape_probe.job": points[0].job})
            metrics = [Metric(p.tag, p.value, 0, p.step) for p in points]
            for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
                client.log_batch(run.info.run_id, metrics=metrics[i : i + 1000])
            client.set_terminated(run.info.run_id)
            where.append(f"{uri} (experiment {_MLFLOW_EXPERIMENT}, run {name}, id {run.info.run_id})")
        return where
    finally:
        if uri.startswith("file:"):
            if saved is None:
                os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
            else:
                os.environ["MLFLOW_ALLOW_FILE_STORE"] = saved


def _to_wandb(runs: dict[str, list[Point]], out: Path) -> list[str]:
    try:
        import wandb
    except ImportError as exc:
        raise _missing("wandb", "wandb", exc) from None
    out.mkdir(parents=True, exist_ok=True)
    mode = os.environ.get("WANDB_MODE") or "offline"  # never online unless asked
    where = []
    for name, points in runs.items():
        run = wandb.init(project=_WANDB_PROJECT, name=name, dir=str(out), mode=mode, reinit="create_new")  # type: ignore[arg-type]
        try:
            by_step: dict[int, dict[str, float]] = defaultdict(dict)
            for p in points:
                by_step[p.step][p.tag] = p.value
            for step in sorted(by_step):  # W&B needs increasing steps within a run
                run.log(by_step[step], step=step)
        finally:
            run.finish()
        sync = f"; upload with: wandb sync {out / 'wandb'}" if mode == "offline" else ""
        where.append(f"{Path(run.dir).parent} ({mode}{sync})")
    wandb.teardown()  # finish() can return before the service has written the last run's file
    return where


def export_results(
    results: str | os.PathLike,
    to: str,
    *,
    out: str | os.PathLike | None = None,
    run_name: str | None = None,
    say: Callable[[str], None] = print,
) -> list[str]:
    """Log every scalar of a results folder to a tracker, one run per job, at training steps.

    Args:
        results: a job's ``output.path``.
        to: ``tensorboard``, ``mlflow`` or ``wandb``.
        out: TensorBoard: the log folder (default ``RESULTS/tensorboard``); MLflow: a tracking URI or a
            folder for a file store (default ``$MLFLOW_TRACKING_URI``, else ``RESULTS/mlruns``);
            Weights & Biases: the folder of its run files (default ``RESULTS/wandb``; offline unless
            ``WANDB_MODE`` says otherwise).
        run_name: the run's name (default: the job's); with several jobs ``NAME-<job>``.
        say: where progress lines go.

    Returns:
        Where each run went, one line per run.

    Raises:
        ExportError: for an unknown backend, a results folder without results, or a backend whose
            package is not installed (naming the extra to install).
    """
    if to not in BACKENDS:
        raise ExportError(f"--to must be one of {', '.join(BACKENDS)}, got {to!r}")
    points = scalar_points(results, say=say)
    jobs = sorted({p.job for p in points})
    if not points:
        raise ExportError(f"results folder {str(results)!r} holds no finite scalar to export")

    def name(p: Point) -> str:
        base = p.job if run_name is None else run_name if len(jobs) == 1 else f"{run_name}-{p.job}"
        return f"{base}-{p.series}" if p.series else base

    runs: dict[str, list[Point]] = defaultdict(list)
    for p in points:
        runs[name(p)].append(p)
    root = Path(results)
    if to == "tensorboard":
        where = _to_tensorboard(runs, Path(out) if out is not None else root / "tensorboard")
    elif to == "mlflow":
        uri = str(out) if out is not None else os.environ.get("MLFLOW_TRACKING_URI") or str(root / "mlruns")
        where = _to_mlflow(runs, _mlflow_uri(uri))
    else:
        where = _to_wandb(runs, Path(out) if out is not None else root / "wandb")
    tags = len({p.tag for p in points})
    say(f"export: {len(points)} values of {tags} quantities from {len(jobs)} job(s) to {to}:")
    for line in where:
        say(f"  {line}")
    return where
