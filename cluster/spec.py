"""Job specs: YAML validated into frozen config objects.

A spec names the model factory and checkpoints, the probe data, the loss, the
precision and mode policy, the cluster shape, the probes and where results go
(README.md, "Job specs"). Every section is a frozen dataclass
checked at construction; an unknown key is an error that lists the valid ones,
and ``--set key.path=value`` overrides any value before validation.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.kinds import KINDS
from cluster.probe_options import PROBE_OPTIONS  # noqa: F401 - importable from here (tests, callers)
from cluster.spec_sections import (
    ClusterSpec,
    DataSpec,
    ModelSpec,
    OutputSpec,
    SpecError,
    _check_factory,
    _check_keys,
    import_factory,
)

__all__ = [
    "SpecError",
    "JobSpec",
    "ModelSpec",
    "DataSpec",
    "ClusterSpec",
    "ProbeSpec",
    "OutputSpec",
    "load_spec",
    "parse_spec",
    "apply_overrides",
    "import_factory",
    "PROBE_OPTIONS",
]


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that reads ``1e-8`` as a float (YAML 1.2; PyYAML's 1.1 rules need a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# bfloat16, float16: products in that format, vectors and sums in vector_dtype (default float32);
# float16 products at a loss scale (probe.loss_scale). auto: a model.hf checkpoint's own dtype
# (float16 checkpoints run in float32: see cluster.hf.resolve_precision), float32 for a model.factory.
PRECISIONS = ("auto", "float32", "float64", "bfloat16", "float16")
# the operators' vectors, sums and results (accumulate_dtype); None: float32 for 16-bit precisions,
# the parameters' dtype otherwise. Lanczos scalars and tridiagonal eigenproblems are float64 always.
VECTOR_DTYPES = ("float32", "float64")
# how products are formed: exact (reverse over reverse) only; finite differences were measured and not
# built (docs/benchmarks.md, "Models no known family covers")
HVPS = ("exact",)
MODES = ("eval", "train")
# lm_cross_entropy: token mean over targets already aligned with positions, -100 ignored;
# causal_lm: Hugging Face's convention (labels = input_ids, shifted here), then the same token mean;
# model: the loss the model itself returns when given the labels (per-batch, weighted by examples).
LOSSES = ("cross_entropy", "mse", "lm_cross_entropy", "causal_lm", "model")
WEIGHTINGS = ("examples", "tokens")


_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._ -]*$")


def _check_name(name: Any) -> None:
    """Job names start with a letter: they name result folders, Ray jobs and metric label values
    (and hive inference typed a numeric name as a number in the results layout before schema 4)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(f"name must start with a letter and use letters, digits, '.', '_', '-' or spaces, got {name!r}")


