"""Where checkpoints are: files, globs, folders and training runs' folders, and what each is called.

Training-run folders (Hugging Face Trainer, Lightning, ...) are searched one level
down: a subfolder (``checkpoint-100/``, ``step-5/``, ``global_step7/``,
``epoch=1-step=300/``) is a checkpoint when it holds ``model.safetensors.index.json``,
``model.safetensors``, one ``*.index.json`` or exactly one weights file; optimizer,
scheduler, RNG and argument files are never checkpoints. :func:`checkpoint_info`
gives a checkpoint's run-relative name, training step and learning rate (from
``trainer_state.json``, the name, or the safetensors metadata). Checkpoints of a
folder or glob are ordered naturally (``step-9`` before ``step-10``), which is the
order of a series.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.checkpoint_files import (
    CHECKPOINT_SUFFIXES,
    INDEX_SUFFIXES,
    CheckpointError,
    _natural_key,
    _read_index,
    is_index,
    safetensors_header,
    shard_files,
)

__all__ = [
    "CONFIG_FILE",
    "TRAINER_STATE",
    "CANONICAL_WEIGHTS",
    "is_auxiliary",
    "checkpoint_entries",
    "expand_checkpoints",
    "CheckpointInfo",
    "parse_step",
    "checkpoint_info",
    "training_metadata",
]


CONFIG_FILE = "config.json"  # a Hugging Face model's configuration, beside its weights (hashed with them)


TRAINER_STATE = "trainer_state.json"  # the Trainer's state in a checkpoint folder: global_step, log_history


# Names a save_pretrained / Trainer checkpoint folder gives its weights; such a folder is one checkpoint.
CANONICAL_WEIGHTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


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
    shards an index names) and the checkpoint of each subfolder, one level down. The weights
    save_pretrained writes (``model.safetensors``, ``pytorch_model.bin``, ...) count once, in the
    preferred format, when a folder holds the same model in two formats."""
    found = _weight_files(_files(folder))
    canonical = sorted((f for f in found if f.name in CANONICAL_WEIGHTS), key=lambda f: CANONICAL_WEIGHTS.index(f.name))
    found = [f for f in found if f.name not in CANONICAL_WEIGHTS or f == canonical[0]]
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
    looked = (
        "model.safetensors.index.json, model.safetensors, a *.safetensors.index.json or one "
        ".safetensors/.pt/.pth/.bin weights file, in the folder and in its subfolders"
    )
    found = (
        f"found only optimizer/scheduler/RNG/argument files ({', '.join(aux[:4])}{', ...' if len(aux) > 4 else ''})"
        if aux
        else f"found {len(files)} other file(s) and {len(subs)} subfolder(s) without one"
    )
    return (
        f"checkpoint entry {entry!r} matches no file: folder {str(folder)!r} holds no checkpoint "
        f"(looked for {looked}); {found}"
    )


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
    candidate = (
        path.name in CANONICAL_WEIGHTS
        or parse_step(folder.name) is not None
        or any((folder / m).is_file() for m in _MARKERS)
    )
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
