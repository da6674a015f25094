"""P6 engine, cold vs warm: the first 10^7 x 10^7 intersection in a fresh process vs the next ones.

Each sample is a fresh Python process (a stand-in for a fresh service worker: the same ``mallopt`` as
``services/psi.py``'s ``_keep_freed_memory``) that hashes two sets (half shared) and runs ``run_psi`` in
cardinality mode three times, timing each (wall, and CPU user/sys seconds from ``getrusage``: on a loaded
machine the CPU seconds compare better than the wall time). ``--tree PATH`` runs the same in another source
tree (e.g. an export of an older commit) alternately with this one, so both see the same load.
Prints a table and writes bench/results/p6_psi_cold.json.
Usage: python bench/p6_psi_cold.py [--items N] [--samples S] [--tree PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._timing import alternate_trees

HERE = Path(__file__).resolve().parents[1]

CHILD = r"""
import ctypes, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from bench.p6_psi import make_sets
from mesatee_notebook.ml.psi import PsiInput, PsiKey, run_psi
libc = ctypes.CDLL("libc.so.6"); libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
libc.mallopt(-3, 1 << 30); libc.mallopt(-1, (1 << 31) - 1)
a, b, _ = make_sets(int(sys.argv[2]), 0)
out = []
for rep in range(3):
    key = PsiKey.generate()
    A = PsiInput("a", key); A.add_chunk(a, None); B = PsiInput("b", key); B.add_chunk(b, None)
    u0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter(); r = run_psi([A, B], "cardinality"); t1 = time.perf_counter()
    u1 = resource.getrusage(resource.RUSAGE_SELF)
    out.append({"psi_s": t1 - t0, "minor_faults": u1.ru_minflt - u0.ru_minflt, "cardinality": r.cardinality,
                "user_s": u1.ru_utime - u0.ru_utime, "sys_s": u1.ru_stime - u0.ru_stime})
    del A, B, r
print(json.dumps(out))
"""


def sample(tree: Path, items: int) -> list[dict[str, float]]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), str(items)], capture_output=True, text=True, check=True, cwd=tree
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--tree", type=Path, help="another source tree to compare with, run alternately")
    args = parser.parse_args()
    load_before = os.getloadavg()
    trees, runs, _loads = alternate_trees(HERE, args.tree, args.samples, lambda tree: sample(tree, args.items))
    print(f"P6 engine cold vs warm, {args.items:,} items per side, cardinality; load before {load_before[0]:.1f}")
    print(f"{'tree':<12} {'first (cold) s':>15} {'2nd/3rd (warm) s':>17} {'cold faults':>12}", end="")
    print(f" {'cold CPU user/sys s':>20} {'warm CPU user/sys s':>20}")
    summary = {}
    for name, samples in runs.items():
        cold = statistics.median(s[0]["psi_s"] for s in samples)
        warm = statistics.median(r["psi_s"] for s in samples for r in s[1:])
        faults = statistics.median(s[0]["minor_faults"] for s in samples)
        cpu = {
            f"{job}_{k}": statistics.median(r.get(k, 0.0) for s in samples for r in (s[:1] if job == "cold" else s[1:]))
            for job in ("cold", "warm")
            for k in ("user_s", "sys_s")
        }
        summary[name] = {"tree": str(trees[name]), "cold_s": cold, "warm_s": warm, "cold_minor_faults": faults, **cpu}
        print(f"{name:<12} {cold:>15.2f} {warm:>17.2f} {faults:>12,.0f}", end="")
        for job in ("cold", "warm"):
            print(f" {cpu[job + '_user_s']:>10.2f}/{cpu[job + '_sys_s']:<9.2f}", end="")
        print()
    out = {
        "bench": "p6_psi_cold",
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "items": args.items,
        "summary": summary,
        "samples": runs,
    }
    path = HERE / "bench" / "results" / "p6_psi_cold.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
