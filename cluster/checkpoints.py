"""Finding, hashing and safely loading checkpoints.

Formats, in order of preference:

- ``.safetensors``: read with the ``safetensors`` library (no code execution);
- anything else is treated as a PyTorch file and read only with
  ``torch.load(..., weights_only=True)``, which refuses pickles that would build
  arbitrary objects. Untrusted pickles are never executed.

A PyTorch file may hold a bare state dict or a dict with ``"state_dict"`` /
``"model"`` plus metadata (``"lr"``, ``"step"``, ...); safetensors metadata
(string pairs in the header) is returned as the metadata.

A sharded checkpoint is named by its index (``*.safetensors.index.json`` or
``*.bin.index.json``, the Hugging Face layout: ``{"metadata": {...},
"weight_map": {tensor: shard file}}``, shards beside the index). Its content hash
covers the index and every shard; a folder lists the index, not its shards.
Checkpoints of a folder or glob are ordered naturally (``step-9`` before
``step-10``), which is the order of a series.

Finding checkpoints in folders and training runs, and naming them, is
:mod:`cluster.run_folders`; headers, indexes and file hashes are
:mod:`cluster.checkpoint_files`. This module re-exports both, so callers import every
checkpoint name from here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from cluster.checkpoint_files import (
    CHECKPOINT_SUFFIXES,
    SAFETENSORS_ITEMSIZE,
    CheckpointError,
    ReadStats,
    _check_safetensors_layout,
    _read_index,
    file_sha256,
    is_index,
    safetensors_header,
    shard_files,
)
from cluster.run_folders import (
    CANONICAL_WEIGHTS,
    CONFIG_FILE,
    TRAINER_STATE,
    CheckpointInfo,
    checkpoint_entries,
    checkpoint_info,
    expand_checkpoints,
    is_auxiliary,
    parse_step,
    training_metadata,
)

__all__ = [
    "CheckpointError",
    "expand_checkpoints",
    "file_sha256",
    "checkpoint_sha256",
    "load_checkpoint",
    "is_index",
    "save_sharded",
    "ReadStats",
    "CHECKPOINT_SUFFIXES",
    "safetensors_header",
    "shard_files",
    "SAFETENSORS_ITEMSIZE",
    "CheckpointInfo",
    "checkpoint_info",
    "checkpoint_entries",
    "is_auxiliary",
    "parse_step",
    "CONFIG_FILE",
    "TRAINER_STATE",
    "CANONICAL_WEIGHTS",
    "hashed_files",
    "training_metadata",
]


def checkpoint_sha256(path: str | Path) -> str:
    """Content hash of a checkpoint: the file's SHA-256, or for a sharded index the
    SHA-256 over the index bytes and each shard's name and SHA-256. When the folder
    holds a ``config.json`` (a Hugging Face model is built from it), the hash also
    covers its bytes: the SHA-256 of the weights' hash, the name and the config's hash.

    Raises:
        CheckpointError: for an index whose shard is missing, naming both.
    """
    path = Path(path)
    if not is_index(path):
        digest = file_sha256(path)
    else:
        h = hashlib.sha256(path.read_bytes())
        for shard in shard_files(path):
            if not shard.is_file():
                raise CheckpointError(
                    f"checkpoint index {str(path)!r} names shard {shard.name!r}, which does not exist"
                )
            h.update(f"\0{shard.name}\0{file_sha256(shard)}".encode())
        digest = h.hexdigest()
    config = path.parent / CONFIG_FILE
    if config.is_file():
        digest = hashlib.sha256(f"{digest}\0{CONFIG_FILE}\0{file_sha256(config)}".encode()).hexdigest()
    return digest


def hashed_files(path: str | Path) -> list[Path]:
    """The files :func:`checkpoint_sha256` reads for ``path``: the file or index, its shards and
    the folder's ``config.json`` when present (what a cache of hashes must watch)."""
    path = Path(path)
    files = [path] + (shard_files(path) if is_index(path) else [])
    config = path.parent / CONFIG_FILE
    return files + ([config] if config.is_file() else [])


