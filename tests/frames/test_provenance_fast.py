"""The provenance helpers' shortcuts (issue 15 P7) give the same pairs and flags as the plain formulations."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mesatee_notebook.enclave import frame_values as fv

ints = st.lists(st.integers(-1, 40), max_size=300)


def _pairs(g: np.ndarray, s: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(g.tolist(), s.tolist(), strict=True))


@settings(max_examples=200, deadline=None)
@given(ints, st.integers(0, 3))
def test_compose_is_a_gather_with_missing_rows(arr: list[int], shift: int) -> None:
    a = np.asarray([x for x in arr if x >= 0], dtype=np.int64)
    for pos in (
        np.arange(len(a), dtype=np.int64),  # the identity: returned as it is
        np.asarray([i for i in range(-1, len(a), shift + 1)], dtype=np.int64),
        np.arange(len(a), dtype=np.int64)[::-1].copy(),
    ):
        want = np.asarray([a[p] if p >= 0 and len(a) else -1 for p in pos], dtype=np.int64)
        assert fv._compose(a, pos).tolist() == want.tolist()


def test_identity_is_checked_in_full() -> None:
    n = 3 * fv._BLOCK + 5
    pos = np.arange(n, dtype=np.int64)
    assert fv._identity(pos, n)
    assert not fv._identity(pos, n + 1)
    pos[fv._BLOCK + 7] = 0  # same length and ends, not the identity
    assert not fv._identity(pos, n)
    assert fv._identity(np.zeros(0, dtype=np.int64), 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 50)), max_size=400), st.booleans())
def test_dedupe_gives_the_distinct_pairs(pairs: list[tuple[int, int]], big: bool) -> None:
    g = np.asarray([p[0] for p in pairs], dtype=np.int64)
    s = np.asarray([p[1] for p in pairs], dtype=np.int64)
    n_src = (1 << 25) if big else 51  # big: over the bitmap's domain, the hash path
    dg, ds = fv._dedupe(g, s, n_src)
    assert len(dg) == len(set(pairs))
    assert _pairs(dg, ds) == set(pairs)


@settings(max_examples=200, deadline=None)
@given(ints, st.booleans())
def test_has_repeats(src: list[int], sort: bool) -> None:
    arr = np.asarray(sorted(src) if sort else src, dtype=np.int64)
    valid = [x for x in src if x >= 0]
    assert fv._has_repeats(arr) == (len(valid) != len(set(valid)))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=200), st.lists(st.integers(0, 9), unique=True, max_size=10))
def test_renumber_keeps_the_pairs_of_the_kept_groups(groups: list[int], kept: list[int]) -> None:
    g = np.asarray(groups, dtype=np.int64)
    s = np.arange(len(g), dtype=np.int64)
    pos = np.asarray(kept, dtype=np.int64)
    out = fv._renumber({"d": (g, s)}, pos, 10)["d"]
    want = {(kept.index(x), i) for i, x in enumerate(groups) if x in kept}
    assert _pairs(*out) == want
    same = fv._renumber({"d": (g, s)}, np.arange(10, dtype=np.int64), 10)["d"]
    assert same[0] is g and same[1] is s  # every group kept in order: no copy


def test_membership_after_an_outer_merge_drops_unmatched_rows() -> None:
    origin = fv._rows_origin(5, ((fv._Origin("rows", 3, rows={"a": [None]}), np.asarray([0, 1, -1, 2, 2])),))
    assert origin.dup["a"] is True
    codes = np.asarray([0, 1, 1, 0, 0], dtype=np.int64)
    members = fv._membership(origin, np.arange(5, dtype=np.int64), codes, None, {"a": 3})
    assert _pairs(*members["a"]) == {(0, 0), (1, 1), (0, 2)}
