"""The codec and framing fast paths (issue 15 P4) give what the general paths give: same frames, same bytes."""

from __future__ import annotations

import json
import socket

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mesatee_notebook.wire import arrow_fast, codecs
from mesatee_notebook.wire.digest import payload_digest
from mesatee_notebook.wire.framing import Limits
from mesatee_notebook.wire.stream import recv_message, send_message


def _frames() -> list[pd.DataFrame]:
    rng = np.random.default_rng(3)
    wide = pd.DataFrame(rng.normal(size=(50, 28)).astype(np.float32), columns=[f"f{i}" for i in range(28)])
    mixed = pd.DataFrame({"a": np.arange(6, dtype=np.int64), "b": rng.normal(size=6), "c": np.arange(6, dtype="u2")})
    mixed.loc[2, "b"] = np.nan  # a NaN value stays a NaN
    stepped = pd.DataFrame({"x": np.arange(5, dtype=np.int32)}, index=pd.RangeIndex(10, 20, 2, name="ix"))
    named = wide.iloc[:3].copy()
    named.columns.name = "features"
    return [wide.iloc[:1], wide.iloc[7:12], wide.iloc[:0], wide, mixed, stepped, named, mixed.iloc[3:]]


def _wire(df: pd.DataFrame) -> bytes:
    return b"".join(bytes(memoryview(p).cast("B")) for p in codecs.encode_value(df).parts)


@pytest.mark.parametrize("i", range(len(_frames())))
def test_fast_encode_schema_is_from_pandas(i: int) -> None:
    df = _frames()[i]
    table = arrow_fast.zero_copy_table(df)
    assert table is not None
    for _ in range(2):  # the second time from the remembered layout
        table = arrow_fast.zero_copy_table(df)
        ref = pa.Schema.from_pandas(df, preserve_index=None)
        assert table.schema.equals(ref, check_metadata=False)
        assert json.loads(table.schema.metadata[b"pandas"]) == json.loads(ref.metadata[b"pandas"])


@pytest.mark.parametrize("i", range(len(_frames())))
def test_fast_decode_is_to_pandas(i: int) -> None:
    df = _frames()[i]
    raw = _wire(df)
    table = pa.ipc.open_stream(pa.py_buffer(raw)).read_all()
    assert arrow_fast.small_numeric_frame(table) is not None  # the fast path is the one taken
    out = codecs.decode_value("arrow.frame", raw)
    ref = table.to_pandas()
    for expected in (ref, df):
        pd.testing.assert_frame_equal(out, expected, check_index_type=True, check_column_type=True)
    assert out.columns.name == ref.columns.name and out.index.name == ref.index.name


def test_layout_changes_are_not_confused() -> None:
    """Frames alike but for the index stop, attrs or a column's dtype each get their own schema."""
    a = pd.DataFrame({"x": np.arange(4.0), "y": np.arange(4.0)})
    b = a.iloc[:2]
    c = a.astype({"y": np.float32})
    d = a.copy()
    d.attrs["note"] = "kept"
    for df in (a, b, c, d, a):
        out = codecs.decode_value("arrow.frame", _wire(df))
        pd.testing.assert_frame_equal(out, df, check_index_type=True)
    assert codecs.decode_value("arrow.frame", _wire(d)).attrs == {"note": "kept"}


def test_general_decode_still_used_for_nulls_and_strings() -> None:
    nulls = pa.table({"a": pa.array([1, None, 3], pa.int64())})
    assert arrow_fast.small_numeric_frame(nulls) is None
    df = pd.DataFrame({"s": ["a", "b"], "v": [1.0, 2.0]})
    raw = _wire(df)
    assert arrow_fast.small_numeric_frame(pa.ipc.open_stream(pa.py_buffer(raw)).read_all()) is None
    pd.testing.assert_frame_equal(codecs.decode_value("arrow.frame", raw), df)


@pytest.mark.parametrize("sizes", [[], [0], [5, 100], [1 << 16], [(1 << 16) + 1], [3, 70_000]])
def test_small_and_large_messages_round_trip_with_digests(sizes: list[int]) -> None:
    """Messages up to 64 KiB of payload go out in one write; the receiver and the digests cannot tell."""
    a, b = socket.socketpair()
    try:
        payloads = [[bytes(range(256)) * (n // 256) + b"x" * (n % 256)] for n in sizes]
        sent = send_message(a, {"t": "probe", "k": 1}, payloads, digests=True)
        msg = recv_message(b, Limits(1 << 20, 1 << 24, 16), digests=True)
        assert msg.header["t"] == "probe" and msg.header["k"] == 1
        assert [bytes(p) for p in msg.payloads] == [p[0] for p in payloads]
        assert sent == msg.digests == [payload_digest(p[0]) for p in payloads]
    finally:
        a.close()
        b.close()


def test_small_message_carries_fds() -> None:
    import os

    a, b = socket.socketpair(socket.AF_UNIX)
    r, w = os.pipe()
    try:
        send_message(a, {"t": "fd"}, [b"abc"], fds=[w])
        msg = recv_message(b, Limits(1 << 20, 1 << 20, 4), want_fds=True)
        assert bytes(msg.payloads[0]) == b"abc" and len(msg.fds) == 1
        os.write(msg.fds[0], b"!")
        assert os.read(r, 1) == b"!"
        os.close(msg.fds[0])
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_npy_headers_remembered_give_the_same_arrays_and_refusals() -> None:
    from mesatee_notebook.errors import MalformedFrame

    for arr in (np.arange(3, dtype=np.float32), np.ones((2, 3), order="F"), np.zeros(0), np.array(5.0)):
        raw = b"".join(bytes(memoryview(p).cast("B")) for p in codecs.encode_value(arr).parts)
        for _ in range(2):  # parsed, then from the remembered header
            out = codecs.decode_value("npy", raw)
            assert out.shape == arr.shape and out.dtype == arr.dtype and np.array_equal(out, arr)
            assert out.flags.f_contiguous == arr.flags.f_contiguous
            with pytest.raises(MalformedFrame):
                codecs.decode_value("npy", raw + b"\x00")  # a length that does not match the header
