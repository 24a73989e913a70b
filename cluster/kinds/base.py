"""What a probe kind is, as one frozen record: :class:`Kind` (see ``docs/kinds.md``).

A kind module (``cluster/kinds/<name>.py``) builds one :class:`Kind` holding everything
about the kind: its options with their defaults and checks, its cross-option rule
(``validate``), its Parquet columns, its runner, its row reader, its vector working
set for the memory estimate, its headline quantities and metric gauges, and what
the job driver must know about it (pairwise, per series, pipeline-capable,
example-only, uses the Hessian). The rest of ``cluster/`` asks the registry
(:data:`cluster.kinds.KINDS`) instead of testing kind names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pyarrow as pa
import torch

__all__ = [
    "Kind",
    "Headline",
    "Gauge",
    "Sizes",
    "Working",
    "Check",
    "is_int",
    "is_num",
    "BASIS",
    "BASIS_CHECK",
    "SYMMETRY_CHECK",
    "F64",
    "LIST",
    "LIST2",
    "floats",
    "vec",
    "num",
    "single_lanczos",
    "no_basis",
]

# ---------------------------------------------------------------- option checks

Check = tuple[Callable[[Any], bool], str]  # (predicate, what it expects: "probes[KIND].OPTION must be WHAT")


def is_int(v: Any) -> bool:
    """Whether ``v`` is an int (a bool is not)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """Whether ``v`` is an int or a float (a bool is not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


BASIS = ("device", "host", "disk")
BASIS_CHECK: Check = (lambda v: v in BASIS, "'device', 'host' or 'disk' (where the Lanczos vectors live)")
# symmetry_check: true | false | null (null: on when the operator is float64, i.e. in float64 jobs).
# Added to the options and checks of every kind with ``uses_hessian`` (probe.symmetry: two extra products).
SYMMETRY_CHECK: Check = (
    lambda v: v is None or isinstance(v, bool),
    "true, false or null (null: on for float64 jobs; two extra products per task)",
)

# ---------------------------------------------------------------- column types

F64 = pa.float64()
LIST = pa.list_(pa.float64())
LIST2 = pa.list_(pa.list_(pa.float64()))

# ---------------------------------------------------------------- row readers' helpers


def floats(xs) -> list[float]:
    """A list column as floats, with nulls as NaN."""
    return [math.nan if x is None else float(x) for x in (xs or [])]


def vec(xs) -> torch.Tensor:
    """A list column as a float64 tensor, nulls as NaN."""
    return torch.tensor(floats(xs), dtype=torch.float64)


def num(x) -> float:
    """A number column as a float, null as NaN."""
    return math.nan if x is None else float(x)


# ---------------------------------------------------------------- the memory estimate's working set


@dataclass(frozen=True)
class Sizes:
    """What a kind's ``vectors`` sees of a job (:mod:`cluster.estimate`): ``dim`` parameters (of a
    pipeline stage), ``local`` entries of each sharded vector on one worker, ``bp`` bytes per
    parameter, ``bv`` per vector entry, and ``product(k)``, the peak bytes of one product of a block
    of ``k`` columns beyond its input."""

    dim: int
    local: int
    bp: int
    bv: int
    product: Callable[[int], int]


@dataclass(frozen=True)
class Working:
    """A probe's vectors: ``runs × per_run`` Lanczos basis vectors of ``Sizes.local`` entries (placed
    by the ``basis`` option: device, host or disk; 0 when it keeps none) and ``device`` bytes of
    other vectors and products, always on the worker's device."""

    runs: int = 0
    per_run: int = 0
    device: int = 0


def no_basis(device: int) -> Working:
    """A working set of ``device`` bytes on the worker's device and no Lanczos basis."""
    return Working(0, 0, device)


def single_lanczos(s: Sizes) -> Working:
    """One Lanczos run at :func:`probe.eigen.eigenvalues`' default step cap (100) with its recurrence
    vectors and single-column products (sharpness's λ_max, eos, surface's eigen directions)."""
    return Working(1, min(s.dim, 100) + 1, 4 * s.local * s.bv + s.product(1))


# ---------------------------------------------------------------- headline values


@dataclass(frozen=True)
class Gauge:
    """One value of a series gauge that a row sets (:class:`cluster.metrics.Metrics` attribute
    ``name``, e.g. ``trace``, ``eos_ratio``, ``barrier``), with its extra ``labels``. ``latest``:
    ``"checkpoint"`` — the value of the series' latest checkpoint (by step, else checkpoint order)
    is shown; ``"time"`` — the newest row's is (rows about endpoints outside the series: barrier)."""

    name: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()
    latest: str = "checkpoint"


