"""Remembered small-frame layouts (issue 15 P4, ``wire/frame_layouts.py``): the frames Arrow gives, per scope."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mesatee_notebook.errors import MalformedFrame
from mesatee_notebook.wire import codecs, frame_layouts


def _wire(df: pd.DataFrame, scope: str | None = None) -> bytes:
    return b"".join(bytes(memoryview(p).cast("B")) for p in codecs.encode_value(df, scope=scope).parts)


def _arrow(raw: bytes) -> pd.DataFrame:
    """The general decode: Arrow's own reader, fully validated."""
    table = pa.ipc.open_stream(pa.py_buffer(raw)).read_all()
    table.validate(full=True)
    return table.to_pandas()


def _same(out: pd.DataFrame, df: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(out, df, check_index_type=True, check_column_type=True, check_exact=True)
    assert out.columns.name == df.columns.name and out.index.name == df.index.name
    assert out.to_numpy().tobytes() == df.to_numpy().tobytes()  # bit for bit: NaN payloads, -0.0


def _frames() -> list[pd.DataFrame]:
    rng = np.random.default_rng(5)
    wide = pd.DataFrame(rng.normal(size=(4, 28)).astype(np.float32), columns=[f"f{i}" for i in range(28)])
    wide.iloc[0, 3] = np.nan
    wide.iloc[1, 4] = -0.0
    ints = pd.DataFrame(rng.integers(-9, 9, size=(2, 3)), columns=["a", "b", "c"])
    named = pd.DataFrame({"x": [1.5, np.inf]}, index=pd.RangeIndex(10, 14, 2, name="ix"))
    named.columns.name = "features"
    one = pd.DataFrame({"u": np.array([7], dtype=np.uint16)})
    return [wide.iloc[:1], wide.iloc[1:2], wide, ints, named, one]


@pytest.mark.parametrize("i", range(len(_frames())))
def test_remembered_layout_writes_and_reads_the_same_frames(i: int) -> None:
    df = _frames()[i]
    first = _wire(df, "enc")  # through Arrow, layout remembered
    again = _wire(df, "enc")  # from the remembered layout
    assert frame_layouts.encode_small(df, "enc") is not None  # the fast path is the one taken
    for raw in (first, again):
        _same(_arrow(raw), df)
    # The receiver: the first stream through the general path, then the remembered layout.
    for raw in (first, again, again):
        _same(codecs.decode_value("arrow.frame", raw, scope="dec"), df)
    assert frame_layouts.decode_small(again, "dec") is not None


def test_other_values_same_layout() -> None:
    base = pd.DataFrame(np.zeros((1, 5), dtype=np.float64), columns=list("abcde"))
    for _ in range(2):  # the sender's first stream comes from the general encoder (maybe other strides)
        codecs.decode_value("arrow.frame", _wire(base, "s"), scope="s")
    for seed in range(5):
        df = pd.DataFrame(np.random.default_rng(seed).normal(size=(1, 5)), columns=list("abcde"))
        raw = _wire(df, "s")
        assert frame_layouts.decode_small(raw, "s") is not None
        _same(codecs.decode_value("arrow.frame", raw, scope="s"), df)
        _same(_arrow(raw), df)


def test_layouts_are_per_scope() -> None:
    """A layout one party's call made known is not used for another party's payload (no timing tell)."""
    df = pd.DataFrame({"secret_feature_name": [1.0], "other": [2.0]})
    _wire(df)
    raw = _wire(df)
    codecs.decode_value("arrow.frame", raw, scope="alice")
    assert frame_layouts.decode_small(raw, "alice") is not None
    assert frame_layouts.decode_small(raw, "bob") is None
    _same(codecs.decode_value("arrow.frame", raw, scope="bob"), df)  # bob's first: the general path


def test_a_changed_byte_outside_the_values_is_not_taken_for_the_layout() -> None:
    df = pd.DataFrame({"aa": [1.0], "bb": [2.0]})
    _wire(df)
    raw = _wire(df)
    codecs.decode_value("arrow.frame", raw, scope="t")
    assert frame_layouts.decode_small(raw, "t") is not None
    other = pd.DataFrame({"ab": [1.0], "bb": [2.0]})
    _wire(other)
    renamed = _wire(other)  # same size, one label byte differs
    assert len(renamed) == len(raw) and renamed != raw
    assert frame_layouts.decode_small(renamed, "t") is None
    assert codecs.decode_value("arrow.frame", renamed, scope="t").columns.tolist() == ["ab", "bb"]
    broken = bytearray(raw)
    broken[-1] ^= 0xFF  # the end-of-stream marker
    assert frame_layouts.decode_small(bytes(broken), "t") is None
    broken = bytearray(raw)
    broken[12] ^= 0x55  # inside the schema message
    assert frame_layouts.decode_small(bytes(broken), "t") is None
    with pytest.raises(MalformedFrame):
        codecs.decode_value("arrow.frame", bytes(broken[:-20]), scope="t")


def test_decoded_frames_are_independent() -> None:
    df = pd.DataFrame({"x": [1.0], "y": [2.0]})
    _wire(df)
    raw = _wire(df)
    codecs.decode_value("arrow.frame", raw, scope="m")
    assert frame_layouts.decode_small(raw, "m") is not None
    a = codecs.decode_value("arrow.frame", raw, scope="m")
    a.iloc[0, 0] = 99.0  # writable, its own memory
    a.columns.name = "renamed"
    b = codecs.decode_value("arrow.frame", raw, scope="m")
    _same(b, df)


def test_not_remembered_frames_take_the_general_paths() -> None:
    mixed = pd.DataFrame({"a": [1], "b": [2.0]})  # two dtypes
    stringy = pd.DataFrame({"s": ["x"]})
    indexed = pd.DataFrame({"v": [1.0]}, index=[5])
    attrs = pd.DataFrame({"v": [1.0]})
    attrs.attrs["k"] = "v"
    for df in (mixed, stringy, indexed, attrs):
        raw = _wire(df, "g")
        _wire(df, "g")
        assert frame_layouts.encode_small(df, "g") is None
        out = codecs.decode_value("arrow.frame", raw, scope="g")
        assert frame_layouts.decode_small(raw, "g") is None
        pd.testing.assert_frame_equal(out, df)
    assert codecs.decode_value("arrow.frame", _wire(attrs), scope="g").attrs == {"k": "v"}


_DTYPES = st.sampled_from([np.dtype(t) for t in ("<f4", "<f8", "<i1", "<i2", "<i4", "<i8", "<u1", "<u4", "<u8")])


@settings(max_examples=60, deadline=None)
@given(
    st.data(),
    _DTYPES,
    st.integers(1, 4),
    st.lists(st.text("abcxyz_é", min_size=1, max_size=6), min_size=1, max_size=8, unique=True),
)
def test_round_trip_any_values(data: Any, dtype: np.dtype[Any], rows: int, names: list[str]) -> None:
    values = data.draw(hnp.arrays(dtype, (rows, len(names))))
    df = pd.DataFrame(values, columns=names)
    for _ in range(3):  # through Arrow, then from the remembered layouts on both sides
        raw = _wire(df, "h")
        _same(_arrow(raw), df)
        _same(codecs.decode_value("arrow.frame", raw, scope="h"), df)


def test_one_scope_filling_its_room_evicts_no_other_scope() -> None:
    mine = pd.DataFrame({"keep": [1.0]})
    _wire(mine)
    raw = _wire(mine)
    codecs.decode_value("arrow.frame", raw, scope="quiet")
    for i in range(3 * frame_layouts._PER_SCOPE):  # a party sending ever new layouts
        noisy = pd.DataFrame({f"c{i}": [float(i)]})
        _wire(noisy, "noisy")
        codecs.decode_value("arrow.frame", _wire(noisy, "noisy"), scope="noisy")
    assert arrow_count("noisy") <= frame_layouts._PER_SCOPE
    assert frame_layouts.decode_small(raw, "quiet") is not None


def arrow_count(scope: str) -> int:
    """Layouts remembered for decoding in ``scope``."""
    return sum(len(v) for v in frame_layouts._DECODE.get(scope, {}).values())
