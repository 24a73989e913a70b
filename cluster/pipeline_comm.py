"""Point-to-point messages between pipeline stages: non-blocking sends kept alive until done, blocking receives.

Every message between two stages travels on its own tag (:data:`TAGS`), so
messages of different kinds can never pair up wrongly; within one kind, both ends
post them in the same order (gloo and NCCL deliver point-to-point messages
between two ranks in order). With gloo, CUDA tensors travel through host memory
(gloo has no CUDA point-to-point); with NCCL they stay on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Outbox", "TAGS", "recv", "recv_shaped"]

HEADER = 8  # a shape header: ndim then up to 7 sizes
TAGS = {"forward": 1, "cotangent": 2, "adjoint": 3, "output_adjoint": 4, "lend": 5, "give_back": 6}


def _wire(device: torch.device) -> torch.device:
    """Where messages travel: on the device with NCCL, through host memory with gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


class Outbox:
    """Non-blocking sends (``dist.isend``); each sent tensor is kept until its send completes.

    A stage posts its sends and goes on computing; :meth:`flush` waits for all of
    them (before the sent tensors may be reused or the operator returns).
    """

    def __init__(self) -> None:
        self._pending: list[tuple[dist.Work, Tensor]] = []
        self.bytes_in_flight_peak = 0

    def send(self, t: Tensor, dst: int, kind: str, *, header: bool = False) -> None:
        """Send ``t`` to global rank ``dst``; with ``header`` its shape goes first (the receiver does not know it)."""
        self._pending = [(w, x) for w, x in self._pending if not w.is_completed()]
        wire = _wire(t.device)
        tag = TAGS[kind]
        if header:
            h = torch.zeros(HEADER, dtype=torch.long)
            h[0] = t.ndim
            h[1 : 1 + t.ndim] = torch.tensor(t.shape, dtype=torch.long)
            h = h.to(wire)
            self._post(h, dst, tag)
        self._post(t.detach().to(wire).contiguous(), dst, tag)
        self.bytes_in_flight_peak = max(
            self.bytes_in_flight_peak, sum(x.numel() * x.element_size() for _, x in self._pending)
        )

    def _post(self, t: Tensor, dst: int, tag: int) -> None:
        work = dist.isend(t, dst, tag=tag)
        if work is None:  # pragma: no cover - isend returns a Work for ranks in the group
            raise RuntimeError(f"isend to rank {dst} returned no work handle")
        self._pending.append((work, t))

    def flush(self) -> None:
        """Wait until every posted send has completed, then drop the tensors."""
        for work, _ in self._pending:
            work.wait()
        self._pending = []


def recv_shaped(src: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device, kind: str) -> Tensor:
    """Receive a tensor of a known shape from global rank ``src``."""
    out = torch.empty(tuple(shape), dtype=dtype, device=_wire(device))
    dist.recv(out, src, tag=TAGS[kind])
    return out.to(device)


def recv(src: int, dtype: torch.dtype, device: torch.device, kind: str) -> Tensor:
    """Receive a tensor sent with ``header=True`` from global rank ``src``."""
    header = torch.zeros(HEADER, dtype=torch.long, device=_wire(device))
    dist.recv(header, src, tag=TAGS[kind])
    shape = header[1 : 1 + int(header[0])].tolist()
    return recv_shaped(src, shape, dtype, device, kind)
