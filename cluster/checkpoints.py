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
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError", "expand_checkpoints", "file_sha256", "checkpoint_sha256", "load_checkpoint",
    "is_index", "save_sharded", "ReadStats", "CHECKPOINT_SUFFIXES", "safetensors_header", "shard_files",
    "SAFETENSORS_ITEMSIZE",
]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


def is_index(path: str | Path) -> bool:
    """Whether ``path`` names a sharded checkpoint's index."""
    return str(path).endswith(INDEX_SUFFIXES)


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _read_index(path: Path) -> tuple[dict[str, str], dict]:
    """The ``weight_map`` of an index (tensor name -> shard file name) and its ``metadata``."""
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint index {str(path)!r} is not readable JSON: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"checkpoint index {str(path)!r} has no 'weight_map' of tensor name -> shard file; "
            "write it as {\"weight_map\": {\"layer.weight\": \"model-00001-of-00002.safetensors\", ...}}"
        )
    for shard in set(weight_map.values()):
        if Path(shard).name != shard:
            raise CheckpointError(f"checkpoint index {str(path)!r} names shard {shard!r} outside its folder")
    return weight_map, index.get("metadata") or {}


def shard_files(path: str | Path, weight_map: dict[str, str] | None = None) -> list[Path]:
    """The shard files a sharded index names (beside it), in name order."""
    path = Path(path)
    weight_map = _read_index(path)[0] if weight_map is None else weight_map
    return [path.parent / s for s in sorted(set(weight_map.values()))]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file (and tensor) at fault."""


def expand_checkpoints(entries: tuple[str, ...] | list[str]) -> list[str]:
    """Expand files, globs and folders into a sorted, de-duplicated list of checkpoint files.

    Folders contribute their files with a checkpoint suffix and their sharded
    indexes, but not the shards an index names (non-recursive).

    Raises:
        CheckpointError: for an entry that matches nothing.
    """
    found: list[str] = []
    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            files = [f for f in p.iterdir() if f.is_file() and (f.suffix in CHECKPOINT_SUFFIXES or is_index(f))]
            parts: set[Path] = set()
            for f in files:
                if is_index(f):
                    try:
                        parts.update(shard_files(f))
                    except CheckpointError:
                        pass  # a bad index is listed and fails when loaded, naming its fault
            matches = sorted((str(f) for f in files if f not in parts), key=_natural_key)
        elif any(ch in entry for ch in "*?["):
            matches = sorted(glob.glob(entry), key=_natural_key)
        elif p.is_file():
            matches = [str(p)]
        else:
            matches = []
        if not matches:
            raise CheckpointError(f"checkpoint entry {entry!r} matches no file; check the path, glob or folder")
        found.extend(matches)
    return list(dict.fromkeys(found))


def file_sha256(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_sha256(path: str | Path) -> str:
    """Content hash of a checkpoint: the file's SHA-256, or for a sharded index the
    SHA-256 over the index bytes and each shard's name and SHA-256.

    Raises:
        CheckpointError: for an index whose shard is missing, naming both.
    """
    path = Path(path)
    if not is_index(path):
        return file_sha256(path)
    h = hashlib.sha256(path.read_bytes())
    for shard in shard_files(path):
        if not shard.is_file():
            raise CheckpointError(f"checkpoint index {str(path)!r} names shard {shard.name!r}, which does not exist")
        h.update(f"\0{shard.name}\0{file_sha256(shard)}".encode())
    return h.hexdigest()


class ReadStats:
    """What a load read: files opened, tensors materialized and their bytes (for tests and estimates)."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self.tensors = 0
        self.bytes = 0

    def add(self, t: torch.Tensor) -> None:
        self.tensors += 1
        self.bytes += t.numel() * t.element_size()


SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                        "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON) and the size
    of the data that follows it, without reading tensors.

    Raises:
        CheckpointError: naming the file when the header is missing, implausible or not JSON.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"checkpoint {str(path)!r} is not a valid safetensors file: shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > min(100 << 20, size):
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a valid safetensors file: header length {length} exceeds the file"
            )
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} is not a valid safetensors file: unreadable header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a valid safetensors file: the header is not a JSON object")
    return header, size - 8 - length


def _check_safetensors_layout(path: Path) -> None:
    """Refuse a header that lies: data past the end of the file, or a byte span that does not match
    the declared shape and dtype, naming the tensor (before any tensor is mapped)."""
    header, body = safetensors_header(path)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        bad = f"checkpoint {str(path)!r} is not a valid safetensors file: tensor {name!r}"
        try:
            dtype, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{bad} has no dtype, shape and data_offsets in the header") from None
        numel = math.prod(int(d) for d in shape)
        if dtype in SAFETENSORS_ITEMSIZE and end - start != numel * SAFETENSORS_ITEMSIZE[dtype]:
            raise CheckpointError(
                f"{bad} declares shape {shape} of {dtype} ({numel * SAFETENSORS_ITEMSIZE[dtype]} bytes) but its "
                f"data_offsets span {end - start} bytes"
            )
        if not 0 <= start <= end <= body:
            raise CheckpointError(
                f"{bad} has data_offsets [{start}, {end}] past the end of the data ({body} bytes): "
                "the file is truncated or its header lies"
            )


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
        tensors, shard_meta = load_checkpoint(shard, keys=names, stats=stats, missing_ok=True)
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
        keys: load only these tensors (a pipeline stage's parameters). Safetensors files
            are memory-mapped and only the named tensors are read; a sharded index
            opens only the shards that hold them. PyTorch files are read whole.
        stats: records the files opened and the tensors and bytes read.
        missing_ok: with ``keys``, skip names the file lacks instead of failing.

    Raises:
        CheckpointError: naming the file when it is missing, truncated, corrupt, lacks
            a requested tensor, or is a pickle that would need code execution to load.
    """
    path = Path(path)
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


def save_sharded(state: dict[str, torch.Tensor], folder: str | Path, *, max_shard_bytes: int = 1 << 30,
                 metadata: dict[str, str] | None = None, prefix: str = "model") -> Path:
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
    tmp.write_text(json.dumps({"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}, indent=1))
    tmp.replace(index)
    return index
