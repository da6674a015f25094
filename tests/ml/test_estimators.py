"""scikit-learn estimators against native xgboost on a real kernel (issue 16: B2, B3, the missing API, pickling).

Every fit runs in the enclave kernel over attested TLS; the reference is ``xgboost.XGBClassifier`` /
``XGBRegressor`` run locally with the same parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import joblib
import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

import mesatee_notebook as mn
from mesatee_notebook.errors import PolicyViolation
from mesatee_notebook.remote.estimators import SecureXGBClassifier, SecureXGBRegressor
from tests.conftest import KernelProc

FEATURES = [f"x{i}" for i in range(5)]


def data(rows: int = 600, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(rows, 5)), columns=FEATURES)
    df["k"] = np.digitize(df.x0 + 0.5 * df.x1, [-0.7, 0.0, 0.7])  # 4 classes, 0..3
    df["b"] = (df.x0 - df.x2 > 0).astype(int)
    df["w"] = rng.uniform(0.2, 2.0, size=rows)
    df["t"] = 2 * df.x0 - df.x1**2 + rng.normal(scale=0.1, size=rows)
    return df


class Parties:
    def __init__(self, kernel: KernelProc, root: Path) -> None:
        policy = cast("mn.Policy", kernel.policy())
        self.root = root
        self.owner = mn.connect(kernel.url, policy=policy, identity=root / "owner")
        self.coder = mn.connect(kernel.url, policy=policy, identity=root / "coder")
        self.df = data()
        assert self.coder.party_id is not None
        self.owner.upload(self.df, "est_data", policy=mn.DataPolicy(code_access=(self.coder.party_id,)))

    def close(self) -> None:
        self.owner.close()
        self.coder.close()


@pytest.fixture(scope="module")
def parties(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parties]:
    p = Parties(kernel, tmp_path_factory.mktemp("est_parties"))
    yield p
    p.close()


@pytest.mark.slow
def test_remote_multiclass_trains_softprob_and_matches_xgboost(parties: Parties) -> None:  # B2
    df = parties.df
    sdf = parties.owner.dataframe("est_data")
    clf = SecureXGBClassifier(parties.owner, n_estimators=8, max_depth=3).fit(sdf[[*FEATURES, "k"]], "k")
    assert clf.model_.info["objective"] == "multi:softprob"
    assert clf.n_classes_ == 4 and list(clf.classes_) == [0, 1, 2, 3]
    X = df[FEATURES].to_numpy()
    ref = xgb.XGBClassifier(n_estimators=8, max_depth=3, learning_rate=0.3, random_state=0).fit(X, df.k)
    np.testing.assert_allclose(clf.predict_proba(df[FEATURES][:50]), ref.predict_proba(X[:50]), atol=1e-6)
    cols = sdf[[*FEATURES, "k"]]
    stopped = SecureXGBClassifier(parties.owner, n_estimators=30, early_stopping_rounds=2).fit(
        cols, "k", eval_set=[(cols, "k")]
    )
    ref_es = xgb.XGBClassifier(n_estimators=30, early_stopping_rounds=2, random_state=0)
    ref_es.fit(X, df.k, eval_set=[(X, df.k)], verbose=False)
    assert stopped.best_iteration == ref_es.best_iteration
    np.testing.assert_allclose(
        stopped.evals_result()["validation_0"]["mlogloss"], ref_es.evals_result()["validation_0"]["mlogloss"], rtol=1e-5
    )
    binary = SecureXGBClassifier(parties.owner, n_estimators=4).fit(sdf[[*FEATURES, "b"]], "b")
    assert binary.model_.info["objective"] == "binary:logistic" and binary.n_classes_ == 2


def test_eval_set_list_form_unseen_labels_and_early_stopping(parties: Parties) -> None:  # B3
    df = parties.df
    X, y = df[FEATURES].to_numpy(), np.array(["a", "b", "c", "d"])[df.k.to_numpy()]
    Xt, yt, Xv, yv = X[:400], y[:400], X[400:], y[400:]
    kw = {"n_estimators": 40, "max_depth": 3, "early_stopping_rounds": 3, "random_state": 0}
    clf = SecureXGBClassifier(parties.owner, **kw).fit(Xt, yt, eval_set=[(Xt, yt), (Xv, yv)])
    ref = xgb.XGBClassifier(**kw).fit(
        Xt,
        np.searchsorted(clf.classes_, yt),
        eval_set=[(Xt, np.searchsorted(clf.classes_, yt)), (Xv, np.searchsorted(clf.classes_, yv))],
        verbose=False,
    )
    assert clf.best_iteration == ref.best_iteration
    got, want = clf.evals_result(), ref.evals_result()
    assert set(got) == {"validation_0", "validation_1"} == set(want)
    np.testing.assert_allclose(got["validation_1"]["mlogloss"], want["validation_1"]["mlogloss"], rtol=1e-5)
    with pytest.raises(ValueError, match=r"'zz'.*not seen in fit"):
        SecureXGBClassifier(parties.owner, n_estimators=2).fit(Xt, yt, eval_set=[(Xv[:3], ["a", "zz", "b"])])
    no_es = SecureXGBClassifier(parties.owner, n_estimators=2).fit(Xt, yt)
    with pytest.raises(AttributeError, match="early stopping"):
        _ = no_es.best_iteration


def test_sample_weight_params_importances_and_booster(parties: Parties) -> None:
    df = parties.df
    X, y, w = df[FEATURES].to_numpy(), df.b.to_numpy(), df.w.to_numpy()
    kw = {
        "n_estimators": 10,
        "max_depth": 4,
        "gamma": 0.5,
        "scale_pos_weight": 2.0,
        "base_score": 0.4,
        "n_jobs": 1,
        "max_leaves": 6,
        "grow_policy": "lossguide",
        "importance_type": "total_gain",
        "random_state": 0,
    }
    clf = SecureXGBClassifier(parties.owner, **kw).fit(X, y, sample_weight=w)
    ref = xgb.XGBClassifier(tree_method="hist", **kw).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(clf.predict_proba(X), ref.predict_proba(X), atol=1e-6)
    np.testing.assert_allclose(clf.feature_importances_, ref.feature_importances_, rtol=1e-5)
    unweighted = SecureXGBClassifier(parties.owner, **kw).fit(X, y)
    assert not np.allclose(unweighted.predict_proba(X), clf.predict_proba(X))
    np.testing.assert_allclose(clf.get_booster().predict(xgb.DMatrix(X)), ref.predict_proba(X)[:, 1], atol=1e-6)
    reg = SecureXGBRegressor(parties.owner, n_estimators=6, eval_metric=["rmse", "mae"]).fit(
        X, df.t, eval_set=[(X, df.t)]
    )
    assert set(reg.evals_result()["validation_0"]) == {"rmse", "mae"}
    # weights as a column of a remote dataset; the weight column is not a feature
    sdf = parties.coder.dataframe("est_data")
    remote = SecureXGBRegressor(parties.coder, n_estimators=6).fit(sdf[[*FEATURES, "w", "t"]], "t", sample_weight="w")
    assert remote.n_features_in_ == 5
    rref = xgb.XGBRegressor(n_estimators=6, tree_method="hist", random_state=0).fit(X, df.t, sample_weight=w)
    rb = remote.booster_handle.predict(df[FEATURES])
    np.testing.assert_allclose(rb, rref.predict(X), atol=1e-5)
    with pytest.raises(PolicyViolation, match=r"get_booster.*not released"):  # trained on the owner's data
        remote.get_booster()
    # enable_categorical=True on an array with no feature_types: numbers, as in xgboost (frames: test_categorical_e2e)
    as_numbers = SecureXGBRegressor(parties.owner, n_estimators=6, enable_categorical=True).fit(X, df.t)
    plain = xgb.XGBRegressor(n_estimators=6, tree_method="hist", random_state=0).fit(X, df.t)
    np.testing.assert_allclose(as_numbers.predict(X), plain.predict(X), atol=1e-6)


def test_missing_value_is_treated_as_nan(parties: Parties) -> None:
    df = parties.df
    X, y = df[FEATURES].to_numpy().copy(), df.b.to_numpy()
    X[::7, 1] = -999.0
    clf = SecureXGBClassifier(parties.owner, n_estimators=5, missing=-999.0).fit(X, y)
    ref = xgb.XGBClassifier(n_estimators=5, missing=-999.0, random_state=0).fit(X, y)
    np.testing.assert_allclose(clf.predict_proba(X), ref.predict_proba(X), atol=1e-6)


@pytest.mark.slow
def test_pickle_reconnects_lazily_without_keys_and_joblib_processes(parties: Parties, tmp_path: Path) -> None:
    from sklearn.model_selection import cross_val_score

    df = parties.df
    X, y = df[FEATURES].to_numpy(), df.b.to_numpy()
    clf = SecureXGBClassifier(parties.owner, n_estimators=5).fit(X, y)
    joblib.dump(clf, tmp_path / "clf.joblib")  # how users save an estimator (pickle underneath)
    blob = (tmp_path / "clf.joblib").read_bytes()
    key_files = [p for p in (parties.root / "owner").rglob("*") if p.is_file()]
    assert key_files
    for f in key_files:  # no identity file's content (the private key) is in the pickle
        raw = f.read_bytes()
        assert len(raw) < 16 or raw not in blob
    assert str(parties.root / "owner").encode() in blob  # the identity's path is
    again = joblib.load(tmp_path / "clf.joblib")
    assert again.session._session is None  # not connected until used
    np.testing.assert_array_equal(again.predict_proba(X[:20]), clf.predict_proba(X[:20]))
    assert again.session._session.party_id == parties.owner.party_id
    again.session._session.close()
    scores = cross_val_score(SecureXGBClassifier(parties.owner, n_estimators=5), X, y, cv=2, n_jobs=2)
    serial = cross_val_score(SecureXGBClassifier(parties.owner, n_estimators=5), X, y, cv=2)
    np.testing.assert_allclose(scores, serial)
