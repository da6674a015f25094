"""Service workers: a small pool, scheduled fairly across parties.

Trusted services run in service workers (executor processes started with ``--service``; they never run user code).
A :class:`ServicePool` owns a few of them and hands them out to calls:

- each party has its own FIFO queue, and **at most one call of a party runs at a time** in a pool; free workers
  go to the waiting parties in round-robin order. One party's long job therefore holds one worker, and another
  party's short query waits at most for a worker to finish the short task in front of it (the queue is
  ``enclave/fairqueue.py``'s, shared with the cluster head's lane);
- because a party's calls never overlap, state a worker caches *per party* stays correct: when a party's call
  lands on a different worker than its previous one, the call is marked ``fresh`` and the worker re-reads that
  party's cached state (the differencing guard's history) from sealed storage;
- a dead worker is noticed before the call (``ExecutorHandle.alive`` checks the process and the socket), replaced,
  and the replacement is audited as ``recovery`` for the party whose call last ran on it (the call that crashed or
  was cancelled) and the operator only: told to everyone, it said that another party's call had crashed or been
  cancelled (a gap session 7's red team left: ``tests/security/test_gaps.py``);
- a running call can be cancelled by the party that made it (:meth:`cancel`): its worker is stopped, the call
  fails with ``RemoteInterrupted``, and the next call gets a fresh worker. A queued call is just dropped.

The kernel runs two pools: the *jobs* pool (one worker, the single writer of the sealed job store: ``job.*`` and
``psi.*`` services) and the *general* pool for everything else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesatee_notebook.enclave.fairqueue import FairQueue
from mesatee_notebook.enclave.sessions import ExecutorHandle
from mesatee_notebook.errors import ExecutorCrashed, MesateeError, RemoteInterrupted
from mesatee_notebook.wire.stream import Message

__all__ = ["ServicePool", "default_pool_size"]

log = logging.getLogger("mesatee.enclave")


def default_pool_size() -> int:
    """Workers in the general pool: the core count, at least 2 and at most 8."""
    import os

    return max(2, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2))


@dataclass(eq=False)
class _Ticket:
    party: str
    nonce: str
    service: str
    ready: threading.Event = field(default_factory=threading.Event)
    slot: int | None = None
    worker: ExecutorHandle | None = None
    cancelled: bool = False


class ServicePool:
    """``size`` service workers shared fairly by the parties (see the module docstring)."""

    def __init__(
        self,
        name: str,
        size: int,
        start: Callable[[], ExecutorHandle],
        on_recovery: Callable[[dict[str, Any]], None],
    ) -> None:
        """``on_recovery(details)``: a worker was replaced; ``details["party"]``, if there, is whose call it was."""
        if size < 1:
            msg = "a service pool needs at least one worker"
            raise ValueError(msg)
        self.name = name
        self.size = size
        self._start = start
        self._on_recovery = on_recovery
        self._cond = threading.Condition()
        self._workers: list[ExecutorHandle | None] = [None] * size
        self._free: list[int] = list(range(size))
        self._fair: FairQueue[_Ticket] = FairQueue()  # per-party queues, round robin, one running call per party
        self._last_slot: dict[str, int] = {}
        # slot -> (party, service, cancelled) of the call that last ran there: whose a recovery there is
        self._last_call: dict[int, tuple[str, str, bool]] = {}

    # -- scheduling ---------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Give free workers to waiting parties in round-robin order (caller holds the lock)."""
        self._fair.dispatch(lambda: bool(self._free), self._assign)

    def _assign(self, party: str, ticket: _Ticket) -> None:
        """The party's last worker if it is free (its cached state is warm), else the first free one."""
        last = self._last_slot.get(party)
        slot = last if last in self._free else self._free[0]
        self._free.remove(slot)
        ticket.slot = slot
        ticket.ready.set()

    def _release(self, ticket: _Ticket) -> None:
        with self._cond:
            self._fair.finish(ticket.party, ticket)
            if ticket.slot is not None:
                self._last_slot[ticket.party] = ticket.slot
                self._last_call[ticket.slot] = (ticket.party, ticket.service, ticket.cancelled)
                self._free.append(ticket.slot)
                self._free.sort()
            self._dispatch()

    def _worker_for(self, slot: int) -> ExecutorHandle:
        """The worker in ``slot``: started on first use, replaced (and audited) if it died."""
        worker = self._workers[slot]
        if worker is not None and not worker.alive:
            status = worker.crashed_error().details.get("status")
            log.warning("%s service worker %d died (%s); starting a new one", self.name, slot, status)
            # In-memory caches are lost; persisted state (sealed) is re-read by the new worker. Said to the party whose
            # call last ran there (``party``: the callback scopes the entry to it), never to the other parties.
            with self._cond:
                last = self._last_call.pop(slot, None)
            details: dict[str, Any] = {"service_worker": "restarted", "pool": self.name, "status": status}
            if last is not None:
                details.update(zip(("party", "service", "cancelled"), last, strict=True))
            self._on_recovery(details)
            worker.kill()
            worker = None
        if worker is None:
            worker = self._start()
            self._workers[slot] = worker
        return worker

    # -- calls --------------------------------------------------------------------------------------------------
    def run(
        self,
        party: str,
        nonce: str,
        service: str,
        header: dict[str, Any],
        payloads: list[Any],
        fds: list[int],
        on_message: Callable[[ExecutorHandle, Message], bool],
        timeout: float,
    ) -> Message:
        """Queue the call for ``party``, wait for a worker, run it there and return the worker's reply."""
        ticket = _Ticket(party, nonce, service)
        with self._cond:
            self._fair.push(party, ticket)  # refused once the pool is shut down
            self._dispatch()
        ticket.ready.wait()
        try:
            if ticket.cancelled and ticket.slot is None:
                msg = f"service call {service!r} was cancelled by its party before it started"
                raise RemoteInterrupted(msg, service=service)
            if ticket.slot is None:  # still queued when the pool shut down: no worker is started for it
                msg = "the kernel is shutting down"
                raise MesateeError(msg)
            fresh = self._last_slot.get(party) != ticket.slot
            worker = self._worker_for(ticket.slot)
            with self._cond:
                ticket.worker = worker
                cancelled = ticket.cancelled
            if cancelled:
                msg = f"service call {service!r} was cancelled by its party before it started"
                raise RemoteInterrupted(msg, service=service)
            try:
                return worker.exchange(
                    {**header, "fresh": fresh}, payloads, fds, lambda m: on_message(worker, m), timeout
                )
            except ExecutorCrashed:
                if ticket.cancelled:
                    msg = (
                        f"service call {service!r} was cancelled by its party: its worker was stopped and nothing "
                        "was released (a job it was running is marked failed)"
                    )
                    raise RemoteInterrupted(msg, service=service) from None
                raise
        finally:
            self._release(ticket)

    def cancel(self, party: str | None, nonce: str) -> bool:
        """Cancel the call with ``nonce`` if ``party`` made it; True if one was queued or running."""
        with self._cond:
            queued = self._fair.remove(lambda t: t.nonce == nonce and (party is None or t.party == party))
            if queued is not None:
                queued.cancelled = True
                queued.ready.set()
                return True
            for ticket in self._fair.running.values():
                if ticket.nonce == nonce and (party is None or ticket.party == party):
                    ticket.cancelled = True
                    worker = ticket.worker
                    break
            else:
                return False
        if worker is not None:
            log.info("cancelling %s for party %s: stopping its worker", ticket.service, ticket.party[:16])
            worker.kill()
        return True

    def forget_party(self, party: str) -> None:
        """Serve ``party``'s next call as ``fresh`` (its worker re-reads the party's sealed state first)."""
        with self._cond:
            self._last_slot.pop(party, None)

    def status(self) -> dict[str, Any]:
        """Workers, running calls and queue lengths (no arguments, no data)."""
        with self._cond:
            return {
                "workers": self.size,
                "running": {p[:16]: t.service for p, t in self._fair.running.items()},
                "queued": {p[:16]: n for p, n in self._fair.waiting()},
            }

    def shutdown(self) -> None:
        """Stop every worker; calls still queued fail with ``MesateeError`` (running ones finish or fail)."""
        with self._cond:
            self._fair.close()
            for ticket in self._fair.drain():  # queued calls end with an error, rather than start a worker later
                ticket.ready.set()
            workers, self._workers = self._workers, [None] * self.size
        for worker in workers:
            if worker is not None:
                worker.shutdown()
