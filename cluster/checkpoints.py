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

Training-run folders (Hugging Face Trainer, Lightning, ...) are searched one level
down: a subfolder (``checkpoint-100/``, ``step-5/``, ``global_step7/``,
``epoch=1-step=300/``) is a checkpoint when it holds ``model.safetensors.index.json``,
``model.safetensors``, one ``*.index.json`` or exactly one weights file; optimizer,
scheduler, RNG and argument files are never checkpoints. :func:`checkpoint_info`
gives a checkpoint's run-relative name, training step and learning rate (from
``trainer_state.json``, the name, or the safetensors metadata).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cluster.errors import ProbeError

__all__ = [
    "CheckpointError", "expand_checkpoints", "file_sha256", "checkpoint_sha256", "load_checkpoint",
    "is_index", "save_sharded", "ReadStats", "CHECKPOINT_SUFFIXES", "safetensors_header", "shard_files",
    "SAFETENSORS_ITEMSIZE", "CheckpointInfo", "checkpoint_info", "checkpoint_entries", "is_auxiliary", "parse_step",
    "CONFIG_FILE", "TRAINER_STATE", "CANONICAL_WEIGHTS", "hashed_files", "training_metadata",
]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
CONFIG_FILE = "config.json"  # a Hugging Face model's configuration, beside its weights (hashed with them)
TRAINER_STATE = "trainer_state.json"  # the Trainer's state in a checkpoint folder: global_step, log_history
# Names a save_pretrained / Trainer checkpoint folder gives its weights; such a folder is one checkpoint.
CANONICAL_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                     "pytorch_model.bin")
# Training-state files beside the weights: never checkpoints themselves (optimizer.pt, scheduler.pt,
# rng_state.pth, rng_state_0.pth, training_args.bin, scaler.pt, DeepSpeed *optim_states.pt, ...).
_AUXILIARY = re.compile(
    r"^(optimizer|scheduler|lr_scheduler|scaler|rng_state|random_states|training_args)([._-].*)?$|optim_states",
    re.IGNORECASE,
)
_MARKERS = (TRAINER_STATE, "training_args.bin")  # the Trainer's own files in a checkpoint folder
_STEP_PATTERNS = (
    re.compile(r"(?:^|[^a-z0-9])step=(\d+)", re.IGNORECASE),  # Lightning: epoch=1-step=300
    re.compile(r"global_step[-_]?(\d+)", re.IGNORECASE),  # DeepSpeed: global_step700
    re.compile(r"(?:^|[^a-z0-9])(?:checkpoint|ckpt|step|iter)[-_]?(\d+)(?![0-9])", re.IGNORECASE),
)


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


class CheckpointError(ProbeError, ValueError):
    """A checkpoint that cannot be used; the message names the file (and tensor) at fault."""

    category = "bad_checkpoint"


def is_auxiliary(path: str | Path) -> bool:
    """Whether ``path`` names a training-state file that is never a checkpoint: optimizer,
    scheduler, RNG state, training arguments (``optimizer.pt``, ``scheduler.pt``,
    ``rng_state_0.pth``, ``training_args.bin``, ...) or a JSON file other than an index."""
    name = Path(path).name
    return bool(_AUXILIARY.search(name)) or (name.endswith(".json") and not is_index(name))


def _weight_files(files: list[Path]) -> list[Path]:
    """The checkpoint files among ``files`` (one folder's): weights and indexes, without
    training-state files and without the shards an index names."""
    found = [f for f in files if (f.suffix in CHECKPOINT_SUFFIXES or is_index(f)) and not is_auxiliary(f)]
    parts: set[Path] = set()
    for f in found:
        if is_index(f):
            try:
                parts.update(shard_files(f))
            except CheckpointError:
                pass  # a bad index is listed and fails when loaded, naming its fault
    return [f for f in found if f not in parts]


def _files(folder: Path) -> list[Path]:
    try:
        return [f for f in folder.iterdir() if f.is_file()]
    except OSError:  # vanished or unreadable while listed
        return []


def _folder_checkpoint(folder: Path, files: list[Path] | None = None) -> Path | None:
    """The one checkpoint of a checkpoint folder: ``model.safetensors.index.json``, else
    ``model.safetensors``, else its only index, else its only weights file; None when it
    holds none or several."""
    files = _files(folder) if files is None else files
    names = {f.name: f for f in files}
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if name in names:
            return names[name]
    for suffix in INDEX_SUFFIXES:
        indexes = [f for f in files if f.name.endswith(suffix)]
        if len(indexes) == 1:
            return indexes[0]
    weights = _weight_files(files)
    return weights[0] if len(weights) == 1 else None


