"""Every error the job layer reports, typed: each carries its failure category and exit code.

The categories are the bounded values of the ``landscape_probe_failures_total{reason}`` metric and
of the ``category`` column of ``failures/`` rows; the exit codes are the CLI's. Errors
keep their type across the worker boundary (:class:`TaskFailed` carries the category of
the error a worker raised, in-process, under torch.multiprocessing and through Ray), so
metrics, failure rows and the CLI read the type, never the message.

=================  ====  ==========================================================
category           exit  raised for
=================  ====  ==========================================================
``bad_spec``       2     a spec, option, data set or factory that cannot be used
``bad_checkpoint`` 2     a checkpoint (or Hugging Face folder) that cannot be used
``non_finite``     1     a loss or a result that is NaN or infinite at a checkpoint
``worker_lost``    1     a worker process that died (killed, out of memory, node lost)
``placement``      3     a cluster that cannot place, reach or fit the workers
``write_failed``   1     results that cannot be written
``other``          1     anything else (a bug, an unexpected library error)
=================  ====  ==========================================================
"""

from __future__ import annotations

__all__ = [
    "CATEGORIES",
    "ProbeError",
    "NonFiniteError",
    "TaskFailed",
    "category_of",
    "exit_code_of",
    "EXIT_CODES",
]

CATEGORIES = ("bad_checkpoint", "bad_spec", "worker_lost", "non_finite", "placement", "write_failed", "other")
EXIT_CODES = {
    "bad_spec": 2,
    "bad_checkpoint": 2,
    "placement": 3,
    "non_finite": 1,
    "worker_lost": 1,
    "write_failed": 1,
    "other": 1,
}


class ProbeError(Exception):
    """Base of the job layer's errors; subclasses set ``category`` (one of :data:`CATEGORIES`)."""

    category = "other"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.category]


class NonFiniteError(ProbeError, ValueError):
    """A loss or a probe's result that is NaN or infinite; the message names the checkpoint and the quantity."""

    category = "non_finite"


class TaskFailed(ProbeError, RuntimeError):
    """A task that failed inside a worker, carrying the category of the error the worker raised.

    ``group_usable`` is False when some workers may still be blocked in a collective
    (not every rank failed): the driver then rebuilds the group before the next task.
    """

    def __init__(self, message: str, *, category: str = "other", group_usable: bool = True) -> None:
        super().__init__(message)
        self.category = category if category in CATEGORIES else "other"
        self.group_usable = group_usable


def category_of(exc: BaseException) -> str:
    """The failure category of an exception: its own for a :class:`ProbeError`, else ``other``."""
    return exc.category if isinstance(exc, ProbeError) else "other"


def exit_code_of(exc: BaseException) -> int:
    """The CLI's exit code for an exception (see the table above)."""
    return EXIT_CODES[category_of(exc)]
