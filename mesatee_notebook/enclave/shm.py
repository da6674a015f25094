"""Payload buffers the supervisor can hand to an executor without copying (memfd + mmap)."""

from __future__ import annotations

import mmap
import os
from typing import Any

__all__ = ["SHARED_THRESHOLD", "SharedAllocator", "map_fd", "memfd_from_parts", "spool_in"]

SHARED_THRESHOLD = 256 << 10
_SPOOL: str | None = None


def spool_in(directory: str) -> None:
    """Inside a sandbox: write outgoing buffers to unnamed files on ``directory`` (its size-limited tmpfs).

    The sandbox's seccomp filter refuses ``memfd_create``: a memfd that is written but never mapped is memory no
    page table shows, so the supervisor could not count it against the sandbox's limit.
    """
    global _SPOOL
    _SPOOL = directory


class SharedAllocator:
    """Allocator for ``recv_message``: large payloads land in memfds that can be passed on."""

    def __init__(self, threshold: int = SHARED_THRESHOLD) -> None:
        self.threshold = threshold
        self.fds: dict[int, int] = {}

    def __call__(self, size: int) -> Any:
        if size < self.threshold:
            return bytearray(size)
        fd = os.memfd_create("mesatee-payload", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
        self.fds[id(mm)] = fd
        return mm

    def fd_of(self, buf: Any) -> int | None:
        """The memfd behind ``buf``, if it has one."""
        return self.fds.get(id(buf))

    def close(self) -> None:
        """Close every memfd this allocator made (mappings stay valid until unmapped)."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def memfd_from_parts(parts: list[Any]) -> int:
    """Write buffers into a new memfd (or spool file, in a sandbox) and return it (large executor outputs)."""
    if _SPOOL is not None:
        fd = os.open(_SPOOL, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    else:
        fd = os.memfd_create("mesatee-output", os.MFD_CLOEXEC)
    try:
        for p in parts:
            view = memoryview(p).cast("B")
            while view.nbytes:
                n = os.write(fd, view)
                view = view[n:]
    except OSError:
        os.close(fd)
        raise
    return fd


def map_fd(fd: int, *, writable_copy: bool = True) -> Any:
    """Map a whole memfd; copy-on-write so decoded arrays are writable without copying up front."""
    size = os.fstat(fd).st_size
    if size == 0:
        return bytearray()
    return mmap.mmap(fd, size, access=mmap.ACCESS_COPY if writable_copy else mmap.ACCESS_READ)
