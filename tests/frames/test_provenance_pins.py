"""Issue 15 P7 (session 5): the cheaper provenance gives exactly what the plain formulation gives.

Each shortcut is checked against the formulation it replaced, on random data (Hypothesis) with missing keys,
empty groups, duplicated and many-to-many merge keys, every join type and self-joins:

- the merge's rows from pandas' join indexers vs two position columns carried through the merge;
- pandas' own group codes vs ``ngroup()``; group sizes from the group-by vs ``bincount``;
- the (group, source row) pairs, sizes and repeat flags of a merge + group-by vs a brute force over the
  position columns (the old formulation, written out with Python sets);
- the differencing guard's fingerprint and record vs the old ``prepare`` (full label array, ``lexsort``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd
import pytest
from _frames_support import ANALYST, OWNER, World
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesatee_notebook.enclave import frame_values as fv
from mesatee_notebook.enclave.frame_eval import _group_sizes, _Run
from mesatee_notebook.enclave.frame_guard import _DifferencingGuard, _label_dtype
from mesatee_notebook.wire.datapolicy import DataPolicy
from mesatee_notebook.wire.plan import SourceInfo, infer_plan, plan_from_json, source_columns

HOWS = ("inner", "left", "right", "outer")
keys = st.lists(st.one_of(st.none(), st.integers(0, 4)), min_size=0, max_size=40)
labels = st.lists(st.one_of(st.none(), st.sampled_from(["a", "b", "c"])), min_size=0, max_size=40)


def _left(k: list[int | None], g: list[str | None]) -> pd.DataFrame:
    n = min(len(k), len(g))
    return pd.DataFrame(
        {
            "k": pd.array([np.nan if v is None else float(v) for v in k[:n]], dtype="float64"),
            "g": pd.Series(g[:n], dtype="str"),
            "x": np.arange(n, dtype=np.int64) % 5,
        }
    )


def _right(k: list[int | None], h: list[str | None]) -> pd.DataFrame:
    n = min(len(k), len(h))
    return pd.DataFrame(
        {
            "k": pd.array([np.nan if v is None else float(v) for v in k[:n]], dtype="float64"),
            "h": pd.Series(h[:n], dtype="str"),
            "y": np.arange(n, dtype=np.int64) % 3,
        }
    )


def _old_merge_positions(
    left: pd.DataFrame, right: pd.DataFrame, kwargs: dict[str, Any]
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The session-4 formulation: each side's positions (its index) through pandas' merge as two columns."""
    ldf = left.assign(**{fv._LPOS: fv._positions(left.index)})
    rdf = right.assign(**{fv._RPOS: fv._positions(right.index)})
    out = ldf.merge(rdf, **kwargs)
    lpos = np.asarray(out.pop(fv._LPOS).fillna(-1).to_numpy(), dtype=np.int64)
    rpos = np.asarray(out.pop(fv._RPOS).fillna(-1).to_numpy(), dtype=np.int64)
    return out.reset_index(drop=True), lpos, rpos


def _as_array(pos: np.ndarray | None, n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) if pos is None else pos


@settings(max_examples=80, deadline=None)
@given(keys, labels, keys, labels, st.sampled_from(HOWS), st.booleans(), st.integers(0, 4))
def test_merge_rows_are_the_position_columns(
    lk: list[Any], g: list[Any], rk: list[Any], h: list[Any], how: str, two_keys: bool, cut: int
) -> None:
    left, right = _left(lk, g), _right(rk, h)
    if cut:  # a filtered side: its index holds positions of its origin, not 0..n-1
        left = left[left.x >= cut % 3]
        right = right[right.y != cut % 3]
    on = ["k", "x"] if two_keys else ["k"]
    right_on = ["k", "y"] if two_keys else ["k"]
    kwargs: dict[str, Any] = {"how": how, "left_on": on, "right_on": right_on, "suffixes": ("_x", "_y")}
    want, want_l, want_r = _old_merge_positions(left, right, kwargs)
    out, lrows, rrows = fv._merge_rows(left, right, kwargs)
    pd.testing.assert_frame_equal(out.reset_index(drop=True), want)
    pd.testing.assert_frame_equal(out, left.merge(right, **kwargs))
    got_l = _as_array(fv._side_positions(left.index, lrows), len(out))
    got_r = _as_array(fv._side_positions(right.index, rrows), len(out))
    assert got_l.tolist() == want_l.tolist()
    assert got_r.tolist() == want_r.tolist()


