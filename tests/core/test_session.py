"""End-to-end behaviour of sessions over a real kernel process and real TLS."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

import mesatee_notebook as mn
from mesatee_notebook.errors import ExecutorCrashed, NotFound, RemoteInterrupted, RemoteTimeout
from tests.waiting import PATIENCE, cell_waits_for, wait_dead

pytestmark = pytest.mark.process


@pytest.fixture
def session(kernel):
    s = mn.connect(kernel.url, policy=kernel.policy())
    yield s
    s.close()


def test_run_returns_value_outputs_stdout_and_verified_receipt(session, kernel):
    df = pd.DataFrame({"x": np.arange(10.0), "g": list("ababababab")})
    r = session.run(
        "import pandas as pd\nprint('summing')\ntotal = df.x.sum()\ntotal", inputs={"df": df}, outputs=["total"]
    )
    assert r.value == 45.0
    assert r.outputs == {"total": 45.0}
    assert r.stdout == "summing\n"
    pred = r.verified.predicate
    assert pred["session"] == session.id
    assert pred["measurement"] == kernel.measurement
    assert pred["level"] == "softtee"
    assert set(pred["inputs"]) == {"df"}
    # offline: a fresh policy pinning the platform, from the JSON text alone
    v = mn.verify_receipt(r.receipt.to_json(), kernel.policy())
    assert v.subjects["out/total"] == r.receipt.subjects["out/total"]


def test_session_repr_says_softtee_is_software_trust(session, kernel):
    text = repr(session)
    assert "level=softtee (SOFTWARE TRUST)" in text
    assert kernel.measurement[:12] in text


def test_values_round_trip_through_the_enclave(session):
    values = {
        "frame": pd.DataFrame({"a": [1, 2, 3], "s": ["x", "y", None], "f": [0.5, np.nan, 2.0]}),
        "series": pd.Series([1.5, 2.5], name="s1"),
        "arr": np.arange(24, dtype=np.int32).reshape(2, 3, 4),
        "blob": b"\x00\x01binary",
        "obj": {"k": [1, 2.0, "three", None, True]},
    }
    r = session.run("pass", inputs=values, outputs=list(values))
    pd.testing.assert_frame_equal(r.outputs["frame"], values["frame"])
    pd.testing.assert_series_equal(r.outputs["series"], values["series"])
    np.testing.assert_array_equal(r.outputs["arr"], values["arr"])
    assert r.outputs["blob"] == values["blob"]
    assert r.outputs["obj"] == values["obj"]


def test_dataframe_last_expression_comes_back_as_dataframe(session):
    r = session.run("import pandas as pd\npd.DataFrame({'a': range(3)}).assign(b=lambda d: d.a * 2)")
    assert isinstance(r.value, pd.DataFrame)
    assert r.value["b"].tolist() == [0, 2, 4]


def test_unencodable_value_falls_back_to_repr_and_output_names_the_type(session):
    r = session.run("class Thing:\n    def __repr__(self): return 'Thing()'\nt = Thing()\nt")
    assert r.value is None
    assert r.value_repr == "Thing()"
    with pytest.raises(mn.EncodingError, match="Thing"):
        session.run("t2 = Thing()", outputs=["t2"])
    with pytest.raises(mn.EncodingError, match="allow_pickle"):
        session.run("pass", inputs={"bad": object()})
    assert session.run("40 + 2").value == 42


def test_namespace_persists_and_sessions_are_isolated(kernel, session):
    session.run("secret = 41")
    assert session.run("secret + 1").value == 42
    other = mn.connect(kernel.url, policy=kernel.policy(), session="other")
    try:
        with pytest.raises(mn.RemoteExecutionError, match="NameError"):
            other.run("secret")
    finally:
        other.close()


def test_remote_error_has_short_user_traceback(session):
    with pytest.raises(mn.RemoteExecutionError) as info:
        session.run("def f(x):\n    return 1 / x\nf(0)")
    tb = info.value.remote_traceback
    assert "ZeroDivisionError" in tb
    assert "<cell-" in tb and "executor.py" not in tb
    assert info.value.ename == "ZeroDivisionError"
    assert info.value._render_traceback_()[0].startswith("Remote error")


def test_missing_declared_output_is_refused(session):
    with pytest.raises(NotFound, match="never set"):
        session.run("x = 1", outputs=["y"])


def test_streaming_callback_sees_output_live(session, kernel, tmp_path):
    """The cell prints 'second' only once the client has seen 'first': so the first line arrived while it ran.

    (It used to sleep 0.6 s and compare arrival times: on a loaded machine a late first line failed it.)
    """
    seen: list[str] = []
    go = kernel.untrusted_dir / f"go-{tmp_path.name}"  # the client's sign, readable through untrusted_open

    def stream(name: str, text: str) -> None:
        seen.append(name + ":" + text.strip())
        if seen[-1] == "stdout:first":
            go.write_text("seen")

    session.run(
        "import sys\nprint('first', flush=True)\n"
        + cell_waits_for(go, "the client to see the first line while the cell runs")
        + "print('second')\nprint('oops', file=sys.stderr)",
        stream=stream,
    )
    assert seen == ["stdout:first", "stdout:second", "stderr:oops"]


def test_timeout_interrupts_and_keeps_namespace(session):
    session.run("keep = 7")
    with pytest.raises(RemoteTimeout, match="interrupted"):
        session.run("import time\ntime.sleep(30)", timeout=0.5)
    assert session.run("keep").value == 7


@pytest.mark.slow
def test_timeout_kills_a_cell_that_ignores_interrupts(session):
    code = "import time\nwhile True:\n    try:\n        time.sleep(10)\n    except KeyboardInterrupt:\n        pass"
    with pytest.raises(RemoteTimeout, match="killed"):
        session.run(code, timeout=0.5)
    with pytest.raises(ExecutorCrashed, match="restart"):
        session.run("1")
    session.restart()
    assert session.run("1 + 1").value == 2


def test_interrupt_from_another_thread(session):
    errors: list[BaseException] = []

    running = threading.Event()

    def run() -> None:
        try:
            session.run("import time\nprint('running', flush=True)\ntime.sleep(60)", stream=lambda n, t: running.set())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    # the cell runs (it said so): interrupting earlier, as a fixed 1 s sleep did on a loaded machine, raced its start
    assert running.wait(PATIENCE), "the cell never started"
    assert session.interrupt() is True
    t.join(PATIENCE)
    assert len(errors) == 1 and isinstance(errors[0], RemoteInterrupted)


def test_ctrl_c_while_a_result_is_read_leaves_the_session_in_step(session):
    """Ctrl-C lands while the client reads a frame (here: a 32 MB output, mid-payload): the session must go on.

    Found when the magics' interrupt test sent its Ctrl-C right after the cell's first output (a stream frame):
    the client read on from the middle of the frame and lost the session. The press is now held until the frame
    is whole (``remote/ctrl_c.py``); the cell has finished, so the result arrives whole and the next cell runs.
    """
    main = threading.main_thread().ident
    assert main is not None
    pressed: list[int] = []

    def ctrl_c_mid_payload(done: int, total: int) -> None:
        if not pressed and done < total:
            pressed.append(done)
            signal.pthread_kill(main, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background run may ignore SIGINT
    try:
        r = session.run(
            "import numpy as np\nbig = np.ones(4_000_000)", outputs=["big"], download_progress=ctrl_c_mid_payload
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert pressed, "the output was not read in chunks: the Ctrl-C never landed mid-frame"
    assert r.outputs["big"].shape == (4_000_000,) and r.outputs["big"].sum() == 4_000_000
    assert session.run("6 * 7").value == 42


def _host_pid(session):
    """The executor's pid on the host (inside its sandbox it has a PID namespace of its own)."""
    (info,) = [s for s in session.sessions() if s["session"] == session.id]
    return info["pid"]


