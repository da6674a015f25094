"""One fair queue for every place the kernel shares a few slots among parties that may be hostile to each other.

Each party has its own FIFO queue, **at most one of a party's tickets runs at a time**, and free slots go to the
waiting parties in round-robin order. A party that sends many calls at once therefore holds one slot and queues the
rest behind its own; every other party keeps being served. Used by the service pools (``enclave/service_pool.py``,
where a slot is a service worker) and by the cluster head's lane (``enclave/cluster/admission.py``, where a slot is
a turn on the cluster).

The queue does no locking and no waiting: its owner holds its own lock (a ``threading.Condition``) around every
call and wakes the tickets that :meth:`FairQueue.dispatch` starts. A closed queue (the kernel shuts down) refuses
every new ticket with the one typed error, so its owners need no closed flag of their own.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from mesatee_notebook.errors import MesateeError

__all__ = ["FairQueue"]

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Per-party FIFO queues served round robin, one running ticket per party (the caller holds the lock)."""

    def __init__(self) -> None:
        self._queues: dict[str, collections.deque[T]] = {}
        self._order: collections.deque[str] = collections.deque()  # parties with waiting tickets, in turn
        self.running: dict[str, T] = {}  # party -> its running ticket
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (no ticket is queued any more)."""
        return self._closed

    def close(self) -> None:
        """Refuse every later :meth:`push`; tickets already queued or running stay (see :meth:`drain`)."""
        self._closed = True

    def push(self, party: str, ticket: T) -> None:
        """Queue ``ticket`` behind ``party``'s earlier ones; ``MesateeError`` once the queue is closed."""
        if self._closed:
            msg = "the kernel is shutting down"
            raise MesateeError(msg)
        if party not in self._queues:
            self._queues[party] = collections.deque()
            self._order.append(party)
        self._queues[party].append(ticket)

    def dispatch(self, has_room: Callable[[], bool], start: Callable[[str, T], None]) -> None:
        """While ``has_room()``, start the next party's oldest ticket (``start(party, ticket)``), in turn.

        A party whose earlier ticket still runs keeps its place and waits; ``start`` must take the room it uses.
        """
        turns = len(self._order)
        while has_room() and turns > 0:
            turns -= 1
            party = self._order.popleft()
            queue = self._queues.get(party)
            if not queue:
                self._queues.pop(party, None)
                continue
            if party in self.running:  # one ticket per party at a time: it waits its own turn
                self._order.append(party)
                continue
            ticket = queue.popleft()
            if queue:
                self._order.append(party)
            else:
                self._queues.pop(party, None)
            self.running[party] = ticket
            start(party, ticket)
            turns = len(self._order)

    def finish(self, party: str, ticket: T) -> bool:
        """``ticket`` of ``party`` stopped running; False if it was not the running one (never started)."""
        if self.running.get(party) is ticket:
            del self.running[party]
            return True
        return False

    def remove(self, match: Callable[[T], bool]) -> T | None:
        """Take the first waiting ticket for which ``match`` holds out of its queue (a cancelled call)."""
        for queue in self._queues.values():
            for ticket in queue:
                if match(ticket):
                    queue.remove(ticket)
                    return ticket
        return None

    def drain(self) -> list[T]:
        """Take every waiting ticket out (the owner releases them: it shuts down)."""
        waiting = [t for q in self._queues.values() for t in q]
        self._queues.clear()
        self._order.clear()
        return waiting

    def waiting(self) -> Iterator[tuple[str, int]]:
        """(party, number of waiting tickets) for each party in the queue."""
        return ((p, len(q)) for p, q in self._queues.items())

    def queued(self) -> int:
        """Waiting tickets in all."""
        return sum(len(q) for q in self._queues.values())
