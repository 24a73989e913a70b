"""A Lanczos basis store that spills to a memory-mapped file (the disk side of :mod:`probe.basis`).

:class:`DiskBasis` keeps the ``(capacity, runs, local_dim)`` basis in a file in a
given folder, mapped with ``torch.from_file(..., shared=True)``: the kernel writes
pages back to the file and evicts them under memory pressure, so the process's
own memory holds only the blocks being projected (``block_size`` vectors per run,
copied to the operator's device). The file is reserved in full when the basis is
allocated (``posix_fallocate`` where available), so a full disk is an error at
the start, not a ``SIGBUS`` halfway through a run.

The file is removed when the store is closed, when it is re-allocated for the
next run, or when the store is garbage-collected; use it as a context manager::

    with DiskBasis(scratch_folder) as store:
        spectrum = spectral_density(op, runs=10, steps=80, basis=store)

A result's ``basis`` view stays readable after the file is removed (POSIX keeps
the mapping until it is released).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from torch import Tensor

from probe.basis import DEFAULT_BLOCK_SIZE, HostBasis

__all__ = ["DiskBasis", "FILE_PREFIX"]

FILE_PREFIX = "lanczos-basis-"
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class DiskBasis(HostBasis):
    """The Lanczos basis in a memory-mapped file in ``folder``.

    Args:
        folder: an existing, writable folder (a local scratch disk: the basis is
            read in full two to four times per Lanczos step).
        block_size: vectors per run copied to the device at a time; default 8.

    Attributes:
        path: the current file, or None when no basis is allocated.

    Raises:
        FileNotFoundError: if ``folder`` does not exist.
        NotADirectoryError: if ``folder`` is not a folder.
        PermissionError: if no file can be created in ``folder``.
        OSError: (errno ENOSPC, from :meth:`allocate`) if ``folder``'s file system
            has no room for the basis.
        ValueError: for a ``block_size`` that is not a positive integer or None.
    """

    name = "disk"

    def __init__(self, folder: str | os.PathLike, *, block_size: int | None = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(block_size=block_size, pin_memory=False)
        self.folder = Path(folder)
        if not self.folder.exists():
            raise FileNotFoundError(f"DiskBasis folder {self.folder} does not exist; create it or pass another folder")
        if not self.folder.is_dir():
            raise NotADirectoryError(
                f"DiskBasis folder {self.folder} is not a folder; pass a folder for the basis file"
            )
        path = self._create_file()  # fails now, naming the folder, if nothing can be written there
        _remove(path)
        self.path: Path | None = None
        self._finalizers: dict[str, weakref.finalize] = {}

    def __enter__(self) -> DiskBasis:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create_file(self) -> str:
        try:
            fd, path = tempfile.mkstemp(prefix=FILE_PREFIX, suffix=".bin", dir=self.folder)
        except PermissionError as e:
            raise PermissionError(
                f"DiskBasis folder {self.folder} is not writable ({e.strerror}); "
                "pass a folder this process can write to"
            ) from e
        except OSError as e:
            raise OSError(
                e.errno,
                f"cannot create a basis file in DiskBasis folder {self.folder} ({e.strerror}); pass another folder",
            ) from e
        os.close(fd)
        return path

    def _new_buffer(self, shape: tuple[int, int, int], dtype: torch.dtype) -> tuple[Tensor, object]:
        numel = shape[0] * shape[1] * shape[2]
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        free = shutil.disk_usage(self.folder).free
        if nbytes > free:
            raise self._no_space(nbytes, free)
        path = self._create_file()
        try:
            self._reserve(path, nbytes)
            data = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        except BaseException:
            _remove(path)
            raise
        # The file goes when the store is closed or collected, whichever comes first.
        self._finalizers[path] = weakref.finalize(self, _remove, path)
        self.path = Path(path)
        return data.view(shape), path

    def _reserve(self, path: str, nbytes: int) -> None:
        """Give the file its size, with its blocks allocated where the file system can."""
        fd = os.open(path, os.O_RDWR)
        try:
            if nbytes and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(fd, 0, nbytes)
                    return
                except OSError as e:
                    if e.errno in _NO_SPACE:
                        raise self._no_space(nbytes, shutil.disk_usage(self.folder).free) from e
                    # EOPNOTSUPP/EINVAL: a file system without preallocation; fall back to a sparse file.
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)

    def _no_space(self, nbytes: int, free: int) -> OSError:
        return OSError(
            errno.ENOSPC,
            f"no space for the Lanczos basis in DiskBasis folder {self.folder}: needs {nbytes} bytes, {free} free; "
            "free space there, pass another folder, or lower runs or steps",
        )

    def _free(self, token: object) -> None:
        path = str(token)
        finalizer = self._finalizers.pop(path, None)
        if finalizer is not None:
            finalizer()  # removes the file (once)
        else:
            _remove(path)
        if self.path is not None and str(self.path) == path:
            self.path = None

    def resident_bytes(self, runs: int, capacity: int, local_dim: int, dtype: torch.dtype) -> int:
        """Memory held outside the file: one block (or the whole basis when ``block_size`` is None)."""
        rows = capacity if self.block_size is None else min(capacity, self.block_size)
        return runs * rows * local_dim * torch.empty((), dtype=dtype).element_size()

    def close(self) -> None:
        """Release the mapping and remove the file (idempotent)."""
        super().close()  # frees the current file through _free
