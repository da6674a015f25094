"""Admission for the head's cluster calls: the same gate, fairness and quotas as a single-node service call.

A service call on one node passes, in order: the party's ``concurrent_calls``/``executors`` quota (taken by the
connection before the call), the kernel's ``service_gate`` (shared; a migration takes it alone), and a service
pool that runs **at most one call of a party at a time** and hands free workers to the waiting parties in
round-robin order. The head serves ``cluster.*`` calls and the calls on partitioned datasets (``frame.*``,
``dataset.delete``, ``gbdt.train``) in the supervisor, not in a pool; :func:`admitted` gives them the same two
last steps, with a :class:`ClusterLane` in place of the pool: ``slots`` calls run on the cluster at once, one per
party, the parties served in turn. A party that sends many calls at once therefore holds one slot and queues the
rest behind its own; the other parties keep being served.

Storage: a partitioned upload's partition bytes are counted in the owner's ``sealed_bytes`` quota under
:func:`ledger_name` (see ``datasets.cluster_upload``), before any byte is placed on a worker.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from mesatee_notebook.errors import MesateeError

if TYPE_CHECKING:
    from mesatee_notebook.enclave.supervisor import Kernel

__all__ = ["CLUSTER_SLOTS", "ClusterLane", "admitted", "ledger_name"]

#: Cluster calls that run at once (each one a different party's); more queue, fairly, in the head.
CLUSTER_SLOTS: Final = 2


def ledger_name(dataset: str) -> str:
    """The quota ledger's name for a partitioned dataset's bytes (sealed on the workers, not in the head).

    The name of a single-node dataset's Arrow data: replacing one kind by the other moves the entry, so the
    owner's quota counts whichever is live, once.
    """
    from mesatee_notebook.enclave.datasets import data_name

    return data_name(dataset)


@dataclass(eq=False)
class _Ticket:
    party: str
    ready: threading.Event = field(default_factory=threading.Event)
    running: bool = False


class ClusterLane:
    """``slots`` cluster calls at once, at most one per party; waiting parties are served in round-robin order."""

    def __init__(self, slots: int = CLUSTER_SLOTS) -> None:
        if slots < 1:
            msg = "a cluster lane needs at least one slot"
            raise ValueError(msg)
        self.slots = slots
        self._cond = threading.Condition()
        self._queues: dict[str, collections.deque[_Ticket]] = {}
        self._order: collections.deque[str] = collections.deque()
        self._running: set[str] = set()
        self._closed = False

    def _dispatch(self) -> None:
        """Start waiting tickets while slots are free (caller holds the lock)."""
        turns = len(self._order)
        while len(self._running) < self.slots and turns > 0:
            turns -= 1
            party = self._order.popleft()
            queue = self._queues.get(party)
            if not queue:
                self._queues.pop(party, None)
                continue
            if party in self._running:  # its own earlier call is still running: it waits its turn
                self._order.append(party)
                continue
            ticket = queue.popleft()
            if queue:
                self._order.append(party)
            else:
                self._queues.pop(party, None)
            self._running.add(party)
            ticket.running = True
            ticket.ready.set()
            turns = len(self._order)

    @contextlib.contextmanager
    def turn(self, party: str) -> Iterator[None]:
        """Wait for this party's turn on the cluster, hold a slot for the block."""
        ticket = _Ticket(party)
        with self._cond:
            if self._closed:
                msg = "the kernel is shutting down"
                raise MesateeError(msg)
            if party not in self._queues:
                self._queues[party] = collections.deque()
                self._order.append(party)
            self._queues[party].append(ticket)
            self._dispatch()
        ticket.ready.wait()
        try:
            if not ticket.running:
                msg = "the kernel is shutting down"
                raise MesateeError(msg)
            yield
        finally:
            with self._cond:
                if ticket.running:
                    self._running.discard(party)
                self._dispatch()

    def status(self) -> dict[str, int]:
        """Calls running and waiting (counts only: no party names, no arguments)."""
        with self._cond:
            return {
                "slots": self.slots,
                "running": len(self._running),
                "queued": sum(len(q) for q in self._queues.values()),
            }

    def close(self) -> None:
        """Release every waiting call with an error (the kernel stops)."""
        with self._cond:
            self._closed = True
            for queue in self._queues.values():
                for ticket in queue:
                    ticket.ready.set()
            self._queues.clear()
            self._order.clear()


_LANES_LOCK = threading.Lock()


def lane_of(kernel: Kernel) -> ClusterLane:
    """The kernel's cluster lane (one per kernel, made on first use)."""
    with _LANES_LOCK:
        lane = getattr(kernel, "cluster_lane", None)
        if not isinstance(lane, ClusterLane):
            lane = ClusterLane()
            kernel.cluster_lane = lane  # type: ignore[attr-defined]
        return lane


@contextlib.contextmanager
def admitted(kernel: Kernel, party: str) -> Iterator[None]:
    """The service gate (shared, as every service call) and this party's turn on the cluster."""
    with kernel.service_gate.shared(), lane_of(kernel).turn(party):
        yield
