"""Red team, session 7: the codecs' caches in a process that serves several parties are per party.

A service worker (and the cluster head) decodes and encodes every party's values in one process. The Arrow schema
of a numeric frame (``wire/arrow_fast._SCHEMAS``) and the npy headers (``wire/codecs._NPY_HEADS``/``_NPY_PARSED``)
were remembered process-wide, so how long a party's call took told it whether *another* party had recently sent or
received a frame or array of that layout, and a party could evict the others' entries. Measured on this machine
(a loop of 2,000 calls each, the cache cleared before every call for a miss: ``zero_copy_table`` of a 1x28 float
frame, ``encode_value``/``decode_value`` of a 3x5 float array): a schema miss costs 3.7 ms against 0.43 ms for a
hit, an npy decode 127 us against 9 us, an npy encode 21 us against 8 us. Each cache is now
kept per scope: the party whose call the process is serving (``arrow_fast.caller_scope``, set by the service
dispatch and the head's admission) or an explicit ``scope``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mesatee_notebook.wire import arrow_fast, codecs
from mesatee_notebook.wire.arrow_fast import caller_scope


def _frame(cols: int) -> pd.DataFrame:
    return pd.DataFrame(np.random.default_rng(0).random((1, cols)), columns=[f"rt_c{i}" for i in range(cols)])


def _schema_keys(scope: str) -> set[tuple[object, ...]]:
    return {k for k in arrow_fast._SCHEMAS.get(scope, {}) if any(str(n).startswith("rt_c") for n in k[0])}


def test_one_partys_frame_layouts_are_not_another_partys_cache_hits() -> None:
    df = _frame(29)
    with caller_scope("rt-party-a"):
        codecs.encode_value(df)
        raw = b"".join(bytes(memoryview(p).cast("B")) for p in codecs.encode_value(np.zeros((3, 7))).parts)
        codecs.decode_value("npy", raw)
    assert _schema_keys("rt-party-a")
    assert not _schema_keys("rt-party-b")  # party b's first such frame is a miss, as if a had never sent one
    with caller_scope("rt-party-b"):
        assert not any(k[2] == (3, 7) for k in codecs._NPY_HEADS.get("rt-party-b", {}))
        assert not codecs._NPY_PARSED.get("rt-party-b")
        codecs.encode_value(df)
    assert _schema_keys("rt-party-b")
    assert any(k[2] == (3, 7) for k in codecs._NPY_HEADS["rt-party-a"])


def test_a_party_flooding_new_layouts_evicts_only_its_own() -> None:
    with caller_scope("rt-victim"):
        codecs.encode_value(_frame(3))
    with caller_scope("rt-flooder"):
        for cols in range(4, 4 + 300):  # more layouts than a scope keeps
            codecs.encode_value(
                _frame(cols)
                .iloc[:, : min(cols, 40)]
                .set_axis([f"rt_c{cols}_{i}" for i in range(min(cols, 40))], axis=1)
            )
    assert _schema_keys("rt-victim")  # the victim's layout is still remembered
    assert len(arrow_fast._SCHEMAS["rt-flooder"]) <= 256


def test_an_explicit_scope_wins_over_the_callers() -> None:
    with caller_scope("rt-caller"):
        assert arrow_fast.current_scope() == "rt-caller"
        assert arrow_fast.current_scope("rt-explicit") == "rt-explicit"
    assert arrow_fast.current_scope() is None


def test_a_remembered_layout_never_lets_an_unvalidated_stream_reach_arrow() -> None:
    """``wire/frame_layouts.py`` skips Arrow's validation for a stream whose non-value bytes equal a validated one.

    The attack: keep those bytes and change the rest (the values, the padding between columns), or change one
    byte of them (a buffer length in the metadata). Either way nothing unvalidated reaches Arrow: a stream that
    matches is built from the remembered layout (only its value bytes are read, and any bit pattern is a valid
    float), and one that does not match goes through the full validation, for this party and every other.
    """
    from mesatee_notebook.errors import MalformedFrame
    from mesatee_notebook.wire import frame_layouts

    df = pd.DataFrame(np.arange(12, dtype=np.float64).reshape(1, 12), columns=[f"v{i}" for i in range(12)])
    raw = bytearray(b"".join(bytes(memoryview(p).cast("B")) for p in codecs.encode_value(df, scope="rt-other").parts))
    assert codecs.decode_value("arrow.frame", bytes(raw), scope="rt-mallory").equals(df)  # validated, remembered
    (layout,) = frame_layouts._DECODE["rt-mallory"][len(raw)]
    start = len(layout.head)
    tampered = bytearray(raw)
    tampered[start : len(raw) - len(layout.tail)] = b"\xff" * (len(raw) - start - len(layout.tail))
    fast = codecs.decode_value("arrow.frame", bytes(tampered), scope="rt-mallory")  # values and padding: all ones
    assert fast.shape == df.shape and list(fast.columns) == list(df.columns)
    assert np.isnan(fast.to_numpy()).all()  # 0xff..ff is a NaN: a value, read from the value bytes only
    for pos in range(0, start, max(1, start // 40)):  # one byte of the metadata changed: full validation again
        bad = bytearray(raw)
        bad[pos] ^= 0x5A
        assert frame_layouts.decode_small(bytes(bad), "rt-mallory") is None
        try:
            codecs.decode_value("arrow.frame", bytes(bad), scope="rt-mallory")
        except MalformedFrame:
            pass  # refused by the general path, with the typed error
    assert frame_layouts.decode_small(bytes(tampered), "rt-victim") is None  # another party: nothing remembered
