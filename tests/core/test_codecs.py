"""Hypothesis round trips for the value codecs and the frame layout, over a real socket pair."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mesatee_notebook.errors import EncodingError, FrameTooLarge, MalformedFrame
from mesatee_notebook.wire.codecs import decode_value, encode_value
from mesatee_notebook.wire.framing import Limits, pack_header, unpack_header, unpack_prefix
from mesatee_notebook.wire.stream import recv_message, send_message

json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


def roundtrip(value, **kw):
    enc = encode_value(value, **kw)
    buf = b"".join(bytes(memoryview(p).cast("B")) for p in enc.parts)
    return decode_value(enc.kind, bytearray(buf), meta=enc.meta, **kw)


@given(json_like)
def test_msgpack_values(value):
    assert roundtrip(value) == value


@given(st.binary(max_size=2048))
def test_bytes(value):
    assert roundtrip(value) == value


@given(hnp.arrays(dtype=hnp.scalar_dtypes(), shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=6)))
def test_numpy_arrays(arr):
    out = roundtrip(arr)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(-1000, 1000),
            st.floats(allow_nan=True, allow_infinity=False),
            st.one_of(st.none(), st.text(max_size=5)),
        ),
        max_size=30,
    )
)
def test_dataframes(rows):
    df = pd.DataFrame(rows, columns=["i", "f", "s"])
    pd.testing.assert_frame_equal(roundtrip(df), df)
    pd.testing.assert_series_equal(roundtrip(df["f"]), df["f"])


def test_unsupported_type_names_the_type_and_the_way_out():
    class Opaque:
        pass

    with pytest.raises(EncodingError, match=r"Opaque.*allow_pickle=True"):
        encode_value(Opaque())
    with pytest.raises(EncodingError, match="object"):
        encode_value(np.array([Opaque()], dtype=object))
    with pytest.raises(EncodingError, match="cannot pickle"):
        encode_value(Opaque(), allow_pickle=True)
    from fractions import Fraction

    enc = encode_value(Fraction(1, 3), allow_pickle=True)
    with pytest.raises(EncodingError, match="pickle was not allowed"):
        decode_value(enc.kind, enc.parts[0])


@given(
    st.dictionaries(st.text(max_size=5).filter(lambda k: k not in ("t", "p")), json_like, max_size=5),
    st.lists(st.binary(max_size=300), max_size=4),
)
@settings(max_examples=50, deadline=None)
def test_frames_over_a_socket(extra, payloads):
    a, b = socket.socketpair()
    try:
        header = {"t": "x", **extra}
        t = threading.Thread(target=send_message, args=(a, header, payloads), kwargs={"digests": True})
        t.start()
        msg = recv_message(b, Limits(), digests=True)
        t.join()
        assert {k: v for k, v in msg.header.items() if k != "p"} == header
        assert [bytes(p) for p in msg.payloads] == payloads
        import blake3

        assert msg.digests == [blake3.blake3(p).hexdigest() for p in payloads]
    finally:
        a.close()
        b.close()


@given(st.binary(min_size=16, max_size=64))
def test_random_prefixes_only_raise_typed_errors(data):
    try:
        _hlen, total = unpack_prefix(data[:16], Limits())
        unpack_header(data[16:], total, Limits())
    except (MalformedFrame, FrameTooLarge):
        pass


def test_limits_refuse_before_reading():
    head = pack_header({"t": "x"}, [100])
    with pytest.raises(FrameTooLarge):
        unpack_prefix(head[:16], Limits(max_payload=10))


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float64, np.float32, np.int64, np.int8, np.uint32]),
        shape=st.tuples(st.integers(0, 20), st.integers(1, 4)),
    ),
    st.integers(0, 5),
)
def test_numeric_frames_take_the_zero_copy_path_and_round_trip_exactly(block, start):
    df = pd.DataFrame(block, columns=[f"c{i}" for i in range(block.shape[1])])
    df.index = pd.RangeIndex(start, start + len(df))
    enc = encode_value(df)
    assert len(enc.parts) >= 1
    pd.testing.assert_frame_equal(roundtrip(df), df)
