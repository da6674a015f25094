"""Red team, session 7: the chunked result stream against the other tenants, on a real kernel over TLS.

A result of at least 32 MiB goes to the client in chunks: the service worker sends each chunk to the supervisor,
which writes it to the client's socket before it reads the next (``enclave/result_stream.ChunkRelay``). After the
handshake the client's socket has no send timeout, so a client that asks for such a result and stops reading holds
its service worker for as long as it keeps the connection open: the supervisor's write blocks, then the worker's.
One party holds at most one worker (the pool runs one call per party), but two identities hold a pool of two, and
every other party's service calls wait behind them without end. In the rows helper's area (the supervisor's relay
of result chunks): a strict xfail until a stalled client is cut off (a send deadline per chunk, or a relay that
does not hold the worker).
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

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProc]:
    k = start_kernel(tmp_path_factory.mktemp("rt_stream"), "--service-workers", "2")
    yield k
    stop_kernel(k)


@pytest.mark.xfail(
    strict=True,
    reason="rows' area (supervisor relay of result chunks): a client that stops reading a chunked result holds its "
    "service worker with no deadline; two identities stall the general pool for every party",
)
def test_clients_that_stop_reading_chunked_results_do_not_stall_other_parties(
    two_workers: KernelProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = two_workers
    policy = cast("mn.Policy", k.policy())
    stall = threading.Event()
    real = frames_result.ResultChunks.hasher_for

    def stop_reading(self: Any, header: dict[str, Any]) -> Any:
        if header.get("t") == "result.chunk":
            stall.wait(60)  # this client's reader stops here: nothing more is read from its socket
        return real(self, header)

    monkeypatch.setattr(frames_result.ResultChunks, "hasher_for", stop_reading)
    hostile = [mn.connect(k.url, policy=policy, identity=tmp_path / f"sybil{i}") for i in range(2)]
    threads = []
    try:
        big = pd.DataFrame({"x": np.arange(6_000_000, dtype=np.float64)})  # 48 MB of Arrow: chunked
        for i, s in enumerate(hostile):
            s.upload(big, f"rt_stream_{i}", replace=True)
        for i, s in enumerate(hostile):
            sdf = s.dataframe(f"rt_stream_{i}")
            t = threading.Thread(target=lambda f=sdf: _swallow(f.collect), daemon=True)  # its own rows, streamed
            t.start()
            threads.append(t)
        time.sleep(3)  # both results are streaming, and both readers stopped
        done = threading.Event()
        victim = mn.connect(k.url, policy=policy, identity=tmp_path / "victim")
        threads.append(threading.Thread(target=lambda: (_swallow(lambda: victim.call("dataset.list")), done.set())))
        threads[-1].start()
        served = done.wait(8)
        stall.set()  # let the stalled readers go (and with them the victim's call), then close everything
        threads[-1].join(60)
        victim.close()
        assert served, "another party's service call waited behind the stalled streams"
    finally:
        stall.set()
        for t in threads:
            t.join(60)
        for s in hostile:
            s.close()


def _swallow(fn: Any) -> None:
    try:
        fn()
    except mn.MesateeError:
        pass
