"""ONNX tree ensembles on the compiled-tree engine (``engine="treelite"``, issue 16).

Models are built in code with scikit-learn + skl2onnx (no downloads) and checked against onnxruntime at 1e-4
(probabilities, values) and exactly (labels), on inputs with NaNs: locally (``ml/onnx_treelib.py``) and
through a real kernel over attested TLS (``tvm.compile`` / ``tvm.run``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import pytest
from onnx import helper

import mesatee_notebook as mn
from mesatee_notebook.attestation.measurement import build_manifest, canonical_json
from mesatee_notebook.errors import CompileError, MesateeError
from mesatee_notebook.ml._errors import UnsupportedOperator
from mesatee_notebook.ml.onnx_engine import ORTModel, choose_engine
from mesatee_notebook.ml.onnx_treelib import TreeliteONNXModel, compile_onnx_trees
from mesatee_notebook.ml.onnx_trees import parse_tree_graph
from mesatee_notebook.wire.digest import payload_digest
from tests.conftest import KernelProc
from tests.ml.conftest import mlp_model

skl2onnx = pytest.importorskip("skl2onnx")
WIDTH, ROWS = 6, 48


def _xy(seed: int = 0, *, nan: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(300, WIDTH)).astype(np.float32)
    if nan:  # decision trees and forests learn where NaNs go (missing_value_tracks_true)
        X[rng.random(300) < 0.1, 2] = np.nan
    x0, x1 = np.nan_to_num(X[:, 0]), X[:, 1]
    ys = {
        "binary": (x0 + x1 > 0).astype(int),
        "multiclass": np.digitize(x0 + 0.5 * x1, [-0.7, 0.0, 0.7]),
        "regression": 2 * x0 - X[:, 3] + 0.1 * x1**2,
        "multitarget": np.stack([x0 - x1, X[:, 4]], axis=1),
    }
    return X, ys


def _sk(estimator: Any, task: str) -> onnx.ModelProto:
    from skl2onnx import to_onnx

    X, ys = _xy(nan="Gradient" not in type(estimator).__name__ and "Logistic" not in type(estimator).__name__)
    estimator.fit(X, ys[task])
    return cast("onnx.ModelProto", to_onnx(estimator, X[:1], target_opset={"": 17, "ai.onnx.ml": 3}))


def _models() -> dict[str, Callable[[], onnx.ModelProto]]:
    from sklearn import ensemble, tree

    gb, rf = ensemble, ensemble
    return {
        "GBClassifier-multiclass": lambda: _sk(
            gb.GradientBoostingClassifier(n_estimators=15, max_depth=3, random_state=0), "multiclass"
        ),
        "GBClassifier-binary": lambda: _sk(
            gb.GradientBoostingClassifier(n_estimators=15, max_depth=3, random_state=0), "binary"
        ),
        "RFClassifier-multiclass": lambda: _sk(
            rf.RandomForestClassifier(n_estimators=8, max_depth=5, random_state=0), "multiclass"
        ),
        "RFClassifier-binary": lambda: _sk(
            rf.RandomForestClassifier(n_estimators=8, max_depth=5, random_state=0), "binary"
        ),
        "DTClassifier-multiclass": lambda: _sk(tree.DecisionTreeClassifier(max_depth=5, random_state=0), "multiclass"),
        "DTClassifier-binary": lambda: _sk(tree.DecisionTreeClassifier(max_depth=5, random_state=0), "binary"),
        "GBRegressor": lambda: _sk(
            gb.GradientBoostingRegressor(n_estimators=15, max_depth=3, random_state=0), "regression"
        ),
        "RFRegressor": lambda: _sk(rf.RandomForestRegressor(n_estimators=8, max_depth=5, random_state=0), "regression"),
        "DTRegressor": lambda: _sk(tree.DecisionTreeRegressor(max_depth=5, random_state=0), "regression"),
        "RFRegressor-multitarget": lambda: _sk(
            rf.RandomForestRegressor(n_estimators=4, max_depth=4, random_state=0), "multitarget"
        ),
    }


MODELS = list(_models())


def _inputs(seed: int, rows: int = ROWS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, WIDTH)).astype(np.float32)
    X[rng.random((rows, WIDTH)) < 0.15] = np.nan
    return X


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    assert set(got) == set(want), what
    for name, value in want.items():
        assert got[name].shape == value.shape, f"{what}: {name}"
        if np.issubdtype(value.dtype, np.floating):
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-4, err_msg=f"{what}: {name}")
        else:
            np.testing.assert_array_equal(got[name], value, err_msg=f"{what}: {name}")


@pytest.mark.parametrize("name", MODELS)
def test_local_parity_with_onnxruntime(name: str, tmp_path: Path) -> None:
    model = _models()[name]().SerializeToString()
    shapes = {"X": [ROWS, WIDTH]}
    assert choose_engine(model, "auto", shapes) == "treelite"
    module = compile_onnx_trees(model, shapes, tmp_path)
    assert module.engine == "treelite" and not module.from_cache and len(module.library_sha256) == 64
    X = _inputs(1)
    _assert_same(module.run({"X": X}), ORTModel(model, shapes, from_cache=False).run({"X": X}), name)
    again = compile_onnx_trees(model, shapes, tmp_path)
    assert again.from_cache and again.library_sha256 == module.library_sha256
    small = compile_onnx_trees(model, {"X": [1, WIDTH]}, tmp_path)  # 1 row: the direct ctypes call
    for i in range(4):
        _assert_same(
            small.run(X[i : i + 1]), ORTModel(model, {"X": [1, WIDTH]}, from_cache=False).run(X[i : i + 1]), name
        )


def _rewrite(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """Every split mode and NaN direction: the same trees with random modes and missing_value_tracks_true."""
    rng = np.random.default_rng(seed)
    node = next(n for n in model.graph.node if n.op_type.startswith("TreeEnsemble"))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    choices = [b"BRANCH_LEQ", b"BRANCH_LT", b"BRANCH_GTE", b"BRANCH_GT", b"BRANCH_EQ", b"BRANCH_NEQ"]
    modes = [m if m == b"LEAF" else choices[int(rng.integers(0, 6))] for m in attrs["nodes_modes"]]
    tracks = [int(v) for v in rng.integers(0, 2, size=len(modes))]
    kept = [a for a in node.attribute if a.name not in ("nodes_modes", "nodes_missing_value_tracks_true")]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.extend(
        [helper.make_attribute("nodes_modes", modes), helper.make_attribute("nodes_missing_value_tracks_true", tracks)]
    )
    return model


@pytest.mark.parametrize("name", ["GBRegressor", "RFClassifier-multiclass", "GBClassifier-binary"])
def test_every_split_mode_and_nan_direction(name: str, tmp_path: Path) -> None:
    model = _rewrite(_models()[name](), seed=7)
    # EQ / NEQ on continuous features: put some inputs exactly on thresholds
    node = next(n for n in model.graph.node if n.op_type.startswith("TreeEnsemble"))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    raw = model.SerializeToString()
    module = compile_onnx_trees(raw, {"X": [ROWS, WIDTH]}, tmp_path)
    X = _inputs(2)
    for i, (f, v) in enumerate(zip(attrs["nodes_featureids"], attrs["nodes_values"], strict=True)):
        X[i % ROWS, int(f)] = np.float32(v)
    assert set(attrs["nodes_modes"]) >= {b"BRANCH_EQ", b"BRANCH_NEQ", b"BRANCH_LT", b"BRANCH_GT"}
    _assert_same(module.run(X), ORTModel(raw, {"X": [ROWS, WIDTH]}, from_cache=False).run({"X": X}), name)


def test_other_graphs_are_refused_with_the_reason(tmp_path: Path) -> None:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    piped = _sk(make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=3, max_depth=3)), "binary")
    raw = piped.SerializeToString()
    with pytest.raises(UnsupportedOperator, match="no preprocessing"):
        parse_tree_graph(piped, WIDTH)
    assert choose_engine(raw, "auto", {"X": [ROWS, WIDTH]}) == "onnxruntime"
    with pytest.raises(UnsupportedOperator, match="treelite engine cannot take"):
        compile_onnx_trees(raw, {"X": [ROWS, WIDTH]}, tmp_path)
    model = _models()["GBRegressor"]()
    node = next(n for n in model.graph.node if n.op_type.startswith("TreeEnsemble"))
    node.attribute.append(helper.make_attribute("aggregate_function", "MAX"))
    with pytest.raises(UnsupportedOperator, match="aggregate_function MAX"):
        parse_tree_graph(model, WIDTH)
    with pytest.raises(UnsupportedOperator, match="reads feature"):
        parse_tree_graph(_models()["GBRegressor"](), 1)
    assert choose_engine(mlp_model().SerializeToString(), "auto", {"x": [8, 64]}) == "tvm"


def test_a_wrong_translation_fails_the_parity_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mesatee_notebook.ml import onnx_treelib

    real = onnx_treelib.finalize
    monkeypatch.setattr(onnx_treelib, "finalize", lambda g, raw: real(g, raw * np.float32(1.01)))
    with pytest.raises(CompileError, match="disagrees with onnxruntime"):
        compile_onnx_trees(_models()["GBRegressor"]().SerializeToString(), {"X": [ROWS, WIDTH]}, tmp_path)
    assert not list(tmp_path.glob("onnxtrees-*"))  # nothing cached


def test_treelite_is_an_unsafe_component_in_the_measurement() -> None:
    comps = {c["name"]: c for c in build_manifest()["unsafe_components"]}
    assert comps["treelite"]["present"] and comps["tl2cgen"]["present"]


@pytest.fixture(scope="module")
def session(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[mn.Session]:
    s = mn.connect(kernel.url, policy=cast("mn.Policy", kernel.policy()), identity=tmp_path_factory.mktemp("trees"))
    yield s
    s.close()


def _local(model: onnx.ModelProto, X: np.ndarray) -> dict[str, np.ndarray]:
    return ORTModel(model.SerializeToString(), {"X": list(X.shape)}, from_cache=False).run({"X": X})


@pytest.mark.parametrize("name", ["GBClassifier-multiclass", "RFClassifier-binary", "GBRegressor"])
def test_kernel_runs_tree_ensembles_on_treelite(session: mn.Session, name: str) -> None:
    model = _models()[name]()
    mod = session.tvm.compile(model, input_shapes={"X": (ROWS, WIDTH)})
    assert mod.engine == "treelite" and mod.info["treelite"].startswith("treelite ")
    subjects = dict(mod.last_receipt.subjects)  # type: ignore[union-attr]
    assert subjects["info"] == payload_digest(canonical_json(mod.info))  # the receipt binds the engine
    X = _inputs(3)
    got = mod.run({"X": X})
    assert mod.last_receipt is not None
    _assert_same(got, _local(model, X), name)
    pinned = session.tvm.compile(model, input_shapes={"X": (ROWS, WIDTH)}, engine="onnxruntime")
    assert pinned.engine == "onnxruntime" and pinned.id != mod.id
    _assert_same(pinned.run({"X": X}), got, f"{name}: onnxruntime pinned")


def test_kernel_pins_and_falls_back(session: mn.Session) -> None:
    from sklearn.linear_model import LogisticRegression

    linear = _sk(LogisticRegression(max_iter=200), "binary")
    assert session.tvm.compile(linear, input_shapes={"X": (ROWS, WIDTH)}).engine == "onnxruntime"
    with pytest.raises(UnsupportedOperator, match="treelite engine cannot take this graph"):
        session.tvm.compile(linear, input_shapes={"X": (ROWS, WIDTH)}, engine="treelite")
    with pytest.raises(UnsupportedOperator, match="treelite engine cannot take this graph"):
        session.tvm.compile(mlp_model(), input_shapes={"x": (8, 64)}, engine="treelite")
    mod = session.tvm.compile(
        _models()["DTClassifier-multiclass"](), input_shapes={"X": (ROWS, WIDTH)}, engine="treelite"
    )
    with pytest.raises(MesateeError, match="compiled for"):
        mod.run({"X": np.zeros((3, WIDTH), np.float32)})


def test_module_survives_a_fresh_load(tmp_path: Path) -> None:
    raw = _models()["RFRegressor"]().SerializeToString()
    built = compile_onnx_trees(raw, {"X": [ROWS, WIDTH]}, tmp_path)
    loaded = TreeliteONNXModel(built.path.parent, from_cache=True)
    X = _inputs(4)
    _assert_same(loaded.run(X), built.run(X), "reload")
