"""P17: functions as a service. WebAssembly sum against numpy, and a task's end-to-end overhead against a cell.

1. Engine: the shipped example module ``examples/wasm/sum_i64.wasm`` sums 10^7 int64 values (``raw_inputs``),
   run by :func:`mesatee_notebook.enclave.faas_runtime.run_blob` in this process (no sandbox: the engine alone),
   against ``numpy.sum`` on the same array, in the same run. ``wasm_exec`` is the module's own run (wasmtime, fuel
   metered); ``wasm_total`` adds compiling it, writing the input file and packing the result.
2. End to end, on a real sandboxed softtee kernel: a task with a trivial Python function (register once; then per
   task: create, the owner's approval, which runs it in a fresh sandboxed executor, and the receiver's result)
   against one trivial cell round trip (``1+1``) on the same kernel.

Prints a table and writes bench/results/p17_faas.json. Usage: python bench/p17_faas.py [N_TASKS]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mesatee_notebook as mn
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


def end_to_end(n: int) -> dict[str, float]:
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
            tasks = []
            for _ in range(n):
                name = f"t-{uuid.uuid4().hex[:8]}"
                t0 = time.perf_counter()
                dev.tasks.create(name, function=fn, inputs={"data": "tiny"}, receivers=[dev.party_id])
                st = owner.tasks.approve(name)
                value = dev.tasks.result(name).value
                tasks.append(time.perf_counter() - t0)
                assert st.state == "done" and value == 100
            dev.close()
            owner.close()
        finally:
            stop_kernel(k)
    cell, task = float(np.median(cells)), float(np.median(tasks))
    return {"cell_roundtrip_s": cell, "task_e2e_s": task, "ratio_task_vs_cell": task / cell, "tasks": n}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    eng = engine()
    e2e = end_to_end(n)
    print(f"{'measure':<40}{'value':>14}")
    print(f"{'numpy sum of 10^7 int64 (s)':<40}{eng['numpy_s']:>14.4f}")
    print(f"{'wasm sum, module run only (s)':<40}{eng['wasm_exec_s']:>14.4f}")
    print(f"{'wasm sum, compile+input+run (s)':<40}{eng['wasm_total_s']:>14.4f}")
    print(f"{'ratio wasm run / numpy':<40}{eng['ratio_exec_vs_numpy']:>14.1f}")
    print(f"{'ratio wasm total / numpy':<40}{eng['ratio_total_vs_numpy']:>14.1f}")
    print(f"{'fuel (same on every run)':<40}{eng['fuel']:>14d}")
    print(f"{'cell round trip 1+1 (ms)':<40}{e2e['cell_roundtrip_s'] * 1e3:>14.1f}")
    print(f"{'task create+approve+run+result (ms)':<40}{e2e['task_e2e_s'] * 1e3:>14.1f}")
    print(f"{'ratio task / cell':<40}{e2e['ratio_task_vs_cell']:>14.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"engine": eng, "end_to_end": e2e}, indent=2) + "\n")


if __name__ == "__main__":
    main()
