"""Checkpoint files as files: suffixes, sharded indexes, safetensors headers read without
loading a tensor (and refused when they lie), file hashes and read statistics.

The lowest layer of checkpoint handling: :mod:`cluster.run_folders` finds checkpoints
in folders and training runs, :mod:`cluster.checkpoints` hashes and loads them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path

import torch

from cluster.errors import ProbeError

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "INDEX_SUFFIXES",
    "CheckpointError",
    "is_index",
    "shard_files",
    "file_sha256",
    "ReadStats",
    "SAFETENSORS_ITEMSIZE",
    "safetensors_header",
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
            'write it as {"weight_map": {"layer.weight": "model-00001-of-00002.safetensors", ...}}'
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


class CheckpointError(ProbeError, ValueError):
    """A checkpoint that cannot be used; the message names the file (and tensor) at fault."""

    category = "bad_checkpoint"


def file_sha256(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
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


SAFETENSORS_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


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
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a valid safetensors file: shorter than its 8-byte header length"
            )
        (length,) = struct.unpack("<Q", head)
        if length > min(100 << 20, size):
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a valid safetensors file: header length {length} exceeds the file"
            )
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a valid safetensors file: unreadable header ({exc})"
            ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a valid safetensors file: the header is not a JSON object"
        )
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
