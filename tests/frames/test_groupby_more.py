"""Issue 16's GroupBy leftovers against pandas, and under the owners' policies.

cumcount, head, tail, transform, value_counts, describe, unique; the calls that cannot be safe
(filter, apply, ...) raise FrameNotSupported saying why.
"""

from __future__ import annotations

import itertools
from typing import Any

import pandas as pd
import pytest
from _frames_support import ANALYST, OWNER, POLICY, World, patients
from test_parity import OPEN, random_frame

from mesatee_notebook.errors import FrameNotSupported, FrameUsageError, PolicyViolation
from mesatee_notebook.remote.frame import DPResult
from mesatee_notebook.remote.frame_groupby import GROUPBY_NOT_SUPPORTED
from mesatee_notebook.wire.datapolicy import DP, DataPolicy

SEEDS = (0, 3, 5)
GROUPINGS: list[tuple[Any, dict[str, Any]]] = [
    ("a", {}),
    (["a", "flag"], {}),
    ("g", {}),  # string keys with missing values
    ("g", {"dropna": False}),
    ("a", {"sort": False}),
]


def _pair(seed: int) -> tuple[pd.DataFrame, Any]:
    df = random_frame(seed, 240)
    return df, World({"d": (df, OPEN, OWNER)}).frame("d", OWNER)


def _same(got: Any, want: Any) -> None:
    if isinstance(want, pd.DataFrame):
        pd.testing.assert_frame_equal(got, want)
    else:
        pd.testing.assert_series_equal(got, want)


CALLS = {
    "cumcount": lambda g: g.cumcount(),
    "cumcount_desc": lambda g: g.cumcount(ascending=False),
    "head": lambda g: g.head(2),
    "tail": lambda g: g.tail(1),
    "head_sel": lambda g: g["x"].head(3),
    "head_0": lambda g: g.head(0),
    "transform_mean": lambda g: g["x"].transform("mean"),
    "transform_frame": lambda g: g[["x", "y"]].transform("sum"),
    "transform_max": lambda g: g["y"].transform("max"),
    "transform_count": lambda g: g["x"].transform("count"),
    "transform_first": lambda g: g["x"].transform("first"),
    "describe": lambda g: g[["x", "y"]].describe(),
    "describe_sel": lambda g: g["x"].describe(),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("by", "kw"), GROUPINGS, ids=[f"{b}-{k}" for b, k in GROUPINGS])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_group_calls_equal_pandas(seed: int, by: Any, kw: dict[str, Any], call: str) -> None:
    df, sdf = _pair(seed)
    fn = CALLS[call]
    _same(fn(sdf.groupby(by, **kw)).collect(), fn(df.groupby(by, **kw)))


def test_describe_of_every_numeric_column_equals_pandas() -> None:
    df, sdf = _pair(1)
    _same(sdf.groupby("g").describe().collect(), df.groupby("g").describe())


def _canonical(s: pd.Series) -> pd.DataFrame:
    flat = s.rename("n").reset_index()
    keys = list(flat.columns[:-1])
    return flat.sort_values([*keys[:-1], "n", keys[-1]], ascending=[True] * (len(keys) - 1) + [False, True])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("by", "col"), [("a", "g"), (["a", "flag"], "g"), ("g", "a")])
@pytest.mark.parametrize(
    ("kw", "gkw"),
    [({}, {}), ({"normalize": True}, {}), ({"ascending": True}, {}), ({"sort": False}, {}), ({}, {"sort": False}),
     ({"dropna": False}, {"dropna": False})],
)  # fmt: skip
def test_group_value_counts_equal_pandas(seed: int, by: Any, col: str, kw: dict[str, Any], gkw: dict[str, Any]) -> None:
    df, sdf = _pair(seed)
    got = sdf.groupby(by, **gkw)[col].value_counts(**kw).collect()
    want = df.groupby(by, **gkw)[col].value_counts(**kw)
    assert (got.name, list(got.index.names), got.dtype) == (want.name, list(want.index.names), want.dtype)
    # the same counts; the groups in pandas' order and, within a group, counts in pandas' order
    # (equal counts within a group are in value order here, in pandas' internal order there)
    pd.testing.assert_frame_equal(_canonical(got).reset_index(drop=True), _canonical(want).reset_index(drop=True))
    groups = got.index.droplevel(-1)
    if gkw.get("sort", True):
        assert list(dict.fromkeys(groups)) == list(dict.fromkeys(want.index.droplevel(-1)))
    if kw.get("sort", True):
        direction = 1 if kw.get("ascending") else -1
        for key in dict.fromkeys(groups):
            vals = got[groups == key].to_numpy()
            assert all(direction * (b - a) >= 0 for a, b in itertools.pairwise(vals))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("by", "kw"), GROUPINGS, ids=[f"{b}-{k}" for b, k in GROUPINGS])
def test_group_unique_equals_pandas(seed: int, by: Any, kw: dict[str, Any]) -> None:
    df, sdf = _pair(seed)
    col = "a" if by == "g" else "g"
    got = sdf.groupby(by, **kw)[col].unique().collect()
    want = df.groupby(by, **kw)[col].unique()
    _same(got.apply(list), want.apply(list))


# -- policy ---------------------------------------------------------------------------------------