def test_killed_executor_gives_clear_error_and_restart_recovers(session):
    assert session.run("import os\nos.getpid()").value < 10  # its own PID namespace
    pid = _host_pid(session)
    os.kill(pid, signal.SIGKILL)
    wait_dead(pid)  # not a fixed 0.2 s: on a loaded machine it may not have died yet
    with pytest.raises(ExecutorCrashed, match="SIGKILL"):
        session.run("1")
    session.restart()
    assert session.run("2 * 21").value == 42


@pytest.mark.slow
def test_many_sessions_at_once(kernel):
    sessions = [mn.connect(kernel.url, policy=kernel.policy(), session=f"s{i}") for i in range(4)]
    try:
        results: dict[int, int] = {}

        def work(i: int) -> None:
            results[i] = sessions[i].run(f"import time\ntime.sleep(0.3)\nv = {i} * 10\nv").value

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == {i: i * 10 for i in range(4)}
        pids = {_host_pid(s) for s in sessions}
        assert len(pids) == 4
        assert all(psutil.pid_exists(p) for p in pids)
    finally:
        for s in sessions:
            s.close()


def test_executor_holds_no_key_material_and_is_hardened(session, kernel):
    info = json.loads((kernel.data_dir / "kernel.json").read_text())
    r = session.run(
        "import ctypes, os, resource\n"
        "libc = ctypes.CDLL(None)\n"
        "dumpable = libc.prctl(3, 0, 0, 0, 0)\n"
        "core = resource.getrlimit(resource.RLIMIT_CORE)\n"
        "env_keys = [k for k in os.environ if 'KEY' in k.upper() or 'SECRET' in k.upper()]\n"
        "fds = sorted(os.listdir('/proc/self/fd'))\n"
        "maps = open('/proc/self/cmdline', 'rb').read()\n"
        "(dumpable, list(core), env_keys, os.getppid(), maps)",
    )
    dumpable, core, env_keys, ppid, cmdline = r.value
    assert dumpable == 0
    assert core == [0, 0]
    assert env_keys == []
    assert ppid == 1  # bubblewrap's init: the supervisor is outside the sandbox's PID namespace
    assert not session.run(
        f"import os\nos.path.exists('/proc/{info['pid']}/cmdline') and "
        f"b'serve' in open('/proc/{info['pid']}/cmdline', 'rb').read()"
    ).value
    assert b"platform_key" not in cmdline and b"sealing" not in cmdline
    limits = Path(f"/proc/{info['pid']}/limits").read_text()
    core_line = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core_line.split()[4:6] == ["0", "0"]


