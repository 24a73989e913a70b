"""What every probe runner shares, and the dispatcher ``run_probe``.

The runners themselves live with their kinds (``cluster/kinds/<kind>.py``, the ``run``
field of :class:`cluster.kinds.Kind`). Each calls :mod:`probe` functions and turns their
frozen results into a dict of scalars and lists (what goes back to the driver and into
Parquet); a runner that yields several rows (one per sharpness measure, per barrier path
and evaluation set, per checkpoint of an eos series) returns ``{"rows": [...]}``. Runners
run identically on every worker of a group (SPMD); the driver keeps rank 0's record.
Here: the context a runner receives, the symmetry-check plumbing, the Lanczos basis
store, the learning rate and Adam state of a checkpoint, and the finiteness check of
headline quantities (:attr:`cluster.kinds.Headline.finite`).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cluster.basis import DiskBasis
from cluster.errors import NonFiniteError
from probe.symmetry import symmetry_defect

__all__ = [
    "ProbeContext",
    "run_probe",
    "check_headlines",
    "adam_state",
    "learning_rate",
    "basis_store",
    "Symmetry",
    "measure_symmetry",
    "finite_or_none",
    "task_seed",
    "join_notes",
]


@dataclass
class ProbeContext:
    """What a runner may use: the worker (data shards, operators, evaluators) and the loaded model."""

    worker: Any
    model: torch.nn.Module
    checkpoint: str
    metadata: dict = field(default_factory=dict)

    def operator(self, model: torch.nn.Module | None = None):
        return self.worker.operator(self.model if model is None else model)

    def evaluator(self, eval_set: str = "probe", model: torch.nn.Module | None = None):
        return self.worker.evaluator(self.model if model is None else model, eval_set)

    def load(self, checkpoint: str) -> torch.nn.Module:
        return self.worker.build_model(checkpoint)[0]


def task_seed(job_seed: int, probe_index: int) -> int:
    """Seed of a probe's randomness: the same for every checkpoint, so checkpoints are compared on the same probes."""
    return job_seed * 1_000_003 + probe_index


def finite_or_none(x: float) -> float | None:
    """``x`` as a float, or None when it is NaN or infinite (a null in Parquet)."""
    return float(x) if math.isfinite(x) else None


# Seed offset of the symmetry check's own random stream: the estimators' draws from ``g`` stay the
# same whether the check runs or not, so their results do not depend on the option.
_SYMMETRY_SEED_OFFSET = 0x5E77


@dataclass(frozen=True)
class Symmetry:
    """The operator's symmetry defect for a task's rows: ``defect`` (None when not measured or not
    finite), the products it took and a note (empty unless the defect is far above rounding)."""

    defect: float | None = None
    num_matvecs: int = 0
    note: str = ""


def measure_symmetry(op, o: dict, g: torch.Generator) -> Symmetry:
    """Measure ``op``'s symmetry defect once (two products) when ``symmetry_check`` asks for it:
    true, false, or null for "on when the operator is float64". Warns (SymmetryWarning) when far
    above rounding; see :mod:`probe.symmetry` for the rule."""
    on = o.get("symmetry_check")
    if on is None:
        on = op.dtype == torch.float64
    if not on:
        return Symmetry()
    own = torch.Generator().manual_seed((g.initial_seed() + _SYMMETRY_SEED_OFFSET) % (1 << 63))
    r = symmetry_defect(op, own)
    return Symmetry(finite_or_none(r.defect), r.num_matvecs, r.note)


def join_notes(*notes: str) -> str:
    """The non-empty notes joined by ``"; "``."""
    return "; ".join(n for n in notes if n)


@contextmanager
def basis_store(ctx: ProbeContext, o: dict):
    """The Lanczos basis store the options ask for: on the device, in host memory, or on disk under
    ``output.path/.scratch`` (removed after the probe)."""
    if o.get("basis", "device") != "disk":
        yield o.get("basis", "device")
        return
    folder = Path(ctx.worker.spec.output.path) / ".scratch"
    folder.mkdir(parents=True, exist_ok=True)
    with DiskBasis(folder) as store:
        yield store


def learning_rate(option: float | None, checkpoint: str, meta: dict) -> tuple[float, str]:
    """The learning rate and its source: the option (``spec``), the checkpoint's metadata
    (``metadata``) or a sidecar ``CKPT.json`` (``sidecar``).

    Raises:
        ValueError: none of the three holds one.
    """
    if option is not None:
        return float(option), "spec"
    if "lr" in meta:
        return float(meta["lr"]), "metadata"
    sidecar = Path(checkpoint).with_suffix(".json")
    if sidecar.is_file():
        data = json.loads(sidecar.read_text())
        if "lr" in data:
            return float(data["lr"]), "sidecar"
    raise ValueError(
        f"no learning rate for {checkpoint!r}: set probes[eos].lr, save 'lr' in the checkpoint's metadata, "
        f'or write it to {sidecar.name} as {{"lr": ...}}'
    )


