"""GBDT and TVM services end to end: real kernel, real party identities, receipts verified on every call.

Parity is checked against the same engines run locally (xgboost, onnxruntime), the policies with two
parties (an owner and an analyst), and every bad input gives its typed error while the session goes on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import pandas as pd
import pytest
import xgboost as xgb

import mesatee_notebook as mn
from mesatee_notebook.errors import NotFound
from mesatee_notebook.ml._errors import (
    InputShapeError,
    InvalidLabels,
    MissingLabel,
    ModelFormatError,
    NonNumericFeatures,
    UnsupportedOperator,
)
from mesatee_notebook.remote.estimators import SecureXGBClassifier, SecureXGBRegressor
from mesatee_notebook.remote.frame import SecureSeries
from mesatee_notebook.remote.ml import RemoteModel, RemoteTVMModule
from tests.conftest import KernelProc
from tests.ml.conftest import cnn_model, mlp_model, ort_run, single_op_model

PARAMS = {"objective": "binary:logistic", "max_depth": 4, "eta": 0.3, "seed": 0, "tree_method": "hist"}
FEATURES = [f"x{i}" for i in range(6)]


def frame(rows: int = 800, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(rows, 6)), columns=FEATURES)
    df.loc[rng.random(rows) < 0.05, "x2"] = np.nan
    df["y"] = ((df.x0 + df.x1**2 + rng.normal(scale=0.3, size=rows)) > 1).astype(int)
    df["ssn"] = rng.integers(0, 10**9, size=rows)
    return df


class Parties:
    def __init__(self, kernel: KernelProc, root: Path) -> None:
        policy = cast("mn.Policy", kernel.policy())
        self.owner = mn.connect(kernel.url, policy=policy, identity=root / "owner")
        self.analyst = mn.connect(kernel.url, policy=policy, identity=root / "analyst")
        self.coder = mn.connect(kernel.url, policy=policy, identity=root / "coder")
        self.data = frame()
        assert self.coder.party_id is not None
        pol = mn.DataPolicy(min_group_size=20, hidden_columns=("ssn",), code_access=(self.coder.party_id,))
        self.owner.upload(self.data, "ml_e2e_data", policy=pol)

    def close(self) -> None:
        for s in (self.owner, self.analyst, self.coder):
            s.close()


@pytest.fixture(scope="module")
def parties(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parties]:
    p = Parties(kernel, tmp_path_factory.mktemp("ml_parties"))
    yield p
    p.close()


def local_booster(df: pd.DataFrame, rounds: int) -> xgb.Booster:
    X = df[FEATURES].to_numpy(dtype=np.float32)
    return xgb.train(PARAMS, xgb.DMatrix(X, label=df["y"].to_numpy(), feature_names=FEATURES), num_boost_round=rounds)


@pytest.mark.slow
def test_xgboost_parity_progress_and_continuation(parties: Parties) -> None:
    s, df = parties.owner, parties.data[[*FEATURES, "y"]]
    events: list[dict[str, Any]] = []
    model = s.gbdt.train(df, "y", params=PARAMS, num_boost_round=15, evals={"train": df}, progress=events.append)
    assert isinstance(model, RemoteModel) and model.info["num_rounds"] == 15 and model.released
    assert [e["round"] for e in events] == list(range(15))
    assert set(events[-1]["metrics"]["train"]) == {"logloss"}
    assert model.last_receipt is not None and s.last_receipt is model.last_receipt

    want = local_booster(df, 15).inplace_predict(df[FEATURES].to_numpy(dtype=np.float32))
    got = model.predict(df[FEATURES], engine="xgboost")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    margin = model.predict(df[FEATURES], engine="xgboost", margin=True)
    np.testing.assert_allclose(1 / (1 + np.exp(-margin)), want, atol=1e-6)

    metrics = model.evaluate(df)
    assert set(metrics) == {"logloss", "auc", "accuracy", "rows"} and metrics["rows"] == len(df)
    imp = model.feature_importance()
    assert list(imp.index[:2]) == ["x1", "x0"] or set(imp.index[:2]) == {"x0", "x1"}

    more = s.gbdt.train(df, "y", params=PARAMS, num_boost_round=5, init_model=model, progress=False)
    assert more.info["num_rounds"] == 20
    np.testing.assert_allclose(
        more.predict(df[FEATURES], engine="xgboost"),
        local_booster(df, 20).inplace_predict(df[FEATURES].to_numpy(dtype=np.float32)),
        atol=1e-6,
    )

    stop = s.gbdt.train(
        df.iloc[:600],
        "y",
        params=PARAMS,
        num_boost_round=200,
        evals={"valid": df.iloc[600:]},
        early_stopping_rounds=3,
        progress=False,
    )
    assert stop.info["best_iteration"] is not None and stop.info["num_rounds"] < 200


def test_compiled_tree_parity_and_engine_choice(parties: Parties) -> None:
    s, df = parties.owner, parties.data[[*FEATURES, "y"]]
    model = s.gbdt.train(df, "y", params=PARAMS, num_boost_round=30, progress=False)
    info = model.compile()
    assert len(info["library_sha256"]) == 64
    X = df[FEATURES]
    want = local_booster(df, 30).inplace_predict(X.to_numpy(dtype=np.float32))
    got = model.predict(X, engine="compiled")
    assert model.last_engine == "compiled"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    one = model.predict(X.iloc[:1])
    assert model.last_engine == "compiled" and one.shape == (1,)
    np.testing.assert_allclose(one, want[:1], atol=1e-5)
    model.predict(X)
    assert model.last_engine == "xgboost"


@pytest.mark.slow
def test_tvm_parity_and_cache(parties: Parties) -> None:
    s = parties.analyst
    mlp = mlp_model(seed=3)
    t0 = time.perf_counter()
    mod = s.tvm.compile(mlp.SerializeToString(), input_shapes={"x": (8, 64)}, tune_trials=0)
    first = time.perf_counter() - t0
    x = np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32)
    out = mod.run({"x": x})
    np.testing.assert_allclose(out["logits"], ort_run(mlp, {"x": x})[0], atol=1e-4, rtol=1e-4)
    t0 = time.perf_counter()
    again = s.tvm.compile(mlp, input_shapes={"x": [8, 64]})
    second = time.perf_counter() - t0
    assert again.id == mod.id and again.info["source"] in ("worker", "sealed cache")
    assert second < 1.0, (first, second)
    np.testing.assert_allclose(again.run(x)["logits"], out["logits"], atol=0)

    cnn = cnn_model(seed=2)
    image = np.random.default_rng(2).normal(size=(2, 3, 16, 16)).astype(np.float32)
    cmod = s.tvm.compile(cnn, input_shapes={"image": (2, 3, 16, 16)})
    got = cmod.run({"image": image})
    for name, ref in zip(("probs", "z"), ort_run(cnn, {"image": image}), strict=True):
        np.testing.assert_allclose(got[name], ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(mn.PolicyViolation, match="another party"):
        RemoteTVMModule(parties.owner, mod.info).run(x)


def test_tvm_on_a_dataset_stays_remote(parties: Parties) -> None:
    import onnx.helper as oh
    from onnx import TensorProto, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 1), dtype=np.float32), "w")
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["s"])],
        "sum3",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [16, 3])],
        [oh.make_tensor_value_info("s", TensorProto.FLOAT, [16, 1])],
        [w],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    mod = parties.analyst.tvm.compile(model, input_shapes={"x": (16, 3)})
    sdf = parties.analyst.dataframe("ml_e2e_data")
    res = mod.run(sdf[["x0", "x1", "x3"]])
    assert isinstance(res, SecureSeries)
    df = parties.data
    assert float(res.sum().collect()) == pytest.approx(float((df.x0 + df.x1 + df.x3).sum()), rel=1e-4)
    with pytest.raises(mn.PolicyViolation, match="hidden"):
        mod.run(sdf[["x0", "x1", "ssn"]])


def test_policies_between_parties(parties: Parties) -> None:
    analyst, coder, owner = parties.analyst, parties.coder, parties.owner
    with pytest.raises(mn.PolicyViolation, match="code_access"):
        analyst.gbdt.train("ml_e2e_data", "y", params=PARAMS, num_boost_round=2, progress=False)
    sdf = coder.dataframe("ml_e2e_data")
    model = coder.gbdt.train(sdf[[*FEATURES, "y"]], "y", params=PARAMS, num_boost_round=10, progress=False)
    assert model.info["data_owners"] == [owner.party_id] and not model.released
    assert model.feature_importance().shape == (6,)
    assert model.evaluate("ml_e2e_data")["rows"] == len(parties.data)
    pred = model.predict("ml_e2e_data", name="ml_e2e_pred")
    assert isinstance(pred, SecureSeries) and pred.name == "prediction"
    assert 0.0 < float(pred.mean().collect()) < 1.0
    with pytest.raises(mn.PolicyViolation, match="rows"):
        pred.head().collect()
    local = model.predict("ml_e2e_data", remote=False)
    assert local.shape == (len(parties.data),)
    with pytest.raises(mn.PolicyViolation, match="not released"):
        model.export()
    assert any(m["id"] == model.id for m in owner.gbdt.models())
    with pytest.raises(mn.PolicyViolation, match="belongs to another party"):
        analyst.call("gbdt.predict", {"model": model.id, "data": {"dataset": "ml_e2e_data"}})
    owner.gbdt.release(model)
    assert model.refresh().released
    booster = xgb.Booster()
    booster.load_model(bytearray(model.export()))
    np.testing.assert_allclose(
        booster.inplace_predict(parties.data[FEATURES].to_numpy(dtype=np.float32)), local, atol=1e-6
    )
    entries = owner.audit()
    kinds = {(e.get("kind"), (e.get("details") or {}).get("service")) for e in entries}
    assert ("job", "gbdt.train") in kinds and ("approval", "gbdt.release") in kinds
    assert any(e.get("kind") == "refusal" for e in entries)


def _bad_onnx_ops() -> onnx.ModelProto:
    return single_op_model("FancyOp", domain="com.example")


@pytest.mark.parametrize(
    ("case", "error", "words"),
    [
        ("missing label", MissingLabel, "label column 'nope'"),
        ("non-numeric", NonNumericFeatures, "'city'"),
        ("nan labels", InvalidLabels, "NaN"),
        ("malformed onnx", ModelFormatError, "not a valid ONNX model"),
        ("unsupported op", UnsupportedOperator, "com.example:FancyOp"),
        ("shape mismatch", InputShapeError, "compiled for (8, 64)"),
        ("unreleased export", mn.PolicyViolation, "not released"),
        ("unknown handle", NotFound, "no model"),
    ],
)
def test_bad_inputs_are_clear_and_the_session_goes_on(
    parties: Parties, case: str, error: type[Exception], words: str
) -> None:
    s = parties.coder
    df = parties.data[[*FEATURES, "y"]].iloc[:100].copy()
    with pytest.raises(error, match=None) as info:
        if case == "missing label":
            s.gbdt.train(df, "nope", progress=False)
        elif case == "non-numeric":
            s.gbdt.train(df.assign(city="Paris"), "y", progress=False)
        elif case == "nan labels":
            s.gbdt.train(df.assign(y=np.where(np.arange(100) == 5, np.nan, df.y)), "y", progress=False)
        elif case == "malformed onnx":
            s.tvm.compile(b"\x08\x07garbage-not-onnx", input_shapes={"x": (1, 2)})
        elif case == "unsupported op":
            s.tvm.compile(_bad_onnx_ops(), input_shapes={"x": (4, 8)})
        elif case == "shape mismatch":
            s.tvm.compile(mlp_model(seed=3), input_shapes={"x": (8, 64)}).run({"x": np.zeros((2, 64), np.float32)})
        elif case == "unreleased export":
            s.gbdt.train("ml_e2e_data", "y", num_boost_round=2, progress=False).export()
        else:
            s.gbdt.model("0" * 32)
    assert words in str(info.value)
    assert s.gbdt.train(df, "y", params=PARAMS, num_boost_round=2, progress=False).info["num_rounds"] == 2


@pytest.mark.slow
def test_sklearn_cross_val_score_and_pipeline(parties: Parties) -> None:
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    df = parties.data
    X, y = df[FEATURES].to_numpy(), np.where(df.y.to_numpy() == 1, "yes", "no")
    clf = SecureXGBClassifier(parties.analyst, n_estimators=20, max_depth=3)
    scores = cross_val_score(make_pipeline(StandardScaler(), clf), X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.8
    fitted = clf.fit(X, y)
    assert list(fitted.classes_) == ["no", "yes"]
    proba = fitted.predict_proba(X[:5])
    assert proba.shape == (5, 2) and np.allclose(proba.sum(axis=1), 1)
    assert fitted.score(X, y) > 0.9
    local = xgb.XGBClassifier(n_estimators=20, max_depth=3, learning_rate=0.3, tree_method="hist", random_state=0)
    local.fit(X.astype(np.float32), (y == "yes").astype(int))
    np.testing.assert_allclose(proba, local.predict_proba(X[:5].astype(np.float32)), atol=1e-6)
    reg = SecureXGBRegressor(parties.analyst, n_estimators=10).fit(X, df.x0.to_numpy() * 2)
    assert reg.score(X, df.x0.to_numpy() * 2) > 0.9
    sdf = parties.coder.dataframe("ml_e2e_data")
    remote = SecureXGBRegressor(parties.coder, n_estimators=5).fit(sdf[[*FEATURES, "y"]], "y")
    assert remote.n_features_in_ == 6 and isinstance(remote.predict("ml_e2e_data"), SecureSeries)


# Checks that cannot apply to an estimator whose session parameter is a live connection, with the reason.
# (check_estimators_pickle passes: a fitted estimator pickles its handle and a session reference; see
# tests/ml/test_estimators.py. check_set_params passes too.)
SKIPPED_CHECKS = {
    "check_estimators_overwrite_params": "deep-copies every parameter, and the session parameter is a live TLS "
    "connection that cannot be copied (clone() shares it through __sklearn_clone__)",
    "check_sample_weight_equivalence_on_dense_data": "the weighted and the repeated-rows models predict identically "
    "through xgboost, but small batches run on compiled trees (tl2cgen), whose float32 sums differ from xgboost's "
    "by about one ulp (6e-8), above the check's rtol of 1e-7",
}


@pytest.mark.slow
def test_sklearn_estimator_checks(parties: Parties) -> None:
    from sklearn.utils.estimator_checks import check_estimator

    s = parties.analyst
    for est in (SecureXGBClassifier(s, n_estimators=5), SecureXGBRegressor(s, n_estimators=5)):
        results = check_estimator(est, expected_failed_checks=SKIPPED_CHECKS, on_fail=None, on_skip=None)
        failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
        assert not failed, failed
        assert sum(r["status"] == "passed" for r in results) > 30
