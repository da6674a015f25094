"""The xgboost engine: parity with direct xgboost, evals and progress, metrics, export, typed errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from sklearn.metrics import accuracy_score, log_loss, mean_absolute_error, mean_squared_error, r2_score, roc_auc_score

from mesatee_notebook.errors import MesateeError, error_from_wire
from mesatee_notebook.ml import gbdt
from mesatee_notebook.ml._errors import (
    FeatureMismatch,
    InvalidLabels,
    MissingLabel,
    MLInputError,
    ModelFormatError,
    NonNumericFeatures,
)
from tests.ml.conftest import FEATURES, make_frame

PARAMS: dict[str, dict[str, Any]] = {
    "binary": {"objective": "binary:logistic", "max_depth": 4, "eta": 0.3, "subsample": 0.8, "seed": 7},
    "klass": {"objective": "multi:softprob", "num_class": 4, "max_depth": 3, "colsample_bytree": 0.7, "seed": 7},
    "target": {"objective": "reg:squarederror", "max_depth": 5, "seed": 7},
}


def _direct(frame: pd.DataFrame, label: str, params: dict[str, Any], rounds: int) -> xgb.Booster:
    dtrain = xgb.DMatrix(frame[FEATURES], label=frame[label])
    return xgb.train({"tree_method": "hist", **params}, dtrain, num_boost_round=rounds)


@pytest.mark.parametrize("label", ["binary", "klass", "target"])
def test_training_matches_direct_xgboost(frame: pd.DataFrame, label: str) -> None:
    data = frame[[*FEATURES, label]]
    model = gbdt.train(data, label, params=PARAMS[label], num_boost_round=25)
    booster = _direct(frame, label, PARAMS[label], 25)
    dtest = xgb.DMatrix(frame[FEATURES])
    np.testing.assert_allclose(model.predict(data), booster.predict(dtest), rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        model.predict(frame[FEATURES], margin=True), booster.predict(dtest, output_margin=True), rtol=0, atol=1e-6
    )
    assert model.num_rounds == 25
    assert model.feature_names == tuple(FEATURES)
    assert model.label == label


def test_training_from_arrays_matches_direct_xgboost(frame: pd.DataFrame) -> None:
    X = frame[FEATURES].to_numpy(dtype=np.float32)
    y = frame["target"].to_numpy()
    model = gbdt.train(X, y, params=PARAMS["target"], num_boost_round=20)
    booster = xgb.train({"tree_method": "hist", **PARAMS["target"]}, xgb.DMatrix(X, label=y), 20)
    np.testing.assert_allclose(model.predict(X), booster.predict(xgb.DMatrix(X)), rtol=0, atol=1e-6)
    assert model.feature_names == tuple(f"f{i}" for i in range(len(FEATURES)))
    assert model.label is None
    assert model.predict(X[0]).shape == (1,)


def test_evals_stream_per_round_metrics(frame: pd.DataFrame) -> None:
    train, valid = frame.iloc[:450], frame.iloc[450:]
    events: list[dict[str, Any]] = []
    model = gbdt.train(
        train[[*FEATURES, "binary"]],
        "binary",
        params={**PARAMS["binary"], "eval_metric": ["logloss", "auc"]},
        num_boost_round=12,
        evals={"train": train[[*FEATURES, "binary"]], "valid": (valid[FEATURES], valid["binary"].to_numpy())},
        progress=events.append,
    )
    assert [e["round"] for e in events] == list(range(12))
    assert all(e["event"] == "round" and e["rounds"] == 12 for e in events)
    assert set(events[-1]["metrics"]) == {"train", "valid"}
    assert set(events[-1]["metrics"]["valid"]) == {"logloss", "auc"}
    for i, event in enumerate(events):
        assert event["metrics"]["valid"]["auc"] == model.history["valid"]["auc"][i]
    # The streamed metrics are xgboost's own.
    direct_log: dict[str, Any] = {}
    dtrain = xgb.DMatrix(train[FEATURES], label=train["binary"])
    dvalid = xgb.DMatrix(valid[FEATURES], label=valid["binary"])
    xgb.train(
        {"tree_method": "hist", **PARAMS["binary"], "eval_metric": ["logloss", "auc"]},
        dtrain,
        12,
        evals=[(dtrain, "train"), (dvalid, "valid")],
        evals_result=direct_log,
        verbose_eval=False,
    )
    np.testing.assert_allclose(model.history["valid"]["logloss"], direct_log["valid"]["logloss"], rtol=1e-9)


def test_early_stopping_keeps_the_best_round(frame: pd.DataFrame) -> None:
    data = frame[[*FEATURES, "binary"]]
    train, valid = data.iloc[:400], data.iloc[400:]
    model = gbdt.train(
        train,
        "binary",
        params={"objective": "binary:logistic", "max_depth": 6, "eta": 0.6},
        num_boost_round=300,
        evals={"valid": valid},
        early_stopping_rounds=5,
    )
    best = model.best_iteration
    assert best is not None
    assert model.num_rounds == best + 1
    assert len(model.history["valid"]["logloss"]) < 300
    # evaluate() on the cut model reproduces xgboost's eval metric at the best round.
    metrics = model.evaluate(valid)
    assert metrics["logloss"] == pytest.approx(model.history["valid"]["logloss"][best], rel=1e-5)


@pytest.mark.slow
def test_continue_training_matches_direct_xgboost(frame: pd.DataFrame) -> None:
    data = frame[[*FEATURES, "target"]]
    first = gbdt.train(data, "target", params=PARAMS["target"], num_boost_round=10)
    events: list[dict[str, Any]] = []
    more = gbdt.train(
        data, "target", params=PARAMS["target"], num_boost_round=15, init_model=first, progress=events.append
    )
    assert first.num_rounds == 10
    assert more.num_rounds == 25
    assert [e["round"] for e in events] == list(range(15))
    base = _direct(frame, "target", PARAMS["target"], 10)
    direct = xgb.train(
        {"tree_method": "hist", **PARAMS["target"]},
        xgb.DMatrix(frame[FEATURES], label=frame["target"]),
        15,
        xgb_model=base,
    )
    np.testing.assert_allclose(more.predict(data), direct.predict(xgb.DMatrix(frame[FEATURES])), atol=1e-6)


def test_continue_training_refuses_other_features(frame: pd.DataFrame) -> None:
    first = gbdt.train(frame[[*FEATURES, "target"]], "target", num_boost_round=3)
    with pytest.raises(FeatureMismatch):
        gbdt.train(frame[["x0", "x1", "target"]], "target", num_boost_round=3, init_model=first)


def test_binary_metrics_match_sklearn(frame: pd.DataFrame) -> None:
    data = frame[[*FEATURES, "binary"]]
    model = gbdt.train(data.iloc[:400], "binary", params=PARAMS["binary"], num_boost_round=15)
    test = data.iloc[400:]
    metrics = model.evaluate(test)
    p = model.predict(test).astype(np.float64)
    y = test["binary"].to_numpy()
    assert metrics["logloss"] == pytest.approx(log_loss(y, p), rel=1e-5)
    assert metrics["auc"] == pytest.approx(roc_auc_score(y, p), rel=1e-9)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, p >= 0.5))
    assert metrics["rows"] == len(test)


def test_multiclass_metrics_match_sklearn(frame: pd.DataFrame) -> None:
    data = frame[[*FEATURES, "klass"]]
    model = gbdt.train(data.iloc[:400], "klass", params=PARAMS["klass"], num_boost_round=15)
    test = data.iloc[400:]
    metrics = model.evaluate(test)
    probs = model.predict(test).astype(np.float64)
    assert probs.shape == (len(test), 4)
    y = test["klass"].to_numpy()
    assert set(metrics) == {"mlogloss", "accuracy", "rows"}
    normalised = probs / probs.sum(axis=1, keepdims=True)  # float32 rows sum to 1 only within ~1e-7
    assert metrics["mlogloss"] == pytest.approx(log_loss(y, normalised, labels=[0, 1, 2, 3]), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(axis=1)))


def test_regression_metrics_match_sklearn(frame: pd.DataFrame) -> None:
    X, y = frame[FEATURES].to_numpy(), frame["target"].to_numpy()
    model = gbdt.train(X[:400], y[:400], params=PARAMS["target"], num_boost_round=30)
    metrics = model.evaluate(X[400:], y[400:])
    pred = model.predict(X[400:]).astype(np.float64)
    assert metrics["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y[400:], pred)), rel=1e-9)
    assert metrics["mae"] == pytest.approx(mean_absolute_error(y[400:], pred), rel=1e-9)
    assert metrics["r2"] == pytest.approx(r2_score(y[400:], pred), rel=1e-9)
    assert metrics["r2"] > 0.8


def test_feature_importance(frame: pd.DataFrame) -> None:
    data = frame[[*FEATURES, "target"]].assign(constant=1.0)
    model = gbdt.train(data, "target", params=PARAMS["target"], num_boost_round=20)
    for kind in ("gain", "weight", "cover"):
        scores = model.feature_importance(kind)
        assert list(scores) == [*FEATURES, "constant"]
        assert scores["constant"] == 0.0
        raw = model.booster.get_score(importance_type=kind)
        assert {k: v for k, v in scores.items() if v} == pytest.approx(raw)
    gain = model.feature_importance("gain")
    assert max(gain, key=lambda k: gain[k]) in {"x0", "x1"}
    with pytest.raises(MLInputError, match="importance kind"):
        model.feature_importance("shap")


def test_json_export_round_trip(frame: pd.DataFrame) -> None:
    model = gbdt.train(frame[[*FEATURES, "klass"]], "klass", params=PARAMS["klass"], num_boost_round=8)
    blob = model.to_json()
    assert blob.startswith(b"{")
    loaded = gbdt.load_model(blob)
    assert loaded.digest == model.digest
    assert (loaded.label, loaded.feature_names) == ("klass", tuple(FEATURES))
    assert (loaded.objective, loaded.num_class) == ("multi:softprob", 4)
    np.testing.assert_array_equal(loaded.predict(frame[FEATURES]), model.predict(frame[FEATURES]))
    stock = xgb.Booster()
    stock.load_model(bytearray(blob))
    np.testing.assert_allclose(stock.predict(xgb.DMatrix(frame[FEATURES])), model.predict(frame[FEATURES]), atol=1e-7)


def test_predict_accepts_reordered_columns_and_the_label(frame: pd.DataFrame) -> None:
    model = gbdt.train(frame[[*FEATURES, "target"]], "target", num_boost_round=5)
    shuffled = frame[[*reversed(FEATURES), "target"]]
    np.testing.assert_array_equal(model.predict(shuffled), model.predict(frame[FEATURES]))


# ---- typed errors ---------------------------------------------------------------------------


def test_missing_label_column(frame: pd.DataFrame) -> None:
    with pytest.raises(MissingLabel, match="'price'") as info:
        gbdt.train(frame, "price")
    assert isinstance(info.value, ValueError)
    assert info.value.details["label"] == "price"
    with pytest.raises(MissingLabel, match="needs a DataFrame"):
        gbdt.train(frame[FEATURES].to_numpy(), "target")


def test_non_numeric_columns_are_named(frame: pd.DataFrame) -> None:
    data = frame[[*FEATURES, "target"]].assign(city="Paris", when=pd.Timestamp("2024-01-01"))
    with pytest.raises(NonNumericFeatures) as info:
        gbdt.train(data, "target")
    assert info.value.details["columns"] == ["city", "when"]
    assert "'city'" in str(info.value) and "'when'" in str(info.value)
    with pytest.raises(NonNumericFeatures, match="dtype"):
        gbdt.train(np.array([["a", "b"], ["c", "d"]]), [0.0, 1.0])


def test_nan_labels(frame: pd.DataFrame) -> None:
    data = frame[[*FEATURES, "target"]].copy()
    data.loc[[3, 5, 8], "target"] = np.nan
    with pytest.raises(InvalidLabels, match="3 NaN") as info:
        gbdt.train(data, "target")
    assert info.value.details["count"] == 3


@pytest.mark.parametrize(
    ("label", "params", "match"),
    [
        ("target", {"objective": "binary:logistic"}, r"labels in \[0, 1\]"),
        ("target", {"objective": "multi:softprob"}, "integer class labels"),
        ("klass", {"objective": "multi:softprob", "num_class": 2}, "out of range"),
    ],
)
def test_labels_the_objective_cannot_take(frame: pd.DataFrame, label: str, params: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidLabels, match=match):
        gbdt.train(frame[[*FEATURES, label]], label, params=params)


def test_feature_count_mismatch_at_predict(frame: pd.DataFrame) -> None:
    model = gbdt.train(frame[[*FEATURES, "target"]], "target", num_boost_round=3)
    with pytest.raises(FeatureMismatch, match="expects 7 features, got 5") as info:
        model.predict(np.zeros((2, 5)))
    assert (info.value.details["expected"], info.value.details["got"]) == (7, 5)
    with pytest.raises(FeatureMismatch, match="missing: x5, flag"):
        model.predict(frame[FEATURES[:5]])
    with pytest.raises(FeatureMismatch, match="not in the model: extra"):
        model.predict(frame[FEATURES].assign(extra=1.0))
    array_model = gbdt.train(frame[FEATURES].to_numpy(), frame["target"].to_numpy(), num_boost_round=3)
    with pytest.raises(FeatureMismatch):
        array_model.predict(frame[FEATURES[:4]])


def test_bad_requests_are_typed(frame: pd.DataFrame) -> None:
    data = frame[[*FEATURES, "target"]]
    with pytest.raises(MLInputError, match="tree_method='hist'"):
        gbdt.train(data, "target", params={"tree_method": "exact"})
    with pytest.raises(MLInputError, match="no GPU"):
        gbdt.train(data, "target", params={"device": "cuda"})
    with pytest.raises(MLInputError, match="not supported"):
        gbdt.train(data, "target", params={"objective": "rank:pairwise"})
    with pytest.raises(MLInputError, match="needs at least one eval set"):
        gbdt.train(data, "target", early_stopping_rounds=3)
    X, y = frame[FEATURES].to_numpy(), frame["target"].to_numpy()
    with pytest.raises(MLInputError, match=r"must be a \(features, labels\) pair"):
        gbdt.train(X, y, evals={"valid": X})
    with pytest.raises(InvalidLabels, match="3 values for 600 rows"):
        gbdt.train(frame[FEATURES], [1.0, 2.0, 3.0])
    with pytest.raises(MLInputError, match="xgboost refused"):
        gbdt.train(data, "target", params={"max_depth": -3}, num_boost_round=2)


def test_malformed_model_bytes() -> None:
    with pytest.raises(ModelFormatError, match="not an xgboost model"):
        gbdt.load_model(b'{"learner": 3')


def test_progress_callback_can_stop_training(frame: pd.DataFrame) -> None:
    def stop(event: dict[str, Any]) -> None:
        if event["round"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gbdt.train(frame[[*FEATURES, "target"]], "target", num_boost_round=50, progress=stop)


def test_errors_cross_the_wire_as_their_own_class(frame: pd.DataFrame) -> None:
    with pytest.raises(MesateeError) as info:
        gbdt.train(frame[[*FEATURES, "target"]].assign(city="x"), "target")
    rebuilt = error_from_wire(info.value.to_wire())
    assert type(rebuilt) is NonNumericFeatures
    assert rebuilt.details["columns"] == ["city"]


def test_different_seed_data_gives_different_digest() -> None:
    a = gbdt.train(make_frame(seed=1)[[*FEATURES, "target"]], "target", num_boost_round=3)
    b = gbdt.train(make_frame(seed=2)[[*FEATURES, "target"]], "target", num_boost_round=3)
    assert a.digest != b.digest
    assert len(a.digest) == 64


@pytest.mark.parametrize("max_bin", [16, 64, 1024])
def test_max_bin_other_than_256_matches_direct_xgboost(frame: pd.DataFrame, max_bin: int) -> None:  # issue 16, B1
    params = {**PARAMS["target"], "max_bin": max_bin}
    model = gbdt.train(frame[[*FEATURES, "target"]], "target", params=params, num_boost_round=10)
    booster = _direct(frame, "target", params, 10)
    np.testing.assert_array_equal(model.predict(frame[FEATURES]), booster.inplace_predict(frame[FEATURES]))
    evals = gbdt.train(frame, "target", params=params, num_boost_round=2, evals={"v": frame.iloc[:100]})
    assert len(evals.history["v"]["rmse"]) == 2


def test_training_lets_the_data_go_before_boosting(frame: pd.DataFrame) -> None:
    """P8: once the quantised matrix exists, the engine holds no reference to the training frame."""
    import weakref

    data = frame[[*FEATURES, "target"]].copy()
    holder = {"data": data}
    alive = weakref.ref(data)
    del data
    seen: list[bool] = []

    def release() -> None:
        holder.clear()
        seen.append(alive() is None)  # reference counts alone free it: no collection needed (or done) there

    model = gbdt.train(holder["data"], "target", params=PARAMS["target"], num_boost_round=3, release=release)
    assert seen == [True]
    np.testing.assert_array_equal(
        model.predict(frame[FEATURES]),
        gbdt.train(frame[[*FEATURES, "target"]], "target", params=PARAMS["target"], num_boost_round=3).predict(
            frame[FEATURES]
        ),
    )
