"""enable_categorical=True in the engine (in process): against native xgboost on the same DataFrame (issue 16).

The reference is what a user of native xgboost writes: ``xgb.train(params, xgb.DMatrix(df, enable_categorical=True))``
and ``booster.inplace_predict(df)``. Compiled trees are checked against xgboost on the same rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from mesatee_notebook.ml import gbdt
from mesatee_notebook.ml._errors import FeatureMismatch, NonNumericFeatures
from mesatee_notebook.ml.treecompile import TreePredictor, probe_rows

CATS = [f"k{i:02d}" for i in range(24)]
FEATURES = ["a", "b", "c", "d", "e"]


def cat_frame(rows: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Two numbers, a 24-level category (not in sorted order, 10% missing), a 3-level one, integer categories."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "a": rng.normal(size=rows),
            "b": rng.normal(size=rows).astype(np.float32),
            "c": pd.Categorical(rng.choice(CATS, size=rows), categories=CATS[::-1]),
            "d": pd.Categorical(rng.choice(["u", "v", "w"], size=rows)),
            "e": pd.Categorical(rng.integers(10, 15, size=rows)),
        }
    )
    df.loc[rng.random(rows) < 0.1, "c"] = np.nan
    effect = pd.Series(rng.normal(size=len(CATS)), index=CATS)
    signal = df.a + df.c.astype(object).map(effect).astype(float).fillna(2.0) + (df.d == "u") + 0.3 * df.e.astype(int)
    df["t"] = signal + rng.normal(scale=0.1, size=rows)
    df["y"] = (signal > 4.0).astype(int)
    df["k"] = np.digitize(signal, [3.0, 4.0, 5.0])
    return df


PARAMS: dict[str, dict[str, Any]] = {
    "y": {"objective": "binary:logistic", "max_depth": 4, "seed": 3, "max_cat_to_onehot": 1},
    "k": {"objective": "multi:softprob", "num_class": 4, "max_depth": 3, "seed": 3, "max_bin": 64},
    "t": {"objective": "reg:squarederror", "seed": 3, "max_cat_to_onehot": 8, "max_cat_threshold": 16},
}


def native(df: pd.DataFrame, label: str, params: dict[str, Any], rounds: int) -> xgb.Booster:
    d = xgb.DMatrix(df[FEATURES], label=df[label], enable_categorical=True)
    return xgb.train({"tree_method": "hist", **params}, d, num_boost_round=rounds)


def model_doc(raw: bytes) -> dict[str, Any]:
    """The model JSON without the label name this engine records as an attribute."""
    doc = json.loads(raw)
    doc["learner"]["attributes"].pop("mesatee_label", None)
    return doc


@pytest.mark.parametrize("label", ["y", "k", "t"])
def test_training_json_and_predictions_equal_native(label: str) -> None:
    df = cat_frame()
    model = gbdt.train(df[[*FEATURES, label]], label, params=PARAMS[label], num_boost_round=15, enable_categorical=True)
    ref = native(df, label, PARAMS[label], 15)
    assert model_doc(model.to_json()) == model_doc(bytes(ref.save_raw("json")))
    assert model.feature_types == ("float", "float", "c", "c", "c") and model.categorical
    assert model.categories["c"] == CATS[::-1] and model.categories["e"] == [10, 11, 12, 13, 14]
    np.testing.assert_array_equal(model.predict(df[FEATURES]), ref.inplace_predict(df[FEATURES]))
    np.testing.assert_array_equal(
        model.predict(df[FEATURES], margin=True), ref.inplace_predict(df[FEATURES], predict_type="margin")
    )
    # the same key in params, as the job runner and the estimators send it
    again = gbdt.train(
        df[[*FEATURES, label]], label, params={**PARAMS[label], "enable_categorical": True}, num_boost_round=15
    )
    assert again.digest == model.digest


def test_one_hot_and_partition_splits_are_both_native() -> None:
    df = cat_frame()
    digests = set()
    for onehot in (1, 64):
        params = {**PARAMS["t"], "max_cat_to_onehot": onehot}
        model = gbdt.train(df[[*FEATURES, "t"]], "t", params=params, num_boost_round=8, enable_categorical=True)
        assert model_doc(model.to_json()) == model_doc(bytes(native(df, "t", params, 8).save_raw("json")))
        digests.add(model.digest)
    assert len(digests) == 2  # the parameter reached xgboost


def test_predict_encodes_by_the_training_categories() -> None:
    df = cat_frame()
    model = gbdt.train(df[[*FEATURES, "y"]], "y", params=PARAMS["y"], num_boost_round=15, enable_categorical=True)
    want = model.predict(df[FEATURES])
    other = df[FEATURES].copy()
    other["c"] = other.c.cat.reorder_categories(sorted(CATS))  # another order: other codes, same values
    other["d"] = other.d.cat.add_categories(["never"])  # an extra category no row holds
    assert not np.array_equal(other.c.cat.codes, df.c.cat.codes)
    np.testing.assert_array_equal(model.predict(other), want)
    sub = df[FEATURES].iloc[:40].copy()
    sub["c"] = sub.c.astype(object).astype("category")  # only the categories these rows hold
    np.testing.assert_array_equal(model.predict(sub), want[:40])
    np.testing.assert_array_equal(model.predict(sub[["e", "a", "d", "c", "b"]]), want[:40])  # columns by name


@pytest.mark.parametrize("unseen", ["aa", "k055", "zz"])  # before, between and after the training categories
def test_unseen_categories_are_refused(unseen: str) -> None:
    df = cat_frame()
    model = gbdt.train(df[[*FEATURES, "y"]], "y", params=PARAMS["y"], num_boost_round=5, enable_categorical=True)
    rows = df[FEATURES].iloc[:3].copy()
    rows["c"] = pd.Categorical(["k01", unseen, None])
    with pytest.raises(FeatureMismatch, match=rf"column 'c' holds category '{unseen}' not seen in training"):
        model.predict(rows)
    rows["c"] = pd.Categorical(["k01", None, None])  # missing is fine: it takes the default branch
    assert model.predict(rows).shape == (3,)


def test_native_xgboost_silently_miscodes_some_unseen_categories() -> None:
    """Why the engine refuses every unseen category rather than defer to xgboost 3.2's own re-coder."""
    df = cat_frame()
    ref = native(df, "t", PARAMS["t"], 10)
    rows = df[FEATURES].iloc[:1].copy()
    rows["c"] = pd.Categorical(["zz"])
    with pytest.raises(xgb.core.XGBoostError, match="not in the training set"):
        ref.inplace_predict(rows)
    rows["c"] = pd.Categorical(["aa"])  # sorts before every training category: no error from xgboost 3.2
    try:
        ref.inplace_predict(rows)
    except xgb.core.XGBoostError:  # a later xgboost that refuses it too: the engine agrees with it
        return


