"""Regression tests for the bugs the random-query oracle found (issue 16: B4, B5, B6, B8).

B4, B6 and B8 are about values crossing the wire, so they run against a real kernel over TLS;
B5 is about the client's literals and also runs in process. Each result must equal pandas.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import numpy as np
import pandas as pd
import pytest
from _frames_support import OWNER, World

import mesatee_notebook as mn
from mesatee_notebook.wire.codecs import decode_value, encode_value
from mesatee_notebook.wire.datapolicy import DataPolicy
from tests.conftest import KernelProc

OPEN = DataPolicy(min_group_size=0, allow_rows=True, differencing_guard=False)


def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "i": np.array([1, 2, 3, 4], dtype=np.int64),
            "f": [1.5, np.nan, 2.5, 4.0],
            "b": [True, False, True, False],
            "t": pd.to_datetime(["2020-01-03", "2021-06-01", "2019-12-31", "2022-02-02"]),
        }
    )


@pytest.fixture(scope="module")
def owner(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[mn.Session]:
    root = tmp_path_factory.mktemp("oracle")
    s = mn.connect(kernel.url, policy=cast("mn.Policy", kernel.policy()), identity=root / "owner")
    s.upload(frame(), "ob_frame", policy=OPEN)
    s.upload(frame().iloc[:0], "ob_empty", policy=OPEN)
    cat = pd.DataFrame({"c": pd.Categorical([], categories=["lo", "mid", "hi"]), "v": pd.Series([], dtype="int64")})
    s.upload(cat, "ob_cat0", policy=OPEN)
    right = pd.DataFrame({"i": np.array([3, 4, 5], dtype=np.int64), "w": [0.5, 1.5, 2.5]})
    s.upload(right, "ob_right", policy=OPEN)
    yield s
    s.close()


def test_b4_datetime_min_max_cross_the_wire(owner: mn.Session) -> None:
    df = frame()
    sdf = owner.dataframe("ob_frame")
    assert sdf.t.min().collect() == df.t.min()
    assert sdf.t.max().collect() == df.t.max()
    got = sdf.t.min().collect()
    assert isinstance(got, pd.Timestamp)
    empty = owner.dataframe("ob_empty").t.min().collect()
    assert empty is pd.NaT


def test_b4_codec_round_trips_timestamps_nat_and_timedeltas() -> None:
    for value in (pd.Timestamp("2020-01-01 10:00"), pd.Timestamp("2020-01-01", tz="UTC"), pd.Timedelta("36h")):
        enc = encode_value(value)
        assert decode_value(enc.kind, b"".join(bytes(p) for p in enc.parts)) == value
    enc = encode_value(pd.NaT)
    assert decode_value(enc.kind, b"".join(bytes(p) for p in enc.parts)) is pd.NaT


@pytest.mark.parametrize("literal", [np.int64(1), np.int32(2), np.float32(1.5), np.float64(2.0)])
def test_b5_numpy_scalar_literals_in_process(literal: object) -> None:
    df = frame()
    sdf = World({"d": (df, OPEN, OWNER)}).frame("d", OWNER)
    pd.testing.assert_frame_equal(sdf[sdf.i > literal].collect(), df[df.i > literal])
    pd.testing.assert_frame_equal(sdf.assign(z=sdf.f * literal).collect(), df.assign(z=df.f * literal))
    pd.testing.assert_series_equal(sdf.f.fillna(literal).collect(), df.f.fillna(literal))
    pd.testing.assert_frame_equal(sdf[sdf.i.isin([literal])].collect(), df[df.i.isin([literal])])


def test_b5_numpy_bool_and_datetime_literals(owner: mn.Session) -> None:
    df = frame()
    sdf = owner.dataframe("ob_frame")
    pd.testing.assert_frame_equal(sdf[sdf.b == np.bool_(True)].collect(), df[df.b == np.bool_(True)])
    pd.testing.assert_frame_equal(sdf.assign(k=np.bool_(False)).collect(), df.assign(k=np.bool_(False)))
    cut = np.datetime64("2020-06-01")
    pd.testing.assert_frame_equal(sdf[sdf.t > cut].collect(), df[df.t > cut])
    pd.testing.assert_frame_equal(sdf[sdf.i > np.int64(1)].collect(), df[df.i > np.int64(1)])


def test_b6_empty_categorical_keeps_its_categories(owner: mn.Session) -> None:
    expected = pd.DataFrame({"c": pd.Categorical([], categories=["lo", "mid", "hi"])}).c.value_counts()
    sdf = owner.dataframe("ob_cat0")
    got = sdf.c.value_counts().collect()
    pd.testing.assert_series_equal(got, expected, check_index_type=False)
    assert list(got.index) == ["lo", "mid", "hi"] and list(got) == [0, 0, 0]


@pytest.mark.parametrize("how", ["right", "outer"])
def test_b8_bool_after_right_or_outer_merge_holds_nan(owner: mn.Session, how: str) -> None:
    df = frame()
    right = pd.DataFrame({"i": np.array([3, 4, 5], dtype=np.int64), "w": [0.5, 1.5, 2.5]})
    expected = df.merge(right, on="i", how=how)
    got = owner.dataframe("ob_frame").merge(owner.dataframe("ob_right"), on="i", how=how).collect()
    pd.testing.assert_frame_equal(got, expected)
    assert got.b.dtype == object and any(isinstance(v, float) and np.isnan(v) for v in got.b)


def test_new_calls_cross_the_wire_equal_to_pandas(owner: mn.Session) -> None:
    """The issue 16 calls through a real kernel: the values survive Arrow/msgpack exactly as pandas has them."""
    df = frame()
    sdf = owner.dataframe("ob_frame")
    pd.testing.assert_series_equal(sdf.t.dt.date.collect(), df.t.dt.date)
    pd.testing.assert_series_equal(sdf.t.dt.year.collect(), df.t.dt.year)
    pd.testing.assert_series_equal(sdf.f.isna().collect(), df.f.isna())
    pd.testing.assert_series_equal(sdf[["i", "f"]].sum().collect(), df[["i", "f"]].sum())
    pd.testing.assert_series_equal(sdf.b.mode().collect(), df.b.mode())
    pd.testing.assert_series_equal(sdf.f.cumsum().collect(), df.f.cumsum())
    got = mn.cut(sdf.f, [0, 2, 5], labels=["lo", "hi"]).collect()
    pd.testing.assert_series_equal(got, pd.cut(df.f, [0, 2, 5], labels=["lo", "hi"]))
    np.testing.assert_array_equal(sdf.i.unique().collect(), df.i.unique())
    assert sdf.f.idxmax().collect() == df.f.idxmax()
    pd.testing.assert_frame_equal(sdf.query("i > 1 and b").collect(), df.query("i > 1 and b"))
    both = mn.concat([sdf, sdf], ignore_index=True).collect()
    pd.testing.assert_frame_equal(both, pd.concat([df, df], ignore_index=True))
