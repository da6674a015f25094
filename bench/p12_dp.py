"""P12: a DP group-by vs the same query with no policy, in one run (issue 12; target <= 1.3x).

The query, on a synthetic table: ``f[f.age > 40].groupby("region").agg(n=size, mean_w=mean(weight),
total_age=sum(age), sd_w=std(weight))``. Timed interleaved, median of ``--repeat`` after a warm-up:

* **no policy**: the dataset's owner through the same ``FrameEvaluator`` (the owner is exempt: plain pandas
  evaluation of the plan, no provenance, no noise) -- the baseline;
* **DP, public groups**: an analyst on the DP-mode dataset, regions declared public;
* **DP, partition selection**: the same with the region keys *not* declared public (Laplace threshold);
* **pandas**: the same ops in local pandas, for reference.

In process (no kernel): the transport of a few rows is the same for every variant, so the ratio is the
policy's cost. ``--rows 10000000`` is the issue's size; the default is smaller so a run takes ~1 minute.

    python bench/p12_dp.py [--rows 2000000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mesatee_notebook.enclave.frames import FrameEvaluator
from mesatee_notebook.remote.frame import DPResult, SecureDataFrame
from mesatee_notebook.wire.datapolicy import DP, DataPolicy

OWNER, ANALYST = "owner", "analyst"
REGIONS = ["north", "south", "east", "west", "centre"]


def make_data(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(12)
    return pd.DataFrame(
        {
            "id": np.arange(rows, dtype=np.int64),
            "age": rng.integers(18, 90, rows),
            "weight": rng.normal(75, 12, rows),
            "region": pd.Series(rng.choice(REGIONS, rows), dtype="str"),
        }
    )


class Backend:
    def __init__(self, evaluator: FrameEvaluator, party: str) -> None:
        self.evaluator, self.party = evaluator, party

    def collect(self, plan_json: str, **options: Any) -> tuple[Any, Any]:
        r = self.evaluator.evaluate(plan_json, self.party, **options)
        value = DPResult(r.value, r.accuracy, r.dp) if r.dp is not None else r.value
        return value, r.plan_sha256


def query(f: Any) -> Any:
    return (
        f[f.age > 40]
        .groupby("region")
        .agg(n=("weight", "size"), mean_w=("weight", "mean"), total_age=("age", "sum"), sd_w=("weight", "std"))
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    df = make_data(args.rows)
    bounds = {"age": (18, 100), "weight": (30, 200)}
    public = DataPolicy(privacy=DP(epsilon=1e9, bounds=bounds, unit="id", public_groups={"region": REGIONS}))
    selected = DataPolicy(privacy=DP(epsilon=1e9, delta=1e-3, bounds=bounds, unit="id"))
    events: list[dict[str, Any]] = []
    ev = FrameEvaluator({"pub": (df, public, OWNER), "sel": (df, selected, OWNER)}, events.append)

    def frame(name: str, party: str) -> SecureDataFrame:
        return SecureDataFrame.from_dataset_info(ev.dataset_info(name, party), Backend(ev, party))

    owner, dp_pub, dp_sel = frame("pub", OWNER), frame("pub", ANALYST), frame("sel", ANALYST)
    fns: dict[str, Callable[[], Any]] = {
        "no_policy": lambda: query(owner).collect(),
        "dp_public_groups": lambda: query(dp_pub).collect(epsilon=1.0),
        "dp_partition_selection": lambda: query(dp_sel).collect(epsilon=1.0, delta=1e-6),
        "pandas": lambda: query(df),
    }
    exact = query(df)
    for label, fn in fns.items():  # warm-up and a sanity check: the DP answer is close at epsilon 1
        out = fn()
        if isinstance(out, DPResult):
            got = out.value.reindex(exact.index)
            assert (got["n"] - exact["n"]).abs().max() < 1000, label
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeat):
        for label, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    base = statistics.median(times["no_policy"])
    rows = []
    print(f"P12 DP group-by: {args.rows:,} rows, median of {args.repeat}, interleaved, after a warm-up")
    print(f"{'variant':28} {'median s':>9} {'vs no policy':>13}")
    for label, ts in times.items():
        t = statistics.median(ts)
        rows.append({"variant": label, "median_s": t, "ratio_vs_no_policy": t / base})
        print(f"{label:28} {t:9.3f} {t / base:12.2f}x")
    out = Path(__file__).parent / "results" / "p12_dp.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "rows": args.rows,
                "repeat": args.repeat,
                "python": platform.python_version(),
                "pandas": pd.__version__,
                "opendp": __import__("importlib.metadata").metadata.version("opendp"),
                "cpus": os.cpu_count(),
                "load_avg": os.getloadavg(),
                "results": rows,
                "queries": len(events),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
