"""onnxruntime as the enclave's second ONNX engine (issue 16): graphs TVM's relax frontend cannot import.

Every model is built in code (skl2onnx for scikit-learn pipelines, onnx.helper for LSTM/GRU and a bare
ArrayFeatureExtractor), compiled and run in a real kernel over attested TLS, and checked against
onnxruntime run locally at 1e-4.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import mesatee_notebook as mn
from mesatee_notebook.attestation.measurement import build_manifest, canonical_json
from mesatee_notebook.errors import MesateeError
from mesatee_notebook.ml._errors import UnsupportedOperator
from mesatee_notebook.ml.onnx_engine import ORTModel
from mesatee_notebook.wire.digest import payload_digest
from tests.conftest import KernelProc
from tests.ml.conftest import mlp_model

skl2onnx = pytest.importorskip("skl2onnx")
ROWS, WIDTH = 32, 6


@pytest.fixture(scope="module")
def session(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[mn.Session]:
    s = mn.connect(kernel.url, policy=cast("mn.Policy", kernel.policy()), identity=tmp_path_factory.mktemp("ort"))
    yield s
    s.close()


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(200, WIDTH)).astype(np.float32)
    return X, (X[:, 0] + X[:, 1] > 0).astype(int) + (X[:, 2] > 1).astype(int), 2 * X[:, 0] - X[:, 3]


def _sk(estimator: Any, classifier: bool) -> onnx.ModelProto:
    from skl2onnx import to_onnx

    X, k, t = _data()
    estimator.fit(X, k if classifier else t)
    return cast("onnx.ModelProto", to_onnx(estimator, X[:1], target_opset={"": 17, "ai.onnx.ml": 3}))


def logistic() -> onnx.ModelProto:  # LinearClassifier + ZipMap
    from sklearn.linear_model import LogisticRegression

    return _sk(LogisticRegression(max_iter=200), True)


def linear() -> onnx.ModelProto:  # LinearRegressor
    from sklearn.linear_model import LinearRegression

    return _sk(LinearRegression(), False)


def scaled_pipeline() -> onnx.ModelProto:  # Scaler + LinearClassifier + ZipMap
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return _sk(make_pipeline(StandardScaler(), LogisticRegression(max_iter=200)), True)


def forest() -> onnx.ModelProto:  # TreeEnsembleRegressor
    from sklearn.ensemble import RandomForestRegressor

    return _sk(RandomForestRegressor(n_estimators=5, max_depth=4, random_state=0), False)


def boosted_classifier() -> onnx.ModelProto:  # TreeEnsembleClassifier + ZipMap
    from sklearn.ensemble import GradientBoostingClassifier

    return _sk(GradientBoostingClassifier(n_estimators=5, max_depth=3, random_state=0), True)


def feature_extractor() -> onnx.ModelProto:  # ArrayFeatureExtractor alone
    idx = numpy_helper.from_array(np.array([0, 3, 5], dtype=np.int64), "idx")
    node = helper.make_node("ArrayFeatureExtractor", ["X", "idx"], ["Y"], domain="ai.onnx.ml")
    graph = helper.make_graph(
        [node],
        "afe",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3])],
        [idx],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])


def rnn(op: str) -> onnx.ModelProto:  # LSTM / GRU on (seq, batch, features)
    rng = np.random.default_rng(1)
    gates, hidden = (4 if op == "LSTM" else 3), 5
    W = numpy_helper.from_array((rng.normal(size=(1, gates * hidden, WIDTH)) * 0.3).astype(np.float32), "W")
    R = numpy_helper.from_array((rng.normal(size=(1, gates * hidden, hidden)) * 0.3).astype(np.float32), "R")
    B = numpy_helper.from_array((rng.normal(size=(1, 2 * gates * hidden)) * 0.1).astype(np.float32), "B")
    node = helper.make_node(op, ["X", "W", "R", "B"], ["Y", "Y_h"], hidden_size=hidden)
    graph = helper.make_graph(
        [node],
        op.lower(),
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [7, 4, WIDTH])],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, [7, 1, 4, hidden]),
            helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, 4, hidden]),
        ],
        [W, R, B],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _local(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    out = {}
    for name, value in zip(names, sess.run(names, feeds), strict=True):
        if isinstance(value, list) and value and isinstance(value[0], dict):  # ZipMap: class order of the map
            value = [[row[c] for c in value[0]] for row in value]
        out[name] = np.asarray(value)
    return out


FAMILIES: dict[str, tuple[Callable[[], onnx.ModelProto], tuple[int, ...]]] = {
    "LinearClassifier+ZipMap": (logistic, (ROWS, WIDTH)),
    "LinearRegressor": (linear, (ROWS, WIDTH)),
    "Scaler pipeline": (scaled_pipeline, (ROWS, WIDTH)),
    "TreeEnsembleRegressor": (forest, (ROWS, WIDTH)),
    "TreeEnsembleClassifier": (boosted_classifier, (ROWS, WIDTH)),
    "ArrayFeatureExtractor": (feature_extractor, (ROWS, WIDTH)),
    "LSTM": (lambda: rnn("LSTM"), (7, 4, WIDTH)),
    "GRU": (lambda: rnn("GRU"), (7, 4, WIDTH)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_runs_on_onnxruntime_with_parity(session: mn.Session, family: str) -> None:
    build, shape = FAMILIES[family]
    model = build()
    name = model.graph.input[0].name
    mod = session.tvm.compile(model, input_shapes={name: shape})
    engine = "treelite" if family.startswith("TreeEnsemble") else "onnxruntime"  # trees: test_onnx_trees.py
    assert mod.engine == engine and mod.info["source"] in ("compiled", "sealed cache", "worker")
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    got = mod.run({name: x})
    assert mod.last_receipt is not None
    want = _local(model, {name: x})
    assert set(got) == set(want)
    for out, value in want.items():
        np.testing.assert_allclose(got[out], value, rtol=1e-4, atol=1e-4, err_msg=f"{family}: {out}")


def test_receipt_names_the_engine_and_pinning(session: mn.Session) -> None:
    model = linear()
    name = model.graph.input[0].name
    mod = session.tvm.compile(model, input_shapes={name: (ROWS, WIDTH)})
    subjects = dict(mod.last_receipt.subjects)  # type: ignore[union-attr]
    assert subjects["info"] == payload_digest(canonical_json(mod.info))
    assert mod.info["engine"] == "onnxruntime" and mod.info["onnxruntime"]
    mod.run({name: np.zeros((ROWS, WIDTH), np.float32)})
    run_subjects = dict(mod.last_receipt.subjects)  # type: ignore[union-attr]
    assert run_subjects["info"] != subjects["info"]  # the run's own info (with its engine) is bound too
    with pytest.raises(UnsupportedOperator, match="LinearRegressor"):  # pinned to TVM: refused, as before
        session.tvm.compile(model, input_shapes={name: (ROWS, WIDTH)}, engine="tvm")
    mlp = mlp_model()
    pinned = session.tvm.compile(mlp, input_shapes={"x": (8, 64)}, engine="onnxruntime")
    auto = session.tvm.compile(mlp, input_shapes={"x": (8, 64)})
    assert pinned.engine == "onnxruntime" and auto.engine == "tvm"
    x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    np.testing.assert_allclose(pinned.run(x)["logits"], auto.run(x)["logits"], rtol=1e-4, atol=1e-4)
    with pytest.raises(MesateeError, match="engine must be one of"):
        session.tvm.compile(mlp, input_shapes={"x": (8, 64)}, engine="tensorflow")
    with pytest.raises(MesateeError, match="compiled for"):
        pinned.run(np.zeros((4, 64), np.float32))


def test_onnxruntime_is_an_unsafe_component_in_the_measurement() -> None:
    comps = {c["name"]: c for c in build_manifest()["unsafe_components"]}
    assert comps["onnxruntime"]["present"] and comps["onnxruntime"]["libraries"]


def test_engine_module_locally() -> None:
    model = logistic()
    m = ORTModel(model.SerializeToString(), {"X": (ROWS, WIDTH)}, from_cache=False)
    assert [o.name for o in m.outputs] == ["output_label", "output_probability"]
    assert m.outputs[1].shape == (ROWS, 3)  # ZipMap rows -> one column per class
    other = ORTModel(linear().SerializeToString(), {"X": (ROWS, WIDTH)}, from_cache=False)
    assert len(m.library_sha256) == 64 and m.library_sha256 != other.library_sha256
