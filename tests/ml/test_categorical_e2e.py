"""enable_categorical=True end to end (issue 16): a real kernel over attested TLS, against native xgboost.

Inline training and training on an uploaded dataset by name, export, both prediction engines (the receipt's
``engine``), category order and unseen categories, the upload of category columns (empty frames too), and the
scikit-learn estimators (fit, predict, predict_proba, clone, pickle).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import joblib
import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

import mesatee_notebook as mn
from mesatee_notebook.ml._errors import FeatureMismatch
from mesatee_notebook.remote.estimators import SecureXGBClassifier, SecureXGBRegressor
from tests.conftest import KernelProc
from tests.ml.test_gbdt_categorical import CATS, FEATURES, cat_frame, model_doc, native

PARAMS = {"objective": "binary:logistic", "max_depth": 4, "seed": 3, "max_cat_to_onehot": 1, "tree_method": "hist"}


class Parties:
    def __init__(self, kernel: KernelProc, root: Path) -> None:
        policy = cast("mn.Policy", kernel.policy())
        self.owner = mn.connect(kernel.url, policy=policy, identity=root / "owner")
        self.coder = mn.connect(kernel.url, policy=policy, identity=root / "coder")
        self.df = cat_frame(1500)
        assert self.coder.party_id is not None
        pol = mn.DataPolicy(code_access=(self.coder.party_id,))
        self.owner.upload(self.df[[*FEATURES, "y", "t"]], "cat_e2e", policy=pol)
        self.owner.upload(self.df[[*FEATURES, "y"]].iloc[:0], "cat_e2e_empty", policy=pol)

    def close(self) -> None:
        self.owner.close()
        self.coder.close()


@pytest.fixture(scope="module")
def parties(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parties]:
    p = Parties(kernel, tmp_path_factory.mktemp("cat_parties"))
    yield p
    p.close()


def test_upload_keeps_category_columns_and_the_schema_says_so(parties: Parties) -> None:
    described = {d["name"]: d for d in parties.coder.datasets()}
    for name in ("cat_e2e", "cat_e2e_empty"):
        columns = dict(map(tuple, described[name]["columns"]))
        assert columns["c"] == columns["d"] == columns["e"] == "category", columns
    empty = parties.owner.dataframe("cat_e2e_empty")
    assert str(empty.dtypes["c"]) == "category"
    counts = empty.c.value_counts().collect()  # the categories arrived with no rows (B6)
    assert sorted(counts.index) == sorted(CATS) and counts.sum() == 0


def test_inline_and_by_name_training_equal_native(parties: Parties) -> None:
    s, df = parties.owner, parties.df
    ref = native(df, "y", PARAMS, 12)
    inline = s.gbdt.train(
        df[[*FEATURES, "y"]], "y", params={**PARAMS, "enable_categorical": True}, num_boost_round=12, progress=False
    )
    assert inline.info["feature_types"] == ["float", "float", "c", "c", "c"]
    assert model_doc(inline.export()) == model_doc(bytes(ref.save_raw("json")))
    by_name = parties.coder.gbdt.train(
        parties.coder.dataframe("cat_e2e")[[*FEATURES, "y"]],
        "y",
        params=PARAMS,
        num_boost_round=12,
        enable_categorical=True,
        progress=False,
    )
    assert by_name.info["digest"] == inline.info["digest"]  # the same model from the stored dataset

    want = ref.inplace_predict(df[FEATURES])
    np.testing.assert_array_equal(inline.predict(df[FEATURES], engine="xgboost"), want)
    assert inline.last_engine == "xgboost"
    got = inline.predict(df[FEATURES], engine="compiled")
    assert inline.last_engine == "compiled"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # compiled float sums: within an ulp or so
    small = inline.predict(df[FEATURES].iloc[:3])
    assert inline.last_engine == "compiled"
    np.testing.assert_allclose(small, want[:3], rtol=1e-5, atol=1e-6)

    reordered = df[FEATURES].copy()
    reordered["c"] = reordered.c.cat.reorder_categories(sorted(CATS))
    np.testing.assert_array_equal(inline.predict(reordered, engine="xgboost"), want)
    np.testing.assert_allclose(inline.predict(reordered.iloc[:3]), want[:3], rtol=1e-5, atol=1e-6)
    by_name_pred = by_name.predict("cat_e2e", remote=False, engine="xgboost")  # coder has code access
    np.testing.assert_array_equal(np.asarray(by_name_pred), want)

    unseen = df[FEATURES].iloc[:2].copy()
    unseen["c"] = pd.Categorical(["k01", "not-a-category"])
    for engine in ("xgboost", "compiled"):
        with pytest.raises(FeatureMismatch, match="'not-a-category' not seen in training"):
            inline.predict(unseen, engine=engine)
    assert s.ping() is not None  # the session goes on


def _xgb_params() -> dict[str, Any]:
    return {"n_estimators": 8, "max_depth": 4, "random_state": 0, "max_cat_to_onehot": 1, "tree_method": "hist"}


def test_estimators_fit_predict_clone_and_pickle(parties: Parties, tmp_path: Path) -> None:
    from sklearn.base import clone

    df = parties.df
    X, y = df[FEATURES], df.y.map({0: "no", 1: "yes"})
    clf = SecureXGBClassifier(parties.owner, enable_categorical=True, **_xgb_params()).fit(X, y)
    ref = xgb.XGBClassifier(enable_categorical=True, **_xgb_params()).fit(X, df.y)
    proba, want = clf.predict_proba(X), ref.predict_proba(X)
    np.testing.assert_array_equal(proba[:, 1], want[:, 1])  # the model's output: exactly xgboost's
    np.testing.assert_allclose(proba, want, rtol=0, atol=1e-7)  # 1 - p: float64 here, float32 in xgboost
    assert list(clf.feature_names_in_) == FEATURES and clf.n_features_in_ == 5
    assert (clf.predict(X) == np.where(ref.predict(X) == 1, "yes", "no")).all()
    assert clf.__sklearn_tags__().input_tags.categorical
    booster = clf.get_booster()  # trained on the caller's own data: released
    assert json.loads(bytes(booster.save_raw("json")))["learner"]["feature_types"] == ["float", "float", "c", "c", "c"]
    np.testing.assert_array_equal(booster.inplace_predict(X), ref.get_booster().inplace_predict(X))

    again = clone(clf).fit(X, y)
    np.testing.assert_array_equal(again.predict_proba(X), clf.predict_proba(X))
    joblib.dump(clf, tmp_path / "clf.joblib")  # how users save an estimator (pickle underneath)
    back = joblib.load(tmp_path / "clf.joblib")
    np.testing.assert_array_equal(back.predict_proba(X.iloc[:50]), clf.predict_proba(X.iloc[:50]))
    back.session._session.close()
    with pytest.raises(ValueError, match="predict on a DataFrame"):
        clf.predict_proba(X.to_numpy())

    reg = SecureXGBRegressor(parties.owner, enable_categorical=True, **_xgb_params()).fit(
        X, df.t, eval_set=[(X.iloc[:300], df.t.iloc[:300])]
    )
    rref = xgb.XGBRegressor(enable_categorical=True, **_xgb_params()).fit(
        X, df.t, eval_set=[(X.iloc[:300], df.t.iloc[:300])], verbose=False
    )
    np.testing.assert_array_equal(reg.predict(X), rref.predict(X).astype(np.float64))
    np.testing.assert_allclose(reg.evals_result()["validation_0"]["rmse"], rref.evals_result()["validation_0"]["rmse"])

    remote = SecureXGBRegressor(parties.coder, enable_categorical=True, **_xgb_params()).fit(
        parties.coder.dataframe("cat_e2e")[[*FEATURES, "t"]], "t"
    )
    np.testing.assert_array_equal(remote.booster_handle.predict(X, engine="xgboost"), rref.predict(X))
