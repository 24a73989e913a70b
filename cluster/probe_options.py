"""The options each probe kind of a job spec accepts, derived from the kinds' registry.

Each kind declares its options, defaults and checks in its own module
(``cluster/kinds/<kind>.py``); these views keep the names :class:`cluster.spec.ProbeSpec`
and callers use. ``PROBE_OPTIONS[kind]`` holds every option of that kind with its
default; ``OPTION_CHECKS[kind][option]`` is a predicate and the words for what it
expects ("probes[KIND].OPTION must be WHAT, got VALUE").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cluster.kinds import KINDS

__all__ = ["PROBE_OPTIONS", "OPTION_CHECKS", "ALL_KINDS", "PIPELINE_KINDS", "SYMMETRY_KINDS"]

PROBE_OPTIONS: dict[str, dict[str, Any]] = {name: dict(k.options) for name, k in KINDS.items()}
OPTION_CHECKS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    name: dict(k.checks) for name, k in KINDS.items()
}
ALL_KINDS = tuple(KINDS)
# Kinds that measure their operator's symmetry defect (probe.symmetry): two extra products per task.
SYMMETRY_KINDS = tuple(name for name, k in KINDS.items() if k.uses_hessian)
# Probes that need only Hessian-vector products, so they run on a model split into pipeline stages.
PIPELINE_KINDS = tuple(name for name, k in KINDS.items() if k.pipeline)
