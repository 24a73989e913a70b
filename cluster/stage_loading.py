"""One pipeline stage of a checkpoint, built without the rest of the model.

Each worker of a pipeline builds the model's skeleton on the meta device, cuts it into
stages (:func:`cluster.pipeline.build_stage`, which attaches the stage's
:class:`~cluster.pipeline_layout.StageLayout`) and reads only its own stage's tensors:
:func:`factory_stage` for a ``model.factory`` returning an ``nn.Sequential``,
:func:`hf_stage` for a Hugging Face model cut by :mod:`cluster.hf_stages`. A parameter
tied to an earlier stage's (a head tied to the embedding) loads from whichever of its
names the file holds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cluster.checkpoints import CheckpointError, load_checkpoint
from cluster.pipeline import StageLayout, build_stage
from cluster.spec import SpecError

__all__ = ["check_finite", "factory_stage", "hf_stage"]


def check_finite(state: dict, checkpoint: str) -> None:
    """Refuse NaN or Inf weights, naming the first tensor that holds them."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"checkpoint {checkpoint!r}: tensor {name!r} holds {bad} non-finite value(s) (NaN or Inf) of "
                f"{t.numel()}; the checkpoint is corrupt or training diverged"
            )


def _cut(model: torch.nn.Sequential, stages: int, stage: int, balance: str) -> tuple[torch.nn.Module, StageLayout]:
    part, _, _ = build_stage(model, stages, stage, balance)
    layout: StageLayout | None = getattr(part, "pipeline_layout", None)
    assert layout is not None  # build_stage attaches it
    return part, layout


def factory_stage(
    spec, checkpoint: str, stages: int, stage: int, *, dtype: torch.dtype, device: torch.device
) -> tuple[torch.nn.Module, StageLayout, dict]:
    """``(stage module, its layout, checkpoint metadata)`` of ``spec.model.factory``'s model.

    Raises:
        SpecError: for ``checkpoint="init"`` or a factory that returns no ``nn.Sequential``.
        CheckpointError: for a tensor the file lacks, a shape that differs or non-finite weights.
    """
    from cluster.spec import import_factory

    if checkpoint == "init":
        raise SpecError("checkpoint 'init' is not available with cluster.stages > 1; give a checkpoint file")
    with torch.device("meta"):
        skeleton = import_factory(spec.model.factory, key="model.factory")(**spec.model.kwargs)
    if not isinstance(skeleton, torch.nn.Sequential):
        raise SpecError(
            f"cluster.stages={stages} needs model.factory {spec.model.factory!r} to return an "
            f"nn.Sequential of stages (embedding, blocks, head), got {type(skeleton).__name__}"
        )
    part, layout = _cut(skeleton, stages, stage, spec.cluster.balance)
    start = layout.bounds[0]
    names = {f"{start + int(k.split('.', 1)[0])}.{k.split('.', 1)[1]}": k for k in part.state_dict()}
    alias = {b.full_name: b.owner_name for b in layout.borrowed}  # a tie's other name
    state, meta = load_checkpoint(checkpoint, keys=[*names, *alias.values()], missing_ok=True)
    for full, other in alias.items():
        if full not in state and other in state:
            state[full] = state[other]
    lacking = [full for full in names if full not in state]
    if lacking:
        raise CheckpointError(f"checkpoint {checkpoint!r} has no tensors {lacking[:5]} (pipeline stage {stage})")
    part = part.to_empty(device=device).to(dtype=dtype)
    for full, local in names.items():
        if state[full].shape != part.state_dict()[local].shape:
            raise CheckpointError(
                f"checkpoint {checkpoint!r}: tensor {full!r} has shape {tuple(state[full].shape)}, "
                f"the model expects {tuple(part.state_dict()[local].shape)}"
            )
    check_finite(state, checkpoint)
    part.load_state_dict({local: state[full] for full, local in names.items()})
    return part, layout, meta


def hf_stage(
    spec,
    checkpoint: str,
    stages: int,
    stage: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    read: Callable[..., tuple[dict, dict]],
) -> tuple[torch.nn.Module, StageLayout, dict, dict]:
    """``(stage module, its layout, checkpoint metadata, model description)`` of ``spec.model.hf``'s
    model: built from its config on meta, cut into pieces, this stage's pieces given the checkpoint's
    tensors, read by ``read(checkpoint, keys=...)`` (finite, checked) and only those.

    Raises:
        SpecError: for ``checkpoint="init"``.
        UnsupportedStages: for a family :mod:`cluster.hf_stages` does not know.
        CheckpointError: for a tensor the file lacks or a shape that differs.
    """
    from cluster.hf import config_path, describe, hf_skeleton, prefix_keys, tensor_names
    from cluster.hf_stages import load_stage_state, piece_state_names, pipeline_pieces, stage_state_keys

    if checkpoint == "init":
        raise SpecError("checkpoint 'init' is not available with model.hf; give two checkpoint folders")
    m = spec.model
    skeleton = hf_skeleton(config_path(checkpoint, m.hf), m.hf_class, m.attn_implementation, dtype)
    pieces = pipeline_pieces(skeleton)
    part, layout = _cut(pieces, stages, stage, spec.cluster.balance)
    children = range(*layout.bounds)
    in_file = prefix_keys(skeleton, {k: k for k in tensor_names(checkpoint)})  # model name -> file name
    names = piece_state_names(skeleton, pieces, checkpoint_keys=in_file)
    wanted = sorted(k for k in stage_state_keys(names, children) if k in in_file)
    state, meta = read(checkpoint, keys=[in_file[k] for k in wanted])
    state = {k: state[in_file[k]] for k in wanted}
    load_stage_state(pieces, names, state, children, dtype=dtype, device=device)
    return part, layout, meta, describe(skeleton)
