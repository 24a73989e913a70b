"""Where the Lanczos basis lives: on the device, in host memory, or in a store given by the caller.

Full and selective reorthogonalization need every Lanczos vector: ``runs × (steps+1)``
vectors of ``local_dim`` entries, which for a large model does not fit next to
the model on the device. A *basis store* keeps those vectors somewhere and hands
them back to the device in blocks of at most ``block_size`` vectors per run, so
that the projections of :mod:`probe.lanczos` hold on the device only
``runs × block_size × local_dim`` entries of the basis at a time (plus the few
vectors of the recurrence itself), instead of ``runs × (steps+1) × local_dim``.

The arithmetic does not depend on the store: a block is the same rows of the
same basis, so every store gives the same Ritz values to rounding (splitting the
classical Gram-Schmidt sums into blocks only reorders additions). With one block
(``block_size=None``) the projections are exactly today's single batched products.

Stores here (no file I/O in ``probe/``; a disk-backed store is
``cluster.basis.DiskBasis``):

- :class:`DeviceBasis`, the default: a run-major ``(runs, capacity, local_dim)``
  buffer on the operator's device, read as one block.
- :class:`HostBasis`: a slot-major ``(capacity, runs, local_dim)`` buffer in CPU
  memory (page-locked when the operator is on CUDA, so blocks are copied with
  ``non_blocking=True``), read in blocks of ``block_size`` vectors per run.

Any object with the attributes and methods of :class:`BasisStore` can be passed
as ``basis=`` to :func:`probe.lanczos.lanczos`, :func:`probe.eigen.eigenvalues`
and :func:`probe.slq.spectral_density`; its ``name`` is recorded in their results.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["BasisStore", "DeviceBasis", "HostBasis", "resolve_basis", "BASIS_NAMES", "DEFAULT_BLOCK_SIZE"]

BASIS_NAMES = ("device", "host")
# Vectors per run moved to the device at a time by HostBasis (and DiskBasis): big
# enough that each copy is a large contiguous transfer, small enough that the
# temporary is a few vectors per run.
DEFAULT_BLOCK_SIZE = 8
INITIAL_CAPACITY = 16  # vectors per run before the first growth when no capacity is given
EAGER_HOST_BYTES = 2 * 1024**3  # a CPU DeviceBasis reserves a given capacity up to this size at once


def _allocated(buf: Tensor | None) -> Tensor:
    """The store's buffer; a store is used only between :meth:`BasisStore.allocate` and ``close``."""
    if buf is None:
        raise RuntimeError("the basis store holds no buffer: call allocate() before put, get or view")
    return buf


@runtime_checkable
class BasisStore(Protocol):
    """What :class:`probe.lanczos.LanczosProcess` asks of a basis store.

    Vectors are addressed by their index ``j`` in the Lanczos sequence ``q_0, q_1, …``;
    every index holds one vector per run.

    Attributes:
        name: recorded in the results' ``basis_storage`` (e.g. ``"device"``, ``"host"``, ``"disk"``).
        block_size: the most vectors per run that :meth:`get` is asked for at once;
            ``None`` reads the whole basis as one block.

    Methods:
        allocate(runs, local_dim, dtype, device, capacity): start an empty basis of
            ``runs`` runs for vectors of ``local_dim`` entries, to be handed back on
            ``device``; ``capacity`` is the expected number of vectors per run, or
            None when unknown. Discards any previous basis (earlier views stay valid).
        put(index, vectors): store ``vectors`` (``(runs, local_dim)``, on the device)
            as vector ``index`` of every run; indices come in order ``0, 1, 2, …`` and
            may exceed ``capacity`` (the store grows).
        get(start, stop, run=None): vectors ``start:stop`` on the device,
            ``(runs, stop-start, local_dim)``, or ``(stop-start, local_dim)`` of one run.
        view(count): the first ``count`` vectors where they are stored,
            ``(runs, count, local_dim)`` (no copy to the device).
        resident_bytes(runs, capacity, local_dim, dtype): memory (device or host)
            the store holds for such a basis: what a ``basis_memory_bytes`` budget limits.
        close(): release the basis.
    """

    name: str
    block_size: int | None

    def allocate(
        self, runs: int, local_dim: int, dtype: torch.dtype, device: torch.device, capacity: int | None
    ) -> None: ...

    def put(self, index: int, vectors: Tensor) -> None: ...

    def get(self, start: int, stop: int, run: int | None = None) -> Tensor: ...

    def view(self, count: int) -> Tensor: ...

    def resident_bytes(self, runs: int, capacity: int, local_dim: int, dtype: torch.dtype) -> int: ...

    def close(self) -> None: ...


