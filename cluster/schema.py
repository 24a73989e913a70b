"""Every Parquet schema, declared once (with ``SCHEMA_VERSION``).

One dataset per probe kind under ``output.path/<kind>/`` plus ``output.path/runs/``,
hive-partitioned by job (``job=<name>/``). Every result row carries the common
provenance columns; each kind adds its own. Arrays are list columns.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["SCHEMA_VERSION", "COMMON_FIELDS", "KIND_FIELDS", "RUNS_SCHEMA", "FAILURES_SCHEMA", "schema_for"]

SCHEMA_VERSION = 2  # 2: common checkpoint_name, step, lr (eos's and noise's step/lr moved to common)

_f64 = pa.float64()
_list = pa.list_(pa.float64())
_list2 = pa.list_(pa.list_(pa.float64()))

COMMON_FIELDS = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("job", pa.string(), nullable=False),
    pa.field("task_key", pa.string(), nullable=False),
    pa.field("checkpoint", pa.string(), nullable=False),
    pa.field("checkpoint_sha256", pa.string(), nullable=False),
    pa.field("checkpoint_name", pa.string()),  # run-relative: checkpoint-200 (its folder) or step-3.safetensors (its file)
    pa.field("step", pa.int64()),  # training step: trainer_state.json, the name, or metadata (eos: the step it used)
    pa.field("lr", _f64),  # learning rate: trainer_state.json or metadata (eos, noise: the rate the probe used)
    pa.field("probe_config", pa.string(), nullable=False),  # JSON of the resolved options
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("schema_version", pa.int32(), nullable=False),
    pa.field("model_factory", pa.string()),
    pa.field("data_sha256", pa.string()),
    pa.field("num_examples", pa.int64()),
    pa.field("dtype", pa.string()),
    pa.field("mode", pa.string()),
    pa.field("world_size", pa.int32()),
    pa.field("device", pa.string()),
    pa.field("versions", pa.string()),  # JSON: library versions
    pa.field("duration_s", _f64),
    pa.field("attempts", pa.int32()),  # 1 + restarts after worker failures
    pa.field("checkpoint_metadata", pa.string()),  # JSON: metadata saved with the checkpoint (lr, step, ...)
    pa.field("num_parameters", pa.int64()),  # unique trainable parameters (a tied tensor counts once)
    pa.field("attention", pa.string()),  # attention implementation in effect (model.hf), e.g. "sdpa (math kernel)"
]

KIND_FIELDS: dict[str, list[pa.Field]] = {
    "eigenvalues": [
        pa.field("which", pa.string()),
        pa.field("eigenvalues", _list),
        pa.field("residuals", _list),
        pa.field("converged", pa.bool_()),
        pa.field("num_steps", pa.int64()),
        pa.field("orthogonality_loss", _f64),
        pa.field("num_matvecs", pa.int64()),
        pa.field("note", pa.string()),
        pa.field("basis_storage", pa.string()),  # device | host | disk | none
        pa.field("symmetry_defect", _f64),  # |uᵀHv − vᵀHu|/|uᵀHv| (probe.symmetry); null: not measured
    ],
    "trace": [
        pa.field("method", pa.string()),
        pa.field("trace", _f64),
        pa.field("trace_stderr", _f64),
        pa.field("num_matvecs", pa.int64()),
        pa.field("symmetry_defect", _f64),  # |uᵀHv − vᵀHu|/|uᵀHv| (probe.symmetry); null: not measured
    ],
    "spectrum": [
        pa.field("grid", _list),
        pa.field("density", _list),
        pa.field("density_stderr", _list),
        pa.field("ritz_values", _list2),
        pa.field("ritz_weights", _list2),
        pa.field("sigma", _f64),
        pa.field("reorth", pa.string()),
        pa.field("lambda_min", _f64),
        pa.field("lambda_max", _f64),
        pa.field("negative_mass", _f64),
        pa.field("negative_mass_stderr", _f64),
        pa.field("orthogonality_loss", _list),
        pa.field("breakdown", pa.list_(pa.bool_())),
        pa.field("num_matvecs", pa.int64()),
        pa.field("basis_storage", pa.string()),  # device | host | disk | none (reorth none keeps no basis)
        pa.field("note", pa.string()),  # e.g. the fallback to reorth none under basis_memory_bytes
        pa.field("symmetry_defect", _f64),  # |uᵀHv − vᵀHu|/|uᵀHv| (probe.symmetry); null: not measured
    ],
    "sharpness": [  # one row per measure
        pa.field("measure", pa.string()),
        pa.field("value", _f64),
        pa.field("stderr", _f64),
        pa.field("base_loss", _f64),
        pa.field("perturbed_loss", _f64),
        pa.field("epsilon", _f64),
        pa.field("rho", _f64),
        pa.field("sigma", _f64),
        pa.field("norm", pa.string()),
        pa.field("steps", pa.int64()),
        pa.field("num_samples", pa.int64()),
        pa.field("params", pa.string()),  # JSON: every parameter of the measure
        pa.field("num_evaluations", pa.int64()),
        pa.field("num_matvecs", pa.int64()),
        pa.field("note", pa.string()),
        pa.field("symmetry_defect", _f64),  # of the Hessian behind lambda_max, in every row; null without lambda_max
    ],
    "barrier": [  # one row per path and evaluation set
        pa.field("path", pa.string()),
        pa.field("endpoint_a", pa.string()),
        pa.field("endpoint_b", pa.string()),
        pa.field("eval_set", pa.string()),  # the common "mode" column holds the evaluator's policy (eval+bn_recompute)
        pa.field("t", _list),
        pa.field("loss", _list),
        pa.field("error", _list),
        pa.field("loss_a", _f64),
        pa.field("loss_b", _f64),
        pa.field("barrier_height", _f64),
        pa.field("barrier_above_line", _f64),
        pa.field("path_integral", _f64),
        pa.field("error_barrier_height", _f64),
        pa.field("num_nonfinite", pa.int64()),
        pa.field("train_steps", pa.int64()),
        pa.field("train_final_loss", _f64),
    ],
    "surface": [
        pa.field("dims", pa.int32()),
        pa.field("normalization", pa.string()),
        pa.field("directions", pa.string()),
        pa.field("ignore_1d", pa.bool_()),
        pa.field("alpha", _list),
        pa.field("beta", _list),  # empty for 1-D
        pa.field("loss", _list),  # row-major over (alpha, beta)
        pa.field("error", _list),
        pa.field("num_evaluations", pa.int64()),
        pa.field("num_nonfinite", pa.int64()),
        pa.field("direction_norms", _list),
        pa.field("direction_cosine", _f64),
        pa.field("eigenvalues", _list),
        pa.field("num_matvecs", pa.int64()),
        pa.field("note", pa.string()),
    ],
    "eos": [  # one row per checkpoint of the series (its step and lr are common columns)
        pa.field("lr_source", pa.string()),  # spec | metadata | sidecar
        pa.field("optimizer", pa.string()),
        pa.field("momentum", _f64),
        pa.field("lambda_max", _f64),
        pa.field("threshold", _f64),
        pa.field("ratio", _f64),
        pa.field("residual", _f64),
        pa.field("converged", pa.bool_()),
        pa.field("warm_started", pa.bool_()),
        pa.field("num_matvecs", pa.int64()),
        pa.field("note", pa.string()),
        pa.field("symmetry_defect", _f64),  # measured once per task (its first checkpoint), in every row
    ],
    "pacbayes": [
        pa.field("variant", pa.string()),
        pa.field("sigma", _f64),  # σ*
        pa.field("sigma_stderr", _f64),
        pa.field("target", _f64),
        pa.field("expected_loss_increase", _f64),
        pa.field("expected_loss_increase_stderr", _f64),
        pa.field("base_loss", _f64),
        pa.field("base_error", _f64),
        pa.field("expected_error", _f64),
        pa.field("expected_error_stderr", _f64),
        pa.field("kl", _f64),
        pa.field("prior_sigma", _f64),  # null: the posterior's scale per coordinate
        pa.field("prior", pa.string()),
        pa.field("delta", _f64),
        pa.field("bound", _f64),  # kl-inverse bound on the expected 0-1 error
        pa.field("bound_sqrt", _f64),
        pa.field("samples", pa.int64()),
        pa.field("num_evaluations", pa.int64()),
        pa.field("bisection_steps", pa.int64()),
        pa.field("num_matvecs", pa.int64()),
        pa.field("note", pa.string()),
    ],
    "noise": [
        pa.field("grad_norm", _f64),
        pa.field("noise_trace", _f64),  # tr(Σ), population covariance of per-example gradients
        pa.field("noise_scale", _f64),  # tr(Σ)/‖∇L‖²
        pa.field("noise_scale_debiased", _f64),
        pa.field("mean_sq_grad_norm", _f64),
        pa.field("loss", _f64),
        pa.field("temperature", _f64),  # η/(2B)
        pa.field("batch_size", pa.int64()),
        pa.field("lr_source", pa.string()),  # spec | metadata | none (the rate used is the common lr column)
        pa.field("batch_size_source", pa.string()),
        pa.field("gd_regularizer", _f64),  # (η/4)‖∇L‖²
        pa.field("sgd_regularizer", _f64),  # (η/4B) tr(Σ)
        pa.field("modified_loss_term", _f64),
        pa.field("noise_trace_clamped", pa.bool_()),
        pa.field("num_nonfinite", pa.int64()),
        pa.field("chunk_size", pa.int64()),
        pa.field("method", pa.string()),  # linear (layer identity) | vmap (formed per-example gradients)
        pa.field("num_matvecs", pa.int64()),
        pa.field("note", pa.string()),
    ],
    "critical": [
        pa.field("label", pa.string()),  # near_minimum | saddle | not_critical
        pa.field("grad_norm", _f64),
        pa.field("lambda_min", _f64),
        pa.field("lambda_max", _f64),
        pa.field("negative_mass", _f64),
        pa.field("negative_mass_stderr", _f64),
        pa.field("grad_norm_threshold", _f64),
        pa.field("negative_mass_threshold", _f64),
        pa.field("rule", pa.string()),
        pa.field("num_matvecs", pa.int64()),
        pa.field("note", pa.string()),
        pa.field("symmetry_defect", _f64),  # |uᵀHv − vᵀHu|/|uᵀHv| (probe.symmetry); null: not measured
    ],
}

RUNS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("job", pa.string(), nullable=False),
        pa.field("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("finished_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # succeeded | failed
        pa.field("num_tasks", pa.int64()),
        pa.field("num_done", pa.int64()),
        pa.field("num_skipped", pa.int64()),
        pa.field("num_failed", pa.int64()),
        pa.field("restarts", pa.int64()),
        pa.field("failures", pa.string()),  # JSON list of {task, reason}
        pa.field("spec", pa.string()),  # JSON
        pa.field("versions", pa.string()),
        pa.field("schema_version", pa.int32(), nullable=False),
    ]
)

# One row per failed task attempt that was given up on (``output.path/failures/``): what an
# audit reads to back off, and what a user queries to see why a checkpoint has no results.
FAILURES_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("job", pa.string(), nullable=False),
        pa.field("task_key", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("checkpoint", pa.string(), nullable=False),
        pa.field("checkpoint_sha256", pa.string()),
        pa.field("probe_config", pa.string()),
        pa.field("category", pa.string(), nullable=False),  # bounded: cluster.metrics.FAILURE_REASONS
        pa.field("reason", pa.string(), nullable=False),  # the full one-line message
        pa.field("attempts", pa.int32()),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("schema_version", pa.int32(), nullable=False),
    ]
)


def _check_unique() -> None:
    common = {f.name for f in COMMON_FIELDS}
    for kind, fields in KIND_FIELDS.items():
        dup = common & {f.name for f in fields}
        if dup:
            raise AssertionError(f"schema of {kind!r} repeats common columns {sorted(dup)}")


_check_unique()


def schema_for(kind: str) -> pa.Schema:
    """The full schema of a kind's dataset.

    Raises:
        KeyError: for a kind without a declared schema.
    """
    if kind not in KIND_FIELDS:
        raise KeyError(f"no Parquet schema declared for probe kind {kind!r}; declared: {', '.join(KIND_FIELDS)}")
    return pa.schema(COMMON_FIELDS + KIND_FIELDS[kind])
