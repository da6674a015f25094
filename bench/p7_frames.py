"""P7: SecureDataFrame plans evaluated in the enclave evaluator vs the same ops in local pandas.

The data is already in the enclave (an in-memory registry), so this measures plan parsing,
validation, evaluation, provenance tracking and the policy on the result; upload is measured
elsewhere. Each query runs as an analyst (policy enforced, differencing guard on) and as the
owner (exempt). Also times pyarrow's group_by on the same data, to decide pandas vs pyarrow.

    python bench/p7_frames.py [--rows 10000000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from mesatee_notebook.enclave.frames import FrameEvaluator
from mesatee_notebook.remote.frame import SecureDataFrame
from mesatee_notebook.wire.datapolicy import DataPolicy

OWNER, ANALYST = "owner", "analyst"


def make_data(rows: int, dim_rows: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(7)
    fact = pd.DataFrame(
        {
            "id": np.arange(rows, dtype=np.int64),
            "site": rng.integers(0, dim_rows, rows),
            "age": rng.integers(18, 90, rows),
            "weight": rng.normal(75, 12, rows),
            "height": rng.normal(1.72, 0.1, rows),
            "region": pd.Series(rng.choice(["north", "south", "east", "west", "centre"], rows), dtype="str"),
        }
    )
    dim = pd.DataFrame(
        {
            "site": np.arange(dim_rows, dtype=np.int64),
            "country": pd.Series(rng.choice([f"c{i}" for i in range(40)], dim_rows), dtype="str"),
        }
    )
    return fact, dim


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    out = fn()  # warm-up, not counted
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


class Backend:
    def __init__(self, evaluator: FrameEvaluator, party: str) -> None:
        self.evaluator, self.party = evaluator, party

    def collect(self, plan_json: str) -> tuple[Any, Any]:
        r = self.evaluator.evaluate(plan_json, self.party)
        return r.value, r.plan_sha256


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--dim-rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    fact, dim = make_data(args.rows, args.dim_rows)
    policy = DataPolicy(min_group_size=10, allow_rows=False, differencing_guard=True)
    events: list[dict[str, Any]] = []
    evaluator = FrameEvaluator(
        {"fact": (fact, policy, OWNER), "dim": (dim, DataPolicy(min_group_size=10), OWNER)}, events.append
    )

    def frames(party: str) -> tuple[SecureDataFrame, SecureDataFrame]:
        b = Backend(evaluator, party)
        return tuple(SecureDataFrame.from_dataset_info(evaluator.dataset_info(n, party), b) for n in ("fact", "dim"))  # type: ignore[return-value]

    def groupby_query(f: Any) -> Any:
        return (
            f[f.age > 40]
            .assign(bmi=f.weight / (f.height**2))
            .groupby("region")
            .agg(n=("bmi", "size"), mean_bmi=("bmi", "mean"))
        )

    def join_agg_query(f: Any, d: Any) -> Any:
        return f.merge(d, on="site").groupby("country").agg(n=("age", "size"), mean_age=("age", "mean"))

    rows: list[dict[str, Any]] = []

    def bench(name: str, local: Callable[[], Any], remote: dict[str, Callable[[], Any]]) -> None:
        """Time pandas and the enclave variants interleaved, so they share memory conditions."""
        fns = {"pandas": local, **remote}
        times: dict[str, list[float]] = {k: [] for k in fns}
        expected = local()
        for fn in remote.values():  # correctness first (also the warm-up)
            got = fn()
            if isinstance(expected, pd.DataFrame):
                pd.testing.assert_frame_equal(got, expected)
        del expected, got
        for _ in range(args.repeat):
            for label, fn in fns.items():
                gc.collect()
                t0 = time.perf_counter()
                out = fn()
                times[label].append(time.perf_counter() - t0)
                del out
        t_local = statistics.median(times["pandas"])
        row: dict[str, Any] = {"query": name, "pandas_s": t_local}
        for label in remote:
            t = statistics.median(times[label])
            row[f"{label}_s"] = t
            row[f"{label}_ratio"] = t / t_local
        rows.append(row)

    fa, da = frames(ANALYST)
    fo, do = frames(OWNER)
    bench(
        "filter+assign+groupby-agg",
        lambda: groupby_query(fact),
        {"enclave_analyst": lambda: groupby_query(fa).collect(), "enclave_owner": lambda: groupby_query(fo).collect()},
    )
    bench(
        f"merge({args.dim_rows} rows)+groupby-agg",
        lambda: join_agg_query(fact, dim),
        {
            "enclave_analyst": lambda: join_agg_query(fa, da).collect(),
            "enclave_owner": lambda: join_agg_query(fo, do).collect(),
        },
    )
    bench(
        f"merge({args.dim_rows} rows), rows out",
        lambda: fact.merge(dim, on="site"),
        {"enclave_owner": lambda: fo.merge(do, on="site").collect()},
    )

    # pandas vs pyarrow for the same group-by (data already in each format)
    table = pa.Table.from_pandas(fact, preserve_index=False)

    def arrow_groupby() -> Any:
        import pyarrow.compute as pc

        t = table.filter(pc.greater(table["age"], 40))
        bmi = pc.divide(t["weight"], pc.power(t["height"], 2))
        t = t.append_column("bmi", bmi)
        return t.group_by("region").aggregate([("bmi", "count"), ("bmi", "mean")])

    t_arrow, _ = timed(arrow_groupby, args.repeat)
    t_pandas, _ = timed(lambda: groupby_query(fact), args.repeat)
    rows.append(
        {
            "query": "filter+assign+groupby-agg (pyarrow compute)",
            "pandas_s": t_pandas,
            "pyarrow_s": t_arrow,
            "pyarrow_ratio": t_arrow / t_pandas,
        }
    )

    versions = f"Python {platform.python_version()}, pandas {pd.__version__}, pyarrow {pa.__version__}"
    print(f"P7 frames: {args.rows:,} rows, median of {args.repeat}, interleaved, after a warm-up, {versions}")
    header = f"{'query':45} {'pandas':>9} {'analyst':>9} {'ratio':>7} {'owner':>9} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "pyarrow_s" in r:
            arrow = f"{r['pyarrow_s']:9.3f} {r['pyarrow_ratio']:6.2f}x"
            print(f"{r['query']:45} {r['pandas_s']:9.3f} {'pyarrow':>9} {'':7} {arrow}")
            continue
        a = (
            f"{r['enclave_analyst_s']:9.3f} {r['enclave_analyst_ratio']:6.2f}x"
            if "enclave_analyst_s" in r
            else f"{'-':>9} {'':7}"
        )
        print(f"{r['query']:45} {r['pandas_s']:9.3f} {a} {r['enclave_owner_s']:9.3f} {r['enclave_owner_ratio']:6.2f}x")
    out = Path(__file__).parent / "results" / "p7_frames.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "rows": args.rows,
                "dim_rows": args.dim_rows,
                "repeat": args.repeat,
                "python": platform.python_version(),
                "pandas": pd.__version__,
                "pyarrow": pa.__version__,
                "cpus": __import__("os").cpu_count(),
                "results": rows,
                "audit_events": len(events),
                "refused": sum(e["outcome"] != "released" for e in events),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