def test_trusted_and_untrusted_apis(session, kernel, tmp_path):
    session.run("with mesatee.open('notes', 'w') as f:\n    f.write('sealed text')")
    assert session.run("mesatee.open('notes', 'r').read()").value == "sealed text"
    sealed_files = [p for p in (kernel.data_dir / "sealed").rglob("*") if p.is_file()]
    assert sealed_files and all(b"sealed text" not in p.read_bytes() for p in sealed_files)
    host_file = kernel.untrusted_dir / "plain.txt"
    host_file.write_text("host data")
    assert session.run(f"mesatee.untrusted_open({str(host_file)!r}).read()").value == "host data"
    elsewhere = tmp_path / "plain.txt"
    elsewhere.write_text("not shared")
    with pytest.raises(mn.RemoteExecutionError, match="shared host directory"):
        session.run(f"mesatee.untrusted_open({str(elsewhere)!r}).read()")
    session.run("mesatee.untrusted_log('hello host')")
    with pytest.raises(mn.MesateeError):
        session.run("mesatee.open('never-written', 'rb').read()")


def test_pickle_only_with_explicit_opt_in(session):
    from fractions import Fraction

    with pytest.raises(mn.EncodingError, match="allow_pickle"):
        session.run("pass", inputs={"f": Fraction(1, 3)})
    r = session.run("f * 3", inputs={"f": Fraction(1, 3)}, allow_pickle=True)
    assert r.value == 1


@pytest.mark.slow
def test_memory_limit(tmp_path):
    from tests.conftest import start_kernel, stop_kernel

    k = start_kernel(tmp_path / "k", "--executor-memory", "3G")
    try:
        s = mn.connect(k.url, policy=k.policy())
        with pytest.raises(mn.RemoteExecutionError, match="MemoryError"):
            s.run("import numpy as np\nx = np.ones(2**30)")  # 8 GiB
        assert s.run("1 + 1").value == 2
        s.close()
    finally:
        stop_kernel(k)
