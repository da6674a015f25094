"""Compiled trees (treelite + tl2cgen + gcc): parity with xgboost, the digest cache, the engine chooser."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mesatee_notebook.ml import gbdt, treecompile
from mesatee_notebook.ml._errors import CompileError, FeatureMismatch
from tests.ml.conftest import FEATURES

OBJECTIVES: dict[str, tuple[str, dict[str, Any]]] = {
    "binary:logistic": ("binary", {}),
    "multi:softprob": ("klass", {}),
    "multi:softmax": ("klass", {}),
    "reg:squarederror": ("target", {}),
    "reg:absoluteerror": ("target", {}),
    "count:poisson": ("count", {}),
    "binary:hinge": ("binary", {}),
}


def _train(frame: pd.DataFrame, objective: str, rounds: int = 25) -> gbdt.GBDTModel:
    label, extra = OBJECTIVES[objective]
    data = frame[[*FEATURES]].assign(**{label: frame["target"].abs().round() if label == "count" else frame[label]})
    return gbdt.train(data, label, params={"objective": objective, "max_depth": 5, **extra}, num_boost_round=rounds)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.slow
def test_compiled_predictions_equal_xgboost(frame: pd.DataFrame, tmp_path: Path, objective: str) -> None:
    model = _train(frame, objective)
    compiled = treecompile.compile_trees(model, tmp_path)
    X = model.to_matrix(frame[FEATURES])
    for margin in (False, True):
        want = model.predict(X, margin=margin)
        got = compiled.predict_matrix(X, margin=margin)
        assert got.shape == want.shape
        # Absolute 1e-5 on probabilities and O(1) values; relative 1e-5 where values are large (counts).
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Rows sitting exactly on split thresholds, just below them, or missing.
    probes = treecompile.probe_rows(model, rows=300, seed=3)
    np.testing.assert_allclose(compiled.predict_matrix(probes), model.predict(probes), rtol=1e-5, atol=1e-5)


def test_probe_rows_sit_on_thresholds(frame: pd.DataFrame) -> None:
    model = _train(frame, "reg:squarederror", rounds=5)
    doc = json.loads(model.to_json())
    thresholds = {
        (f, c)
        for tree in doc["learner"]["gradient_booster"]["model"]["trees"]
        for left, f, c in zip(tree["left_children"], tree["split_indices"], tree["split_conditions"], strict=True)
        if left != -1
    }
    probes = treecompile.probe_rows(model, rows=400)
    on = sum(1 for f, c in thresholds if np.any(probes[:, f] == np.float32(c)))
    assert on >= len(thresholds) // 2
    assert np.isnan(probes).any()


def test_second_compile_is_a_cache_hit(frame: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _train(frame, "binary:logistic")
    first = treecompile.compile_trees(model, tmp_path)
    assert not first.from_cache

    def compiling_fails(*args: object) -> None:
        raise AssertionError("cached trees were compiled again")

    # no compiler runs (this replaced "took under 1 s", which a loaded machine could fail)
    with monkeypatch.context() as patched:
        patched.setattr(treecompile, "_compile_into", compiling_fails)
        again = treecompile.compile_trees(gbdt.load_model(model.to_json()), tmp_path)
    assert again.from_cache
    assert again.path == first.path
    assert again.library_sha256 == first.library_sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == [first.path.parent.name]
    other = treecompile.compile_trees(_train(frame, "binary:logistic", rounds=26), tmp_path)
    assert other.digest != first.digest


def test_corrupt_cache_entry_is_rebuilt(frame: pd.DataFrame, tmp_path: Path) -> None:
    model = _train(frame, "reg:squarederror", rounds=10)
    first = treecompile.compile_trees(model, tmp_path)
    # Replace the file (as a disk fault or another process would): rewriting a loaded library
    # in place would crash any process that has it mapped, so the cache itself never does that.
    data = first.path.read_bytes()
    first.path.unlink()
    first.path.write_bytes(data[: len(data) // 2])
    rebuilt = treecompile.compile_trees(model, tmp_path)
    assert not rebuilt.from_cache
    X = model.to_matrix(frame[FEATURES])
    np.testing.assert_allclose(rebuilt.predict_matrix(X), model.predict(X), atol=1e-5)


def test_library_that_disagrees_is_refused_and_not_cached(
    frame: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _train(frame, "reg:squarederror", rounds=10)
    real = treecompile.CompiledTrees.predict_matrix

    def skewed(self: treecompile.CompiledTrees, X: np.ndarray, *, margin: bool = False) -> np.ndarray:
        return real(self, X, margin=margin) + np.float32(1e-3)

    monkeypatch.setattr(treecompile.CompiledTrees, "predict_matrix", skewed)
    with pytest.raises(CompileError, match="disagree with xgboost"):
        treecompile.compile_trees(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_predictor_chooses_engine_by_batch_size(frame: pd.DataFrame, tmp_path: Path) -> None:
    model = _train(frame, "multi:softprob")
    predictor = treecompile.TreePredictor(model, tmp_path, crossover_rows=100)
    assert predictor.engine_for(1) == "compiled"
    assert predictor.engine_for(99) == "compiled"
    assert predictor.engine_for(100) == "xgboost"
    small, large = frame[[*FEATURES, "klass"]].iloc[:10], frame[FEATURES]
    np.testing.assert_allclose(predictor.predict(small), model.predict(small[FEATURES]), atol=1e-5)
    np.testing.assert_allclose(predictor.predict(large, margin=True), model.predict(large, margin=True))
    with pytest.raises(FeatureMismatch):
        predictor.predict(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(FeatureMismatch):
        predictor.compiled.predict_matrix(np.zeros((2, 3), dtype=np.float32))


def test_measure_crossover_times_both_engines(frame: pd.DataFrame, tmp_path: Path) -> None:
    model = _train(frame, "binary:logistic", rounds=10)
    compiled = treecompile.compile_trees(model, tmp_path)
    crossover, timings = treecompile.measure_crossover(model, compiled, sizes=(1, 64), repeats=2, min_time=0.005)
    assert set(timings) == {1, 64}
    assert all(t[e] > 0 for t in timings.values() for e in ("compiled", "xgboost"))
    assert crossover in {1, 64, 128}


@pytest.mark.parametrize("objective", ["binary:logistic", "reg:squarederror", "multi:softprob"])
def test_direct_small_batch_path_equals_the_tl2cgen_wrapper(tmp_path, objective):
    """Up to DIRECT_MAX_ROWS rows go straight into the generated C function; it must agree exactly."""
    import tl2cgen

    from mesatee_notebook.ml.gbdt import train

    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 6)).astype(np.float32)
    y = (X[:, 0] > 0).astype(float) + (objective == "multi:softprob") * (X[:, 1] > 0.5)
    params = {"objective": objective, "max_depth": 4}
    if objective == "multi:softprob":
        params["num_class"] = 3
    model = train(X, y, params=params, num_boost_round=20)
    compiled = treecompile.compile_trees(model, tmp_path)
    assert compiled._direct is not None
    rows = X[: treecompile.DIRECT_MAX_ROWS].copy()
    rows[0, 2] = np.nan
    rows[3, :] = np.nan
    for margin in (False, True):
        direct = compiled.predict_matrix(rows, margin=margin)
        wrapped = np.asarray(
            compiled._predictor.predict(tl2cgen.DMatrix(rows, dtype="float32"), pred_margin=margin)
        ).reshape(direct.shape)
        np.testing.assert_allclose(direct, wrapped, rtol=0, atol=1e-6)
        ref = model.predict(rows, margin=margin)
        np.testing.assert_allclose(direct, np.asarray(ref, dtype=np.float32).reshape(direct.shape), atol=1e-5)
