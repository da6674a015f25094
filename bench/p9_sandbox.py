"""P9: what the sandbox costs. A sandboxed kernel against a ``--no-sandbox`` kernel, in the same run.

Measures, for each kernel:
* trivial cell round trip (``1+1``; P1's cell),
* opening a session with a pre-started (warm) executor ready, then its first cell,
* a cell that imports pandas and sums a column of 10^6 (pandas is preloaded by every executor),
* per-executor memory: PSS of an idle executor's whole process tree (bubblewrap included).

Prints a table and writes bench/results/p9_sandbox.json. Usage: python bench/p9_sandbox.py [N]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mesatee_notebook as mn
from tests.conftest import start_kernel, stop_kernel

SUM_CELL = "import pandas as pd\nimport numpy as np\ndf = pd.DataFrame({'x': np.arange(1_000_000)})\nint(df.x.sum())"


def med(samples: list[float]) -> float:
    return float(np.median(np.asarray(samples) * 1e3))


def tree_pss(pid: int) -> int:
    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            continue
    return total


def bench(extra: tuple[str, ...], n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        k = start_kernel(Path(d) / "k", *extra)
        try:
            pol = mn.Policy(platform_roots=[k.fingerprint], measurements=[k.measurement],
                            require_sandbox=not extra)
            s = mn.connect(k.url, policy=pol, identity=False)
            for _ in range(30):
                s.run("1+1")
            trivial = []
            for _ in range(n):
                t = time.perf_counter()
                s.run("1+1")
                trivial.append(time.perf_counter() - t)
            summ = []
            for _ in range(max(5, n // 20)):
                t = time.perf_counter()
                assert s.run(SUM_CELL).value == 499999500000
                summ.append(time.perf_counter() - t)
            opens = []
            for _ in range(8):
                time.sleep(1.5)  # let the kernel pre-start its spare executor
                t = time.perf_counter()
                s2 = mn.connect(k.url, policy=pol, identity=False, session="extra")
                s2.run("1+1")
                opens.append(time.perf_counter() - t)
                s2.close()
            (info,) = s.sessions()
            # the executor's host pid; with a sandbox, its tree starts at bubblewrap
            proc = psutil.Process(info["pid"])
            top = proc
            while top.parent() is not None and top.parent().pid != k.proc.pid:
                top = top.parent()
            pss = tree_pss(top.pid)
            s.close()
            return {"trivial_ms": med(trivial), "open_ms": med(opens), "sum_cell_ms": med(summ),
                    "executor_pss_mib": pss / 2**20}
        finally:
            stop_kernel(k)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    sandboxed = bench((), n)
    bare = bench(("--no-sandbox",), n)
    rows = []
    for key in ("trivial_ms", "open_ms", "sum_cell_ms", "executor_pss_mib"):
        rows.append((key, sandboxed[key], bare[key], sandboxed[key] / bare[key]))
    print(f"{'metric':<18}{'sandboxed':>12}{'no-sandbox':>12}{'ratio':>8}")
    for key, a, b, r in rows:
        print(f"{key:<18}{a:>12.2f}{b:>12.2f}{r:>8.2f}")
    out = Path(__file__).parent / "results" / "p9_sandbox.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"n": n, "sandboxed": sandboxed, "no_sandbox": bare,
                               "ratios": {k: r for k, _, _, r in rows}}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
