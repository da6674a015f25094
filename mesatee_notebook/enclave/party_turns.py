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
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Final

__all__ = ["GUARDED_SERVICES", "PartyTurns"]

#: The services that check, then record, a release in a party's differencing history.
GUARDED_SERVICES: Final = frozenset({"frame.collect"})


class PartyTurns:
    """A lock per party, made when a party first waits and dropped when no call of it holds or waits for it.

    Entries live only while used, so a party with many identities (a Sybil) adds one small entry per call in flight,
    which the connection and call quotas already bound.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turns: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def turn(self, party: str) -> Iterator[None]:
        """Hold ``party``'s turn for the block (waits for its call in progress, if any)."""
        with self._lock:
            lock, users = self._turns.get(party, (threading.Lock(), 0))
            self._turns[party] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._turns[party]
                if users == 1:
                    del self._turns[party]
                else:
                    self._turns[party] = (lock, users - 1)

    def __len__(self) -> int:
        """Parties with a call holding or waiting for their turn."""
        with self._lock:
            return len(self._turns)
