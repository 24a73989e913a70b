"""Every Parquet schema, declared once (with ``SCHEMA_VERSION``).

One dataset per probe kind under ``output.path/<kind>/`` plus ``output.path/runs/`` and
``output.path/failures/``, one folder per job (``<kind>/<job>/``, named by the job alone: no
hive ``key=value`` segment since version 4, see :mod:`cluster.store`). Every row carries ``job``
as a string column, and every result row the common provenance columns; each kind adds its
own, declared with the kind (:attr:`cluster.kinds.Kind.columns`). Arrays are list columns.
"""

from __future__ import annotations

import pyarrow as pa

from cluster.kinds import KINDS

__all__ = ["SCHEMA_VERSION", "COMMON_FIELDS", "KIND_FIELDS", "RUNS_SCHEMA", "FAILURES_SCHEMA", "schema_for"]

# 2: common checkpoint_name, step, lr (eos's and noise's step/lr moved to common); 3: common hvp, layout and lm_head
# (older rows read back with them null); 4: the same columns, job folders <kind>/<job>/ instead of hive job=<job>/
# (pandas refused a job column that was also the partition key; the store still reads and migrates job=<job>/)
SCHEMA_VERSION = 4

_f64 = pa.float64()

COMMON_FIELDS = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("job", pa.string(), nullable=False),
    pa.field("task_key", pa.string(), nullable=False),
    pa.field("checkpoint", pa.string(), nullable=False),
    pa.field("checkpoint_sha256", pa.string(), nullable=False),
    pa.field(
        "checkpoint_name", pa.string()
    ),  # run-relative: checkpoint-200 (its folder) or step-3.safetensors (its file)
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
    pa.field("hvp", pa.string()),  # how products were formed: exact (reverse over reverse; spec key hvp)
    # how the workers held the model: single, replicated, pipeline K stages x R replicas (schedule),
    # parameter-sharded over N
    pa.field("layout", pa.string()),
    # a Hugging Face causal LM's head in products: chunked (probe.lm_head, no tokens x vocabulary graph) or plain
    pa.field("lm_head", pa.string()),
]

# Each kind's own columns, declared with the kind (``cluster/kinds/<kind>.py``, ``Kind.columns``).
KIND_FIELDS: dict[str, list[pa.Field]] = {name: list(k.columns) for name, k in KINDS.items()}

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