@settings(max_examples=60, deadline=None)
@given(keys, labels, st.booleans(), st.booleans(), st.booleans())
def test_group_codes_are_ngroup(k: list[Any], g: list[Any], dropna: bool, sort: bool, categorical: bool) -> None:
    df = _left(k, g)
    if categorical:  # ngroup renumbers categorical keys: the plain path is taken, and must agree too
        df = df.assign(g=df.g.astype("category"))
    for by in (["g"], ["k"], ["g", "k"]):
        gb = df.groupby(by, sort=sort, dropna=dropna, observed=True)
        assert fv._group_codes(gb).tolist() == fv._codes(gb.ngroup()).tolist()
        res = gb.agg(n=("x", "size"), m=("x", "mean"))
        codes = fv._group_codes(gb)
        members = fv._membership(fv._Origin("rows", len(df), rows={"d": [None]}), None, codes, None, {"d": len(df)})
        sizes = _group_sizes(members, codes, res, (("n", "x", "size"), ("m", "x", "mean")))
        want = np.bincount(members["d"][0], minlength=len(res))
        assert sizes["d"].tolist() == want.tolist()
        assert sizes["d"].dtype == np.int64


def _plain_members(
    codes: np.ndarray, srcs: list[np.ndarray]
) -> tuple[set[tuple[int, int]], np.ndarray, bool, list[int]]:
    """Brute force over the position columns: distinct (group, source row) pairs, sizes, and whether rows repeat."""
    pairs = {(int(c), int(s)) for src in srcs for c, s in zip(codes, src, strict=True) if c >= 0 and s >= 0}
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    sizes = np.zeros(n_groups, dtype=np.int64)
    for c, _ in pairs:
        sizes[c] += 1
    rows = [int(s) for src in srcs for s in src if s >= 0]
    return pairs, sizes, len(srcs) > 1 or len(rows) != len(set(rows)), rows


def _evaluate(world: World, frame: Any, protected: set[str]) -> Any:
    plan = plan_from_json(frame.plan_json())
    sources = {
        name: SourceInfo(name, source_columns(df.dtypes.items()), frozenset())
        for name, (df, _, _) in world.datasets.items()
    }
    frames = {name: df for name, (df, _, _) in world.datasets.items()}
    return _Run(plan, infer_plan(plan, sources), frames, protected).evaluate()


def _old_prepare(g: np.ndarray, s: np.ndarray, n_groups: int, n_src: int, dup: bool) -> tuple[bytes, list[Any]]:
    """The differencing guard's record as session 4 built it."""
    sizes = np.bincount(g, minlength=n_groups).astype(np.int64)
    h = hashlib.sha256(f"{n_groups}:{n_src}:{int(dup)}".encode())
    if not dup:
        labels = np.full(n_src, n_groups, dtype=_label_dtype(n_groups))
        labels[s] = g
        h.update(labels.data)
        return h.digest(), [sizes, labels]
    order = np.lexsort((g, s))
    src, grp = s[order], g[order]
    h.update(np.ascontiguousarray(src, dtype=np.int64).data)
    h.update(np.ascontiguousarray(grp, dtype=np.int64).data)
    return h.digest(), [sizes, src, grp]


def _check_guard_record(g: np.ndarray, s: np.ndarray, sizes: np.ndarray, n_src: int, dup: bool) -> None:
    n_groups = len(sizes)
    fp, rel = _DifferencingGuard(8).prepare(g, s, n_groups, n_src, dup, sizes)
    want_fp, want = _old_prepare(g, s, n_groups, n_src, dup)
    assert fp == want_fp
    got = [rel.sizes, rel.labels] if not dup else [rel.sizes, rel.src, rel.grp]
    for a, b in zip(got, want, strict=True):
        assert a is not None
        assert a.tolist() == b.tolist()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keys,
    labels,
    keys,
    labels,
    st.sampled_from(HOWS),
    st.sampled_from([["g"], ["h"], ["g", "h"], ["k"]]),
    st.booleans(),
    st.integers(0, 3),
    st.booleans(),
)
def test_merge_groupby_provenance_is_the_plain_one(
    lk: list[Any],
    g: list[Any],
    rk: list[Any],
    h: list[Any],
    how: str,
    by: list[str],
    dropna: bool,
    cut: int,
    self_join: bool,
) -> None:
    left, right = _left(lk, g), _right(rk, h)
    open_ = DataPolicy(min_group_size=1)
    world = World({"l": (left, open_, OWNER), "r": (right, open_, OWNER)})
    sl, sr = world.frame("l", ANALYST), world.frame("r", ANALYST)
    lf = sl[sl.x >= cut] if cut else sl
    if self_join:  # the same dataset on both sides: two source arrays for one dataset
        other = sl.rename(columns={"g": "h", "x": "y"})
        right_df = left.rename(columns={"g": "h", "x": "y"})
        names = ("l", "l")
    else:
        other, right_df, names = sr, right, ("l", "r")
    merged = lf.merge(other, on="k", how=how)
    query = merged.groupby(by, dropna=dropna).agg(n=("k", "size"), m=("y", "mean"))
    value = _evaluate(world, query, {"l", "r"})

    lframe = left[left.x >= cut] if cut else left
    kwargs: dict[str, Any] = {"how": how, "left_on": ["k"], "right_on": ["k"], "suffixes": ("_x", "_y")}
    plain, lpos, rpos = _old_merge_positions(lframe, right_df, kwargs)
    codes = fv._codes(plain.groupby(by, sort=True, dropna=dropna).ngroup())
    per_ds: dict[str, list[np.ndarray]] = {}
    for name, pos in zip(names, (lpos, rpos), strict=True):
        per_ds.setdefault(name, []).append(pos)
    assert set(value.origin.members) == set(per_ds)
    for ds, srcs in per_ds.items():
        pairs, sizes, dup, _ = _plain_members(codes, srcs)
        mg, ms = value.origin.members[ds]
        got_pairs = list(zip(mg.tolist(), ms.tolist(), strict=True))
        assert len(got_pairs) == len(set(got_pairs))  # deduplicated
        assert set(got_pairs) == pairs
        n_groups = value.origin.n
        want_sizes = np.zeros(n_groups, dtype=np.int64)
        want_sizes[: len(sizes)] = sizes
        assert value.origin.sizes[ds].tolist() == want_sizes.tolist()
        assert value.origin.dup[ds] == dup
        n_src = len(world.datasets[ds][0])
        _check_guard_record(mg, ms, value.origin.sizes[ds], n_src, value.origin.dup[ds])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 50)), max_size=400), st.booleans())
