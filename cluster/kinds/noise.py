"""``noise``: gradient noise from per-example gradients: ‖∇L‖, tr(Σ), the noise scale tr(Σ)/‖∇L‖²
(McCandlish et al. 2018), the temperature η/(2B) and Smith et al. (2021)'s implicit regularizers
(:func:`probe.noise.noise_statistics`). Per-example statistics: no token-weighted form."""

from __future__ import annotations

import pyarrow as pa
import torch

from cluster.kinds.base import F64, Headline, Kind, Sizes, Working, is_int, is_num, no_basis
from cluster.runners import ProbeContext, finite_or_none
from probe.noise import gradient_moments, noise_statistics

OPTIONS = {
    "lr": None,  # from checkpoint metadata ("lr") when absent
    "batch_size": None,  # from checkpoint metadata ("batch_size") when absent
    # examples per vectorized per-example gradient computation; None: probe.noise.default_chunk_size()
    # (64, lowered on CPU until the largest parameter's per-example block fits in 30 MiB)
    "chunk_size": None,
}

CHECKS = {
    "lr": (lambda v: v is None or (is_num(v) and v > 0), "a positive number or null (read from checkpoints)"),
    "batch_size": (lambda v: v is None or (is_int(v) and v >= 1), "a positive integer or null (read from checkpoints)"),
    "chunk_size": (
        lambda v: v is None or (is_int(v) and v >= 1),
        "a positive integer or null (null: probe.noise.default_chunk_size(), by the model and device)",
    ),
}

COLUMNS = (
    pa.field("grad_norm", F64),
    pa.field("noise_trace", F64),  # tr(Σ), population covariance of per-example gradients
    pa.field("noise_scale", F64),  # tr(Σ)/‖∇L‖²
    pa.field("noise_scale_debiased", F64),
    pa.field("mean_sq_grad_norm", F64),
    pa.field("loss", F64),
    pa.field("temperature", F64),  # η/(2B)
    pa.field("batch_size", pa.int64()),
    pa.field("lr_source", pa.string()),  # spec | metadata | none (the rate used is the common lr column)
    pa.field("batch_size_source", pa.string()),
    pa.field("gd_regularizer", F64),  # (η/4)‖∇L‖²
    pa.field("sgd_regularizer", F64),  # (η/4B) tr(Σ)
    pa.field("modified_loss_term", F64),
    pa.field("noise_trace_clamped", pa.bool_()),
    pa.field("num_nonfinite", pa.int64()),
    pa.field("chunk_size", pa.int64()),
    pa.field("method", pa.string()),  # linear (layer identity) | vmap (formed per-example gradients)
    pa.field("num_matvecs", pa.int64()),
    pa.field("note", pa.string()),
)


def _from_metadata(option, meta: dict, key: str, cast):
    """An option, else the checkpoint metadata's value, and where it came from."""
    if option is not None:
        return cast(option), "spec"
    if key in meta:
        return cast(float(meta[key])), "metadata"
    return None, "none"


def run(ctx: ProbeContext, o: dict, g: torch.Generator) -> dict:
    """Gradient-noise statistics from per-example gradient moments (summed over workers), with the
    learning rate and batch size from the options or the checkpoint's metadata."""
    w = ctx.worker
    moments = gradient_moments(ctx.model, w.loss_fn, w.batches, chunk_size=o["chunk_size"], mode=w.spec.mode)
    if w.world_size > 1:

        def total(t: torch.Tensor) -> torch.Tensor:
            torch.distributed.all_reduce(t)
            return t

        moments = moments.all_reduced(total)
    lr, lr_source = _from_metadata(o["lr"], ctx.metadata, "lr", float)
    batch_size, bs_source = _from_metadata(o["batch_size"], ctx.metadata, "batch_size", int)
    r = noise_statistics(moments, lr=lr, batch_size=batch_size)
    missing = [name for name, v in (("lr", lr), ("batch_size", batch_size)) if v is None]
    note = (
        (
            f"no {' or '.join(missing)}: set probes[noise].{missing[0]} or save '{missing[0]}' in the checkpoint's "
            "metadata for the temperature and the implicit-regularization terms"
        )
        if missing
        else ""
    )
    f = finite_or_none
    return {
        "grad_norm": r.grad_norm,
        "noise_trace": r.noise_trace,
        "noise_scale": f(r.noise_scale),
        "noise_scale_debiased": f(r.noise_scale_debiased),
        "mean_sq_grad_norm": r.mean_sq_grad_norm,
        "loss": r.loss,
        "temperature": f(r.temperature),
        "batch_size": r.batch_size,
        "lr": f(r.lr),
        "lr_source": lr_source,
        "batch_size_source": bs_source,
        "gd_regularizer": f(r.gd_regularizer),
        "sgd_regularizer": f(r.sgd_regularizer),
        "modified_loss_term": f(r.modified_loss_term),
        "noise_trace_clamped": r.noise_trace_clamped,
        "num_nonfinite": r.num_nonfinite,
        "chunk_size": r.chunk_size,
        "method": moments.method,
        "note": note,
        "num_matvecs": 0,
    }


def vectors(o: dict, s: Sizes) -> Working:
    """Four whole (unsharded) parameter vectors; no basis."""
    return no_basis(4 * s.dim * s.bv)


KIND = Kind(
    name="noise",
    options=OPTIONS,
    checks=CHECKS,
    columns=COLUMNS,
    run=run,
    vectors=vectors,
    headline=Headline(finite=("grad_norm", "noise_trace", "loss")),
    example_only=True,
)
