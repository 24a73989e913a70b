"""``sharpness``: λ_max; Keskar ε-sharpness; SAM ρ (one-step and multi-step); adaptive (ASAM:
worst/average, L2/L∞); average-case (:mod:`probe.sharpness`). One row per measure."""

from __future__ import annotations

import json

import pyarrow as pa
import torch

from cluster.kinds.base import F64, Headline, Kind, Sizes, Working, is_int, is_num, single_lanczos
from cluster.runners import ProbeContext, Symmetry, finite_or_none, join_notes, measure_symmetry
from probe.sharpness import adaptive_sharpness, average_sharpness, keskar_sharpness, lambda_max, sam_sharpness

OPTIONS = {
    "measures": ["lambda_max", "keskar", "sam", "adaptive"],
    "epsilon": 1e-3,  # Keskar et al. 2017
    "rho": 0.05,  # SAM, Foret et al. 2021
    "adaptive_rho": 0.5,  # ASAM, Kwon et al. 2021 (worst case, L2); to be set for any other kind or p
    "adaptive_kind": "worst",  # worst (projected ascent) | average (Monte Carlo); Kwon et al. 2021: worst
    "adaptive_p": 2,  # 2 | "inf": the norm of the ball of u in δ = |θ| ⊙ u; Kwon et al. 2021: 2
    "sigma": None,  # average-case: required when 'average' is listed
    "steps": 20,
    "num_samples": 20,
    # symmetry_check (uses_hessian): with lambda_max only (the one measure that uses the Hessian)
}

MEASURES = ("lambda_max", "keskar", "sam", "adaptive", "average")
CHECKS = {
    "measures": (
        lambda v: isinstance(v, list) and bool(v) and all(m in MEASURES for m in v),
        f"a non-empty list drawn from {', '.join(MEASURES)}",
    ),
    "epsilon": (lambda v: is_num(v) and v > 0, "a positive number"),
    "rho": (lambda v: is_num(v) and v > 0, "a positive number"),
    "adaptive_rho": (lambda v: is_num(v) and v > 0, "a positive number"),
    "adaptive_kind": (lambda v: v in ("worst", "average"), "'worst' or 'average'"),
    "adaptive_p": (lambda v: (is_int(v) and v == 2) or v == "inf", "2 or 'inf' (the L2 or L∞ ball of u)"),
    "sigma": (lambda v: v is None or (is_num(v) and v > 0), "a positive number or null"),
    "steps": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "num_samples": (lambda v: is_int(v) and v >= 2, "an integer of at least 2"),
}

COLUMNS = (  # one row per measure
    pa.field("measure", pa.string()),
    pa.field("value", F64),
    pa.field("stderr", F64),
    pa.field("base_loss", F64),
    pa.field("perturbed_loss", F64),
    pa.field("epsilon", F64),
    pa.field("rho", F64),
    pa.field("sigma", F64),
    pa.field("norm", pa.string()),
    pa.field("steps", pa.int64()),
    pa.field("num_samples", pa.int64()),
    pa.field("params", pa.string()),  # JSON: every parameter of the measure
    pa.field("num_evaluations", pa.int64()),
    pa.field("num_matvecs", pa.int64()),
    pa.field("note", pa.string()),
    pa.field("symmetry_defect", F64),  # of the Hessian behind lambda_max, in every row; null without lambda_max
)


def validate(given: dict, o: dict) -> str | None:
    """A message when ``average`` lacks ``sigma``, or ``adaptive`` outside ASAM's worst-case L2 lacks
    ``adaptive_rho``; else None."""
    if "average" in o["measures"] and o["sigma"] is None:
        return (
            "probes[sharpness].sigma is required when measures lists 'average' (no paper fixes a default); "
            "e.g. sigma: 0.01"
        )
    asam = (o["adaptive_kind"], o["adaptive_p"]) == ("worst", 2)
    if "adaptive" in o["measures"] and "adaptive_rho" not in given and not asam:
        return (
            f"probes[sharpness].adaptive_rho is required with adaptive_kind={o['adaptive_kind']!r}, "
            f"adaptive_p={o['adaptive_p']!r}: its default 0.5 is ASAM's for worst-case p=2 and no paper "
            "fixes one otherwise (Andriushchenko et al. 2023 sweep 0.05-0.4 for average L2, 0.1-0.8 for "
            "average L∞, 0.001-0.008 for worst L∞); e.g. adaptive_rho: 0.1"
        )
    return None


def run(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    """Each listed sharpness measure (SAM: one-step and multi-step), one row per result."""
    ev = ctx.evaluator()
    results = []
    sym = None  # measured once, on the operator of the first lambda_max
    for measure in o["measures"]:
        if measure == "lambda_max":
            op = ctx.operator()
            if sym is None:
                sym = measure_symmetry(op, o, g)
                symmetry_row = len(results)  # the row that pays for (and notes) the check
            results.append(lambda_max(op, generator=g))
        elif measure == "keskar":
            results.append(keskar_sharpness(ev, epsilon=o["epsilon"], steps=o["steps"], generator=g))
        elif measure == "sam":
            results.append(sam_sharpness(ev, rho=o["rho"], steps=1, generator=g))
            results.append(sam_sharpness(ev, rho=o["rho"], steps=o["steps"], generator=g))
        elif measure == "adaptive":
            results.append(
                adaptive_sharpness(
                    ev,
                    kind=o.get("adaptive_kind", "worst"),
                    p=o.get("adaptive_p", 2),
                    rho=o["adaptive_rho"],
                    steps=o["steps"],
                    num_samples=o["num_samples"],
                    generator=g,
                )
            )
        elif measure == "average":
            results.append(average_sharpness(ev, sigma=o["sigma"], num_samples=o["num_samples"], generator=g))
    sym = sym or Symmetry()
    rows = []
    for i, r in enumerate(results):
        params = dict(r.params)
        mine = sym.num_matvecs > 0 and i == symmetry_row
        rows.append(
            {
                "measure": r.measure,
                "value": float(r.value),
                "stderr": finite_or_none(r.stderr),
                "base_loss": float(r.base_loss),
                "perturbed_loss": float(r.perturbed_loss),
                "epsilon": params.get("epsilon"),
                "rho": params.get("rho"),
                "sigma": params.get("sigma"),
                "norm": params.get("norm"),
                "steps": params.get("steps"),
                "num_samples": params.get("num_samples"),
                "params": json.dumps(params, sort_keys=True, default=str),
                "num_evaluations": r.num_evaluations,
                "num_matvecs": r.num_matvecs + (sym.num_matvecs if mine else 0),
                "note": join_notes(r.note, sym.note) if mine else r.note,
                "symmetry_defect": sym.defect,
            }
        )
    return {"rows": rows, "num_matvecs": sum(r["num_matvecs"] for r in rows)}


def vectors(o: dict, s: Sizes) -> Working:
    """One Lanczos run at the default step cap (:func:`cluster.kinds.base.single_lanczos`)."""
    return single_lanczos(s)


def hessian_lambda_max(row: dict) -> float | None:
    """The value of a ``lambda_max`` row, else None."""
    return row["value"] if row.get("measure") == "lambda_max" else None


KIND = Kind(
    name="sharpness",
    options=OPTIONS,
    checks=CHECKS,
    columns=COLUMNS,
    run=run,
    vectors=vectors,
    validate=validate,
    # base_loss: NaN for lambda_max by design; the worker checks the loss
    headline=Headline(finite=("value",), lambda_max=hessian_lambda_max, lambda_max_priority=2, row_labels=("measure",)),
    uses_hessian=True,
)
