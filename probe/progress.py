"""An optional progress hook an operator may carry, and the two calls the estimators make on it.

``probe/`` reports progress without knowing who listens: an operator's ``progress``
attribute (None by default, see :class:`probe.operators.CurvatureOperator`) may hold any
object with the two methods of :class:`ProgressHook`. Every product the operator applies
calls ``products(k)`` (``k`` columns); every Lanczos step (:class:`probe.lanczos.LanczosProcess`)
calls ``steps(done, total)``. The caller (``cluster/``) batches what it forwards; here a
call is one attribute test when no hook is set, so an estimator without a listener pays
nothing measurable. Nothing here reads a clock or logs.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["ProgressHook", "hook_of", "report_products", "report_steps"]

# attributes through which an operator wraps another (DeflatedOperator, PreconditionedOperator:
# ``op``; cluster's ShardedOperator: ``local``), followed when the outer one carries no hook
_WRAPPED = ("op", "local")
_MAX_DEPTH = 4


class ProgressHook(Protocol):
    """What an operator's ``progress`` attribute holds when someone listens."""

    def products(self, n: int) -> None:
        """``n`` more operator columns (Hessian-vector products) were applied."""

    def steps(self, done: int, total: int | None) -> None:
        """An iterative estimator reached step ``done`` of ``total`` (None: no fixed count) in its current pass."""


def hook_of(op: Any) -> ProgressHook | None:
    """The hook of ``op``, or of an operator it wraps (``op.op``, ``op.local``, a few levels down); None if none."""
    for _ in range(_MAX_DEPTH):
        hook = getattr(op, "progress", None)
        if hook is not None:
            return hook
        op = next((getattr(op, a) for a in _WRAPPED if getattr(op, a, None) is not None), None)
        if op is None:
            return None
    return None


def report_products(op: Any, n: int) -> None:
    """Tell ``op``'s own hook (not a wrapped one's: it counts its own products) that ``n`` columns were applied."""
    hook = getattr(op, "progress", None)
    if hook is not None:
        hook.products(n)


def report_steps(op: Any, done: int, total: int | None) -> None:
    """Tell the hook of ``op`` (or of the operator it wraps) that a pass reached step ``done`` of ``total``."""
    hook = hook_of(op)
    if hook is not None:
        hook.steps(done, total)
