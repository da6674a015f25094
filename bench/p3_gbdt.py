"""P3/P8 (and end-to-end P4): xgboost training through the enclave's GBDT service vs native xgboost.

P3: 1M x 28 float32 features (HIGGS-shaped synthetic, binary label), 100 rounds, hist, depth 6, same params
and seed on both sides. The enclave figure includes sending the data: (a) inline with the train call, and
(b) ``Session.upload`` then training on the stored dataset by name. Per-round progress streams back in
both. Native: ``xgb.DMatrix`` + ``xgb.train`` in this process. Runs alternate native / enclave so load from
other jobs hits both alike.
P8: peak PSS of the kernel process tree (supervisor + service worker) during one more, untimed inline training call,
as a multiple of the dataset's bytes (and the increment over the tree's idle PSS).
P4 end to end: prediction of 1 row and of 100k rows through ``gbdt.predict`` (verified receipt
included) against native ``inplace_predict`` in this process.

Usage: python bench/p3_gbdt.py [ROWS] [ROUNDS]; writes bench/results/p3_gbdt.json.
P8 alone: python bench/p3_gbdt.py --p8-only [ROWS] [ROUNDS]: inline training, then upload and training by name,
each with the peak PSS of the kernel tree and its split between supervisor and service worker at the peak;
writes bench/results/p8_gbdt_memory_<ROWS>.json. Memory is not load-sensitive (time is), so it can run on a
busy machine; peak is reached while the matrix is built and in the first rounds, so few rounds suffice.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import xgboost as xgb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mesatee_notebook as mn
from bench.p2_upload import PeakMemory
from tests.conftest import start_kernel, stop_kernel

PARAMS = {"objective": "binary:logistic", "tree_method": "hist", "max_depth": 6, "eta": 0.1, "seed": 0, "max_bin": 256}


def higgs_like(rows: int, seed: int = 0) -> pd.DataFrame:
    """28 float32 features (21 'low-level' normal/abs-normal, 7 'high-level' products), binary label."""
    rng = np.random.default_rng(seed)
    low = rng.normal(size=(rows, 21)).astype(np.float32)
    low[:, ::3] = np.abs(low[:, ::3])
    high = np.stack([low[:, i] * low[:, i + 1] + 0.1 * rng.normal(size=rows) for i in range(0, 14, 2)], axis=1)
    X = np.concatenate([low, high.astype(np.float32)], axis=1)
    logit = X[:, 0] - X[:, 3] + 0.8 * X[:, 21] - 0.6 * X[:, 22] + 0.5 * X[:, 5] * X[:, 7]
    y = (logit + rng.logistic(size=rows) > 0).astype(np.float32)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(28)])
    df["label"] = y
    return df


def native_train(df: pd.DataFrame, rounds: int) -> tuple[float, xgb.Booster]:
    t = time.perf_counter()
    X = df.drop(columns=["label"]).to_numpy(dtype=np.float32)
    d = xgb.DMatrix(X, label=df["label"].to_numpy(), feature_names=list(df.columns[:-1]))
    booster = xgb.train(PARAMS, d, num_boost_round=rounds)
    return time.perf_counter() - t, booster


def tree_pss(pid: int) -> int:
    total = 0
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


class TreePeak:
    """Samples the PSS of each process of a kernel tree every 0.1 s; keeps the peak total and its split."""

    def __init__(self, pid: int) -> None:
        import threading

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.split: dict[str, int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            parts: dict[str, int] = {}
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    name = "supervisor" if p.pid == self.proc.pid else f"child {p.pid}"
                    parts[name] = p.memory_full_info().pss
                except psutil.Error:
                    pass
            total = sum(parts.values())
            if total > self.peak:
                self.peak, self.split = total, parts
            time.sleep(0.1)

    def __enter__(self) -> TreePeak:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def p8_only(rows: int, rounds: int) -> None:
    """P8: the kernel tree's peak PSS while training inline and by name, over the dataset's bytes."""
    os.environ.setdefault("MESATEE_HOME", tempfile.mkdtemp())
    df = higgs_like(rows)
    nbytes = int(df.memory_usage(index=False).sum())
    out: dict[str, object] = {
        "bench": "p8_gbdt_memory",
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
        "versions": {"xgboost": xgb.__version__},
        "rows": rows,
        "rounds": rounds,
        "params": PARAMS,
        "dataset_bytes": nbytes,
    }
    with tempfile.TemporaryDirectory() as d:
        k = start_kernel(Path(d) / "k")
        try:
            s = mn.connect(k.url, policy=k.policy(), identity=Path(d) / "party")
            s.gbdt.train(higgs_like(2_000, seed=1), "label", params=PARAMS, num_boost_round=2, progress=False)
            idle = tree_pss(k.proc.pid)
            with TreePeak(k.proc.pid) as inline:
                t0 = time.perf_counter()
                s.gbdt.train(df, "label", params=PARAMS, num_boost_round=rounds, progress=False)
                inline_s = time.perf_counter() - t0
            after_inline = tree_pss(k.proc.pid)
            s.upload(df, "p8_higgs", replace=True)
            idle_stored = tree_pss(k.proc.pid)
            with TreePeak(k.proc.pid) as stored:
                s.gbdt.train("p8_higgs", "label", params=PARAMS, num_boost_round=rounds, progress=False)
            after_stored = tree_pss(k.proc.pid)
            s.close()
        finally:
            stop_kernel(k)
    for name, peak, base in (("inline", inline, idle), ("by_name", stored, idle_stored)):
        out[name] = {
            "peak_pss_bytes": peak.peak,
            "idle_pss_bytes": base,
            "split_at_peak": peak.split,
            "peak_over_dataset": peak.peak / nbytes,
            "increment_over_dataset": (peak.peak - base) / nbytes,
        }
    out["inline"]["seconds"] = inline_s  # type: ignore[index]
    out["after_inline_pss_bytes"], out["after_by_name_pss_bytes"] = after_inline, after_stored
    out["machine"]["loadavg_after"] = os.getloadavg()  # type: ignore[index]
    print(f"P8 {rows}x28 float32 ({nbytes / 1e6:.0f} MB), {rounds} rounds: kernel tree PSS")
    for name, base in (("inline", idle), ("by_name", idle_stored)):
        r = out[name]
        assert isinstance(r, dict)
        split = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in r["split_at_peak"].items())
        print(
            f"  {name:8s} idle {base / 1e9:.2f} GB  peak {r['peak_pss_bytes'] / 1e9:.2f} GB = "
            f"{r['peak_over_dataset']:.2f}x dataset (increment {r['increment_over_dataset']:.2f}x)  [{split}]"
        )
    path = Path(__file__).resolve().parent / "results" / f"p8_gbdt_memory_{rows}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


def timed(fn: object, n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append(time.perf_counter() - t)
    samples.sort()
    return {
        "median_s": statistics.median(samples),
        "p10_s": samples[len(samples) // 10],
        "p90_s": samples[(len(samples) * 9) // 10],
    }


def main() -> None:
    if sys.argv[1:2] == ["--p8-only"]:
        rest = sys.argv[2:]
        p8_only(int(rest[0]) if rest else 1_000_000, int(rest[1]) if len(rest) > 1 else 10)
        return
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    os.environ.setdefault("MESATEE_HOME", tempfile.mkdtemp())
    df = higgs_like(rows)
    nbytes = int(df.memory_usage(index=False).sum())
    load_before = os.getloadavg()
    out: dict[str, object] = {
        "bench": "p3_gbdt",
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before},
        "versions": {"xgboost": xgb.__version__},
        "rows": rows,
        "features": 28,
        "rounds": rounds,
        "params": PARAMS,
        "dataset_bytes": nbytes,
    }
    native: list[float] = []
    inline: list[float] = []
    stored: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        k = start_kernel(Path(d) / "k")
        try:
            s = mn.connect(k.url, policy=k.policy(), identity=Path(d) / "party")
            warm = higgs_like(2_000, seed=1)
            s.gbdt.train(warm, "label", params=PARAMS, num_boost_round=2, progress=False)  # worker + xgboost import
            idle = tree_pss(k.proc.pid)

            # Timed runs alternate native / enclave with no memory sampler running: PeakMemory reads every
            # process's smaps 10 times a second, which on 2 cores takes CPU from the training it measures.
            events: list[dict[str, object]] = []
            for _ in range(2):
                t, booster = native_train(df, rounds)
                native.append(t)
                events.clear()
                t0 = time.perf_counter()
                model = s.gbdt.train(df, "label", params=PARAMS, num_boost_round=rounds, progress=events.append)
                inline.append(time.perf_counter() - t0)
                assert len(events) == rounds
            with PeakMemory(k.proc.pid) as pm:  # P8: one more inline training, untimed, before
                # any by-name training (whose cached frame would stay in the worker)
                s.gbdt.train(df, "label", params=PARAMS, num_boost_round=rounds, progress=False)
            peak = pm.peak
            t, _ = native_train(df, rounds)
            native.append(t)
            t0 = time.perf_counter()
            s.upload(df, "p3_higgs", replace=True)
            up = time.perf_counter() - t0
            m2 = s.gbdt.train("p3_higgs", "label", params=PARAMS, num_boost_round=rounds, progress=lambda e: None)
            stored.append(time.perf_counter() - t0)
            out["upload_s"] = up

            Xn = df.drop(columns=["label"]).to_numpy(dtype=np.float32)
            probe = df.drop(columns=["label"]).iloc[:100_000]
            got = model.predict(probe, engine="xgboost")
            parity = float(np.max(np.abs(got - booster.inplace_predict(Xn[:100_000]))))
            out["parity_max_abs_diff_100k"] = parity
            del m2

            # P4 end to end: one row and 100k rows through the service (receipt verified each call).
            model.compile()
            one = df.drop(columns=["label"]).iloc[:1]
            one_np = Xn[:1]
            model.predict(one)
            svc_1 = timed(lambda: model.predict(one), 50)
            engine_1 = model.last_engine
            nat_1 = timed(lambda: booster.inplace_predict(one_np), 200)
            svc_100k = timed(lambda: model.predict(probe), 5)
            engine_100k = model.last_engine
            nat_100k = timed(lambda: booster.inplace_predict(Xn[:100_000]), 5)
            ping = timed(s.ping, 50)
            s.close()
        finally:
            stop_kernel(k)
    mn_native, mn_inline, mn_stored = statistics.median(native), statistics.median(inline), statistics.median(stored)
    out.update(
        {
            "native_s": native,
            "enclave_inline_s": inline,
            "enclave_upload_then_train_s": stored,
            "ratio_inline": mn_inline / mn_native,
            "ratio_upload_then_train": mn_stored / mn_native,
            "p8_peak_pss_bytes": peak,
            "p8_idle_pss_bytes": idle,
            "p8_peak_over_dataset": peak / nbytes,
            "p8_increment_over_dataset": (peak - idle) / nbytes,
            "p4_e2e": {
                "1 row": {
                    "service": svc_1,
                    "engine": engine_1,
                    "native inplace_predict": nat_1,
                    "ping round trip": ping,
                },
                "100k rows": {"service": svc_100k, "engine": engine_100k, "native inplace_predict": nat_100k},
            },
        }
    )
    out["machine"]["loadavg_after"] = os.getloadavg()  # type: ignore[index]
    print(f"P3 xgboost {rows}x28 float32, {rounds} rounds hist depth 6 (dataset {nbytes / 1e6:.0f} MB)")
    print(f"  native xgboost (DMatrix + train)        {mn_native:8.2f} s   runs {[round(x, 2) for x in native]}")
    print(f"  enclave, data inline with the call      {mn_inline:8.2f} s   ratio {mn_inline / mn_native:.2f}x")
    print(f"  enclave, upload {up:.2f} s + train by name {mn_stored:8.2f} s   ratio {mn_stored / mn_native:.2f}x")
    print(f"  parity vs native on 100k rows: max |diff| {parity:.2e}")
    print(
        f"P8 kernel peak PSS while training: {peak / 1e9:.2f} GB = {peak / nbytes:.2f}x dataset "
        f"(idle {idle / 1e9:.2f} GB; increment {(peak - idle) / nbytes:.2f}x)"
    )
    print(
        f"P4 e2e 1 row: service {svc_1['median_s'] * 1e3:.2f} ms ({engine_1}), ping {ping['median_s'] * 1e3:.2f} ms, "
        f"native {nat_1['median_s'] * 1e6:.0f} us"
    )
    print(
        f"P4 e2e 100k rows: service {svc_100k['median_s']:.3f} s ({engine_100k}), native {nat_100k['median_s']:.3f} s"
    )
    path = Path(__file__).resolve().parent / "results" / "p3_gbdt.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