def test_dedupe_comes_out_in_the_guards_order(pairs: list[tuple[int, int]], big: bool) -> None:
    g = np.asarray([p[0] for p in pairs], dtype=np.int64)
    s = np.asarray([p[1] for p in pairs], dtype=np.int64)
    dg, ds = fv._dedupe(g, s, (1 << 25) if big else 51)
    assert set(zip(dg.tolist(), ds.tolist(), strict=True)) == set(pairs)
    if not big:  # the bitmap path: by source row, then group, so the guard skips its sort
        order = np.lexsort((dg, ds))
        assert order.tolist() == list(range(len(dg)))
    _check_guard_record(dg, ds, np.bincount(dg, minlength=7), 51 if not big else 1 << 25, True)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 9), max_size=60), st.integers(10, 80), st.booleans())
def test_guard_labels_for_every_row_in_order(groups: list[int], extra: int, whole: bool) -> None:
    g = np.asarray(groups, dtype=np.int64)
    n_src = len(g) if whole else len(g) + extra
    s = np.arange(len(g), dtype=np.int64)  # the identity when whole: labels are the groups themselves
    _check_guard_record(g, s, np.bincount(g, minlength=10), n_src, False)


@pytest.mark.parametrize("how", HOWS)
def test_empty_sides_and_no_groups(how: str) -> None:
    left, right = _left([], []), _right([1, None], ["a", "b"])
    kwargs: dict[str, Any] = {"how": how, "left_on": ["k"], "right_on": ["k"], "suffixes": ("_x", "_y")}
    want, want_l, want_r = _old_merge_positions(left, right, kwargs)
    out, lrows, rrows = fv._merge_rows(left, right, kwargs)
    pd.testing.assert_frame_equal(out.reset_index(drop=True), want)
    assert _as_array(fv._side_positions(left.index, lrows), len(out)).tolist() == want_l.tolist()
    assert _as_array(fv._side_positions(right.index, rrows), len(out)).tolist() == want_r.tolist()
    empty = np.zeros(0, dtype=np.int64)
    assert fv._dedupe(empty, empty, 10)[0].tolist() == []
    _check_guard_record(empty, empty, np.zeros(3, dtype=np.int64), 5, False)
    _check_guard_record(empty, empty, np.zeros(3, dtype=np.int64), 5, True)


def test_merge_without_pandas_internals_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    left, right = _left([1, 1, None, 2], ["a", "b", "c", None]), _right([1, None, 1], ["x", "y", "z"])
    kwargs: dict[str, Any] = {"how": "outer", "left_on": ["k"], "right_on": ["k"], "suffixes": ("_x", "_y")}
    want = fv._merge_rows(left, right, kwargs)
    monkeypatch.setattr(fv, "_pandas_merge_op", lambda: None)  # as if pandas had renamed its merge class
    got = fv._merge_rows(left, right, kwargs)
    pd.testing.assert_frame_equal(got[0], want[0])
    for a, b, n in ((got[1], want[1], len(left)), (got[2], want[2], len(right))):
        assert _as_array(a, n).tolist() == _as_array(b, n).tolist()
