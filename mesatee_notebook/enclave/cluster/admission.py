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

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from mesatee_notebook.enclave.fairqueue import FairQueue
from mesatee_notebook.errors import MesateeError

if TYPE_CHECKING:
    from mesatee_notebook.enclave.supervisor import Kernel

__all__ = ["CLUSTER_SLOTS", "ClusterLane", "admitted", "close_lane", "ledger_name"]

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
        self._fair: FairQueue[_Ticket] = FairQueue()  # the service pools' fair queue (enclave/fairqueue.py)

    def _dispatch(self) -> None:
        """Start waiting tickets while slots are free (caller holds the lock)."""
        self._fair.dispatch(lambda: len(self._fair.running) < self.slots, _start)

    @contextlib.contextmanager
    def turn(self, party: str) -> Iterator[None]:
        """Wait for this party's turn on the cluster, hold a slot for the block."""
        ticket = _Ticket(party)
        with self._cond:
            self._fair.push(party, ticket)  # refused once the lane is closed
            self._dispatch()
        ticket.ready.wait()
        try:
            if not ticket.running:
                msg = "the kernel is shutting down"
                raise MesateeError(msg)
            yield
        finally:
            with self._cond:
                self._fair.finish(party, ticket)
                self._dispatch()

    def status(self) -> dict[str, int]:
        """Calls running and waiting (counts only: no party names, no arguments)."""
        with self._cond:
            return {"slots": self.slots, "running": len(self._fair.running), "queued": self._fair.queued()}

    @property
    def closed(self) -> bool:
        return self._fair.closed

    def close(self) -> None:
        """Release every waiting call with an error (the kernel stops); calls already running finish."""
        with self._cond:
            self._fair.close()
            for ticket in self._fair.drain():
                ticket.ready.set()


def _start(party: str, ticket: _Ticket) -> None:
    ticket.running = True
    ticket.ready.set()


_LANES_LOCK = threading.Lock()


def lane_of(kernel: Kernel) -> ClusterLane:
    """The kernel's cluster lane (one per kernel, made on first use)."""
    with _LANES_LOCK:
        lane = getattr(kernel, "cluster_lane", None)
        if not isinstance(lane, ClusterLane):
            lane = ClusterLane()
            kernel.cluster_lane = lane  # type: ignore[attr-defined]
        return lane


def close_lane(kernel: Kernel) -> None:
    """Close the kernel's cluster lane, if it has one, and keep it closed (kernel shutdown)."""
    lane_of(kernel).close()  # a kernel with no lane yet gets a closed one, so no call is admitted later


@contextlib.contextmanager
def admitted(kernel: Kernel, party: str) -> Iterator[None]:
    """The service gate (shared, as every service call) and this party's turn on the cluster.

    Within it, the codecs' caches of the head's process are the party's (``wire/arrow_fast.caller_scope``).
    """
    from mesatee_notebook.wire.arrow_fast import caller_scope

    with kernel.service_gate.shared(), lane_of(kernel).turn(party), caller_scope(party):
        yield