def adam_state(model: torch.nn.Module, meta: dict, checkpoint: str) -> tuple[list[torch.Tensor], dict]:
    """Adam's per-parameter second moments (model.parameters() order) and hyper-parameters from a checkpoint.

    Two layouts are read: a PyTorch file whose ``"optimizer"`` entry is
    ``torch.optim.Adam.state_dict()`` (one parameter group, in ``model.parameters()``
    order), or safetensors tensors ``optimizer.exp_avg_sq.<parameter name>`` with
    metadata ``adam_step`` and optionally ``beta1``, ``beta2``, ``eps``.

    Raises:
        ValueError: naming the checkpoint and what is missing.
    """
    names = [n for n, _ in model.named_parameters()]
    if isinstance(meta.get("optimizer"), dict):
        sd = meta["optimizer"]
        group = sd["param_groups"][0]
        state = sd["state"]
        missing = [names[i] for i in group["params"] if i not in state or "exp_avg_sq" not in state[i]]
        if missing or len(group["params"]) != len(names):
            raise ValueError(f"checkpoint {checkpoint!r}: the Adam state does not cover the parameters {missing[:5]}")
        v = [state[i]["exp_avg_sq"] for i in group["params"]]
        step = float(state[group["params"][0]]["step"])
        beta1, beta2 = group["betas"]
        return v, {"step": step, "beta1": float(beta1), "beta2": float(beta2), "eps": float(group["eps"])}
    tensors = meta.get("_optimizer_tensors", {})
    keys = [f"optimizer.exp_avg_sq.{n}" for n in names]
    missing = [k for k in keys if k not in tensors]
    if missing or "adam_step" not in meta:
        raise ValueError(
            f"checkpoint {checkpoint!r} has no Adam state: save the optimizer's state_dict under 'optimizer' "
            f"(PyTorch file) or tensors optimizer.exp_avg_sq.<parameter> with metadata adam_step (safetensors); "
            f"missing {(missing or ['adam_step'])[:3]}"
        )
    return [tensors[k] for k in keys], {
        "step": float(meta["adam_step"]),
        "beta1": float(meta.get("beta1", 0.9)),
        "beta2": float(meta.get("beta2", 0.999)),
        "eps": float(meta.get("eps", 1e-8)),
    }


# The headline quantities of each kind's rows are declared with the kind (Headline.finite). One that
# is NaN or infinite fails the task (NonFiniteError): no row is stored, the failure is recorded and an
# audit retries it after its backoff.


def check_headlines(kind: str, record: dict, checkpoint: str) -> None:
    """Refuse a record whose headline quantities (:attr:`cluster.kinds.Headline.finite`) are not all finite.

    Args:
        kind: the probe kind.
        record: the runner's record (``{"rows": [...]}`` or one row).
        checkpoint: the task's checkpoint, named where a row does not carry its own.

    Raises:
        NonFiniteError: naming the kind, the quantity (and row), the value and the checkpoint.
    """
    from cluster.kinds import KINDS

    headline = KINDS[kind].headline if kind in KINDS else None
    finite, labels = (headline.finite, headline.row_labels) if headline else ((), ())
    for row in record.get("rows", [record]):
        for name in finite:
            value = row.get(name)
            values = value if isinstance(value, (list, tuple)) else [value]
            for i, v in enumerate(values):
                if v is None or math.isfinite(v):
                    continue
                quantity = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
                where = ", ".join(f"{k} {row[k]}" for k in labels if row.get(k) is not None)
                raise NonFiniteError(
                    f"non-finite result: {kind} {quantity}{f' ({where})' if where else ''} is {v} at checkpoint "
                    f"{row.get('checkpoint', checkpoint)!r}: the products, gradients or losses this probe evaluated "
                    "overflowed or are undefined (check the loss function's derivatives, the precision, the data "
                    "and the weights); no row is stored and the task is retried after its backoff"
                )


def run_probe(kind: str, ctx: ProbeContext, options: dict[str, Any], seed: int) -> dict:
    """Run probe ``kind`` (its registered runner, :data:`cluster.kinds.KINDS`) with resolved
    ``options`` and randomness from ``seed``.

    Raises:
        ValueError: for a kind that is not registered.
        NonFiniteError: when a headline quantity of the record is NaN or infinite (see
            :func:`check_headlines`).
    """
    from cluster.kinds import KINDS

    if kind not in KINDS:
        raise ValueError(f"no runner for probe kind {kind!r}; available: {', '.join(KINDS)}")
    record = KINDS[kind].run(ctx, options, torch.Generator().manual_seed(seed))
    check_headlines(kind, record, ctx.checkpoint)
    return record
