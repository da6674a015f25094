"""Fairness: a short frame query's latency while other parties run a long job, vs an idle kernel, vs one serial worker.

Usage: python bench/fairness.py [PSI items per party, default 4_000_000] [--train]

For each kernel mode (``pool``: the default service workers; ``serial``: ``--service-workers 0``, every service in one
worker as before issue 11) it measures, for party carol:

- ``idle``: a ``groupby().sum()`` SecureDataFrame query on a small dataset, kernel otherwise idle;
- ``during PSI``: the same query while alice and bob's PSI job (N items each) runs in bob's approve call;
- ``during training`` (``--train``): while alice trains a 300-round xgboost model (a long general-pool job).

Prints a table and writes bench/results/fairness.json. The target (issue 11): during-PSI median <= 2x idle.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mesatee_notebook as mn
from tests.conftest import KernelProc, start_kernel, stop_kernel

RESULTS = Path(__file__).resolve().parent / "results" / "fairness.json"


def query(carol: Any) -> float:
    t = time.perf_counter()
    out = carol.dataframe("carol_small").groupby("g").agg(s=("v", "sum")).collect()
    assert len(out) == 4
    return time.perf_counter() - t


def during(carol: Any, job: Any) -> tuple[list[float], float]:
    """Run ``job`` in a thread; query repeatedly while it runs. Returns (latencies, job seconds)."""
    done = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        t = time.perf_counter()
        try:
            job()
        finally:
            box["s"] = time.perf_counter() - t
            done.set()

    th = threading.Thread(target=run)
    th.start()
    time.sleep(0.3)  # let the job reach its worker
    lat: list[float] = []
    while not done.is_set():
        lat.append(query(carol))
        done.wait(0.05)  # a user's pace, not a flood: the queries must not be what slows the job down
    th.join()
    return lat, float(box["s"])


def stats(lat: list[float]) -> dict[str, Any]:
    if not lat:
        return {"n": 0}
    ms = sorted(x * 1e3 for x in lat)
    p95 = ms[min(len(ms) - 1, int(0.95 * len(ms)))]
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 1),
        "p95_ms": round(p95, 1),
        "max_ms": round(ms[-1], 1),
    }


def mode_run(k: KernelProc, tmp: Path, n: int, train: bool, tag: str) -> dict[str, Any]:
    pol = k.policy()
    alice = mn.connect(k.url, policy=pol, identity=tmp / "alice")
    bob = mn.connect(k.url, policy=pol, identity=tmp / "bob")
    carol = mn.connect(k.url, policy=pol, identity=tmp / "carol")
    try:
        carol.upload(
            pd.DataFrame({"g": list("abcd") * 25, "v": range(100)}),
            "carol_small",
            policy=mn.DataPolicy(min_group_size=5),
            replace=True,
        )
        for _ in range(5):
            query(carol)  # warm: workers started, dataset cached
        idle = [query(carol) for _ in range(30)]
        rng = np.random.default_rng(1)
        a = rng.integers(0, 2**62, n, dtype=np.int64)
        b = np.concatenate([a[: n // 2], rng.integers(0, 2**62, n - n // 2, dtype=np.int64)])
        name = f"fair-{tag}-{n}"
        alice.psi.create(name, [alice.party_id, bob.party_id], mode="cardinality", receivers=[alice.party_id])
        alice.psi.submit(name, a)
        bob.psi.submit(name, b)
        psi_lat, psi_s = during(carol, lambda: bob.psi.approve(name))
        row: dict[str, Any] = {"idle": stats(idle), "during_psi": stats(psi_lat), "psi_s": round(psi_s, 2)}
        if train:
            df = pd.DataFrame(rng.normal(size=(50_000, 10)), columns=[f"f{i}" for i in range(10)])
            df["y"] = rng.normal(size=len(df))
            tr_lat, tr_s = during(
                carol,
                lambda: alice.call(
                    "gbdt.train",
                    {"data": {"input": "d"}, "label": "y", "num_boost_round": 300, "progress": False},
                    {"d": df},
                ),
            )
            row |= {"during_training": stats(tr_lat), "train_s": round(tr_s, 2)}
        return row
    finally:
        for s in (alice, bob, carol):
            s.close()


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(float(args[0])) if args else 4_000_000
    train = "--train" in sys.argv
    out: dict[str, Any] = {"items_per_party": n, "modes": {}}
    for mode, extra in (("pool", ()), ("serial", ("--service-workers", "0"))):
        with tempfile.TemporaryDirectory(prefix=f"fair-{mode}-") as d:
            k = start_kernel(Path(d) / "k", *extra)
            try:
                out["modes"][mode] = mode_run(k, Path(d), n, train, mode)
            finally:
                stop_kernel(k)
    print(f"short frame query (carol) while alice+bob run a {n:,}-item PSI" + (" / a training run" if train else ""))
    print(f"{'mode':<8} {'idle med ms':>12} {'during PSI med':>15} {'p95':>8} {'n':>4} {'ratio':>7} {'PSI s':>6}")
    for mode, r in out["modes"].items():
        ratio = r["during_psi"].get("median_ms", float("nan")) / r["idle"]["median_ms"]
        r["ratio_psi"] = round(ratio, 2)
        print(
            f"{mode:<8} {r['idle']['median_ms']:>12} {r['during_psi'].get('median_ms', '-')!s:>15} "
            f"{r['during_psi'].get('p95_ms', '-')!s:>8} {r['during_psi']['n']:>4} {ratio:>7.2f} {r['psi_s']:>6}"
        )
        if "during_training" in r:
            t = r["during_training"]
            r["ratio_training"] = round(t.get("median_ms", float("nan")) / r["idle"]["median_ms"], 2)
            print(
                f"{'':<8} during training: median {t.get('median_ms')} ms, p95 {t.get('p95_ms')} ms, "
                f"n {t['n']}, ratio {r['ratio_training']}, training {r['train_s']} s"
            )
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
