"""Hugging Face models cut into pipeline pieces (cluster.hf_stages): the pieces composed give the
model's logits bit for bit, their Hessian-vector products equal the model's (float64, eager
attention), a stage loads only its tensors from a ``save_pretrained`` checkpoint, a model of an
unknown family is refused in one line, and the pipeline Hessian-vector product of every family
over 2 and 3 stages and a 2 × 2 stage × replica grid (gloo on loopback, separate processes)
equals the single-process product of the Hugging Face model, tied embeddings included."""

from __future__ import annotations

import os
import socket
import warnings
from typing import Any

import hf_files
import pytest
import torch
import torch.multiprocessing as mp
import transformers
from safetensors.torch import load_file

from cluster.checkpoints import load_checkpoint
from cluster.errors import category_of
from cluster.hf import hf_skeleton
from cluster.hf_stages import (
    PiecesModel,
    UnsupportedStages,
    load_stage_state,
    piece_state_names,
    pipeline_pieces,
    run_pieces,
    stage_state_keys,
)
from cluster.pipeline import PipelineHessian, build_stage, grid_groups
from probe.gpt import lm_loss
from probe.hessian import HessianOperator

VOCAB, T = 32, 8
_DECODER: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=16,
)
# name -> (config class, kwargs, model class); two layers each, so a model has four pieces
FAMILIES: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama_tied": ("LlamaConfig", dict(_DECODER, tie_word_embeddings=True), "LlamaForCausalLM"),
    "llama_untied": ("LlamaConfig", dict(_DECODER, tie_word_embeddings=False), "LlamaForCausalLM"),
    "mistral": ("MistralConfig", dict(_DECODER, sliding_window=4, head_dim=4), "MistralForCausalLM"),  # window < T
    "qwen2": ("Qwen2Config", dict(_DECODER, tie_word_embeddings=True), "Qwen2ForCausalLM"),
    "gpt2": (
        "GPT2Config",
        dict(vocab_size=VOCAB, n_embd=8, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0),
        "GPT2LMHeadModel",
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            tie_word_embeddings=False,
        ),
        "GPTNeoXForCausalLM",
    ),
    "bert_mlm": (
        "BertConfig",
        dict(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16),
        "BertForMaskedLM",
    ),
}
CAUSAL = [f for f in FAMILIES if not f.startswith("bert")]


def build(family: str, seed: int = 0) -> Any:
    """A random float64 model of ``family`` with eager attention, in eval mode."""
    config_cls, kwargs, model_cls = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = getattr(transformers, model_cls)(config).double()
    return model.eval()


