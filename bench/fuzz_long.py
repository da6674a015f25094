"""R2: the long fuzz run. Each target gets >= N inputs (default 100,000) under atheris, bounded in time.

Prints a table and writes bench/results/fuzz_long.json. Usage: python bench/fuzz_long.py [N] [max seconds per target]
A crash or an untyped exception stops that target and is reported with the path of the saved input.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fuzz.targets import TARGETS  # noqa: E402


def run(name: str, runs: int, max_time: int, artifacts: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.run",
            name,
            f"-runs={runs}",
            f"-max_total_time={max_time}",
            f"-artifact_prefix={artifacts}/{name}-",
            "-print_final_stats=1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    done = re.search(r"Done (\d+) runs in (\d+) second", out)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
    crashes = sorted(str(p) for p in artifacts.glob(f"{name}-crash-*"))
    return {
        "target": name,
        "inputs": int(done.group(1)) if done else None,
        "seconds": round(seconds, 1),
        "edges": int(cov[-1][0]) if cov else None,
        "features": int(cov[-1][1]) if cov else None,
        "exit": proc.returncode,
        "untyped_exceptions": out.count("Uncaught Python exception"),
        "crashes": crashes,
    }


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    max_time = int(sys.argv[2]) if len(sys.argv) > 2 else 120
    artifacts = Path(tempfile.mkdtemp(prefix="mesatee-fuzz-artifacts-"))
    rows = [run(name, runs, max_time, artifacts) for name in sorted(TARGETS)]
    print(f"{'target':<10} {'inputs':>10} {'seconds':>8} {'edges':>6} {'exit':>5} {'untyped':>8} crashes")
    for r in rows:
        print(
            f"{r['target']:<10} {r['inputs']!s:>10} {r['seconds']:>8} {r['edges']!s:>6} {r['exit']:>5} "
            f"{r['untyped_exceptions']:>8} {len(r['crashes'])}"
        )  # type: ignore[arg-type]
    out = ROOT / "bench" / "results" / "fuzz_long.json"
    out.write_text(json.dumps({"runs_per_target": runs, "max_seconds_per_target": max_time, "targets": rows}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    if any(r["exit"] != 0 or r["crashes"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
