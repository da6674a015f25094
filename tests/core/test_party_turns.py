"""``PartyTurns.cancel``: a call waiting for its party's turn is woken with RemoteInterrupted, by its nonce.

In-process and deterministic (the kernel-level test is ``tests/security/test_gaps.py``).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from mesatee_notebook.enclave.party_turns import PartyTurns
from mesatee_notebook.errors import RemoteInterrupted


def _waiting(turns: PartyTurns, party: str, nonce: str, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        try:
            with turns.turn(party, nonce, "frame.collect"):
                out[nonce] = "ran"
        except RemoteInterrupted as exc:
            out[nonce] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _until(cond: Any) -> None:
    done = threading.Event()
    for _ in range(500):
        if cond():
            return
        done.wait(0.01)
    pytest.fail("the condition never held")


def test_a_waiting_call_is_cancelled_by_its_nonce_and_party_only_and_the_rest_keep_their_order() -> None:
    turns = PartyTurns()
    out: dict[str, Any] = {}
    release = threading.Event()
    holding = threading.Event()

    def hold() -> None:
        with turns.turn("a", "n-first"):
            holding.set()
            release.wait(10)

    t0 = threading.Thread(target=hold, daemon=True)
    t0.start()
    assert holding.wait(5)
    t1 = _waiting(turns, "a", "n-second", out)
    _until(lambda: len(turns._turns["a"].waiting) == 1)
    t2 = _waiting(turns, "a", "n-third", out)
    _until(lambda: len(turns._turns["a"].waiting) == 2)
    assert not turns.cancel("b", "n-second")  # not b's call
    assert not turns.cancel("a", "n-first")  # it holds the turn: a pool cancels it, not the turn
    assert turns.cancel("a", "n-second")
    t1.join(5)
    assert isinstance(out["n-second"], RemoteInterrupted) and "waited for its turn" in str(out["n-second"])
    assert "n-third" not in out and t0.is_alive()  # woken at once, while the first still holds the turn
    assert not turns.cancel("a", "n-second")  # once only
    release.set()
    t0.join(5)
    t2.join(5)
    assert out["n-third"] == "ran"
    assert len(turns) == 0  # nothing kept once no call holds or waits


def test_a_canceller_without_a_proven_party_needs_the_nonce() -> None:
    turns = PartyTurns()
    out: dict[str, Any] = {}
    with turns.turn("a", "n-holder"):
        t = _waiting(turns, "a", "n-waiter", out)
        _until(lambda: len(turns._turns["a"].waiting) == 1)
        assert not turns.cancel(None, "n-unknown")
        assert turns.cancel(None, "n-waiter")
        t.join(5)
    assert isinstance(out["n-waiter"], RemoteInterrupted)
    assert len(turns) == 0
