"""``pacbayes``: σ*, the largest σ with E_{δ~N(0,σ²I)} L(θ+δ) − L(θ) ≤ target, the KL to the prior
and the PAC-Bayes bound on the 0-1 error (Jiang et al. 2020; :func:`probe.pacbayes.pacbayes`)."""

from __future__ import annotations

import pyarrow as pa
import torch

from cluster.kinds.base import F64, Headline, Kind, Sizes, Working, is_int, is_num, no_basis
from cluster.runners import ProbeContext, finite_or_none
from probe.pacbayes import pacbayes

OPTIONS = {
    "target": 0.1,  # allowed expected loss increase (Jiang et al. 2020 use a 0.1 deviation)
    "variant": "isotropic",  # isotropic | magnitude
    "samples": 32,  # perturbations per estimate, in antithetic pairs
    "prior_sigma": None,  # None: the posterior's scale per coordinate (Jiang et al. 2020)
    "delta": 0.05,
    "rtol": 1e-3,
}

CHECKS = {
    "target": (lambda v: is_num(v) and v > 0, "a positive number (allowed expected loss increase)"),
    "variant": (lambda v: v in ("isotropic", "magnitude"), "'isotropic' or 'magnitude'"),
    "samples": (lambda v: is_int(v) and v >= 4 and v % 2 == 0, "an even integer of at least 4 (antithetic pairs)"),
    "prior_sigma": (lambda v: v is None or (is_num(v) and v > 0), "a positive number or null"),
    "delta": (lambda v: is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    "rtol": (lambda v: is_num(v) and 0 < v < 1, "a number in (0, 1)"),
}

COLUMNS = (
    pa.field("variant", pa.string()),
    pa.field("sigma", F64),  # σ*
    pa.field("sigma_stderr", F64),
    pa.field("target", F64),
    pa.field("expected_loss_increase", F64),
    pa.field("expected_loss_increase_stderr", F64),
    pa.field("base_loss", F64),
    pa.field("base_error", F64),
    pa.field("expected_error", F64),
    pa.field("expected_error_stderr", F64),
    pa.field("kl", F64),
    pa.field("prior_sigma", F64),  # null: the posterior's scale per coordinate
    pa.field("prior", pa.string()),
    pa.field("delta", F64),
    pa.field("bound", F64),  # kl-inverse bound on the expected 0-1 error
    pa.field("bound_sqrt", F64),
    pa.field("samples", pa.int64()),
    pa.field("num_evaluations", pa.int64()),
    pa.field("bisection_steps", pa.int64()),
    pa.field("num_matvecs", pa.int64()),
    pa.field("note", pa.string()),
)


def run(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    """σ* by bisection on the expected loss increase, the KL to the prior and the PAC-Bayes bound."""
    r = pacbayes(
        ctx.evaluator(),
        target=o["target"],
        variant=o["variant"],
        samples=o["samples"],
        prior_sigma=o["prior_sigma"],
        delta=o["delta"],
        rtol=o["rtol"],
        generator=g,
    )
    f = finite_or_none
    return {
        "variant": r.variant,
        "sigma": r.sigma,
        "sigma_stderr": f(r.sigma_stderr),
        "target": r.target,
        "expected_loss_increase": r.expected_loss_increase,
        "expected_loss_increase_stderr": f(r.expected_loss_increase_stderr),
        "base_loss": r.base_loss,
        "base_error": f(r.base_error),
        "expected_error": f(r.expected_error),
        "expected_error_stderr": f(r.expected_error_stderr),
        "kl": f(r.kl),
        "prior_sigma": f(r.prior_sigma),
        "prior": r.prior,
        "delta": r.delta,
        "bound": f(r.bound),
        "bound_sqrt": f(r.bound_sqrt),
        "samples": r.samples,
        "num_evaluations": r.num_evaluations,
        "bisection_steps": r.bisection_steps,
        "note": r.note,
        "num_matvecs": 0,
    }


def vectors(o: dict, s: Sizes) -> Working:
    """A draw of 16 whole perturbations and their antithetic pairs; no basis."""
    return no_basis(2 * 16 * s.dim * s.bv)  # a draw of 16 perturbations and their antithetic pairs


KIND = Kind(
    name="pacbayes",
    options=OPTIONS,
    checks=CHECKS,
    columns=COLUMNS,
    run=run,
    vectors=vectors,
    # expected_loss_increase: inf where perturbed losses are (reported in the row)
    headline=Headline(finite=("sigma", "base_loss")),
)
