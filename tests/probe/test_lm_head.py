"""The chunked LM head (probe/lm_head.py) against plain double backward and HessianOperator on a tiny Llama."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from probe.batches import call_model
from probe.gpt import lm_loss
from probe.hessian import HessianOperator
from probe.lm_head import (
    HeadInput,
    check_chunkable,
    chunk_rows,
    chunked_head,
    chunked_lm_loss,
    linear_cross_entropy,
)

T, D, V = 13, 6, 17


def _problem(dtype=torch.float64, seed=0, shape=(T,)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D, dtype=dtype, generator=g).requires_grad_()
    w = torch.randn(V, D, dtype=dtype, generator=g).requires_grad_()
    y = torch.randint(0, V, shape, generator=g)
    y.view(-1)[[1, 5, 6]] = -100
    vh = torch.randn(*shape, D, dtype=dtype, generator=g)
    vw = torch.randn(V, D, dtype=dtype, generator=g)
    return h, w, y, vh, vw


def _grad_and_hvp(loss_fn, h, w, vh, vw, weight=0.37):
    loss = loss_fn() * weight  # HessianOperator scales each batch's loss by its weight
    grads = torch.autograd.grad(loss, (h, w), create_graph=True)
    hvp = torch.autograd.grad(grads, (h, w), (vh, vw))
    return [loss.detach(), *(g.detach() for g in grads), *hvp]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("chunk", [1, 4, 13, 50, None], ids=lambda c: f"chunk={c}")
def test_gradient_and_hvp_equal_plain_double_backward(chunk):
    h, w, y, vh, vw = _problem()
    ref = _grad_and_hvp(lambda: F.cross_entropy(h @ w.T, y, ignore_index=-100), h, w, vh, vw)
    got = _grad_and_hvp(lambda: linear_cross_entropy(h, w, y, chunk=chunk), h, w, vh, vw)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == b.dtype == torch.float64 and a.shape == b.shape
        assert _rel(a, b) < 1e-12
    assert ref[3].norm() > 0 and ref[4].norm() > 0  # the products are not trivially zero


def test_batched_shape_and_one_sided_adjoints():
    """(B, T, d) hidden states; a product with only the head's or only h's direction (None adjoints)."""
    h, w, y, vh, vw = _problem(shape=(2, 7))
    for vh_, vw_ in [(vh, torch.zeros_like(vw)), (torch.zeros_like(vh), vw)]:
        ref = _grad_and_hvp(lambda: lm_loss(h @ w.T, y), h, w, vh_, vw_)
        got = _grad_and_hvp(lambda: linear_cross_entropy(h, w, y, chunk=3), h, w, vh_, vw_)
        for a, b in zip(got, ref, strict=True):
            assert a.shape == b.shape and _rel(a, b) < 1e-12
    # gradient of h only: the head's adjoint is None inside the second Function
    loss = linear_cross_entropy(h, w, y, chunk=5)
    (gh,) = torch.autograd.grad(loss, (h,), create_graph=True)
    (hv,) = torch.autograd.grad(gh, (h,), vh)
    loss_ref = lm_loss(h @ w.T, y)
    (gh_ref,) = torch.autograd.grad(loss_ref, (h,), create_graph=True)
    (hv_ref,) = torch.autograd.grad(gh_ref, (h,), vh)
    assert _rel(hv, hv_ref) < 1e-12


def test_gradgradcheck_includes_the_upstream_gradient():
    """gradgradcheck makes the loss's incoming gradient an input: checks d/dc of the gradient too."""
    h, w, y, _, _ = _problem(shape=(7,))
    assert torch.autograd.gradgradcheck(lambda a, b: linear_cross_entropy(a, b, y, chunk=3), (h, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_matches_float64(dtype):
    h, w, y, vh, vw = _problem()
    cast = [t.detach().to(dtype) for t in (h, w, vh, vw)]
    exact = [t.to(torch.float64) for t in cast]  # the same (representable) inputs, in float64
    he, we = (exact[0].requires_grad_(), exact[1].requires_grad_())
    ref = _grad_and_hvp(lambda: F.cross_entropy(he @ we.T, y, ignore_index=-100), he, we, exact[2], exact[3])
    hc, wc = (cast[0].requires_grad_(), cast[1].requires_grad_())
    got = _grad_and_hvp(lambda: linear_cross_entropy(hc, wc, y, chunk=4), hc, wc, cast[2], cast[3])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == dtype
        assert _rel(a.double(), b) < tol


def test_no_counted_token_gives_nan_and_zero_gradient_like_cross_entropy():
    h, w, y, _, _ = _problem()
    y = torch.full_like(y, -100)
    loss = linear_cross_entropy(h, w, y)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(h @ w.T, y))
    assert all(float(g.abs().sum()) == 0 for g in torch.autograd.grad(loss, (h, w)))


def test_second_backward_through_one_graph_recomputes_the_gradient():
    """The forward pass's gradient is used by the first backward only; a retained graph recomputes it."""
    h, w, y, _, _ = _problem()
    loss = linear_cross_entropy(h, w, y, chunk=4) * 2.5
    first = torch.autograd.grad(loss, (h, w), retain_graph=True)
    second = torch.autograd.grad(loss, (h, w))
    ref = torch.autograd.grad(F.cross_entropy(h @ w.T, y, ignore_index=-100) * 2.5, (h, w))
    for a, b, r in zip(first, second, ref, strict=True):
        assert _rel(a, r) < 1e-12 and _rel(b, r) < 1e-12


def test_bad_arguments_are_refused():
    h, w, y, _, _ = _problem()
    with pytest.raises(ValueError, match="chunk must be a positive number of tokens, got chunk=0"):
        linear_cross_entropy(h, w, y, chunk=0)
    with pytest.raises(ValueError, match="targets must be integer token ids of shape"):
        linear_cross_entropy(h, w, y.double())
    with pytest.raises(ValueError, match="share one floating dtype"):
        linear_cross_entropy(h, w.float(), y)
    with pytest.raises(ValueError, match="the same d"):
        linear_cross_entropy(h, w[:, :3], y)
    assert chunk_rows(128_000) >= 1 and chunk_rows(10**12) == 1 and chunk_rows(5, 7) == 7


def _llama(tied: bool):
    cfg = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
        max_position_embeddings=32,
    )
    cfg._attn_implementation = "eager"  # double backward through the plain attention
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def _token_batches():
    g = torch.Generator().manual_seed(2)
    batches = []
    for rows in (2, 1):  # unequal batches, some ignored targets
        ids = torch.randint(0, 40, (rows, 9), generator=g)
        labels = ids.roll(-1, dims=1)
        labels[0, :3] = -100
        labels[:, -1] = -100
        batches.append(({"input_ids": ids}, labels))
    return batches


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("graph_memory_bytes", [2**31, 0], ids=["kept", "rebuilt"])
def test_hessian_operator_on_llama_equals_plain_head(tied, graph_memory_bytes):
    """Same parameters, names and layout; Hessian products equal to rounding (measured ~1e-16)."""
    model = _llama(tied)
    named = [(n, p) for n, p in model.named_parameters()]
    batches = _token_batches()
    plain = HessianOperator(model, lm_loss, batches, weighting="tokens", graph_memory_bytes=graph_memory_bytes)
    with chunked_head(model):
        chunked = HessianOperator(
            model,
            lambda out, y: chunked_lm_loss(out, y, chunk=4),
            batches,
            weighting="tokens",
            graph_memory_bytes=graph_memory_bytes,
        )
        assert [(n, p) for n, p in model.named_parameters()] == named
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        assert chunked.dim == plain.dim and chunked.space.names == plain.space.names
        v = torch.randn(plain.dim, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        got = chunked @ v
        loss, grad = chunked.loss_and_gradient()
    assert "forward" not in vars(model.lm_head)  # the patch is gone on exit
    ref = plain @ v
    ref_loss, ref_grad = plain.loss_and_gradient()
    assert _rel(got, ref) < 1e-10 and _rel(grad, ref_grad) < 1e-10
    assert abs(float(loss - ref_loss)) < 1e-12


def test_chunked_loss_needs_the_marker():
    model = _llama(tied=True)
    ids = torch.randint(0, 40, (1, 5))
    out = model(input_ids=ids)
    with pytest.raises(ValueError, match="needs the output of a model run under probe.lm_head.chunked_head"):
        chunked_lm_loss(out, ids)
    with chunked_head(model):
        out = model(input_ids=ids)
        assert isinstance(out.logits, HeadInput) and out.logits.weight is model.lm_head.weight
        with pytest.raises(ValueError, match="already has its forward replaced"), chunked_head(model):
            pass
    assert torch.allclose(chunked_lm_loss(out.logits, ids), lm_loss(model(input_ids=ids).logits, ids))


class _BiasHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 9)

    def get_output_embeddings(self):
        return self.head


