"""Finding, hashing and safely loading checkpoints.

Formats, in order of preference:

- ``.safetensors``: read with the ``safetensors`` library (no code execution);
- anything else is treated as a PyTorch file and read only with
  ``torch.load(..., weights_only=True)``, which refuses pickles that would build
  arbitrary objects. Untrusted pickles are never executed.

A PyTorch file may hold a bare state dict or a dict with ``"state_dict"`` /
``"model"`` plus metadata (``"lr"``, ``"step"``, ...); safetensors metadata
(string pairs in the header) is returned as the metadata.
"""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "expand_checkpoints", "file_sha256", "load_checkpoint", "CHECKPOINT_SUFFIXES"]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file (and tensor) at fault."""


def expand_checkpoints(entries: tuple[str, ...] | list[str]) -> list[str]:
    """Expand files, globs and folders into a sorted, de-duplicated list of checkpoint files.

    Folders contribute their files with a checkpoint suffix (non-recursive).

    Raises:
        CheckpointError: for an entry that matches nothing.
    """
    found: list[str] = []
    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            matches = sorted(str(f) for f in p.iterdir() if f.suffix in CHECKPOINT_SUFFIXES and f.is_file())
        elif any(ch in entry for ch in "*?["):
            matches = sorted(glob.glob(entry))
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


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(state_dict, metadata)`` from a checkpoint file without executing code.

    Raises:
        CheckpointError: naming the file when it is missing, truncated, corrupt, or a
            pickle that would need code execution to load.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                meta = dict(f.metadata() or {})
        except Exception as exc:  # safetensors raises several types for bad headers
            raise CheckpointError(f"checkpoint {str(path)!r} is not a valid safetensors file: {exc}") from exc
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
    return state, meta
