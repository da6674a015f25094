"""P1: round trip of a trivial cell (``1+1``) vs a plain ipykernel execute through jupyter_client, same run.

Prints a table and writes bench/results/p1_roundtrip.json. Usage: python bench/p1_roundtrip.py [N]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mesatee_notebook as mn
from tests.conftest import start_kernel, stop_kernel


def stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)), "n": len(a)}


def bench_mesatee(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        k = start_kernel(Path(d) / "k")
        try:
            s = mn.connect(k.url, policy=mn.Policy(platform_roots=[k.fingerprint], measurements=[k.measurement]))
            for _ in range(50):
                s.run("1+1")
            out = []
            for _ in range(n):
                t = time.perf_counter()
                assert s.run("1+1").value == 2
                out.append(time.perf_counter() - t)
            s.close()
            return stats(out)
        finally:
            stop_kernel(k)


def bench_ipykernel(n: int) -> dict[str, float]:
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        for _ in range(50):
            kc.execute_interactive("1+1", timeout=30, output_hook=lambda m: None)
        out = []
        for _ in range(n):
            t = time.perf_counter()
            reply = kc.execute_interactive("1+1", timeout=30, output_hook=lambda m: None)
            out.append(time.perf_counter() - t)
            assert reply["content"]["status"] == "ok"
        return stats(out)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    os.environ.setdefault("MESATEE_HOME", tempfile.mkdtemp())
    m = bench_mesatee(n)
    j = bench_ipykernel(n)
    ratio = m["median_ms"] / j["median_ms"]
    rows = [("mesatee run('1+1') (TLS, executor, signed receipt)", m), ("ipykernel execute (jupyter_client/zmq)", j)]
    print(f"P1 trivial-cell round trip, n={n}")
    print(f"{'path':<55} {'median ms':>10} {'p99 ms':>10}")
    for name, r in rows:
        print(f"{name:<55} {r['median_ms']:>10.3f} {r['p99_ms']:>10.3f}")
    print(f"ratio mesatee/ipykernel (median): {ratio:.2f}x   target <= 1.0x")
    out = {
        "benchmark": "P1",
        "n": n,
        "mesatee": m,
        "ipykernel": j,
        "ratio_median": ratio,
        "p99_ratio": m["p99_ms"] / j["p99_ms"],
    }
    path = Path(__file__).parent / "results" / "p1_roundtrip.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
