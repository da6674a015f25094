"""Issue 16: the pandas calls users know, each checked against pandas and against the owners' policies.

The random-query oracle of ``test_parity`` is extended here: every case is written once, runs on
a pandas frame and on a SecureDataFrame (through the real plan JSON and the enclave evaluator),
for the owner and for an analyst the policy allows, on random data; the results must be equal.
Then each new op is checked under the threshold mode (allow_rows=False, hidden columns,
min_group_size) and the DP mode (an op the DP evaluator cannot noise is refused, never released).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from _frames_support import ANALYST, OWNER, POLICY, World, patients
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_parity import OPEN, check_schema, collect, same

import mesatee_notebook as mn
from mesatee_notebook.errors import FrameNotSupported, FrameUsageError, MalformedFrame, PolicyViolation
from mesatee_notebook.remote.frame import NOT_SUPPORTED, SecureArray, SecureDataFrame, concat, cut
from mesatee_notebook.wire.datapolicy import DP, DataPolicy


def rich_frame(seed: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, n).round(2)
    x[rng.random(n) < 0.15] = np.nan
    words = np.array([" Alpha", "beta ", "Gamma", "delta", "alpha beta"])
    return pd.DataFrame(
        {
            "a": rng.integers(0, 6, n),
            "x": x,
            "y": rng.normal(1, 1, n).round(2),
            "g": rng.choice(["a", "b", "c"], n),
            "s": pd.Series(rng.choice(words, n), dtype="str"),
            "t": pd.Timestamp("2021-03-01") + pd.to_timedelta(rng.integers(0, 10**6, n), unit="min"),
            "flag": rng.random(n) < 0.4,
        }
    )


Case = tuple[str, Callable[[Any], Any]]


def method_case(col: str, method: str, other: str | int) -> Callable[[Any], Any]:
    """``d[col].method(d[other])`` (or a literal ``other``), the method form of an operator."""
    return lambda d: getattr(d[col], method)(d[other] if isinstance(other, str) else other)


SERIES: list[Case] = [
    ("between", lambda d: d.x.between(-1, 2)),
    ("between_neither", lambda d: d.a.between(1, 4, inclusive="neither")),
    ("isna", lambda d: d.x.isna()),
    ("isnull", lambda d: d.x.isnull()),
    ("notna", lambda d: d.x.notna()),
    ("notnull", lambda d: d.x.notnull()),
    ("str_lower", lambda d: d.s.str.lower()),
    ("str_upper", lambda d: d.s.str.upper()),
    ("str_len", lambda d: d.s.str.len()),
    ("str_contains", lambda d: d.s.str.contains("a")),
    ("str_contains_nocase", lambda d: d.s.str.contains("ALPHA", case=False, regex=False)),
    ("str_startswith", lambda d: d.s.str.startswith("b")),
    ("str_endswith", lambda d: d.s.str.endswith("a")),
    ("str_strip", lambda d: d.s.str.strip()),
    ("str_replace", lambda d: d.s.str.replace("a", "4")),
    ("str_slice", lambda d: d.s.str.slice(1, 4)),
    ("str_getitem", lambda d: d.s.str[:2]),
    ("dt_year", lambda d: d.t.dt.year),
    ("dt_month", lambda d: d.t.dt.month),
    ("dt_day", lambda d: d.t.dt.day),
    ("dt_hour", lambda d: d.t.dt.hour),
    ("dt_day_of_week", lambda d: d.t.dt.day_of_week),
    ("dt_date", lambda d: d.t.dt.date),
    ("dt_floor", lambda d: d.t.dt.floor("D")),
    ("dt_floor_15min", lambda d: d.t.dt.floor("15min")),
    ("clip", lambda d: d.x.clip(-1, 1)),
    ("clip_lower", lambda d: d.a.clip(lower=2)),
    ("round", lambda d: d.y.round(1)),
    ("where", lambda d: d.x.where(d.a > 2)),
    ("where_other", lambda d: d.a.where(d.a > 2, 0)),
    ("mask_series", lambda d: d.y.mask(d.flag, d.x)),
    ("replace_scalar", lambda d: d.a.replace(1, 100)),
    ("replace_dict", lambda d: d.g.replace({"a": "A", "c": "C"})),
    ("replace_list", lambda d: d.a.replace([1, 2], [10, 20])),
    ("map_dict", lambda d: d.g.map({"a": "first", "b": "second"})),
    ("map_dict_num", lambda d: d.g.map({"a": 1.5, "b": 2.5, "c": 0.0})),
    ("cumsum", lambda d: d.x.cumsum()),
    ("cummax", lambda d: d.y.cummax()),
    ("shift", lambda d: d.a.shift()),
    ("shift_neg", lambda d: d.y.shift(-2)),
    ("diff", lambda d: d.y.diff()),
    ("rank", lambda d: d.a.rank()),
    ("rank_dense_desc", lambda d: d.y.rank(method="dense", ascending=False)),
    ("ffill", lambda d: d.x.ffill()),
    ("bfill", lambda d: d.x.bfill()),
    ("duplicated", lambda d: d.g.duplicated()),
    ("duplicated_last", lambda d: d.a.duplicated(keep="last")),
    ("nlargest", lambda d: d.y.nlargest(3)),
    ("nsmallest", lambda d: d.a.nsmallest(4)),
    ("to_frame", lambda d: d.x.to_frame()),
    ("to_frame_named", lambda d: (d.x * 2).to_frame("double")),
    ("rename", lambda d: d.x.rename("renamed")),
    ("mode", lambda d: d.a.mode()),
    ("sample", lambda d: d.y.sample(3, random_state=7) if len(d) >= 3 else d.y.sample(0, random_state=7)),
    ("reset_index", lambda d: d.y[d.a > 2].reset_index(drop=True)),
    ("iloc_slice", lambda d: d.y.iloc[1:5]),
    ("loc_mask", lambda d: d.y.loc[d.flag]),
    *[(f"method_{m}", method_case("a", m, "y"))
      for m in ("add", "sub", "mul", "div", "truediv", "pow", "eq", "ne", "gt", "ge", "lt", "le")],
    *[(f"method_{m}_lit", method_case("y", m, 2))
      for m in ("add", "sub", "mul", "div", "floordiv", "mod", "pow", "radd", "rsub", "rmul", "rdiv")],
    ("cut_labels", lambda d: cut_(d.y, [-10, 0, 1, 10], labels=["lo", "mid", "hi"])),
    ("cut_codes", lambda d: cut_(d.y, [-10, 0, 1, 10], labels=False)),
]  # fmt: skip

FRAMES: list[Case] = [
    ("dropna", lambda d: d.dropna()),
    ("dropna_subset", lambda d: d.dropna(subset=["x"])),
    ("dropna_all", lambda d: d[["x", "y"]].dropna(how="all")),
    ("loc_mask_frame", lambda d: d.loc[d.a > 2]),
    ("loc_mask_cols", lambda d: d.loc[d.a > 2, ["x", "y"]]),
    ("loc_all_cols", lambda d: d.loc[:, ["g", "a"]]),
    ("loc_col_slice", lambda d: d.loc[:, "x":"g"]),
    ("loc_label_slice", lambda d: d.loc[2:6]),
    ("iloc_rows", lambda d: d.iloc[2:7]),
    ("iloc_step", lambda d: d.iloc[::3]),
    ("iloc_cols", lambda d: d.iloc[:, [0, 2]]),
    ("iloc_col", lambda d: d.iloc[:, 1]),
    ("query", lambda d: d.query("a > 2 and g == 'b'")),
    ("query_in", lambda d: d.query("g in ['a', 'c'] or x < 0")),
    ("query_chain", lambda d: d.query("1 <= a < 4 and not flag")),
    ("query_arith", lambda d: d.query("x * 2 > y - 1")),
    ("eval", lambda d: d.eval("x + y * 2")),
    ("eval_assign", lambda d: d.eval("z = x - y")),
    ("drop_columns", lambda d: d.drop(columns=["x", "g"])),
    ("drop_axis1", lambda d: d.drop(["s"], axis=1)),
    ("reset_index_rows", lambda d: d[d.a > 2].reset_index(drop=True)),
    ("reset_index_groups", lambda d: d.groupby("g").agg(m=("y", "mean")).reset_index()),
    ("frame_sum", lambda d: d[["a", "x", "y"]].sum()),
    ("frame_mean", lambda d: d.mean(numeric_only=True)),
    ("frame_count", lambda d: d.count()),
    ("frame_max", lambda d: d[["a", "y"]].max()),
    ("frame_min", lambda d: d[["a", "y", "t"]].min()),
    ("frame_std", lambda d: d[["x", "y"]].std()),
    ("frame_var", lambda d: d[["x", "y"]].var()),
    ("frame_median", lambda d: d[["x", "y"]].median()),
    ("frame_prod", lambda d: d[["a"]].prod()),
    ("frame_nunique", lambda d: d.nunique()),
    ("frame_any", lambda d: d[["flag"]].any()),
    ("select_dtypes_number", lambda d: d.select_dtypes("number")),
    ("select_dtypes_exclude", lambda d: d.select_dtypes(exclude=["number"])),
    ("sample", lambda d: d.sample(n=min(4, len(d)), random_state=11)),
    ("sample_frac", lambda d: d.sample(frac=0.5, random_state=5)),
    ("nlargest_frame", lambda d: d.nlargest(3, "y")),
    ("nsmallest_frame", lambda d: d.nsmallest(2, ["a", "y"])),
    ("concat", lambda d: concat_([d[d.a > 3], d[d.a < 2]])),
    ("melt", lambda d: d.melt(id_vars=["g"], value_vars=["x", "y"])),
    (
        "melt_mixed",
        lambda d: d[d.a > 1].melt(id_vars=["a", "flag"], value_vars=["s", "g"], var_name="k", value_name="v"),
    ),
    (
        "melt_then_agg",
        lambda d: d.melt(id_vars=["g"], value_vars=["x", "y"]).groupby("variable").agg(m=("value", "mean")),
    ),
    ("groupby_prod_sem_skew", lambda d: d.groupby("g").agg(p=("a", "prod"), s=("y", "sem"), k=("y", "skew"))),
    ("groupby_any_all", lambda d: d.groupby("g").agg(an=("flag", "any"), al=("flag", "all"))),
    ("groupby_var", lambda d: d.groupby("g")["y"].var()),
    ("groupby_first_last", lambda d: d.groupby("g").agg(f=("y", "first"), la=("x", "last"))),
    ("groupby_first", lambda d: d[["g", "a", "s"]].groupby("g").first()),
    ("groupby_last_sem", lambda d: d[["g", "y"]].groupby("g").last()),
    ("str_len_groupby", lambda d: d.assign(L=d.s.str.len()).groupby("g").agg(m=("L", "mean"))),
    ("groupby_observed", lambda d: d.assign(c=d.g.astype("category")).groupby("c", observed=True).agg(m=("y", "mean"))),
    ("dt_groupby", lambda d: d.assign(m=d.t.dt.month).groupby("m", as_index=False).agg(n=("y", "size"))),
]

SCALARS: list[Case] = [
    ("var", lambda d: d.x.var()),
    ("quantile", lambda d: d.x.quantile(0.25)),
    ("prod", lambda d: d.a.prod()),
    ("sem", lambda d: d.x.sem()),
    ("skew", lambda d: d.y.skew()),
    ("any", lambda d: d.flag.any()),
    ("all", lambda d: (d.a >= 0).all()),
    ("idxmax", lambda d: d.y.idxmax()),
    ("idxmin", lambda d: d.y.idxmin()),
    ("cov", lambda d: d.x.cov(d.y)),
    ("isna_sum", lambda d: d.x.isna().sum()),
    ("cumsum_max", lambda d: d.y.cumsum().max()),
    ("t_min", lambda d: d.t.min()),
]


def cut_(series: Any, bins: list[float], labels: Any) -> Any:
    if isinstance(series, pd.Series):
        return pd.cut(series, bins, labels=labels)
    return cut(series, bins, labels=labels)


def concat_(frames: list[Any]) -> Any:
    if isinstance(frames[0], pd.DataFrame):
        return pd.concat(frames, ignore_index=True)
    return concat(frames, ignore_index=True)


def run(fn: Callable[[Any], Any], df: pd.DataFrame, party: str, policy: DataPolicy = OPEN) -> None:
    world = World({"d": (df, policy, OWNER)})
    sd = world.frame("d", party)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # e.g. cov of one row: pandas warns, and so does the enclave
        try:
            expected = fn(df)
        except (TypeError, ValueError):  # pandas refuses this input (e.g. idxmax of all-NaN)
            with pytest.raises((MalformedFrame, mn.RemoteExecutionError, FrameUsageError)):
                collect(fn(sd))
            return
        secure = fn(sd)
        got = collect(secure)
    if isinstance(secure, SecureArray):
        assert type(got) is type(expected)
        pd.testing.assert_series_equal(pd.Series(got), pd.Series(expected))
    else:
        same(expected, got)
        check_schema(secure, got)
    assert all(e["outcome"] == "released" for e in world.events)


ALL = SERIES + FRAMES + SCALARS + [("unique", lambda d: d.g.unique()), ("unique_num", lambda d: d.x.unique())]


@pytest.mark.parametrize("party", [OWNER, ANALYST])
@pytest.mark.parametrize(("name", "fn"), ALL, ids=[c[0] for c in ALL])
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40))
def test_matches_pandas(name: str, fn: Callable[[Any], Any], party: str, seed: int, n: int) -> None:
    run(fn, rich_frame(seed, n), party)


def test_numpy_literals_in_new_ops() -> None:
    df = rich_frame(1, 30)
    lo, hi = np.float32(-1.0), np.int64(2)
    run(lambda d: d.x.between(lo, hi), df, OWNER)
    run(lambda d: d.x.clip(lo, hi), df, OWNER)
    run(lambda d: d.a.replace(np.int64(1), np.int64(7)), df, OWNER)
    run(lambda d: d.a.where(d.a > np.int8(2), np.int64(0)), df, OWNER)


# -- the threshold mode ---------------------------------------------------------------------------------


@pytest.fixture
def closed() -> World:
    return World({"patients": (patients(), POLICY, OWNER)})


ROW_REVEALING: list[Case] = [
    ("cumsum", lambda d: d.age.cumsum().sum()),
    ("diff", lambda d: d.assign(w=d.weight.diff()).groupby("region").agg(s=("w", "sum"))),
    ("shift", lambda d: d.weight.shift().mean()),
    ("rank", lambda d: d.age.rank().mean()),
    ("ffill", lambda d: d.weight.ffill().mean()),
    ("duplicated", lambda d: d.age.duplicated().sum()),
    ("unique", lambda d: d.region.unique()),
    ("mode", lambda d: d.age.mode()),
    ("idxmax", lambda d: d.income.idxmax()),
    ("idxmin", lambda d: d.income.idxmin()),
]  # fmt: skip


@pytest.mark.parametrize(("name", "fn"), ROW_REVEALING, ids=[c[0] for c in ROW_REVEALING])
def test_row_revealing_ops_are_refused_without_allow_rows(closed: World, name: str, fn: Callable[[Any], Any]) -> None:
    sdf = closed.frame("patients", ANALYST)
    with pytest.raises(PolicyViolation, match="allow_rows=False") as info:
        collect(fn(sdf))
    assert info.value.details.get("rule") == "allow_rows"
    assert closed.events[-1]["outcome"] == "refused"
    owner = closed.frame("patients", OWNER)  # the owner is exempt
    assert collect(fn(owner)) is not None


@pytest.mark.parametrize(
    "fn",
    [
        lambda d: d.age.nlargest(3),
        lambda d: d.loc[d.age > 50],
        lambda d: d.iloc[0:5],
        lambda d: d.sample(5, random_state=1),
        lambda d: d.dropna(subset=["weight"]),
        lambda d: d.query("age > 80"),
        lambda d: concat([d[["age"]], d[["age"]]], ignore_index=True),
        lambda d: d[["age"]].reset_index(drop=True),
        lambda d: d.melt(id_vars=["region"], value_vars=["age"]),
        lambda d: d.weight.isna(),
    ],
)
def test_row_level_results_of_new_ops_are_refused(closed: World, fn: Callable[[Any], Any]) -> None:
    with pytest.raises(PolicyViolation, match="allow_rows"):
        collect(fn(closed.frame("patients", ANALYST)))


@pytest.mark.parametrize(
    "fn",
    [
        lambda d: d[["smoker"]].any(),
        lambda d: d[["age", "weight"]].max(),
        lambda d: d.smoker.any(),
        lambda d: d.groupby("region").agg(a=("smoker", "all")),
        lambda d: d.groupby("region").agg(f=("age", "first")),
    ],
)
def test_record_values_are_refused_in_the_threshold_mode(closed: World, fn: Callable[[Any], Any]) -> None:
    with pytest.raises(PolicyViolation, match=r"one\s+record's exact value"):
        collect(fn(closed.frame("patients", ANALYST)))


def test_aggregates_of_elementwise_ops_are_released_under_the_threshold(closed: World) -> None:
    df = patients()
    sdf = closed.frame("patients", ANALYST)
    assert collect(sdf.region.str.startswith("n").sum()) == df.region.str.startswith("n").sum()
    assert collect(sdf.region.str.len().mean()) == pytest.approx(df.region.str.len().mean())
    got = collect(sdf.assign(b=sdf.age.clip(30, 60)).groupby("region").agg(m=("b", "mean")))
    pd.testing.assert_frame_equal(got, df.assign(b=df.age.clip(30, 60)).groupby("region").agg(m=("b", "mean")))
    pd.testing.assert_series_equal(collect(sdf[["age", "weight"]].mean()), df[["age", "weight"]].mean())
    assert collect(sdf.query("age > 30").weight.mean()) == pytest.approx(df.query("age > 30").weight.mean())
    assert collect(sdf.age.var()) == pytest.approx(df.age.var())
    assert sdf.groupby("region").ngroups == df.groupby("region").ngroups


def test_frame_reduction_suppresses_a_small_column() -> None:
    df = patients(60)
    df["rare"] = np.nan
    df.loc[:2, "rare"] = 1.0  # three values: under min_group_size
    world = World({"p": (df, POLICY, OWNER)})
    got = collect(world.frame("p", ANALYST)[["age", "rare"]].sum())
    assert got["age"] == df.age.sum() and np.isnan(got["rare"])
    strict = DataPolicy(min_group_size=10, hidden_columns=("ssn",), small_group="refuse")
    world = World({"p": (df, strict, OWNER)})
    with pytest.raises(PolicyViolation, match=r"min_group_size|small groups"):
        collect(world.frame("p", ANALYST)[["age", "rare"]].sum())


def test_hidden_columns_stay_hidden_in_new_ops(closed: World) -> None:
    sdf = closed.frame("patients", ANALYST)
    with pytest.raises(PolicyViolation, match="hides"):
        sdf.query("ssn == '100000001'")
    with pytest.raises(FrameUsageError, match="hidden"):
        sdf.dropna()
    with pytest.raises(PolicyViolation, match="hides"):
        sdf.ssn.str.startswith("1000")
    assert "ssn" not in collect(sdf.count()).index  # frame reductions cover the visible columns only


# -- the DP mode ----------------------------------------------------------------------------------------


@pytest.fixture
def dp() -> World:
    policy = DataPolicy(privacy=DP(epsilon=1e9, bounds={"age": (18, 90), "weight": (30, 150)}), hidden_columns=("ssn",))
    return World({"patients": (patients(), policy, OWNER)})


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda d: d.age.cumsum().sum(), "cumsum\\(\\) is not available in DP mode"),
        (lambda d: d.assign(w=d.weight.diff()).groupby("region").agg(s=("w", "sum")), "diff\\(\\) is not available"),
        (lambda d: d.age.rank().mean(), "rank\\(\\) is not available in DP mode"),
        (lambda d: d.age.idxmax(), "idxmax\\(\\) is not available in DP mode"),
        (lambda d: d[["age", "weight"]].mean(), "frame-level reduction"),
        (lambda d: concat([d, d], ignore_index=True).age.mean(), "concat\\(\\) is not available in DP mode"),
        (lambda d: d.age.prod(), "prod is not released in DP mode"),
        (lambda d: d.age.skew(), "skew is not released in DP mode"),
        (lambda d: d.age.nlargest(3), "nlargest"),
        (lambda d: d.age.where(d.age > 40).to_frame(), "row-level results are never released"),
        (lambda d: d.nlargest(50, "age").weight.mean(), "nlargest\\(\\)/nsmallest\\(\\) is not available"),
        (lambda d: d.iloc[0:100].age.sum(), "iloc\\[a:b\\] is not available in DP mode"),
        (lambda d: d.sample(100, random_state=1).age.mean(), "sample\\(\\) is not available in DP mode"),
        (lambda d: d.age.unique(), "unique\\(\\) is not available in DP mode"),
        (lambda d: d.melt(id_vars=["region"], value_vars=["age"]).value.mean(), "melt\\(\\) is not available"),
    ],
)
def test_dp_mode_refuses_what_it_cannot_noise(dp: World, fn: Callable[[Any], Any], match: str) -> None:
    with pytest.raises(PolicyViolation, match=match):
        collect(fn(dp.frame("patients", ANALYST)))
    assert dp.evaluator.privacy_budget("patients", ANALYST)["queries"] == 0  # nothing charged


def test_dp_mode_noises_aggregates_of_elementwise_ops(dp: World) -> None:
    df = patients()
    sdf = dp.frame("patients", ANALYST)
    got = collect(sdf.age.clip(20, 60).mean())
    assert isinstance(got, mn.DPResult) and got.epsilon > 0
    assert abs(got.value - df.age.clip(20, 60).mean()) < 1.0  # epsilon 1e9: the noise is tiny, but it is there
    count = collect(sdf.query("age > 40").age.count())
    assert isinstance(count, mn.DPResult)


# -- clear errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NOT_SUPPORTED))
def test_unsupported_calls_say_why(name: str) -> None:
    sdf = World({"d": (rich_frame(0, 5), OPEN, OWNER)}).frame("d", OWNER)
    with pytest.raises(FrameNotSupported) as info:
        getattr(sdf, name)
    assert len(str(info.value)) > 30
    assert isinstance(info.value, AttributeError)  # hasattr() still works


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda d: d.g.map(str.upper), "%%mesatee"),
        (lambda d: d.s.str.contains("a.*b"), "regular expression"),
        (lambda d: d.query("__import__('os')"), "not supported"),
        (lambda d: d.query("nope > 1"), "no column"),
        (lambda d: concat([d, d]), "ignore_index=True"),
        (lambda d: cut(d.y, 3), "explicit bin edges"),
        (lambda d: d.iloc[3], "single rows"),
        (lambda d: d.reset_index(), "drop=True"),
        (lambda d: d.drop(index=[1]), "single out"),
        (lambda d: d.a.add(d.y, fill_value=0), "not supported"),
        (lambda d: d.iloc[:, 99], "does not name columns"),
        (lambda d: d.groupby("g", observed=False), "observed=True"),
        (lambda d: d.loc[:, "zz":"x"], "does not name columns"),
    ],
)
def test_usage_errors_are_clear(fn: Callable[[Any], Any], match: str) -> None:
    sdf = World({"d": (rich_frame(0, 5), OPEN, OWNER)}).frame("d", OWNER)
    with pytest.raises(FrameUsageError, match=match):
        fn(sdf)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda d: d.g.str.lower(), None),
        (lambda d: d.a.str.lower(), "needs a string series"),
        (lambda d: d.a.dt.year, "needs a datetime series"),
        (lambda d: d.t.dt.floor("1 week"), "fixed frequency"),
        (lambda d: d.g.cumsum(), "needs a numeric series"),
        (lambda d: d.groupby("g").agg(m=("y", "mean")).m.cumsum(), "of an aggregate"),
        (lambda d: d.groupby("g").agg(m=("y", "mean")).m.mode(), "of an aggregate"),
    ],
)
def test_type_errors_surface_when_the_expression_is_built(fn: Callable[[Any], Any], match: str | None) -> None:
    sdf = World({"d": (rich_frame(0, 5), OPEN, OWNER)}).frame("d", OWNER)
    if match is None:
        assert isinstance(fn(sdf).schema.columns[0][1], str)
        return
    with pytest.raises(MalformedFrame, match=match):
        fn(sdf)


def test_shape_size_empty_are_policy_checked_counts(closed: World) -> None:
    df = patients()
    sdf = closed.frame("patients", ANALYST)
    assert sdf.shape == df.shape and sdf.size == df.size and sdf.empty is False
    assert sdf.age.shape == df.age.shape and sdf.age.size == df.age.size
    with pytest.raises(PolicyViolation, match="fewer than 10 rows"):
        _ = sdf[sdf.age > 200].empty
    assert isinstance(sdf, SecureDataFrame)