@dataclass(frozen=True)
class ProbeSpec:
    """One probe: its ``kind`` (a key of :data:`cluster.kinds.KINDS`) and the options the spec sets,
    checked against the kind's at construction."""

    kind: str
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SpecError(f"unknown probe kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        kind = KINDS[self.kind]
        _check_keys(f"probes[{self.kind}]", self.options, list(kind.options))
        for name, value in self.options.items():
            check, expected = kind.checks[name]
            if not check(value):
                raise SpecError(f"probes[{self.kind}].{name} must be {expected}, got {value!r}")
        if kind.validate is not None and (message := kind.validate(self.options, self.resolved())):
            raise SpecError(message)

    def resolved(self) -> dict:
        """The options with defaults filled in (what the probe runs with and what is recorded)."""
        return {**KINDS[self.kind].options, **self.options}


@dataclass(frozen=True)
class JobSpec:
    """A whole job.

    ``loss`` is a built-in name (``cross_entropy``, ``mse``: means over examples;
    ``lm_cross_entropy``: next-token cross-entropy over logits ``(B, T, V)``, the mean
    over targets ``!= -100``, weighted by tokens) or ``{factory, kwargs, weighting}``,
    where ``weighting`` is ``examples`` (default) or ``tokens`` (the factory's loss
    must then be a per-batch token mean; see :mod:`probe.batches`).
    """

    name: str
    model: ModelSpec
    data: DataSpec
    probes: tuple[ProbeSpec, ...]
    loss: str | dict = "cross_entropy"
    precision: str = "auto"
    vector_dtype: str | None = None
    hvp: str = "exact"
    mode: str = "eval"
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    seed: int = 0

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.precision not in PRECISIONS:
            raise SpecError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.vector_dtype is not None and self.vector_dtype not in VECTOR_DTYPES:
            raise SpecError(
                f"vector_dtype must be one of {', '.join(VECTOR_DTYPES)} (default: float32 for 16-bit precisions, "
                f"the parameters' dtype otherwise), got {self.vector_dtype!r}"
            )
        if self.vector_dtype == "float32" and self.precision == "float64":
            raise SpecError("vector_dtype: float32 is narrower than precision: float64; use float64 or leave it out")
        if self.mode not in MODES:
            raise SpecError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.loss, dict):
            _check_keys("loss", self.loss, ["factory", "kwargs", "weighting"])
            _check_factory("loss.factory", self.loss.get("factory"))
            if self.loss.get("weighting", "examples") not in WEIGHTINGS:
                raise SpecError(
                    f"loss.weighting must be one of {', '.join(WEIGHTINGS)} (tokens: the loss is a per-batch mean "
                    f"over targets != -100), got {self.loss['weighting']!r}"
                )
        elif self.loss not in LOSSES:
            raise SpecError(
                f"loss must be one of {', '.join(LOSSES)} or {{factory: 'pkg.module:callable'}}, got {self.loss!r}"
            )
        if not self.probes:
            raise SpecError("probes is empty: list at least one probe, e.g. [{kind: eigenvalues}]")
        if self.weighting == "tokens":
            for p in self.probes:
                if KINDS[p.kind].example_only:
                    raise SpecError(
                        f"probes[{p.kind}] computes per-example gradient statistics and has no token-weighted "
                        f"form; remove it from a job whose loss is weighted by tokens, or use weighting: examples"
                    )
        if self.hvp not in HVPS:
            why = (
                "finite differences under FSDP were measured and not built: relative errors of 1e-3 to 3e-3 "
                "in float32 and λ_max off by 26-61% where the exact product is within 1e-6 "
                "(docs/benchmarks.md); "
                if self.hvp == "finite_difference"
                else ""
            )
            raise SpecError(f"hvp must be exact, got {self.hvp!r}: {why}every product is exact (reverse over reverse)")
        split = self.cluster.stages > 1 or self.cluster.shard_parameters
        if split and self.loss == "model":
            raise SpecError(
                "loss: model needs the whole model's output on one worker; with cluster.stages > 1 or "
                "cluster.shard_parameters use loss: causal_lm (or lm_cross_entropy, cross_entropy)"
            )
        if self.cluster.shard_parameters and self.precision in ("bfloat16", "float16"):
            raise SpecError(
                f"cluster.shard_parameters runs float32 or float64 products, got precision: {self.precision}; "
                "set precision: float32"
            )
        if self.loss == "model" and self.model.hf is None:
            raise SpecError(
                "loss: model uses the loss a Hugging Face model returns; it needs model.hf "
                "(for a factory model give loss: {factory: ...})"
            )
        if split:
            pipeline = [name for name, k in KINDS.items() if k.pipeline]
            how = f"cluster.stages={self.cluster.stages}" if self.cluster.stages > 1 else "cluster.shard_parameters"
            undo = "set cluster.stages: 1" if self.cluster.stages > 1 else "set cluster.shard_parameters: false"
            for p in self.probes:
                if not KINDS[p.kind].pipeline:
                    raise SpecError(
                        f"probes[{p.kind}] needs the whole model on every worker; with {how} (a model split "
                        f"over workers) use {', '.join(pipeline)}, or {undo}"
                    )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise SpecError(f"seed must be an integer, got {self.seed!r}")

    @property
    def weighting(self) -> str:
        """How batches are weighted: ``"tokens"`` for ``lm_cross_entropy`` or ``loss.weighting: tokens``,
        else ``"examples"``."""
        if isinstance(self.loss, dict):
            return self.loss.get("weighting", "examples")
        return "tokens" if self.loss in ("lm_cross_entropy", "causal_lm") else "examples"

    def to_dict(self) -> dict:
        """Plain-data form (JSON/YAML serializable); ``parse_spec(to_dict())`` round-trips."""
        d = dataclasses.asdict(self)
        d["model"]["checkpoints"] = list(self.model.checkpoints)
        d["probes"] = [{"kind": p.kind, **p.options} for p in self.probes]
        return d


def _section(cls, name: str, raw: Any):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{name} must be a mapping, got {raw!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    _check_keys(name, raw, valid)
    try:
        return cls(**raw)
    except TypeError as exc:  # a required key is missing
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in raw
        ]
        raise SpecError(f"{name} is missing required key(s): {', '.join(f'{name}.{m}' for m in missing)}") from exc


