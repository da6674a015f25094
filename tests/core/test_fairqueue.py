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
            release.wait(5)
        out["a"] = "done"

    def second() -> None:
        try:
            with lane.turn("b"):
                out["b"] = "ran"
        except MesateeError as exc:
            out["b"] = exc

    ta = threading.Thread(target=first)
    ta.start()
    assert holding.wait(5)
    tb = threading.Thread(target=second)
    tb.start()
    deadline = threading.Event()
    for _ in range(100):
        if lane.status()["queued"] == 1:
            break
        deadline.wait(0.02)
    assert lane.status()["queued"] == 1
    lane.close()
    tb.join(5)
    assert isinstance(out["b"], MesateeError) and "shutting down" in str(out["b"])
    assert lane.closed
    with pytest.raises(MesateeError, match="shutting down"), lane.turn("c"):
        pass
    release.set()
    ta.join(5)
    assert out["a"] == "done"  # a running call finishes


def test_party_turns_serialise_one_party_only_and_forget_idle_parties() -> None:
    turns = PartyTurns()
    inside: list[str] = []
    a_holds, release = threading.Event(), threading.Event()

    def hold_a() -> None:
        with turns.turn("a"):
            inside.append("a1")
            a_holds.set()
            release.wait(5)

    def second_a() -> None:
        with turns.turn("a"):
            inside.append("a2")

    t1 = threading.Thread(target=hold_a)
    t1.start()
    assert a_holds.wait(5)
    t2 = threading.Thread(target=second_a)
    t2.start()
    with turns.turn("b"):  # another party never waits for a's turn
        inside.append("b")
    t2.join(0.2)
    assert inside == ["a1", "b"]  # a's second call waits for its first
    release.set()
    t1.join(5)
    t2.join(5)
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
            self.go.wait(5)
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
    for _ in range(100):
        if started:
            break
        threading.Event().wait(0.02)
    second = threading.Thread(target=call, args=("b",))
    second.start()
    for _ in range(100):
        if pool.status()["queued"]:
            break
        threading.Event().wait(0.02)
    assert pool.status()["queued"]
    pool.shutdown()  # stops a's worker (its call returns), and b was still queued
    first.join(5)
    second.join(5)
    assert isinstance(out["b"], MesateeError) and "shutting down" in str(out["b"])
    assert len(started) == 1  # no worker was started for b after the shutdown