def _check_block_size(block_size: int | None) -> None:
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(
            "block_size must be a positive number of vectors per run or None (one block), "
            f"got block_size={block_size!r}"
        )


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class DeviceBasis:
    """The basis on the operator's device, run-major ``(runs, capacity, local_dim)``.

    Growth doubles the capacity (starting at 16 vectors per run, capped at the
    capacity given to :meth:`allocate`), which briefly holds the old and the new
    buffer. On the CPU a given capacity of at most ``EAGER_HOST_BYTES`` is reserved
    at once instead (untouched pages are not committed).

    Args:
        block_size: vectors per run per projection block; default None (one block,
            the batched products of a basis that fits on the device).

    Raises:
        ValueError: for a ``block_size`` that is not a positive integer or None.
    """

    name = "device"

    def __init__(self, *, block_size: int | None = None) -> None:
        _check_block_size(block_size)
        self.block_size = block_size
        self._buf: Tensor | None = None
        self._capacity: int | None = None

    def allocate(
        self, runs: int, local_dim: int, dtype: torch.dtype, device: torch.device, capacity: int | None
    ) -> None:
        self._capacity = capacity
        first = INITIAL_CAPACITY if capacity is None else max(1, min(INITIAL_CAPACITY, capacity))
        if (
            capacity is not None
            and torch.device(device).type == "cpu"
            and runs * capacity * local_dim * _itemsize(dtype) <= EAGER_HOST_BYTES
        ):
            # Host pages are committed only when written, so reserving the whole capacity
            # costs nothing up front and spares the growth copies (on 1.1M parameters,
            # 4 runs × 40 steps, the copies at 16 and 32 vectors took 0.7 s).
            first = capacity
        self._buf = torch.empty(runs, first, local_dim, dtype=dtype, device=device)

    def put(self, index: int, vectors: Tensor) -> None:
        buf = _allocated(self._buf)
        if index >= buf.shape[1]:
            size = 2 * buf.shape[1]
            if self._capacity is not None and self._capacity > index:
                size = min(size, self._capacity)
            grown = torch.empty(buf.shape[0], max(size, index + 1), buf.shape[2], dtype=buf.dtype, device=buf.device)
            grown[:, : buf.shape[1]] = buf
            self._buf = buf = grown
        buf[:, index, :] = vectors

    def get(self, start: int, stop: int, run: int | None = None) -> Tensor:
        buf = _allocated(self._buf)
        return buf[:, start:stop, :] if run is None else buf[run, start:stop, :]

    def view(self, count: int) -> Tensor:
        return _allocated(self._buf)[:, :count, :]

    def resident_bytes(self, runs: int, capacity: int, local_dim: int, dtype: torch.dtype) -> int:
        return runs * capacity * local_dim * _itemsize(dtype)

    def close(self) -> None:
        self._buf = None