def parse_spec(raw: Any) -> JobSpec:
    """Validate a spec given as plain data (e.g. parsed YAML).

    Raises:
        SpecError: for unknown keys (listing the valid ones), missing or mistyped values.
    """
    if not isinstance(raw, dict):
        raise SpecError(f"a spec must be a mapping of top-level keys, got {type(raw).__name__}")
    top = [f.name for f in dataclasses.fields(JobSpec)]
    _check_keys("", raw, top)
    for key in ("name", "model", "data", "probes"):
        if key not in raw:
            raise SpecError(f"spec is missing the required key {key!r}")
    model = dict(raw["model"]) if isinstance(raw["model"], dict) else raw["model"]
    if isinstance(model, dict) and "checkpoints" in model:
        ck = model["checkpoints"]
        model["checkpoints"] = (ck,) if isinstance(ck, str) else tuple(ck or ())
    probes_raw = raw["probes"]
    if not isinstance(probes_raw, list):
        raise SpecError(f"probes must be a list of {{kind: ..., options...}}, got {probes_raw!r}")
    probes = []
    for i, p in enumerate(probes_raw):
        if isinstance(p, str):
            p = {"kind": p}
        if not isinstance(p, dict) or "kind" not in p:
            raise SpecError(f"probes[{i}] must be a mapping with a 'kind', got {p!r}")
        options = {k: v for k, v in p.items() if k != "kind"}
        probes.append(ProbeSpec(p["kind"], options))
    return JobSpec(
        name=raw["name"],
        model=_section(ModelSpec, "model", model),
        data=_section(DataSpec, "data", raw["data"]),
        probes=tuple(probes),
        loss=raw.get("loss", "cross_entropy"),
        precision=raw.get("precision", "auto"),
        vector_dtype=raw.get("vector_dtype"),
        hvp=raw.get("hvp", "exact"),
        mode=raw.get("mode", "eval"),
        cluster=_section(ClusterSpec, "cluster", raw.get("cluster")),
        output=_section(OutputSpec, "output", raw.get("output")),
        seed=raw.get("seed", 0),
    )


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars) to a raw spec.

    List items are addressed by index: ``probes.0.k=10``.

    Raises:
        SpecError: for a malformed override or a path through a non-container.
    """
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise SpecError(f"--set expects key.path=value, got {item!r}")
        try:
            value = _yaml(text) if text else ""
        except yaml.YAMLError as exc:
            raise SpecError(f"--set {item!r}: value {text!r} is not valid YAML ({str(exc).splitlines()[0]})") from exc
        keys = path.split(".")
        node: Any = raw
        for k in keys[:-1]:
            if isinstance(node, list):
                node = node[int(k)] if k.isdigit() and int(k) < len(node) else None
            elif isinstance(node, dict):
                node = node.setdefault(k, {})
            else:
                node = None
            if node is None:
                raise SpecError(f"--set {item!r}: {k!r} does not address an existing list item or mapping")
        last = keys[-1]
        if isinstance(node, list):
            if not (last.isdigit() and int(last) < len(node)):
                raise SpecError(f"--set {item!r}: list index {last!r} out of range")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise SpecError(f"--set {item!r}: cannot set a key inside {type(node).__name__}")
    return raw


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read a YAML spec file, apply ``--set`` overrides and validate.

    Relative checkpoint paths and the output path are taken relative to the
    spec file's folder.

    Raises:
        SpecError: for a missing file, invalid YAML, or an invalid spec (the message names the key).
    """
    path = Path(path)
    try:
        raw = _yaml(path.read_text())
    except FileNotFoundError as exc:
        raise SpecError(f"spec file {str(path)!r} not found") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file {str(path)!r} is not valid YAML: {exc}") from exc
    raw = apply_overrides(raw if isinstance(raw, dict) else raw, overrides or [])
    spec = parse_spec(raw)
    base = path.resolve().parent

    def near(p: str) -> str:  # relative to the spec's folder, '..' collapsed so paths read (and hash) the same
        return p if Path(p).is_absolute() else os.path.normpath(base / p)

    checkpoints = tuple(near(c) for c in spec.model.checkpoints)
    hf = near(spec.model.hf) if spec.model.hf is not None else None
    out = near(spec.output.path)
    probes = []
    for p in spec.probes:  # options naming checkpoints (barrier's endpoints), as the checkpoints
        named = {
            name: [e if e == "init" else near(e) for e in p.options[name]]
            for name in KINDS[p.kind].checkpoint_options
            if p.options.get(name) is not None
        }
        probes.append(ProbeSpec(p.kind, {**p.options, **named}) if named else p)
    return dataclasses.replace(
        spec,
        model=dataclasses.replace(spec.model, checkpoints=checkpoints, hf=hf),
        output=dataclasses.replace(spec.output, path=out),
        probes=tuple(probes),
    )
