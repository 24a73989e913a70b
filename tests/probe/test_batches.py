"""Batch layouts, model calls and weighting (probe/batches.py)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from probe.batches import (
    IGNORE_INDEX,
    call_model,
    outputs_of,
    prepare_batches,
    split_batch,
    token_count,
    weigh_batches,
)

CPU = torch.device("cpu")


def lm_targets() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three (ids, targets) batches of 2, 3 and 1 sequences of length 4, with 5, 12 and 0 counted tokens."""
    t0 = torch.tensor([[1, 2, -100, -100], [3, 4, 5, -100]])  # 5 tokens
    t1 = torch.ones(3, 4, dtype=torch.long)  # 12 tokens
    t2 = torch.full((1, 4), -100)  # none
    return [(torch.zeros_like(t), t) for t in (t0, t1, t2)]


# --- layouts ---------------------------------------------------------------------------------


def test_split_batch_reads_pairs_lists_and_labels_dicts():
    x, y = torch.zeros(2, 3), torch.ones(2, dtype=torch.long)
    assert split_batch((x, y)) == (x, y)
    assert split_batch([x, y]) == (x, y)  # default_collate turns (x, y) items into a list
    inputs, targets = split_batch({"input_ids": x, "attention_mask": y, "labels": y})
    assert set(inputs) == {"input_ids", "attention_mask"} and targets is y


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (
            {"input_ids": torch.zeros(2)},
            "a dict batch must hold its targets under 'labels', got keys ['input_ids']; "
            "add a 'labels' entry or pass (inputs, targets) pairs",
        ),
        (
            (torch.zeros(2), torch.zeros(2), torch.zeros(2)),
            "each batch must be an (inputs, targets) pair or a dict with a 'labels' entry, got a tuple of length 3",
        ),
        (torch.zeros(2), "each batch must be an (inputs, targets) pair or a dict with a 'labels' entry, got Tensor"),
    ],
    ids=["dict-without-labels", "triple", "tensor"],
)
def test_split_batch_rejects_other_layouts(batch, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        split_batch(batch)


class Keywords(nn.Module):
    """A model called with keywords that returns an object with ``.logits`` (Hugging Face style)."""

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=input_ids * 2.0, loss=None)


def test_call_model_passes_dict_inputs_as_keywords_and_reads_logits():
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(call_model(Keywords(), {"input_ids": x, "attention_mask": x}), 2 * x)
    assert torch.equal(call_model(nn.Identity(), x), x)


def test_call_model_with_a_state_leaves_the_module_alone():
    lin = nn.Linear(3, 1, bias=False)
    state = {"weight": torch.ones(1, 3)}
    x = torch.arange(3.0).reshape(1, 3)
    assert call_model(lin, x, state).item() == 3.0
    assert not torch.equal(lin.weight.detach(), state["weight"])


def test_outputs_of_tensors_logits_objects_mappings_and_others():
    t = torch.zeros(2)
    assert outputs_of(t) is t
    assert outputs_of(SimpleNamespace(logits=t)) is t
    assert outputs_of({"logits": t, "loss": None}) is t
    pair = (t, t)
    assert outputs_of(pair) is pair  # anything else goes to the loss as returned


# --- counting and weighting ------------------------------------------------------------------


def test_token_count_counts_targets_not_ignored():
    assert token_count(torch.tensor([[1, -100, 3], [-100, -100, 0]])) == 3
    assert token_count(torch.tensor([1, 7, 7]), ignore_index=7) == 1


@pytest.mark.parametrize(
    ("targets", "got"), [(torch.zeros(3), "a torch.float32 tensor"), ({"a": torch.zeros(3)}, "dict")]
)
def test_token_count_needs_integer_tensors(targets, got):
    message = (
        f"weighting='tokens' counts integer targets (token ids, -100 where ignored), got {got}; "
        f"use weighting='examples' for other targets"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        token_count(targets)


def test_token_weights_are_token_shares_and_empty_batches_are_dropped():
    w = weigh_batches(lm_targets(), torch.float64, CPU, weighting="tokens")
    assert w.tokens == [5, 12] and w.total == 17 and w.weighting == "tokens"
    assert w.weights == [5 / 17, 12 / 17]
    assert w.sizes == [2, 3] and len(w.batches) == 2  # the batch without tokens is gone
    sharded = weigh_batches(lm_targets(), torch.float64, CPU, weighting="tokens", total_tokens=34)
    assert sharded.weights == [5 / 34, 12 / 34]


def test_example_weights_are_unchanged_by_ignored_targets():
    w = weigh_batches(lm_targets(), torch.float64, CPU)
    assert w.weights == [2 / 6, 3 / 6, 1 / 6] and w.tokens is None and w.total == 6
    moved, sizes, weights = prepare_batches(lm_targets(), torch.float64, CPU, 12)
    assert sizes == [2, 3, 1] and weights == [2 / 12, 3 / 12, 1 / 12] and len(moved) == 3


def test_labels_dicts_become_pairs_on_the_device_in_the_dtype():
    batch = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "scale": torch.ones(2),
        "labels": torch.ones(2, 4).long(),
    }
    ((inputs, targets),) = weigh_batches([batch], torch.float64, CPU, weighting="tokens").batches
    assert set(inputs) == {"input_ids", "scale"} and inputs["scale"].dtype == torch.float64
    assert targets.dtype == torch.long


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weighting": "sequences"}, "weighting must be one of ('examples', 'tokens'), got weighting='sequences'"),
        (
            {"total_tokens": 10},
            "total_tokens=10 is given with weighting='examples'; pass weighting='tokens', "
            "or total_examples for example weighting",
        ),
        (
            {"weighting": "tokens", "total_examples": 10},
            "total_examples=10 is given with weighting='tokens'; pass total_tokens, the token count over every shard",
        ),
        ({"weighting": "tokens", "total_tokens": 0}, "total_tokens must be positive, got 0"),
    ],
    ids=["unknown", "tokens-total-with-examples", "examples-total-with-tokens", "non-positive"],
)
def test_weighting_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        weigh_batches(lm_targets(), torch.float64, CPU, **kwargs)


def test_a_probe_set_without_tokens_is_rejected_unless_another_shard_has_them():
    empty = [lm_targets()[2]]
    message = (
        "the probe set has no target tokens: every target equals ignore_index=-100; "
        "check the labels or pass ignore_index"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        weigh_batches(empty, torch.float64, CPU, weighting="tokens")
    shard = weigh_batches(empty, torch.float64, CPU, weighting="tokens", total_tokens=17)
    assert shard.batches == [] and shard.weights == []
    assert IGNORE_INDEX == -100