@dataclass(frozen=True)
class Headline:
    """A kind's headline values.

    Attributes:
        finite: row fields (numbers or lists of numbers) that must be finite: one that is NaN or
            infinite fails the task (:func:`cluster.runners.check_headlines`); fields that
            legitimately hold NaN or inf and say so in their rows are left out (style.md 13).
        lambda_max: the Hessian's largest eigenvalue in a row, or None where the row has none
            (never a preconditioned operator's): the ``landscape_probe_lambda_max`` gauge.
        lambda_max_priority: where several kinds hold λ_max for one checkpoint, the audit shows
            the highest priority's.
        gauges: the other series gauges a row sets (:class:`Gauge`); None: it sets none.
        row_labels: the fields that tell a task's rows apart, named in the non-finite message.
    """

    finite: tuple[str, ...] = ()
    lambda_max: Callable[[dict], float | None] | None = None
    lambda_max_priority: int = 0
    gauges: Callable[[dict], list[Gauge]] | None = None
    row_labels: tuple[str, ...] = ()


# ---------------------------------------------------------------- the kind


@dataclass(frozen=True)
class Kind:
    """Everything about one probe kind.

    Attributes:
        name: the spec's ``kind`` and the dataset's folder.
        options: every option with its default (``ProbeSpec.resolved`` fills them in).
        checks: option -> (predicate, what it expects); every option has one.
        columns: the kind's Parquet fields (added to :data:`cluster.schema.COMMON_FIELDS`).
        run: the runner, ``(ctx, options, generator) -> record`` (a row's columns, or
            ``{"rows": [...], "num_matvecs": N}`` for several rows); runs SPMD on every worker.
        vectors: ``(options, sizes) -> Working``: its vector working set for the memory estimate.
        headline: its headline fields and gauges (:class:`Headline`).
        read: rebuilds its probe record from stored rows (a row; eos: the rows of a series), or None.
        validate: ``(given, resolved) -> message or None``: rules across options (the message
            becomes a SpecError); ``given`` holds the options the spec set.
        checkpoint_options: options naming checkpoint paths (or ``'init'``): made relative to the
            spec's folder; for a pairwise kind, its endpoints in order.
        series: ``options -> bool``: whether a task reads the job's whole checkpoint series
            (``options["series"]``, added by the planner).
        pairwise: one task per spec entry over the endpoints in ``checkpoint_options`` (its row's
            checkpoint is the last endpoint), not one per checkpoint.
        per_series: one task per spec entry over the job's series, one stored row per checkpoint.
        pipeline: runs with ``cluster.stages > 1`` (needs Hessian-vector products only).
        example_only: per-example statistics: no token-weighted form.
        uses_hessian: takes the ``symmetry_check`` option (added here) and its two products.
        products: ``options -> int``: about how many products a task takes with resolved
            options, the symmetry check's aside (the progress fraction's denominator,
            :func:`cluster.progress.expected_products`), or None where unknown.
    """

    name: str
    options: Mapping[str, Any]
    checks: Mapping[str, Check]
    columns: tuple[pa.Field, ...]
    run: Callable[..., dict]
    vectors: Callable[[dict, Sizes], Working]
    headline: Headline = Headline()
    read: Callable[..., Any] | None = None
    validate: Callable[[dict, dict], str | None] | None = None
    checkpoint_options: tuple[str, ...] = ()
    series: Callable[[dict], bool] | None = None
    pairwise: bool = False
    per_series: bool = False
    pipeline: bool = False
    example_only: bool = False
    uses_hessian: bool = False
    products: Callable[[dict], int] | None = None

    def __post_init__(self) -> None:
        options, checks = dict(self.options), dict(self.checks)
        if self.uses_hessian:
            options.setdefault("symmetry_check", None)
            checks.setdefault("symmetry_check", SYMMETRY_CHECK)
        if set(options) != set(checks):
            raise AssertionError(
                f"kind {self.name!r}: options without checks {sorted(set(options) - set(checks))}, "
                f"checks without options {sorted(set(checks) - set(options))}"
            )
        if self.pairwise and not self.checkpoint_options:
            raise AssertionError(f"pairwise kind {self.name!r} names no checkpoint_options (its endpoints)")
        object.__setattr__(self, "options", MappingProxyType(options))
        object.__setattr__(self, "checks", MappingProxyType(checks))
        object.__setattr__(self, "columns", tuple(self.columns))
        names = [f.name for f in self.columns]
        if len(names) != len(set(names)):
            raise AssertionError(f"kind {self.name!r} declares a column twice")
        missing = [n for n in self.headline.finite if n not in names]
        if missing:
            raise AssertionError(f"kind {self.name!r}: headline fields {missing} are not among its columns")

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.columns)