def test_wrong_dtypes_are_typed_errors() -> None:
    df = cat_frame()
    with pytest.raises(NonNumericFeatures, match="enable_categorical=True"):
        gbdt.train(df[[*FEATURES, "y"]], "y", params=PARAMS["y"], num_boost_round=2)
    strings = df[[*FEATURES, "y"]].assign(d=df.d.astype(str))
    with pytest.raises(NonNumericFeatures, match=r"numeric or pandas 'category'.*'d'"):
        gbdt.train(strings, "y", params=PARAMS["y"], num_boost_round=2, enable_categorical=True)
    model = gbdt.train(df[[*FEATURES, "y"]], "y", params=PARAMS["y"], num_boost_round=2, enable_categorical=True)
    with pytest.raises(FeatureMismatch, match=r"column 'd' was categorical at training"):
        model.predict(df[FEATURES].assign(d=df.d.cat.codes))
    numeric = gbdt.train(df[["a", "b", "y"]], "y", params=PARAMS["y"], num_boost_round=2)
    assert not numeric.categorical and numeric.categories == {}


def test_eval_sets_and_continuation_with_other_category_orders() -> None:
    df = cat_frame()
    train, valid = df.iloc[:1500], df.iloc[1500:].copy()
    valid["c"] = valid.c.cat.reorder_categories(sorted(CATS))
    model = gbdt.train(
        train[[*FEATURES, "y"]],
        "y",
        params=PARAMS["y"],
        num_boost_round=6,
        evals={"valid": valid[[*FEATURES, "y"]]},
        enable_categorical=True,
    )
    log: dict[str, Any] = {}
    ref_valid = xgb.DMatrix(df.iloc[1500:][FEATURES], label=df.iloc[1500:]["y"], enable_categorical=True)
    xgb.train(
        {"tree_method": "hist", **PARAMS["y"]},
        xgb.DMatrix(train[FEATURES], label=train["y"], enable_categorical=True),
        6,
        evals=[(ref_valid, "valid")],
        evals_result=log,
    )
    assert model.history["valid"]["logloss"] == log["valid"]["logloss"]
    more = gbdt.train(
        valid[[*FEATURES, "y"]], "y", params=PARAMS["y"], num_boost_round=2, init_model=model, enable_categorical=True
    )
    # Continued training compares with a QuantileDMatrix: a plain DMatrix sketches its cuts weighted by the
    # hessians of the model being continued, so it differs from the QuantileDMatrix (numeric features too).
    ref = xgb.train(
        {"tree_method": "hist", **PARAMS["y"]},
        xgb.QuantileDMatrix(df.iloc[1500:][FEATURES], label=df.iloc[1500:]["y"], enable_categorical=True),
        2,
        xgb_model=native(train, "y", PARAMS["y"], 6),
    )
    np.testing.assert_array_equal(more.predict(df[FEATURES]), ref.inplace_predict(df[FEATURES]))


