"""Remembered layouts of small one-dtype frames: the Arrow IPC bytes of a 1-row prediction frame, without Arrow.

A small frame of one numpy int/float dtype with a RangeIndex (a 1-row prediction frame of a few dozen columns)
always gives the same Arrow IPC stream but for the column values: the schema message, the record batch's metadata
and the end-of-stream marker depend only on the layout (labels, dtype, index, column index). The first frame of a
layout goes through Arrow (``wire/codecs.py``); where its column buffers sit in the stream is read off the buffers
Arrow decoded in place (their addresses), and from then on:

- :func:`encode_small` writes the remembered bytes with the new values in their places and zeros in the padding
  between them (where Arrow, writing slices of one buffer, leaves the neighbouring values): the first frame of
  each layout is written this way too and read back by Arrow as exactly that frame before the layout is kept
  (``tests/core/test_codecs_fast.py`` checks frames of every layout it remembers);
- :func:`decode_small` recognises a stream whose every byte outside the value buffers equals one it fully validated
  (``Table.validate(full=True)`` and the general decode) and builds the same frame from the values. Any bit
  pattern is a valid int or float, so there is nothing left to validate in them.

Layouts are remembered per ``scope``: the service worker passes the calling party, so whether a layout is
remembered (a timing difference of about a millisecond) tells a party only about its own earlier calls, and a
party that sends ever new layouts fills only its own room (16 layouts; heads over 64 KiB are not kept).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from mesatee_notebook.wire.arrow_fast import Scoped, room, scoped

__all__ = ["decode_small", "encode_small", "remember_decoded", "remember_encoded", "single_dtype"]

SMALL = 1 << 16
"""Frames up to this many bytes of values are remembered (a layout's bytes are kept: one schema message each)."""

_PER_SCOPE = 16  # layouts remembered per scope (then that scope starts over)
_MAX_HEAD = 1 << 16  # a layout whose non-value bytes are longer (thousands of labels) is not remembered


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where the values sit in one layout's stream, and every other byte of it."""

    head: bytes  # everything before the first column's values
    tail: bytes  # everything after the last column's values (padding, end-of-stream marker)
    stride: int  # bytes from one column's values to the next
    nbytes: int  # bytes of values per column
    ncols: int
    dtype: np.dtype[Any]
    columns: Any  # decode: the column index of the frame Arrow decoded (immutable; each frame gets a view)
    index: tuple[int, int, int, str | None]  # RangeIndex start, stop, step, name

    @property
    def size(self) -> int:
        return len(self.head) + (self.ncols - 1) * self.stride + self.nbytes + len(self.tail)


_ENCODE: Scoped = collections.OrderedDict()  # layout key -> _Layout, or None: Arrow lays that layout out otherwise
_DECODE: Scoped = collections.OrderedDict()  # by scope, then stream size -> [_Layout]


def _room(cache: Scoped, scope: str | None) -> Any:
    """``cache[scope]``, emptied if full; a hostile party filling its own scope evicts nobody else's layouts."""
    return room(cache, scope, _PER_SCOPE, lambda mine: sum(len(v) if isinstance(v, list) else 1 for v in mine.values()))


def _frame_key(df: Any) -> tuple[tuple[Any, ...], np.dtype[Any]] | None:
    """(layout key, dtype) of a frame :func:`encode_small` can write, else None."""
    import pandas as pd

    idx, cols = df.index, df.columns
    rows, ncols = df.shape
    plain = isinstance(idx, pd.RangeIndex) and not isinstance(cols, pd.MultiIndex) and not df.attrs
    if not plain or not 0 < rows * ncols <= SMALL:  # too large at any item size: look at nothing else
        return None
    dtype = single_dtype(df)
    if dtype is None or rows * ncols * dtype.itemsize > SMALL:
        return None
    if not (dtype.kind in "iu" or dtype.str[1:] in ("f4", "f8")) or dtype.byteorder not in ("=", "|"):
        return None
    names = cols.tolist()
    if not all(type(c) is str for c in names) or not cols.is_unique:
        return None
    if not all(n is None or isinstance(n, str) for n in (idx.name, cols.name)):
        return None
    key = (tuple(names), dtype.str, str(cols.dtype), cols.name, idx.name, idx.start, idx.stop, idx.step)
    return key, dtype


def single_dtype(df: Any) -> np.dtype[Any] | None:
    """The frame's one numpy dtype, or None (several dtypes, or an extension dtype).

    ``df.dtypes`` builds a Series (about 0.1 ms for a few dozen columns); one consolidated block is its dtype.
    """
    blocks = getattr(getattr(df, "_mgr", None), "blocks", None)
    if blocks is not None and len(blocks) == 1 and isinstance(blocks[0].dtype, np.dtype):
        dtype: np.dtype[Any] = blocks[0].dtype
        return dtype
    kinds = set(df.dtypes.tolist())
    if len(kinds) == 1:
        (only,) = kinds
        return only if isinstance(only, np.dtype) else None
    return None


def _values(df: Any, layout: _Layout) -> np.ndarray[Any, Any]:
    """The frame's values column after column, as (columns, bytes per column)."""
    cols = np.ascontiguousarray(df.to_numpy(dtype=layout.dtype).T)
    return cols.view(np.uint8).reshape(layout.ncols, layout.nbytes)


def encode_small(df: Any, scope: str | None) -> bytes | None:
    """The Arrow IPC stream of ``df`` from its remembered layout, or None (not such a frame, or not seen yet)."""
    found = _frame_key(df)
    if found is None:
        return None
    layout = (scoped(_ENCODE, scope) or {}).get(found[0])
    if layout is None:
        return None
    return _write(layout, _values(df, layout))


def _write(layout: _Layout, values: np.ndarray[Any, Any]) -> bytes:
    out = bytearray(layout.size)
    start = len(layout.head)
    out[:start] = layout.head
    body = np.frombuffer(out, dtype=np.uint8, count=layout.size - start - len(layout.tail), offset=start)
    as_strided(body, shape=(layout.ncols, layout.nbytes), strides=(layout.stride, 1), writeable=True)[:] = values
    out[layout.size - len(layout.tail) :] = layout.tail
    return bytes(out)


def _locate(raw: Any, dtype: np.dtype[Any], rows: int, ncols: int) -> tuple[bytes, bytes, int, int] | None:
    """(head, tail, stride, nbytes) of a stream whose columns Arrow reads in place at equal strides, else None."""
    import pyarrow as pa

    buf = pa.py_buffer(raw)
    try:
        table = pa.ipc.open_stream(buf).read_all()
    except (pa.ArrowException, OSError, ValueError):
        return None
    nbytes = rows * dtype.itemsize
    starts = []
    for col in table.columns:
        if col.num_chunks != 1:
            return None
        arr = col.chunk(0)
        bufs = arr.buffers()
        if arr.offset or arr.null_count or len(bufs) != 2 or bufs[1] is None or bufs[1].size < nbytes:
            return None
        starts.append(bufs[1].address - buf.address)
    stride = starts[1] - starts[0] if ncols > 1 else nbytes
    end = starts[-1] + nbytes
    view = memoryview(raw).cast("B")
    if len(starts) != ncols or starts[0] <= 0 or stride < nbytes or end > view.nbytes:
        return None
    if any(s != starts[0] + i * stride for i, s in enumerate(starts)):
        return None
    return bytes(view[: starts[0]]), bytes(view[end:]), stride, nbytes


def remember_encoded(df: Any, raw: Any, scope: str | None) -> None:
    """After Arrow wrote ``raw`` for ``df``: remember its layout if writing it ourselves gives the same bytes."""
    found = _frame_key(df)
    if found is None or found[0] in (scoped(_ENCODE, scope) or {}):
        return
    key, dtype = found
    rows, ncols = df.shape
    located = _locate(_one_buffer_per_column(df, raw), dtype, rows, ncols)
    layout = None
    if located is not None:
        head, tail, stride, nbytes = located
        idx = df.index
        layout = _Layout(head, tail, stride, nbytes, ncols, dtype, None, (idx.start, idx.stop, idx.step, idx.name))
        if not _reads_back(_write(layout, _values(df, layout)), df):
            layout = None
    if layout is not None and len(layout.head) > _MAX_HEAD:
        layout = None
    _room(_ENCODE, scope)[key] = layout


def _one_buffer_per_column(df: Any, raw: Any) -> bytes:
    """``df`` as Arrow writes it with the schema of ``raw`` when each column is an array of its own.

    (The general encoder slices one buffer into the columns, and Arrow may then write a slice's whole parent
    buffer: a valid stream, but not one whose values sit at equal strides.)
    """
    import pyarrow as pa

    schema = pa.ipc.open_stream(pa.py_buffer(raw)).schema
    cols = np.ascontiguousarray(df.to_numpy().T)
    arrays = [pa.array(cols[i].copy(), type=schema.field(i).type) for i in range(cols.shape[0])]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
    return bytes(sink.getvalue())


def _reads_back(raw: bytes, df: Any) -> bool:
    """Whether Arrow reads ``raw`` as exactly ``df`` (values bit for bit, labels, index, column index)."""
    import pyarrow as pa

    try:
        back = pa.ipc.open_stream(pa.py_buffer(raw)).read_all().to_pandas()
    except (pa.ArrowException, OSError, ValueError):
        return False
    return bool(
        back.shape == df.shape
        and back.columns.equals(df.columns)
        and back.columns.name == df.columns.name
        and back.index.equals(df.index)
        and back.index.name == df.index.name
        and (back.dtypes == df.dtypes).all()
        and back.to_numpy().tobytes() == df.to_numpy().tobytes()
    )


def remember_decoded(raw: Any, df: Any, scope: str | None) -> None:
    """After the general path decoded ``raw`` (validated) into ``df``: remember its layout for ``scope``."""
    found = _frame_key(df)
    if found is None:
        return
    dtype = found[1]
    rows, ncols = df.shape
    located = _locate(raw, dtype, rows, ncols)
    if located is None:
        return
    head, tail, stride, nbytes = located
    idx = df.index
    layout = _Layout(head, tail, stride, nbytes, ncols, dtype, df.columns, (idx.start, idx.stop, idx.step, idx.name))
    if layout.size != memoryview(raw).nbytes:
        return
    again = _build(layout, raw)
    if again.to_numpy().tobytes() != df.to_numpy().tobytes() or not again.columns.equals(df.columns):
        return
    if len(head) > _MAX_HEAD:
        return
    same = _room(_DECODE, scope).setdefault(layout.size, [])
    if all(other.head != head or other.tail != tail for other in same):
        same.append(layout)


def decode_small(raw: Any, scope: str | None) -> Any:
    """The frame of a stream whose layout ``scope`` decoded before (every non-value byte equal), else None."""
    view = memoryview(raw).cast("B")
    size = view.nbytes
    for layout in (scoped(_DECODE, scope) or {}).get(size, ()):
        if view[: len(layout.head)] == layout.head and view[size - len(layout.tail) :] == layout.tail:
            return _build(layout, view)
    return None


def _build(layout: _Layout, raw: Any) -> Any:
    import pandas as pd

    start = len(layout.head)
    body = np.frombuffer(raw, dtype=np.uint8, count=layout.size - start - len(layout.tail), offset=start)
    cols = as_strided(body, shape=(layout.ncols, layout.nbytes), strides=(layout.stride, 1), writeable=False)
    block = cols.view(layout.dtype).T.copy(order="C")  # the frame owns writable memory, not the payload's
    start_i, stop, step, name = layout.index
    index = pd.RangeIndex(start_i, stop, step, name=name)
    return pd.DataFrame(block, index=index, columns=layout.columns.view(), copy=False)
