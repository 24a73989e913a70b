"""Bundled probe data (cluster/data.py): the synthetic token sequences of a fixed Markov chain."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.utils.data import default_collate

from cluster.data import IGNORE_INDEX, PAD_ID, bigram_chain, tokens, tokens_tensors


def test_targets_are_the_next_tokens_and_draws_are_seeded():
    ids, targets = tokens_tensors(num_sequences=5, seq_len=7, vocab=11, seed=2)
    assert ids.shape == targets.shape == (5, 7) and ids.dtype == targets.dtype == torch.long
    assert torch.equal(ids[:, 1:], targets[:, :-1])  # each target is the next input
    assert ids.min() >= 0 and max(ids.max(), targets.max()) < 11
    again, _ = tokens_tensors(num_sequences=5, seq_len=7, vocab=11, seed=2)
    other, _ = tokens_tensors(num_sequences=5, seq_len=7, vocab=11, seed=3)
    assert torch.equal(ids, again) and not torch.equal(ids, other)


def test_transitions_follow_the_chain_and_it_has_something_to_learn():
    vocab = 6
    chain = bigram_chain(vocab, seed=0)
    assert torch.allclose(chain.sum(1), torch.ones(vocab, dtype=torch.float64))
    entropy_rate = -(chain * chain.log()).sum(1).mean().item()  # uniform weighting of rows: a rough figure
    assert entropy_rate < 0.8 * math.log(vocab)  # well below a uniform next token
    ids, targets = tokens_tensors(num_sequences=400, seq_len=50, vocab=vocab, seed=1)
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    counts.index_put_(
        (ids.reshape(-1), targets.reshape(-1)), torch.ones(ids.numel(), dtype=torch.float64), accumulate=True
    )
    visits = counts.sum(1, keepdim=True)
    freq = counts / visits
    std = (chain * (1 - chain) / visits).sqrt()  # binomial standard error per entry
    assert ((freq - chain).abs() <= 5 * std + 1e-12).all()


def test_min_len_pads_on_the_right_with_ignored_targets():
    ids, targets = tokens_tensors(num_sequences=200, seq_len=8, vocab=9, min_len=3, seed=4)
    lengths = (targets != IGNORE_INDEX).sum(1)
    assert lengths.min() >= 3 and lengths.max() == 8 and len(set(lengths.tolist())) == 6  # every length 3..8
    kept = torch.arange(8) < lengths[:, None]
    assert torch.equal(targets != IGNORE_INDEX, kept)  # a prefix of each sequence is kept
    assert (ids[~kept] == PAD_ID).all()
    full_ids, full_targets = tokens_tensors(num_sequences=200, seq_len=8, vocab=9, seed=4)
    assert torch.equal(ids[kept], full_ids[kept]) and torch.equal(targets[kept], full_targets[kept])


def test_pair_and_dict_items_collate_into_batches():
    pairs = tokens(num_sequences=6, seq_len=4, vocab=5, min_len=2)
    dicts = tokens(num_sequences=6, seq_len=4, vocab=5, min_len=2, as_dict=True)
    x, y = default_collate([pairs[i] for i in range(3)])
    batch = default_collate([dicts[i] for i in range(3)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert torch.equal(batch["input_ids"], x) and torch.equal(batch["labels"], y)
    assert torch.equal(batch["attention_mask"], (y != IGNORE_INDEX).long())
    assert len(pairs) == len(dicts) == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_sequences": 0}, "num_sequences must be at least 1, got num_sequences=0"),
        ({"seq_len": 0}, "seq_len must be at least 1, got seq_len=0"),
        ({"vocab": 1}, "vocab must be at least 2, got vocab=1"),
        ({"seq_len": 4, "min_len": 5}, "min_len must be in [1, seq_len=4] or None, got min_len=5"),
        ({"min_len": 0}, "min_len must be in [1, seq_len=16] or None, got min_len=0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tokens(**kwargs)
