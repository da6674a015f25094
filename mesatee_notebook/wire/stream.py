"""Move frames over a connected socket it is given (the only I/O in ``wire/``).

It opens nothing and chooses no peer: the caller hands it a connected
``ssl.SSLSocket`` (client ↔ kernel) or a Unix socket (supervisor ↔ executor).
Large payloads are sent from memoryviews and received straight into buffers
from an allocator, in big chunks, with payload digests (BLAKE3, ``wire/digest.py``) computed on a helper
thread while the bytes move (``blake3`` releases the GIL on large buffers).
"""

from __future__ import annotations

import ctypes
import mmap
import queue
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict, cast

from mesatee_notebook.errors import KernelConnectionError, MalformedFrame
from mesatee_notebook.wire.digest import Hasher, payload_hasher
from mesatee_notebook.wire.framing import PREFIX, Limits, pack_header, unpack_header, unpack_prefix

__all__ = [
    "CHUNK",
    "Allocator",
    "Message",
    "Progress",
    "RecvOptions",
    "SendOptions",
    "recv_message",
    "send_message",
]

CHUNK = 8 << 20
_INLINE_HASH = 1 << 20
_COALESCE = 64 << 10  # a message with at most this many payload bytes goes out in one write
_MAX_FDS = 64
# Linux 5.14+; Python 3.11's mmap module does not name it yet.
_MADV_POPULATE_WRITE: int | None = int(getattr(mmap, "MADV_POPULATE_WRITE", 23)) if sys.platform == "linux" else None

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)`` called after each chunk of a large payload."""


class Allocator(Protocol):
    """Returns a writable buffer of exactly ``size`` bytes for an incoming payload."""

    def __call__(self, size: int) -> Any: ...


class SendOptions(TypedDict, total=False):
    """The keyword options of :func:`send_message` (and of ``Comm.send``, which passes them on)."""

    digests: bool
    progress: Progress | None
    fds: Sequence[int]
    hasher: Hasher | None


class RecvOptions(TypedDict, total=False):
    """The keyword options of :func:`recv_message` (and of ``Comm.recv``, which passes them on)."""

    allocator: Allocator | None
    digests: bool
    progress: Progress | None
    want_fds: bool
    body_timeout: float | None
    hasher_for: Callable[[dict[str, Any]], Hasher | None] | None
    allocator_for: Callable[[dict[str, Any]], Allocator | None] | None


@dataclass(slots=True)
class Message:
    """A received message: header, payload buffers, optional digests and passed fds."""

    header: dict[str, Any]
    payloads: list[Any] = field(default_factory=list)
    digests: list[str] | None = None
    fds: list[int] = field(default_factory=list)

    @property
    def type(self) -> str:
        """The message type ``t``."""
        return str(self.header["t"])


class _Hasher:
    """The payload digest (BLAKE3) of a sequence of buffers, on a helper thread when they are large."""

    def __init__(self, total: int, into: Hasher | None = None) -> None:
        self._h = into if into is not None else payload_hasher()
        self._thread: threading.Thread | None = None
        self._q: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._aborted = False
        if total > _INLINE_HASH:
            self._thread = threading.Thread(target=self._run, name="mesatee-hash", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while (view := self._q.get()) is not None:
            if not self._aborted:
                self._h.update(view)
            view.release()

    def update(self, view: memoryview) -> None:
        if self._thread is None:
            self._h.update(view)
        else:
            self._q.put(view[:])  # the thread releases its own view, so an aborted frame leaves no export behind

    def hexdigest(self) -> str:
        self.finish()
        return self._h.hexdigest()

    def finish(self) -> None:
        """Wait until every byte given so far is in the digest (a continued digest goes on with the next frame)."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None

    def abort(self) -> None:
        """Stop the helper thread without finishing the digest (a frame was cut off)."""
        if self._thread is not None:
            self._aborted = True
            self._q.put(None)
            self._thread.join()
            self._thread = None


def _as_parts(payload: Any) -> list[memoryview]:
    if isinstance(payload, (list, tuple)):
        return [memoryview(p).cast("B") for p in payload]
    return [memoryview(payload).cast("B")]


