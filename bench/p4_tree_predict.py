"""P4: tree prediction latency, compiled trees (treelite + tl2cgen + gcc) vs xgboost ``inplace_predict``.

Engine level (no channel yet): one binary:logistic model (200 trees, depth 6, 30 features, trained on
20k synthetic rows with hist), predicted on 1 row and on 100k rows, plus a batch-size sweep that finds
the crossover used by ``TreePredictor``. xgboost runs with its default threads (all cores) and, for
comparison, with nthread=1: on a shared machine its OpenMP barriers wait for a busy core's time slice.
Medians of R samples, each sample a loop of at least 50 ms. The load average is recorded with the figures.
Prints a table and writes bench/results/p4_tree_predict.json.
Usage: python bench/p4_tree_predict.py [REPEATS]
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


if __name__ == "__main__":
    main()
