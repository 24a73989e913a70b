"""A GPT-style decoder as a sequence of stages: embedding, blocks, head.

``gpt(...)`` returns an ``nn.Sequential`` whose top-level children are the stages
(:class:`Embedding`, ``layers`` × :class:`Block`, :class:`Head`), each a function of
one tensor: token ids ``(B, T)`` → ``(B, T, d)`` → … → logits ``(B, T, V)``. A
pipeline splits the children into contiguous ranges (see
:mod:`cluster.pipeline`); in one process it is an ordinary module.

Attention runs ``F.scaled_dot_product_attention`` under the MATH backend: the fused
CPU/GPU kernels (flash, memory-efficient) have no double backward, which the exact
Hessian-vector product needs (``derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``).

:func:`lm_loss` is the token-level mean cross-entropy (targets ``-100`` ignored);
with ``examples`` weighted by their token counts the Hessian is that of the mean
over all probe tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["gpt", "Embedding", "Block", "Head", "lm_loss", "gpt_num_parameters"]

IGNORE_INDEX = -100


class Embedding(nn.Module):
    """Token plus learned position embeddings."""

    def __init__(self, vocab: int, dim: int, max_len: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[-1], device=ids.device)
        return self.tokens(ids) + self.positions(positions)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal multi-head self-attention and a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, mlp_ratio * dim)
        self.out = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        with sdpa_kernel(SDPBackend.MATH):  # the only backend with a double backward
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Head(nn.Module):
    """Final LayerNorm and the vocabulary projection."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.lm = nn.Linear(dim, vocab, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.lm(self.ln(x))


def gpt(*, vocab: int = 64, dim: int = 32, layers: int = 2, heads: int = 4, max_len: int = 32) -> nn.Sequential:
    """A GPT-style model as ``nn.Sequential(Embedding, Block × layers, Head)``.

    Initialization follows GPT-2 (normal, std 0.02; residual projections scaled by
    1/√(2·layers)), drawn from torch's global generator.
    """
    model = nn.Sequential(Embedding(vocab, dim, max_len), *[Block(dim, heads) for _ in range(layers)], Head(dim, vocab))
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
            nn.init.normal_(p, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    return model


def gpt_num_parameters(*, vocab: int, dim: int, layers: int, max_len: int, mlp_ratio: int = 4) -> int:
    """Parameter count of :func:`gpt` without building it (for size estimates)."""
    block = (
        2 * 2 * dim
        + (dim * 3 * dim + 3 * dim)
        + (dim * dim + dim)
        + (dim * mlp_ratio * dim + mlp_ratio * dim)
        + (mlp_ratio * dim * dim + dim)
    )
    return vocab * dim + max_len * dim + layers * block + 2 * dim + dim * vocab


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the tokens whose target is not ``-100``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