def _closed() -> tuple[pd.DataFrame, Any, Any]:
    df = patients(400)
    world = World({"p": (df, POLICY, OWNER)})
    return df, world.frame("p", ANALYST), world.frame("p", OWNER)


@pytest.mark.parametrize(
    "call",
    [
        lambda g: g.cumcount(),
        lambda g: g.head(3),
        lambda g: g.tail(3),
        lambda g: g["age"].transform("mean"),
        lambda g: g["age"].transform("mean").mean(),  # an aggregate of a transform is still refused
        lambda g: g["age"].unique(),
        lambda g: g["age"].describe(),  # min, max and quartiles are records' values
    ],
)
def test_row_revealing_group_calls_are_refused_without_allow_rows(call: Any) -> None:
    _, analyst, owner = _closed()
    with pytest.raises(PolicyViolation):
        call(analyst.groupby("region")).collect()
    call(owner.groupby("region")).collect()  # the owner is exempt


def test_group_value_counts_suppresses_small_groups_like_size() -> None:
    df, analyst, _ = _closed()
    got = analyst.groupby("region")["smoker"].value_counts().collect()
    want = df.groupby("region")["smoker"].value_counts()
    big = want[want >= POLICY.min_group_size]
    assert set(got.index) == set(big.index)
    assert (got.sort_index() == big.sort_index()).all()
    with pytest.raises(PolicyViolation):
        analyst.groupby("region")["ssn"].value_counts()  # hidden column


def test_dp_mode_refuses_group_windows_and_noises_value_counts() -> None:
    df = patients(400)
    policy = DataPolicy(privacy=DP(epsilon=1.0, delta=1e-6, total_epsilon=10), hidden_columns=("ssn",))
    world = World({"p": (df, policy, OWNER)})
    sdf = world.frame("p", ANALYST)
    with pytest.raises(PolicyViolation, match="DP mode"):
        sdf.groupby("region")["age"].transform("mean").collect()
    with pytest.raises(PolicyViolation, match="DP mode"):
        sdf.groupby("region").cumcount().collect()
    noisy = sdf.groupby("region")["smoker"].value_counts().collect(epsilon=0.5)
    assert isinstance(noisy, DPResult)
    assert noisy.epsilon == pytest.approx(0.5)  # a noisy count per (region, smoker), budget spent
    exact = df.groupby("region")["smoker"].value_counts()
    assert set(noisy.value.index) <= set(exact.index)


# -- calls that cannot be safe --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GROUPBY_NOT_SUPPORTED))
def test_unsafe_group_calls_raise_frame_not_supported(name: str) -> None:
    _, sdf = _pair(0)
    with pytest.raises(FrameNotSupported) as info:
        getattr(sdf.groupby("a"), name)
    assert str(info.value) == GROUPBY_NOT_SUPPORTED[name]


def test_transform_with_a_function_is_refused_with_the_reason() -> None:
    _, sdf = _pair(0)
    with pytest.raises(FrameNotSupported, match="mesatee"):
        sdf.groupby("a")["x"].transform(lambda s: s - s.mean())
    with pytest.raises(FrameUsageError, match="use one of"):
        sdf.groupby("a")["x"].transform("cumcount")
    with pytest.raises(FrameUsageError):
        sdf.groupby("a").head(-1)
    with pytest.raises(FrameUsageError, match="a column besides the keys"):  # (several columns: test_pandas_more)
        sdf[["a", "g"]].groupby(["a", "g"]).value_counts()


# -- the other leftovers: frame-level elementwise calls, agg by name, dropna, copy -----------------

FRAME_CALLS = {
    "isna": lambda d: d.isna(),
    "notnull": lambda d: d.notnull(),
    "abs": lambda d: d[["x", "y", "a"]].abs(),
    "round": lambda d: d[["x", "y"]].round(1),
    "clip": lambda d: d[["x", "a"]].clip(-1, 2),
    "agg_sum": lambda d: d[["x", "a"]].agg("sum"),
    "aggregate_count": lambda d: d.aggregate("count"),
    "copy": lambda d: d.copy(),
    "s_dropna": lambda d: d.x.dropna(),
    "s_agg": lambda d: d.x.agg("mean"),
    "s_copy": lambda d: d.g.copy(),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("call", sorted(FRAME_CALLS))
def test_other_leftovers_equal_pandas(seed: int, call: str) -> None:
    df, sdf = _pair(seed)
    got, want = FRAME_CALLS[call](sdf).collect(), FRAME_CALLS[call](df)
    if isinstance(want, (pd.DataFrame, pd.Series)):
        _same(got, want)
    else:
        assert got == pytest.approx(want)


def test_agg_by_name_only() -> None:
    _, sdf = _pair(0)
    for bad in (["sum"], len, "ohlc"):
        with pytest.raises(FrameUsageError, match="one reduction name"):
            sdf.agg(bad)
        with pytest.raises(FrameUsageError, match="one reduction name"):
            sdf.x.agg(bad)


def test_frame_isna_of_an_analyst_is_row_level() -> None:
    _, analyst, _ = _closed()
    with pytest.raises(PolicyViolation):
        analyst.isna().collect()
    assert analyst.isna().count().collect()["age"] == 400  # an aggregate of it is released
