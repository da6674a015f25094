"""WebAssembly functions under wasmtime (WASI, fuel, epoch deadline, memory limit) in a fresh sandboxed executor."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesatee_notebook.errors import EncodingError, ResourceExhausted, WasmError
from tests.faas.conftest import Parties, unique
from tests.faas.wat import BAD_IMPORT, BIG_MEMORY, BIG_TABLE, ECHO, GROW, LOOP, OPEN_HOST, SUM_I64, wasm


def run(p: Parties, wat: str, *, dataset: str | None = None, limits: dict[str, Any] | None = None, **kw: Any) -> Any:
    """B registers and runs a module on its own dataset (B owns the input, so its create approves)."""
    fn = p.b.functions.register(unique("wasm"), wasm=wasm(wat), inputs=["data"], **kw)
    name = unique("wtask")
    st = p.b.tasks.create(
        name, function=fn, inputs={"data": dataset or p.ds_b}, receivers=[p.b.party_id], limits=limits
    )
    return name, st


def test_wasi_stdin_is_the_arrow_input_and_stdout_the_result(parties: Parties) -> None:
    name, st = run(parties, ECHO)
    assert st.state == "done", st.error
    res = parties.b.tasks.result(name)
    import pyarrow as pa

    table = pa.ipc.open_stream(res.value).read_all()
    assert table.column_names == ["x", "y"]  # the hidden column is not in the module's input
    assert table.num_rows == len(parties.sales_b)
    assert res.fuel is not None and res.fuel > 0


def test_fuel_is_deterministic_across_runs(parties: Parties) -> None:
    n1, _ = run(parties, SUM_I64)
    n2, _ = run(parties, SUM_I64)
    r1, r2 = parties.b.tasks.result(n1), parties.b.tasks.result(n2)
    assert r1.fuel == r2.fuel and r1.fuel > 0
    assert r1.value == r2.value


def test_infinite_loop_runs_out_of_fuel(parties: Parties) -> None:
    t0 = time.monotonic()
    name, st = run(parties, LOOP, limits={"fuel": 50_000_000})
    assert st.state == "failed"
    with pytest.raises(ResourceExhausted, match="ran out of fuel"):
        parties.b.tasks.result(name)
    assert time.monotonic() - t0 < 30


def test_wall_time_deadline_stops_a_loop_with_fuel_left(parties: Parties) -> None:
    name, _st = run(parties, LOOP, limits={"fuel": 40_000_000_000, "seconds": 1})
    with pytest.raises(ResourceExhausted, match="wall-time"):
        parties.b.tasks.result(name)


def test_memory_limit_stops_growth(parties: Parties) -> None:
    # GROW traps (unreachable) only if memory.grow succeeded past 64 MiB; with an 8 MiB limit it ends cleanly
    _name, st = run(parties, GROW, limits={"memory": 8 << 20})
    assert st.state == "done", st.error
    # without the limit lowered, the same module gets past 64 MiB and traps
    name2, _st2 = run(parties, GROW, limits={"memory": 1 << 30})
    with pytest.raises(WasmError, match="trapped"):
        parties.b.tasks.result(name2)


def test_table_and_memory_limits_at_instantiation(parties: Parties) -> None:
    name, _ = run(parties, BIG_TABLE, limits={"table_elements": 100_000})
    with pytest.raises(ResourceExhausted, match="table"):
        parties.b.tasks.result(name)
    name, _ = run(parties, BIG_MEMORY, limits={"memory": 64 << 20})  # 2000 pages = 125 MiB
    with pytest.raises(ResourceExhausted, match="memory"):
        parties.b.tasks.result(name)


def test_module_cannot_open_a_host_path(parties: Parties) -> None:
    name, _st = run(parties, OPEN_HOST)
    with pytest.raises(WasmError, match="exited with status"):
        parties.b.tasks.result(name)


def test_import_that_is_not_provided(parties: Parties) -> None:
    name, _st = run(parties, BAD_IMPORT)
    with pytest.raises(WasmError, match="host_secret"):
        parties.b.tasks.result(name)


def test_malformed_module_bytes(parties: Parties) -> None:
    with pytest.raises(EncodingError, match="malformed"):
        parties.b.functions.register("junk", wasm=b"\x00asm\x01\x00\x00\x00\xff\xff")


def test_sum_matches_numpy(parties: Parties) -> None:
    import pandas as pd

    values = np.random.default_rng(1).integers(-(10**12), 10**12, 100_000, dtype=np.int64)
    ds = unique("ints").replace("-", "_")
    parties.b.upload(pd.DataFrame({"v": values}), ds)
    n1, st = run(parties, SUM_I64, dataset=ds, raw_inputs=["data"])
    assert st.state == "done", st.error
    got = np.frombuffer(parties.b.tasks.result(n1).value, dtype="<i8")
    assert got.tolist() == [int(values.sum())]


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "wasm"


@pytest.mark.parametrize("module", ["sum_i64_rs.wasm", "sum_i64_c.wasm"])
def test_prebuilt_rust_and_c_modules_run_as_tasks(parties: Parties, module: str) -> None:
    """examples/wasm/: built from sum_i64.rs (rustc, wasm32-wasi) and sum_i64.c (clang + wasi-libc), WASI preview 1."""
    import pandas as pd

    values = np.random.default_rng(2).integers(-(10**12), 10**12, 50_001, dtype=np.int64)
    ds = unique("ints").replace("-", "_")
    parties.b.upload(pd.DataFrame({"v": values}), ds)
    fn = parties.b.functions.register(
        unique("native"), wasm=(EXAMPLES / module).read_bytes(), inputs=["data"], raw_inputs=["data"]
    )
    runs = []
    for _ in range(2):
        name = unique("ntask")
        st = parties.b.tasks.create(name, function=fn, inputs={"data": ds}, receivers=[parties.b.party_id])
        assert st.state == "done", st.error
        runs.append(parties.b.tasks.result(name))
    assert [np.frombuffer(r.value, dtype="<i8").tolist() for r in runs] == [[int(values.sum())]] * 2
    assert runs[0].fuel == runs[1].fuel and runs[0].fuel > len(values)  # metered, and the same on every run


def _debian_toolchains() -> bool:
    rustc = Path("/usr/bin/rustc")
    if not rustc.exists() or shutil.which("clang-14") is None:
        return False
    version = subprocess.run([str(rustc), "--version"], capture_output=True, text=True, check=False).stdout
    return version.startswith("rustc 1.63.0") and Path("/usr/lib/rustlib/wasm32-wasi").is_dir()


@pytest.mark.skipif(not _debian_toolchains(), reason="needs Debian 12's rustc 1.63 (wasm32-wasi) and clang-14")
def test_example_modules_rebuild_to_the_shipped_bytes(tmp_path: Path) -> None:
    import sys

    for f in ("build.sh", "sum_i64.rs", "sum_i64.c", "sum_i64.wat"):
        shutil.copy(EXAMPLES / f, tmp_path / f)
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    subprocess.run(["sh", str(tmp_path / "build.sh")], check=True, capture_output=True, env=env)
    for module in ("sum_i64.wasm", "sum_i64_rs.wasm", "sum_i64_c.wasm"):
        assert (tmp_path / module).read_bytes() == (EXAMPLES / module).read_bytes(), module
