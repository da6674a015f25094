"""P17: functions as a service. WebAssembly sum against numpy, and a task's end-to-end overhead against a cell.

1. Engine: the shipped example module ``examples/wasm/sum_i64.wasm`` sums 10^7 int64 values (``raw_inputs``),
   run by :func:`mesatee_notebook.enclave.faas_runtime.run_blob` in this process (no sandbox: the engine alone),
   against ``numpy.sum`` on the same array, in the same run. ``wasm_exec`` is the module's own run (wasmtime, fuel
   metered); ``wasm_total`` adds compiling it, writing the input file and packing the result.
2. End to end, on a real sandboxed softtee kernel: a task with a trivial Python function (register once; then per
   task: create, the owner's approval, which runs it in a never-used sandboxed executor, and the receiver's result)
   against one trivial cell round trip (``1+1``) on the same kernel. Measured twice in the same run: the baseline
   kernel starts a new sandboxed executor for every run (``MESATEE_FUNCTION_POOL=0``, the design before the pool);
   the pooled kernel (default, one warmed executor waiting) hands out a pre-started one and starts the next behind
   it. For the pool, tasks are timed with a pause between them (the refill has finished: an owner's approval
   rarely follows the last task within seconds) and back to back (the next task waits for the refill). One untimed
   task first on each kernel (the pool fills on the first function run).

Prints a table and writes bench/results/p17_faas.json. Usage: python bench/p17_faas.py [N_TASKS]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mesatee_notebook as mn
from mesatee_notebook.enclave.faas_exec import POOL_ENV
from mesatee_notebook.enclave.faas_runtime import run_blob
from mesatee_notebook.enclave.services.jobstore import pack_values, unpack_values
from tests.conftest import start_kernel, stop_kernel

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "p17_faas.json"
N_VALUES = 10_000_000


def engine() -> dict[str, float]:
    values = np.random.default_rng(0).integers(-(10**9), 10**9, N_VALUES, dtype=np.int64)
    wasm = (ROOT / "examples" / "wasm" / "sum_i64.wasm").read_bytes()
    fn = {
        "name": "sum_i64",
        "lang": "wasm",
        "entry": "_start",
        "inputs": ["data"],
        "outputs": [],
        "raw_inputs": ["data"],
    }
    blob = pack_values(
        {"__code__": wasm, "data": pd.DataFrame({"v": values})}, function=fn, args={}, limits={"fuel": 40_000_000_000}
    )
    totals, execs, fuels = [], [], []
    for _ in range(3):
        t0 = time.perf_counter()
        out, info = unpack_values(run_blob(blob))
        totals.append(time.perf_counter() - t0)
        execs.append(float(info["seconds"]))
        fuels.append(int(info["fuel"]))
        assert int(np.frombuffer(out["stdout"], "<i8")[0]) == int(values.sum())
    nps = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.sum(values)
        nps.append(time.perf_counter() - t0)
    assert len(set(fuels)) == 1, fuels
    return {
        "wasm_exec_s": min(execs),
        "wasm_total_s": min(totals),
        "numpy_s": min(nps),
        "fuel": fuels[0],
        "ratio_exec_vs_numpy": min(execs) / min(nps),
        "ratio_total_vs_numpy": min(totals) / min(nps),
    }


def _task(dev: mn.Session, owner: mn.Session, fn: object) -> float:
    name = f"t-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    dev.tasks.create(name, function=fn, inputs={"data": "tiny"}, receivers=[dev.party_id])  # type: ignore[arg-type]
    st = owner.tasks.approve(name)
    value = dev.tasks.result(name).value
    took = time.perf_counter() - t0
    assert st.state == "done" and value == 100, st.error
    return took


def end_to_end(n: int, pool: int, pause: float = 0.0, back_to_back: bool = False) -> dict[str, float]:
    """Median cell round trip and task end to end on one kernel whose function pool has ``pool`` executors."""
    os.environ[POOL_ENV] = str(pool)
    with tempfile.TemporaryDirectory() as d:
        k = start_kernel(Path(d) / "k")
        try:
            policy = k.policy()
            dev = mn.connect(k.url, policy=policy, identity=Path(d) / "dev")  # type: ignore[arg-type]
            owner = mn.connect(k.url, policy=policy, identity=Path(d) / "owner")  # type: ignore[arg-type]
            owner.upload(pd.DataFrame({"x": np.arange(100)}), "tiny")
            fn = dev.functions.register("rows", python="def main(data):\n    return len(data)\n", inputs=["data"])
            dev.run("1+1")
            cells = []
            for _ in range(max(n, 10)):
                t0 = time.perf_counter()
                dev.run("1+1")
                cells.append(time.perf_counter() - t0)
            _task(dev, owner, fn)  # untimed: the pool fills on the first run
            spaced = []
            for _ in range(n):
                time.sleep(pause)
                spaced.append(_task(dev, owner, fn))
            rushed = [_task(dev, owner, fn) for _ in range(n)] if back_to_back else []
            dev.close()
            owner.close()
        finally:
            stop_kernel(k)
            os.environ.pop(POOL_ENV, None)
    cell, task = float(np.median(cells)), float(np.median(spaced))
    out = {"cell_roundtrip_s": cell, "task_e2e_s": task, "ratio_task_vs_cell": task / cell, "tasks": n, "pool": pool}
    if rushed:
        out["task_e2e_back_to_back_s"] = float(np.median(rushed))
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    eng = engine()
    base = end_to_end(n, pool=0)
    pooled = end_to_end(n, pool=1, pause=5.0, back_to_back=True)
    print(f"{'measure':<52}{'value':>14}")
    print(f"{'numpy sum of 10^7 int64 (s)':<52}{eng['numpy_s']:>14.4f}")
    print(f"{'wasm sum, module run only (s)':<52}{eng['wasm_exec_s']:>14.4f}")
    print(f"{'wasm sum, compile+input+run (s)':<52}{eng['wasm_total_s']:>14.4f}")
    print(f"{'ratio wasm run / numpy':<52}{eng['ratio_exec_vs_numpy']:>14.1f}")
    print(f"{'ratio wasm total / numpy':<52}{eng['ratio_total_vs_numpy']:>14.1f}")
    print(f"{'fuel (same on every run)':<52}{eng['fuel']:>14d}")
    print(f"{'cell round trip 1+1 (ms)':<52}{pooled['cell_roundtrip_s'] * 1e3:>14.1f}")
    print(f"{'task e2e, new executor per run (baseline, ms)':<52}{base['task_e2e_s'] * 1e3:>14.1f}")
    print(f"{'task e2e, warmed pool (ms)':<52}{pooled['task_e2e_s'] * 1e3:>14.1f}")
    print(f"{'task e2e, warmed pool, back to back (ms)':<52}{pooled['task_e2e_back_to_back_s'] * 1e3:>14.1f}")
    print(f"{'speed-up pool vs baseline':<52}{base['task_e2e_s'] / pooled['task_e2e_s']:>14.2f}")
    print(f"{'ratio task (pool) / cell':<52}{pooled['ratio_task_vs_cell']:>14.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {"engine": eng, "end_to_end": pooled, "end_to_end_baseline": base}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
