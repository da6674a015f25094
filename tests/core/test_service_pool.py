"""Fair, concurrent service workers: the scheduler alone (fake workers), then a real kernel."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest

import mesatee_notebook as mn
from mesatee_notebook.enclave.service_pool import ServicePool
from mesatee_notebook.errors import RemoteInterrupted
from mesatee_notebook.wire.stream import Message
from tests.conftest import KernelProc, start_kernel, stop_kernel
from tests.waiting import PATIENCE, wait_until


class FakeWorker:
    """Stands in for an ExecutorHandle: each call blocks until the test releases it."""

    def __init__(self, log: list[tuple[str, int, bool]], slot_of: dict[int, int]) -> None:
        self.log = log
        self.alive = True
        self.gates: dict[str, threading.Event] = {}
        self.id = len(slot_of)
        slot_of[id(self)] = self.id

    def exchange(self, header: dict[str, Any], payloads: Any, fds: Any, on_message: Any, timeout: Any) -> Message:
        self.log.append((header["party"], self.id, bool(header["fresh"])))
        gate = self.gates.setdefault(header["nonce"], threading.Event())
        if not gate.wait(PATIENCE):
            raise AssertionError("a fake call was never released")
        if not self.alive:
            raise mn.RemoteExecutionError("killed")  # never reached in these tests
        return Message({"t": "result", "p": []})

    def kill(self) -> None:
        self.alive = False

    def crashed_error(self) -> Any:
        return mn.RemoteExecutionError("dead", status="killed")

    def shutdown(self) -> None:
        self.alive = False


@pytest.fixture
def pool() -> Iterator[tuple[ServicePool, list[tuple[str, int, bool]], list[FakeWorker]]]:
    log: list[tuple[str, int, bool]] = []
    workers: list[FakeWorker] = []
    slot_of: dict[int, int] = {}

    def start() -> Any:
        w = FakeWorker(log, slot_of)
        workers.append(w)
        return w

    p = ServicePool("general", 2, start, lambda details: None)
    yield p, log, workers
    p.shutdown()


def _call(p: ServicePool, party: str, nonce: str, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        try:
            out[nonce] = p.run(party, nonce, "svc", {"party": party, "nonce": nonce}, [], [], lambda w, m: True, 10)
        except Exception as exc:
            out[nonce] = exc

    t = threading.Thread(target=run)
    t.start()
    return t


def _release(workers: list[FakeWorker], nonce: str) -> None:
    for w in workers:
        w.gates.setdefault(nonce, threading.Event()).set()


def test_one_call_per_party_and_round_robin(pool: Any) -> None:
    p, log, workers = pool
    out: dict[str, Any] = {}
    threads = [_call(p, "alice", "a1", out)]
    wait_until(lambda: len(log) == 1, "call 1 to reach a worker")
    threads += [_call(p, "alice", "a2", out), _call(p, "alice", "a3", out)]
    wait_until(lambda: p.status()["queued"] == {"alice": 2}, "alice's second and third calls to queue")
    threads.append(_call(p, "bob", "b1", out))
    wait_until(lambda: len(log) == 2, "call 2 to reach a worker")
    # alice's second call waits for her first even though a worker is free; bob gets the free worker at once
    assert [e[0] for e in log] == ["alice", "bob"]
    assert {e[1] for e in log} == {0, 1}
    threads.append(_call(p, "bob", "b2", out))
    _release(workers, "b1")
    wait_until(lambda: len(log) == 3, "call 3 to reach a worker")
    # the freed worker goes to whoever is next in turn and not running: bob (alice is still running)
    assert log[2][0] == "bob"
    _release(workers, "a1")
    wait_until(lambda: len(log) == 4, "call 4 to reach a worker")
    assert log[3][0] == "alice"
    for n in ("b2", "a2", "a3"):
        _release(workers, n)
    for t in threads:
        t.join()
    assert all(isinstance(v, Message) for v in out.values()), out


def test_a_call_on_another_worker_than_the_partys_last_is_fresh(pool: Any) -> None:
    p, log, workers = pool
    out: dict[str, Any] = {}
    t = _call(p, "alice", "a1", out)
    wait_until(lambda: len(log) == 1, "call 1 to reach a worker")
    _release(workers, "a1")
    t.join()
    # bob now holds alice's last worker, so alice's next call lands on the other one and must re-read her state
    tb = _call(p, "bob", "b1", out)
    wait_until(lambda: len(log) == 2, "call 2 to reach a worker")
    ta = _call(p, "alice", "a2", out)
    wait_until(lambda: len(log) == 3, "call 3 to reach a worker")
    assert log[0] == ("alice", 0, True)  # a first call is fresh: nothing cached yet
    assert log[1] == ("bob", 0, True)
    assert log[2] == ("alice", 1, True)
    _release(workers, "a2")
    ta.join()
    ta = _call(p, "alice", "a3", out)
    wait_until(lambda: len(log) == 4, "call 4 to reach a worker")
    assert log[3] == ("alice", 1, False)  # the same worker again: its cache is hers and current
    for n in ("a3", "b1"):
        _release(workers, n)
    ta.join()
    tb.join()


def test_a_queued_call_can_be_cancelled_by_its_party_only(pool: Any) -> None:
    p, log, workers = pool
    out: dict[str, Any] = {}
    t1 = _call(p, "alice", "a1", out)
    wait_until(lambda: len(log) == 1, "call 1 to reach a worker")
    t2 = _call(p, "alice", "a2", out)
    wait_until(lambda: p.status()["queued"] == {"alice": 1}, "alice's second call to queue")
    assert not p.cancel("bob", "a2")  # not bob's call
    assert p.cancel("alice", "a2")
    t2.join()
    assert isinstance(out["a2"], RemoteInterrupted)
    _release(workers, "a1")
    t1.join()
    assert isinstance(out["a1"], Message)
    assert [e[0] for e in log] == ["alice"]


# -- a real kernel ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProc]:
    k = start_kernel(tmp_path_factory.mktemp("pool"), "--service-workers", "2")
    yield k
    stop_kernel(k)


@pytest.mark.slow
def test_a_long_job_does_not_stall_another_party_and_can_be_cancelled(pooled: KernelProc, tmp_path: Any) -> None:
    alice = mn.connect(pooled.url, policy=pooled.policy(), identity=tmp_path / "alice")
    bob = mn.connect(pooled.url, policy=pooled.policy(), identity=tmp_path / "bob")
    try:
        bob.upload(pd.DataFrame({"g": ["a"] * 10 + ["b"] * 10, "v": range(20)}), "bob_small")
        rng = np.random.default_rng(0)
        train = pd.DataFrame(rng.normal(size=(20_000, 8)), columns=[f"f{i}" for i in range(8)])
        train["y"] = rng.normal(size=20_000)
        events: list[dict[str, Any]] = []
        first = threading.Event()
        out: dict[str, Any] = {}

        def on_progress(e: dict[str, Any]) -> None:
            events.append(e)
            first.set()

        def long_train() -> None:
            try:
                out["r"] = alice.call(
                    "gbdt.train",
                    {"data": {"input": "train"}, "label": "y", "num_boost_round": 100_000, "params": {"max_depth": 8}},
                    {"train": train},
                    progress=on_progress,
                )
            except Exception as exc:
                out["r"] = exc

        t = threading.Thread(target=long_train)
        t.start()
        assert first.wait(60), "the long job reported no progress"
        for _ in range(5):  # bob is served while alice's job runs (it is still running afterwards)
            assert bob.call("dataset.info", {"name": "bob_small"}).info["rows"] == 20
        assert t.is_alive()
        assert alice.cancel_calls() == 1
        t.join(30)
        assert not t.is_alive()
        assert isinstance(out["r"], RemoteInterrupted) and "cancelled" in str(out["r"])
        assert events  # progress arrived while it ran
        # both parties go on: a fresh worker replaces the stopped one
        assert alice.call("dataset.info", {"name": "bob_small"}).info["rows"] == 20
        assert bob.call("dataset.info", {"name": "bob_small"}).info["rows"] == 20
    finally:
        alice.close()
        bob.close()
