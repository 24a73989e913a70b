"""Small digits-MLP checkpoints for the audit tests: one safetensors file per step."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from probe.models import digits_mlp


def save_step(folder: Path, step: int, *, hidden: int) -> Path:
    """``folder/step-{step}.safetensors``: a ``digits_mlp(hidden=hidden)`` seeded by ``step``,
    with the learning rate (0.5) and the step in its metadata."""
    with torch.random.fork_rng():
        torch.manual_seed(step)
        model = digits_mlp(hidden=hidden)
    path = folder / f"step-{step}.safetensors"
    save_file(model.state_dict(), str(path), metadata={"lr": "0.5", "step": str(step)})
    return path