def _skipped_folder(folder: Path) -> bool:
    """Folders never searched: hidden ones and a Trainer's ``tmp-checkpoint-N`` being written."""
    return folder.name.startswith((".", "tmp-checkpoint"))


def _expand_folder(folder: Path) -> list[Path]:
    """Checkpoints of a folder: its weights files and indexes (not training-state files, not the
    shards an index names) and the checkpoint of each subfolder, one level down."""
    found = _weight_files(_files(folder))
    try:
        subfolders = [d for d in folder.iterdir() if d.is_dir() and not _skipped_folder(d)]
    except OSError:
        subfolders = []
    for sub in subfolders:
        ckpt = _folder_checkpoint(sub)
        if ckpt is not None:
            found.append(ckpt)
    return found


def _nothing_found(entry: str, folder: Path) -> str:
    """Why a folder gave no checkpoint, in one line."""
    files = _files(folder)
    aux = sorted(f.name for f in files if is_auxiliary(f) and not f.name.endswith(".json"))
    try:
        subs = [d for d in folder.iterdir() if d.is_dir() and not _skipped_folder(d)]
    except OSError:
        subs = []
    for sub in subs:
        aux += sorted(f"{sub.name}/{f.name}" for f in _files(sub) if is_auxiliary(f) and not f.name.endswith(".json"))
    looked = ("model.safetensors.index.json, model.safetensors, a *.safetensors.index.json or one "
              ".safetensors/.pt/.pth/.bin weights file, in the folder and in its subfolders")
    found = (f"found only optimizer/scheduler/RNG/argument files ({', '.join(aux[:4])}{', ...' if len(aux) > 4 else ''})"
             if aux else f"found {len(files)} other file(s) and {len(subs)} subfolder(s) without one")
    return (f"checkpoint entry {entry!r} matches no file: folder {str(folder)!r} holds no checkpoint "
            f"(looked for {looked}); {found}")


def checkpoint_entries(entries: tuple[str, ...] | list[str], *, missing_ok: bool = False) -> dict[str, str]:
    """Each checkpoint of ``entries`` (files, globs, folders) with the entry it came from,
    in order: entries in turn, each one's checkpoints naturally sorted, duplicates dropped.

    A folder contributes its weights files and indexes and its subfolders' checkpoints,
    one level down (see :func:`expand_checkpoints`); a glob
    contributes the files it matches, except training-state files, and the checkpoints
    of the folders it matches.

    Raises:
        CheckpointError: for an entry that matches nothing, in one line naming it and
            what was looked for (unless ``missing_ok``: such an entry is skipped).
    """
    found: dict[str, str] = {}
    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            matches = [str(f) for f in _expand_folder(p)]
            error = None if matches else _nothing_found(entry, p)
        elif any(ch in entry for ch in "*?["):
            matches = []
            for m in glob.glob(entry):
                mp = Path(m)
                if mp.is_dir():
                    matches += [str(f) for f in _expand_folder(mp)]
                elif not is_auxiliary(mp):
                    matches.append(m)
            error = f"checkpoint entry {entry!r} matches no file; check the path, glob or folder"
        elif p.is_file():
            matches, error = [str(p)], None
        else:
            matches, error = [], f"checkpoint entry {entry!r} matches no file; check the path, glob or folder"
        if not matches:
            if missing_ok:
                continue
            raise CheckpointError(error)
        for m in sorted(matches, key=_natural_key):
            found.setdefault(m, entry)
    return found


def expand_checkpoints(entries: tuple[str, ...] | list[str]) -> list[str]:
    """Expand files, globs and folders into a sorted, de-duplicated list of checkpoint files
    (see :func:`checkpoint_entries`): folders give their weights files and indexes (not the
    shards an index names, not optimizer or other training-state files) and the checkpoints
    of their subfolders (``run/checkpoint-100/model.safetensors``).

    Raises:
        CheckpointError: for an entry that matches nothing.
    """
    return list(checkpoint_entries(entries))


# --- what a checkpoint is in its run: name, step, learning rate ------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's place in its training run.

    Attributes:
        name: run-relative name: the checkpoint folder's name (``checkpoint-200``) for the
            weights of a checkpoint folder, else the file name (``step-3.safetensors``).
        step: the training step (``trainer_state.json``'s ``global_step``, else the name,
            else the safetensors metadata ``step``), or None.
        lr: the learning rate (``trainer_state.json``'s ``log_history``, else the
            safetensors metadata ``lr``), or None.
    """

    name: str
    step: int | None = None
    lr: float | None = None


def parse_step(name: str) -> int | None:
    """The training step a file or folder name carries: ``checkpoint-N``, ``step-N``, ``step_N``,
    ``stepN``, ``global_stepN``, ``ckpt-N``, ``iter_N`` or Lightning's ``epoch=E-step=S``; else None."""
    for pattern in _STEP_PATTERNS:
        m = pattern.search(name)
        if m:
            return int(m.group(1))
    return None