def test_codes_with_feature_types_as_in_xgboost() -> None:
    df = cat_frame()
    X = np.column_stack([df.a, df.b, df.c.cat.codes.replace(-1, np.nan), df.d.cat.codes, df.e.cat.codes]).astype(
        np.float32
    )
    types = ["q", "q", "c", "c", "c"]
    model = gbdt.train(
        X, df.y.to_numpy(), params=PARAMS["y"], num_boost_round=8, enable_categorical=True, feature_types=types
    )
    ref = xgb.train(
        {"tree_method": "hist", **PARAMS["y"]},
        xgb.DMatrix(X, label=df.y, feature_types=types, enable_categorical=True),
        8,
    )
    np.testing.assert_array_equal(model.predict(X), ref.inplace_predict(X))
    assert model.categorical and model.categories == {}  # codes: nothing recorded


def test_compiled_trees_match_xgboost_on_categorical_splits(tmp_path: Path) -> None:
    df = cat_frame()
    for label in ("k",):  # multiclass: several outputs per row
        model = gbdt.train(
            df[[*FEATURES, label]], label, params=PARAMS[label], num_boost_round=12, enable_categorical=True
        )
        predictor = TreePredictor(model, tmp_path, crossover_rows=10**9)  # the parity check ran on compile
        probes = probe_rows(model, rows=256, seed=1)
        cats = probes[:, 2]
        assert np.isnan(cats).any() and (cats < 0).any() and (cats >= len(CATS)).any()  # invalid codes probed
        np.testing.assert_allclose(
            predictor.compiled.predict_matrix(probes, margin=True), model.predict(probes, margin=True), atol=1e-5
        )
        other = df[FEATURES].copy()
        other["c"] = other.c.cat.reorder_categories(sorted(CATS))
        ref = native(df, label, PARAMS[label], 12).inplace_predict(other)
        np.testing.assert_allclose(predictor.predict(other), ref, rtol=1e-5, atol=1e-6)  # float order: 1 ulp
        np.testing.assert_allclose(predictor.predict(other.iloc[:5]), ref[:5], rtol=1e-5, atol=1e-6)  # direct path
