"""One-row prediction from a DataFrame (issue 15 P4): the short paths give what the general ones give, every check kept.

A frame of one numpy dtype skips the per-column dtype walk (one block: every column numeric) and the small-frame
codec remembers its layout; names, order, the label column, non-numeric and categorical columns are still checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

import mesatee_notebook as mn
from mesatee_notebook.ml import gbdt
from mesatee_notebook.ml._errors import FeatureMismatch, NonNumericFeatures
from tests.conftest import KernelProc

FEATURES = [f"x{i}" for i in range(6)]
PARAMS = {"objective": "binary:logistic", "max_depth": 3, "seed": 1}


def _frame(rows: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(rows, 6)), columns=FEATURES)
    df["y"] = (df.x0 + df.x1 > 0).astype(int)
    return df


@pytest.fixture(scope="module")
def model() -> gbdt.GBDTModel:
    return gbdt.train(_frame(), "y", params=PARAMS, num_boost_round=8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int8, np.uint16, np.bool_])
def test_one_dtype_rows_predict_like_arrays_and_xgboost(model: gbdt.GBDTModel, dtype: type) -> None:
    rows = (_frame(seed=4)[FEATURES].abs() * 3).astype(dtype)
    assert len(set(rows.dtypes)) == 1
    X = rows.to_numpy(dtype=np.float32)
    direct = model.booster.inplace_predict(X)
    for i in range(3):
        one = rows.iloc[i : i + 1]
        np.testing.assert_array_equal(model.predict(one), model.predict(X[i : i + 1]))
        np.testing.assert_allclose(model.predict(one), direct[i : i + 1], rtol=1e-6)
    np.testing.assert_array_equal(model.predict(rows), model.predict(X))


def test_names_order_and_label_still_checked(model: gbdt.GBDTModel) -> None:
    rows = _frame(seed=5)
    want = model.predict(rows[FEATURES].to_numpy(dtype=np.float32))
    np.testing.assert_array_equal(model.predict(rows[[*reversed(FEATURES), "y"]].astype(np.float64)), want)
    with pytest.raises(FeatureMismatch, match="missing: x5"):
        model.predict(rows[FEATURES[:5]])
    with pytest.raises(FeatureMismatch, match="not in the model: extra"):
        model.predict(rows[FEATURES].assign(extra=1.0))
    renamed = rows[FEATURES].set_axis([*FEATURES[:5], "X5"], axis=1)
    with pytest.raises(FeatureMismatch, match=r"missing: x5; not in the model: X5"):
        model.predict(renamed.iloc[:1])
    assert model.feature_names == tuple(FEATURES) == tuple(model.booster.feature_names or ())


@pytest.mark.parametrize(
    "bad",
    [
        pd.DataFrame({c: ["a"] for c in FEATURES}),  # one string dtype
        pd.DataFrame({c: np.array(["a"], dtype=object) for c in FEATURES}),  # one numpy object block
        pd.DataFrame({c: np.array([1 + 2j]) for c in FEATURES}),  # one complex block
        pd.DataFrame({c: pd.array([1.0], dtype="Float64") for c in FEATURES}).astype({"x3": "str"}),
    ],
)
def test_non_numeric_one_dtype_frames_are_refused(model: gbdt.GBDTModel, bad: pd.DataFrame) -> None:
    with pytest.raises(NonNumericFeatures) as info:
        model.predict(bad)
    assert info.value.details["columns"]


def test_categorical_rows_still_encoded_by_training_categories() -> None:
    rng = np.random.default_rng(2)
    df = pd.DataFrame({"a": rng.normal(size=400), "c": pd.Categorical(rng.choice(["u", "v", "w"], size=400))})
    df["y"] = ((df.c == "u") | (df.a > 1)).astype(int)
    cat = gbdt.train(df, "y", params={**PARAMS, "max_cat_to_onehot": 1}, num_boost_round=6, enable_categorical=True)
    native = xgb.DMatrix(df[["a", "c"]], enable_categorical=True)
    want = cat.booster.predict(native)
    one = df[["a", "c"]].iloc[:1].copy()
    one["c"] = pd.Categorical(one.c.astype(str), categories=["w", "u", "v"])  # other codes, same value
    np.testing.assert_allclose(cat.predict(one), want[:1], rtol=1e-6)
    one["c"] = pd.Categorical(["never"])
    with pytest.raises(FeatureMismatch, match="not seen in training"):
        cat.predict(one)


def test_one_row_frames_through_the_kernel(kernel: KernelProc, tmp_path: Path) -> None:
    """Repeated 1-row DataFrame predictions (general, then remembered layouts on both sides) equal local ones."""
    policy = cast("mn.Policy", kernel.policy())
    with mn.connect(kernel.url, policy=policy, identity=tmp_path / "p") as s:
        data = _frame().astype({c: np.float32 for c in FEATURES})
        remote = s.gbdt.train(data, "y", params=PARAMS, num_boost_round=8, progress=False)
        local = gbdt.train(data, "y", params=PARAMS, num_boost_round=8)
        rows = _frame(seed=9)[FEATURES].astype(np.float32)
        for i in range(4):
            got = remote.predict(rows.iloc[i : i + 1])
            np.testing.assert_allclose(got, local.predict(rows.iloc[i : i + 1]), rtol=1e-5, atol=1e-6)
        with pytest.raises(FeatureMismatch):
            remote.predict(rows.iloc[:1].rename(columns={"x0": "z0"}))
        np.testing.assert_allclose(remote.predict(rows.iloc[4:5]), local.predict(rows.iloc[4:5]), rtol=1e-5, atol=1e-6)
