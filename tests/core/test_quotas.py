"""Quotas per party and for anonymous clients: sessions, executors, concurrent calls, sealed bytes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import mesatee_notebook as mn
from mesatee_notebook.errors import QuotaExceeded
from mesatee_notebook.remote.session import Session
from tests.conftest import KernelProc, start_kernel, stop_kernel
from tests.waiting import PATIENCE, cell_waits_for

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProc]:
    shared = tmp_path_factory.mktemp("quota_untrusted")
    shared.chmod(0o1777)  # a root kernel's sandboxes run as other uids
    k = start_kernel(
        tmp_path_factory.mktemp("quota"),
        "--untrusted-dir",
        str(shared),
        "--party-sessions",
        "3",
        "--party-executors",
        "4",
        "--party-concurrent-calls",
        "1",
        "--party-sealed-bytes",
        "1M",
        "--anonymous-sessions",
        "2",
    )
    k.untrusted_dir = shared
    yield k
    stop_kernel(k)


def close_only(s: Session) -> None:
    """Close one session but keep the shared connection."""
    s._channel.request({"t": "session.close", "session": s.id, "token": s._token})


def executors(kernel: KernelProc) -> int:
    return len(psutil.Process(kernel.proc.pid).children())


def settled_executors(kernel: KernelProc, *, quiet_s: float = 1.5, limit_s: float = 30.0) -> int:
    """The kernel's child count once it has not changed for ``quiet_s`` (spares refill in the background)."""
    deadline = time.monotonic() + limit_s
    last, since = executors(kernel), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = executors(kernel)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


@pytest.mark.slow
def test_session_flood_from_one_party_is_refused(tight: KernelProc) -> None:
    first = mn.connect(tight.url, policy=tight.policy())
    extra: list[Session] = []
    try:
        extra = [Session(first._channel, name=f"s{i}", party_id=first.party_id) for i in range(2)]
        before = settled_executors(tight)
        with pytest.raises(QuotaExceeded) as info:
            for i in range(20):
                extra.append(Session(first._channel, name=f"flood{i}", party_id=first.party_id))
        err = info.value
        assert err.details["limit"] == "sessions" and err.details["value"] == 3
        assert "--party-sessions" in str(err)
        assert executors(tight) <= before + 1  # no executor per refused session (one spare may refill)
        report = first.quotas()
        assert report["holder"] == "party"
        assert report["limits"]["sessions"] == 3 and report["used"]["sessions"] == 3
        close_only(extra.pop())
        extra.append(Session(first._channel, name="again", party_id=first.party_id))  # room again after a close
    finally:
        first.close()  # closes its connection, and with it every session opened on it
    again = mn.connect(tight.url, policy=tight.policy())
    try:
        deadline = time.monotonic() + 15
        while again.quotas()["used"]["sessions"] > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert again.quotas()["used"]["sessions"] == 1  # closing the connection gave its sessions back
    finally:
        again.close()


@pytest.mark.slow
def test_anonymous_clients_share_one_quota_and_parties_keep_theirs(tight: KernelProc) -> None:
    anons = []
    try:
        for _ in range(2):
            anons.append(mn.connect(tight.url, policy=tight.policy(), identity=False))
        with pytest.raises(QuotaExceeded) as info:
            mn.connect(tight.url, policy=tight.policy(), identity=False)
        assert info.value.details["holder"] == "anonymous"
        assert "--anonymous-sessions" in str(info.value) and "party identity" in str(info.value)
        assert anons[0].quotas()["holder"] == "anonymous"
        party = mn.connect(tight.url, policy=tight.policy())
        try:
            assert party.run("1 + 1").value == 2
        finally:
            party.close()
    finally:
        for s in anons:
            s.close()


@pytest.mark.slow
def test_concurrent_calls_per_party(tight: KernelProc, tmp_path: Path) -> None:
    """a's cell runs until b has been refused: no time window (it slept 3 s and ran serial; a late a failed it)."""
    a = mn.connect(tight.url, policy=tight.policy())
    b = mn.connect(tight.url, policy=tight.policy())
    assert tight.untrusted_dir is not None
    refused = tight.untrusted_dir / f"refused-{tmp_path.name}"
    try:
        running = threading.Event()
        out: dict[str, object] = {}

        def slow() -> None:
            cell = "print('running', flush=True)\n" + cell_waits_for(refused, "b's call to be refused") + "'slept'"
            out["v"] = a.run(cell, stream=lambda n, t: running.set()).value

        t = threading.Thread(target=slow)
        t.start()
        assert running.wait(PATIENCE), "a's cell never started"
        try:
            with pytest.raises(QuotaExceeded) as info:
                b.run("1")
        finally:
            refused.write_text("done")  # a's cell may finish now
        assert info.value.details["limit"] == "concurrent_calls"
        assert "--party-concurrent-calls" in str(info.value)
        t.join(PATIENCE)
        assert out["v"] == "slept"
        assert b.run("2").value == 2
    finally:
        a.close()
        b.close()


def test_sealed_bytes_per_party(tight: KernelProc) -> None:
    s = mn.connect(tight.url, policy=tight.policy())
    try:
        s.run("with mesatee.open('small', 'wb') as f: f.write(b'x' * 300_000)")
        assert s.quotas()["used"]["sealed_bytes"] == 300_000
        s.run("with mesatee.open('small', 'wb') as f: f.write(b'x' * 900_000)")  # a rewrite replaces, not adds
        assert s.quotas()["used"]["sealed_bytes"] == 900_000
        with pytest.raises(mn.MesateeError) as info:
            s.run("with mesatee.open('big', 'wb') as f: f.write(b'x' * 500_000)")
        assert "QuotaExceeded" in str(info.value) or isinstance(info.value, QuotaExceeded)
        assert "--party-sealed-bytes" in str(info.value) or "--party-sealed-bytes" in getattr(
            info.value, "remote_traceback", ""
        )
        assert s.quotas()["used"]["sealed_bytes"] == 900_000
        assert s.run("len(mesatee.open('small', 'rb').read())").value == 900_000
    finally:
        s.close()
