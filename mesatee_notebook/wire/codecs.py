"""Value codecs: how Python values cross the wire (pure: no I/O).

=================  ==============  ===========================================
Python value       kind            bytes on the wire
=================  ==============  ===========================================
pandas.DataFrame   ``arrow.frame``  Arrow IPC stream (index kept)
pandas.Series      ``arrow.series`` Arrow IPC stream of a one-column table
numpy.ndarray      ``npy``          ``.npy`` header + the raw array buffer
bytes/bytearray    ``bytes``        as they are
None, bool, int,   ``msgpack``      msgpack (numpy scalars become Python ones;
float, str, list,                  timestamps, NaT and timedeltas are extension
tuple, dict,                       types 1-3 and decode as pandas scalars)
timestamps
anything else      ``pickle``       only when the caller passes ``allow_pickle=True``
=================  ==============  ===========================================

A DataFrame or Series is one Arrow record batch, so each column is one contiguous
buffer the receiver can build on without copying. The encoder does not copy the
columns either: ``Encoded.parts`` is the IPC stream as a list of buffers (message
headers and padding, then the columns' own memory), sent back to back.

Pickle is never used unless asked for in that call: unpickling runs code, so a
pickle from a peer is as dangerous as the peer.
"""

from __future__ import annotations

import ast
import collections
import datetime
import io
import math
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from mesatee_notebook.errors import EncodingError, MalformedFrame
from mesatee_notebook.wire import frame_layouts
from mesatee_notebook.wire.arrow_fast import (
    SMALL_FRAME,
    Scoped,
    current_scope,
    room,
    scoped,
    small_numeric_frame,
    zero_copy_table,
)
from mesatee_notebook.wire.digest import payload_hasher

__all__ = ["KINDS", "Encoded", "decode_value", "digest_parts", "encode_value", "describe"]

_SCALARS = (
    bool,
    int,
    float,
    str,
    list,
    tuple,
    dict,
    np.generic,
    datetime.datetime,
    datetime.date,
    datetime.timedelta,
)
KINDS = frozenset({"arrow.frame", "arrow.series", "npy", "bytes", "msgpack", "pickle"})
_SERIES_COL = "__mesatee_series__"


