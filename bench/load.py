"""R4, load: many parties running cells at once, mixed with frame queries and one long PSI job.

Usage: python bench/load.py [parties, default 8] [cells per party, default 100] [PSI items per party, default 2^20]
(the issue's full size is ``python bench/load.py 32 1000 10000000``; scaled down by default for a 2-core VM).

Each party has its own identity, connection and session, and runs ``cells`` short cells that each add its own
secret to a counter in its namespace; every 10th call is a SecureDataFrame query on a shared dataset instead.
Meanwhile two extra parties run one PSI job. Checks: 0 errors, each party's counter equals its own sum (no session
sees another's state). Reports cells/s with all parties against one party alone, and p50/p99 of the cells and
of the frame queries.
Writes bench/results/load.json.
"""

from __future__ import annotations

import json
import secrets
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

RESULTS = Path(__file__).resolve().parent / "results" / "load.json"


def party_run(k: KernelProc, ident: Path, cells: int, out: dict[str, Any], start: threading.Barrier) -> None:
    lat: list[float] = []
    qlat: list[float] = []
    errors: list[str] = []
    s = mn.connect(k.url, policy=k.policy(), identity=ident)
    try:
        secret = secrets.randbelow(1 << 30)
        s.run("total = 0")
        start.wait()
        t0 = time.perf_counter()
        for i in range(cells):
            t = time.perf_counter()
            try:
                if i % 10 == 9:
                    res = s.dataframe("shared").groupby("g").agg(n=("v", "size")).collect()
                    assert len(res) == 4
                else:
                    s.run("total += secret", inputs={"secret": np.int64(secret)})
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
            (qlat if i % 10 == 9 else lat).append(time.perf_counter() - t)
        seconds = time.perf_counter() - t0
        runs = cells - cells // 10
        total = s.run("total").value
        isolated = int(total) == runs * secret
        out[str(ident)] = {
            "lat": lat,
            "qlat": qlat,
            "errors": errors,
            "seconds": seconds,
            "isolated": isolated,
            "cells": runs,
        }
    finally:
        s.close()


def psi_job(k: KernelProc, tmp: Path, n: int, out: dict[str, Any]) -> None:
    a_s = mn.connect(k.url, policy=k.policy(), identity=tmp / "psi_a")
    b_s = mn.connect(k.url, policy=k.policy(), identity=tmp / "psi_b")
    try:
        rng = np.random.default_rng(3)
        a = rng.integers(0, 2**62, n, dtype=np.int64)
        b = np.concatenate([a[: n // 2], rng.integers(0, 2**62, n - n // 2, dtype=np.int64)])
        t = time.perf_counter()
        a_s.psi.create("load-psi", [a_s.party_id, b_s.party_id], mode="cardinality", receivers=[a_s.party_id])
        a_s.psi.submit("load-psi", a)
        b_s.psi.submit("load-psi", b)
        state = b_s.psi.approve("load-psi").state
        out["psi"] = {
            "state": state,
            "seconds": time.perf_counter() - t,
            "cardinality": a_s.psi.result("load-psi").cardinality,
        }
    except Exception as exc:
        out["psi"] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        a_s.close()
        b_s.close()


def phase(k: KernelProc, tmp: Path, parties: int, cells: int, psi_n: int | None, tag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    barrier = threading.Barrier(parties + 1)
    threads = [
        threading.Thread(target=party_run, args=(k, tmp / f"{tag}-p{i}", cells, out, barrier)) for i in range(parties)
    ]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    psi_t = None
    if psi_n:
        psi_t = threading.Thread(target=psi_job, args=(k, tmp, psi_n, out))
        psi_t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if psi_t is not None:
        psi_t.join()
    rows = [v for key, v in out.items() if key != "psi"]
    lat = np.array([x for r in rows for x in r["lat"]]) * 1e3
    qlat = np.array([x for r in rows for x in r["qlat"]]) * 1e3
    errors = [e for r in rows for e in r["errors"]]
    return {
        "parties": parties,
        "calls_per_party": cells,
        "wall_s": round(wall, 2),
        "cells_per_s": round(sum(r["cells"] for r in rows) / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "query_p50_ms": round(float(np.percentile(qlat, 50)), 1) if len(qlat) else None,
        "query_p99_ms": round(float(np.percentile(qlat, 99)), 1) if len(qlat) else None,
        "errors": len(errors),
        "first_errors": errors[:5],
        "isolated": all(r["isolated"] for r in rows) and len(rows) == parties,
        "psi": out.get("psi"),
    }


def main() -> None:
    parties = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    cells = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    psi_n = int(float(sys.argv[3])) if len(sys.argv) > 3 else 1 << 20
    with tempfile.TemporaryDirectory(prefix="load-") as d:
        tmp = Path(d)
        k = start_kernel(tmp / "k", "--party-sessions", "4")
        try:
            owner = mn.connect(k.url, policy=k.policy(), identity=tmp / "owner")
            owner.upload(
                pd.DataFrame({"g": list("abcd") * 250, "v": range(1000)}),
                "shared",
                policy=mn.DataPolicy(min_group_size=5),
            )
            owner.close()
            alone = phase(k, tmp, 1, cells, None, "alone")
            loaded = phase(k, tmp, parties, cells, psi_n, "many")
        finally:
            stop_kernel(k)
    print(
        f"{'run':<28} {'cells/s':>8} {'cell p50':>8} {'cell p99':>8} {'query p50':>9} {'query p99':>9} "
        f"{'errors':>6} {'isolated':>8}"
    )
    for name, r in ((f"1 party x {cells}", alone), (f"{parties} parties x {cells} + PSI", loaded)):
        print(
            f"{name:<28} {r['cells_per_s']:>8} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['query_p50_ms']!s:>9} "
            f"{r['query_p99_ms']!s:>9} {r['errors']:>6} {r['isolated']!s:>8}"
        )
    print(f"throughput ratio (many / alone): {loaded['cells_per_s'] / alone['cells_per_s']:.2f}; PSI: {loaded['psi']}")
    RESULTS.write_text(json.dumps({"alone": alone, "loaded": loaded}, indent=2))
    print(f"wrote {RESULTS}")
    if loaded["errors"] or not loaded["isolated"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
