"""Log records of the ``landscape_probe`` logger hierarchy, as text or JSON lines.

Every record of the service goes through :mod:`logging` under ``landscape_probe``
(``landscape_probe.job``: plan, task events and the summary; ``landscape_probe.progress``:
task starts, progress every N Lanczos steps, stalls). A record's structured fields travel
in ``extra={"fields": {...}}`` (``job``, ``event``, ``task_key``, ``kind``, ``checkpoint``,
``products``, ...).

:func:`configure` is what the CLI calls (``--log-format text|json``):

- ``text`` (default): each record's message alone on stdout, as the ``print`` lines were,
  warnings and errors on stderr prefixed with their level; written above a progress bar
  when one is drawn;
- ``json``: one JSON object per record on stderr (``time``, ``level``, ``logger``,
  ``message`` and the record's fields), what log collectors of pods parse.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

__all__ = ["LOGGER", "configure", "reset", "JsonFormatter", "log_line", "fields_of"]

LOGGER = "landscape_probe"
FORMATS = ("text", "json")
job_log = logging.getLogger(f"{LOGGER}.job")


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a record carries (``extra={"fields": ...}``); empty when none."""
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
    the record's fields, and ``exception`` when it has one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _ConsoleHandler(logging.StreamHandler):
    """Writes to ``sys.stdout`` or ``sys.stderr`` as they are when a record comes (given a stream:
    that one); through ``tqdm.write`` while a bar is drawn, so lines do not tear it."""

    def __init__(self, name: str, stream: IO[str] | None = None) -> None:
        super().__init__(stream)
        self._name, self._fixed = name, stream

    @property
    def stream(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self._fixed if self._fixed is not None else getattr(sys, self._name)

    @stream.setter
    def stream(self, value) -> None:
        self._fixed = value

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            if getattr(tqdm, "_instances", None):
                tqdm.write(self.format(record), file=self.stream)
                return
        except ImportError:  # pragma: no cover - tqdm comes with the install
            pass
        super().emit(record)


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


_installed: list[logging.Handler] = []


def configure(
    fmt: str = "text", *, level: int = logging.INFO, stdout: IO[str] | None = None, stderr: IO[str] | None = None
) -> logging.Logger:
    """Send the ``landscape_probe`` records to the console in format ``fmt`` (``text`` or ``json``);
    calling it again replaces the handlers it installed before.

    Raises:
        ValueError: for another format, naming the valid ones.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    logger = logging.getLogger(LOGGER)
    for h in _installed:
        logger.removeHandler(h)
    _installed.clear()
    if fmt == "json":
        handler = _ConsoleHandler("stderr", stderr)
        handler.setFormatter(JsonFormatter())
        _installed.append(handler)
    else:
        info = _ConsoleHandler("stdout", stdout)
        info.addFilter(_Below(logging.WARNING))
        info.setFormatter(logging.Formatter("%(message)s"))
        warn = _ConsoleHandler("stderr", stderr)
        warn.setLevel(logging.WARNING)
        warn.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        _installed.extend([info, warn])
    for h in _installed:
        logger.addHandler(h)
    logger.setLevel(level)
    return logger


def reset() -> None:
    """Remove the handlers :func:`configure` installed and the level it set."""
    logger = logging.getLogger(LOGGER)
    for h in _installed:
        logger.removeHandler(h)
    _installed.clear()
    logger.setLevel(logging.NOTSET)


def log_line(message: str) -> None:
    """A progress line as an INFO record of ``landscape_probe.job`` (the CLI's ``progress`` callback)."""
    job_log.info(message)
