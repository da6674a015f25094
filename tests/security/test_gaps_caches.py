"""A gap session 7's red team left: a Sybil of identities cleared every party's codec caches.

The codecs' caches are kept per party (``wire/arrow_fast.room``, ``tests/security/test_redteam_caches.py``), at most
64 scopes each. The 65th scope used to clear them all, so a party that made ever new identities (free key pairs)
cost every party at work a cache miss, about 3 ms per frame schema. Now the least recently used scope alone goes:
a party whose entries were used recently keeps them, and the bound on memory holds. Checked on the modules
themselves, through the codecs' own entry points, as the session-7 cache tests are.
"""

from __future__ import annotations

import collections

import numpy as np
import pandas as pd

from mesatee_notebook.wire import arrow_fast, codecs, frame_layouts
from mesatee_notebook.wire.arrow_fast import caller_scope

CACHES = {
    "schemas": arrow_fast._SCHEMAS,
    "npy headers": codecs._NPY_HEADS,
    "npy parsed": codecs._NPY_PARSED,
    "frame layouts": frame_layouts._ENCODE,
}


def _use(scope: str, cols: int) -> None:
    """Codec work in ``scope`` that reaches each cache: a frame's schema and layout, an npy array both ways."""
    df = pd.DataFrame(np.zeros((1, cols)), columns=[f"gap_c{i}" for i in range(cols)])
    with caller_scope(scope):
        arrow_fast.zero_copy_table(df)  # the schema (a remembered layout would serve encode_value before it)
        codecs.encode_value(df)
        parts = codecs.encode_value(np.zeros((2, cols))).parts
        codecs.decode_value("npy", b"".join(bytes(memoryview(p).cast("B")) for p in parts))


def test_a_sybil_of_scopes_evicts_no_scope_in_recent_use_and_the_bound_holds() -> None:
    _use("gap-victim", 5)
    for sybil in range(100):
        _use(f"gap-sybil-{sybil}", 6)
        for name, cache in CACHES.items():
            assert len(cache) <= arrow_fast._SCOPES, f"the {name} cache holds more scopes than its bound"
        if sybil % 10 == 9:  # the victim is at work meanwhile: its next call finds its entries (a hit) ...
            for name, cache in CACHES.items():
                assert cache.get("gap-victim"), f"the victim's {name} were evicted by the other scopes"
            _use("gap-victim", 5)  # ... and uses them
    # the oldest sybils went first, the victim and the newest stayed
    assert "gap-sybil-0" not in arrow_fast._SCHEMAS
    assert "gap-sybil-99" in arrow_fast._SCHEMAS and "gap-victim" in arrow_fast._SCHEMAS


def test_room_evicts_the_least_recently_used_scope_and_empties_a_full_one() -> None:
    cache: arrow_fast.Scoped = collections.OrderedDict()
    for i in range(arrow_fast._SCOPES):
        arrow_fast.room(cache, f"s{i}", 4)[i] = i
    assert arrow_fast.scoped(cache, "s0") == {0: 0}  # a lookup counts as a use: s0 is now the most recent
    arrow_fast.room(cache, "new", 4)["x"] = 1
    assert len(cache) == arrow_fast._SCOPES
    assert "s1" not in cache and "s0" in cache and "new" in cache  # s1 was the least recently used
    mine = arrow_fast.room(cache, "new", 4)
    mine.update({1: 1, 2: 2, 3: 3})
    assert len(arrow_fast.room(cache, "new", 4)) == 0  # a scope full of its own entries starts over
    assert arrow_fast.scoped(cache, "missing") is None
