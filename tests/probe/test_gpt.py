"""Exact curvature through the GPT model of probe/gpt.py: attention's double backward and token weighting.

The reference is the dense Hessian of the token-mean loss over all probe tokens,
formed in float64 by ``torch.func.jacfwd(torch.func.grad(f))`` (forward over
reverse). Not ``torch.func.hessian``, which is ``jacfwd(jacrev(f))``: in torch 2.13
on CPU it returns wrong entries through an affine LayerNorm whose input depends on
the parameters (0.4% relative, Frobenius, on this GPT; see the last test, and
pytorch/functorch#534 on LayerNorm's backward batching rule).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd
from torch.nn.attention import SDPBackend, sdpa_kernel

from cluster.data import tokens_tensors
from probe.gpt import gpt, lm_loss
from probe.hessian import HessianOperator

CONFIG = {"vocab": 16, "dim": 8, "layers": 2, "heads": 2, "max_len": 6}
SIZES = (3, 5)  # sequences per batch
TOL = 1e-10


def flat_function(model: nn.Module, loss):
    """``(f, θ0)``: ``f(θ)`` = ``loss(θ)`` with the model's parameters replaced by the flat ``θ``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    numels = [p.numel() for p in model.parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(theta):
        return loss({n: c.view(s) for n, c, s in zip(names, torch.split(theta, numels), shapes, strict=True)})

    return f, theta0


@pytest.fixture(scope="module")
def lm_case():
    """A float64 GPT (2,064 parameters) after 20 Adam steps on 8 Markov-chain sequences of 6 tokens
    with right padding (-100 targets), and the dense Hessian of the mean over all counted tokens."""
    ids, targets = tokens_tensors(num_sequences=8, seq_len=6, vocab=16, min_len=2, seed=3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = gpt(**CONFIG).to(torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        lm_loss(model(ids), targets).backward()
        opt.step()
    model.eval()
    f, theta0 = flat_function(model, lambda params: lm_loss(functional_call(model, params, (ids,)), targets))
    dense = jacfwd(grad(f))(theta0).detach()
    a = SIZES[0]
    return model, [(ids[:a], targets[:a]), (ids[a:], targets[a:])], dense


def test_gpt_hvp_with_token_weighting_matches_the_dense_hessian(lm_case, relative_error):
    model, batches, dense = lm_case
    H = HessianOperator(model, lm_loss, batches, weighting="tokens")
    tokens = H.batch_tokens
    assert H.dim == dense.shape[0] == 2064 and sum(tokens) == H.total_tokens < 48  # some targets are -100
    assert tokens[0] / tokens[1] != SIZES[0] / SIZES[1]  # token and example weights differ
    assert (dense - dense.T).abs().max() / dense.abs().max() < 1e-13
    V = torch.randn(H.dim, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert relative_error(H @ V, dense @ V) < TOL  # measured 7.8e-16
    examples = HessianOperator(model, lm_loss, batches)  # weighted by sequences: another matrix
    assert relative_error(examples @ V, dense @ V) > 1e-3  # measured 0.12


def test_gpt_operator_keeps_graphs_and_rebuilds_them_alike(lm_case):
    model, batches, _ = lm_case
    kept = HessianOperator(model, lm_loss, batches, weighting="tokens")
    rebuilt = HessianOperator(model, lm_loss, batches, weighting="tokens", graph_memory_bytes=0)
    assert kept.num_cached_batches == 2 and rebuilt.num_cached_batches == 0
    V = torch.randn(kept.dim, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(kept @ V, rebuilt @ V)


def test_fused_attention_kernel_has_no_double_backward():
    """Why probe/gpt.py pins SDPBackend.MATH. Should this fail, torch has given the fused CPU kernel
    a double backward: drop the pin in probe/gpt.py (and this test)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the fused CPU kernel (torch's default choice here)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    (gq,) = torch.autograd.grad((out**2).sum(), q, create_graph=True)  # first backward: fine
    try:
        torch.autograd.grad(gq.sum(), k)
    except RuntimeError as exc:
        assert "_scaled_dot_product_flash_attention_for_cpu_backward is not implemented" in str(exc)
    else:
        pytest.fail("the fused attention kernel now has a double backward: drop the MATH pin in probe/gpt.py")
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    (gq,) = torch.autograd.grad((out**2).sum(), q, create_graph=True)
    (hk,) = torch.autograd.grad(gq.sum(), k)
    assert torch.isfinite(hk).all() and hk.abs().max() > 0


def test_reference_method_agrees_with_finite_differences_where_func_hessian_does_not():
    """Linear → affine LayerNorm: forward-over-reverse matches central differences of the gradient;
    torch.func.hessian (reverse inside, vmapped) does not in torch 2.13. Should the second assertion
    fail, torch has fixed it and torch.func.hessian may serve as the reference again."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4)).to(torch.float64)
        nn.init.normal_(model[1].weight)
        nn.init.normal_(model[1].bias)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, generator=g, dtype=torch.float64)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    f, theta0 = flat_function(model, lambda params: (functional_call(model, params, (x,)).tanh() * w).sum())
    eps = 1e-5
    fd = torch.stack(
        [
            (grad(f)(theta0 + eps * e) - grad(f)(theta0 - eps * e)) / (2 * eps)
            for e in torch.eye(theta0.numel(), dtype=torch.float64)
        ]
    )
    scale = fd.abs().max()
    assert (jacfwd(grad(f))(theta0) - fd).abs().max() / scale < 1e-7  # measured 1.4e-9
    assert (hessian(f)(theta0) - fd).abs().max() / scale > 1e-2  # measured 0.38
