"""Gaps session 7's red team left between tenants, each closed in session 8 and checked on a real kernel over TLS.

- A second ``frame.collect`` of a party waits for that party's turn (``enclave/party_turns.py``) before it reaches
  any pool, so a cancel (``Session.cancel_calls``, Ctrl-C) found nothing and the call ran anyway once the first was
  done. Now the turn knows the waiting nonce and a cancel wakes it with ``RemoteInterrupted``.
- A service worker's restart after a crash or a cancel was audited as ``recovery`` for every party, which told a
  party that another party's call had crashed or been cancelled. Now it is visible to the party whose call ran
  last on that worker (and the operator, who reads the whole signed log) only, and the log still verifies.
- A worker's decoded datasets were cached by name for every party it serves: whether a large dataset was warm told
  a party that someone had used it. Now they are cached per (party, dataset) under one byte bound; the rule is
  checked in ``test_gaps_caches.py`` (sealed reads counted, no timing), and here that both parties' frames answer.

The first collect holds its turn deterministically: its client stops reading its chunked result (as in
``test_redteam_stream.py``), with a result-send deadline far beyond the test, and reads on when the test says so.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest

import mesatee_notebook as mn
from mesatee_notebook.errors import RemoteInterrupted
from mesatee_notebook.remote import frames_result
from tests.conftest import KernelProc, start_kernel, stop_kernel

BIG_ROWS = 4_500_000  # 36 MB of float64: a result over 32 MiB goes to the client in chunks


@pytest.fixture(scope="module")
def gaps_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProc]:
    k = start_kernel(tmp_path_factory.mktemp("gaps"), "--service-workers", "2", "--result-send-timeout", "120")
    yield k
    stop_kernel(k)


@pytest.fixture(scope="module")
def parties(gaps_kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Party A on two connections (one identity), party B on one; A owns gap_big and gap_a, B owns gap_b."""
    ids = tmp_path_factory.mktemp("gaps-ids")
    policy = cast("mn.Policy", gaps_kernel.policy())
    s = {
        "a1": mn.connect(gaps_kernel.url, policy=policy, identity=ids / "a"),
        "a2": mn.connect(gaps_kernel.url, policy=policy, identity=ids / "a"),
        "b": mn.connect(gaps_kernel.url, policy=policy, identity=ids / "b"),
    }
    assert s["a1"].party_id == s["a2"].party_id != s["b"].party_id
    s["a1"].upload(pd.DataFrame({"x": np.arange(BIG_ROWS, dtype=np.float64)}), "gap_big")
    s["a1"].upload(pd.DataFrame({"x": np.arange(100, dtype=np.float64)}), "gap_a")
    s["b"].upload(pd.DataFrame({"x": np.arange(50, dtype=np.float64)}), "gap_b")
    yield s
    for session in s.values():
        session.close()


