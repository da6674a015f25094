"""P7: SecureDataFrame plans evaluated in the enclave vs the same ops in local pandas, in one run.

Two enclave variants, timed interleaved with local pandas on the same data:

* **in-process**: the ``FrameEvaluator`` over an in-memory registry. This isolates plan parsing,
  validation, evaluation, provenance tracking and the policy on the result.
* **kernel** (end to end): a real ``mesatee-enclave serve`` process (softtee, loopback). The owner
  uploads the tables (timed separately, with the first query that unseals and decodes them in the
  service worker); each query is a ``frame.collect`` through ``Session.call`` on an attested TLS
  channel with a proven party key, and its receipt is verified before the value is returned.

Each query runs as an analyst (policy enforced, differencing guard on) and as the owner (exempt).
Also times pyarrow's group_by on the same data, to decide pandas vs pyarrow.

The kernel variants' CPU time is this process's plus that of the kernel's whole process tree (supervisor, service
workers, every thread, from ``/proc``), so the cost of moving a result (issue 15 P7 rows out) shows next to wall
time on a shared machine.

The rows-out query also times its physical floor in the same loop (``bench/tls_floor.py``): bare TLS 1.3 between two
processes on loopback with the channel's settings, carrying exactly as many bytes as the result's Arrow IPC encoding
(``floor tls``), and the same with one BLAKE3 pass on each side (``floor tls+b3``, the digests a receipt needs). Their
CPU is this process's plus the floor server's. The kernel path's ratio to that floor is printed and in the JSON.

    python bench/p7_frames.py [--rows 10000000] [--repeat 5] [--no-kernel] [--no-floor] [--only rows-out]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mesatee_notebook as mn
from mesatee_notebook.enclave.frames import FrameEvaluator
from mesatee_notebook.remote.frame import SecureDataFrame
from mesatee_notebook.wire.codecs import encode_value
from mesatee_notebook.wire.datapolicy import DataPolicy
from tests.conftest import start_kernel, stop_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tls_floor import FloorClient

OWNER, ANALYST = "owner", "analyst"
_KERNEL_PID: list[int] = []  # the kernel's pid once started: its process tree's CPU counts for the kernel variants
_FLOOR_PID: list[int] = []  # the TLS floor's sending process: its CPU counts for the floor variants


def other_cpu(label: str) -> float:
    """CPU seconds so far of the other processes a variant uses (the kernel's tree, the floor's sender)."""
    if label.startswith("kernel_") and _KERNEL_PID:
        return tree_cpu(_KERNEL_PID[0])
    if label.startswith("floor_") and _FLOOR_PID:
        return tree_cpu(_FLOOR_PID[0])
    return 0.0


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread, live or gone) of ``pid`` and its descendants, from /proc."""
    tck = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / tck
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


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
    ap.add_argument("--no-kernel", action="store_true", help="skip the end-to-end variant on a real kernel")
    ap.add_argument("--no-floor", action="store_true", help="skip the bare-TLS floor of the rows-out query")
    ap.add_argument("--only", choices=["rows-out"], help="run only this query")
    args = ap.parse_args()
    fact, dim = make_data(args.rows, args.dim_rows)
    policy = DataPolicy(min_group_size=10, allow_rows=False, differencing_guard=True)
    dim_policy = DataPolicy(min_group_size=10)
    events: list[dict[str, Any]] = []
    evaluator = FrameEvaluator({"fact": (fact, policy, OWNER), "dim": (dim, dim_policy, OWNER)}, events.append)

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
    upload: dict[str, Any] = {}

    def bench(name: str, local: Callable[[], Any], remote: dict[str, Callable[[], Any]]) -> None:
        """Time pandas and the enclave variants interleaved, so they share memory conditions."""
        fns = {"pandas": local, **remote}
        times: dict[str, list[float]] = {k: [] for k in fns}
        cpu: dict[str, list[float]] = {k: [] for k in fns}  # this process's CPU time: in-process variants only
        expected = local()
        for label, fn in remote.items():  # correctness first (also the warm-up)
            got = fn()
            if isinstance(expected, pd.DataFrame) and not label.startswith("floor_"):
                pd.testing.assert_frame_equal(got, expected)
        del expected, got
        for _ in range(args.repeat):
            for label, fn in fns.items():
                gc.collect()
                k0 = other_cpu(label)
                t0, c0 = time.perf_counter(), time.process_time()
                out = fn()
                times[label].append(time.perf_counter() - t0)
                c1 = time.process_time()
                k1 = other_cpu(label)
                cpu[label].append(c1 - c0 + k1 - k0)
                del out
        t_local = statistics.median(times["pandas"])
        c_local = statistics.median(cpu["pandas"])
        row: dict[str, Any] = {"query": name, "pandas_s": t_local, "pandas_cpu_s": c_local}
        row["pandas_p10_s"] = sorted(times["pandas"])[len(times["pandas"]) // 10]
        for label in remote:
            t = statistics.median(times[label])
            row[f"{label}_s"] = t
            row[f"{label}_ratio"] = t / t_local
            row[f"{label}_p10_s"] = sorted(times[label])[len(times[label]) // 10]
            if label.startswith(("enclave_", "floor_")) or _KERNEL_PID:  # + the kernel's tree, the floor's sender
                row[f"{label}_cpu_s"] = statistics.median(cpu[label])
                row[f"{label}_cpu_ratio"] = row[f"{label}_cpu_s"] / c_local
        for floor in ("floor_tls", "floor_tls_blake3"):
            if f"{floor}_s" in row and "kernel_owner_s" in row:
                row[f"kernel_owner_over_{floor}"] = row["kernel_owner_s"] / row[f"{floor}_s"]
                row[f"kernel_owner_over_{floor}_cpu"] = row["kernel_owner_cpu_s"] / row[f"{floor}_cpu_s"]
        rows.append(row)
        print(f"  {name}: " + ", ".join(f"{k} {statistics.median(v):.3f}s" for k, v in times.items()), flush=True)

    fa, da = frames(ANALYST)
    fo, do = frames(OWNER)
    groupby_fns: dict[str, Callable[[], Any]] = {
        "enclave_analyst": lambda: groupby_query(fa).collect(),
        "enclave_owner": lambda: groupby_query(fo).collect(),
    }
    join_fns: dict[str, Callable[[], Any]] = {
        "enclave_analyst": lambda: join_agg_query(fa, da).collect(),
        "enclave_owner": lambda: join_agg_query(fo, do).collect(),
    }
    rows_fns: dict[str, Callable[[], Any]] = {"enclave_owner": lambda: fo.merge(do, on="site").collect()}
    floor: FloorClient | None = None
    if not args.no_floor:  # the physical floor of moving the result: exactly its Arrow IPC bytes over bare TLS
        rows_bytes = encode_value(fact.merge(dim, on="site")).nbytes
        floor = FloorClient()
        _FLOOR_PID.append(floor.pid)
        rows_fns |= {
            "floor_tls": lambda: floor.fetch(rows_bytes),  # type: ignore[union-attr]
            "floor_tls_blake3": lambda: floor.fetch(rows_bytes, hashed=True),  # type: ignore[union-attr]
        }
        upload["rows_out_bytes"] = rows_bytes
        upload["floor_cipher"] = list(floor.cipher or ())

    kernel = None
    sessions: list[mn.Session] = []
    work = Path(tempfile.mkdtemp(prefix="p7_"))
    try:
        if not args.no_kernel:
            kernel = start_kernel(work / "kernel")
            _KERNEL_PID.append(kernel.proc.pid)
            pol = mn.Policy(platform_roots=[kernel.fingerprint], measurements=[kernel.measurement])
            owner = mn.connect(kernel.url, policy=pol, identity=work / "owner")
            analyst = mn.connect(kernel.url, policy=pol, identity=work / "analyst")
            sessions += [owner, analyst]
            owner.datasets()  # starts the service worker, so the upload time is the upload alone
            nbytes = int(fact.memory_usage(deep=True).sum())
            t0 = time.perf_counter()
            owner.upload(fact, "fact", policy=policy)
            upload["fact_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            owner.upload(dim, "dim", policy=dim_policy)
            upload["dim_s"] = time.perf_counter() - t0
            upload["fact_bytes"] = nbytes
            ka, kda = analyst.dataframe("fact"), analyst.dataframe("dim")
            ko, kdo = owner.dataframe("fact"), owner.dataframe("dim")
            t0 = time.perf_counter()
            groupby_query(ka).collect()  # the service worker unseals, checks and decodes both tables once
            upload["first_query_s"] = time.perf_counter() - t0
            print(
                f"upload: fact {upload['fact_s']:.2f}s ({nbytes / 1e6:,.0f} MB in pandas), dim {upload['dim_s']:.2f}s, "
                f"first query (unseal+decode) {upload['first_query_s']:.2f}s",
                flush=True,
            )
            groupby_fns |= {
                "kernel_analyst": lambda: groupby_query(ka).collect(),
                "kernel_owner": lambda: groupby_query(ko).collect(),
            }
            join_fns |= {
                "kernel_analyst": lambda: join_agg_query(ka, kda).collect(),
                "kernel_owner": lambda: join_agg_query(ko, kdo).collect(),
            }
            rows_fns |= {"kernel_owner": lambda: ko.merge(kdo, on="site").collect()}
        if args.only is None:
            bench("filter+assign+groupby-agg", lambda: groupby_query(fact), groupby_fns)
            bench(f"merge({args.dim_rows} rows)+groupby-agg", lambda: join_agg_query(fact, dim), join_fns)
        bench(f"merge({args.dim_rows} rows), rows out", lambda: fact.merge(dim, on="site"), rows_fns)
        if sessions:
            upload["kernel_audit_entries"] = len(sessions[0].audit())
    finally:
        for sess in sessions:
            sess.close()
        if kernel is not None:
            stop_kernel(kernel)
        if floor is not None:
            floor.close()
        import shutil

        shutil.rmtree(work, ignore_errors=True)

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
    arrow_row = {"pandas_s": t_pandas, "pyarrow_s": t_arrow, "pyarrow_ratio": t_arrow / t_pandas}
    rows.append({"query": "filter+assign+groupby-agg (pyarrow compute)", **arrow_row})

    versions = f"Python {platform.python_version()}, pandas {pd.__version__}, pyarrow {pa.__version__}"
    print(f"P7 frames: {args.rows:,} rows, median of {args.repeat}, interleaved, after a warm-up, {versions}")
    labels = ["enclave_analyst", "enclave_owner", "kernel_analyst", "kernel_owner", "floor_tls", "floor_tls_blake3"]
    heads = ["in-proc analyst", "in-proc owner", "kernel analyst", "kernel owner", "floor tls", "floor tls+b3"]
    header = f"{'query':45} {'pandas':>7} " + " ".join(f"{h:>16}" for h in heads)
    print(header)
    print("-" * len(header))
    for r in rows:
        if "pyarrow_s" in r:
            print(f"{r['query']:45} {r['pandas_s']:7.3f}  pyarrow {r['pyarrow_s']:.3f}s = {r['pyarrow_ratio']:.2f}x")
            continue
        cells = [f"{r[f'{k}_s']:7.3f} {r[f'{k}_ratio']:6.2f}x" if f"{k}_s" in r else f"{'-':>16}" for k in labels]
        print(f"{r['query']:45} {r['pandas_s']:7.3f} " + " ".join(f"{c:>16}" for c in cells))
    print("CPU time (in-process: this process; kernel: this process + the kernel's process tree):")
    for r in rows:
        if "pandas_cpu_s" in r:
            cells = [
                f"{h} {r[f'{k}_cpu_s']:.3f}s {r[f'{k}_cpu_ratio']:.2f}x"
                for k, h in zip(labels, heads, strict=True)
                if f"{k}_cpu_s" in r
            ]
            print(f"{r['query']:45} pandas {r['pandas_cpu_s']:.3f}s  " + "  ".join(cells))
    for r in rows:
        if "kernel_owner_over_floor_tls_blake3" in r:
            print(
                f"rows out, {upload['rows_out_bytes'] / 1e6:.0f} MB ({upload['floor_cipher'][0]}): kernel owner / "
                f"floor tls {r['kernel_owner_over_floor_tls']:.2f}x wall, "
                f"{r['kernel_owner_over_floor_tls_cpu']:.2f}x CPU; "
                f"/ floor tls+blake3 {r['kernel_owner_over_floor_tls_blake3']:.2f}x wall, "
                f"{r['kernel_owner_over_floor_tls_blake3_cpu']:.2f}x CPU; p10 wall: pandas {r['pandas_p10_s']:.3f}, "
                f"kernel owner {r['kernel_owner_p10_s']:.3f}, floor tls+b3 {r['floor_tls_blake3_p10_s']:.3f}"
            )
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"load average at the end: {' '.join(load)}")
    if upload:
        print(
            f"upload through the kernel (separate): fact {upload['fact_s']:.2f}s, dim {upload['dim_s']:.2f}s; "
            f"first query {upload['first_query_s']:.2f}s"
        )
    out = (
        Path(__file__).parent
        / "results"
        / ("p7_frames.json" if args.only is None else f"p7_{args.only.replace('-', '_')}.json")
    )
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
                "kernel_upload": upload,
                "load_average": load,
                "audit_events": len(events),
                "refused": sum(e["outcome"] != "released" for e in events),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
