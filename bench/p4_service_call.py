"""P4 end to end: where a 1-row ``gbdt.predict`` spends its time, against a trivial cell (the P1 round trip).

One real softtee kernel on loopback, one party. A small model (28 features, 20 rounds, compiled trees) is
trained first. Then, interleaved round-robin so load from other jobs hits all alike, N samples each of:

- ``ping``: the channel alone (TLS both ways, the supervisor; no worker, no receipt);
- ``run('1+1')``: a trivial cell, the P1 figure the target is relative to;
- ``dataset.list``: the service path with no engine work (supervisor -> service worker -> signed receipt);
- ``gbdt.importance``: the same plus the model-handle lookup;
- ``gbdt.predict`` of a 1-row numpy array, of a 1-row DataFrame (Arrow encode/decode), and of a stored
  dataset's first row by name (the dataset lookup and metadata reads);
- the engine alone (``predict_seconds`` reported by the service).

Prints a table (median and p90 in ms, ratio to the cell) and writes bench/results/p4_service_call.json.
Usage: python bench/p4_service_call.py [N]    (default 200)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mesatee_notebook as mn
from bench.p3_gbdt import PARAMS, higgs_like
from tests.conftest import start_kernel, stop_kernel


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_s": statistics.median(ordered), "p90_s": ordered[(len(ordered) * 9) // 10], "n": len(ordered)}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    os.environ.setdefault("MESATEE_HOME", tempfile.mkdtemp())
    load_before = os.getloadavg()
    df = higgs_like(20_000)
    one_df = df.drop(columns=["label"]).iloc[:1]
    one_np = one_df.to_numpy(dtype=np.float32)
    samples: dict[str, list[float]] = {}
    engine: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        k = start_kernel(Path(d) / "k")
        try:
            s = mn.connect(
                k.url,
                policy=mn.Policy(platform_roots=[k.fingerprint], measurements=[k.measurement]),
                identity=Path(d) / "party",
            )
            model = s.gbdt.train(df, "label", params=PARAMS, num_boost_round=20, progress=False)
            model.compile()
            s.upload(df.iloc[:1000].drop(columns=["label"]), "p4_rows", replace=True)
            mid = model.id

            def predict_named() -> None:
                s.call("gbdt.predict", {"model": mid, "data": {"dataset": "p4_rows"}, "remote": False})

            def predict_np() -> None:
                res = s.call("gbdt.predict", {"model": mid, "data": {"input": "x"}}, {"x": one_np})
                engine.append(float(res.info["predict_seconds"]))

            cases: dict[str, Callable[[], Any]] = {
                "ping": s.ping,
                "cell run('1+1')": lambda: s.run("1+1"),
                "dataset.list": lambda: s.call("dataset.list"),
                "gbdt.importance": model.feature_importance,
                "predict 1 row (numpy)": predict_np,
                "predict 1 row (DataFrame)": lambda: model.predict(one_df),
                "predict 1000 rows by dataset name": predict_named,
            }
            for fn in cases.values():  # warm: worker start, imports, compiled trees, dataset decode
                fn()
                fn()
            engine.clear()
            for _ in range(n):
                for name, fn in cases.items():
                    t0 = time.perf_counter()
                    fn()
                    samples.setdefault(name, []).append(time.perf_counter() - t0)
            s.close()
        finally:
            stop_kernel(k)
    rows = {name: summary(v) for name, v in samples.items()}
    rows["engine (predict_seconds, in the worker)"] = summary(engine)
    cell = rows["cell run('1+1')"]["median_s"]
    print(f"P4 service call costs, {n} interleaved samples each (load before {load_before[0]:.1f})")
    print(f"{'call':<42} {'median ms':>10} {'p90 ms':>8} {'x cell':>7}")
    for name, r in rows.items():
        print(f"{name:<42} {r['median_s'] * 1e3:>10.3f} {r['p90_s'] * 1e3:>8.3f} {r['median_s'] / cell:>6.2f}x")
    out = {
        "bench": "p4_service_call",
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "samples_per_case": n,
        "cases": rows,
        "ratio_predict_numpy_vs_cell": rows["predict 1 row (numpy)"]["median_s"] / cell,
        "ratio_predict_dataframe_vs_cell": rows["predict 1 row (DataFrame)"]["median_s"] / cell,
    }
    path = Path(__file__).resolve().parent / "results" / "p4_service_call.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
