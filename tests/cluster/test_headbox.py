"""The cluster head's supervisor never decodes an upload: a sandboxed split worker does (cluster/split.py).

One head (small service-worker memory, so a decompression bomb meets the limit fast) on the session's cluster.
Hostile payloads (truncated Arrow, a pickle posing as Arrow, a pickle, a bomb, a worker that stalls) are a typed
error to their party; nothing is placed, no quota is taken, and the head serves the other parties meanwhile.
"""

from __future__ import annotations

import pickle
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pytest

import mesatee_notebook as mn
from mesatee_notebook.errors import MalformedFrame, NotFound, RemoteTimeout
from mesatee_notebook.wire.codecs import encode_value
from tests.conftest import KernelProc, start_kernel, stop_kernel

from .conftest import Cluster

pytestmark = pytest.mark.slow

SERVICE_MEMORY = "384m"


@pytest.fixture(scope="module")
def head(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProc]:
    data_dir = tmp_path_factory.mktemp("boxhead")
    shutil.copytree(cluster.data_dir / "platform", data_dir / "platform")
    k = start_kernel(data_dir, "--cluster", cluster.url, "--service-memory", SERVICE_MEMORY)
    yield k
    stop_kernel(k)


def frame(n: int, seed: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"k": rng.choice(["a", "b", "c"], n), "x": rng.integers(0, 1000, n), "y": rng.normal(size=n)})


def _raw_upload(s: mn.Session, name: str, kind: str, payload: bytes, timeout: float | None = None) -> Any:
    """``cluster.upload`` with hand-made input bytes, as a hostile client would send them."""
    header = {
        "t": "call",
        "service": "cluster.upload",
        "args": {"name": name, "policy": {}, "replace": False, "partitions": 2},
        "inputs": [{"name": "data", "kind": kind, "meta": {}}],
        "nonce": secrets.token_hex(16),
        "timeout": timeout,
    }
    return s._channel.request(header, [[payload]], digests=True)


def _sealed_used(s: mn.Session) -> int:
    return int(s._channel.request({"t": "whoami"}).header["quota"]["used"]["sealed_bytes"])


def _absent(s: mn.Session, name: str) -> bool:
    try:
        s.call("dataset.info", {"name": name})
    except NotFound:
        return True
    return False


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


