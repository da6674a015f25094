"""The client's side of a result that arrives in chunks (``enclave/result_stream.py``).

``result.chunk`` frames come before the final reply. Their payload bytes go, as they are received, into one
BLAKE3 per value (:meth:`ResultChunks.hasher_for` is the frame reader's hook, so each byte is hashed once);
the buffers are kept as they are. Only after the final reply's receipt has been verified against those digests
are the chunks decoded, by Arrow's stream reader, into one DataFrame (``wire/arrow_chunks.py``).
"""

from __future__ import annotations

from typing import Any

from mesatee_notebook.errors import MalformedFrame
from mesatee_notebook.wire.arrow_chunks import decode_chunks
from mesatee_notebook.wire.digest import Hasher, payload_hasher
from mesatee_notebook.wire.stream import Message

__all__ = ["ResultChunks"]


class ResultChunks:
    """The chunks of one call's streamed values, with their digests; at most ``limit`` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._buffers: dict[str, list[Any]] = {}
        self._hashers: dict[str, Hasher] = {}

    def hasher_for(self, header: dict[str, Any]) -> Hasher | None:
        """The frame reader's hook: a chunk's bytes go into its value's digest (checked before they are read)."""
        if header.get("t") != "result.chunk":
            return None
        name, index = header.get("name"), header.get("index")
        if not isinstance(name, str) or index != len(self._buffers.get(name, ())):
            msg = f"result chunk {index!r} of {name!r} arrived out of order"
            raise MalformedFrame(msg)
        sizes = header.get("p") or []
        self.size += sum(int(n) for n in sizes)
        if len(sizes) != 1 or self.size > self.limit:
            msg = f"a chunked result over this connection's payload limit ({self.limit} bytes), or a malformed chunk"
            raise MalformedFrame(msg)
        return self._hashers.setdefault(name, payload_hasher())

    def add(self, msg: Message) -> None:
        """Keep one received chunk's buffer."""
        self._buffers.setdefault(str(msg.header["name"]), []).append(msg.payloads[0])

    def digests(self, specs: list[dict[str, Any]]) -> dict[str, str]:
        """The digest of each streamed value the final reply names (``chunks: n``), checked against what came."""
        out: dict[str, str] = {}
        for spec in specs:
            name = str(spec["name"])
            came = len(self._buffers.get(name, ()))
            if spec.get("chunks") != came or spec.get("kind") != "arrow.frame":
                msg = f"the result names {spec.get('chunks')!r} chunks of {name!r}; {came} came"
                raise MalformedFrame(msg)
            out[name] = self._hashers[name].hexdigest()
        if set(self._buffers) - set(out):
            msg = "result chunks came for values the result does not name"
            raise MalformedFrame(msg)
        return out

    def decode(self, name: str) -> Any:
        """The DataFrame of a streamed value (after its receipt was verified); its buffers are handed over."""
        buffers = self._buffers.pop(name)
        try:
            return decode_chunks(buffers)
        finally:
            buffers.clear()

    def clear(self) -> None:
        """Drop every buffer (a failed call)."""
        self._buffers.clear()
        self._hashers.clear()
