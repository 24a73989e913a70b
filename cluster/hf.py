"""Hugging Face models built from a checkpoint's own ``config.json``, with no factory.

``model: {hf: PATH}`` in a spec names a folder written by ``save_pretrained`` (or a
training run's folder of them). Each checkpoint's model is built from the
``config.json`` beside its weights (else the one in ``PATH``) with transformers'
classes, its parameters on the meta device (no full-size random initialization in
host memory; buffers such as rotary tables are computed as usual), then the
checkpoint's tensors are assigned into it by :func:`load_state_into`, which ties
shared parameters as the model shares them.

- ``hf_class``: ``auto`` (the class the config's ``architectures`` names),
  ``causal_lm``, ``masked_lm``, ``sequence_classification`` or ``base`` (the Auto
  classes). A head model loads a base model's checkpoint (keys without the
  ``base_model_prefix``, e.g. ``bert.``) when the head's own tensors are in it or tied
  (GPT-2's head is the embedding); a base model loads a head model's, leaving the head's
  tensors out, when the checkpoint holds every base tensor (a BERT masked-LM checkpoint
  has no pooler: that fails naming the pooler's keys).
- ``attn_implementation``: ``sdpa`` (default; products run with its math kernel,
  :func:`probe.model_operator.double_backward_attention`) or ``eager``. Kernels
  without a double backward (``flash_attention_2``/``3``, ``flex_attention``,
  hub kernels) are refused with the value to use.
- Remote code (``auto_map`` in the config) is never run: the class must be one
  that transformers ships.

``transformers`` is the optional extra ``landscape-probe[hf]``; without it, using
``hf`` fails with one line naming the extra.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cluster.checkpoints import CheckpointError, is_index, load_checkpoint, safetensors_header, shard_files

__all__ = [
    "HF_CLASSES",
    "ATTENTION",
    "HfError",
    "require_transformers",
    "config_path",
    "hf_skeleton",
    "build_hf_model",
    "load_state_into",
    "prefix_keys",
    "tensor_names",
    "checkpoint_dtype",
    "check_hf_checkpoint",
    "attention_of",
    "resolve_precision",
    "describe",
]

HF_CLASSES = {
    "auto": None,
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "base": "AutoModel",
}
# Attention implementations whose graphs can be differentiated twice.
ATTENTION = ("sdpa", "eager")
_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "BF16": "bfloat16",
    "F16": "float16",
    "float64": "float64",
    "float32": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
}


class HfError(CheckpointError):
    """A Hugging Face model that cannot be built or loaded; the message names the file and the fix."""


def require_transformers():
    """The ``transformers`` module, or one line naming the extra that installs it."""
    try:
        import transformers
    except ImportError as exc:
        raise HfError("model.hf needs the 'transformers' package: pip install 'landscape-probe[hf]'") from exc
    return transformers


def config_path(checkpoint: str | Path, hf_root: str | Path | None = None) -> Path:
    """The ``config.json`` a checkpoint's model is built from: beside its weights, else in ``hf_root``.

    Raises:
        HfError: naming the checkpoint when neither holds a config.json.
    """
    here = Path(checkpoint).parent / "config.json"
    if here.is_file():
        return here
    if hf_root is not None:
        root = Path(hf_root)
        root = root if root.is_dir() else root.parent
        if (root / "config.json").is_file():
            return root / "config.json"
    raise HfError(
        f"checkpoint {str(checkpoint)!r} has no config.json beside it"
        f"{'' if hf_root is None else f' nor in {str(hf_root)!r}'}; model.hf needs the folder save_pretrained wrote"
    )


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every parameter on the meta device while buffers stay real (rotary tables,
    position ids are computed by the model's constructor as usual). A parameter that is
    already on meta (a tie, ``lm_head.weight = embed.weight``) is kept as the same object."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and not p.is_meta:
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # pyright: ignore[reportAttributeAccessIssue]  # patched for the block
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _read_config(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HfError(f"config {str(path)!r} is not readable JSON ({exc}); write it with save_pretrained") from exc
    if not isinstance(raw, dict):
        raise HfError(f"config {str(path)!r} is not a JSON object; write it with save_pretrained")
    return raw


def attention_of(raw_config: dict, requested: str | None, config_file: str | Path = "config.json") -> str:
    """The attention implementation to build with: ``requested``, else the config's, else ``sdpa``.

    Raises:
        HfError: for an implementation without a double backward, naming the setting and the fix.
    """
    saved = raw_config.get("attn_implementation") or raw_config.get("_attn_implementation")
    impl = requested or saved or "sdpa"
    if impl not in ATTENTION:
        where = "model.attn_implementation" if requested else f"the config's attn_implementation ({str(config_file)!r})"
        raise HfError(
            f"{where} is {impl!r}, whose kernel has no double backward (Hessian-vector products need one); "
            f"set model.attn_implementation: sdpa (run with its math kernel) or eager"
        )
    return impl


def hf_skeleton(
    config_file: str | Path,
    hf_class: str = "auto",
    attn_implementation: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The model a ``config.json`` describes, its parameters on the meta device (ties in place).

    Raises:
        HfError: naming the config file when transformers cannot build it (unknown
            architecture, remote code, invalid values) or the attention cannot be differentiated twice.
    """
    transformers = require_transformers()
    config_file = Path(config_file)
    raw = _read_config(config_file)
    impl = attention_of(raw, attn_implementation, config_file)
    if raw.get("auto_map"):
        raise HfError(
            f"config {str(config_file)!r} names remote code (auto_map); landscape-probe never runs code from a "
            "checkpoint folder: use a class that transformers ships, or a model.factory"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_file.parent), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad configs
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HfError(f"config {str(config_file)!r} cannot be read by transformers: {first}") from exc
    if hasattr(config, "use_cache"):
        config.use_cache = False  # no key/value cache objects in probe forwards
    if hf_class == "auto":
        names = [a for a in (config.architectures or []) if isinstance(a, str)]
        cls = getattr(transformers, names[0], None) if names else None
        if cls is None:
            raise HfError(
                f"config {str(config_file)!r} names no architecture transformers ships "
                f"({names[0] if names else 'architectures is empty'}); set model.hf_class to one of "
                f"{', '.join(c for c in HF_CLASSES if c != 'auto')}"
            )
        build = cls._from_config
    elif hf_class in HF_CLASSES:
        build = getattr(transformers, HF_CLASSES[hf_class]).from_config
    else:
        raise HfError(f"model.hf_class must be one of {', '.join(HF_CLASSES)}, got {hf_class!r}")
    try:
        with _parameters_on_meta():
            model = build(config, attn_implementation=impl, dtype=dtype)
    except HfError:
        raise
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HfError(
            f"config {str(config_file)!r}: transformers cannot build "
            f"{hf_class if hf_class != 'auto' else 'its architecture'} "
            f"from it: {first}; check the config's values or model.hf_class"
        ) from exc
    model.eval()
    return model


