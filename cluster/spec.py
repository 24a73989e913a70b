"""Job specs: YAML validated into frozen config objects.

A spec names the model factory and checkpoints, the probe data, the loss, the
precision and mode policy, the cluster shape, the probes and where results go
(``../shared/DESIGN.md``, "Public contract"). Every section is a frozen dataclass
checked at construction; an unknown key is an error that lists the valid ones,
and ``--set key.path=value`` overrides any value before validation.
"""

from __future__ import annotations

import dataclasses
import os
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

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


class SpecError(ValueError):
    """A spec that cannot be run; the message names the key and the fix."""


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


# Options each probe kind accepts, with defaults (every kind of DESIGN.md).
PROBE_OPTIONS: dict[str, dict[str, Any]] = {
    "eigenvalues": {"k": 5, "which": "largest", "tol": 1e-6, "max_steps": None, "reorth": "full", "basis": "device",
                    "basis_memory_bytes": None},
    "trace": {"method": "hutch++", "matvecs": 102},
    "spectrum": {"runs": 10, "steps": 80, "sigma": None, "reorth": "full", "grid_points": 1000, "basis": "device",
                 "basis_memory_bytes": None},
    "sharpness": {
        "measures": ["lambda_max", "keskar", "sam", "adaptive"],
        "epsilon": 1e-3,  # Keskar et al. 2017
        "rho": 0.05,  # SAM, Foret et al. 2021
        "adaptive_rho": 0.5,  # ASAM, Kwon et al. 2021 (worst case, L2)
        "sigma": None,  # average-case: required when 'average' is listed
        "steps": 20,
        "num_samples": 20,
    },
    "barrier": {
        "between": None,  # [A, B]: checkpoint paths, or "init" for the factory's initialization
        "path": "linear",  # linear | bezier | polychain, or a list of them
        "points": 61,  # Garipov et al. 2018, eval_curve.py
        "eval_sets": ["probe"],
        "train_steps": 200,
        "train_lr": 0.01,
        "train_optimizer": "adam",
    },
    "surface": {
        "dims": 2,
        "resolution": 51,  # Li et al. 2018
        "span": 1.0,  # Li et al. 2018
        "normalization": None,  # filter for random directions; none for eigen/pca (unit vectors)
        "directions": "random",  # random | eigen | pca (pca: over the job's checkpoint series)
        "ignore_1d": True,  # biases and norm parameters fixed (Li et al. 2018, Sec. 4)
    },
    "eos": {
        "lr": None,  # from checkpoint metadata ("lr") or a sidecar CKPT.json when absent
        "optimizer": "gd",
        "momentum": None,
        "tol": 1e-6,
    },
    "pacbayes": {
        "target": 0.1,  # allowed expected loss increase (Jiang et al. 2020 use a 0.1 deviation)
        "variant": "isotropic",  # isotropic | magnitude
        "samples": 32,  # perturbations per estimate, in antithetic pairs
        "prior_sigma": None,  # None: the posterior's scale per coordinate (Jiang et al. 2020)
        "delta": 0.05,
        "rtol": 1e-3,
    },
    "noise": {
        "lr": None,  # from checkpoint metadata ("lr") when absent
        "batch_size": None,  # from checkpoint metadata ("batch_size") when absent
        "chunk_size": 64,  # examples per vectorized per-example gradient computation
    },
    "critical": {
        "grad_norm": 1e-3,  # threshold on ‖∇L‖ (a convention, model dependent)
        "negative_mass": 0.01,  # threshold on tr(H₋)/tr|H| (a convention)
        "runs": 10,
        "steps": 80,
        "tol": 1e-6,
    },
}
ALL_KINDS = ("eigenvalues", "trace", "spectrum", "sharpness", "barrier", "surface", "eos", "pacbayes", "noise", "critical")
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_BASIS = ("device", "host", "disk")
# Probes that need only Hessian-vector products, so they run on a model split into pipeline stages.
PIPELINE_KINDS = ("eigenvalues", "trace", "spectrum")

