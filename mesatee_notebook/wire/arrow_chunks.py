"""A large result value sent in chunks: its encoded bytes (``wire/codecs.py``) cut into pieces (pure: no I/O).

A large DataFrame result is the same one-batch Arrow IPC stream ``encode_value`` makes, zero-copy (message
headers, then the columns' own memory). :func:`split_parts` cuts that list of buffers into byte ranges of about
:data:`CHUNK_BYTES` without copying, so the kernel can pass chunk *k* on while the next is still on its way. The
receiver puts every chunk in its place in one buffer of the value's size (:class:`ChunkBuffer`) and decodes that
buffer as one payload, the way a value that came whole is decoded: the bytes, their digest (one BLAKE3 over the
chunks back to back) and the DataFrame are exactly those of the unchunked path, and each column stays one
contiguous buffer that pandas uses without a copy.

In the supervisor, every chunk of one exchange lands in the same buffer (:class:`ChunkLanding`), which the relay
has sent on and hashed before the next chunk is read, so no chunk costs a fresh zero-filled buffer.

Chunks of a record batch cannot be decoded on their own; that is the price of a decode with no copy, and the decode
only runs after the receipt is verified anyway.
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from mesatee_notebook.errors import MalformedFrame

if TYPE_CHECKING:
    from mesatee_notebook.wire.stream import Allocator

__all__ = ["CHUNKED_MIN", "CHUNK_BYTES", "ChunkBuffer", "ChunkLanding", "split_parts"]

CHUNK_BYTES = 8 << 20
"""About this many bytes per chunk (one frame on the wire, one message on the executor link)."""
CHUNKED_MIN = 32 << 20
"""Values with fewer encoded bytes go whole, as one payload."""
_CHUNK_T = "result.chunk"  # wire/protocol.ResultChunk.T (kept here so this module imports no protocol)
_MAP_ANONYMOUS = int(getattr(mmap, "MAP_ANONYMOUS", 0x20))
# Linux 5.14+; Python 3.11's mmap module does not name it yet.
_MADV_POPULATE_WRITE: int | None = int(getattr(mmap, "MADV_POPULATE_WRITE", 23)) if sys.platform == "linux" else None
_POPULATE_MIN = 1 << 20


def _populate(mm: mmap.mmap, start: int, n: int) -> None:
    """Fault in ``mm[start:start+n]`` with one call before the bytes arrive (one page fault trap per page saved).

    It commits only the range the next chunk fills, within the size already checked against the payload limit.
    Where the advice is not there (an older kernel: EINVAL), the reads' own page faults do the same work.
    """
    if _MADV_POPULATE_WRITE is None or n < _POPULATE_MIN:
        return
    lo = start - start % mmap.PAGESIZE
    try:
        mm.madvise(_MADV_POPULATE_WRITE, lo, start + n - lo)
    except OSError:
        pass


def split_parts(parts: Sequence[Any], chunk_bytes: int = CHUNK_BYTES) -> Iterator[list[memoryview]]:
    """The buffers ``parts``, taken back to back, as chunks of ``chunk_bytes`` (the last may be shorter); no copy."""
    if chunk_bytes <= 0:
        msg = "chunk size must be positive"
        raise ValueError(msg)
    pending: list[memoryview] = []
    room = chunk_bytes
    for part in parts:
        view = memoryview(part).cast("B")
        while view.nbytes:
            take = min(room, view.nbytes)
            pending.append(view[:take])
            view = view[take:]
            room -= take
            if room == 0:
                yield pending
                pending, room = [], chunk_bytes
    if pending:
        yield pending


class ChunkLanding:
    """In the supervisor: the one buffer that a service exchange's result chunks land in, chunk after chunk.

    The relay (``enclave/result_stream.ChunkRelay.on_chunk``) sends a chunk on to the client, and its digest is up
    to date, before it returns, and the executor handle reads the next message only after that, so the buffer is
    free again for the next chunk. Only ``ResultChunk`` frames land here; every other frame gets a fresh buffer as
    before, and so does a chunk larger than the chunk size (the relay checks sizes and order itself).
    """

    def __init__(self) -> None:
        self._buf: bytearray | None = None

    def allocator_for(self, header: dict[str, Any]) -> Allocator | None:
        """The frame reader's hook: the reused buffer for a result chunk, None (a fresh one) for anything else."""
        return self._take if header.get("t") == _CHUNK_T else None

    def _take(self, size: int) -> Any:
        if size > CHUNK_BYTES:
            return bytearray(size)
        if self._buf is None:
            self._buf = bytearray(CHUNK_BYTES)  # zero-filled once per exchange, not once per chunk
        return memoryview(self._buf)[:size]


class ChunkBuffer:
    """The receiving end: one anonymous mapping of the value's size, filled chunk by chunk in order.

    Its pages are faulted in chunk by chunk as the bytes arrive (no zero-fill pass first, unlike a ``bytearray``;
    one ``MADV_POPULATE_WRITE`` per chunk, not one page fault per page).
    :meth:`take` hands each incoming chunk its place (a ``memoryview`` slice, for ``recv_into``);
    :meth:`close` unmaps it at once (a cut-off or refused result).
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            msg = "a chunked value has a positive size"
            raise MalformedFrame(msg)
        self.size = size
        self.filled = 0
        # Private, not the shmem a plain ``mmap(-1, n)`` is: its pages fault in faster (docs/benchmarks.md, P7).
        # Not MADV_HUGEPAGE: with this host's THP defrag setting a huge-page fault may compact memory first,
        # which cost up to 6x more CPU than 4 KiB pages in the measurements there.
        self._mm: mmap.mmap | None = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | _MAP_ANONYMOUS)
        self._views: list[memoryview] = []

    def take(self, n: int) -> memoryview:
        """The next ``n`` bytes of the buffer, for the next chunk."""
        if self._mm is None or self.filled + n > self.size:
            msg = f"result chunks overrun their value's announced size ({self.size} bytes)"
            raise MalformedFrame(msg)
        _populate(self._mm, self.filled, n)
        view = memoryview(self._mm)[self.filled : self.filled + n]
        self._views.append(view)
        self.filled += n
        return view

    def release(self) -> None:
        """Let go of the slices handed out (they were only for receiving)."""
        for v in self._views:
            v.release()
        self._views.clear()

    def done(self) -> mmap.mmap:
        """The whole value's bytes, once every chunk is in."""
        self.release()
        if self._mm is None or self.filled != self.size:
            msg = f"a chunked value is incomplete: {self.filled} of {self.size} bytes came"
            raise MalformedFrame(msg)
        mm, self._mm = self._mm, None
        return mm

    def close(self) -> None:
        """Unmap now (a result that will not be decoded)."""
        self.release()
        if self._mm is not None:
            mm, self._mm = self._mm, None
            try:
                mm.close()
            except BufferError:  # still exported by a frame reader's view: it goes with that view
                pass

    @property
    def closed(self) -> bool:
        """True once unmapped or handed over."""
        return self._mm is None