class HostBasis:
    """The basis in CPU memory, slot-major ``(capacity, runs, local_dim)``, moved to the device in blocks.

    Each projection copies ``block_size`` vectors per run at a time to the device
    (``runs × block_size × local_dim`` entries), so a reorthogonalizing step moves
    the whole basis over the host link two to four times (coefficients, then
    update; twice when the second Gram-Schmidt pass runs). With a capacity given to
    :meth:`allocate` the buffer is allocated once; otherwise it doubles from 16.

    Args:
        block_size: vectors per run per block; default 8. ``None`` moves the whole
            basis at once (no device memory saved during a projection).
        pin_memory: page-lock the buffer for fast asynchronous copies; default
            (None) pins exactly when the operator's device is CUDA.

    Raises:
        ValueError: for a ``block_size`` that is not a positive integer or None.
    """

    name = "host"

    def __init__(self, *, block_size: int | None = DEFAULT_BLOCK_SIZE, pin_memory: bool | None = None) -> None:
        _check_block_size(block_size)
        self.block_size = block_size
        self.pin_memory = pin_memory
        self._buf: Tensor | None = None
        self._token: object = None
        self._device = torch.device("cpu")
        self._pinned = False

    # Subclasses that keep the buffer elsewhere (a memory-mapped file) override these two.
    def _new_buffer(self, shape: tuple[int, int, int], dtype: torch.dtype) -> tuple[Tensor, object]:
        """A CPU tensor of ``shape`` and a token that :meth:`_free` releases."""
        return torch.empty(shape, dtype=dtype, pin_memory=self._pinned), None

    def _free(self, token: object) -> None:
        """Release what :meth:`_new_buffer` returned with ``token`` (nothing for plain memory)."""

    def allocate(
        self, runs: int, local_dim: int, dtype: torch.dtype, device: torch.device, capacity: int | None
    ) -> None:
        self.close()
        self._device = torch.device(device)
        want_pin = self._device.type == "cuda" if self.pin_memory is None else self.pin_memory
        self._pinned = bool(want_pin) and torch.cuda.is_available()
        first = INITIAL_CAPACITY if capacity is None else max(1, capacity)
        self._buf, self._token = self._new_buffer((first, runs, local_dim), dtype)

    def put(self, index: int, vectors: Tensor) -> None:
        buf = _allocated(self._buf)
        if index >= buf.shape[0]:
            grown, token = self._new_buffer((max(2 * buf.shape[0], index + 1), buf.shape[1], buf.shape[2]), buf.dtype)
            grown[: buf.shape[0]] = buf
            old = self._token
            self._buf, self._token = grown, token
            self._free(old)
            buf = grown
        buf[index].copy_(vectors)  # device -> host, synchronous

    def get(self, start: int, stop: int, run: int | None = None) -> Tensor:
        buf = _allocated(self._buf)
        host = buf[start:stop] if run is None else buf[start:stop, run]
        moved = host.to(self._device, non_blocking=self._pinned)
        return moved.transpose(0, 1) if run is None else moved  # (runs, stop-start, local_dim)

    def view(self, count: int) -> Tensor:
        return _allocated(self._buf)[:count].transpose(0, 1)

    def resident_bytes(self, runs: int, capacity: int, local_dim: int, dtype: torch.dtype) -> int:
        return runs * capacity * local_dim * _itemsize(dtype)

    def close(self) -> None:
        token, self._buf, self._token = self._token, None, None
        if token is not None:
            self._free(token)


def resolve_basis(basis: BasisStore | str) -> BasisStore:
    """A store from a name (``"device"``, ``"host"``) or a store itself.

    Raises:
        ValueError: for an unknown name (``"disk"`` needs a folder: pass
            ``cluster.basis.DiskBasis(folder)``), or an object that is not a :class:`BasisStore`.
    """
    if isinstance(basis, str):
        if basis == "device":
            return DeviceBasis()
        if basis == "host":
            return HostBasis()
        hint = "; a disk store needs a folder: pass basis=cluster.basis.DiskBasis(folder)" if basis == "disk" else ""
        raise ValueError(f"basis must be one of {BASIS_NAMES} or a BasisStore, got basis={basis!r}{hint}")
    if not isinstance(basis, BasisStore):
        raise ValueError(
            f"basis must be one of {BASIS_NAMES} or a BasisStore (name, block_size, allocate, put, get, view, "
            f"resident_bytes, close), got {type(basis).__name__}"
        )
    return basis
