"""Probe datasets bundled with the installed packages (no download at run time)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["digits", "digits_tensors"]


def digits_tensors(*, split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits (1,797 images, 10 classes) as ``(x, y)`` tensors.

    Pixels are scaled to [0, 1] (the raw range is 0..16) and flattened to 64
    features. The train/test split is a fixed permutation drawn from ``seed``.

    Raises:
        ValueError: for a ``split`` other than ``"train"``, ``"test"`` or ``"all"``.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got split={split!r}")
    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    if split == "all":
        return x, y
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    idx = order[n_test:] if split == "train" else order[:n_test]
    idx_t = torch.as_tensor(idx)
    return x[idx_t], y[idx_t]


def digits(*, split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """The digits data as a map-style dataset of ``(features[64], label)`` pairs."""
    return TensorDataset(*digits_tensors(split=split, test_fraction=test_fraction, seed=seed))
