"""Probe datasets bundled with the installed packages (no download at run time)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["digits", "digits_tensors", "bigram_chain", "tokens", "tokens_tensors"]

PAD_ID = 0  # input id at padded positions (their targets are IGNORE_INDEX)
IGNORE_INDEX = -100  # as probe.batches: targets that no token-mean loss counts


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


def bigram_chain(vocab: int, *, seed: int = 0, sharpness: float = 2.0) -> torch.Tensor:
    """A fixed random Markov chain over ``vocab`` tokens: row ``i`` is ``P(next | i)``, ``(vocab, vocab)`` float64.

    Rows are ``softmax(sharpness · z)`` with standard normal ``z`` drawn from ``seed``,
    so each token has a few likely successors and the chain's entropy rate lies well
    below ``log(vocab)``: a model can learn something.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(vocab, vocab, generator=g, dtype=torch.float64), dim=1)


def tokens_tensors(
    *, num_sequences: int = 256, seq_len: int = 16, vocab: int = 16, seed: int = 0, chain_seed: int = 0,
    min_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token data from :func:`bigram_chain`: ``(ids, targets)``, each ``(num_sequences, seq_len)`` int64.

    Each sequence is ``seq_len + 1`` tokens (the first uniform, then the chain's
    transitions); ``ids`` are its first ``seq_len`` tokens and ``targets`` its last
    ``seq_len`` (the next token at every position). With ``min_len``, sequence
    ``i`` keeps a length drawn uniformly from ``[min_len, seq_len]``: beyond it ids
    are ``PAD_ID`` and targets ``IGNORE_INDEX`` (right padding, so a causal model's
    outputs at kept positions do not see the padding), and sequences hold unequal
    numbers of tokens. The samples are drawn from ``seed``, the chain from ``chain_seed``
    (two sets with different ``seed`` share the chain: a train and a test split).

    Raises:
        ValueError: for ``num_sequences < 1``, ``seq_len < 1``, ``vocab < 2`` or
            ``min_len`` outside ``[1, seq_len]``.
    """
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be at least 1, got num_sequences={num_sequences}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got seq_len={seq_len}")
    if vocab < 2:
        raise ValueError(f"vocab must be at least 2, got vocab={vocab}")
    if min_len is not None and not 1 <= min_len <= seq_len:
        raise ValueError(f"min_len must be in [1, seq_len={seq_len}] or None, got min_len={min_len}")
    chain = bigram_chain(vocab, seed=chain_seed)
    g = torch.Generator().manual_seed(seed)
    seq = torch.empty(num_sequences, seq_len + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, vocab, (num_sequences,), generator=g)
    for t in range(seq_len):
        seq[:, t + 1] = torch.multinomial(chain[seq[:, t]], 1, generator=g)[:, 0]
    ids, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
    if min_len is not None:
        lengths = torch.randint(min_len, seq_len + 1, (num_sequences, 1), generator=g)
        padded = torch.arange(seq_len) >= lengths  # (num_sequences, seq_len)
        ids[padded] = PAD_ID
        targets[padded] = IGNORE_INDEX
    return ids, targets


class _TokenDicts(Dataset):
    """Hugging Face style items: ``{"input_ids", "attention_mask", "labels"}``."""

    def __init__(self, ids: torch.Tensor, targets: torch.Tensor) -> None:
        self.ids, self.targets = ids, targets

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": (self.targets[i] != IGNORE_INDEX).long(),
                "labels": self.targets[i]}


def tokens(
    *, num_sequences: int = 256, seq_len: int = 16, vocab: int = 16, seed: int = 0, chain_seed: int = 0,
    min_len: int | None = None, as_dict: bool = False,
) -> Dataset:
    """:func:`tokens_tensors` as a map-style dataset: ``(ids[T], next_ids[T])`` pairs, or with
    ``as_dict`` dicts ``{"input_ids", "attention_mask", "labels"}`` (the model is then called
    with the first two as keywords; ``attention_mask`` is 1 at kept positions)."""
    ids, targets = tokens_tensors(num_sequences=num_sequences, seq_len=seq_len, vocab=vocab, seed=seed,
                                  chain_seed=chain_seed, min_len=min_len)
    return _TokenDicts(ids, targets) if as_dict else TensorDataset(ids, targets)
