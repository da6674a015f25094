"""One turn at a time per party for the calls that check, then record, a party's release history.

The differencing guard checks a new release against the party's earlier ones and then records it; the check and the
record must see every other release of that party, or two releases that together single out a row can each pass.
One evaluator makes the pair atomic with a lock of its own, and a service pool runs at most one call of a party at
a time. But a kernel with a cluster head has two evaluators: the head's (in the supervisor, for plans that name a
partitioned dataset) and the service workers'. Both read the party's sealed history, so a head call and a worker
call of one party running at once could each check against a history without the other's release (red team,
session 7: ``tests/cluster/test_redteam_cluster.py``). :class:`PartyTurns` is the lock the supervisor holds around
every such call, whichever evaluator serves it; it is taken before the service gate, the cluster lane and the pool
queue, and nothing that holds one of those waits for it, so it adds no lock cycle.

The DP budget ledger does not need it (its charge is *write, then verify*: ``enclave/dp.py``), but a DP query is a
``frame.collect`` and so runs under it too. A party's own calls are all that wait here: other parties never do.

A call waiting here is not yet in any pool, so a pool cannot cancel it: :meth:`PartyTurns.cancel` (asked first by
``Kernel.cancel_service_call``) finds it by its nonce and wakes it with the ``RemoteInterrupted`` a call cancelled in
a pool's queue gets. It takes only this module's lock and waits for nothing while holding it, so it adds no lock
cycle either (a gap session 7's red team left: ``tests/security/test_gaps.py``).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from mesatee_notebook.errors import RemoteInterrupted

__all__ = ["GUARDED_SERVICES", "PartyTurns"]

#: The services that check, then record, a release in a party's differencing history.
GUARDED_SERVICES: Final = frozenset({"frame.collect"})


@dataclass(eq=False)
class _Waiter:
    nonce: str | None
    cancelled: bool = False


@dataclass(eq=False)
class _Turn:
    wake: threading.Condition  # on the turns' one lock: only this party's waiters are woken
    held: bool = False
    waiting: collections.deque[_Waiter] = field(default_factory=collections.deque)


class PartyTurns:
    """One turn per party, made when a party first waits and dropped when no call of it holds or waits for it.

    Entries live only while used, so a party with many identities (a Sybil) adds one small entry per call in flight,
    which the connection and call quotas already bound. A party's waiting calls get the turn in arrival order.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turns: dict[str, _Turn] = {}

    @contextlib.contextmanager
    def turn(self, party: str, nonce: str | None = None, service: str = "frame.collect") -> Iterator[None]:
        """Hold ``party``'s turn for the block (waits for its calls in progress, if any).

        ``nonce``: the call's nonce, by which :meth:`cancel` finds it while it waits; a cancelled wait raises
        ``RemoteInterrupted``, as a call cancelled in a pool's queue does.
        """
        with self._lock:
            turn = self._turns.get(party)
            if turn is None:
                turn = self._turns[party] = _Turn(threading.Condition(self._lock))
            me = _Waiter(nonce)
            turn.waiting.append(me)
            got = False
            try:
                turn.wake.wait_for(lambda: me.cancelled or (not turn.held and turn.waiting[0] is me))
                got = not me.cancelled
            finally:
                turn.waiting.remove(me)
                if got:
                    turn.held = True
                else:  # cancelled (or the wait failed): the next waiter may now be first in line
                    self._drop_if_idle(party, turn)
                    turn.wake.notify_all()
        if not got:
            msg = (
                f"service call {service!r} was cancelled by its party while it waited for its turn (the party's "
                "earlier call of this kind still runs); it never started"
            )
            raise RemoteInterrupted(msg, service=service)
        try:
            yield
        finally:
            with self._lock:
                turn.held = False
                self._drop_if_idle(party, turn)
                turn.wake.notify_all()

    def _drop_if_idle(self, party: str, turn: _Turn) -> None:
        """Forget ``party``'s entry when no call holds or waits for it (caller holds the lock)."""
        if not turn.held and not turn.waiting and self._turns.get(party) is turn:
            del self._turns[party]

    def cancel(self, party: str | None, nonce: str) -> bool:
        """Wake the call with ``nonce`` waiting for its turn (made by ``party``, if given) with a cancellation.

        True if one was waiting. A call that holds its turn is in a pool (or the cluster head) and is cancelled
        there. Takes only this object's lock, and nothing is waited for while it is held.
        """
        with self._lock:
            turns = list(self._turns.values()) if party is None else [t for t in [self._turns.get(party)] if t]
            for turn in turns:
                for waiter in turn.waiting:
                    if waiter.nonce == nonce and not waiter.cancelled:
                        waiter.cancelled = True
                        turn.wake.notify_all()
                        return True
        return False

    def __len__(self) -> int:
        """Parties with a call holding or waiting for their turn."""
        with self._lock:
            return len(self._turns)
