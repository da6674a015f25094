"""The kernel's connection slots: who may hold one, and who gives one up when they run out.

The kernel serves at most ``max_connections`` connections. One pool for everyone let a peer with nothing to prove
lock every party out: 256 TCP connections that never start TLS each hold a slot for the handshake timeout, and are
opened again as soon as they are closed (tests/security/test_redteam_connections.py). So slots are not first come,
first served:

- a connection that has not said ``hello`` yet (TCP only, TLS in progress, or TLS up and silent) is *pending*; at
  most ``max_pending`` are, and a new connection beyond that closes the oldest pending one (a client that means to
  talk finishes its handshake and hello in milliseconds);
- when every slot is taken, a new connection closes the oldest pending connection, else the oldest anonymous one
  (no proven party) that has no session open, and takes its slot; if there is none, the newcomer is refused;
- a proven party holds at most ``max_per_party`` connections: its next one is refused after hello (its own others
  stay).

So a flood of silent or anonymous connections costs other parties nothing but a reconnect of a half-open socket,
and no connection of a proven party is ever closed to make room, busy or idle. What is left is a Sybil of proven
identities: a key pair is free to make, and a proven connection holds its slot with no session open, so each slot
costs the attacker a TLS handshake, a hello and a signature (no executor); ``max_connections`` such connections
lock newcomers out until they close (red team, session 7: ``tests/core/test_conn_slots.py``). The kernel has no
registry of parties to tell a Sybil from a new party; a deployment that has one should admit only its keys -
docs/architecture.md, "Limits before trust, quotas".
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

__all__ = ["ConnectionSlots", "SlotPeer"]

log = logging.getLogger("mesatee.kernel")


class SlotPeer(Protocol):
    """What the slot table reads of a served connection (enclave/connection.py's Connection)."""

    hello_done: bool
    party: str | None

    @property
    def sessions(self) -> Mapping[str, object]: ...


@dataclass
class _Slot:
    sock: socket.socket  # whichever object owns the file descriptor now (the raw socket, then the TLS one)
    peer: str
    since: float = field(default_factory=time.monotonic)
    conn: SlotPeer | None = None

    def pending(self) -> bool:
        return self.conn is None or not self.conn.hello_done

    def idle_anonymous(self) -> bool:
        return self.conn is not None and self.conn.hello_done and self.conn.party is None and not self.conn.sessions


class ConnectionSlots:
    """Thread-safe table of the connections a kernel serves (see the module docstring for the rules)."""

    def __init__(self, max_connections: int, max_pending: int, max_per_party: int) -> None:
        self.max_connections = max_connections
        self.max_pending = max(1, min(max_pending, max_connections))
        self.max_per_party = max_per_party
        self._slots: dict[int, _Slot] = {}  # insertion order = age
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def admit(self, sock: socket.socket, peer: str) -> int | None:
        """A slot for a new TCP connection (its token), evicting as the rules say; None: refused."""
        with self._lock:
            pending = [t for t, s in self._slots.items() if s.pending()]
            if len(pending) >= self.max_pending:
                self._evict(pending.pop(0), "too many connections still in their handshake")
            if len(self._slots) >= self.max_connections:
                victim = next(self._candidates(), None)
                if victim is None:
                    return None
                self._evict(victim, "every slot was taken")
            token = next(self._ids)
            self._slots[token] = _Slot(sock, peer)
            return token

    def _candidates(self) -> Iterator[int]:
        yield from (t for t, s in self._slots.items() if s.pending())
        yield from (t for t, s in self._slots.items() if s.idle_anonymous())

    def _evict(self, token: int, why: str) -> None:
        slot = self._slots.pop(token)
        log.warning("closing %s to free a connection slot: %s", slot.peer, why)
        try:
            slot.sock.shutdown(socket.SHUT_RDWR)  # its thread sees EOF or a failed handshake and ends
        except OSError:
            pass

    def handed_over(self, token: int, sock: socket.socket) -> bool:
        """The TLS socket now owns the connection's descriptor; False: the slot was given up meanwhile."""
        with self._lock:
            slot = self._slots.get(token)
            if slot is None:
                return False
            slot.sock = sock
            return True

    def attach(self, token: int, conn: SlotPeer) -> None:
        """The served connection, whose stage (pending, anonymous, party) the eviction rules read."""
        with self._lock:
            slot = self._slots.get(token)
            if slot is not None:
                slot.conn = conn

    def party_full(self, conn: SlotPeer) -> bool:
        """True when ``conn``'s party already holds ``max_per_party`` other connections."""
        if conn.party is None:
            return False
        with self._lock:
            mine = sum(1 for s in self._slots.values() if s.conn is not None and s.conn.party == conn.party)
        return mine > self.max_per_party

    def release(self, token: int) -> None:
        with self._lock:
            self._slots.pop(token, None)
