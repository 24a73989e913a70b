"""The parameter-sharded exact Hessian-vector product (cluster.sharded_hvp) equals the single-process
HessianOperator on a small GPT-style model and a tiny Llama, in float64 (graphs kept and rebuilt) and in
float32, and Lanczos on it finds the same eigenvalues, under real torch.distributed (gloo on loopback) in
2 separate processes, each holding a different slice of the probe data and half of every layer's
parameters. One launch of the 2 processes runs every case (a launch costs seconds on a busy machine)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from cluster.sharded_hvp import ShardedHessian
from cluster.sharded_units import default_units
from probe.eigen import eigenvalues
from probe.gpt import gpt, lm_loss
from probe.hessian import HessianOperator

GPT = dict(vocab=16, dim=8, layers=2, heads=2, max_len=6)
WORLD = 2
# case -> (model, dtype, graph_memory_bytes); budget 0: the gradient graphs are rebuilt on every product
CASES = {
    "gpt": ("gpt", torch.float64, 1 << 30),
    "llama": ("llama", torch.float64, 1 << 30),
    "gpt_rebuilt": ("gpt", torch.float64, 0),
    "gpt_float32": ("gpt", torch.float32, 1 << 30),
    "llama_float32": ("llama", torch.float32, 1 << 30),
}
# Sharded against single-process product at the same dtype, ‖Δ‖/‖Hv‖. Float64: the measured floor was 3e-16
# (bench/bench_sharded.py; 2e-16 here); the bound leaves room for other summation orders. Float32: the two
# products sum in different orders and so differ by float32 roundings, measured 1.0e-7 (gpt) and 8.5e-8 (llama).
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
# Float32 products against the float64 single-process product, ‖Δ‖/‖Hv‖: the float32 floor, which the sharded
# product must meet as the single-process one does (measured: 2.1e-7 to 2.2e-7 for both, both models).
FLOAT32_FLOOR = 2e-6


def free_port() -> int:
    # not from conftest: the forkserver re-imports this module where a different conftest comes first on sys.path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8,
    )
    config._attn_implementation = "eager"  # the plain-autograd attention (twice differentiable)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double()


def make_model(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The float64 model, then cast: float32 runs see the same parameter values rounded."""
    if name == "llama":
        return llama().to(dtype)
    torch.manual_seed(0)
    return gpt(**GPT).double().to(dtype)


def data(rank: int, world: int):
    """10 sequences in 4 batches of 3, 2, 3, 2 (unequal); rank r takes every world-th batch."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, GPT["vocab"], (10, GPT["max_len"] + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    cuts = [0, 3, 5, 8, 10]
    batches = [(x[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    return batches[rank::world]


def _worker(rank: int, port: int, out: str, vectors: dict[str, torch.Tensor]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    # one intra-op thread per process: 2 processes × torch's default of one thread per core, spinning for a
    # descheduled peer on a busy 2-core machine, made every product several times slower
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        found = {}
        for case, (name, dtype, budget) in CASES.items():  # every case in this one launch
            op = ShardedHessian(make_model(name, dtype), lm_loss, data(rank, WORLD), graph_memory_bytes=budget)
            V = vectors[name].to(dtype)
            V_local = V[op.natural_index].contiguous()  # the same vectors, in the operator's coordinates
            hv = op.matmat(V_local)
            top = eigenvalues(op, 2, generator=torch.Generator().manual_seed(3)) if case == "gpt" else None
            found[case] = {
                "index": op.natural_index,
                "slice": (op.local_slice.start, op.local_slice.stop),
                "dim": op.dim,
                "hv": hv,
                "top": None if top is None else top.eigenvalues,
                "kept": op.num_cached_batches,
                "handle_bytes": op.handle_bytes,
            }
        torch.save(found, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def references() -> dict:
    """Per model: two random float64 vectors, the single-process product in float64 and in float32, λ₁, λ₂."""
    out = {}
    for name in ("gpt", "llama"):
        op = HessianOperator(make_model(name), lm_loss, data(0, 1))
        V = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        op32 = HessianOperator(make_model(name, torch.float32), lm_loss, data(0, 1))
        top = eigenvalues(op, 2, generator=torch.Generator().manual_seed(3)) if name == "gpt" else None
        want = {torch.float64: op.matmat(V), torch.float32: op32.matmat(V.float())}
        out[name] = (V, want, None if top is None else top.eigenvalues)
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, references) -> dict[str, list[dict]]:
    """Per case: what each of the 2 ranks found (one launch for every case)."""
    folder = tmp_path_factory.mktemp("sharded")
    vectors = {name: V for name, (V, _, _) in references.items()}
    # imported once, in the server (the Llama code too: 2 s per worker and launch otherwise)
    mp.set_forkserver_preload(
        ["torch", "transformers.models.llama.modeling_llama", "probe.gpt", "cluster.sharded_hvp", __name__]
    )
    mp.start_processes(  # pyright: ignore[reportPrivateImportUsage]
        _worker, args=(free_port(), str(folder), vectors), nprocs=WORLD, join=True, start_method="forkserver"
    )
    ranks = [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]
    return {case: [found[case] for found in ranks] for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_hvp_equals_the_single_process_hvp(references, sharded, case):
    name, dtype, budget = CASES[case]
    V, want_by_dtype, top = references[name]
    want, parts = want_by_dtype[dtype], sharded[case]
    index = torch.cat([p["index"] for p in parts])
    assert torch.equal(index.sort().values, torch.arange(V.shape[0]))  # the ranks' entries partition the vector
    assert parts[0]["slice"][0] == 0 and parts[0]["slice"][1] == parts[1]["slice"][0]
    assert parts[1]["slice"][1] == V.shape[0] == parts[0]["dim"]
    got = torch.empty_like(want)
    got[index] = torch.cat([p["hv"] for p in parts])
    assert got.dtype == dtype
    err = ((got - want).norm() / want.norm()).item()
    print(f"{case}: ‖sharded Hv - single-process Hv‖ / ‖single-process Hv‖ = {err:.1e}")
    assert err <= TOL[dtype], f"{case}: sharded against single-process, relative error {err:.2e}"
    if dtype == torch.float32:  # both float32 products sit at the float32 floor of the float64 product
        exact = want_by_dtype[torch.float64]
        for product in (got, want):
            floor = ((product.double() - exact).norm() / exact.norm()).item()
            print(f"{case}: float32 against float64 single-process, {floor:.1e}")
            assert floor <= FLOAT32_FLOOR
    # The operator's coordinates are a permutation of the model's, so Lanczos starts from another vector;
    # each Ritz value is within its residual, tol·max|θ| = 1e-6·λ_max, of an eigenvalue (measured: 4e-8).
    for p in parts:
        if p["top"] is not None:  # Lanczos through the operator, once (case "gpt": keeps the test short)
            assert torch.allclose(p["top"], top, rtol=2e-6, atol=0)
        assert p["kept"] == (2 if budget else 0)
        assert p["handle_bytes"] > 0  # saved views of gathered layers were replaced by handles
    assert (parts[0]["top"] is not None) == (case == "gpt")


def test_default_units_are_the_layers():
    assert default_units(gpt(**GPT)) == ["0", "1", "2", "3"]
    assert default_units(llama()) == ["model.layers.0", "model.layers.1"]
