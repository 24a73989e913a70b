"""``barrier``: loss and error along the straight line, a quadratic Bézier curve or a polygonal
chain between two checkpoints (bends trained on E_t L, Garipov et al. 2018), BatchNorm statistics
re-estimated at every point (:func:`probe.barrier.barrier`). One task per spec entry over its two
endpoints (pairwise); one row per path and evaluation set."""

from __future__ import annotations

import math

import pyarrow as pa
import torch

from cluster.kinds.base import F64, LIST, Gauge, Headline, Kind, Sizes, Working, is_int, is_num, no_basis, num, vec
from cluster.runners import ProbeContext, finite_or_none
from probe.barrier import BarrierResult, barrier
from probe.curves import PATH_KINDS, CurvedPath, train_bend

OPTIONS = {
    "between": None,  # [A, B]: checkpoint paths, or "init" for the factory's initialization
    "path": "linear",  # linear | bezier | polychain, or a list of them
    "points": 61,  # Garipov et al. 2018, eval_curve.py
    "eval_sets": ["probe"],
    "train_steps": 200,
    "train_lr": 0.01,
    "train_optimizer": "adam",
}

PATHS = ("linear", "bezier", "polychain")
CHECKS = {
    "between": (
        lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) and x for x in v),
        "a list of two checkpoint paths (or 'init')",
    ),
    "path": (
        lambda v: (v in PATHS) or (isinstance(v, list) and bool(v) and all(x in PATHS for x in v)),
        "'linear', 'bezier', 'polychain' or a list of them",
    ),
    "points": (lambda v: is_int(v) and v >= 3, "an integer of at least 3"),
    "eval_sets": (
        lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v),
        "a non-empty list of evaluation set names ('probe' is the probe set)",
    ),
    "train_steps": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "train_lr": (lambda v: is_num(v) and v > 0, "a positive number"),
    "train_optimizer": (lambda v: v in ("adam", "sgd"), "'adam' or 'sgd'"),
}

COLUMNS = (  # one row per path and evaluation set
    pa.field("path", pa.string()),
    pa.field("endpoint_a", pa.string()),
    pa.field("endpoint_b", pa.string()),
    pa.field("eval_set", pa.string()),  # the common "mode" column holds the evaluator's policy (eval+bn_recompute)
    pa.field("t", LIST),
    pa.field("loss", LIST),
    pa.field("error", LIST),
    pa.field("loss_a", F64),
    pa.field("loss_b", F64),
    pa.field("barrier_height", F64),
    pa.field("barrier_above_line", F64),
    pa.field("path_integral", F64),
    pa.field("error_barrier_height", F64),
    pa.field("num_nonfinite", pa.int64()),
    pa.field("train_steps", pa.int64()),
    pa.field("train_final_loss", F64),
)


def validate(given: dict, o: dict) -> str | None:
    """The required ``between`` endpoints: a message when the spec leaves them out, else None."""
    if given.get("between") is None:
        return "probes[barrier].between is required: two checkpoint paths, or ['init', PATH]"
    return None


def run(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    """Loss and error along each requested path between the two endpoints (bends trained first), one row
    per path and evaluation set."""
    end_a, end_b = o["between"]
    model_a, model_b = ctx.load(end_a), ctx.load(end_b)
    ev_train = ctx.evaluator("probe", model_a)
    space = ev_train.space
    a, b = space.get_flat(model_a), space.get_flat(model_b)
    evaluators = {name: ctx.evaluator(name, model_a) for name in o["eval_sets"]}
    paths = o["path"] if isinstance(o["path"], list) else [o["path"]]
    rows = []
    for name_of_path in paths:
        path = PATH_KINDS[name_of_path](a, b)
        training = None
        if isinstance(path, CurvedPath):  # bezier, polychain: a bend to train; linear: none
            training = train_bend(
                path, ev_train, steps=o["train_steps"], lr=o["train_lr"], optimizer=o["train_optimizer"], generator=g
            )
            path = training.path
        for name, r in barrier(path, evaluators, points=o["points"]).items():
            rows.append(
                {
                    "path": name_of_path,
                    "endpoint_a": end_a,
                    "endpoint_b": end_b,
                    "eval_set": name,
                    "mode": r.mode,
                    "t": r.t.tolist(),
                    "loss": r.loss.tolist(),
                    "error": [None if math.isnan(e) else e for e in r.error.tolist()],
                    "loss_a": float(r.loss_a),
                    "loss_b": float(r.loss_b),
                    "barrier_height": float(r.barrier_height),
                    "barrier_above_line": float(r.barrier_above_line),
                    "path_integral": float(r.path_integral),
                    "error_barrier_height": finite_or_none(float(r.error_barrier_height)),
                    "num_nonfinite": int(r.num_nonfinite),
                    "train_steps": training.steps_done if training else 0,
                    "train_final_loss": float(training.losses[-1]) if training and len(training.losses) else None,
                }
            )
    return {"rows": rows}  # no Hessian-vector products (the driver counts a missing num_matvecs as 0)


def vectors(o: dict, s: Sizes) -> Working:
    """Four whole (unsharded) parameter vectors for the endpoints and the path; no basis."""
    return no_basis(4 * s.dim * s.bv)


def barrier_from_row(r: dict) -> BarrierResult:
    """The barrier result of one ``barrier`` row (one path, one eval set)."""
    t, loss = vec(r["t"]), vec(r["loss"])
    bad = ~torch.isfinite(loss)
    return BarrierResult(
        eval_set=str(r.get("eval_set")),
        path=str(r.get("path")),
        mode=str(r.get("mode") or ""),
        num_examples=int(r.get("num_examples") or 0),
        t=t,
        loss=loss,
        error=vec(r.get("error") or [None] * len(t)),
        loss_a=num(r.get("loss_a")),
        loss_b=num(r.get("loss_b")),
        barrier_height=num(r.get("barrier_height")),
        barrier_above_line=num(r.get("barrier_above_line")),
        path_integral=num(r.get("path_integral")),
        integration_rule="",
        argmax_t=float(t[loss.nan_to_num(nan=-math.inf).argmax()]) if len(t) else math.nan,
        error_barrier_height=num(r.get("error_barrier_height")),
        num_nonfinite=int(bad.sum()),
        first_nonfinite_t=float(t[bad][0]) if bool(bad.any()) else None,
    )


def gauges(row: dict) -> list[Gauge]:
    """The probe set's barrier height per path; the newest row wins (endpoints need not be in the series)."""
    if row.get("eval_set") != "probe":
        return []
    return [Gauge("barrier", row["barrier_height"], labels=(("path", row["path"]),), latest="time")]


KIND = Kind(
    name="barrier",
    options=OPTIONS,
    checks=CHECKS,
    columns=COLUMNS,
    run=run,
    vectors=vectors,
    read=barrier_from_row,
    validate=validate,
    checkpoint_options=("between",),
    pairwise=True,
    # losses along the path report their NaNs in num_nonfinite: only the endpoints must be finite
    headline=Headline(finite=("loss_a", "loss_b"), gauges=gauges, row_labels=("path", "eval_set")),
)
