"""R3, faults: kill -9 the supervisor, a service worker or an executor mid-operation, then go on (or restart).

Each case checks that the client got a clear typed error, that data sealed before is intact by digest, that no
half-written artifact is left (no ``.part`` file, no half dataset or job), and that the audit log still verifies.
The supervisor killed mid-upload is ``test_kill_during_sealed_write.py``; this file covers the rest of the matrix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pytest

import mesatee_notebook as mn
from tests.conftest import KernelProc, start_kernel, stop_kernel

KEPT = pd.DataFrame({"g": ["a", "b"] * 50, "x": np.arange(100.0)})
SECRET = b"sealed before the fault" * 100


def service_workers(k: KernelProc) -> list[int]:
    return [
        p.pid
        for p in psutil.Process(k.proc.pid).children()
        if p.status() != psutil.STATUS_ZOMBIE and "--service" in p.cmdline()
    ]


def no_part_files(data_dir: Path) -> bool:
    return not any(p.name.endswith(".part") for p in (data_dir / "sealed").iterdir())


def run_until(op: Callable[[], Any], mid: Callable[[], bool], kill: Callable[[], None]) -> BaseException | None:
    """Run ``op`` in a thread, call ``kill`` as soon as ``mid()`` holds; return what ``op`` raised."""
    box: dict[str, BaseException] = {}

    def target() -> None:
        try:
            op()
        except BaseException as exc:
            box["e"] = exc

    t = threading.Thread(target=target)
    t.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and t.is_alive():
        if mid():
            kill()
            break
        time.sleep(0.002)
    else:
        raise AssertionError("never saw the operation in progress")
    t.join(60)
    assert not t.is_alive()
    return box.get("e")


def _operation(phase: str, owner: Any, bob: Any, data_dir: Path, started: threading.Event) -> Callable[[], Any]:
    if phase == "seal":  # a cell seals ~300 MB: the supervisor writes it when the cell closes the file
        return lambda: owner.run(
            "with mesatee.open('big', 'wb') as f:\n    for _ in range(300): f.write(b'y' * (1 << 20))"
        )
    if phase == "upload":
        big = pd.DataFrame(np.random.default_rng(1).random((6_000_000, 4)), columns=list("abcd"))
        return lambda: owner.upload(big, "half_written")
    if phase == "train":
        rng = np.random.default_rng(0)
        df = pd.DataFrame(rng.normal(size=(20_000, 8)), columns=[f"f{i}" for i in range(8)])
        df["y"] = rng.normal(size=len(df))
        return lambda: owner.call(
            "gbdt.train",
            {"data": {"input": "d"}, "label": "y", "num_boost_round": 100_000},
            {"d": df},
            progress=lambda e: started.set(),
        )
    if phase == "psi":
        n = 3_000_000
        rng = np.random.default_rng(2)
        a = rng.integers(0, 2**62, n, dtype=np.int64)
        b = np.concatenate([a[: n // 2], rng.integers(0, 2**62, n - n // 2, dtype=np.int64)])
        owner.psi.create("fault-psi", [owner.party_id, bob.party_id], mode="intersection", receivers=[owner.party_id])
        owner.psi.submit("fault-psi", a)
        bob.psi.submit("fault-psi", b)
        digest = bob.psi.status("fault-psi").spec_digest
        return lambda: bob.call(
            "psi.approve",
            {"name": "fault-psi", "spec_digest": digest},
            progress=lambda e: started.set() if e.get("state") == "running" else None,
        )
    raise AssertionError(phase)


CASES = [
    ("supervisor", "seal"),
    ("supervisor", "train"),
    ("supervisor", "psi"),
    ("worker", "upload"),
    ("worker", "train"),
    ("worker", "psi"),
    ("executor", "seal"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("victim", "phase"), CASES, ids=[f"{v}-mid-{p}" for v, p in CASES])
def test_kill_9_mid_operation(tmp_path: Path, victim: str, phase: str) -> None:
    data_dir = tmp_path / "k"
    k = start_kernel(data_dir)
    restarted = False
    try:
        owner = mn.connect(k.url, policy=k.policy(), identity=tmp_path / "owner")
        bob = mn.connect(k.url, policy=k.policy(), identity=tmp_path / "bob")
        owner.upload(KEPT, "kept", policy=mn.DataPolicy(min_group_size=10))
        kept_digest = owner.call("dataset.info", {"name": "kept"}).info["sha256"]
        owner.run("with mesatee.open('kept', 'wb') as f: f.write(secret)", inputs={"secret": SECRET})
        started = threading.Event()
        op = _operation(phase, owner, bob, data_dir, started)
        if phase in ("seal", "upload"):

            def mid() -> bool:
                return not no_part_files(data_dir)
        else:
            mid = started.is_set
        if victim == "supervisor":
            pids = [k.proc.pid]
        elif victim == "worker":
            pids = []  # looked up at the moment of the kill: the worker may start during the operation
        else:
            pids = [int(owner.sessions()[0]["pid"])]

        def kill() -> None:
            for pid in pids or service_workers(k):
                os.kill(pid, signal.SIGKILL)

        err = run_until(op, mid, kill)
        assert isinstance(err, mn.MesateeError), f"the client got {err!r}, not a typed error"
        expected = mn.KernelConnectionError if victim == "supervisor" else mn.RemoteExecutionError
        assert isinstance(err, expected), repr(err)
        if victim == "supervisor":
            for s in (owner, bob):
                with contextlib.suppress(mn.MesateeError, OSError):
                    s.close()
            k.proc.wait(10)
            k = start_kernel(data_dir)
            restarted = True
            owner = mn.connect(k.url, policy=k.policy(), identity=tmp_path / "owner")
            bob = mn.connect(k.url, policy=k.policy(), identity=tmp_path / "bob")
        elif victim == "executor":
            owner.restart()
        # sealed data from before the fault: intact, by digest
        assert owner.call("dataset.info", {"name": "kept"}).info["sha256"] == kept_digest
        got = owner.run("import hashlib; hashlib.sha256(mesatee.open('kept', 'rb').read()).hexdigest()").value
        assert got == hashlib.sha256(SECRET).hexdigest()
        # nothing half-written
        assert no_part_files(data_dir)
        if phase == "upload":
            assert "half_written" not in [d["name"] for d in owner.datasets()]
        if phase == "seal":
            size = owner.run(
                "try:\n    n = len(mesatee.open('big', 'rb').read())\nexcept Exception:\n    n = None\nn"
            ).value
            if victim == "supervisor":
                assert size is None  # the supervisor died mid-write: the write never became visible
            else:
                assert size in (None, 300 << 20)  # the supervisor held the data: all of it, or none
        if phase == "psi":
            status = owner.psi.status("fault-psi")
            assert status.state == "failed", status
            with pytest.raises(mn.MesateeError):
                owner.psi.result("fault-psi")
        if phase == "train":
            assert owner.call("gbdt.list").info.get("models", []) == []
        # the audit log verifies (signatures, hash chain) and a service worker's death is on record
        entries = owner.audit()
        if victim == "worker":
            assert any(e["kind"] == "recovery" for e in entries)
        assert bob.run("1 + 1").value == 2
        owner.close()
        bob.close()
    finally:
        stop_kernel(k)
        del restarted