def send_message(
    sock: socket.socket,
    header: dict[str, Any],
    payloads: Sequence[Any] = (),
    *,
    digests: bool = False,
    progress: Progress | None = None,
    fds: Sequence[int] = (),
    hasher: Hasher | None = None,
) -> list[str] | None:
    """Send one message; a payload is a buffer or a list of buffers sent back to back.

    Returns the payload digest (BLAKE3 hex, ``wire/digest.py``) of each payload when ``digests`` is true.
    ``hasher`` instead takes every payload byte into a digest that goes on across messages (a result sent in
    chunks, ``wire/arrow_chunks.py``); it is up to date when this returns. ``fds`` (Unix sockets only) travel
    as SCM_RIGHTS with the header. A message of at most 64 KiB of payloads goes out in one write
    (:func:`_send_small`); larger payloads stream from their own buffers.
    """
    parts = [_as_parts(p) for p in payloads]
    sizes = [sum(v.nbytes for v in pp) for pp in parts]
    head = pack_header(header, sizes)
    if sum(sizes) <= _COALESCE:
        if hasher is not None:
            for v in (v for pp in parts for v in pp):
                hasher.update(v)
        return _send_small(sock, header, head, parts, digests and hasher is None, fds)
    try:
        sent = socket.send_fds(sock, [head], list(fds)) if fds else 0
        if sent < len(head):
            sock.sendall(memoryview(head)[sent:])
        return _send_payloads(sock, parts, sizes, digests, hasher, progress)
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            raise
        msg = f"connection lost while sending a {header.get('t')!r} message: {exc}"
        raise KernelConnectionError(msg) from exc


def _send_payloads(
    sock: socket.socket,
    parts: list[list[memoryview]],
    sizes: list[int],
    digests: bool,
    into: Hasher | None,
    progress: Progress | None,
) -> list[str] | None:
    """Send the payloads chunk by chunk, hashing on a helper thread while the bytes move."""
    hasher: _Hasher | None = None
    total = sum(sizes)
    done = 0
    out: list[str] | None = [] if digests and into is None else None
    try:
        for pp, size in zip(parts, sizes, strict=True):
            hasher = _Hasher(size, into) if digests or into is not None else None
            for view in pp:
                for off in range(0, view.nbytes, CHUNK):
                    chunk = view[off : off + CHUNK]
                    sock.sendall(chunk)
                    if hasher is not None:
                        hasher.update(chunk)
                    done += chunk.nbytes
                    if progress is not None and total > CHUNK:
                        progress(done, total)
            if hasher is not None:
                if out is not None:
                    out.append(hasher.hexdigest())
                else:
                    hasher.finish()
            hasher = None
    except BaseException:
        if hasher is not None:
            hasher.abort()
        raise
    return out


def _send_small(
    sock: socket.socket,
    header: dict[str, Any],
    head: bytes,
    parts: list[list[memoryview]],
    digests: bool,
    fds: Sequence[int],
) -> list[str] | None:
    """A small message in one write: prefix, header and payloads joined (one TLS record, one wake-up of the peer).

    Sending the header and each payload part on its own costs a system call and, on a loaded machine, a context
    switch to the reader each (it wakes on the header, then waits again for the payload). The bytes on the wire
    are the same; the digests are those of the same payloads.
    """
    out = [_digest_of(pp) for pp in parts] if digests else None
    frame = b"".join([head, *(v for pp in parts for v in pp)])
    try:
        sent = socket.send_fds(sock, [frame], list(fds)) if fds else 0
        if sent < len(frame):  # (a stream socket may take a large header in more than one write)
            sock.sendall(memoryview(frame)[sent:])
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            raise
        msg = f"connection lost while sending a {header.get('t')!r} message: {exc}"
        raise KernelConnectionError(msg) from exc
    return out


def _digest_of(views: list[memoryview]) -> str:
    h = payload_hasher()
    for view in views:
        h.update(view)
    return h.hexdigest()


class _Prefaulter:
    """Faults in a large ``mmap`` payload buffer on a helper thread, at most ``LEAD`` chunks ahead of the reads.

    A fresh shared-memory page costs more to fault in (allocate, zero, account, map) than the bytes cost to
    receive: about 0.5 CPU-s per GB here. Done on the reading thread, it stops the socket while the sender fills
    the socket buffer and waits. On a helper thread it overlaps the reads; the lead bounds the memory committed
    ahead of bytes that have arrived (a peer that stalls mid-frame commits at most ``LEAD`` chunks more).
    ``mmap.madvise`` holds the GIL for the whole call, so the thread calls libc's ``madvise`` through ctypes
    (which releases it) on an address pinned by a ctypes export of the buffer: the mapping cannot be closed under
    the thread (``stop`` joins it before anyone unmaps). Where the advice is not there (not Linux, a kernel
    before 5.14) nothing is done ahead: the reads' own page faults do the same work.
    """

    LEAD = 4

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self._size = size
        self._credit = threading.Semaphore(self.LEAD)
        self._stopped = False
        self._pin: Any = (ctypes.c_char * size).from_buffer(buf)
        self._thread = threading.Thread(target=self._run, name="mesatee-prefault", daemon=True)
        try:
            self._thread.start()
        except BaseException:
            self._pin = None
            raise

    @classmethod
    def start(cls, buf: Any, size: int) -> _Prefaulter | None:
        """A prefaulter for ``buf``, or None when it does not apply (a small or non-mmap buffer, no advice)."""
        if size <= CHUNK or _madvise is None or _MADV_POPULATE_WRITE is None or not isinstance(buf, mmap.mmap):
            return None
        return cls(buf, size)

    def _run(self) -> None:
        assert _madvise is not None and _MADV_POPULATE_WRITE is not None
        base = ctypes.addressof(self._pin)
        try:
            for off in range(0, self._size, CHUNK):
                self._credit.acquire()
                if self._stopped:
                    return
                if _madvise(base + off, min(CHUNK, self._size - off), _MADV_POPULATE_WRITE) != 0:
                    return  # an older kernel (EINVAL) or no memory: the reads' page faults do it (or fail) instead
        finally:
            self._pin = None  # the export ends here, so the buffer can be closed once this thread is joined

    def advance(self) -> None:
        """One more chunk has been read: the thread may fault in one more ahead."""
        self._credit.release()

    def stop(self) -> None:
        """Stop (the frame is complete, or was cut off) and wait for the thread: its export of the buffer ends."""
        self._stopped = True
        self._credit.release()
        self._thread.join()


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    if _MADV_POPULATE_WRITE is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast("Callable[[int, int, int], int]", fn)


_madvise = _libc_madvise()


def _recv_exact_into(sock: socket.socket, view: memoryview, what: str) -> None:
    pos = 0
    n = view.nbytes
    while pos < n:
        got = sock.recv_into(view[pos:], n - pos)
        if got == 0:
            msg = f"connection closed by the peer in the middle of a frame ({what}: {pos} of {n} bytes)"
            raise KernelConnectionError(msg)
        pos += got


def _recv_prefix(sock: socket.socket, want_fds: bool) -> tuple[bytes, list[int]]:
    buf = bytearray(PREFIX.size)
    view = memoryview(buf)
    fds: list[int] = []
    pos = 0
    if want_fds:
        data, fds, _flags, _addr = socket.recv_fds(sock, PREFIX.size, _MAX_FDS)
        if not data:
            raise EOFError
        view[: len(data)] = data
        pos = len(data)
    else:
        pos = sock.recv_into(view, PREFIX.size)
        if pos == 0:
            raise EOFError
    if pos < PREFIX.size:
        _recv_exact_into(sock, view[pos:], "prefix")
    return bytes(buf), fds


