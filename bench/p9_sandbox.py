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


class Side:
    """One kernel (sandboxed or not) and a session on it."""

    def __init__(self, extra: tuple[str, ...]) -> None:
        self.extra = extra
        self.dir = tempfile.TemporaryDirectory()
        self.k = start_kernel(Path(self.dir.name) / "k", *extra)
        self.pol = mn.Policy(
            platform_roots=[self.k.fingerprint], measurements=[self.k.measurement], require_sandbox=not extra
        )
        self.s = mn.connect(self.k.url, policy=self.pol, identity=False)
        self.samples: dict[str, list[float]] = {"trivial_ms": [], "sum_cell_ms": [], "open_ms": []}

    def trivial(self, n: int) -> None:
        for _ in range(n):
            t = time.perf_counter()
            self.s.run("1+1")
            self.samples["trivial_ms"].append(time.perf_counter() - t)

    def sum_cell(self, n: int) -> None:
        for _ in range(n):
            t = time.perf_counter()
            assert self.s.run(SUM_CELL).value == 499999500000
            self.samples["sum_cell_ms"].append(time.perf_counter() - t)

    def open_session(self) -> None:
        t = time.perf_counter()
        s2 = mn.connect(self.k.url, policy=self.pol, identity=False, session="extra")
        s2.run("1+1")
        self.samples["open_ms"].append(time.perf_counter() - t)
        s2.close()

    def executor_pss(self) -> float:
        (info,) = self.s.sessions()
        top = psutil.Process(info["pid"])  # the executor; with a sandbox its tree starts at bubblewrap
        while top.parent() is not None and top.parent().pid != self.k.proc.pid:
            top = top.parent()
        return tree_pss(top.pid) / 2**20

    def close(self) -> None:
        self.s.close()
        stop_kernel(self.k)
        self.dir.cleanup()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    sides = {"sandboxed": Side(()), "no_sandbox": Side(("--no-sandbox",))}
    try:
        for side in sides.values():
            side.trivial(30)  # warm up
        rounds = 10
        for _ in range(rounds):  # interleaved, so both sides see the same machine load
            for side in sides.values():
                side.trivial(max(1, n // rounds))
                side.sum_cell(max(1, n // (20 * rounds)))
        for _ in range(6):
            time.sleep(1.5)  # let each kernel pre-start its spare executor
            for side in sides.values():
                side.open_session()
        results = {name: {k: med(v) for k, v in side.samples.items()} for name, side in sides.items()}
        for name, side in sides.items():
            results[name]["executor_pss_mib"] = side.executor_pss()
    finally:
        for side in sides.values():
            side.close()
    a, b = results["sandboxed"], results["no_sandbox"]
    rows = [
        (key, a[key], b[key], a[key] / b[key]) for key in ("trivial_ms", "open_ms", "sum_cell_ms", "executor_pss_mib")
    ]
    print(f"{'metric':<18}{'sandboxed':>12}{'no-sandbox':>12}{'ratio':>8}")
    for key, x, y, r in rows:
        print(f"{key:<18}{x:>12.2f}{y:>12.2f}{r:>8.2f}")
    out = Path(__file__).parent / "results" / "p9_sandbox.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps({"n": n, "sandboxed": a, "no_sandbox": b, "ratios": {k: r for k, _, _, r in rows}}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
