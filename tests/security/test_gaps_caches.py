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


# -- a service worker's decoded datasets (enclave/dataset_cache.py) ----------------------------------------------


class _Ctx:
    """What ``load_dataset`` uses of a ServiceContext: the party, the worker's state and sealed reads (counted)."""

    def __init__(self, party: str, state: dict[str, object], sealed: dict[str, bytes], reads: list[str]) -> None:
        self.party, self.state, self._sealed, self._reads = party, state, sealed, reads

    def seal_get(self, name: str) -> bytes:
        if name.endswith("/data"):
            self._reads.append(self.party)
        return self._sealed[name]


def _sealed_dataset(name: str, rows: int) -> dict[str, bytes]:
    import hashlib
    import json

    from mesatee_notebook.enclave.datasets import data_name, meta_name

    data = b"".join(codecs.encode_value(pd.DataFrame({"x": np.arange(rows, dtype=np.float64)})).parts)
    meta = {"name": name, "owner": "gap-owner", "policy": {}, "sha256": hashlib.sha256(data).hexdigest()}
    return {data_name(name, prefix=""): data, meta_name(name, prefix=""): json.dumps(meta).encode()}


def test_another_partys_use_of_a_dataset_warms_nothing_for_the_caller_and_the_bound_holds() -> None:
    from mesatee_notebook.enclave.dataset_cache import DatasetCache
    from mesatee_notebook.enclave.services.datasets import load_dataset

    sealed = {**_sealed_dataset("gap_one", 10_000), **_sealed_dataset("gap_two", 10_000)}
    state: dict[str, object] = {"dataset_cache_bytes": 200_000}  # room for two copies of 80 kB, not three
    reads: list[str] = []
    owner, analyst = (_Ctx(p, state, sealed, reads) for p in ("gap-owner", "gap-analyst"))
    first = load_dataset(owner, "gap_one")[0]
    assert load_dataset(owner, "gap_one")[0] is first and reads == ["gap-owner"]  # the owner's repeat is warm
    theirs = load_dataset(analyst, "gap_one")[0]
    assert reads == ["gap-owner", "gap-analyst"]  # the analyst read (and decoded) the data itself: cold
    assert theirs is not first and theirs.equals(first)
    cache = DatasetCache.of(state)
    assert len(cache) == 2 and cache.nbytes <= cache.limit  # two parties, one dataset: two copies, in the bound
    load_dataset(analyst, "gap_two")  # a third copy: the least recently used one (the owner's) goes
    assert cache.nbytes <= cache.limit and len(cache) == 2
    load_dataset(owner, "gap_one")
    assert reads == ["gap-owner", "gap-analyst", "gap-analyst", "gap-owner"]
    cache.drop("gap_one")  # a deleted (or replaced) dataset: every party's frame of it goes
    assert len(cache) == 1


def test_the_dp_unit_uniqueness_cache_is_per_party_and_holds_no_frame_alive() -> None:
    import gc
    import weakref

    from mesatee_notebook.enclave.frames import FrameEvaluator

    ev = FrameEvaluator({}, lambda event: None)
    mine, theirs = pd.DataFrame({"id": [1, 2, 3]}), pd.DataFrame({"id": [1, 2, 3]})
    assert ev._units_unique("gap-a", "d", mine, "id") and ev._units_unique("gap-b", "d", theirs, "id")
    assert ev._unique_units[("gap-a", "d", "id")][0]() is mine  # b's query did not replace a's entry
    gone = weakref.ref(theirs)
    del theirs
    gc.collect()
    assert gone() is None  # an evicted frame is freed: the cache refers to it weakly
