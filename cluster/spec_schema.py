"""A JSON Schema (draft 2020-12) of job specs, generated from the spec parser itself.

Nothing here lists an option, a default or an allowed value by hand. The keys come from the
spec's dataclasses (:class:`cluster.spec.JobSpec` and its sections) and the kinds' registry
(:data:`cluster.kinds.KINDS`: every option, its default and the words of its check); what each
key accepts is found by asking the parser: :func:`cluster.spec.parse_spec` (or a kind's check)
is tried on a fixed set of sample values (null, booleans, integers, fractions, strings, lists,
mappings), and the schema states what it accepted: the types, the lower and upper bounds at 0
and 1, an even step, the allowed words (the candidates are the words of the check or of the
parser's error message, each confirmed by the parser), list lengths, required keys and the keys
of nested mappings (read from the parser's "valid keys" message). ``tests/cluster/test_cli_schema.py``
checks that the schema and the parser agree on every option for a bank of values.

The schema is for editors (``# yaml-language-server: $schema=...``) and quick checks; rules
across options (``barrier`` needs ``between``, ``cluster.stages`` must divide a group, ...) are
the parser's alone: ``probe validate SPEC`` applies every rule.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from cluster.kinds import KINDS
from cluster.spec import JobSpec, SpecError, parse_spec
from cluster.spec_sections import ClusterSpec, DataSpec, ModelSpec, OutputSpec

__all__ = ["DRAFT", "SCHEMA_FILE", "spec_schema", "option_schema"]

DRAFT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_FILE = "docs/spec.schema.json"  # the checked-in copy, relative to the repository root

_UNLISTED = "zz-unlisted-value"  # a string no option lists
_FACTORY_LIKE = "zz.unlisted:value"  # 'package.module:callable'
FACTORY_PATTERN = r"^[^:]+:[^:]+$"  # exactly one ':' with text on both sides (cluster.spec_sections._check_factory)
_INTS = (*range(-3, 13), 100, 1000)
_FLOATS = (-0.5, 1e-9, 0.25, 0.5, 0.999999, 1.5, 1e9)
_WORDS = re.compile(r"'([^']+)'|([A-Za-z_][A-Za-z0-9_+.\-]*[A-Za-z0-9+])")
_VALID_KEYS = re.compile(r"valid keys(?: of [^:]+)?: ([^;]+)$")
_SECTIONS = {"model": ModelSpec, "data": DataSpec, "cluster": ClusterSpec, "output": OutputSpec}
# Contexts in which a key is tried (a value counts as accepted in any of them): a factory model
# and a Hugging Face model, on a cluster whose worker count every small group size and stage
# count divides. Names and factories are placeholders; nothing is imported.
_BASES = (
    {
        "name": "zz",
        "model": {"factory": "zz.mod:fn", "checkpoints": ["zz.safetensors"]},
        "data": {"factory": "zz.mod:fn"},
        "probes": [{"kind": "eigenvalues"}],
        "cluster": {"num_workers": 720720000},
    },
    {
        "name": "zz",
        "model": {"hf": "zz"},
        "data": {"factory": "zz.mod:fn"},
        "probes": [{"kind": "eigenvalues"}],
        "cluster": {"num_workers": 720720000},
    },
)


def _words(text: str) -> list[str]:
    return list(dict.fromkeys(q or w for q, w in _WORDS.findall(text)))


def _safe(accepts: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def call(value: Any) -> bool:
        try:
            return bool(accepts(value))
        except Exception:  # noqa: BLE001 - a check that raises on a sample rejects it
            return False

    return call


def _numeric(accepts: Callable[[Any], bool]) -> dict | None:
    ints = [i for i in _INTS if accepts(i)]
    if any(accepts(f) for f in _FLOATS):
        out: dict[str, Any] = {"type": "number"}
        if not accepts(-1e9):
            out.update({"minimum": 0} if accepts(0) else {"exclusiveMinimum": 0})
        if not accepts(1e9):
            out.update({"maximum": 1} if accepts(1) else {"exclusiveMaximum": 1})
        return out
    if not ints:
        return None
    if _INTS[-1] not in ints:  # a few integers only
        return {"enum": ints}
    out = {"type": "integer"}
    if _INTS[0] not in ints:
        low = min(ints)
        out["minimum"] = low
        if not accepts(low + 1) and accepts(low + 2):
            out["multipleOf"] = 2
    return out


def _string(accepts: Callable[[Any], bool], hint: str, default: Any) -> dict | None:
    if accepts(_UNLISTED):
        return {"type": "string"}
    if accepts(_FACTORY_LIKE):
        return {"type": "string", "pattern": FACTORY_PATTERN}
    candidates = _words(hint) + ([default] if isinstance(default, str) else [])
    allowed = [w for w in dict.fromkeys(candidates) if accepts(w)]
    return {"enum": allowed} if allowed else None


def _array(accepts: Callable[[Any], bool], hint: str, default: Any) -> dict | None:
    items_default = [x for x in default if isinstance(x, str)] if isinstance(default, (list, tuple)) else []
    candidates = [*_words(hint), *items_default, _UNLISTED]
    for repeat in (1, 2):
        one = _safe(lambda x, r=repeat: accepts([x] * r))
        good = next((c for c in candidates if one(c)), None)
        if good is None:
            continue
        out: dict[str, Any] = {
            "type": "array",
            "items": _string(one, hint, items_default[0] if items_default else None),
        }
        lengths = [n for n in range(5) if accepts([good] * n)]
        if lengths and min(lengths) > 0:
            out["minItems"] = min(lengths)
        if lengths and 4 not in lengths:
            out["maxItems"] = max(lengths)
        return out
    return None


def infer(accepts: Callable[[Any], bool], hint: str = "", default: Any = None) -> dict:
    """The schema of the values ``accepts`` takes, found by trying sample values.

    Args:
        accepts: whether the parser takes a value (exceptions count as no).
        hint: words that may name allowed values (a check's words, an error message).
        default: the default, tried as a candidate word.
    """
    accepts = _safe(accepts)
    branches: list[dict] = []
    if accepts(None):
        branches.append({"type": "null"})
    if accepts(True) and accepts(False):
        branches.append({"type": "boolean"})
    for make in (_numeric, lambda a: _string(a, hint, default), lambda a: _array(a, hint, default)):
        if (b := make(accepts)) is not None:
            branches.append(b)
    if accepts({}):
        branches.append({"type": "object"})
    if len(branches) == 6:  # the parser takes anything here
        return {}
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", type(None): "null"}


def _declared_types(annotation: Any) -> set[str]:
    """JSON types of a dataclass field's annotation; a ``tuple[str, ...]`` also takes one string
    (``model.checkpoints: x.safetensors``)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    out: set[str] = set()
    for t in args or (annotation,):
        origin = typing.get_origin(t) or t
        if origin in (tuple, list):
            out |= {"array", "string"}
        elif origin in _JSON_TYPES:
            out.add(_JSON_TYPES[origin])
            if origin is float:
                out.add("integer")
    return out


def _restrict(schema: dict, declared: set[str]) -> dict:
    """Keep the branches of ``schema`` whose type the field declares (the parser passes some values
    through unchecked: a dict where a list is expected becomes its keys)."""
    if not declared or not schema:
        return {"type": sorted(declared)} if declared and not schema else schema
    branches = schema.get("anyOf", [schema])

    def kind(b: dict) -> str:
        if "type" in b:
            return b["type"]
        values = b.get("enum", [])
        return "string" if all(isinstance(v, str) for v in values) else "integer"

    kept = [b for b in branches if kind(b) in declared]
    return kept[0] if len(kept) == 1 else {"anyOf": kept}


def option_schema(kind: str, option: str) -> dict:
    """The schema of one probe option: what its check accepts, its default and its words."""
    k = KINDS[kind]
    check, words = k.checks[option]
    default = k.options[option]
    schema = infer(check, words, default)
    if default is not None or _safe(check)(None):  # a None default the check refuses means "required"
        schema["default"] = default
    return {**schema, "description": words}


def _probe_schema(kind: str) -> dict:
    k = KINDS[kind]
    return {
        "type": "object",
        "properties": {"kind": {"const": kind}, **{o: option_schema(kind, o) for o in k.options}},
        "required": ["kind"],
        "additionalProperties": False,
    }


# ---------------------------------------------------------------- keys tried through parse_spec


def _error(raw: dict | None) -> str | None:
    """None when ``parse_spec`` takes ``raw``, else its message."""
    if raw is None:
        return "not a mapping"
    try:
        parse_spec(raw)
    except (SpecError, TypeError, ValueError) as exc:
        return str(exc)
    return None


def _with(base: dict, path: tuple[str, ...], value: Any) -> dict | None:
    """``base`` with ``value`` at ``path`` (``_MISSING``: the key removed); None where ``path`` runs
    through something that is not a mapping."""
    raw = copy.deepcopy(base)
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            return None
    if value is _MISSING:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return raw


_MISSING = object()


def _key_schema(path: tuple[str, ...], default: Any, declared: set[str]) -> dict:
    def accepts(value: Any) -> bool:
        return any(_error(_with(b, path, value)) is None for b in _BASES)

    hint = " ".join(m for b in _BASES for v in (_UNLISTED, -7, 1.5, []) if (m := _error(_with(b, path, v))))
    out = _restrict(infer(accepts, hint, default), declared)
    if "object" in declared:
        out = _mapping(path, out)
    if default is not dataclasses.MISSING and default is not None and not callable(default):
        out["default"] = list(default) if isinstance(default, tuple) else default
    return out


def _valid_keys(path: tuple[str, ...], probe: dict) -> list[str]:
    """The keys the parser lists as valid for the mapping at ``path`` (from its unknown-key message)."""
    for b in _BASES:
        message = _error(_with(b, path, {**probe, "zz_unlisted": 1})) or ""
        if m := _VALID_KEYS.search(message):
            return [k.strip() for k in m.group(1).split(",")]
    return []


def _mapping(path: tuple[str, ...], scalar: dict) -> dict:
    """A key that takes a mapping whose own keys the parser checks (``loss``), or a mapping of
    such mappings (``data.eval_sets``); other mappings (``kwargs``) stay free."""
    probe = {"factory": _FACTORY_LIKE}
    keys = _valid_keys(path, probe)
    entry_path: tuple[str, ...] = path
    if not keys:  # a mapping of named entries
        entry_path = (*path, "zz")
        keys = _valid_keys(entry_path, probe)
        if not keys:
            return scalar
    props = {}
    for key in keys:
        sub = (*entry_path, key)
        props[key] = infer(
            lambda v, s=sub: any(_error(_with(b, s[:-1], {**probe, s[-1]: v})) is None for b in _BASES),
            " ".join(m for b in _BASES if (m := _error(_with(b, sub[:-1], {**probe, sub[-1]: _UNLISTED})))),
        )
    required = [
        k for k in keys if all(_error(_with(b, entry_path, {p: v for p, v in probe.items() if p != k})) for b in _BASES)
    ]
    obj = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        obj["required"] = required
    if entry_path != path:
        obj = {"type": "object", "additionalProperties": obj}
    branches = [b for b in scalar.get("anyOf", [scalar]) if b.get("type") != "object"]
    return {"anyOf": [*branches, obj]} if branches else obj


def _section_schema(name: str, cls) -> dict:
    fields = dataclasses.fields(cls)
    hints = typing.get_type_hints(cls)
    props = {}
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.MISSING
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        props[f.name] = _key_schema((name, f.name), default, _declared_types(hints[f.name]))
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if cls.__doc__:
        out["description"] = " ".join(cls.__doc__.split())
    # per context, the keys it cannot do without: required in every context, or one context's set
    needed = [[f.name for f in fields if _error(_with(b, (name, f.name), _MISSING))] for b in _BASES]
    common = [n for n in needed[0] if all(n in other for other in needed)]
    if common:
        out["required"] = common
    if any(set(n) != set(common) for n in needed):
        out["anyOf"] = [{"required": n} for n in needed]
    return out


def spec_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a job spec, as ``probe schema`` prints it."""
    from cluster.spec import _NAME

    props: dict[str, Any] = {}
    hints = typing.get_type_hints(JobSpec)
    for f in dataclasses.fields(JobSpec):
        if f.name in _SECTIONS:
            props[f.name] = _section_schema(f.name, _SECTIONS[f.name])
        elif f.name == "probes":
            props["probes"] = {
                "type": "array",
                "minItems": 1,
                "items": {"anyOf": [{"enum": list(KINDS)}, *(_probe_schema(k) for k in KINDS)]},
            }
        else:
            props[f.name] = _key_schema((f.name,), f.default, _declared_types(hints[f.name]))
    props["name"] = {"type": "string", "pattern": _NAME.pattern}
    required = [
        f.name for f in dataclasses.fields(JobSpec) if all(_error(_with(b, (f.name,), _MISSING)) for b in _BASES)
    ]
    return {
        "$schema": DRAFT,
        "title": "landscape-probe job spec",
        "description": (
            "Generated by `probe schema` from the spec parser (cluster/spec_schema.py); rules across keys are "
            "checked by `probe validate SPEC`."
        ),
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }
