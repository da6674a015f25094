"""The client's side of a result that arrives in chunks (``enclave/result_stream.py``).

``result.chunk`` frames come before the final reply. Each value's chunks are received straight into their place
in one buffer of the value's size (:class:`~mesatee_notebook.wire.arrow_chunks.ChunkBuffer`, the frame reader's
allocator hook), and their bytes go, as they arrive, into one BLAKE3 per value (:meth:`ResultChunks.hasher_for`,
the frame reader's digest hook), so each byte is copied and hashed once. Only after the final reply's receipt has
been verified against those digests is a value decoded, as one payload, exactly as if it had come whole.
"""

from __future__ import annotations

from typing import Any

from mesatee_notebook.errors import MalformedFrame
from mesatee_notebook.wire.arrow_chunks import ChunkBuffer
from mesatee_notebook.wire.codecs import decode_value
from mesatee_notebook.wire.digest import Hasher, payload_hasher
from mesatee_notebook.wire.stream import Message

__all__ = ["ResultChunks"]


class ResultChunks:
    """The chunks of one call's streamed values, with their digests; at most ``limit`` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.buffers: dict[str, ChunkBuffer] = {}
        self._counts: dict[str, int] = {}
        self._hashers: dict[str, Hasher] = {}
        self._current: ChunkBuffer | None = None

    def hasher_for(self, header: dict[str, Any]) -> Hasher | None:
        """The frame reader's hook, before any payload byte is read: a chunk's bytes go into its value's digest."""
        self._current = None
        if header.get("t") != "result.chunk":
            return None
        name, index, size, sizes = header.get("name"), header.get("index"), header.get("size"), header.get("p")
        if not isinstance(name, str) or index != self._counts.get(name, 0) or not isinstance(size, int):
            msg = f"result chunk {index!r} of {name!r} arrived out of order"
            raise MalformedFrame(msg)
        if not isinstance(sizes, list) or len(sizes) != 1:
            msg = "a result chunk carries exactly one payload"
            raise MalformedFrame(msg)
        buf = self.buffers.get(name)
        if buf is None:
            if size > self.limit - self.size:
                msg = f"a chunked result over this connection's payload limit ({self.limit} bytes)"
                raise MalformedFrame(msg)
            self.size += size
            buf = self.buffers[name] = ChunkBuffer(size)
        elif size != buf.size:
            msg = f"result chunks of {name!r} announce different sizes"
            raise MalformedFrame(msg)
        self._counts[name] = index + 1
        self._current = buf
        return self._hashers.setdefault(name, payload_hasher())

    def allocate(self, size: int) -> Any:
        """The frame reader's allocator: a chunk lands in its place in its value's buffer; anything else as usual."""
        if self._current is None:
            return bytearray(size)
        return self._current.take(size)

    def add(self, msg: Message) -> None:
        """A chunk is in (its bytes are in the value's buffer already)."""
        msg.payloads.clear()
        self._current = None

    def digests(self, specs: list[dict[str, Any]]) -> dict[str, str]:
        """The digest of each streamed value the final reply names (``chunks: n``), checked against what came."""
        out: dict[str, str] = {}
        for spec in specs:
            name = str(spec.get("name"))
            came = self._counts.get(name, 0)
            if spec.get("chunks") != came or came == 0:
                msg = f"the result names {spec.get('chunks')!r} chunks of {name!r}; {came} came"
                raise MalformedFrame(msg)
            out[name] = self._hashers[name].hexdigest()
        if set(self.buffers) - set(out):
            msg = "result chunks came for values the result does not name"
            raise MalformedFrame(msg)
        return out

    def decode(self, spec: dict[str, Any]) -> Any:
        """A streamed value (after its receipt was verified), decoded from its buffer as one payload."""
        buf = self.buffers.pop(str(spec["name"])).done()
        return decode_value(str(spec["kind"]), buf, meta=spec.get("meta"))

    def clear(self) -> None:
        """Unmap every buffer now (a cut-off, refused or failed call)."""
        self._current = None
        for buf in self.buffers.values():
            buf.close()
        self.buffers.clear()
        self._hashers.clear()