# (check, what it expects) per option; the message reads "probes[KIND].OPTION must be WHAT, got VALUE".
_OPTION_CHECKS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "eigenvalues": {
        "k": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
        "which": (lambda v: v in ("largest", "smallest"), "'largest' or 'smallest'"),
        "tol": (lambda v: _is_num(v) and v > 0, "a positive number"),
        "max_steps": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer or null"),
        "reorth": (lambda v: v in ("full", "selective"), "'full' or 'selective'"),
        "basis": (lambda v: v in _BASIS, "'device', 'host' or 'disk' (where the Lanczos vectors live)"),
        "basis_memory_bytes": (lambda v: v is None or (_is_int(v) and v > 0), "a positive integer (bytes) or null"),
    },
    "trace": {
        "method": (lambda v: v in ("hutchinson", "hutch++"), "'hutchinson' or 'hutch++'"),
        "matvecs": (lambda v: _is_int(v) and v >= 6, "an integer of at least 6"),
    },
    "spectrum": {
        "runs": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
        "steps": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
        "sigma": (lambda v: v is None or (_is_num(v) and v > 0), "a positive number (eigenvalue units) or null"),
        "reorth": (lambda v: v in ("full", "selective", "none"), "'full', 'selective' or 'none'"),
        "grid_points": (lambda v: _is_int(v) and v >= 2, "an integer of at least 2"),
        "basis": (lambda v: v in _BASIS, "'device', 'host' or 'disk' (where the Lanczos vectors live)"),
        "basis_memory_bytes": (lambda v: v is None or (_is_int(v) and v > 0),
                               "a positive integer (bytes) or null; above it SLQ falls back to reorth none"),
    },
}

_SHARPNESS = ("lambda_max", "keskar", "sam", "adaptive", "average")
_PATHS = ("linear", "bezier", "polychain")
_OPTION_CHECKS["sharpness"] = {
    "measures": (lambda v: isinstance(v, list) and bool(v) and all(m in _SHARPNESS for m in v),
                 f"a non-empty list drawn from {', '.join(_SHARPNESS)}"),
    "epsilon": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "rho": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "adaptive_rho": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "sigma": (lambda v: v is None or (_is_num(v) and v > 0), "a positive number or null"),
    "steps": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "num_samples": (lambda v: _is_int(v) and v >= 2, "an integer of at least 2"),
}
_OPTION_CHECKS["barrier"] = {
    "between": (lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) and x for x in v),
                "a list of two checkpoint paths (or 'init')"),
    "path": (lambda v: (v in _PATHS) or (isinstance(v, list) and bool(v) and all(x in _PATHS for x in v)),
             "'linear', 'bezier', 'polychain' or a list of them"),
    "points": (lambda v: _is_int(v) and v >= 3, "an integer of at least 3"),
    "eval_sets": (lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v),
                  "a non-empty list of evaluation set names ('probe' is the probe set)"),
    "train_steps": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "train_lr": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "train_optimizer": (lambda v: v in ("adam", "sgd"), "'adam' or 'sgd'"),
}

_OPTION_CHECKS["surface"] = {
    "dims": (lambda v: v in (1, 2), "1 or 2"),
    "resolution": (lambda v: _is_int(v) and v >= 2, "an integer of at least 2"),
    "span": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "normalization": (lambda v: v in (None, "filter", "layer", "weight", "none"),
                      "'filter', 'layer', 'weight', 'none' or null"),
    "directions": (lambda v: v in ("random", "eigen", "pca"), "'random', 'eigen' or 'pca'"),
    "ignore_1d": (lambda v: isinstance(v, bool), "true or false"),
}
_OPTION_CHECKS["eos"] = {
    "lr": (lambda v: v is None or (_is_num(v) and v > 0), "a positive number or null (read from checkpoints)"),
    "optimizer": (lambda v: v in ("gd", "momentum", "nesterov", "adam"),
                  "'gd', 'momentum', 'nesterov' or 'adam' (adam reads the second moments saved with each checkpoint)"),
    "momentum": (lambda v: v is None or (_is_num(v) and 0 <= v < 1), "a number in [0, 1) or null"),
    "tol": (lambda v: _is_num(v) and v > 0, "a positive number"),
}