def _wait_until(cond: Callable[[], object], seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {seconds:g} s waiting for {what}")
        time.sleep(0.05)


def _outcome(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except mn.MesateeError as exc:
        return exc


def _in_thread(fn: Callable[[], Any], out: list[Any]) -> threading.Thread:
    t = threading.Thread(target=lambda: out.append(_outcome(fn)), daemon=True)
    t.start()
    return t


def test_a_call_waiting_for_its_partys_turn_is_cancelled_at_once(
    parties: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    a1, a2, b = parties["a1"], parties["a2"], parties["b"]
    stall, stalled = threading.Event(), threading.Event()
    real = frames_result.ResultChunks.hasher_for

    def stop_reading(self: Any, header: dict[str, Any]) -> Any:
        if header.get("t") == "result.chunk" and not stall.is_set():
            stalled.set()
            stall.wait(90)  # A's first client stops reading here: its collect holds A's turn meanwhile
        return real(self, header)

    monkeypatch.setattr(frames_result.ResultChunks, "hasher_for", stop_reading)
    first: list[Any] = []
    second: list[Any] = []
    # built before: opening a SecureDataFrame is a service call, which waits in the pool behind A's running one
    big, small, bs = a1.dataframe("gap_big"), a2.dataframe("gap_a").x.sum(), b.dataframe("gap_b").x.sum()
    t1 = _in_thread(big.collect, first)
    try:
        assert stalled.wait(60), "A's first collect never started streaming"
        t2 = _in_thread(small.collect, second)
        # the kernel finds A's second call (its nonce) while it waits for A's turn: 0 until its request is there
        _wait_until(lambda: a2.cancel_calls() == 1 or not t2.is_alive(), 30, "the cancel to find A's waiting call")
        t2.join(15)
        assert not t2.is_alive() and t1.is_alive()  # it failed at once: A's first call still holds the turn
        assert isinstance(second[0], RemoteInterrupted), second
        assert "waited for its turn" in str(second[0])
        # another party never waits for A's turn (A's first call still holds it)
        assert bs.collect() == sum(range(50))
        assert t1.is_alive()
    finally:
        stall.set()
        t1.join(60)
    assert isinstance(first[0], pd.DataFrame) and len(first[0]) == BIG_ROWS, first  # the first completes whole
    assert small.collect() == sum(range(100))  # and A's turn is free again


@pytest.mark.slow  # starts xgboost in a worker and stops it: about 7-10 s on 2 loaded cores
def test_a_workers_recovery_is_audited_for_its_party_only_and_the_log_verifies(
    gaps_kernel: KernelProc, parties: dict[str, Any]
) -> None:
    from mesatee_notebook.attestation.audit_verify import verify_audit_log
    from mesatee_notebook.enclave.platform import load_platform

    a1, b = parties["a1"], parties["b"]
    rng = np.random.default_rng(0)
    train = pd.DataFrame(rng.normal(size=(500, 4)), columns=["f0", "f1", "f2", "f3"])
    train["y"] = rng.normal(size=500)
    running = threading.Event()
    out: list[Any] = []
    args = {"data": {"input": "train"}, "label": "y", "num_boost_round": 1_000_000, "params": {"max_depth": 2}}
    t = _in_thread(lambda: a1.call("gbdt.train", args, {"train": train}, progress=lambda e: running.set()), out)
    assert running.wait(60), "A's training reported no progress"
    assert a1.cancel_calls() == 1  # A's worker is stopped
    t.join(30)
    assert isinstance(out[0], RemoteInterrupted), out
    assert a1.call("dataset.info", {"name": "gap_a"}).info["rows"] == 100  # on A's worker, started again
    assert b.call("dataset.info", {"name": "gap_b"}).info["rows"] == 50

    mine = [e for e in a1.audit() if e["kind"] == "recovery"]  # verified by the client (signatures, partial chain)
    assert any(e["details"].get("service") == "gbdt.train" and e["details"].get("cancelled") for e in mine), mine
    assert not [e for e in b.audit() if e["kind"] == "recovery"]  # B learns nothing of A's cancelled call
    # the operator's whole log: every entry, the restart among them, verifies as one chain
    log = gaps_kernel.data_dir / "audit.log"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    verify_audit_log(entries, load_platform(gaps_kernel.data_dir).key.public_key())
    restarts = [e for e in entries if e["kind"] == "recovery" and e["details"].get("service") == "gbdt.train"]
    assert restarts and all(e["concerns"] == [a1.party_id] and e["party"] is None for e in restarts)


def test_parties_reading_one_dataset_each_get_its_current_data(parties: dict[str, Any]) -> None:
    """The worker's dataset cache is per (party, dataset) (``enclave/dataset_cache.py``; the rule itself, reads and
    the byte bound: ``test_gaps_caches.py``): both parties' frames of one dataset answer, and both follow a replace."""
    a1, b = parties["a1"], parties["b"]
    policy = mn.DataPolicy(min_group_size=10)
    a1.upload(pd.DataFrame({"x": np.arange(1000, dtype=np.float64)}), "gap_shared", policy=policy)
    for _ in range(2):  # cold, then each party's own warm frame
        assert a1.dataframe("gap_shared").x.sum().collect() == sum(range(1000))
        assert b.dataframe("gap_shared").x.sum().collect() == sum(range(1000))
    a1.upload(pd.DataFrame({"x": np.ones(500)}), "gap_shared", policy=policy, replace=True)
    assert b.dataframe("gap_shared").x.sum().collect() == 500
    assert a1.dataframe("gap_shared").x.sum().collect() == 500