def _recv_payloads(
    sock: socket.socket,
    sizes: list[int],
    payload_total: int,
    alloc: Allocator | type[bytearray],
    payloads: list[Any],
    out: list[str] | None,
    progress: Progress | None,
    into: Hasher | None = None,
) -> None:
    """Receive every payload into ``payloads``; on any failure free what this frame allocated."""
    hasher: _Hasher | None = None
    prefault: _Prefaulter | None = None
    buf: Any = None
    done = [0, payload_total]
    try:
        for size in sizes:
            buf = alloc(size)
            hasher = _Hasher(size, into) if out is not None or into is not None else None
            prefault = _Prefaulter.start(buf, size)
            _recv_payload(sock, buf, size, hasher, prefault, progress, done)
            if prefault is not None:
                prefault.stop()
                prefault = None
            if hasher is not None:
                if out is not None:
                    out.append(hasher.hexdigest())
                else:
                    hasher.finish()
            hasher = None
            payloads.append(buf)
            buf = None
    except BaseException:
        # A cut-off or refused frame: stop its helper threads and unmap its buffers now, not at the next GC.
        if prefault is not None:
            prefault.stop()
        if hasher is not None:
            hasher.abort()
        _unmap([*payloads, buf])
        payloads.clear()
        raise


def _recv_payload(
    sock: socket.socket,
    buf: Any,
    size: int,
    hasher: _Hasher | None,
    prefault: _Prefaulter | None,
    progress: Progress | None,
    done: list[int],
) -> None:
    """Receive one payload into ``buf`` chunk by chunk; ``done`` is [bytes so far, bytes in the frame]."""
    with memoryview(buf) as raw_view, raw_view.cast("B") as view:
        if view.nbytes != size:
            msg = "allocator returned a buffer of the wrong size"
            raise MalformedFrame(msg)
        for off in range(0, size, CHUNK):
            with view[off : off + CHUNK] as chunk:
                _recv_exact_into(sock, chunk, "payload")
                if prefault is not None:
                    prefault.advance()
                if hasher is not None:
                    hasher.update(chunk)
                done[0] += chunk.nbytes
            if progress is not None and done[1] > CHUNK:
                progress(done[0], done[1])


def _unmap(buffers: list[Any]) -> None:
    for b in buffers:
        if isinstance(b, mmap.mmap):
            try:
                b.close()
            except BufferError:  # still exported somewhere: the mapping goes with its last view
                pass


def recv_message(
    sock: socket.socket,
    limits: Limits,
    *,
    allocator: Allocator | None = None,
    digests: bool = False,
    progress: Progress | None = None,
    want_fds: bool = False,
    body_timeout: float | None = None,
    hasher_for: Callable[[dict[str, Any]], Hasher | None] | None = None,
    allocator_for: Callable[[dict[str, Any]], Allocator | None] | None = None,
) -> Message:
    """Receive one message. Raises EOFError on a clean close between messages.

    Sizes are checked against ``limits`` before any header or payload byte is read.
    Each payload lands in a buffer from ``allocator`` (default: ``bytearray``), or from the allocator
    ``allocator_for(header)`` picks for this frame once its header is in (None: the usual one).
    ``body_timeout`` bounds each read once a frame has started, so a peer that stalls
    mid-frame cannot hold the reader forever. ``hasher_for(header)`` may return a digest that goes on
    across frames (a result in chunks): this frame's payload bytes go into it, and no per-payload digests.
    """
    saved = sock.gettimeout()
    try:
        prefix, fds = _recv_prefix(sock, want_fds)
        if body_timeout is not None:
            sock.settimeout(body_timeout)
        header_len, payload_total = unpack_prefix(prefix, limits)
        raw = bytearray(header_len)
        _recv_exact_into(sock, memoryview(raw), "header")
        header = unpack_header(bytes(raw), payload_total, limits)
        picked = allocator_for(header) if allocator_for is not None else None
        alloc: Allocator | type[bytearray] = picked or allocator or bytearray
        payloads: list[Any] = []
        into = hasher_for(header) if hasher_for is not None else None
        out: list[str] | None = [] if digests and into is None else None
        _recv_payloads(sock, header["p"], payload_total, alloc, payloads, out, progress, into)
    except (ConnectionResetError, BrokenPipeError) as exc:
        msg = f"connection reset by the peer: {exc}"
        raise KernelConnectionError(msg) from exc
    finally:
        if body_timeout is not None:
            sock.settimeout(saved)
    return Message(header=header, payloads=payloads, digests=out, fds=fds)