def test_refuses_heads_it_cannot_compute():
    with pytest.raises(ValueError, match="has no bias, but _BiasHead's head has one; use the plain head and lm_loss"):
        check_chunkable(_BiasHead())
    with pytest.raises(ValueError, match="needs get_output_embeddings\\(\\) to be an nn.Linear, got NoneType"):
        check_chunkable(nn.Linear(2, 2))
    cfg = transformers.Gemma2Config(
        vocab_size=40,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        final_logit_softcapping=30.0,
    )
    gemma = transformers.Gemma2ForCausalLM(cfg)
    with pytest.raises(ValueError, match="transforms its logits after the head \\(final_logit_softcapping=30.0\\)"):
        with chunked_head(gemma):
            pass
    assert "forward" not in vars(gemma.lm_head)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_functional_call_state_reaches_the_head(tied):
    """call_model(model, x, state) swaps the parameters; the marker must carry the swapped head weight."""
    model = _llama(tied)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    state = {
        n: p.detach() + 0.1 * torch.randn(p.shape, dtype=p.dtype, generator=g) for n, p in model.named_parameters()
    }
    ref = lm_loss(call_model(model, {"input_ids": ids}, state), ids)
    with chunked_head(model):
        got = chunked_lm_loss(call_model(model, {"input_ids": ids}, state), ids)
    plain = lm_loss(call_model(model, {"input_ids": ids}), ids)
    assert abs(float((got - ref).detach())) < 1e-12 and abs(float((plain - ref).detach())) > 1e-3
