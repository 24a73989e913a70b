"""A loss that a test holds mid-task (importable as ``slow_loss:gated`` in specs).

``gated`` is cross-entropy that blocks on its ``GATE.at``-th call until the test opens
:data:`GATE`: with ``mode: train`` the Hessian operator keeps no graph and calls the loss for
every batch of every product, so a held loss holds the task part-way through its products.
The in-process backend (``cluster.backend: local``) runs it in the test's own process.
"""

from __future__ import annotations

import threading

import torch.nn.functional as F


class Gate:
    """Holds the ``at``-th call of the loss until :meth:`open`; :attr:`reached` is set when it is held."""

    def __init__(self) -> None:
        self.reset(at=0)

    def reset(self, at: int) -> None:
        self.at, self.calls = at, 0
        self.reached, self.released = threading.Event(), threading.Event()

    def open(self) -> None:
        self.released.set()

    def call(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.reached.set()
            if not self.released.wait(timeout=300):  # a test that never opens it must not hang the suite
                raise TimeoutError("slow_loss.GATE was never opened")


GATE = Gate()


def gated():
    """Cross-entropy that holds its ``GATE.at``-th call until ``GATE.open()``."""

    def loss(outputs, targets):
        GATE.call()
        return F.cross_entropy(outputs, targets)

    return loss