def _module_and_leaf(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, leaf = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), leaf


def _ignored(model: nn.Module, attr: str, names) -> set[str]:
    patterns = getattr(model, attr, None) or []
    return {n for n in names if any(re.search(p, n) for p in patterns)}


def prefix_keys(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """Map a base model's checkpoint into a head model and back, by ``base_model_prefix``
    (``{name: name}`` in gives ``{model's name: file's name}`` out)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix:
        return state
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    expected |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    if not state or any(k in expected for k in state):
        return state
    if all(f"{prefix}.{k}" in expected for k in list(state)[:8]):
        return {f"{prefix}.{k}": v for k, v in state.items()}
    stripped = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
    if stripped and any(k in expected for k in stripped):
        return stripped  # a base model from a head model's checkpoint: the head is left out
    return state


def load_state_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    checkpoint: str,
    *,
    what: str,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    allow_missing_buffers: bool = False,
) -> None:
    """Assign a checkpoint's tensors to ``model`` (parameters on meta or real), tying shared ones.

    A parameter shared by several modules (a tied embedding and head) is one tensor: it
    loads from whichever of its names the checkpoint holds (``save_pretrained`` writes
    one), and every module that shares it gets the same new parameter. Names the
    model ignores by declaration (transformers' ``_keys_to_ignore_on_load_*``) and
    stale copies of buffers (``position_ids``) are accepted.

    Raises:
        CheckpointError: for missing keys that no tie covers, unexpected keys, tied
            names holding different values, or shapes that differ, naming the
            checkpoint and the first few keys (``what`` says what the model came from).
    """
    state = prefix_keys(model, state)
    groups: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), (p, []))[1].append(name)
    buffers = dict(model.named_buffers(remove_duplicate=False))
    persistent = set(model.state_dict(keep_vars=True))
    missing, used = [], set()
    chosen: list[tuple[nn.Parameter, list[str], torch.Tensor]] = []
    for p, names in groups.values():
        present = [n for n in names if n in state]
        used.update(present)
        if not present:
            missing.append(names[0])
            continue
        src = state[present[0]]
        for other in present[1:]:
            if state[other].shape != src.shape or (not src.is_meta and not torch.equal(state[other], src)):
                raise CheckpointError(
                    f"checkpoint {checkpoint!r}: tensors {present[0]!r} and {other!r} are tied in the model but "
                    "hold different values; re-save the checkpoint from the tied model"
                )
        chosen.append((p, names, src))
    for name, b in buffers.items():
        if name in state:
            used.add(name)
        elif name in persistent and (b.is_meta or not allow_missing_buffers):
            missing.append(name)
    missing = sorted(set(missing) - _ignored(model, "_keys_to_ignore_on_load_missing", missing))
    unexpected = sorted(set(state) - used)
    unexpected = sorted(set(unexpected) - _ignored(model, "_keys_to_ignore_on_load_unexpected", unexpected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {checkpoint!r} does not match {what}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}"
        )
    for p, names, src in chosen:
        if src.shape != p.shape:
            raise CheckpointError(
                f"checkpoint {checkpoint!r}: tensor {names[0]!r} has shape {tuple(src.shape)}, "
                f"the model expects {tuple(p.shape)}"
            )
    for name, b in buffers.items():
        if name in state and state[name].shape != b.shape:
            raise CheckpointError(
                f"checkpoint {checkpoint!r}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                f"the model expects {tuple(b.shape)}"
            )
    with torch.no_grad():
        for p, names, src in chosen:
            value = src.to(device=device, dtype=dtype if src.is_floating_point() else src.dtype)
            new = nn.Parameter(value, requires_grad=p.requires_grad)
            for name in names:
                module, leaf = _module_and_leaf(model, name)
                module._parameters[leaf] = new
        for name, b in buffers.items():
            module, leaf = _module_and_leaf(model, name)
            if name in state:
                src = state[name]
                module._buffers[leaf] = src.to(device=device, dtype=b.dtype if not src.is_floating_point() else dtype)
    # Buffers the model computed itself keep the dtype it gave them (rotary tables stay float32 in a
    # bfloat16 model, as transformers keeps them: rounded to bf16 they would shift long positions).
    model.to(device=device)


def _header_tensors(path: Path) -> dict[str, dict]:
    """Name -> header entry (dtype, shape) of a safetensors file or sharded index, reading no tensor."""
    named = None
    if is_index(path):
        named = set(json.loads(path.read_text()).get("weight_map") or {})
    files = shard_files(path) if is_index(path) else [path]
    found: dict[str, dict] = {}
    for f in files:
        if f.suffix != ".safetensors":
            return {}
        header, _ = safetensors_header(f)
        found.update({k: v for k, v in header.items() if k != "__metadata__" and (named is None or k in named)})
    return found


def tensor_names(checkpoint: str | Path) -> list[str]:
    """The tensor names a checkpoint file holds: from its safetensors headers (or a sharded index's
    shards) without reading a tensor; a PyTorch file (read safely, whole) otherwise."""
    found = _header_tensors(Path(checkpoint))
    if found:
        return list(found)
    return list(load_checkpoint(checkpoint)[0])


def checkpoint_dtype(path: str | Path) -> str | None:
    """The floating dtype of a checkpoint's tensors (``float32``, ``bfloat16``, ...), from its
    safetensors headers, else the ``dtype``/``torch_dtype`` of the config.json beside it; None if unknown."""
    path = Path(path)
    counts: dict[str, int] = {}
    try:
        for info in _header_tensors(path).values():
            name = _DTYPE_NAMES.get(str(info.get("dtype")))
            if name:
                n = 1
                for d in info.get("shape", []):
                    n *= int(d)
                counts[name] = counts.get(name, 0) + n
    except (CheckpointError, OSError):
        counts = {}
    if counts:
        return max(counts, key=lambda k: counts[k])
    cfg = path.parent / "config.json"
    if cfg.is_file():
        try:
            raw = json.loads(cfg.read_text())
        except (OSError, ValueError):
            return None
        return _DTYPE_NAMES.get(str(raw.get("dtype") or raw.get("torch_dtype") or ""))
    return None


def check_hf_checkpoint(
    path: str | Path, *, hf_root: str | Path | None, hf_class: str = "auto", attn_implementation: str | None = None
) -> nn.Module:
    """Everything about an HF checkpoint that can be checked before any worker starts, without
    reading a tensor: the config builds (on meta), the attention can be differentiated twice,
    and the weights' names and shapes (from safetensors headers) match the model, ties allowed.
    Returns the skeleton.

    Raises:
        HfError, CheckpointError: one line naming the file and the fix.
    """
    path = Path(path)
    cfg = config_path(path, hf_root)
    key = (cfg.read_bytes(), hf_class, attn_implementation)
    if key not in _SKELETONS:  # a run's checkpoints share one config: build it once
        _SKELETONS.clear()
        _SKELETONS[key] = hf_skeleton(cfg, hf_class, attn_implementation)
    header = _header_tensors(path)
    if header:
        model = copy.deepcopy(_SKELETONS[key])  # parameters on meta: copies no data
        fake = {
            k: torch.empty([int(d) for d in v.get("shape", [])], device="meta")
            for k, v in header.items()
            if not k.startswith("optimizer.")
        }
        try:
            load_state_into(
                model,
                fake,
                str(path),
                what=f"its config {str(cfg)!r} ({type(model).__name__})",
                dtype=torch.float32,
                device="meta",
                allow_missing_buffers=True,
            )
        except CheckpointError as exc:
            raise HfError(
                f"{exc}; the weights were not written for this config (model.hf_class, or the checkpoint's config.json)"
            ) from exc
    return _SKELETONS[key]


_SKELETONS: dict[tuple, nn.Module] = {}


def resolve_precision(precision: str, hf: bool, checkpoint: str | None) -> tuple[str, str]:
    """``(precision, note)``: ``auto`` becomes the checkpoint's dtype for a model.hf, and float32 for a
    factory model.

    A float16 checkpoint runs in float32 under ``auto`` (``precision: float16`` is available): its
    weights are exact in float32, and measured against float64 (docs/benchmarks.md, "Mixed precision"; 2-core
    x86_64, torch 2.13.0+cpu) a float32 product of all-MiniLM-L6-v2 was within 1.5e-6 and a float16
    one (loss-scaled) within 2.9e-3, the estimates of a trained Llama within 4e-7 (float32) and
    4e-5 to 3.4e-4 (float16), and a float16 product took 4-11x as long as a float32 one on that
    CPU. float16 halves the memory of the parameters and the graph; choose it for that.
    """
    if precision != "auto":
        return precision, ""
    if not hf or checkpoint is None:
        return "float32", ""
    found = checkpoint_dtype(checkpoint)
    if found in ("float64", "float32", "bfloat16"):
        return found, ""
    if found == "float16":
        return "float32", "float16 checkpoint probed in float32 (exact weights; precision: float16 halves memory)"
    return "float32", ""


def build_hf_model(
    checkpoint: str,
    state: dict[str, torch.Tensor],
    *,
    hf_root: str | None,
    hf_class: str,
    attn_implementation: str | None,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """The checkpoint's model: built from its config.json on meta, its tensors assigned (ties kept)."""
    cfg = config_path(checkpoint, hf_root)
    model = hf_skeleton(cfg, hf_class, attn_implementation, dtype)
    load_state_into(
        model,
        state,
        checkpoint,
        what=f"its config {str(cfg)!r} ({type(model).__name__})",
        dtype=dtype,
        device=device,
        allow_missing_buffers=True,
    )
    return model


def describe(model: nn.Module) -> dict[str, Any]:
    """What a row records of an HF model: class, attention in effect, unique parameter count."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    return {
        "model_class": type(model).__name__,
        "attention": f"{impl} (math kernel)" if impl == "sdpa" else impl,
    }
