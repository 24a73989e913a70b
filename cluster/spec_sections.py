"""The sections of a job spec that stand alone: where the model and data come from, the
cluster's shape and where results go, each a frozen dataclass checked at construction,
with the checks every section shares. :mod:`cluster.spec` assembles them into a
``JobSpec`` with the probes and re-exports them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.errors import ProbeError

__all__ = [
    "SpecError",
    "ModelSpec",
    "DataSpec",
    "ClusterSpec",
    "OutputSpec",
    "import_factory",
    "HF_CLASSES",
    "ATTENTION",
    "BACKENDS",
]


class SpecError(ProbeError, ValueError):
    """A spec that cannot be run; the message names the key and the fix."""

    category = "bad_spec"


def _check_keys(section: str, given: dict, valid: list[str]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        names = ", ".join(repr(f"{section}.{k}" if section else k) for k in unknown)
        raise SpecError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {names}; "
            f"valid keys{' of ' + section if section else ''}: {', '.join(valid)}"
        )


def _positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"{name} must be a positive integer, got {value!r}")


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
        raise SpecError(
            f"{key}: cannot import module {module_name!r} ({exc}); check the path and that it is installed"
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise SpecError(f"{key}: module {module_name!r} has no attribute {attr!r}") from exc


BACKENDS = ("auto", "ray", "process", "local")


HF_CLASSES = ("auto", "causal_lm", "masked_lm", "sequence_classification", "base")


ATTENTION = ("sdpa", "eager")  # implementations whose graphs can be differentiated twice


@dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from: ``factory`` (``pkg.module:callable`` building it, weights from
    each checkpoint) or ``hf`` (a Hugging Face folder written by ``save_pretrained``, or a training
    run's folder of them: each checkpoint's model is built from its own config.json; see
    :mod:`cluster.hf`). ``checkpoints`` defaults to ``[hf]``."""

    factory: str | None = None
    kwargs: dict = field(default_factory=dict)
    checkpoints: tuple[str, ...] = ()
    hf: str | None = None
    hf_class: str = "auto"
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        if (self.factory is None) == (self.hf is None):
            raise SpecError(
                "model needs exactly one of model.factory ('pkg.module:callable') or model.hf "
                "(a Hugging Face model folder or a training run's folder)"
            )
        if self.factory is not None:
            _check_factory("model.factory", self.factory)
            for key in ("hf_class", "attn_implementation"):
                if getattr(self, key) != ModelSpec.__dataclass_fields__[key].default:
                    raise SpecError(f"model.{key} applies to model.hf models only; remove it or use model.hf")
        else:
            if not isinstance(self.hf, str) or not self.hf:
                raise SpecError(f"model.hf must be a folder path, got {self.hf!r}")
            if self.kwargs:
                raise SpecError("model.kwargs applies to model.factory only: an hf model is built from its config.json")
            if self.hf_class not in HF_CLASSES:
                raise SpecError(f"model.hf_class must be one of {', '.join(HF_CLASSES)}, got {self.hf_class!r}")
            if self.attn_implementation is not None and self.attn_implementation not in ATTENTION:
                raise SpecError(
                    f"model.attn_implementation {self.attn_implementation!r} has no double backward (Hessian-vector "
                    f"products need one); use sdpa (run with its math kernel) or eager"
                )
            if not self.checkpoints:
                object.__setattr__(self, "checkpoints", (self.hf,))
        if not isinstance(self.kwargs, dict):
            raise SpecError(f"model.kwargs must be a mapping, got {self.kwargs!r}")
        if not self.checkpoints:
            raise SpecError("model.checkpoints is empty: give files, globs or folders of checkpoints")

    @property
    def source(self) -> str:
        """What the model is built from, for rows and messages: the factory path or ``hf:FOLDER``."""
        return self.factory if self.factory is not None else f"hf:{self.hf}"


@dataclass(frozen=True)
class DataSpec:
    """The data: ``factory`` (``pkg.module:callable``) called with ``kwargs`` builds the dataset, of
    which a seeded subset of ``num_examples`` is the probe set, read in batches of ``batch_size``;
    ``eval_sets`` maps other set names to ``{factory, kwargs, num_examples}``."""

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
            raise SpecError(
                f"data.eval_sets must be a mapping of name to {{factory, kwargs, num_examples}}, got {self.eval_sets!r}"
            )
        for name, es in self.eval_sets.items():
            if name == "probe":
                raise SpecError("data.eval_sets.probe is reserved for the probe set itself; choose another name")
            if not isinstance(es, dict):
                raise SpecError(
                    f"data.eval_sets.{name} must be a mapping {{factory, kwargs, num_examples}}, got {es!r}"
                )
            _check_keys(f"data.eval_sets.{name}", es, ["factory", "kwargs", "num_examples"])
            _check_factory(f"data.eval_sets.{name}.factory", es.get("factory"))
            _positive_int(f"data.eval_sets.{name}.num_examples", es.get("num_examples", 1))


@dataclass(frozen=True)
class ClusterSpec:
    """Where and how the workers run: the Ray ``address`` (None: ``RAY_ADDRESS`` or a local
    instance), the workers and their resources, SPMD groups, pipeline stages and the backend."""

    address: str | None = None
    num_workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    placement_timeout_s: float = 60.0
    group_size: int | None = None  # workers per SPMD group; default: all of them in one group
    max_restarts: int = 3  # group rebuilds per task after a worker dies
    backend: str = "auto"  # auto | ray | process | local
    stages: int = 1  # pipeline stages per model replica (the model is split over this many workers)
    # pipeline schedule (cluster.pipeline): overlap (GPipe-style) or sequential; micro-batches per probe
    # batch (None: 4 for overlap in eval mode, 1 otherwise; see cluster.pipeline.PipelineHessian)
    schedule: str = "overlap"
    micro_batches: int | None = None
    # how stages are balanced: compute (matmul parameters, a tied head counted where it multiplies,
    # embedding lookups free) or parameters (memory held); see cluster.pipeline_layout.child_costs
    balance: str = "compute"
    # every layer's parameters sharded over the group's workers, gathered per layer (cluster.sharded_hvp):
    # for models that fit no one device and no pipeline family covers
    shard_parameters: bool = False

    def __post_init__(self) -> None:
        _positive_int("cluster.num_workers", self.num_workers)
        _positive_int("cluster.stages", self.stages)
        _positive_int("cluster.micro_batches", self.micro_batches, allow_none=True)
        if self.balance not in ("compute", "parameters"):
            raise SpecError(f"cluster.balance must be compute or parameters, got {self.balance!r}")
        if self.schedule not in ("overlap", "sequential"):
            raise SpecError(f"cluster.schedule must be overlap or sequential, got {self.schedule!r}")
        if not isinstance(self.shard_parameters, bool):
            raise SpecError(f"cluster.shard_parameters must be true or false, got {self.shard_parameters!r}")
        if self.shard_parameters and self.stages > 1:
            raise SpecError(
                "cluster.shard_parameters and cluster.stages > 1 are two ways to split a model; choose one "
                "(stages for the families cluster.hf_stages knows and nn.Sequential factories)"
            )
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
class OutputSpec:
    """Where results go: the folder ``path`` of the Parquet datasets."""

    path: str = "results"

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise SpecError(f"output.path must be a folder path (a non-empty string), got {self.path!r}")
