"""P4: tree prediction latency, compiled trees (treelite + tl2cgen + gcc) vs xgboost ``inplace_predict``.

Engine level (no channel yet): one binary:logistic model (200 trees, depth 6, 30 features, trained on
20k synthetic rows with hist), predicted on 1 row and on 100k rows, plus a batch-size sweep that finds
the crossover used by ``TreePredictor``. xgboost runs with its default threads (all cores) and, for
comparison, with nthread=1: on a shared machine its OpenMP barriers wait for a busy core's time slice.
Medians of R samples, each sample a loop of at least 50 ms. The load average is recorded with the figures.
Prints a table and writes bench/results/p4_tree_predict.json.

ONNX tree ensembles (issue 16): skl2onnx graphs of a GradientBoostingClassifier (3 classes, 100 trees,
depth 4) and a RandomForestClassifier (binary, 100 trees, depth 8) on 30 features, run by the ``treelite``
engine (``ml/onnx_treelib.py``, 1 thread) and by onnxruntime (1 thread, and 2 intra-op threads), batch 1
and 1024, same run, engine level (``module.run``). Written to bench/results/p4_onnx_trees.json.
Usage: python bench/p4_tree_predict.py [REPEATS]      (everything)
       python bench/p4_tree_predict.py onnx [REPEATS] (the ONNX tree-ensemble rows only)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._timing import timeit
from mesatee_notebook.ml import gbdt, treecompile

ROWS, TRAIN_ROWS, FEATURES, TREES, DEPTH = 100_000, 20_000, 30, 200, 6


def make_data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    X[rng.random(X.shape) < 0.02] = np.nan
    Z = np.nan_to_num(X)
    logit = Z[:, 0] + Z[:, 1] ** 2 - 1 + 0.5 * Z[:, 2] * Z[:, 3] + 0.3 * np.sin(3 * Z[:, 4])
    y = (logit + rng.normal(scale=0.5, size=rows) > 0).astype(np.float32)
    return X, y


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} us" if seconds < 1e-2 else f"{seconds * 1e3:,.1f} ms"


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    load_before = os.getloadavg()
    X, y = make_data(TRAIN_ROWS, 0)
    t0 = time.perf_counter()
    model = gbdt.train(X, y, params={"objective": "binary:logistic", "max_depth": DEPTH}, num_boost_round=TREES)
    train_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        compiled1 = treecompile.compile_trees(model, cache, nthread=1)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled2 = treecompile.compile_trees(model, cache, nthread=2)
        cache_hit_s = time.perf_counter() - t0
        assert compiled2.from_cache

        Xtest, _ = make_data(ROWS, 1)
        one = np.ascontiguousarray(Xtest[:1])
        booster = model.booster
        booster1 = booster.copy()
        booster1.set_param({"nthread": 1})
        assert np.allclose(compiled1.predict_matrix(Xtest), booster.inplace_predict(Xtest), atol=1e-5)

        cases: dict[str, dict[str, dict[str, float]]] = {
            "1 row": {
                "compiled (1 thread)": timeit(lambda: compiled1.predict_matrix(one), repeats),
                "xgboost inplace_predict": timeit(lambda: booster.inplace_predict(one), repeats),
                "xgboost nthread=1": timeit(lambda: booster1.inplace_predict(one), repeats),
            },
            "100k rows": {
                "compiled (1 thread)": timeit(lambda: compiled1.predict_matrix(Xtest), max(5, repeats // 3)),
                "compiled (2 threads)": timeit(lambda: compiled2.predict_matrix(Xtest), max(5, repeats // 3)),
                "xgboost inplace_predict": timeit(lambda: booster.inplace_predict(Xtest), max(5, repeats // 3)),
                "xgboost nthread=1": timeit(lambda: booster1.inplace_predict(Xtest), max(5, repeats // 3)),
            },
        }
        predictor = treecompile.TreePredictor(model, cache)
        chooser_1 = timeit(lambda: predictor.predict(one), repeats)
        sizes = (1, 4, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 4096)
        crossover, sweep = treecompile.measure_crossover(model, compiled1, sizes=sizes, repeats=max(5, repeats // 2))

    ratios = {
        "1 row: xgboost / compiled": cases["1 row"]["xgboost inplace_predict"]["median_s"]
        / cases["1 row"]["compiled (1 thread)"]["median_s"],
        "1 row: xgboost(nthread=1) / compiled": cases["1 row"]["xgboost nthread=1"]["median_s"]
        / cases["1 row"]["compiled (1 thread)"]["median_s"],
        "100k rows: compiled(1t) / xgboost": cases["100k rows"]["compiled (1 thread)"]["median_s"]
        / cases["100k rows"]["xgboost inplace_predict"]["median_s"],
        "100k rows: compiled(2t) / xgboost": cases["100k rows"]["compiled (2 threads)"]["median_s"]
        / cases["100k rows"]["xgboost inplace_predict"]["median_s"],
    }

    print(f"P4 tree prediction: {TREES} trees, depth {DEPTH}, {FEATURES} features; {os.cpu_count()} cores")
    print(f"train {train_s:.1f} s ({TRAIN_ROWS} rows, hist); compile {compile_s:.2f} s; ", end="")
    print(f"cache hit {cache_hit_s * 1e3:.1f} ms")
    print(f"{'case':<12} {'engine':<26} {'median':>12} {'p10':>12} {'p90':>12}")
    for case, engines in cases.items():
        for engine, st in engines.items():
            print(
                f"{case:<12} {engine:<26} {fmt_us(st['median_s']):>12} {fmt_us(st['p10_s']):>12} "
                f"{fmt_us(st['p90_s']):>12}"
            )
    print(f"{'1 row':<12} {'TreePredictor.predict':<26} {fmt_us(chooser_1['median_s']):>12}")
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}x")
    print(f"{'rows':>6} {'compiled':>12} {'xgboost':>12}  faster")
    for n, row in sweep.items():
        faster = "compiled" if row["compiled"] < row["xgboost"] else "xgboost"
        print(f"{n:>6} {fmt_us(row['compiled']):>12} {fmt_us(row['xgboost']):>12}  {faster}")
    print(f"crossover (smallest size from which xgboost wins at every larger size): {crossover} rows")

    import tl2cgen
    import treelite
    import xgboost

    result = {
        "bench": "p4_tree_predict",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "versions": {"xgboost": xgboost.__version__, "treelite": treelite.__version__, "tl2cgen": tl2cgen.__version__},
        "model": {"trees": TREES, "depth": DEPTH, "features": FEATURES, "train_rows": TRAIN_ROWS},
        "train_s": train_s,
        "compile_s": compile_s,
        "cache_hit_s": cache_hit_s,
        "cases": cases,
        "tree_predictor_1_row": chooser_1,
        "ratios": ratios,
        "sweep_median_s": {str(n): row for n, row in sweep.items()},
        "crossover_rows": crossover,
        "default_crossover_rows": treecompile.DEFAULT_CROSSOVER_ROWS,
    }
    out = Path(__file__).resolve().parent / "results" / "p4_tree_predict.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def _onnx_models() -> dict[str, bytes]:
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier

    X, y = make_data(4000, 2)
    X = np.nan_to_num(X)
    klass = np.digitize(X[:, 0] + 0.5 * X[:, 1], [-0.5, 0.5])
    opset = {"": 17, "ai.onnx.ml": 3}
    gb = GradientBoostingClassifier(n_estimators=100, max_depth=4, random_state=0).fit(X, klass)
    rf = RandomForestClassifier(n_estimators=100, max_depth=8, random_state=0).fit(X, y)
    return {
        "GB multiclass (100x d4)": to_onnx(gb, X[:1], target_opset=opset).SerializeToString(),
        "RF binary (100x d8)": to_onnx(rf, X[:1], target_opset=opset).SerializeToString(),
    }


def onnx_trees(repeats: int) -> dict[str, object]:
    """treelite engine vs onnxruntime on skl2onnx tree ensembles, batch 1 and 1024 (medians, same run)."""
    import onnxruntime as ort

    from mesatee_notebook.ml.onnx_engine import ORTModel
    from mesatee_notebook.ml.onnx_treelib import compile_onnx_trees

    load_before = os.getloadavg()
    rows: dict[str, dict[str, dict[str, float]]] = {}
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        for name, raw in _onnx_models().items():
            for batch in (1, 1024):
                shapes = {"X": [batch, FEATURES]}
                t0 = time.perf_counter()
                trees = compile_onnx_trees(raw, shapes, Path(cache))
                compile_s = time.perf_counter() - t0
                ort1 = ORTModel(raw, shapes, from_cache=False)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 2
                ort2 = ort.InferenceSession(raw, opts, providers=["CPUExecutionProvider"])
                X = make_data(batch, 3)[0]
                want, got = ort1.run({"X": X}), trees.run({"X": X})
                for out, value in want.items():
                    assert np.allclose(got[out], value, rtol=1e-4, atol=1e-4), (name, batch, out)
                case = f"{name}, batch {batch}"
                rows[case] = {
                    "treelite (1 thread)": timeit(lambda t=trees, x=X: t.run({"X": x}), repeats),
                    "onnxruntime (1 thread)": timeit(lambda o=ort1, x=X: o.run({"X": x}), repeats),
                    "onnxruntime (2 threads)": timeit(lambda o=ort2, x=X: o.run(None, {"X": x}), repeats),
                    "compile_s": {"median_s": compile_s, "p10_s": compile_s, "p90_s": compile_s},
                }
                best_ort = min(
                    rows[case]["onnxruntime (1 thread)"]["median_s"], rows[case]["onnxruntime (2 threads)"]["median_s"]
                )
                ratios[case + ": best onnxruntime / treelite"] = (
                    best_ort / rows[case]["treelite (1 thread)"]["median_s"]
                )
    print(f"ONNX tree ensembles ({FEATURES} features): treelite engine vs onnxruntime; load {load_before}")
    print(f"{'case':<36} {'engine':<24} {'median':>12} {'p10':>12} {'p90':>12}")
    for case, engines in rows.items():
        for engine, st in engines.items():
            if engine != "compile_s":
                spread = f"{fmt_us(st['p10_s']):>12} {fmt_us(st['p90_s']):>12}"
                print(f"{case:<36} {engine:<24} {fmt_us(st['median_s']):>12} {spread}")
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}x")
    result = {
        "bench": "p4_onnx_trees",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": {"onnxruntime": ort.__version__},
        "cases": rows,
        "ratios": ratios,
    }
    out = Path(__file__).resolve().parent / "results" / "p4_onnx_trees.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "onnx":
        onnx_trees(int(sys.argv[2]) if len(sys.argv) > 2 else 15)
    else:
        main()
        onnx_trees(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
