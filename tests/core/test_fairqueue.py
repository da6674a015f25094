"""enclave/fairqueue.py: the one fair queue owns its closed flag; the pool and the cluster lane refuse through it."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from mesatee_notebook.enclave.cluster.admission import ClusterLane
from mesatee_notebook.enclave.fairqueue import FairQueue
from mesatee_notebook.enclave.party_turns import PartyTurns
from mesatee_notebook.enclave.service_pool import ServicePool
from mesatee_notebook.errors import MesateeError
from tests.waiting import PATIENCE, wait_until


def test_a_closed_queue_refuses_a_push_and_keeps_what_it_held() -> None:
    q: FairQueue[str] = FairQueue()
    q.push("a", "a1")
    q.push("b", "b1")
    started: list[tuple[str, str]] = []
    q.dispatch(lambda: len(started) < 1, lambda p, t: started.append((p, t)))
    assert started == [("a", "a1")]
    assert not q.closed
    q.close()
    assert q.closed
    with pytest.raises(MesateeError, match="shutting down"):
        q.push("c", "c1")
    assert q.running == {"a": "a1"}  # closing neither stops a running ticket nor drops a queued one
    assert q.drain() == ["b1"]
    assert q.finish("a", "a1")
    with pytest.raises(MesateeError, match="shutting down"):
        q.push("a", "a2")  # stays closed after it is drained


def test_a_shut_down_pool_refuses_a_call_with_the_queues_error() -> None:
    started: list[Any] = []
    pool = ServicePool("general", 1, lambda: started.append(1), lambda details: None)  # type: ignore[arg-type,return-value]
    pool.shutdown()
    with pytest.raises(MesateeError, match="shutting down"):
        pool.run("p", "n", "svc", {}, [], [], lambda w, m: True, 1)
    assert started == []  # no worker was started for the refused call
    assert pool.status()["queued"] == {}


def test_a_closed_lane_releases_its_waiters_and_refuses_new_turns() -> None:
    lane = ClusterLane(slots=1)
    out: dict[str, Any] = {}
    holding = threading.Event()
    release = threading.Event()

    def first() -> None:
        with lane.turn("a"):
            holding.set()
            release.wait(PATIENCE)
        out["a"] = "done"

    def second() -> None:
        try:
            with lane.turn("b"):
                out["b"] = "ran"
        except MesateeError as exc:
            out["b"] = exc

    ta = threading.Thread(target=first)
    ta.start()
    assert holding.wait(PATIENCE)
    tb = threading.Thread(target=second)
    tb.start()
    wait_until(lambda: lane.status()["queued"] == 1, "b's call to queue")
    lane.close()
    tb.join(PATIENCE)
    assert isinstance(out["b"], MesateeError) and "shutting down" in str(out["b"])
    assert lane.closed
    with pytest.raises(MesateeError, match="shutting down"), lane.turn("c"):
        pass
    release.set()
    ta.join(PATIENCE)
    assert out["a"] == "done"  # a running call finishes


def test_party_turns_serialise_one_party_only_and_forget_idle_parties() -> None:
    turns = PartyTurns()
    inside: list[str] = []
    a_holds, release = threading.Event(), threading.Event()

    def hold_a() -> None:
        with turns.turn("a"):
            inside.append("a1")
            a_holds.set()
            release.wait(PATIENCE)

    def second_a() -> None:
        with turns.turn("a"):
            inside.append("a2")

    t1 = threading.Thread(target=hold_a)
    t1.start()
    assert a_holds.wait(PATIENCE)
    t2 = threading.Thread(target=second_a)
    t2.start()
    with turns.turn("b"):  # another party never waits for a's turn
        inside.append("b")
    t2.join(0.2)
    assert inside == ["a1", "b"]  # a's second call waits for its first
    release.set()
    t1.join(PATIENCE)
    t2.join(PATIENCE)
    assert inside == ["a1", "b", "a2"]
    assert len(turns) == 0  # nothing kept for a party with no call in flight (a Sybil's identities cost nothing)


def test_a_call_queued_when_the_pool_shuts_down_fails_and_starts_no_worker() -> None:
    """Before, a call still queued at shutdown started a fresh worker in the stopped pool when a slot came free."""
    started: list[threading.Event] = []

    class Blocking:
        alive = True

        def __init__(self) -> None:
            self.go = threading.Event()
            started.append(self.go)

        def exchange(self, *args: Any) -> Any:
            self.go.wait(PATIENCE)
            return "done"

        def shutdown(self) -> None:
            self.go.set()

    pool = ServicePool("general", 1, Blocking, lambda details: None)  # type: ignore[arg-type]
    out: dict[str, Any] = {}

    def call(party: str) -> None:
        try:
            out[party] = pool.run(party, party, "svc", {}, [], [], lambda w, m: True, 5)
        except MesateeError as exc:
            out[party] = exc

    first = threading.Thread(target=call, args=("a",))
    first.start()
    wait_until(lambda: started, "a's worker to start")
    second = threading.Thread(target=call, args=("b",))
    second.start()
    wait_until(lambda: pool.status()["queued"], "b's call to queue")
    pool.shutdown()  # stops a's worker (its call returns), and b was still queued
    first.join(PATIENCE)
    second.join(PATIENCE)
    assert isinstance(out["b"], MesateeError) and "shutting down" in str(out["b"])
    assert len(started) == 1  # no worker was started for b after the shutdown
