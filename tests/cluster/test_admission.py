"""The head's admission for cluster calls (no cluster needed): the fair lane, and the worker list it asks for."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from mesatee_notebook.enclave.cluster.admission import ClusterLane
from mesatee_notebook.enclave.cluster.head import ClusterHead
from mesatee_notebook.errors import MesateeError, RemoteExecutionError
from tests.waiting import PATIENCE, wait_until


def _hold(lane: ClusterLane, party: str, log: list[str], release: threading.Event, started: threading.Event) -> None:
    with lane.turn(party):
        log.append(party)
        started.set()
        release.wait(PATIENCE)


def test_one_call_per_party_and_the_others_are_served_in_turn() -> None:
    lane = ClusterLane(slots=2)
    log: list[str] = []
    releases = [threading.Event() for _ in range(6)]
    starts = [threading.Event() for _ in range(6)]
    # The hostile party sends 5 calls at once, then a victim sends one.
    threads = [
        threading.Thread(target=_hold, args=(lane, "hostile", log, releases[i], starts[i]), daemon=True)
        for i in range(5)
    ]
    for t in threads:
        t.start()
    assert starts[0].wait(PATIENCE)
    # all five are in the lane before the check (a fixed 0.2 s sleep raced the threads' start on a loaded machine)
    wait_until(lambda: lane.status()["queued"] == 4, "the hostile party's other four calls to queue")
    assert log == ["hostile"], "a party's calls never overlap, even with free slots"
    assert lane.status() == {"slots": 2, "running": 1, "queued": 4}
    victim = threading.Thread(target=_hold, args=(lane, "victim", log, releases[5], starts[5]), daemon=True)
    victim.start()
    assert starts[5].wait(PATIENCE), "the victim takes the free slot at once, ahead of the hostile party's queue"
    assert log == ["hostile", "victim"]
    releases[5].set()
    victim.join(PATIENCE)
    # The hostile party's queue drains one call at a time.
    for i in range(5):
        releases[i].set()
    for t in threads:
        t.join(PATIENCE)
    assert log == ["hostile", "victim", "hostile", "hostile", "hostile", "hostile"]
    assert lane.status() == {"slots": 2, "running": 0, "queued": 0}


def test_round_robin_when_every_slot_is_taken() -> None:
    lane = ClusterLane(slots=1)
    order: list[str] = []
    gate = threading.Event()
    first = threading.Event()
    holder = threading.Thread(target=_hold, args=(lane, "a", order, gate, first), daemon=True)
    holder.start()
    assert first.wait(PATIENCE)
    done: list[threading.Thread] = []
    for n, party in enumerate(["a", "a", "a", "b", "c"], 1):  # a queues three more, then b and c one each
        ev = threading.Event()
        ev.set()
        t = threading.Thread(target=_hold, args=(lane, party, order, ev, threading.Event()), daemon=True)
        t.start()
        done.append(t)
        # in this order: a fixed 0.05 s sleep let c queue before b on a loaded machine
        wait_until(lambda n=n: lane.status()["queued"] == n, f"call {n} to queue")
    gate.set()
    for t in [holder, *done]:
        t.join(PATIENCE)
    assert order == ["a", "a", "b", "c", "a", "a"], "b and c are served before a's backlog"


def test_a_closed_lane_releases_its_waiters_with_an_error() -> None:
    lane = ClusterLane(slots=1)
    errors: list[BaseException] = []
    release, started = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold, args=(lane, "a", [], release, started), daemon=True)
    holder.start()
    assert started.wait(PATIENCE)

    def wait_turn() -> None:
        try:
            with lane.turn("b"):
                pass
        except MesateeError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_turn, daemon=True)
    waiter.start()
    wait_until(lambda: lane.status()["queued"] == 1, "b's call to queue")  # closed while waiting, not before
    lane.close()
    waiter.join(PATIENCE)
    release.set()
    assert len(errors) == 1 and "shutting down" in str(errors[0])


class _FakeScheduler:
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.calls = 0

    def identity(self, n_workers: int = 0) -> Any:
        assert n_workers == -1, "the head asks for every worker"
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else {"workers": {}}
        if isinstance(answer, Exception):
            raise answer
        return answer


class _FakeClient:
    def __init__(self, scheduler: _FakeScheduler) -> None:
        self.scheduler = scheduler

    def sync(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def scheduler_info(self, **kwargs: Any) -> Any:  # the cached identity the head must not rely on
        return {"workers": {}}


def _head(answers: list[Any]) -> tuple[ClusterHead, _FakeScheduler]:
    head = object.__new__(ClusterHead)
    scheduler = _FakeScheduler(answers)
    head.client = _FakeClient(scheduler)  # type: ignore[assignment]
    head.url = "atls://127.0.0.1:1"
    return head, scheduler


def test_workers_are_asked_of_the_scheduler_not_the_cached_identity() -> None:
    head, scheduler = _head([{"workers": {"atls://b:2": {}, "atls://a:1": {}}}])
    assert head._workers() == ["atls://a:1", "atls://b:2"]
    assert scheduler.calls == 1


def test_an_empty_or_failed_answer_is_asked_again() -> None:
    head, scheduler = _head([OSError("timed out"), {"workers": {}}, {"workers": {"atls://a:1": {}}}])
    assert head._workers() == ["atls://a:1"]
    assert scheduler.calls == 3


def test_a_cluster_with_no_workers_is_empty_and_an_unreachable_scheduler_is_typed() -> None:
    head, scheduler = _head([])
    assert head._workers() == []
    assert scheduler.calls >= 2
    head, _ = _head([OSError("connection closed")] * 10)
    with pytest.raises(RemoteExecutionError, match="cannot ask the scheduler"):
        head._workers()


class _FakeHead:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_head_shutdown_closes_the_lane_and_the_client() -> None:
    """Kernel.shutdown (serve --cluster) calls detach_head: waiters get the typed error, the client is closed."""
    import types

    from mesatee_notebook.enclave.cluster.admission import lane_of
    from mesatee_notebook.enclave.cluster.head import detach_head

    kernel: Any = types.SimpleNamespace(cluster_head=_FakeHead())
    fake = kernel.cluster_head
    lane = lane_of(kernel)
    lane.slots = 1
    release, started = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold, args=(lane, "a", [], release, started), daemon=True)
    holder.start()
    assert started.wait(PATIENCE)
    errors: list[BaseException] = []

    def wait_turn() -> None:
        try:
            with lane.turn("b"):
                errors.append(AssertionError("b ran on a closed lane"))
        except MesateeError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_turn, daemon=True)
    waiter.start()
    wait_until(lambda: lane.status()["queued"] == 1, "b's call to queue")
    detach_head(kernel)
    waiter.join(PATIENCE)
    assert len(errors) == 1 and "shutting down" in str(errors[0])
    assert fake.closed == 1 and kernel.cluster_head is None and lane.closed
    with pytest.raises(MesateeError, match="shutting down"), lane.turn("c"):
        pass
    release.set()
    holder.join(PATIENCE)
    assert lane.status() == {"slots": 1, "running": 0, "queued": 0}