@dataclass(slots=True)
class Encoded:
    """An encoded value: its kind, small metadata, and the payload parts to send."""

    kind: str
    parts: list[Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Total payload size in bytes."""
        return sum(memoryview(p).nbytes for p in self.parts)

    def digest(self) -> str:
        """The payload digest (BLAKE3, ``wire/digest.py``) of the payload bytes, as the receipt records it."""
        return digest_parts(self.parts)


def digest_parts(parts: list[Any]) -> str:
    """The payload digest (BLAKE3 hex) of buffers taken back to back."""
    h = payload_hasher()
    for p in parts:
        h.update(memoryview(p).cast("B"))
    return h.hexdigest()


_EXT_TIMESTAMP = 1  # a pandas.Timestamp (or datetime): ISO 8601 text, with its timezone if any
_EXT_NAT = 2  # pandas.NaT
_EXT_TIMEDELTA = 3  # a pandas.Timedelta: int64 nanoseconds as text


def _msgpack_default(obj: Any) -> Any:
    import pandas as pd

    if obj is pd.NaT or (isinstance(obj, (np.datetime64, np.timedelta64)) and np.isnat(obj)):
        return msgpack.ExtType(_EXT_NAT, b"")
    if isinstance(obj, (datetime.datetime, datetime.date, np.datetime64)):
        return msgpack.ExtType(_EXT_TIMESTAMP, pd.Timestamp(obj).isoformat().encode())
    if isinstance(obj, (datetime.timedelta, np.timedelta64)):
        return msgpack.ExtType(_EXT_TIMEDELTA, str(pd.Timedelta(obj).value).encode())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    msg = f"cannot encode a value of type {type(obj).__module__}.{type(obj).__qualname__} inside a list or dict"
    raise EncodingError(msg, type=type(obj).__qualname__)


def _ext_hook(code: int, data: bytes) -> Any:
    import pandas as pd

    try:
        if code == _EXT_NAT:
            return pd.NaT
        if code == _EXT_TIMESTAMP:
            return pd.Timestamp(data.decode())
        if code == _EXT_TIMEDELTA:
            return pd.Timedelta(int(data.decode()), unit="ns")
    except (ValueError, UnicodeDecodeError) as exc:
        msg = f"bad timestamp in a msgpack payload: {exc}"
        raise MalformedFrame(msg) from exc
    msg = f"unknown msgpack extension type {code}"
    raise MalformedFrame(msg)


def _way_out(value: Any) -> str:
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    return (
        f"cannot send a value of type {name}: mesatee_notebook sends DataFrames, Series, numpy arrays, bytes "
        "and plain scalars/lists/dicts. Convert it to one of those (e.g. pandas.DataFrame(...) or "
        "numpy.asarray(...)), or pass allow_pickle=True in this call if you trust both sides with pickle."
    )


def encode_value(value: Any, *, allow_pickle: bool = False, scope: str | None = None) -> Encoded:
    """Encode ``value`` for the wire without copying large buffers where avoidable.

    ``scope``: whose small-frame layouts to remember and reuse (``wire/frame_layouts.py``); a process that encodes
    for several parties passes the party.
    """
    import pandas as pd

    scope = current_scope(scope)  # the caches are per party (wire/arrow_fast.py)
    if isinstance(value, pd.DataFrame):
        return _encode_dataframe(value, scope)
    if isinstance(value, pd.Series):
        name = value.name
        frame = value.to_frame(name=_SERIES_COL)
        meta: dict[str, Any] = {"name": name if isinstance(name, (str, int, float)) or name is None else str(name)}
        return _encode_frame(frame, "arrow.series", meta, scope)
    if isinstance(value, np.ndarray):
        return _encode_array(value, allow_pickle, scope)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Encoded("bytes", [value])
    if value is None or value is pd.NaT or isinstance(value, _SCALARS):
        return _encode_scalar(value, allow_pickle)
    if allow_pickle:
        return _encode_pickle(value)
    raise EncodingError(_way_out(value), type=type(value).__qualname__)


def _encode_dataframe(df: Any, scope: str | None) -> Encoded:
    raw = frame_layouts.encode_small(df, scope)
    if raw is not None:
        return Encoded("arrow.frame", [raw], {})
    enc = _encode_frame(df, "arrow.frame", {}, scope)
    if len(enc.parts) == 1:
        frame_layouts.remember_encoded(df, enc.parts[0], scope)
    return enc


def _encode_array(value: np.ndarray[Any, Any], allow_pickle: bool, scope: str | None) -> Encoded:
    if not value.dtype.hasobject:
        return _encode_npy(value, scope)
    if allow_pickle:
        return _encode_pickle(value)
    msg = _way_out(value) + " (numpy object arrays hold Python objects; use a typed dtype)"
    raise EncodingError(msg, type="ndarray[object]")


def _encode_scalar(value: Any, allow_pickle: bool) -> Encoded:
    try:
        raw = msgpack.packb(value, use_bin_type=True, default=_msgpack_default, strict_types=False)
    except (EncodingError, OverflowError, TypeError, ValueError) as exc:
        if allow_pickle:
            return _encode_pickle(value)
        msg = _way_out(value) + f" ({exc})"
        raise EncodingError(msg, type=type(value).__qualname__) from exc
    return Encoded("msgpack", [raw])


def _encode_pickle(value: Any) -> Encoded:
    try:
        return Encoded("pickle", [pickle.dumps(value, protocol=5)])
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        msg = f"cannot pickle a value of type {type(value).__qualname__}: {exc}"
        raise EncodingError(msg, type=type(value).__qualname__) from exc


def _encode_frame(df: Any, kind: str, meta: dict[str, Any], scope: str | None) -> Encoded:
    import pyarrow as pa

    try:
        table = zero_copy_table(df, scope)  # one chunk per column
        if table is None:
            table = pa.Table.from_pandas(df, preserve_index=None)
            if any(col.num_chunks > 1 for col in table.columns):
                table = table.combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError) as exc:
        msg = (
            f"cannot send this {type(df).__name__} as Arrow: {exc}. Columns of mixed Python objects "
            "cannot be sent; cast them (e.g. df[col].astype(str)) or pass allow_pickle=True."
        )
        raise EncodingError(msg, type=type(df).__name__) from exc
    # One record batch: each column stays one contiguous buffer, so the receiver can build the
    # DataFrame on top of the received bytes without copying them again.
    small = (
        table.get_total_buffer_size() <= SMALL_FRAME
    )  # small: one buffer written by Arrow itself (no Python call per buffer)
    sink: Any = pa.BufferOutputStream() if small else _PartsSink()
    with pa.ipc.new_stream(sink if small else pa.PythonFile(sink, mode="w"), table.schema) as writer:
        if table.num_rows == 0 and table.num_columns:
            # write_table writes no batch for 0 rows, and with it go the dictionaries: a categorical
            # column would arrive without its categories. One empty batch carries them.
            writer.write_batch(pa.record_batch([c.combine_chunks() for c in table.columns], schema=table.schema))
        else:
            writer.write_table(table)
    return Encoded(kind, [sink.getvalue()] if small else sink.parts, meta)


class _PartsSink:
    """A write-only file for ``pa.PythonFile`` that keeps what Arrow writes as a list of parts.

    Arrow hands the record batch's body buffers to ``write`` as ``pa.Buffer`` objects that
    share memory with the table (and so with the DataFrame): they are kept as they are, not
    copied. The small pieces in between (message headers, padding) are coalesced into one
    ``bytearray`` per run. The parts, sent back to back, are exactly the Arrow IPC stream.
    """

    _SMALL = 1 << 16

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self._small: bytearray | None = None
        self.closed = False
        self._pos = 0

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


def _encode_npy(arr: np.ndarray[Any, Any], scope: str | None) -> Encoded:
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        arr = np.ascontiguousarray(arr)
    key = (arr.dtype, bool(arr.flags.f_contiguous and not arr.flags.c_contiguous), arr.shape)
    header = (scoped(_NPY_HEADS, scope) or {}).get(key)
    if header is None:  # numpy writes the header in Python: remembered per (dtype, order, shape), per party
        head = io.BytesIO()
        np.lib.format.write_array_header_2_0(head, np.lib.format.header_data_from_array_1_0(arr))
        header = _remember(_NPY_HEADS, scope, key, head.getvalue())
    data = arr.reshape(-1, order="F" if (arr.flags.f_contiguous and not arr.flags.c_contiguous) else "C")
    body: Any = data.view(np.uint8).data if data.size else b""
    return Encoded("npy", [header, body])


_NPY_HEADS: Scoped = collections.OrderedDict()  # scope (party) -> (dtype, order, shape) -> header bytes
_NPY_PARSED: Scoped = collections.OrderedDict()  # scope (party) -> header bytes -> parsed header


def _remember(cache: Scoped, scope: str | None, key: Any, value: Any) -> Any:
    room(cache, scope, 1024)[key] = value
    return value


def decode_value(
    kind: str, buf: Any, *, allow_pickle: bool = False, meta: dict[str, Any] | None = None, scope: str | None = None
) -> Any:
    """Decode one payload; Arrow and npy results share memory with ``buf`` (small frames are copied).

    ``scope``: whose remembered small-frame layouts may be used (``wire/frame_layouts.py``); a process that decodes
    for several parties (the service worker) passes the party, so layouts are never shared between parties.
    """
    scope = current_scope(scope)  # the caches are per party (wire/arrow_fast.py)
    if kind == "arrow.frame":
        return _decode_dataframe(buf, meta or {}, scope)
    if kind == "arrow.series":
        return _decode_frame(kind, buf, meta or {})
    if kind == "npy":
        return _decode_npy(buf, scope)
    if kind == "bytes":
        return bytes(buf)
    if kind == "msgpack":
        try:
            return msgpack.unpackb(memoryview(buf), raw=False, strict_map_key=False, ext_hook=_ext_hook)
        except MalformedFrame:
            raise
        except Exception as exc:  # msgpack raises several unrelated types
            msg = f"payload is not valid msgpack: {type(exc).__name__}"
            raise MalformedFrame(msg) from exc
    if kind == "pickle":
        if not allow_pickle:
            msg = "the peer sent a pickled value, and pickle was not allowed for this call (allow_pickle=True)"
            raise EncodingError(msg, type="pickle")
        return pickle.loads(memoryview(buf))  # noqa: TID251 - explicit opt-in in this call
    msg = f"unknown value kind {kind!r}"
    raise MalformedFrame(msg)


def _decode_dataframe(buf: Any, meta: dict[str, Any], scope: str | None) -> Any:
    df = frame_layouts.decode_small(buf, scope)
    if df is None:
        df = _decode_frame("arrow.frame", buf, meta)
        frame_layouts.remember_decoded(buf, df, scope)
    return df


def _decode_frame(kind: str, buf: Any, meta: dict[str, Any]) -> Any:
    import pyarrow as pa

    try:
        table = pa.ipc.open_stream(pa.py_buffer(buf)).read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:  # ArrowIOError is an OSError
        msg = f"payload is not a valid Arrow IPC stream: {exc}"
        raise MalformedFrame(msg) from exc
    try:
        table.validate(full=True)  # offsets and lengths checked before pandas reads the buffers
        df = small_numeric_frame(table)
        if df is None:
            df = table.to_pandas(split_blocks=True, self_destruct=True)
    except Exception as exc:  # pyarrow and pandas raise many unrelated types on a bad schema or metadata
        msg = f"payload's Arrow table cannot be read as a DataFrame: {type(exc).__name__}: {exc}"[:500]
        raise MalformedFrame(msg) from exc
    finally:
        del table
    if kind == "arrow.frame":
        return df
    if _SERIES_COL not in df.columns:
        msg = "an Arrow series payload has no series column"
        raise MalformedFrame(msg)
    series = df[_SERIES_COL]
    series.name = meta.get("name")
    return series


def _decode_npy(buf: Any, scope: str | None) -> np.ndarray[Any, Any]:
    view = memoryview(buf).cast("B")
    head = bytes(view[: min(view.nbytes, 1 << 16)])
    wide = head[6:7] != b"\x01"  # format 2.0+: a 4-byte header length
    size = 12 + int.from_bytes(head[8:12], "little") if wide else 10 + int.from_bytes(head[8:10], "little")
    key = head[:size] if size <= 256 else None  # the exact header bytes: parsed once, then looked up
    parsed = (scoped(_NPY_PARSED, scope) or {}).get(key) if key is not None else None
    if parsed is None:
        parsed = _npy_header(head)
        if key is not None and parsed[3] == size:
            _remember(_NPY_PARSED, scope, key, parsed)
    shape, fortran, dtype, offset = parsed
    if dtype.hasobject:
        msg = "refusing a .npy payload with dtype=object (it would need pickle)"
        raise MalformedFrame(msg)
    count = math.prod(int(d) for d in shape) if shape else 1  # exact: np.prod would wrap around on huge shapes
    if view.nbytes - offset != count * dtype.itemsize:
        msg = "the .npy payload's length does not match its header"
        raise MalformedFrame(msg)
    try:
        flat = np.frombuffer(view, dtype=dtype, count=count, offset=offset)
        return flat.reshape(shape, order="F" if fortran else "C")
    except ValueError as exc:  # e.g. a zero-size dtype
        msg = f"the .npy payload cannot be read as its header says: {exc}"
        raise MalformedFrame(msg) from exc


def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """(shape, fortran order, dtype, offset of the data) of a .npy header."""
    fp = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(fp)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        start = fp.tell()
        (hlen,) = struct.unpack("<H" if version == (1, 0) else "<I", fp.read(2 if version == (1, 0) else 4))
        # A header numpy can only read with its Python 2 fallback (which warns) is refused: we never write one.
        ast.literal_eval(fp.read(hlen).decode("latin1"))
        fp.seek(start)
        shape, fortran, dtype = reader(fp)
    except Exception as exc:  # numpy's header parser raises ValueError, TokenError, SyntaxError, ...
        msg = f"payload is not a valid .npy array: {exc}"
        raise MalformedFrame(msg) from exc
    return tuple(shape), bool(fortran), dtype, fp.tell()


def describe(value: Any) -> str:
    """A short, data-free description of a value for logs and displays."""
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        return f"DataFrame[{value.shape[0]} rows × {value.shape[1]} cols]"
    if isinstance(value, pd.Series):
        return f"Series[{len(value)}] {value.dtype}"
    if isinstance(value, np.ndarray):
        return f"ndarray{value.shape} {value.dtype}"
    return type(value).__name__
