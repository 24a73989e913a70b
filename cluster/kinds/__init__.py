"""The probe kinds, one module each, and their registry.

``KINDS[name]`` is the :class:`~cluster.kinds.base.Kind` record holding everything about a
kind (options and checks, columns, runner, row reader, vector working set, headline
values, capabilities); the spec, the schema, the planner, the memory estimate, the
metrics and the audit ask it instead of testing kind names. Adding a kind: one module
here, one entry below, one row in ``tests/cluster/test_kinds_contract.py`` (``docs/kinds.md``).
"""

from __future__ import annotations

from cluster.kinds import (
    barrier,
    critical,
    eigenvalues,
    eos,
    noise,
    pacbayes,
    sharpness,
    spectrum,
    surface,
    trace,
)
from cluster.kinds.base import Gauge, Headline, Kind, Sizes, Working

__all__ = ["KINDS", "kind", "Kind", "Headline", "Gauge", "Sizes", "Working"]

# In the order of README.md's tables (messages list kinds in this order).
KINDS: dict[str, Kind] = {
    m.KIND.name: m.KIND
    for m in (eigenvalues, trace, spectrum, sharpness, barrier, surface, eos, pacbayes, noise, critical)
}


def kind(name: str) -> Kind:
    """The registered kind ``name``.

    Raises:
        KeyError: for an unknown kind, listing the registered ones.
    """
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown probe kind {name!r}; registered kinds: {', '.join(KINDS)}") from None