_OPTION_CHECKS["pacbayes"] = {
    "target": (lambda v: _is_num(v) and v > 0, "a positive number (allowed expected loss increase)"),
    "variant": (lambda v: v in ("isotropic", "magnitude"), "'isotropic' or 'magnitude'"),
    "samples": (lambda v: _is_int(v) and v >= 4 and v % 2 == 0, "an even integer of at least 4 (antithetic pairs)"),
    "prior_sigma": (lambda v: v is None or (_is_num(v) and v > 0), "a positive number or null"),
    "delta": (lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    "rtol": (lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
}
_OPTION_CHECKS["noise"] = {
    "lr": (lambda v: v is None or (_is_num(v) and v > 0), "a positive number or null (read from checkpoints)"),
    "batch_size": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer or null (read from checkpoints)"),
    "chunk_size": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
}
_OPTION_CHECKS["critical"] = {
    "grad_norm": (lambda v: _is_num(v) and v >= 0, "a non-negative number"),
    "negative_mass": (lambda v: _is_num(v) and v >= 0, "a non-negative number"),
    "runs": (lambda v: _is_int(v) and v >= 2, "an integer of at least 2"),
    "steps": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "tol": (lambda v: _is_num(v) and v > 0, "a positive number"),
}

PRECISIONS = ("float32", "float64", "bfloat16")  # bfloat16: products in bf16, vectors and sums in float32
MODES = ("eval", "train")
LOSSES = ("cross_entropy", "mse", "lm_cross_entropy")  # lm_cross_entropy: token mean, -100 ignored
WEIGHTINGS = ("examples", "tokens")
# Kinds whose quantities are per-example statistics: no token-weighted definition.
EXAMPLE_ONLY_KINDS = ("noise",)
BACKENDS = ("auto", "ray", "process", "local")


def _check_keys(section: str, given: dict, valid: list[str]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise SpecError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(f'{section}.{k}' if section else k) for k in unknown)}; "
            f"valid keys{' of ' + section if section else ''}: {', '.join(valid)}"
        )


def _positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"{name} must be a positive integer, got {value!r}")


_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._ -]*$")