def shifted_lm_loss(logits: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """Causal LM loss: position t scores ``next_ids[:, t]``, the token t+1 (targets -100 ignored)."""
    return lm_loss(logits[:, :-1], next_ids)


def probe_batches(family: str, seed: int = 1) -> list:
    """Three batches of 4 windows: plain ids; ids with a right-padding attention mask (padded
    targets -100, BERT with token types); plain ids again. Targets: the next tokens (causal),
    the tokens themselves (BERT)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (12, T), generator=g)
    mask = torch.ones(12, T, dtype=torch.long)
    mask[4, -3:] = 0
    mask[6, -1:] = 0
    targets = ids.masked_fill(mask == 0, -100)
    targets = targets if family.startswith("bert") else targets[:, 1:]
    padded = {"input_ids": ids[4:8], "attention_mask": mask[4:8]}
    if family.startswith("bert"):
        padded["token_type_ids"] = (torch.arange(T) >= T // 2).long().expand(4, T)
    return [(ids[0:4], targets[0:4]), (padded, targets[4:8]), (ids[8:12], targets[8:12])]


def total_tokens(batches: list) -> int:
    return sum(int((y != -100).sum()) for _, y in batches)


def loss_of(family: str):
    return lm_loss if family.startswith("bert") else shifted_lm_loss


@pytest.mark.parametrize("family", [*FAMILIES, "bert_base"])
def test_pieces_compose_to_the_models_logits_bit_for_bit(family):
    model: Any
    if family == "bert_base":  # BertModel without a pooler: the last piece gives the last hidden states
        config = transformers.BertConfig(**FAMILIES["bert_mlm"][1])
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        model = transformers.BertModel(config, add_pooling_layer=False).double().eval()
    else:
        model = build(family)
    pieces = pipeline_pieces(model)
    layers = model.config.num_hidden_layers
    assert len(pieces) == (1 + layers if family == "bert_base" else 2 + layers)
    assert [id(p) for p in pieces.parameters()] == [id(p) for p in model.parameters()]  # same objects, same order
    assert sum(p.numel() for p in pieces.parameters()) == sum(p.numel() for p in model.parameters())
    tied = model.config.tie_word_embeddings and family != "bert_base"
    if tied:  # the tied embedding and head: one object, in the first and the last piece
        assert {id(p) for p in pieces[0].parameters()} & {id(p) for p in pieces[-1].parameters()}
    with torch.no_grad():
        for inputs, _ in probe_batches(family.replace("bert_base", "bert_mlm")):
            kwargs = inputs if isinstance(inputs, dict) else {"input_ids": inputs}
            out = model(**kwargs)
            want = out.last_hidden_state if family == "bert_base" else out.logits
            assert torch.equal(run_pieces(pieces, inputs), want)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hessian_of_the_pieces_equals_the_hessian_of_the_model(family):
    model = build(family)
    loss, batches = loss_of(family), probe_batches(family)
    want_op = HessianOperator(model, loss, batches, weighting="tokens")
    got_op = HessianOperator(PiecesModel(pipeline_pieces(model)), loss, batches, weighting="tokens")
    assert got_op.dim == want_op.dim == sum(p.numel() for p in model.parameters())
    V = torch.randn(want_op.dim, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want, got = want_op.matmat(V), got_op.matmat(V)
    assert want.abs().max() > 0
    assert torch.allclose(got, want, rtol=0, atol=1e-10 * want.abs().max().item())


# Against the independent dense float64 Hessian of tests/cluster/hf_files.py, with the model loaded
# stage by stage from its save_pretrained checkpoint. BERT (and GPT-2) compute in float64 throughout;
# Llama and Qwen2 compute RMSNorm and the rotary tables in float32 inside a float64 model, which sets
# the floor (measured: 1.1e-7 for llama_tied, 1.4e-7 for qwen2; 2.6e-15 for gpt2, 1.2e-15 for bert;
# max |error| over max |Hv|, two random vectors).
DENSE_FLOOR = {"bert": 1e-10, "llama_tied": 1e-6, "qwen2": 1e-6}


@pytest.mark.parametrize("family", list(DENSE_FLOOR))
def test_stage_loaded_pieces_match_the_dense_reference(tmp_path, family):
    folder = tmp_path / family
    hf_files.write_model(family, folder)
    index = folder / "model.safetensors.index.json"
    model = hf_skeleton(folder / "config.json", "auto", "eager", torch.float64)
    pieces = pipeline_pieces(model)
    assert all(p.is_meta for p in pieces.parameters())
    keys = set(load_checkpoint(index, keys=None)[0])
    names = piece_state_names(model, pieces, keys)
    # save_pretrained wrote one name of the tied embedding and head: both occurrences read it
    first, last = {id(p) for p in pieces[0].parameters()}, {id(p) for p in pieces[-1].parameters()}
    tied = [n for n, p in pieces.named_parameters(remove_duplicate=False) if id(p) in first & last]
    assert len(tied) == 2 and names[tied[0]] == names[tied[1]] in keys
    # two stages, each reading only its own tensors
    # two stages, each reading only its own tensors; the second stage's pieces stay on meta after the first
    later = {id(p) for p in pieces[2:].parameters()} - {id(p) for p in pieces[:2].parameters()}
    for children in (range(0, 2), range(2, len(pieces))):
        wanted = stage_state_keys(names, children)
        state, _ = load_checkpoint(index, keys=sorted(wanted & keys))
        assert set(state) == wanted & keys
        load_stage_state(pieces, names, state, children, dtype=torch.float64)
        assert all(not p.is_meta for i in children for p in pieces[i].parameters())
        if children.start == 0:
            assert later and all(p.is_meta for p in pieces.parameters() if id(p) in later)
    assert sum(p.numel() for p in pieces.parameters()) == sum(p.numel() for p in model.parameters())  # ties kept
    assert not any(p.is_meta for p in pieces.parameters())
    full = {}
    for shard in folder.glob("*.safetensors"):
        full.update(load_file(shard))
    tensors = dict(pieces.named_parameters(remove_duplicate=False)) | dict(pieces.named_buffers(remove_duplicate=False))
    assert set(names) == set(tensors)
    for name, key in names.items():
        if key in full:  # every parameter; buffers only where saved
            assert torch.equal(tensors[name], full[key])
    ids = hf_files.all_windows(hf_files.write_tokens(tmp_path / "tokens.parquet"))
    H, dim = hf_files.dense_hessian(folder, ids)
    loss = lm_loss if family == "bert" else shifted_lm_loss
    targets = ids if family == "bert" else ids[:, 1:]
    op = HessianOperator(PiecesModel(pieces), loss, [(ids[i : i + 4], targets[i : i + 4]) for i in range(0, 12, 4)])
    assert op.dim == dim
    V = torch.randn(dim, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want, got = H @ V, op.matmat(V)
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"{family}: max|pieces Hv - dense Hv| / max|dense Hv| = {err:.2e}")
    assert err <= DENSE_FLOOR[family]


def test_unknown_families_are_refused_in_one_line():
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=16,
        moe_intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=2,
        num_experts_per_tok=1,
    )
    with torch.device("meta"):
        model = transformers.Qwen3MoeForCausalLM(config)
    with pytest.raises(UnsupportedStages) as err:
        pipeline_pieces(model)
    assert str(err.value) == (
        "Qwen3MoeForCausalLM is not a known decoder family for pipeline stages "
        "(Llama/Mistral/Qwen2, GPT-2, GPT-NeoX, BERT): run it data-parallel with cluster.stages: 1"
    )
    assert category_of(err.value) == "bad_spec"
    bert = transformers.BertConfig(**FAMILIES["bert_mlm"][1])
    with torch.device("meta"):
        pooled = transformers.BertModel(bert)  # a pooler that the hidden states do not pass through
    with pytest.raises(UnsupportedStages, match="with a pooler is not supported by pipeline stages"):
        pipeline_pieces(pooled)


# ------------------------------------------------------------------ the pipeline, in separate processes

TIED = ("llama_tied", "qwen2", "gpt2", "bert_mlm")
# The pipeline reorders float64 sums (per stage, per micro-batch); where a model computes in float32
# inside (Llama-family RMSNorm, whose backward also runs in float32; GPT-NeoX's eager softmax), those
# float64 differences cross float32 roundings. The floor is then the single-process product's own
# distance to the exact float64 Hessian (the dense reference of hf_files, these 2-layer models, three
# batches of 4 full windows; max |error| / max |Hv|), measured: llama_tied 9.0e-8, llama_untied
# 2.0e-7, mistral 2.3e-7, qwen2 1.4e-7, gpt_neox 8.9e-11; gpt2 6.3e-15 and bert_mlm 2.2e-15 (float64
# throughout). Measured pipeline against single-process: 1.7e-8 to 5.3e-8 (Llama family), 2.0e-11
# to 5.2e-11 (GPT-NeoX), below 3e-16 (GPT-2, BERT).
FLOOR = dict.fromkeys(["llama_tied", "llama_untied", "mistral", "qwen2"], 1e-6) | {
    "gpt_neox": 1e-9,
    "gpt2": 1e-10,
    "bert_mlm": 1e-10,
}


# Imported once, in the forkserver, before it forks the workers: transformers imports a model family's code
# (and some 1,400 modules on the first model) when the model is first built, 2 s per worker and launch
# (6 s on a busy machine) otherwise.
PRELOAD = [
    "torch",
    "transformers",
    *(f"transformers.models.{m}.modeling_{m}" for m in ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "bert")),
    "cluster.hf_stages",
    "cluster.pipeline",
    __name__,
]


def free_port() -> int:
    # not from conftest: the forkserver re-imports this module where a different conftest comes first on sys.path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, stages: int, port: int, out: str, vectors: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        replicas = world // stages
        ranks, pipe, data_group, stage, replica = grid_groups(stages, replicas)
        found = {}
        for family, V in vectors.items():  # every family in one spawn
            batches = probe_batches(family)
            part, _, _ = build_stage(pipeline_pieces(build(family)), stages, stage)
            op = PipelineHessian(
                part,
                loss_of(family),
                batches[replica::replicas],  # replicas hold unequal shares: batches 0, 2 and 1
                stage_index=stage,
                ranks=ranks,
                pipe_group=pipe,
                data_group=data_group,
                weighting="tokens",
                total_tokens=total_tokens(batches),
                # dict inputs cut into micro-batches on one grid; whole batches (fewer messages) on the others
                micro_batches=2 if (stages, replicas) == (2, 1) else 1,
            )
            s = op.local_slice
            hv = op.matmat(V[s].contiguous())
            assert op.layout is not None  # build_stage attached it
            found[family] = {"slice": (s.start, s.stop), "hv": hv, "borrowed": len(op.layout.borrowed)}
        torch.save({"replica": replica, "found": found}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def run(tmp_path, stages: int, replicas: int, vectors: dict) -> list[dict]:
    world = stages * replicas
    mp.set_forkserver_preload(PRELOAD)
    mp.start_processes(  # pyright: ignore[reportPrivateImportUsage]
        _worker,
        args=(world, stages, free_port(), str(tmp_path), vectors),
        nprocs=world,
        join=True,
        start_method="forkserver",
    )
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def references() -> dict:
    """Per family: two random vectors and the single-process product of the Hugging Face model."""
    out = {}
    for family in FAMILIES:
        batches = probe_batches(family)
        op = HessianOperator(build(family), loss_of(family), batches, weighting="tokens")
        V = torch.randn(op.dim, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        out[family] = (V, op.matmat(V))
    return out


@pytest.mark.parametrize("stages, replicas", [(2, 1), (3, 1), (2, 2)])
def test_pipeline_hvp_of_every_family_equals_the_models_hvp(tmp_path, references, stages, replicas):
    parts = run(tmp_path, stages, replicas, {f: V for f, (V, _) in references.items()})
    for family, (V, want) in references.items():
        for replica in range(replicas):
            mine = sorted((p["found"][family] for p in parts if p["replica"] == replica), key=lambda f: f["slice"])
            assert len(mine) == stages and mine[0]["slice"][0] == 0 and mine[-1]["slice"][1] == V.shape[0]
            assert all(a["slice"][1] == b["slice"][0] for a, b in zip(mine, mine[1:], strict=False))
            got = torch.cat([f["hv"] for f in mine])
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err <= FLOOR[family], f"{family}, {stages} stages x {replicas} replicas: relative error {err:.2e}"
            # the head tied to the embedding sits on the last stage: borrowed there, owned by stage 0
            assert (mine[-1]["borrowed"] > 0) == (family in TIED)


def test_one_load_of_every_piece_keeps_the_tie(tmp_path):
    """Loading the embedding and the tied head in one call (a stage holding both) makes one parameter."""
    import transformers

    from cluster.checkpoints import load_checkpoint
    from cluster.hf import hf_skeleton, tensor_names
    from cluster.hf_stages import load_stage_state, piece_state_names, pipeline_pieces, run_pieces

    cfg = transformers.GPT2Config(vocab_size=32, n_embd=8, n_layer=2, n_head=2, n_positions=16, bos_token_id=0)
    cfg.eos_token_id = 0
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    model.save_pretrained(tmp_path)
    skeleton = hf_skeleton(tmp_path / "config.json", dtype=torch.float64)
    pieces = pipeline_pieces(skeleton)
    file = tmp_path / "model.safetensors"
    names = piece_state_names(skeleton, pieces, checkpoint_keys=tensor_names(file))
    state, _ = load_checkpoint(file)
    load_stage_state(pieces, names, state, range(len(pieces)), dtype=torch.float64)
    assert len({id(p) for p in pieces.parameters()}) == len(list(model.parameters()))  # the tie is one
    ids = torch.randint(0, 32, (2, 6))
    with torch.no_grad():
        assert torch.equal(run_pieces(pieces, ids), model(ids).logits)
