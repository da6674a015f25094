"""P6 end to end, cold: the first 10^7 x 10^7 PSI job of a fresh kernel's jobs worker, and the next one.

Each sample is a fresh kernel (softtee, loopback) started from a source tree, with two parties on their own
attested connections: a 3-item job starts the jobs worker, then one job at 10^7 items per side (int64,
cardinality, half shared) is the *cold* figure (the worker's first big job: fresh heap pages), a second one the
*warm* figure, and one job each at 2^16 and 2^18 is compared with the openmined-psi (ECDH) seconds recorded in
``bench/results/p6_psi.json``. Each job: create, both uploads, approve (the job runs in that call), result.
``--tree PATH`` runs the same from another source tree (e.g. a ``git worktree`` of an older commit), alternately
with this one, so both see the same load. Prints a table and writes bench/results/p6_psi_e2e_cold.json.

    python bench/p6_psi_e2e_cold.py [--items N] [--samples S] [--tree PATH]
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
import json, subprocess, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import mesatee_notebook as mn
from bench.p6_psi import _start_kernel, e2e_run, make_sets
n = int(sys.argv[2])
out = {}
with tempfile.TemporaryDirectory(prefix="p6cold-") as tmp:
    proc, info = _start_kernel(Path(tmp) / "kernel")
    try:
        pol = mn.Policy(platform_roots=[info["platform"]], measurements=[info["measurement"]])
        url = f"mesatee://127.0.0.1:{info['port']}"
        alice = mn.connect(url, policy=pol, identity=Path(tmp) / "alice")
        bob = mn.connect(url, policy=pol, identity=Path(tmp) / "bob")
        e2e_run(alice, bob, [1, 2, 3], [2, 3, 4], "cardinality", "warmup")  # starts the jobs worker
        a, b, exact = make_sets(n, seed=n)
        for label in ("cold", "warm"):
            r = e2e_run(alice, bob, a, b, "cardinality", label)
            assert r["cardinality"] == exact, (r["cardinality"], exact)
            out[label] = r
        del a, b
        for small in (1 << 16, 1 << 18):
            a, b, exact = make_sets(small, seed=small)
            r = e2e_run(alice, bob, a, b, "cardinality", "small")
            assert r["cardinality"] == exact
            out[str(small)] = r
        alice.close()
        bob.close()
    finally:
        proc.send_signal(2)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
print(json.dumps(out))
"""


def sample(tree: Path, items: int) -> dict[str, dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), str(items)],
        check=False,
        capture_output=True,
        text=True,
        cwd=tree,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    result: dict[str, dict[str, float]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--tree", type=Path, help="another source tree to compare with, run alternately")
    args = parser.parse_args()
    recorded = json.loads((HERE / "bench" / "results" / "p6_psi.json").read_text())
    ecdh = {r["n_per_party"]: (r.get("openmined-psi (ECDH, RAW)") or {}).get("seconds") for r in recorded["rows"]}
    load_before = os.getloadavg()
    trees, runs, loads = alternate_trees(HERE, args.tree, args.samples, lambda tree: sample(tree, args.items))
    print(f"P6 end to end, {args.items:,} items per side, int64 cardinality, fresh kernel per sample")
    print(f"load average before each sample: {', '.join(f'{x:.1f}' for x in loads)}")
    head = f"{'tree':<12} {'job':<6} {'total s':>8} {'upload A':>9} {'upload B':>9} {'run':>7} {'engine':>7}"
    print(head + f" {'2^16 s (x ECDH)':>17} {'2^18 s (x ECDH)':>17}")
    summary = {}
    for name, samples in runs.items():
        summary[name] = {"tree": str(trees[name])}
        small = {}
        for size in (1 << 16, 1 << 18):
            t = statistics.median(s[str(size)]["total_s"] for s in samples)
            small[size] = {"total_s": t, "ecdh_s": ecdh.get(size), "x_faster": (ecdh.get(size) or 0) / t}
        summary[name]["small"] = small
        for job in ("cold", "warm"):
            med = {k: statistics.median(float(s[job][k] or 0) for s in samples) for k in samples[0][job]}
            summary[name][job] = med
            tail = " ".join(f"{small[z]['total_s']:>8.3f} ({small[z]['x_faster']:>5.0f}x)" for z in small)
            print(
                f"{name:<12} {job:<6} {med['total_s']:>8.2f} {med['upload_alice_s']:>9.2f} {med['upload_bob_s']:>9.2f} "
                f"{med['approve_and_run_s']:>7.2f} {med['kernel_psi_s']:>7.2f} {tail if job == 'cold' else ''}"
            )
    out = {
        "bench": "p6_psi_e2e_cold",
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_per_sample": loads},
        "items": args.items,
        "ecdh_seconds_recorded": {str(k): v for k, v in ecdh.items() if v},
        "summary": summary,
        "samples": runs,
    }
    path = HERE / "bench" / "results" / "p6_psi_e2e_cold.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
