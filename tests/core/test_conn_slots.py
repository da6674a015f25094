"""The connection slot table's rules (enclave/conn_slots.py), with stand-in connections."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from mesatee_notebook.enclave.conn_slots import ConnectionSlots


@dataclass
class Peer:
    hello_done: bool = False
    party: str | None = None
    sessions: dict[str, object] = field(default_factory=dict)


_OPEN: list[socket.socket] = []


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    _OPEN.extend((a, b))
    return a, b


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def _closed_by_kernel(far: socket.socket) -> bool:
    far.settimeout(1)
    return far.recv(1) == b""


def test_pending_connections_beyond_the_cap_evict_the_oldest() -> None:
    slots = ConnectionSlots(max_connections=10, max_pending=3, max_per_party=5)
    pairs = [_pair() for _ in range(4)]
    tokens = [slots.admit(near, f"p{i}") for i, (near, _) in enumerate(pairs)]
    assert None not in tokens
    assert len(slots) == 3  # the first one gave up its slot
    assert _closed_by_kernel(pairs[0][1])


def test_a_full_table_evicts_pending_then_idle_anonymous_never_parties_at_work() -> None:
    slots = ConnectionSlots(max_connections=3, max_pending=3, max_per_party=5)
    pairs = [_pair() for _ in range(6)]
    party, anon_busy, anon_idle = Peer(True, "p1"), Peer(True, None, {"s": object()}), Peer(True, None)
    for i, peer in enumerate((party, anon_busy, anon_idle)):
        t = slots.admit(pairs[i][0], f"c{i}")
        assert t is not None
        slots.attach(t, peer)
    assert slots.admit(pairs[3][0], "new") is not None  # takes the idle anonymous connection's slot
    assert _closed_by_kernel(pairs[2][1])
    # now: the party, the busy anonymous one, and the new pending one; a fifth evicts the pending one
    assert slots.admit(pairs[4][0], "newer") is not None
    assert _closed_by_kernel(pairs[3][1])
    t = slots.admit(pairs[5][0], "newest")  # evicts "newer" (pending); the party and the busy session stay
    assert t is not None
    assert _closed_by_kernel(pairs[4][1])
    slots.attach(t, Peer(True, "p2", {"s": object()}))
    assert slots.admit(_pair()[0], "refused") is None  # only parties at work left: the newcomer is refused


def test_a_party_holds_at_most_its_share() -> None:
    slots = ConnectionSlots(max_connections=10, max_pending=10, max_per_party=2)
    peers = [Peer(True, "p") for _ in range(3)]
    for i, peer in enumerate(peers):
        t = slots.admit(_pair()[0], f"c{i}")
        assert t is not None
        slots.attach(t, peer)
    assert not slots.party_full(Peer(True, None))
    assert slots.party_full(peers[2])  # its third connection
    slots.release(1)
    assert not slots.party_full(peers[2])


def test_handed_over_reports_a_slot_given_up_meanwhile() -> None:
    slots = ConnectionSlots(max_connections=1, max_pending=1, max_per_party=1)
    a, _ = _pair()
    t = slots.admit(a, "old")
    assert t is not None
    c, _ = _pair()
    assert slots.admit(c, "new") is not None
    assert not slots.handed_over(t, a)


def test_a_proven_partys_connection_is_never_evicted_and_a_sybil_needs_no_session() -> None:
    """Red team, session 7: what holds, and the limit the docs state (conn_slots.py's docstring).

    A full table of proven connections, idle ones included, is never broken up for a newcomer: a party cannot evict
    another party's proven connection. The other side of it: identities with no session open hold every slot too.
    """
    slots = ConnectionSlots(max_connections=4, max_pending=2, max_per_party=1)
    pairs = [_pair() for _ in range(4)]
    victim = Peer(True, "victim")  # idle: no session open
    for i, peer in enumerate((victim, Peer(True, "sybil-1"), Peer(True, "sybil-2"), Peer(True, "sybil-3"))):
        t = slots.admit(pairs[i][0], f"c{i}")
        assert t is not None
        slots.attach(t, peer)
    for _ in range(3):  # newcomers: refused, whoever they will turn out to be
        assert slots.admit(_pair()[0], "newcomer") is None
    assert len(slots) == 4
    for _, far in pairs:  # the idle victim (and everyone else) kept its connection: nothing was shut down
        far.settimeout(0.2)
        with pytest.raises(TimeoutError):
            far.recv(1)
