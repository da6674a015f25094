"""Issue 16, second round: the calls added to reach 80% of tests/frames/pandas_calls.py, against pandas and policy.

Every call is written once and runs on a pandas frame and on a SecureDataFrame (through the real plan
JSON and the enclave evaluator), for the owner and for an analyst the policy allows, on random data
(Hypothesis seeds and sizes); the results must be equal, and the predicted schema must be the one the
enclave infers. Then each call is checked under the threshold mode (row-revealing calls need
``allow_rows``; record values are refused; aggregates are released under the group rules) and the DP
mode (released noisy, or refused before any budget is spent).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from _frames_support import ANALYST, OWNER, POLICY, World, patients
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pandas_api import rich_frame, run
from test_parity import OPEN, collect, same

import mesatee_notebook as mn
from mesatee_notebook.errors import FrameNotSupported, FrameUsageError, MalformedFrame, PolicyViolation
from mesatee_notebook.remote.frame_groupby import GROUPBY_NOT_SUPPORTED
from mesatee_notebook.wire.datapolicy import DP, DataPolicy

Case = tuple[str, Callable[[Any], Any]]


def num(d: Any) -> Any:
    return d[["a", "x", "y"]]


SERIES: list[Case] = [
    ("pct_change", lambda d: d.y.pct_change()),
    ("pct_change_2", lambda d: d.a.pct_change(2)),
    ("interpolate", lambda d: d.x.interpolate()),
    ("rolling_mean", lambda d: d.x.rolling(3).mean()),
    ("rolling_sum_mp", lambda d: d.y.rolling(4, min_periods=2).sum()),
    ("rolling_std", lambda d: d.a.rolling(2).std()),
    ("rolling_agg", lambda d: d.x.rolling(3, min_periods=1).agg("max")),
    ("rolling_count", lambda d: d.x.rolling(5).count()),
    ("expanding_sum", lambda d: d.x.expanding().sum()),
    ("expanding_median", lambda d: d.y.expanding(3).median()),
    ("sort_index", lambda d: d.sort_values("y").x.sort_index()),
    ("sort_index_desc", lambda d: d.x.sort_index(ascending=False)),
    ("kurt", lambda d: d.y.kurt()),
    ("kurtosis", lambda d: d.x.kurtosis()),
    ("groupby", lambda d: d.x.groupby(d.g).mean()),
    ("groupby_two", lambda d: d.y.groupby([d.a, d.flag]).sum()),
    ("groupby_opts", lambda d: d.y.groupby(d.g, sort=False).count()),
    ("shift_str", lambda d: d.s.shift(2)),
]

FRAMES: list[Case] = [
    ("sort_index", lambda d: d.sort_values("y").sort_index()),
    ("sort_index_desc", lambda d: d[["a", "g"]].sort_index(ascending=False)),
    ("duplicated", lambda d: d.duplicated(subset=["a", "g"])),
    ("duplicated_last", lambda d: d.duplicated(subset="a", keep="last")),
    ("duplicated_none", lambda d: d.duplicated(subset=["a", "flag"], keep=False)),
    ("duplicated_all", lambda d: d.duplicated()),
    ("cumsum", lambda d: num(d).cumsum()),
    ("cumprod", lambda d: d[["a"]].cumprod()),
    ("cummax", lambda d: num(d).cummax()),
    ("cummin", lambda d: num(d).cummin()),
    ("ffill", lambda d: num(d).ffill()),
    ("bfill", lambda d: num(d).bfill()),
    ("interpolate", lambda d: num(d).interpolate()),
    ("shift", lambda d: d[["a", "x", "s"]].shift(2)),
    ("diff", lambda d: num(d).diff()),
    ("pct_change", lambda d: num(d).pct_change()),
    ("rank", lambda d: d[["a", "x", "g"]].rank()),
    ("rank_min", lambda d: num(d).rank(method="min", ascending=False)),
    ("replace", lambda d: d.replace(1, 100)),
    ("replace_dict", lambda d: d.replace({"a": "z", 2: 20})),
    ("where", lambda d: num(d).where(num(d).notna(), 0)),
    ("where_series", lambda d: num(d).where(d.flag, -1, axis=0)),
    ("mask", lambda d: num(d).mask(num(d).isna(), 5.5)),
    ("idxmax", lambda d: num(d).idxmax()),
    ("idxmin", lambda d: d.idxmin(numeric_only=True)),
    ("kurt", lambda d: d.kurt(numeric_only=True)),
    ("quantile", lambda d: num(d).quantile(0.25)),
    ("quantile_median", lambda d: num(d).quantile()),
    ("corr", lambda d: d.corr(numeric_only=True)),
    ("corr_spearman", lambda d: num(d).corr(method="spearman")),
    ("cov", lambda d: num(d).cov()),
]

GROUPS: list[Case] = [
    *[
        (f"gb_{f}", lambda d, f=f: getattr(d.groupby("a")["x"], f)())
        for f in ("cumsum", "cumprod", "cummax", "cummin", "ffill", "bfill")
    ],
    ("gb_cumsum_frame", lambda d: d.groupby("g")[["x", "y"]].cumsum()),
    ("gb_shift", lambda d: d.groupby("g")["y"].shift(2)),
    ("gb_shift_frame", lambda d: d.groupby(["g", "flag"])[["a", "s"]].shift()),
    ("gb_diff", lambda d: d.groupby(["a", "flag"])["x"].diff()),
    ("gb_diff_dropna", lambda d: d.groupby("g", dropna=False)["x"].diff(-1)),
    ("gb_pct_change", lambda d: d.groupby("a")["y"].pct_change()),
    ("gb_rank", lambda d: d.groupby("g")["x"].rank(method="min", ascending=False)),
    ("gb_get_group", lambda d: d.groupby("a").get_group(2)),
    ("gb_get_group_two", lambda d: d.groupby(["a", "g"]).get_group((1, "b"))),
    ("gb_get_group_sel", lambda d: d.groupby("g")["x"].get_group("c")),
    ("gb_nth", lambda d: d.groupby("g").nth(0)),
    ("gb_nth_list", lambda d: d.groupby("a")["y"].nth([0, -1])),
    ("gb_idxmax", lambda d: d.groupby("g")["y"].idxmax()),
    ("gb_idxmin", lambda d: d.groupby("a")[["y", "a2"]].idxmin()),
]


def with_a2(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(a2=df.a * 2)


ALL = SERIES + FRAMES + GROUPS


@pytest.mark.parametrize("party", [OWNER, ANALYST])
@pytest.mark.parametrize(("name", "fn"), ALL, ids=[c[0] for c in ALL])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40))
def test_matches_pandas(name: str, fn: Callable[[Any], Any], party: str, seed: int, n: int) -> None:
    df = with_a2(rich_frame(seed, n))
    if name.startswith("gb_get_group"):
        try:
            fn(df)
        except KeyError:  # pandas: no such group; remote: no rows (whether a group exists is data)
            got = collect(fn(World({"d": (df, OPEN, OWNER)}).frame("d", party)))
            assert len(got) == 0
            return
    run(fn, df, party)


# pivot_table and value_counts reshape the released groups locally: their schema is the groups' one,
# so they are compared with pandas directly
PIVOTS: list[Case] = [
    ("values_str", lambda d: d.pivot_table(values="x", index="a", columns="g")),
    ("values_list_sum", lambda d: d.pivot_table(values=["x", "y"], index="g", columns="flag", aggfunc="sum")),
    ("no_columns", lambda d: d.pivot_table(values="y", index=["a", "flag"], aggfunc="count")),
    (
        "two_columns_fill",
        lambda d: d.pivot_table(values="y", index="g", columns=["a", "flag"], aggfunc="max", fill_value=0),
    ),
    ("keep_na", lambda d: d.pivot_table(index="g", columns="flag", values="x", dropna=False)),
    ("dict_aggfunc", lambda d: d.pivot_table(index="g", aggfunc={"x": "mean", "y": "sum"})),
    ("default_values", lambda d: d[["a", "g", "x", "y"]].pivot_table(index="a", columns="g")),
    ("unsorted", lambda d: d.pivot_table(values="y", index="g", columns="a", sort=False)),
]


@pytest.mark.parametrize("party", [OWNER, ANALYST])
@pytest.mark.parametrize(("name", "fn"), PIVOTS, ids=[c[0] for c in PIVOTS])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 60))
def test_pivot_table_matches_pandas(name: str, fn: Callable[[Any], Any], party: str, seed: int, n: int) -> None:
    df = rich_frame(seed, n)
    sdf = World({"d": (df, OPEN, OWNER)}).frame("d", party)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        same(fn(df), fn(sdf).collect())


def _canonical(s: pd.Series) -> pd.DataFrame:
    flat = s.rename("n").reset_index()
    return flat.sort_values(list(flat.columns)).reset_index(drop=True)


@pytest.mark.parametrize("seed", [0, 4])
@pytest.mark.parametrize(
    ("by", "cols", "kw"),
    [("a", ["g", "flag"], {}), (["a"], ["g"], {"normalize": True}), ("g", None, {}), ("flag", ["a"], {"sort": False})],
)
def test_multi_column_groupby_value_counts_equal_pandas(seed: int, by: Any, cols: Any, kw: dict[str, Any]) -> None:
    df = rich_frame(seed, 200)[["a", "g", "flag", "s"]]
    sdf = World({"d": (df, OPEN, OWNER)}).frame("d", ANALYST)
    got = (sdf.groupby(by) if cols is None else sdf.groupby(by)[cols]).value_counts(**kw).collect()
    want = (df.groupby(by) if cols is None else df.groupby(by)[cols]).value_counts(**kw)
    assert (got.name, list(got.index.names), got.dtype) == (want.name, list(want.index.names), want.dtype)
    pd.testing.assert_frame_equal(_canonical(got), _canonical(want))  # equal counts may be in another order


@pytest.mark.parametrize("party", [OWNER, ANALYST])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40))
def test_frame_mode_equals_pandas(party: str, seed: int, n: int) -> None:
    df = rich_frame(seed, n)
    sdf = World({"d": (df, OPEN, OWNER)}).frame("d", party)
    for fn in (lambda d: d.mode(), lambda d: d[["a", "g"]].mode(), lambda d: d.mode(numeric_only=True),
               lambda d: d[["x", "flag"]].mode(dropna=False)):  # fmt: skip
        # (the dtype of a padded int column is float64 in pandas, predicted as int64: compare the values)
        same(fn(df), fn(sdf).collect())


def test_info_prints_the_schema_and_the_released_counts() -> None:
    df = rich_frame(3, 50)
    world = World({"d": (df, OPEN, OWNER)})
    buf = io.StringIO()
    world.frame("d", ANALYST).info(buf=buf)
    text = buf.getvalue()
    assert "50 entries" in text
    for col, dtype in df.dtypes.items():
        assert f"{df[col].count()} non-null" in next(line for line in text.splitlines() if f" {col} " in line)
        assert str(dtype) in text
    queries = len(world.events)
    quiet = io.StringIO()
    world.frame("d", ANALYST).info(show_counts=False, buf=quiet)
    assert len(world.events) == queries and "non-null" not in quiet.getvalue()  # no query at all


# -- the threshold mode ---------------------------------------------------------------------------------


@pytest.fixture
def closed() -> World:
    return World({"patients": (patients(), POLICY, OWNER)})


ROW_REVEALING: list[Case] = [
    ("gb_cumsum", lambda d: d.assign(c=d.groupby("region")["age"].cumsum()).c.mean()),
    ("gb_shift", lambda d: d.groupby("region")["weight"].shift().mean()),
    ("gb_diff", lambda d: d.assign(w=d.groupby("region")["weight"].diff()).groupby("region").agg(s=("w", "sum"))),
    ("gb_rank", lambda d: d.groupby("smoker")["income"].rank().sum()),
    ("gb_idxmax", lambda d: d.groupby("region")["income"].idxmax()),
    ("frame_cumsum", lambda d: d[["age", "weight"]].cumsum().sum()),
    ("frame_idxmax", lambda d: d[["age", "weight"]].idxmax()),
    ("duplicated", lambda d: d.duplicated(subset=["age", "region"]).sum()),
    ("rolling", lambda d: d.income.rolling(3).mean().mean()),
    ("expanding", lambda d: d.income.expanding().max().mean()),
    ("pct_change", lambda d: d.weight.pct_change().mean()),
    ("interpolate", lambda d: d.weight.interpolate().sum()),
    ("frame_mode", lambda d: d[["age", "region"]].mode().age.count()),
    ("frame_shift", lambda d: d[["age", "weight"]].shift().sum()),
    ("frame_rank", lambda d: d[["age", "weight"]].rank().mean()),
    ("frame_diff", lambda d: d[["age", "weight"]].diff(2).count()),
]


@pytest.mark.parametrize(("name", "fn"), ROW_REVEALING, ids=[c[0] for c in ROW_REVEALING])
def test_row_revealing_calls_are_refused_without_allow_rows(closed: World, name: str, fn: Callable[[Any], Any]) -> None:
    with pytest.raises(PolicyViolation, match="allow_rows=False") as info:
        collect(fn(closed.frame("patients", ANALYST)))
    assert info.value.details.get("rule") == "allow_rows"
    assert closed.events[-1]["outcome"] == "refused"
    assert collect(fn(closed.frame("patients", OWNER))) is not None  # the owner is exempt


@pytest.mark.parametrize(
    "fn",
    [
        lambda d: d.sort_values("age").sort_index(),
        lambda d: d.age.sort_index(),
        lambda d: d[["age", "region"]].groupby("region").get_group("north"),
        lambda d: d[["age", "region"]].groupby("region").nth(0),
    ],
)
def test_row_level_results_are_refused_without_allow_rows(closed: World, fn: Callable[[Any], Any]) -> None:
    with pytest.raises(PolicyViolation, match="allow_rows"):
        collect(fn(closed.frame("patients", ANALYST)))


def test_elementwise_frame_calls_are_row_level_but_aggregate_freely(closed: World) -> None:
    df = patients()
    sdf = closed.frame("patients", ANALYST)
    for fn in (lambda d: d[["age"]].replace(30, 31), lambda d: d[["age"]].where(d[["age"]].notna(), 0)):
        with pytest.raises(PolicyViolation, match="allow_rows"):
            collect(fn(sdf))
    got = collect(sdf[["age", "weight"]].where(sdf.smoker, 0, axis=0).sum())
    pd.testing.assert_series_equal(got, df[["age", "weight"]].where(df.smoker, 0, axis=0).sum())
    got = collect(sdf[["age"]].replace({30: 300}).age.mean())
    assert got == pytest.approx(df[["age"]].replace({30: 300}).age.mean())


def test_series_groupby_is_released_under_the_group_rules() -> None:
    df = patients(200)
    df["rare"] = np.where(np.arange(200) < 4, "few", "many")
    world = World({"p": (df, POLICY, OWNER)})
    sdf = world.frame("p", ANALYST)
    got = collect(sdf.income.groupby(sdf.region).mean())
    pd.testing.assert_series_equal(got, df.income.groupby(df.region).mean())
    got = collect(sdf.income.groupby(sdf.rare).sum())
    assert list(got.index) == ["many"] and got["many"] == df.income[df.rare == "many"].sum()  # "few" suppressed
    got = collect(sdf.groupby("region")[["rare", "smoker"]].value_counts())
    want = df.groupby("region")[["rare", "smoker"]].value_counts()
    assert "few" not in got.index.get_level_values("rare")
    pd.testing.assert_series_equal(got.sort_index(), want[want >= 10].sort_index())


def test_info_in_the_threshold_and_the_dp_mode(closed: World, dp: World) -> None:
    buf = io.StringIO()
    closed.frame("patients", ANALYST).info(buf=buf)
    assert "400 entries" in buf.getvalue() and "ssn" in buf.getvalue() and "hidden" in buf.getvalue()
    with pytest.raises(PolicyViolation, match="DP mode"):
        dp.frame("patients", ANALYST).info(buf=io.StringIO())
    quiet = io.StringIO()
    dp.frame("patients", ANALYST).info(show_counts=False, buf=quiet)  # the schema only: nothing is queried
    assert "age" in quiet.getvalue() and dp.evaluator.privacy_budget("patients", ANALYST)["queries"] == 0


def test_frame_quantile_is_a_record_value(closed: World) -> None:
    with pytest.raises(PolicyViolation, match=r"one\s+record's exact value"):
        collect(closed.frame("patients", ANALYST)[["age", "weight"]].quantile(0.9))


def test_aggregates_are_released_to_an_analyst_under_the_group_rules(closed: World) -> None:
    df = patients()
    sdf = closed.frame("patients", ANALYST)
    cols = ["age", "weight", "height", "income"]
    pd.testing.assert_frame_equal(collect(sdf[cols].corr()), df[cols].corr())
    pd.testing.assert_frame_equal(collect(sdf[cols].cov()), df[cols].cov())
    pd.testing.assert_frame_equal(collect(sdf.corr(method="spearman", numeric_only=True)),
                                  df.drop(columns=["ssn", "region"]).corr(method="spearman"))  # fmt: skip
    assert collect(sdf.age.kurt()) == pytest.approx(df.age.kurt())
    pd.testing.assert_series_equal(collect(sdf[cols].kurt()), df[cols].kurt())
    got = collect(sdf.pivot_table(values="income", index="region", columns="smoker"))
    pd.testing.assert_frame_equal(got, df.pivot_table(values="income", index="region", columns="smoker"))


def test_pivot_table_suppresses_small_groups_as_missing_cells() -> None:
    df = patients(200)
    df["rare"] = np.where(np.arange(200) < 4, "few", "many")  # 4 rows: under min_group_size
    world = World({"p": (df, POLICY, OWNER)})
    got = collect(world.frame("p", ANALYST).pivot_table(values="age", index="region", columns="rare"))
    want = df.pivot_table(values="age", index="region", columns="rare")
    pd.testing.assert_series_equal(got["many"], want["many"])
    assert "few" not in got.columns or got["few"].isna().all()
    assert world.events[-1]["suppressed"] > 0


def test_corr_matrix_suppresses_a_sparse_column_or_refuses() -> None:
    df = patients(60)
    df["rare"] = np.nan
    df.loc[:2, "rare"] = [1.0, 2.0, 4.0]  # three values: every entry of its column is from 3 rows
    world = World({"p": (df, POLICY, OWNER)})
    got = collect(world.frame("p", ANALYST)[["age", "weight", "rare"]].corr())
    assert got["rare"].isna().all() and got.loc["age", "weight"] == pytest.approx(df.age.corr(df.weight))
    strict = DataPolicy(min_group_size=10, hidden_columns=("ssn",), small_group="refuse")
    world = World({"p": (df, strict, OWNER)})
    with pytest.raises(PolicyViolation, match=r"small groups"):
        collect(world.frame("p", ANALYST)[["age", "rare"]].cov())


def test_hidden_columns_stay_out_of_the_new_calls(closed: World) -> None:
    sdf = closed.frame("patients", ANALYST)
    assert "ssn" not in collect(sdf.corr(numeric_only=True)).columns
    with pytest.raises(PolicyViolation, match="hides"):
        sdf.groupby("ssn")["age"].cumsum()
    with pytest.raises(PolicyViolation, match="hides"):
        sdf.duplicated(subset=["ssn"])
    with pytest.raises(PolicyViolation, match="hides"):
        sdf.pivot_table(values="age", index="ssn")


# -- the DP mode ----------------------------------------------------------------------------------------


@pytest.fixture
def dp() -> World:
    bounds = {"age": (18, 90), "weight": (30, 150)}
    policy = DataPolicy(privacy=DP(epsilon=1e9, bounds=bounds, public_groups={"region": ("east", "north", "south",
                        "west"), "smoker": (False, True)}), hidden_columns=("ssn",))  # fmt: skip
    return World({"patients": (patients(), policy, OWNER)})


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda d: d[["age", "weight"]].corr(), r"corr\(\)/cov\(\) \(no DP mechanism"),
        (lambda d: d[["age", "weight"]].quantile(0.5), "frame-level reduction"),
        (lambda d: d[["age", "weight"]].idxmax(), r"idxmax\(\) is not available in DP mode"),
        (lambda d: d.age.kurt(), "kurt is not released in DP mode"),
        (lambda d: d.groupby("region")["age"].cumsum().sum(), r"groupby\(\).cumsum\(\) is not available in DP"),
        (lambda d: d.groupby("region")["age"].idxmax(), r"groupby\(\).idxmax\(\) is not available in DP"),
        (lambda d: d.age.rolling(5).mean().sum(), r"rolling\(\) is not available in DP mode"),
        (lambda d: d.duplicated(subset=["age"]).sum(), r"cumcount\(\) is not available in DP mode"),
        (lambda d: d.sort_values("age").sort_index(), "row-level results are never released"),
        (lambda d: d[["age"]].mode().age.count(), r"mode\(\) is not available in DP mode"),
    ],
)
def test_dp_mode_refuses_what_it_cannot_noise(dp: World, fn: Callable[[Any], Any], match: str) -> None:
    with pytest.raises(PolicyViolation, match=match):
        collect(fn(dp.frame("patients", ANALYST)))
    assert dp.evaluator.privacy_budget("patients", ANALYST)["queries"] == 0  # nothing charged


def test_dp_mode_releases_a_noisy_pivot_table_reshaped_like_pandas(dp: World) -> None:
    df = patients()
    got = collect(dp.frame("patients", ANALYST).pivot_table(values="age", index="region", columns="smoker"))
    want = df.pivot_table(values="age", index="region", columns="smoker")
    assert isinstance(got, mn.DPResult) and got.epsilon > 0
    assert got.value.shape == got.accuracy.shape == want.shape
    assert list(got.value.index) == list(want.index) and list(got.value.columns) == list(want.columns)
    assert np.allclose(got.value.to_numpy(), want.to_numpy(), atol=1.0)  # epsilon 1e9: tiny noise, but noise
    assert dp.evaluator.privacy_budget("patients", ANALYST)["queries"] == 1
    after_filter = collect(dp.frame("patients", ANALYST).sort_index().age.mean())  # a reorder is no release
    assert isinstance(after_filter, mn.DPResult)


# -- clear errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "error", "match"),
    [
        (lambda d: d.x.rolling(3).apply(np.mean), FrameNotSupported, "%%mesatee"),
        (lambda d: d.x.rolling(3).agg(np.mean), FrameNotSupported, "%%mesatee"),
        (lambda d: d.x.rolling("2D"), FrameUsageError, "number of rows"),
        (lambda d: d.x.rolling(3, center=True), FrameUsageError, "center"),
        (lambda d: d.x.rolling(0).mean(), MalformedFrame, "window must be"),
        (lambda d: d.x.interpolate("spline"), FrameUsageError, "linear"),
        (lambda d: d.pivot_table(values="x", index="g", aggfunc=np.mean), FrameNotSupported, "%%mesatee"),
        (lambda d: d.pivot_table(values="x", index="g", aggfunc=["mean", "sum"]), FrameUsageError, "one aggregation"),
        (lambda d: d.pivot_table(values="x", index="g", margins=True), FrameUsageError, "margins"),
        (lambda d: d.pivot_table(values="x", columns="g"), FrameUsageError, "index="),
        (lambda d: d.pivot_table(values="g", index="a"), MalformedFrame, "numeric"),
        (lambda d: d.x.groupby(d.x), FrameUsageError, "distinct names"),
        (lambda d: d.x.groupby("g"), FrameUsageError, "remote series of the same frame"),
        (lambda d: d[["x", "y"]].quantile([0.1, 0.5]), FrameUsageError, "one q"),
        (lambda d: d[["x", "y"]].where(d.flag), FrameUsageError, "axis=0"),
        (lambda d: d[["x", "y"]].corr(method="kendall"), FrameUsageError, "pearson"),
        (lambda d: d[["x", "g"]].corr(), MalformedFrame, "numeric_only=True"),
        (lambda d: d.s.pct_change(), MalformedFrame, "numeric"),
        (lambda d: d.groupby("a").nth(slice(0, 2)), FrameUsageError, "slices"),
        (lambda d: d.groupby(["a", "g"]).get_group(1), FrameUsageError, "one value per key"),
        (lambda d: d.groupby("a")["a"], None, None),
        (lambda d: d.groupby("a").x.sum().sort_index(), MalformedFrame, "sort_index\\(\\) of an aggregate"),
    ],
)
def test_usage_errors_are_clear(fn: Callable[[Any], Any], error: type[Exception] | None, match: str | None) -> None:
    sdf = World({"d": (rich_frame(0, 20), OPEN, OWNER)}).frame("d", OWNER)
    if error is None:
        fn(sdf)
        return
    with pytest.raises(error, match=match):
        fn(sdf)


@pytest.mark.parametrize("name", ["filter", "apply", "pipe", "rolling", "expanding", "ohlc"])
def test_groupby_calls_still_refused_say_why(name: str) -> None:
    sdf = World({"d": (rich_frame(0, 5), OPEN, OWNER)}).frame("d", OWNER)
    with pytest.raises(FrameNotSupported) as info:
        getattr(sdf.groupby("a"), name)
    assert info.value.message == GROUPBY_NOT_SUPPORTED[name]
