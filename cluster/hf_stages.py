"""Hugging Face models cut into pipeline pieces for :mod:`cluster.pipeline`.

:func:`pipeline_pieces` turns a transformers model into an ``nn.Sequential`` of
pieces: an embedding piece, one piece per decoder (or encoder) layer and a final
norm + head piece returning the logits ``(B, T, V)``. Every piece has the class
attribute ``takes_inputs``; pieces with ``takes_inputs = True`` are called
``piece(h, inputs)`` with the batch's model inputs (an ``input_ids`` tensor, or a
dict with ``input_ids`` and optionally ``attention_mask``, ``token_type_ids``,
``position_ids``; ``labels`` is ignored) and the previous piece's output ``h``
(None for the first piece); the head piece is called ``piece(h)``.

Each layer piece forms its own position ids, rotary ``(cos, sin)`` tables (the
model's own ``rotary_emb`` module) and causal, sliding-window or padding masks
(``transformers.masking_utils``, as the model's forward calls them), so the pieces
composed compute the model's forward operation for operation. The pieces hold the
model's own submodules: the same ``nn.Parameter`` objects, a tied embedding and head
appearing in the first and last piece as one object; the Sequential's deduplicated
``parameters()`` are the model's, in the model's order (checked).

Families: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` (and
their base models without a head), ``GPT2LMHeadModel``, ``GPTNeoXForCausalLM``,
``BertForMaskedLM`` and ``BertModel`` without a pooler (its last piece is the last
encoder layer: last hidden states). Any other model raises :class:`UnsupportedStages`
with one line saying to run it data-parallel.

Loading one stage of a checkpoint: build the skeleton with :func:`cluster.hf.hf_skeleton`
(parameters on the meta device, computed buffers such as rotary ``inv_freq`` real),
cut it with :func:`pipeline_pieces`, map names with :func:`piece_state_names`, read only
:func:`stage_state_keys` from the checkpoint and assign them with :func:`load_stage_state`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cluster.checkpoints import CheckpointError
from cluster.errors import ProbeError

__all__ = [
    "UnsupportedStages",
    "FAMILIES",
    "pipeline_pieces",
    "PiecesModel",
    "run_pieces",
    "piece_state_names",
    "stage_state_keys",
    "load_stage_state",
]

# class name -> family; a subclass of a listed class belongs to its family
FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "LlamaModel": "llama",
    "MistralModel": "llama",
    "Qwen2Model": "llama",
    "GPT2LMHeadModel": "gpt2",
    "GPT2Model": "gpt2",
    "GPTNeoXForCausalLM": "gpt_neox",
    "GPTNeoXModel": "gpt_neox",
    "BertForMaskedLM": "bert",
    "BertModel": "bert",
}
_KNOWN = "Llama/Mistral/Qwen2, GPT-2, GPT-NeoX, BERT"


class UnsupportedStages(ProbeError, ValueError):
    """A model :func:`pipeline_pieces` cannot cut into stages; the message says to run it data-parallel."""

    category = "bad_spec"


def _fields(inputs: Any) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(input_ids, attention_mask, token_type_ids, position_ids)`` of a batch's model inputs."""
    if isinstance(inputs, Tensor):
        return inputs, None, None, None
    if isinstance(inputs, Mapping):
        ids = inputs.get("input_ids")
        if not isinstance(ids, Tensor):
            raise ValueError(
                f"pipeline pieces need input_ids in the batch inputs, got keys {sorted(inputs)}; "
                "inputs_embeds is not supported by pipeline stages"
            )
        return ids, inputs.get("attention_mask"), inputs.get("token_type_ids"), inputs.get("position_ids")
    raise ValueError(f"pipeline pieces take an input_ids tensor or a dict of model inputs, got {type(inputs).__name__}")


def _arange_positions(ids: Tensor, position_ids: Tensor | None) -> Tensor:
    """The position ids a decoder forms when none are given: ``arange(T)`` as ``(1, T)``."""
    if position_ids is not None:
        return position_ids
    return torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)


# ------------------------------------------------------------------ embedding pieces


class TokenEmbedding(nn.Module):
    """Token embedding (Llama, Mistral, Qwen2) or token embedding then dropout (GPT-NeoX)."""

    takes_inputs = True

    def __init__(self, embed: nn.Module, dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.embed = embed
        self.dropout = dropout

    def forward(self, h: Tensor | None, inputs: Any) -> Tensor:
        ids = _fields(inputs)[0]
        out = self.embed(ids)
        return out if self.dropout is None else self.dropout(out)


class GPT2Embedding(nn.Module):
    """GPT-2: ``wte(ids) + wpe(positions) [+ wte(token_type_ids)]`` then dropout, as ``GPT2Model``."""

    takes_inputs = True

    def __init__(self, wte: nn.Module, wpe: nn.Module, drop: nn.Module) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = wte, wpe, drop

    def forward(self, h: Tensor | None, inputs: Any) -> Tensor:
        ids, _, token_types, positions = _fields(inputs)
        out = self.wte(ids)
        out = out + self.wpe(_arange_positions(ids, positions)).to(out.device)
        if token_types is not None:
            out = out + self.wte(token_types.view(-1, ids.shape[-1]))
        return self.drop(out)


class BertEmbedding(nn.Module):
    """BERT's embeddings module (words, positions, token types, LayerNorm, dropout)."""

    takes_inputs = True

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, h: Tensor | None, inputs: Any) -> Tensor:
        ids, _, token_types, positions = _fields(inputs)
        return self.embeddings(input_ids=ids, token_type_ids=token_types, position_ids=positions)


# ------------------------------------------------------------------ layer pieces


class LayerPiece(nn.Module):
    """One decoder or encoder layer, called as the model calls it, with the masks and rotary
    tables it forms from the batch's inputs (``mask_fn`` and ``rotary`` are the model's own)."""

    takes_inputs = True

    def __init__(
        self,
        layer: nn.Module,
        config: Any,
        mask_fn: Callable,
        *,
        rotary: nn.Module | None = None,
        default_positions: bool = True,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.rotary_emb = rotary  # parameter-free: its buffers (inv_freq) are shared by every layer piece
        self.config = config
        self.mask_fn = mask_fn
        self.default_positions = default_positions  # decoders form arange positions; BERT passes the given ones

    def forward(self, h: Tensor, inputs: Any) -> Tensor:
        ids, attention_mask, _, positions = _fields(inputs)
        if self.default_positions:
            positions = _arange_positions(ids, positions)
        if attention_mask is not None and attention_mask.ndim < 4:
            attention_mask = attention_mask.view(h.shape[0], -1)
        mask_kwargs = dict(config=self.config, inputs_embeds=h, attention_mask=attention_mask, position_ids=positions)
        mask = self.mask_fn(**mask_kwargs)
        kwargs: dict[str, Any] = {"attention_mask": mask, "position_ids": positions}
        if self.rotary_emb is not None:
            kwargs["position_embeddings"] = self.rotary_emb(h, position_ids=positions)
        return self.layer(h, **kwargs)


class HeadPiece(nn.Module):
    """Final norm then the vocabulary head (either may be None): logits ``(B, T, V)``."""

    takes_inputs = False

    def __init__(self, norm: nn.Module | None, head: nn.Module | None) -> None:
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, h: Tensor) -> Tensor:
        if self.norm is not None:
            h = self.norm(h)
        return h if self.head is None else self.head(h)


# ------------------------------------------------------------------ building


def _family(model: nn.Module) -> tuple[str, str]:
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__], cls.__name__
    name = type(model).__name__
    raise UnsupportedStages(
        f"{name} is not a known decoder family for pipeline stages ({_KNOWN}): "
        "run it data-parallel with cluster.stages: 1"
    )


def _causal_mask(**kw):
    from transformers import masking_utils as mu

    return mu.create_causal_mask(cache=None, **kw)


def _sliding_mask(**kw):
    from transformers import masking_utils as mu

    return mu.create_sliding_window_causal_mask(cache=None, **kw)


def _bidirectional_mask(**kw):
    from transformers import masking_utils as mu

    return mu.create_bidirectional_mask(**kw)


