"""Tiny Hugging Face models of several families, written as ``save_pretrained`` writes them,
their probe data as a Parquet file of token ids, and an independent dense Hessian.

The reference is built by transformers itself (``from_pretrained``, the eager attention)
with the language-model loss written out here in float64 on the whole probe set as one
batch (transformers' own losses cast logits to float32), and differentiated by ``torch.func.jacfwd(grad(f))``
over the parameters the model trains (a tied embedding and head once). Nothing of
landscape-probe's loading, losses, batching, weighting or products enters it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacfwd

VOCAB = 32
WINDOW = 8
WINDOWS = 12

# name -> (config class, config kwargs, model class, loss of the job)
FAMILIES = {
    "llama_tied": (
        "LlamaConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            max_position_embeddings=16,
        ),
        "LlamaForCausalLM",
        "causal_lm",
    ),
    "llama_untied": (
        "LlamaConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
            max_position_embeddings=16,
        ),
        "LlamaForCausalLM",
        "causal_lm",
    ),
    "gpt2": (
        "GPT2Config",
        dict(vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0),
        "GPT2LMHeadModel",
        "causal_lm",
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            vocab_size=VOCAB,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            max_position_embeddings=16,
        ),
        "Qwen2ForCausalLM",
        "causal_lm",
    ),
    "bert": (
        "BertConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=16,
        ),
        "BertForMaskedLM",
        "lm_cross_entropy",
    ),
}


def write_model(
    family: str, folder: Path, *, seed: int = 0, dtype: torch.dtype = torch.float64, max_shard_size: str = "4KB"
) -> object:
    """A random model of ``family`` saved by ``save_pretrained`` (sharded safetensors) in ``folder``."""
    import transformers

    config_cls, kwargs, model_cls, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, model_cls)(config).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    return model


def write_tokens(path: Path, *, seed: int = 0, documents: int = 4) -> Path:
    """A Parquet file of token-id lists (a column ``input_ids``) holding ``WINDOWS`` windows of ``WINDOW``."""
    g = torch.Generator().manual_seed(seed)
    per = WINDOW * WINDOWS // documents
    docs = [torch.randint(1, VOCAB, (per,), generator=g).tolist() for _ in range(documents)]
    pq.write_table(pa.table({"input_ids": docs}), path)
    return path


def token_data(tmp_path: Path, *, batch_size: int = 4) -> dict:
    """A spec's ``data`` section: every window of a Parquet file of token ids written into ``tmp_path``."""
    tokens = write_tokens(tmp_path / "tokens.parquet")
    return {
        "factory": "cluster.data:token_windows",
        "kwargs": {"path": str(tokens), "window": WINDOW, "count": WINDOWS},
        "num_examples": WINDOWS,
        "batch_size": batch_size,
    }


def all_windows(path: Path) -> torch.Tensor:
    """The probe set's token ids, ``(WINDOWS, WINDOW)``, as the data factory cuts them (no separator)."""
    ids = [t for doc in pq.read_table(path).column("input_ids").to_pylist() for t in doc]
    return torch.tensor(ids).view(WINDOWS, WINDOW)


def dense_hessian(folder: Path, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(H, dim)``: the float64 Hessian of the language-model loss on all of ``ids`` as one batch (causal:
    the mean cross-entropy of token t+1 given the prefix; masked: of every token given all), over the
    parameters transformers lists (tied ones once), by forward over reverse."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        is_masked = "Bert" in (folder / "config.json").read_text()
        model = transformers.AutoModelForMaskedLM if is_masked else transformers.AutoModelForCausalLM
        ref = model.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager")
    ref.eval()
    params = dict(ref.named_parameters())
    names = list(params)
    shapes = [params[n].shape for n in names]
    numels = [params[n].numel() for n in names]
    theta0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    mask = torch.ones_like(ids)

    causal = not is_masked

    def f(theta):
        state = {n: c.view(s) for n, c, s in zip(names, torch.split(theta, numels), shapes, strict=True)}
        logits = functional_call(ref, state, (), {"input_ids": ids, "attention_mask": mask}).logits
        # in float64 here: transformers' own losses cast logits to float32
        if causal:  # position t scores token t+1, the mean over every such pair
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))

    return jacfwd(grad(f))(theta0).detach(), theta0.numel()
