"""The worker's half of live progress (:mod:`cluster.progress`): the hook set on a task's
operators and the client that sends its running totals to the driver's hub."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection

__all__ = ["TaskProgress", "ProgressClient"]

log = logging.getLogger("landscape_probe.progress")


class TaskProgress:
    """The progress hook of one task in a worker (:class:`probe.progress.ProgressHook`).

    Counts products and Lanczos steps; hands ``send`` the running totals at most every
    ``interval_s`` (and on :meth:`flush`), so the cost per product is two additions and a clock read.

    Args:
        send: receives ``{"task", "products", "steps", "step", "steps_total", "t"}`` dicts.
        task: the task's key.
        interval_s: the least time between two messages.
        on_products: also told of each batch of new products (the Ray worker counter).
        clock: seconds, monotonic.
    """

    def __init__(
        self,
        send: Callable[[dict], None],
        task: str,
        *,
        interval_s: float = 1.0,
        on_products: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.send, self.task, self.interval_s, self.on_products, self.clock = (
            send,
            task,
            interval_s,
            on_products,
            clock,
        )
        self.num_products = self.num_steps = 0
        self.step, self.steps_total = 0, None
        self.sent_products = 0
        self._last = -math.inf

    def products(self, n: int) -> None:
        self.num_products += int(n)
        self._maybe_send()

    def steps(self, done: int, total: int | None) -> None:
        # a new pass starts again at 1: count each pass's steps once
        self.num_steps += done - self.step if done > self.step else done
        self.step, self.steps_total = done, total
        self._maybe_send()

    def _maybe_send(self) -> None:
        now = self.clock()
        if now - self._last >= self.interval_s:
            self._last = now
            self.flush()

    def flush(self) -> None:
        """Send the totals now."""
        if self.on_products is not None and self.num_products > self.sent_products:
            self.on_products(self.num_products - self.sent_products)
        self.sent_products = self.num_products
        self.send(
            {
                "task": self.task,
                "products": self.num_products,
                "steps": self.num_steps,
                "step": self.step,
                "steps_total": self.steps_total,
            }
        )


class ProgressClient:
    """The worker's end of the channel: JSON messages to the driver's :class:`ProgressHub`.

    Never fails a task: when the driver cannot be reached the client goes quiet (one debug record).

    Args:
        address: ``(host, port)`` of the hub.
        authkey: the hub's key (hex).
    """

    def __init__(self, address: tuple[str, int] | list, authkey: str) -> None:
        self.address, self.authkey = (str(address[0]), int(address[1])), bytes.fromhex(authkey)
        self._conn: Connection | None = None
        self._broken = False

    def __call__(self, message: dict) -> None:
        if self._broken:
            return
        try:
            if self._conn is None:
                self._conn = Client(self.address, authkey=self.authkey)
            self._conn.send_bytes(json.dumps(message).encode())
        except (OSError, EOFError, AuthenticationError) as exc:  # driver gone, unreachable, refused: best effort
            log.debug("progress channel %s unavailable: %s", self.address, exc)
            self._broken = True
            self.close()

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._conn = None