def _mask_functions(config: Any, num_layers: int) -> list[Callable]:
    """Per layer, the mask function the model's forward uses: Qwen2's ``layer_types``, Mistral's
    ``sliding_window``, otherwise causal (module-level functions: the pieces pickle)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [_sliding_mask if layer_types[i] == "sliding_attention" else _causal_mask for i in range(num_layers)]
    return [_sliding_mask if getattr(config, "sliding_window", None) is not None else _causal_mask] * num_layers


def _bert_mask(config: Any) -> Callable:
    return _causal_mask if config.is_decoder else _bidirectional_mask


def _llama(model: Any, base: Any, head: nn.Module | None) -> list[nn.Module]:
    config = base.config
    layers = list(base.layers[: config.num_hidden_layers])
    masks = _mask_functions(config, len(layers))
    pieces: list[nn.Module] = [TokenEmbedding(base.embed_tokens)]
    pieces += [LayerPiece(layer, config, m, rotary=base.rotary_emb) for layer, m in zip(layers, masks, strict=True)]
    return [*pieces, HeadPiece(base.norm, head)]


def _gpt2(model: Any, base: Any, head: nn.Module | None) -> list[nn.Module]:
    config = base.config
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedStages(
            f"{type(model).__name__} with cross-attention is not supported by pipeline stages: "
            "run it data-parallel with cluster.stages: 1"
        )
    pieces: list[nn.Module] = [GPT2Embedding(base.wte, base.wpe, base.drop)]
    pieces += [LayerPiece(layer, config, _mask_functions(config, 1)[0]) for layer in base.h]
    return [*pieces, HeadPiece(base.ln_f, head)]


def _gpt_neox(model: Any, base: Any, head: nn.Module | None) -> list[nn.Module]:
    config = base.config
    pieces: list[nn.Module] = [TokenEmbedding(base.embed_in, base.emb_dropout)]
    causal = _mask_functions(config, 1)[0]
    pieces += [LayerPiece(layer, config, causal, rotary=base.rotary_emb) for layer in base.layers]
    return [*pieces, HeadPiece(base.final_layer_norm, head)]


def _bert(model: Any, base: Any, head: nn.Module | None) -> list[nn.Module]:
    config = base.config
    if getattr(base, "pooler", None) is not None:
        raise UnsupportedStages(
            f"{type(model).__name__} with a pooler is not supported by pipeline stages (the pooler does not feed "
            "the hidden states the loss reads): build it with add_pooling_layer=False, or run it data-parallel "
            "with cluster.stages: 1"
        )
    mask = _bert_mask(config)
    pieces: list[nn.Module] = [BertEmbedding(base.embeddings)]
    pieces += [LayerPiece(layer, config, mask, default_positions=False) for layer in base.encoder.layer]
    return pieces if head is None else [*pieces, HeadPiece(None, head)]


_BUILDERS = {
    "llama": ("model", ("lm_head",), _llama),
    "gpt2": ("transformer", ("lm_head",), _gpt2),
    "gpt_neox": ("gpt_neox", ("lm_head", "embed_out"), _gpt_neox),
    "bert": ("bert", ("cls",), _bert),
}


def pipeline_pieces(model: nn.Module) -> nn.Sequential:
    """``model`` as ``nn.Sequential(embedding, layer × L, head)`` of pieces sharing its submodules.

    Raises:
        UnsupportedStages: for a model outside the known families (one line: run it data-parallel).
        ValueError: when the pieces would not hold exactly the model's parameters (a model changed
            beyond its family's layout).
    """
    family, _ = _family(model)
    base_attr, head_attrs, build = _BUILDERS[family]
    base: Any = getattr(model, base_attr, None)
    if base is None:  # a base model itself (LlamaModel, GPT2Model, ...)
        base, head = model, None
    else:
        head = next((getattr(model, a) for a in head_attrs if getattr(model, a, None) is not None), None)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) not in ("eager", "sdpa", None):
        raise UnsupportedStages(
            f"{type(model).__name__} uses attention {config._attn_implementation!r}, which has no double backward: "
            "build it with attn_implementation sdpa or eager"
        )
    pieces = nn.Sequential(*build(model, base, head))
    mine = [id(p) for p in pieces.parameters()]
    theirs = [id(p) for p in model.parameters()]
    if mine != theirs:
        count = sum(p.numel() for p in pieces.parameters())
        total = sum(p.numel() for p in model.parameters())
        raise ValueError(
            f"the pipeline pieces of {type(model).__name__} hold {len(mine)} parameters ({count} values), the model "
            f"{len(theirs)} ({total} values), or in another order; run it data-parallel with cluster.stages: 1"
        )
    return pieces


def run_pieces(pieces: Iterable[nn.Module], inputs: Any) -> Tensor:
    """The pieces applied in turn: ``piece(h, inputs)`` where ``takes_inputs``, else ``piece(h)``."""
    h = None
    for piece in pieces:
        h = piece(h, inputs) if getattr(piece, "takes_inputs", False) else piece(h)
    assert h is not None
    return h


class PiecesModel(nn.Module):
    """The pieces as one module, called as a Hugging Face model (``model(input_ids)`` or
    ``model(**inputs)``), returning the last piece's output; its parameters are the model's."""

    def __init__(self, pieces: nn.Sequential) -> None:
        super().__init__()
        self.pieces = pieces

    def forward(self, input_ids: Tensor, **inputs: Tensor) -> Tensor:
        return run_pieces(self.pieces, {"input_ids": input_ids, **inputs} if inputs else input_ids)


# ------------------------------------------------------------------ checkpoint names


def _model_names(model: nn.Module) -> tuple[dict[int, str], dict[int, list[str]]]:
    """``(module id -> its name in the model, parameter id -> every name of it in the model, in order)``."""
    modules = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    params: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        params.setdefault(id(p), []).append(n)
    return modules, params


def piece_state_names(
    model: nn.Module, pieces: nn.Sequential, checkpoint_keys: Iterable[str] | None = None
) -> dict[str, str]:
    """Each parameter and buffer name of ``pieces`` (``"3.layer.mlp.up_proj.weight"``, every
    occurrence of a shared one) -> the ``state_dict`` name of the same tensor in ``model``.

    A tied parameter (head and embedding) maps to its own name when ``checkpoint_keys`` holds
    it, else to a name of the tie the checkpoint holds (``save_pretrained`` writes one:
    ``lm_head.weight`` maps to ``model.embed_tokens.weight``). Without ``checkpoint_keys``
    it maps to the tie's first name in the model (the embedding's, which ``save_pretrained``
    keeps). Buffers (including non-persistent ones such as rotary ``inv_freq``, which no
    checkpoint holds) map to their own names.

    Raises:
        CheckpointError: when ``checkpoint_keys`` holds no name of a parameter.
    """
    modules, params = _model_names(model)
    keys = None if checkpoint_keys is None else set(checkpoint_keys)
    out: dict[str, str] = {}

    def own(name: str) -> str:
        owner, _, leaf = name.rpartition(".")
        path = modules[id(pieces.get_submodule(owner))]
        return f"{path}.{leaf}" if path else leaf

    for name, p in pieces.named_parameters(remove_duplicate=False):
        mine, names = own(name), params[id(p)]
        if keys is None:
            out[name] = names[0]
            continue
        found = [mine] if mine in keys else [n for n in names if n in keys]
        if not found:
            raise CheckpointError(f"the checkpoint holds none of {names} (parameter {name!r} of the pipeline pieces)")
        out[name] = found[0]
    for name, _ in pieces.named_buffers(remove_duplicate=False):
        out[name] = own(name)
    return out


def stage_state_keys(names: Mapping[str, str], children: Iterable[int]) -> set[str]:
    """The checkpoint names a stage holding ``children`` (indices into the pieces) reads."""
    wanted = {str(i) for i in children}
    return {v for k, v in names.items() if k.split(".", 1)[0] in wanted}


def load_stage_state(
    pieces: nn.Sequential,
    names: Mapping[str, str],
    state: Mapping[str, Tensor],
    children: Iterable[int],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> None:
    """Assign the checkpoint tensors of the pieces in ``children`` (parameters on meta or real).

    A shared parameter (a tied embedding and head) becomes one new parameter in every
    place it has in ``pieces``, so a tie stays a tie; the other parameters of pieces
    outside ``children`` stay as they are (on meta in a skeleton). Floating tensors take ``dtype``;
    buffers the checkpoint holds are assigned, the others (computed by the constructor, such
    as rotary ``inv_freq``) keep their dtype; everything in the stage moves to ``device``.

    Raises:
        CheckpointError: for a parameter the checkpoint lacks or a shape that differs.
    """
    children = sorted(set(children))
    places: dict[int, list[tuple[nn.Module, str]]] = {}  # every place of each parameter, in every piece
    for name, p in pieces.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        places.setdefault(id(p), []).append((pieces.get_submodule(owner), leaf))
    made: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for i in children:
            piece = pieces[i]
            for name, p in list(piece.named_parameters(remove_duplicate=False)):
                key = names[f"{i}.{name}"]
                if id(p) in made:
                    continue
                if key not in state:
                    raise CheckpointError(f"the checkpoint lacks {key!r} (parameter {i}.{name} of the pipeline)")
                src = state[key]
                if tuple(src.shape) != tuple(p.shape):
                    raise CheckpointError(
                        f"checkpoint tensor {key!r} has shape {tuple(src.shape)}, the model expects {tuple(p.shape)}"
                    )
                value = src.to(device=device, dtype=dtype if src.is_floating_point() else src.dtype)
                new = made[id(p)] = nn.Parameter(value, requires_grad=p.requires_grad)
                made[id(new)] = new  # a later piece of these children already holds the new one
                for module, leaf in places[id(p)]:  # a tie stays one parameter, in this stage and beyond
                    module._parameters[leaf] = new
            for name, b in list(piece.named_buffers(remove_duplicate=False)):
                key = names[f"{i}.{name}"]
                owner, _, leaf = name.rpartition(".")
                module = piece.get_submodule(owner)
                if key in state:
                    src = state[key]
                    module._buffers[leaf] = src.to(device=device, dtype=dtype if src.is_floating_point() else b.dtype)
                elif b is not None:
                    module._buffers[leaf] = b.to(device=device)