def _load_sharded(path: Path, keys, stats: ReadStats | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weight_map, index_meta = _read_index(path)
    wanted = set(weight_map) if keys is None else set(keys)
    unknown = sorted(wanted - set(weight_map))
    if unknown:
        raise CheckpointError(f"checkpoint {str(path)!r} has no tensors {unknown[:5]} in its weight_map")
    state: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for shard in shard_files(path, weight_map):
        names = [n for n, f in weight_map.items() if f == shard.name and n in wanted]
        if not shard.is_file():
            raise CheckpointError(f"checkpoint index {str(path)!r} names shard {shard.name!r}, which does not exist")
        if not names:
            continue  # never opened: nothing of it is needed
        tensors, shard_meta = _load(shard, names, stats, True)
        meta.update(shard_meta)
        for name in names:
            if name not in tensors:
                raise CheckpointError(f"checkpoint {str(path)!r}: tensor {name!r} is not in its shard {shard.name!r}")
            state[name] = tensors[name]
    meta.update({k: v for k, v in index_meta.items() if isinstance(v, (str, int, float, bool))})
    return state, meta


def load_checkpoint(
    path: str | Path, *, keys=None, stats: ReadStats | None = None, missing_ok: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(state_dict, metadata)`` from a checkpoint file or sharded index without executing code.

    Args:
        path: a ``.safetensors``, ``.pt``/``.pth``/``.bin`` file or a sharded index (``*.index.json``).
        keys: load only these tensors (a pipeline stage's parameters). Safetensors files
            are memory-mapped and only the named tensors are read; a sharded index
            opens only the shards that hold them. PyTorch files are read whole.
        stats: records the files opened and the tensors and bytes read.
        missing_ok: with ``keys``, skip names the file lacks instead of failing.

    Raises:
        CheckpointError: naming the file when it is missing, truncated, corrupt, lacks
            a requested tensor, or is a pickle that would need code execution to load.

    The weights of a Trainer checkpoint folder (``checkpoint-N/model.safetensors`` beside
    ``trainer_state.json``) get that state's ``step`` (``global_step``) and ``lr`` in their
    metadata when they carry none themselves.
    """
    state, meta = _load(Path(path), keys, stats, missing_ok)
    for k, v in training_metadata(path).items():  # the Trainer's step and lr, where the weights carry none
        meta.setdefault(k, v)
    return state, meta


def _load(
    path: Path, keys, stats: ReadStats | None, missing_ok: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if is_index(path):
        return _load_sharded(path, keys, stats)
    if stats is not None:
        stats.files.append(path.name)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        _check_safetensors_layout(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                names = list(f.keys()) if keys is None else [k for k in keys if k in present]
                if keys is not None and not missing_ok and len(names) < len(set(keys)):
                    lacking = sorted(set(keys) - present)
                    raise CheckpointError(f"checkpoint {str(path)!r} has no tensors {lacking[:5]}")
                state = {k: f.get_tensor(k) for k in names}
                meta = dict(f.metadata() or {})
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises several types for bad headers
            raise CheckpointError(f"checkpoint {str(path)!r} is not a valid safetensors file: {exc}") from exc
        if stats is not None:
            for t in state.values():
                stats.add(t)
        return state, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be loaded safely (weights_only=True): "
            f"{next(iter(str(exc).splitlines()), '') or type(exc).__name__}; "
            "save it as safetensors or as a plain state dict"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, meta = obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state, meta = obj["model"], {k: v for k, v in obj.items() if k != "model"}
    elif isinstance(obj, dict):
        state, meta = obj, {}
    else:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a state dict")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {str(path)!r}: entries {bad[:5]} are not tensors")
    if keys is not None:
        lacking = sorted(set(keys) - set(state))
        if lacking and not missing_ok:
            raise CheckpointError(f"checkpoint {str(path)!r} has no tensors {lacking[:5]}")
        state = {k: state[k] for k in keys if k in state}
    if stats is not None:
        for t in state.values():
            stats.add(t)
    return state, meta


def save_sharded(
    state: dict[str, torch.Tensor],
    folder: str | Path,
    *,
    max_shard_bytes: int = 1 << 30,
    metadata: dict[str, str] | None = None,
    prefix: str = "model",
) -> Path:
    """Write ``state`` as safetensors shards of at most ``max_shard_bytes`` plus a Hugging Face style index.

    Tensors keep their order; each shard is written under a temporary name and renamed,
    and the index (``<prefix>.safetensors.index.json``) is written last, so a reader
    never sees an index naming a missing or partial shard. Returns the index path.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups, start=1):
        file = f"{prefix}-{i:05d}-of-{len(groups):05d}.safetensors"
        tmp = folder / f".{file}.tmp"
        save_file({n: state[n].contiguous() for n in names}, str(tmp), metadata=metadata)
        tmp.replace(folder / file)
        weight_map.update({n: file for n in names})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = folder / f"{prefix}.safetensors.index.json"
    tmp = folder / f".{index.name}.tmp"
    tmp.write_text(
        json.dumps({"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}, indent=1)
    )
    tmp.replace(index)
    return index