def _number(value, cast):
    try:
        x = cast(float(value))
    except (TypeError, ValueError, OverflowError):
        return None
    return x if isinstance(x, int) or math.isfinite(x) else None


def _trainer_state(folder: Path) -> tuple[int | None, float | None]:
    """``(global_step, learning rate)`` from a folder's ``trainer_state.json``: the rate of the last
    ``log_history`` entry with a ``learning_rate`` at a step ≤ ``global_step``."""
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None, None
    if not isinstance(state, dict):
        return None, None
    step = _number(state.get("global_step"), int)
    lr = None
    history = state.get("log_history")
    for item in history if isinstance(history, list) else []:
        if not isinstance(item, dict) or "learning_rate" not in item:
            continue
        at = _number(item.get("step"), int)
        if step is not None and at is not None and at > step:
            continue
        rate = _number(item["learning_rate"], float)
        lr = rate if rate is not None else lr
    return step, lr


def _header_metadata(path: Path) -> dict:
    """Metadata readable without loading tensors: a safetensors header's ``__metadata__``, or an
    index's ``metadata`` over its first shard's; {} for PyTorch files or anything unreadable."""
    try:
        if is_index(path):
            weight_map, meta = _read_index(path)
            first = shard_files(path, weight_map)[0]
            return {**(_header_metadata(first) if first.suffix == ".safetensors" else {}), **meta}
        if path.suffix == ".safetensors":
            meta = safetensors_header(path)[0].get("__metadata__")
            return meta if isinstance(meta, dict) else {}
    except (OSError, CheckpointError, IndexError):
        pass
    return {}


def _named_by_folder(path: Path, entry: str | None) -> bool:
    """Whether a checkpoint is named by its folder: it is its folder's one checkpoint, and the
    folder is one as a trainer saves it (the weights have a save_pretrained name, the folder holds
    the Trainer's state or its name is a step: ``checkpoint-100``, ``epoch=1-step=300``), a
    subfolder of a folder entry, or a folder a glob entry matched."""
    folder = path.parent
    candidate = (path.name in CANONICAL_WEIGHTS or parse_step(folder.name) is not None
                 or any((folder / m).is_file() for m in _MARKERS))
    if not candidate and entry is not None:
        e = Path(entry)
        if e.is_dir():
            candidate = folder.resolve() != e.resolve() and folder.parent.resolve() == e.resolve()
        elif any(ch in entry for ch in "*?["):
            candidate = fnmatch.fnmatchcase(os.path.normpath(str(folder)), os.path.normpath(entry))
    # listed only for a candidate: a flat folder of many checkpoints is not listed once per checkpoint
    return candidate and _folder_checkpoint(folder) == path


def checkpoint_info(path: str | Path, entry: str | None = None) -> CheckpointInfo:
    """The run-relative name, step and learning rate of a checkpoint (see :class:`CheckpointInfo`).

    Args:
        path: a checkpoint file or index, as :func:`expand_checkpoints` lists it.
        entry: the ``model.checkpoints`` entry it came from (a folder's subfolder
            checkpoints are named by their folder); None judges by the folder alone.

    Reads only small files (``trainer_state.json``, a safetensors header, an index) and
    never raises: what cannot be read is None.
    """
    p = Path(path)
    by_folder = p.is_file() and _named_by_folder(p, entry)
    name = p.parent.name if by_folder else (p.name or str(path))
    step = lr = None
    if by_folder:
        step, lr = _trainer_state(p.parent)
    if step is None:
        step = parse_step(name)
    if step is None and by_folder:  # a folder named otherwise (final/, seed0/): the file's name
        step = parse_step(p.name)
    if (step is None or lr is None) and p.is_file():
        meta = _header_metadata(p)
        step = _number(meta.get("step"), int) if step is None else step
        lr = _number(meta.get("lr"), float) if lr is None else lr
    return CheckpointInfo(name, step, lr)


def training_metadata(path: str | Path) -> dict[str, Any]:
    """``step`` and ``lr`` from the ``trainer_state.json`` of a checkpoint folder whose checkpoint
    ``path`` is (what :func:`load_checkpoint` adds to metadata that lacks them); {} otherwise."""
    p = Path(path)
    if not (p.parent / TRAINER_STATE).is_file() or not _named_by_folder(p, None):
        return {}
    step, lr = _trainer_state(p.parent)
    return {k: v for k, v in (("step", step), ("lr", lr)) if v is not None}


def file_sha256(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


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
                raise CheckpointError(f"checkpoint index {str(path)!r} names shard {shard.name!r}, which does not exist")
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


def _load(path: Path, keys, stats: ReadStats | None, missing_ok: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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