def _check_name(name: Any) -> None:
    """Job names start with a letter: they become hive partition values, which readers
    would otherwise type as numbers."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(
            f"name must start with a letter and use letters, digits, '.', '_', '-' or spaces, got {name!r}"
        )


def _check_factory(name: str, value: Any) -> None:
    if not isinstance(value, str) or value.count(":") != 1 or not all(value.split(":")):
        raise SpecError(f"{name} must be 'package.module:callable', got {value!r}")


def import_factory(path: str, *, key: str = "factory") -> Callable[..., Any]:
    """Import ``"pkg.module:callable"``.

    Raises:
        SpecError: naming ``key`` and the path when the module or attribute is missing.
    """
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"{key}: cannot import module {module_name!r} ({exc}); check the path and that it is installed") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise SpecError(f"{key}: module {module_name!r} has no attribute {attr!r}") from exc


@dataclass(frozen=True)
class ModelSpec:
    factory: str
    kwargs: dict = field(default_factory=dict)
    checkpoints: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_factory("model.factory", self.factory)
        if not isinstance(self.kwargs, dict):
            raise SpecError(f"model.kwargs must be a mapping, got {self.kwargs!r}")
        if not self.checkpoints:
            raise SpecError("model.checkpoints is empty: give files, globs or folders of checkpoints")


@dataclass(frozen=True)
class DataSpec:
    factory: str
    kwargs: dict = field(default_factory=dict)
    num_examples: int = 512
    batch_size: int = 128
    eval_sets: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_factory("data.factory", self.factory)
        _positive_int("data.num_examples", self.num_examples)
        _positive_int("data.batch_size", self.batch_size)
        if not isinstance(self.kwargs, dict):
            raise SpecError(f"data.kwargs must be a mapping, got {self.kwargs!r}")
        if not isinstance(self.eval_sets, dict):
            raise SpecError(f"data.eval_sets must be a mapping of name to {{factory, kwargs, num_examples}}, got {self.eval_sets!r}")
        for name, es in self.eval_sets.items():
            if name == "probe":
                raise SpecError("data.eval_sets.probe is reserved for the probe set itself; choose another name")
            if not isinstance(es, dict):
                raise SpecError(f"data.eval_sets.{name} must be a mapping {{factory, kwargs, num_examples}}, got {es!r}")
            _check_keys(f"data.eval_sets.{name}", es, ["factory", "kwargs", "num_examples"])
            _check_factory(f"data.eval_sets.{name}.factory", es.get("factory"))
            _positive_int(f"data.eval_sets.{name}.num_examples", es.get("num_examples", 1))


@dataclass(frozen=True)
class ClusterSpec:
    address: str | None = None
    num_workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    placement_timeout_s: float = 60.0
    group_size: int | None = None  # workers per SPMD group; default: all of them in one group
    max_restarts: int = 3  # group rebuilds per task after a worker dies
    backend: str = "auto"  # auto | ray | process | local
    stages: int = 1  # pipeline stages per model replica (the model is split over this many workers)

    def __post_init__(self) -> None:
        _positive_int("cluster.num_workers", self.num_workers)
        _positive_int("cluster.stages", self.stages)
        group = self.group_size or self.num_workers
        if group % self.stages:
            raise SpecError(
                f"cluster.stages={self.stages} must divide the workers of a group ({group}): each group is "
                f"a grid of stages × data replicas"
            )
        _positive_int("cluster.group_size", self.group_size, allow_none=True)
        if self.group_size is not None and self.num_workers % self.group_size:
            raise SpecError(
                f"cluster.num_workers={self.num_workers} is not a multiple of cluster.group_size={self.group_size}"
            )
        if not isinstance(self.max_restarts, int) or isinstance(self.max_restarts, bool) or self.max_restarts < 0:
            raise SpecError(f"cluster.max_restarts must be a non-negative integer, got {self.max_restarts!r}")
        if self.backend not in BACKENDS:
            raise SpecError(f"cluster.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("gpus_per_worker", "cpus_per_worker", "placement_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise SpecError(f"cluster.{name} must be a non-negative number, got {value!r}")


@dataclass(frozen=True)
class ProbeSpec:
    kind: str
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ALL_KINDS:
            raise SpecError(f"unknown probe kind {self.kind!r}; valid kinds: {', '.join(ALL_KINDS)}")
        _check_keys(f"probes[{self.kind}]", self.options, list(PROBE_OPTIONS[self.kind]))
        for name, value in self.options.items():
            check, expected = _OPTION_CHECKS[self.kind][name]
            if not check(value):
                raise SpecError(f"probes[{self.kind}].{name} must be {expected}, got {value!r}")
        if self.kind == "sharpness" and "average" in self.resolved()["measures"] and self.resolved()["sigma"] is None:
            raise SpecError("probes[sharpness].sigma is required when measures lists 'average' (no paper fixes a default); "
                            "e.g. sigma: 0.01")
        if self.kind == "barrier" and self.options.get("between") is None:
            raise SpecError("probes[barrier].between is required: two checkpoint paths, or ['init', PATH]")

    def resolved(self) -> dict:
        """The options with defaults filled in (what the probe runs with and what is recorded)."""
        return {**PROBE_OPTIONS[self.kind], **self.options}


@dataclass(frozen=True)
class OutputSpec:
    path: str = "results"

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise SpecError(f"output.path must be a folder path (a non-empty string), got {self.path!r}")


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
    precision: str = "float32"
    mode: str = "eval"
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    seed: int = 0

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.precision not in PRECISIONS:
            raise SpecError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
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
            raise SpecError(f"loss must be one of {', '.join(LOSSES)} or {{factory: 'pkg.module:callable'}}, got {self.loss!r}")
        if not self.probes:
            raise SpecError("probes is empty: list at least one probe, e.g. [{kind: eigenvalues}]")
        if self.weighting == "tokens":
            for p in self.probes:
                if p.kind in EXAMPLE_ONLY_KINDS:
                    raise SpecError(
                        f"probes[{p.kind}] computes per-example gradient statistics and has no token-weighted "
                        f"form; remove it from a job whose loss is weighted by tokens, or use weighting: examples"
                    )
        if self.cluster.stages > 1:
            for p in self.probes:
                if p.kind not in PIPELINE_KINDS:
                    raise SpecError(
                        f"probes[{p.kind}] needs the whole model on every worker; with cluster.stages="
                        f"{self.cluster.stages} (a model split over workers) use {', '.join(PIPELINE_KINDS)}, "
                        "or set cluster.stages: 1"
                    )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise SpecError(f"seed must be an integer, got {self.seed!r}")

    @property
    def weighting(self) -> str:
        """How batches are weighted: ``"tokens"`` for ``lm_cross_entropy`` or ``loss.weighting: tokens``,
        else ``"examples"``."""
        if isinstance(self.loss, dict):
            return self.loss.get("weighting", "examples")
        return "tokens" if self.loss == "lm_cross_entropy" else "examples"

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
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in raw]
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
        precision=raw.get("precision", "float32"),
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
    out = near(spec.output.path)
    probes = []
    for p in spec.probes:
        if p.kind == "barrier":
            ends = [e if e == "init" else near(e) for e in p.options["between"]]
            p = ProbeSpec(p.kind, {**p.options, "between": ends})
        probes.append(p)
    return dataclasses.replace(
        spec,
        model=dataclasses.replace(spec.model, checkpoints=checkpoints),
        output=dataclasses.replace(spec.output, path=out),
        probes=tuple(probes),
    )
