"""``critical``: ‖∇L‖, λ_min, λ_max (Lanczos) and the negative mass tr(H₋)/tr|H| (SLQ), labelled
``not_critical``, ``saddle`` or ``near_minimum`` by thresholds (Dauphin et al. 2014;
:func:`probe.critical.classify_critical_point`)."""

from __future__ import annotations

import pyarrow as pa
import torch

from cluster.kinds.base import F64, Headline, Kind, is_int, is_num
from cluster.kinds.spectrum import slq_vectors
from cluster.runners import ProbeContext, finite_or_none, join_notes, measure_symmetry
from probe.critical import classify_critical_point

OPTIONS = {
    "grad_norm": 1e-3,  # threshold on ‖∇L‖ (a convention, model dependent)
    "negative_mass": 0.01,  # threshold on tr(H₋)/tr|H| (a convention)
    "runs": 10,
    "steps": 80,
    "tol": 1e-6,
}

CHECKS = {
    "grad_norm": (lambda v: is_num(v) and v >= 0, "a non-negative number"),
    "negative_mass": (lambda v: is_num(v) and v >= 0, "a non-negative number"),
    "runs": (lambda v: is_int(v) and v >= 2, "an integer of at least 2"),
    "steps": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "tol": (lambda v: is_num(v) and v > 0, "a positive number"),
}

COLUMNS = (
    pa.field("label", pa.string()),  # near_minimum | saddle | not_critical
    pa.field("grad_norm", F64),
    pa.field("lambda_min", F64),
    pa.field("lambda_max", F64),
    pa.field("negative_mass", F64),
    pa.field("negative_mass_stderr", F64),
    pa.field("grad_norm_threshold", F64),
    pa.field("negative_mass_threshold", F64),
    pa.field("rule", pa.string()),
    pa.field("num_matvecs", pa.int64()),
    pa.field("note", pa.string()),
    pa.field("symmetry_defect", F64),  # |uᵀHv − vᵀHu|/|uᵀHv| (probe.symmetry); null: not measured
)


def run(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    """The gradient norm and the Hessian's extreme eigenvalues and negative mass, with their label."""
    ev = ctx.evaluator()  # in the spec's mode, as the operator: gradient and Hessian of the same loss
    theta = ev.center().detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(ev.loss_with_grad(theta), theta)  # summed over workers by the evaluator
    op = ctx.operator()
    sym = measure_symmetry(op, o, g)
    r = classify_critical_point(
        op,
        grad,
        grad_norm_threshold=o["grad_norm"],
        negative_mass_threshold=o["negative_mass"],
        runs=o["runs"],
        steps=o["steps"],
        tol=o["tol"],
        generator=g,
    )
    return {
        "label": r.label,
        "grad_norm": r.grad_norm,
        "lambda_min": r.lambda_min,
        "lambda_max": r.lambda_max,
        "negative_mass": r.negative_mass,
        "negative_mass_stderr": finite_or_none(r.negative_mass_stderr),
        "grad_norm_threshold": r.grad_norm_threshold,
        "negative_mass_threshold": r.negative_mass_threshold,
        "rule": r.rule,
        "num_matvecs": r.num_matvecs + sym.num_matvecs,
        "note": join_notes(r.note, sym.note),
        "symmetry_defect": sym.defect,
    }


KIND = Kind(
    name="critical",
    options=OPTIONS,
    checks=CHECKS,
    columns=COLUMNS,
    run=run,
    vectors=slq_vectors,  # SLQ's runs × (steps+1) basis, as spectrum
    # negative masses: 0/0 for a zero Hessian (reported)
    headline=Headline(
        finite=("grad_norm", "lambda_min", "lambda_max"),
        lambda_max=lambda row: row.get("lambda_max"),
        lambda_max_priority=1,
    ),
    uses_hessian=True,
)
