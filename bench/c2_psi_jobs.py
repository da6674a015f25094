"""C2 (PSI jobs): a two-party PSI job under approvals, on one node against the same job on a 2-worker cluster.

Both runs use the same job flow through real kernels over TLS: ``psi.create``, both parties ``psi.submit``, the
second party ``psi.approve``, then ``psi.result`` (which runs the job). One kernel is a plain ``serve``. The other
is a head (``serve --cluster``) of a scheduler and 2 workers on loopback, with the job created with
``cluster=True``: the jobs worker sends the approved items to the head, which intersects them sharded on the
workers over ``atls://``. The table gives each step's wall time (best of REPEATS) and checks that the two
cardinalities are equal.

Prints a table and writes bench/results/c2_psi_jobs.json.
Usage: python bench/c2_psi_jobs.py [ITEMS] [REPEATS]   (defaults 1000000, 2)
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mesatee_notebook as mn  # noqa: E402
from tests.cluster.conftest import init_platform, spawn_node, start_node, stop_node, wait_serving  # noqa: E402
from tests.conftest import start_kernel, stop_kernel  # noqa: E402

STEPS = ("create", "submit a", "submit b", "approve b", "result (runs the job)")


def _job(url: str, policy: Any, ids: Path, name: str, a: np.ndarray, b: np.ndarray, cluster: bool) -> dict[str, Any]:
    with (
        mn.connect(url, policy=policy, identity=ids / "a") as pa,
        mn.connect(url, policy=policy, identity=ids / "b") as pb,
    ):
        times: dict[str, float] = {}

        def step(label: str, fn: Any) -> Any:
            t = time.perf_counter()
            out = fn()
            times[label] = time.perf_counter() - t
            return out

        step(STEPS[0], lambda: pa.psi.create(name, [pa.party_id, pb.party_id], mode="cardinality", cluster=cluster))
        step(STEPS[1], lambda: pa.psi.submit(name, a))
        step(STEPS[2], lambda: pb.psi.submit(name, b))
        step(STEPS[3], lambda: pb.psi.approve(name))
        res = step(STEPS[4], lambda: pa.psi.result(name))
        return {
            "times": times,
            "cardinality": res.cardinality,
            "workers": len(res.info.get("cluster", {}).get("workers", [])),
        }


def _best(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {s: min(r["times"][s] for r in runs) for s in STEPS}


def main() -> None:
    items = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    a = np.arange(items, dtype=np.int64)
    b = np.arange(items // 2, items + items // 2, dtype=np.int64)
    tmp = Path(tempfile.mkdtemp(prefix="c2psi-"))
    nodes, kernels = [], []
    try:
        data = tmp / "cluster"
        init_platform(data)
        scheduler = start_node("scheduler", data, "--port", "0")
        nodes.append(scheduler)
        workers = [spawn_node("worker", data, "--scheduler", scheduler.address, "--name", f"w{i}") for i in range(2)]
        nodes.extend(workers)
        for w in workers:
            wait_serving(w)
        time.sleep(2)
        head_dir = tmp / "head"
        head_dir.mkdir()
        shutil.copytree(data / "platform", head_dir / "platform")
        head = start_kernel(head_dir, "--cluster", scheduler.address)
        single = start_kernel(tmp / "single")
        kernels += [head, single]
        results: dict[str, list[dict[str, Any]]] = {"single node": [], "cluster, 2 workers": []}
        for r in range(repeats + 1):  # the first round warms both up (imports, worker pools); not counted
            one = _job(single.url, single.policy(), tmp / "ids", f"s{r}", a, b, cluster=False)
            two = _job(head.url, head.policy(), tmp / "ids", f"c{r}", a, b, cluster=True)
            if one["cardinality"] != two["cardinality"] or one["cardinality"] != items // 2:
                raise SystemExit(f"cardinalities differ: {one['cardinality']} vs {two['cardinality']}")
            if r:
                results["single node"].append(one)
                results["cluster, 2 workers"].append(two)
        best = {k: _best(v) for k, v in results.items()}
        print(f"C2 PSI job, 2 parties x {items} items, half shared (cardinality {items // 2}); best of {repeats}")
        print(f"{'step':<24}" + "".join(f"{k:>22}" for k in best))
        for s in STEPS:
            print(f"{s:<24}" + "".join(f"{best[k][s]:>21.3f}s" for k in best))
        print(f"{'total':<24}" + "".join(f"{sum(best[k].values()):>21.3f}s" for k in best))
        out = ROOT / "bench" / "results" / "c2_psi_jobs.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"items": items, "repeats": repeats, "best_s": best, "runs": results}, indent=1))
        print(f"wrote {out}")
    finally:
        for k in kernels:
            stop_kernel(k)
        for n in nodes:
            stop_node(n)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
