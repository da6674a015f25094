"""A large DataFrame result as one Arrow IPC stream sent in row chunks (pure: no I/O).

A result of many rows is one Arrow IPC stream (schema, dictionaries, record batches of about :data:`CHUNK_BYTES`
each, end-of-stream marker) cut at message boundaries: :func:`frame_chunks` yields each chunk's bytes as it is
written (the columns' own memory, not copied), so the kernel can send chunk *k* while it writes chunk *k + 1*.
The chunks taken back to back are exactly a standard Arrow IPC stream, the bytes a receipt's digest covers
(incremental BLAKE3 over the chunks); :func:`decode_chunks` reads them with Arrow's own stream reader, without
copying them into one buffer, after full validation (as ``wire/codecs.py`` does for one-buffer frames).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from mesatee_notebook.errors import MalformedFrame
from mesatee_notebook.wire.arrow_fast import zero_copy_table

__all__ = ["CHUNK_BYTES", "CHUNKED_MIN", "ChunkSource", "decode_chunks", "frame_chunks"]

CHUNK_BYTES = 8 << 20
"""About this many bytes of column data per record batch (and per frame on the wire)."""
CHUNKED_MIN = 32 << 20
"""DataFrames with fewer column bytes go as one payload (``wire/codecs.py``)."""


def frame_chunks(
    df: Any, *, chunk_bytes: int = CHUNK_BYTES, min_bytes: int = CHUNKED_MIN
) -> Iterator[list[Any]] | None:
    """The Arrow IPC stream of ``df`` as chunks of whole IPC messages (each a list of buffers), or None.

    None when ``df`` is not a DataFrame of at least ``min_bytes`` of column data (the caller encodes it as one
    payload). The table is the one ``wire/codecs.py`` would send (same schema and pandas metadata), written as
    record batches of about ``chunk_bytes``; the first chunk also holds the schema and any dictionaries, the
    last one is the end-of-stream marker.
    """
    import pandas as pd
    import pyarrow as pa

    if not isinstance(df, pd.DataFrame) or df.shape[0] < 2:
        return None
    try:
        table = zero_copy_table(df)
        if table is None:
            table = pa.Table.from_pandas(df, preserve_index=None)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError):
        return None  # the one-payload encoder raises the typed error with its explanation
    size = table.get_total_buffer_size()
    if size < min_bytes:
        return None
    rows = max(1, int(chunk_bytes * table.num_rows / max(size, 1)))
    return _chunks(table, rows)


def _chunks(table: Any, rows: int) -> Iterator[list[Any]]:
    import pyarrow as pa

    sink = _ChunkSink()
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), table.schema) as writer:
        for start in range(0, table.num_rows, rows):
            part = table.slice(start, rows)
            if any(col.num_chunks > 1 for col in part.columns):
                part = part.combine_chunks()
            writer.write_table(part)  # one record batch (every column one chunk)
            yield sink.take()
    yield sink.take()  # the end-of-stream marker


class _ChunkSink:
    """A write-only file for ``pa.PythonFile``: keeps large buffers as they are (shared with the table)."""

    _SMALL = 1 << 16

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self._small: bytearray | None = None
        self.closed = False
        self._pos = 0

    def take(self) -> list[Any]:
        out, self.parts, self._small = self.parts, [], None
        return out

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        self._pos += n
        if n < self._SMALL:
            if self._small is None:
                self._small = bytearray()
                self.parts.append(self._small)
            self._small += view
        else:
            self._small = None
            self.parts.append(data)
        return n

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


class ChunkSource:
    """A read-only file over received chunks for ``pa.PythonFile``: reads are slices of the chunks (no copy).

    Arrow's stream reader asks for each message's length, metadata and body in turn; a read that crosses a
    chunk boundary (a message split across chunks, which :func:`frame_chunks` never makes) is joined.
    """

    def __init__(self, buffers: Sequence[Any]) -> None:
        self._views = [memoryview(b).cast("B") for b in buffers]
        self._i = 0
        self._off = 0
        self._pos = 0
        self.closed = False

    def read(self, n: int | None = -1) -> Any:
        want = sum(v.nbytes for v in self._views) if n is None or n < 0 else n
        pieces: list[Any] = []
        while want > 0 and self._i < len(self._views):
            view = self._views[self._i]
            take = min(want, view.nbytes - self._off)
            if take > 0:
                pieces.append(view[self._off : self._off + take])
                self._off += take
                want -= take
                self._pos += take
            if self._off >= view.nbytes:
                self._i += 1
                self._off = 0
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self.closed = True
        self._views = []

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


def decode_chunks(buffers: Sequence[Any]) -> Any:
    """The DataFrame of an Arrow IPC stream received as chunks; the numeric columns are joined once.

    Every chunk is validated in full (offsets, UTF-8, dictionary indices) before pandas reads its buffers;
    a malformed stream is a :class:`MalformedFrame`.
    """
    import pyarrow as pa

    try:
        table = pa.ipc.open_stream(pa.PythonFile(ChunkSource(buffers), mode="r")).read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:
        msg = f"chunked result is not a valid Arrow IPC stream: {exc}"
        raise MalformedFrame(msg) from exc
    try:
        table.validate(full=True)
        return table.to_pandas(split_blocks=True, self_destruct=True)
    except Exception as exc:  # pyarrow and pandas raise many unrelated types on a bad schema or metadata
        msg = f"chunked result's Arrow table cannot be read as a DataFrame: {type(exc).__name__}: {exc}"[:500]
        raise MalformedFrame(msg) from exc
    finally:
        del table
