"""``eos``: edge of stability over the job's checkpoint series: λ_max per checkpoint (warm-started)
against the optimizer's stability threshold 2/η (GD), (2+2β)/η (heavy ball), (2+2β)/((1+2β)η)
(Nesterov); for Adam λ_max(P⁻¹H) against (2+2β₁)/((1−β₁)η) with P from the second moments saved
with the checkpoint (Cohen et al. 2022; :func:`probe.eos.eos_point`). One task per spec entry
over the series, one stored row per checkpoint (per_series)."""

from __future__ import annotations

import pyarrow as pa
import torch

from cluster.checkpoints import checkpoint_sha256
from cluster.kinds.base import F64, Gauge, Headline, Kind, Sizes, Working, is_num, num, single_lanczos
from cluster.runners import ProbeContext, adam_state, join_notes, learning_rate, measure_symmetry
from probe.eos import EosPoint, EosSeries, adam_preconditioner, eos_point

OPTIONS = {
    "lr": None,  # from checkpoint metadata ("lr") or a sidecar CKPT.json when absent
    "optimizer": "gd",
    "momentum": None,
    "tol": 1e-6,
}

CHECKS = {
    "lr": (lambda v: v is None or (is_num(v) and v > 0), "a positive number or null (read from checkpoints)"),
    "optimizer": (
        lambda v: v in ("gd", "momentum", "nesterov", "adam"),
        "'gd', 'momentum', 'nesterov' or 'adam' (adam reads the second moments saved with each checkpoint)",
    ),
    "momentum": (lambda v: v is None or (is_num(v) and 0 <= v < 1), "a number in [0, 1) or null"),
    "tol": (lambda v: is_num(v) and v > 0, "a positive number"),
}

COLUMNS = (  # one row per checkpoint of the series (its step and lr are common columns)
    pa.field("lr_source", pa.string()),  # spec | metadata | sidecar
    pa.field("optimizer", pa.string()),
    pa.field("momentum", F64),
    pa.field("lambda_max", F64),
    pa.field("threshold", F64),
    pa.field("ratio", F64),
    pa.field("residual", F64),
    pa.field("converged", pa.bool_()),
    pa.field("warm_started", pa.bool_()),
    pa.field("num_matvecs", pa.int64()),
    pa.field("note", pa.string()),
    pa.field("symmetry_defect", F64),  # measured once per task (its first checkpoint), in every row
)


def run(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    """λ_max (Adam: of P⁻¹H) against the stability threshold at each checkpoint of the series, each
    Lanczos run warm-started from the previous eigenvector; one row per checkpoint."""
    rows, previous, total, sym = [], None, 0, None
    for index, checkpoint in enumerate(o["series"]):
        model, meta = ctx.worker.build_model(checkpoint)
        lr, source = learning_rate(o["lr"], checkpoint, meta)
        fallback = o["series_steps"][index] if "series_steps" in o else index
        step = int(float(meta.get("step", fallback)))
        op = ctx.operator(model)
        first = sym is None
        if sym is None:  # once per task, on the Hessian (not the preconditioned operator) of its first checkpoint
            sym = measure_symmetry(op, o, g)
        preconditioner, momentum = None, o["momentum"]
        if o["optimizer"] == "adam":
            v, hp = adam_state(model, meta, checkpoint)
            space = ctx.evaluator(model=model).space
            by_name = dict(zip([n for n, _ in model.named_parameters()], v, strict=True))
            flat = torch.cat([by_name[n].reshape(-1) for n in space.names]).to(op.device, op.dtype)
            diag = adam_preconditioner(flat, hp["step"], beta1=hp["beta1"], beta2=hp["beta2"], eps=hp["eps"])
            preconditioner = diag[op.local_slice]
            momentum = hp["beta1"] if momentum is None else momentum
        point = eos_point(
            op,
            lr,
            step=step,
            optimizer=o["optimizer"],
            momentum=momentum,
            preconditioner=preconditioner,
            previous=previous,
            tol=o["tol"],
            generator=g,
        )
        previous = point.eigenvector
        spent = point.num_matvecs + (sym.num_matvecs if first else 0)
        total += spent
        rows.append(
            {
                "checkpoint": checkpoint,
                "checkpoint_sha256": checkpoint_sha256(checkpoint),
                "step": point.step,
                "lr": point.lr,
                "lr_source": source,
                "optimizer": point.optimizer,
                "momentum": point.momentum,
                "lambda_max": point.lambda_max,
                "threshold": point.threshold,
                "ratio": point.ratio,
                "residual": point.residual,
                "converged": point.converged,
                "warm_started": point.warm_started,
                "num_matvecs": spent,
                "note": join_notes(point.note, sym.note),
                "symmetry_defect": sym.defect,
            }
        )
    return {"rows": rows, "num_matvecs": total}


def vectors(o: dict, s: Sizes) -> Working:
    """One Lanczos run at the default step cap (:func:`cluster.kinds.base.single_lanczos`)."""
    return single_lanczos(s)


def eos_series_from_rows(rows: list[dict]) -> EosSeries:
    """The edge-of-stability series of ``eos`` rows of one job and optimizer, in step order."""
    rows = sorted(rows, key=lambda r: r.get("step") or 0)
    optimizer, momentum = str(rows[0].get("optimizer") or "gd"), num(rows[0].get("momentum") or 0.0)
    points = tuple(
        EosPoint(
            step=int(r.get("step") or 0),
            lr=num(r.get("lr")),
            optimizer=optimizer,
            momentum=momentum,
            lambda_max=num(r.get("lambda_max")),
            threshold=num(r.get("threshold")),
            ratio=num(r.get("ratio")),
            num_matvecs=int(r.get("num_matvecs") or 0),
            residual=num(r.get("residual")),
            converged=bool(r.get("converged")),
            warm_started=bool(r.get("warm_started")),
            sharpness="preconditioned" if optimizer == "adam" else "hessian",
            note=str(r.get("note") or ""),
        )
        for r in rows
    )
    return EosSeries(points, optimizer, momentum)


def hessian_lambda_max(row: dict) -> float | None:
    """The Hessian's λ_max, except Adam's rows: those hold λ_max(P⁻¹H) of the preconditioned Hessian."""
    return row.get("lambda_max") if row.get("optimizer") != "adam" else None


def gauges(row: dict) -> list[Gauge]:
    """The ``eos_ratio`` gauge: λ_max over the stability threshold."""
    return [Gauge("eos_ratio", row["ratio"])]


KIND = Kind(
    name="eos",
    options=OPTIONS,
    checks=CHECKS,
    columns=COLUMNS,
    run=run,
    vectors=vectors,
    read=eos_series_from_rows,
    per_series=True,
    uses_hessian=True,
    headline=Headline(
        finite=("lambda_max", "ratio"), lambda_max=hessian_lambda_max, lambda_max_priority=0, gauges=gauges
    ),
)