def _bomb(decoded: int = 1 << 30) -> bytes:
    """A few KB of zstd-compressed Arrow that decodes to ``decoded`` bytes of zeros."""
    import pyarrow as pa

    batch = pa.record_batch([pa.array(np.zeros(8 << 20, dtype=np.int64))], names=["x"])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        for _ in range(decoded // batch.nbytes):
            w.write_batch(batch)
    return bytes(sink.getvalue().to_pybytes())


def test_partition_split_is_internal_and_refused_from_the_wire(head: KernelProc, tmp_path: Path) -> None:
    with mn.connect(head.url, policy=head.policy(), identity=tmp_path / "owner") as s:
        with pytest.raises(mn.PolicyViolation, match="internal to the kernel"):
            s.call("partition.split", {"partitions": 2, "policy": {}}, {"data": frame(10)})
        with pytest.raises(NotFound) as missing:
            s.call("no.such.service")
        assert "partition.split" not in str(missing.value)  # not even listed among the services a client may call
        assert s.call("cluster.status").info["cluster"]["workers"]  # the kernel serves on


def test_malformed_and_pickled_payloads_are_typed_errors_and_nothing_is_placed(
    head: KernelProc, tmp_path: Path
) -> None:
    good = b"".join(encode_value(frame(500)).parts)
    with mn.connect(head.url, policy=head.policy(), identity=tmp_path / "hostile") as s:
        used = _sealed_used(s)
        with pytest.raises(MalformedFrame, match="not a valid Arrow IPC stream"):
            _raw_upload(s, "trunc", "arrow.frame", good[: len(good) // 2])
        with pytest.raises(MalformedFrame, match="not a valid Arrow IPC stream"):
            _raw_upload(s, "posing", "arrow.frame", pickle.dumps(frame(20)))  # a pickle labelled Arrow: never unpickled
        with pytest.raises(mn.EncodingError, match="needs one pandas DataFrame"):
            _raw_upload(s, "pickled", "pickle", pickle.dumps(frame(20)))  # refused from the header, unread
        assert all(_absent(s, n) for n in ("trunc", "posing", "pickled"))
        assert _sealed_used(s) == used
        ok = _raw_upload(s, "fine", "arrow.frame", good)  # the same party, a well-formed upload: served as before
        assert [p["rows"] for p in ok.header["info"]["partitions"]] == [250, 250]


def test_a_code_cell_reads_a_partitioned_dataset_joined_by_a_split_worker(head: KernelProc, tmp_path: Path) -> None:
    df = frame(700, seed=8)
    with mn.connect(head.url, policy=head.policy(), identity=tmp_path / "owner") as s:
        s.upload(df, "cellread", partitions=3)
        r = s.run("d = mesatee.dataframe('cellread')", outputs=["d"])
    pd.testing.assert_frame_equal(r.outputs["d"], df)  # the rows of the 3 partitions, in order, as uploaded


def test_a_decompression_bomb_kills_only_its_worker_and_the_supervisor_never_decodes_it(
    head: KernelProc, tmp_path: Path
) -> None:
    bomb = _bomb()
    assert len(bomb) < 1 << 20  # a megabyte at most on the wire, a gigabyte once decoded
    with (
        mn.connect(head.url, policy=head.policy(), identity=tmp_path / "hostile") as s,
        mn.connect(head.url, policy=head.policy(), identity=tmp_path / "victim") as v,
    ):
        v.upload(frame(600), "victim_t", partitions=2)
        used = _sealed_used(s)
        peak = _peak_rss(head.proc.pid)
        with pytest.raises(mn.ResourceLimitExceeded) as hit:
            _raw_upload(s, "bomb", "arrow.frame", bomb)
        assert hit.value.details["limit"] == "memory"
        # The supervisor's peak RSS did not grow by the decoded gigabyte: the bytes were only handed on.
        assert _peak_rss(head.proc.pid) - peak < 128 << 20
        assert _absent(s, "bomb") and _sealed_used(s) == used
        got = v.dataframe("victim_t").groupby("k").agg(n=("x", "size")).collect()  # the victim is served
        assert int(got["n"].sum()) == 600
        s.upload(frame(300), "after_bomb", partitions=2)  # a new worker splits the next upload
        assert s.dataframe("after_bomb").x.sum().collect() == frame(300).x.sum()


def _service_trees(pid: int) -> list[psutil.Process]:
    out = []
    for child in psutil.Process(pid).children():
        if child.status() != psutil.STATUS_ZOMBIE and "--service" in " ".join(child.cmdline()):
            out.extend([child, *child.children(recursive=True)])
    return out


def _stop(pid: int) -> list[psutil.Process]:
    stopped = _service_trees(pid)
    assert stopped
    for p in stopped:
        p.send_signal(signal.SIGSTOP)
    return stopped


def _cont(stopped: list[psutil.Process]) -> None:
    for p in stopped:
        if p.is_running():
            p.send_signal(signal.SIGCONT)


def test_a_stalled_split_worker_is_killed_at_the_timeout_while_others_are_served(  # and gathered plans run there
    head: KernelProc, tmp_path: Path
) -> None:
    with (
        mn.connect(head.url, policy=head.policy(), identity=tmp_path / "owner") as s,
        mn.connect(head.url, policy=head.policy(), identity=tmp_path / "other") as o,
    ):
        s.upload(frame(200), "warm", partitions=2)  # a split worker exists
        o.upload(frame(400, seed=9), "other_t", partitions=2)
        counts = o.dataframe("other_t").k.value_counts()  # does not decompose: gathered, evaluated in a split worker
        res = o.call("frame.collect", {"plan": counts.plan_json()})
        assert res.info["cluster"]["evaluation"] == "gathered"
        pd.testing.assert_series_equal(res.values["result"], frame(400, seed=9).k.value_counts(), check_names=False)
        stopped = _stop(head.proc.pid)
        try:  # the gathered plan waits on the stopped split worker, not on the head: it is evaluated there
            with pytest.raises(RemoteTimeout, match="gathered plan"):
                o.call("frame.collect", {"plan": counts.plan_json()}, timeout=2)
        finally:
            _cont(stopped)
        again = o.call("frame.collect", {"plan": counts.plan_json()})  # in a new split worker
        pd.testing.assert_series_equal(again.values["result"], res.values["result"])
        used = _sealed_used(s)
        stopped = _stop(head.proc.pid)
        answered: list[float] = []

        def other() -> None:  # a partitioned group-by runs in the head, needing no service worker
            o.dataframe("other_t").groupby("k").agg(n=("x", "size")).collect()
            answered.append(time.monotonic())

        try:
            t0 = time.monotonic()
            thread = threading.Thread(target=other)
            thread.start()
            with pytest.raises(RemoteTimeout, match="nothing was placed"):
                s.call(
                    "cluster.upload",
                    {"name": "stall", "policy": {}, "replace": False, "partitions": 2},
                    {"data": frame(300)},
                    timeout=2,
                )
            failed = time.monotonic()
            thread.join(60)
        finally:
            _cont(stopped)
        assert answered and answered[0] < failed  # the other party was answered during the stall
        assert failed - t0 < 60
        assert _absent(s, "stall") and _sealed_used(s) == used
        s.upload(frame(300), "stall", partitions=2)  # the killed worker is replaced
        assert s.dataframe("stall").x.sum().collect() == frame(300).x.sum()


def test_a_finished_tasks_large_result_gets_the_rest_of_the_deadline() -> None:
    """Regression: a done task's result was fetched with a 1 s timeout, so a gathered 20 MB partition failed."""
    from mesatee_notebook.enclave.cluster.partitions import _result

    class SlowToFetch:  # done on its worker, but its bytes take longer than a second to come over
        def done(self) -> bool:
            return True

        def result(self, timeout: float) -> bytes:
            if timeout < 5:
                raise TimeoutError
            return b"partition"

        def cancel(self) -> None: ...

        def release(self) -> None: ...

    assert _result([SlowToFetch()], "gathering dataset 'x'", timeout=30) == [b"partition"]
