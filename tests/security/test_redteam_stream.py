"""Red team, session 7: the chunked result stream against the other tenants, on a real kernel over TLS.

A result of at least 32 MiB goes to the client in chunks: the service worker sends each chunk to the supervisor,
which writes it to the client's socket before it reads the next (``enclave/result_stream.ChunkRelay``). A client
that asks for such a result and stops reading held its service worker until the connection's idle timeout (300 s):
the supervisor's write blocked, then the worker's. One party holds at most one worker (the pool runs one call per
party), but two identities held a pool of two, and every other party's service calls waited behind them. Now a
client that takes longer than ``serve --result-send-timeout`` (default 30 s; 2 s here) to read one chunk is cut off
(``result_stream.deadline_sender``), the worker's remaining chunks are drained, and the pool serves the others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest

import mesatee_notebook as mn
from mesatee_notebook.remote import frames_result
from tests.conftest import KernelProc, start_kernel, stop_kernel
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProc]:
    k = start_kernel(tmp_path_factory.mktemp("rt_stream"), "--service-workers", "2", "--result-send-timeout", "2")
    yield k
    stop_kernel(k)


def test_clients_that_stop_reading_chunked_results_do_not_stall_other_parties(
    two_workers: KernelProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = two_workers
    policy = cast("mn.Policy", k.policy())
    stall = threading.Event()
    lock = threading.Lock()
    stalled_at: list[float] = []  # when each hostile reader stopped reading
    real = frames_result.ResultChunks.hasher_for

    def stop_reading(self: Any, header: dict[str, Any]) -> Any:
        if header.get("t") == "result.chunk" and not stall.is_set():
            with lock:
                stalled_at.append(time.monotonic())
            stall.wait(90)  # this client's reader stops here: nothing more is read from its socket
        return real(self, header)

    monkeypatch.setattr(frames_result.ResultChunks, "hasher_for", stop_reading)
    hostile = [mn.connect(k.url, policy=policy, identity=tmp_path / f"sybil{i}") for i in range(2)]
    threads = []
    outcomes: list[object] = []  # what each hostile collect() ended with
    try:
        big = pd.DataFrame({"x": np.arange(6_000_000, dtype=np.float64)})  # 48 MB of Arrow: chunked
        for i, s in enumerate(hostile):
            s.upload(big, f"rt_stream_{i}", replace=True)
        for i, s in enumerate(hostile):
            sdf = s.dataframe(f"rt_stream_{i}")
            t = threading.Thread(target=lambda f=sdf: outcomes.append(_outcome(f.collect)), daemon=True)  # streamed
            t.start()
            threads.append(t)
        # both results are streaming and both readers stopped (on a loaded machine the second may start late)
        wait_until(lambda: len(stalled_at) == 2, "both hostile results to start streaming")
        done, listed = threading.Event(), []
        victim = mn.connect(k.url, policy=policy, identity=tmp_path / "victim")
        threads.append(
            threading.Thread(target=lambda: (listed.append(_outcome(lambda: victim.call("dataset.list"))), done.set()))
        )
        threads[-1].start()
        # 2 s to cut each stalled reader off, the rest is the victim's own call; generous for a loaded machine, and
        # still well inside the readers' 90 s stall, so a victim stuck behind them is never counted as served
        served = done.wait(30)
        # keep both readers stopped well past the 2 s deadline, so each is cut off, whatever the victim's timing
        wait_until(lambda: time.monotonic() - max(stalled_at) > 8, "the stalled readers' deadline", timeout=20)
        stall.set()  # let the stalled readers go (and with them the victim's call), then close everything
        threads[-1].join(60)
        victim.close()
        assert served, "another party's service call waited behind the stalled streams"
        assert not isinstance(listed[0], BaseException), listed[0]
    finally:
        stall.set()
        for t in threads:
            t.join(60)
        for s in hostile:
            s.close()
    # each stalled reader was cut off: a typed error once it read again, not a hang or a half result
    assert len(outcomes) == 2 and all(isinstance(o, mn.MesateeError) for o in outcomes), outcomes


def _outcome(fn: Any) -> object:
    try:
        return fn()
    except mn.MesateeError as exc:
        return exc
