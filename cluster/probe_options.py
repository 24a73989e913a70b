"""The options each probe kind of a job spec accepts: defaults and checks.

``PROBE_OPTIONS[kind]`` holds every option of that kind with its default (the
kinds of README.md); ``OPTION_CHECKS[kind][option]`` is a predicate
and the words for what it expects, so that :class:`cluster.spec.ProbeSpec` can say
"probes[KIND].OPTION must be WHAT, got VALUE".
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["PROBE_OPTIONS", "OPTION_CHECKS", "ALL_KINDS", "PIPELINE_KINDS"]

# Options each probe kind accepts, with defaults (every kind in README.md).
PROBE_OPTIONS: dict[str, dict[str, Any]] = {
    "eigenvalues": {"k": 5, "which": "largest", "tol": 1e-6, "max_steps": None, "reorth": "full", "basis": "device",
                    "basis_memory_bytes": None, "symmetry_check": None},
    "trace": {"method": "hutch++", "matvecs": 102, "symmetry_check": None},
    "spectrum": {"runs": 10, "steps": 80, "sigma": None, "reorth": "full", "grid_points": 1000, "basis": "device",
                 "basis_memory_bytes": None, "symmetry_check": None},
    "sharpness": {
        "measures": ["lambda_max", "keskar", "sam", "adaptive"],
        "epsilon": 1e-3,  # Keskar et al. 2017
        "rho": 0.05,  # SAM, Foret et al. 2021
        "adaptive_rho": 0.5,  # ASAM, Kwon et al. 2021 (worst case, L2); to be set for any other kind or p
        "adaptive_kind": "worst",  # worst (projected ascent) | average (Monte Carlo); Kwon et al. 2021: worst
        "adaptive_p": 2,  # 2 | "inf": the norm of the ball of u in δ = |θ| ⊙ u; Kwon et al. 2021: 2
        "sigma": None,  # average-case: required when 'average' is listed
        "steps": 20,
        "num_samples": 20,
        "symmetry_check": None,  # with lambda_max only (the one measure that uses the Hessian)
    },
    "barrier": {
        "between": None,  # [A, B]: checkpoint paths, or "init" for the factory's initialization
        "path": "linear",  # linear | bezier | polychain, or a list of them
        "points": 61,  # Garipov et al. 2018, eval_curve.py
        "eval_sets": ["probe"],
        "train_steps": 200,
        "train_lr": 0.01,
        "train_optimizer": "adam",
    },
    "surface": {
        "dims": 2,
        "resolution": 51,  # Li et al. 2018
        "span": 1.0,  # Li et al. 2018
        "normalization": None,  # filter for random directions; none for eigen/pca (unit vectors)
        "directions": "random",  # random | eigen | pca (pca: over the job's checkpoint series)
        "ignore_1d": True,  # biases and norm parameters fixed (Li et al. 2018, Sec. 4)
    },
    "eos": {
        "lr": None,  # from checkpoint metadata ("lr") or a sidecar CKPT.json when absent
        "optimizer": "gd",
        "momentum": None,
        "tol": 1e-6,
        "symmetry_check": None,
    },
    "pacbayes": {
        "target": 0.1,  # allowed expected loss increase (Jiang et al. 2020 use a 0.1 deviation)
        "variant": "isotropic",  # isotropic | magnitude
        "samples": 32,  # perturbations per estimate, in antithetic pairs
        "prior_sigma": None,  # None: the posterior's scale per coordinate (Jiang et al. 2020)
        "delta": 0.05,
        "rtol": 1e-3,
    },
    "noise": {
        "lr": None,  # from checkpoint metadata ("lr") when absent
        "batch_size": None,  # from checkpoint metadata ("batch_size") when absent
        # examples per vectorized per-example gradient computation; None: probe.noise.default_chunk_size()
        # (64, lowered on CPU until the largest parameter's per-example block fits in 30 MiB)
        "chunk_size": None,
    },
    "critical": {
        "grad_norm": 1e-3,  # threshold on ‖∇L‖ (a convention, model dependent)
        "negative_mass": 0.01,  # threshold on tr(H₋)/tr|H| (a convention)
        "runs": 10,
        "steps": 80,
        "tol": 1e-6,
        "symmetry_check": None,
    },
}

ALL_KINDS = ("eigenvalues", "trace", "spectrum", "sharpness", "barrier", "surface", "eos", "pacbayes", "noise", "critical")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_BASIS = ("device", "host", "disk")
# Kinds that measure their operator's symmetry defect (probe.symmetry): two extra products per task.
# symmetry_check: true | false | null (null: on when the operator is float64, i.e. in float64 jobs).
SYMMETRY_KINDS = ("eigenvalues", "trace", "spectrum", "sharpness", "eos", "critical")
_SYMMETRY_CHECK = (lambda v: v is None or isinstance(v, bool),
                   "true, false or null (null: on for float64 jobs; two extra products per task)")
# Probes that need only Hessian-vector products, so they run on a model split into pipeline stages.
PIPELINE_KINDS = ("eigenvalues", "trace", "spectrum")

# (check, what it expects) per option; the message reads "probes[KIND].OPTION must be WHAT, got VALUE".
OPTION_CHECKS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "eigenvalues": {
        "k": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
        "which": (lambda v: v in ("largest", "smallest"), "'largest' or 'smallest'"),
        "tol": (lambda v: _is_num(v) and v > 0, "a positive number"),
        "max_steps": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer or null"),
        "reorth": (lambda v: v in ("full", "selective"), "'full' or 'selective'"),
        "basis": (lambda v: v in _BASIS, "'device', 'host' or 'disk' (where the Lanczos vectors live)"),
        "basis_memory_bytes": (lambda v: v is None or (_is_int(v) and v > 0), "a positive integer (bytes) or null"),
    },
    "trace": {
        "method": (lambda v: v in ("hutchinson", "hutch++"), "'hutchinson' or 'hutch++'"),
        "matvecs": (lambda v: _is_int(v) and v >= 6, "an integer of at least 6"),
    },
    "spectrum": {
        "runs": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
        "steps": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
        "sigma": (lambda v: v is None or (_is_num(v) and v > 0), "a positive number (eigenvalue units) or null"),
        "reorth": (lambda v: v in ("full", "selective", "none"), "'full', 'selective' or 'none'"),
        "grid_points": (lambda v: _is_int(v) and v >= 2, "an integer of at least 2"),
        "basis": (lambda v: v in _BASIS, "'device', 'host' or 'disk' (where the Lanczos vectors live)"),
        "basis_memory_bytes": (lambda v: v is None or (_is_int(v) and v > 0),
                               "a positive integer (bytes) or null; above it SLQ falls back to reorth none"),
    },
}

_SHARPNESS = ("lambda_max", "keskar", "sam", "adaptive", "average")
_PATHS = ("linear", "bezier", "polychain")
OPTION_CHECKS["sharpness"] = {
    "measures": (lambda v: isinstance(v, list) and bool(v) and all(m in _SHARPNESS for m in v),
                 f"a non-empty list drawn from {', '.join(_SHARPNESS)}"),
    "epsilon": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "rho": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "adaptive_rho": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "adaptive_kind": (lambda v: v in ("worst", "average"), "'worst' or 'average'"),
    "adaptive_p": (lambda v: (_is_int(v) and v == 2) or v == "inf", "2 or 'inf' (the L2 or L∞ ball of u)"),
    "sigma": (lambda v: v is None or (_is_num(v) and v > 0), "a positive number or null"),
    "steps": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "num_samples": (lambda v: _is_int(v) and v >= 2, "an integer of at least 2"),
}
OPTION_CHECKS["barrier"] = {
    "between": (lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) and x for x in v),
                "a list of two checkpoint paths (or 'init')"),
    "path": (lambda v: (v in _PATHS) or (isinstance(v, list) and bool(v) and all(x in _PATHS for x in v)),
             "'linear', 'bezier', 'polychain' or a list of them"),
    "points": (lambda v: _is_int(v) and v >= 3, "an integer of at least 3"),
    "eval_sets": (lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v),
                  "a non-empty list of evaluation set names ('probe' is the probe set)"),
    "train_steps": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "train_lr": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "train_optimizer": (lambda v: v in ("adam", "sgd"), "'adam' or 'sgd'"),
}

OPTION_CHECKS["surface"] = {
    "dims": (lambda v: v in (1, 2), "1 or 2"),
    "resolution": (lambda v: _is_int(v) and v >= 2, "an integer of at least 2"),
    "span": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "normalization": (lambda v: v in (None, "filter", "layer", "weight", "none"),
                      "'filter', 'layer', 'weight', 'none' or null"),
    "directions": (lambda v: v in ("random", "eigen", "pca"), "'random', 'eigen' or 'pca'"),
    "ignore_1d": (lambda v: isinstance(v, bool), "true or false"),
}
OPTION_CHECKS["eos"] = {
    "lr": (lambda v: v is None or (_is_num(v) and v > 0), "a positive number or null (read from checkpoints)"),
    "optimizer": (lambda v: v in ("gd", "momentum", "nesterov", "adam"),
                  "'gd', 'momentum', 'nesterov' or 'adam' (adam reads the second moments saved with each checkpoint)"),
    "momentum": (lambda v: v is None or (_is_num(v) and 0 <= v < 1), "a number in [0, 1) or null"),
    "tol": (lambda v: _is_num(v) and v > 0, "a positive number"),
}

OPTION_CHECKS["pacbayes"] = {
    "target": (lambda v: _is_num(v) and v > 0, "a positive number (allowed expected loss increase)"),
    "variant": (lambda v: v in ("isotropic", "magnitude"), "'isotropic' or 'magnitude'"),
    "samples": (lambda v: _is_int(v) and v >= 4 and v % 2 == 0, "an even integer of at least 4 (antithetic pairs)"),
    "prior_sigma": (lambda v: v is None or (_is_num(v) and v > 0), "a positive number or null"),
    "delta": (lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    "rtol": (lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
}
OPTION_CHECKS["noise"] = {
    "lr": (lambda v: v is None or (_is_num(v) and v > 0), "a positive number or null (read from checkpoints)"),
    "batch_size": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer or null (read from checkpoints)"),
    "chunk_size": (lambda v: v is None or (_is_int(v) and v >= 1),
                   "a positive integer or null (null: probe.noise.default_chunk_size(), by the model and device)"),
}
OPTION_CHECKS["critical"] = {
    "grad_norm": (lambda v: _is_num(v) and v >= 0, "a non-negative number"),
    "negative_mass": (lambda v: _is_num(v) and v >= 0, "a non-negative number"),
    "runs": (lambda v: _is_int(v) and v >= 2, "an integer of at least 2"),
    "steps": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "tol": (lambda v: _is_num(v) and v > 0, "a positive number"),
}
for _kind in SYMMETRY_KINDS:
    OPTION_CHECKS[_kind]["symmetry_check"] = _SYMMETRY_CHECK
