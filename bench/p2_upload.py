"""P2: upload of a 1 GB float64 DataFrame into a session vs a bare TLS 1.3 socket sending the same bytes.

Both on loopback, same run, medians of R repeats; the two paths alternate (bare, mesatee, bare, ...) so
that load from other jobs on the machine hits both alike. Also reports the kernel's peak memory (PSS of
the supervisor + executor) during one more, untimed upload, as a multiple of the payload, and the CPU seconds
(user + system) each path spent, client and server side together.
A third path, bare TLS into fresh memory for every upload (as a receiver that keeps the data must, and as the
kernel's memfds are), shows what faulting in fresh pages alone costs the baseline (the buffer is mapped after the
connection is accepted, inside the timed window; before session 5 it was allocated between uploads, outside it).
Prints a table and writes bench/results/p2_upload.json. Usage: python bench/p2_upload.py [GB] [REPEATS]
"""

from __future__ import annotations

import json
import mmap
import multiprocessing as mp
import os
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mesatee_notebook as mn
from bench.tls_floor import self_signed_pem
from tests.conftest import start_kernel, stop_kernel

CHUNK = 8 << 20


def _self_signed(path: Path) -> None:
    path.write_bytes(self_signed_pem("bench"))


def _bare_server(pem: str, port_q: mp.Queue, size: int, repeats: int, fresh: bool) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(pem)
    lsock = socket.create_server(("127.0.0.1", 0))
    port_q.put(lsock.getsockname()[1])
    warm = bytearray(0 if fresh else size)
    for _ in range(repeats):
        conn, _ = lsock.accept()
        tls = ctx.wrap_socket(conn, server_side=True)
        # A receiver that keeps what it receives gets fresh memory for every upload (as the kernel's memfds are):
        # private anonymous memory (what malloc gives), mapped once the upload has begun, so that faulting in
        # (zeroing) its pages is inside the timed window.
        buf: Any = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) if fresh else warm
        with memoryview(buf) as view:
            pos = 0
            while pos < size:
                n = tls.recv_into(view[pos:], min(CHUNK, size - pos))
                if n == 0:
                    break
                pos += n
        tls.sendall(b"k")
        tls.close()
        if fresh:
            buf.close()


class BareTLS:
    """A bare TLS 1.3 receiver in its own process; ``send`` times one upload of the payload to it."""

    def __init__(self, pem: Path, size: int, repeats: int, *, fresh: bool = False) -> None:
        spawn = mp.get_context("spawn")
        q: mp.Queue = spawn.Queue()
        self.proc = spawn.Process(target=_bare_server, args=(str(pem), q, size, repeats, fresh))
        self.proc.start()
        self.port = q.get(timeout=60)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3

    def send(self, payload: memoryview) -> tuple[float, float]:
        """Wall seconds and CPU seconds (this process + the receiver) of one upload."""
        sock = self.ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.port)))
        cpu = _cpu([psutil.Process(self.proc.pid)])
        t = time.perf_counter()
        for off in range(0, payload.nbytes, CHUNK):
            sock.sendall(payload[off : off + CHUNK])
        assert sock.recv(1) == b"k"
        wall = time.perf_counter() - t
        sock.close()
        return wall, _cpu([psutil.Process(self.proc.pid)]) - cpu

    def close(self) -> None:
        self.proc.join(60)


def _cpu(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of this process and ``procs`` (threads included)."""
    own = os.times()
    total = own.user + own.system
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class PeakMemory:
    """Samples the PSS of a process tree (supervisor + executors)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def __enter__(self) -> PeakMemory:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def main() -> None:
    gb = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    os.environ.setdefault("MESATEE_HOME", tempfile.mkdtemp())
    cols = 8
    rows = int(gb * (1 << 30) / 8 / cols)
    df = pd.DataFrame(np.random.default_rng(0).random((rows, cols)), columns=[f"c{i}" for i in range(cols)])
    nbytes = int(df.memory_usage(index=False).sum())
    raw = np.ascontiguousarray(df.to_numpy())
    payload = memoryview(raw).cast("B")
    times, peaks, cpus, bare, bare_cpus, fresh, fresh_cpus = [], [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        pem = Path(d) / "c.pem"
        _self_signed(pem)
        server = BareTLS(pem, payload.nbytes, repeats)
        fresh_server = BareTLS(pem, payload.nbytes, repeats, fresh=True)
        k = start_kernel(Path(d) / "k")
        try:
            s = mn.connect(k.url, policy=mn.Policy(platform_roots=[k.fingerprint], measurements=[k.measurement]))
            s.run("1")
            tree = [psutil.Process(k.proc.pid), *psutil.Process(k.proc.pid).children(recursive=True)]
            for _ in range(repeats):
                wall, cpu = server.send(payload)
                bare.append(wall)
                bare_cpus.append(cpu)
                wall, cpu = fresh_server.send(payload)
                fresh.append(wall)
                fresh_cpus.append(cpu)
                cpu = _cpu(tree)
                t = time.perf_counter()
                r = s.run("shape = df.shape\ndel df\nshape", inputs={"df": df})
                times.append(time.perf_counter() - t)
                cpus.append(_cpu(tree) - cpu)
                assert r.value == [rows, cols]
            # The peak memory from one more, untimed upload: the sampler reads every process's smaps (a page-table
            # walk) ten times a second, which cost ~0.3 CPU-s per upload when it ran during the timed ones.
            with PeakMemory(k.proc.pid) as pm:
                assert s.run("shape = df.shape\ndel df\nshape", inputs={"df": df}).value == [rows, cols]
            peaks.append(pm.peak)
            idle = sum(
                p.memory_full_info().pss
                for p in [psutil.Process(k.proc.pid), *psutil.Process(k.proc.pid).children(recursive=True)]
            )
            s.close()
        finally:
            stop_kernel(k)
            server.close()
            fresh_server.close()
    del raw, payload
    mt, bt = statistics.median(times), statistics.median(bare)
    peak = max(peaks)
    ratio = (nbytes / mt) / (nbytes / bt)
    print(f"P2 upload of a {nbytes / 1e9:.2f} GB float64 DataFrame ({rows}x{cols}), median of {repeats}")
    mc, bc = statistics.median(cpus), statistics.median(bare_cpus)
    print(f"{'path':<50} {'median s':>9} {'GB/s':>7} {'CPU s':>7}")
    print(f"{'mesatee Session.run(inputs={df}) end to end':<50} {mt:>9.3f} {nbytes / mt / 1e9:>7.2f} {mc:>7.2f}")
    print(f"{'bare TLS 1.3 socket, same bytes':<50} {bt:>9.3f} {nbytes / bt / 1e9:>7.2f} {bc:>7.2f}")
    ft, fc = statistics.median(fresh), statistics.median(fresh_cpus)
    print(f"{'bare TLS 1.3, into fresh memory per upload':<50} {ft:>9.3f} {nbytes / ft / 1e9:>7.2f} {fc:>7.2f}")
    print(f"ratio to bare TLS into fresh memory: {ft / mt:.2f}x")
    print(f"repeats (s): mesatee {[round(x, 2) for x in times]}  bare {[round(x, 2) for x in bare]}")
    print(f"throughput ratio mesatee/bare: {ratio:.2f}x   target >= 0.7x")
    print(
        f"kernel peak PSS during upload: {peak / 1e9:.2f} GB = {peak / nbytes:.2f}x payload "
        f"(idle after: {idle / 1e9:.2f} GB)   target <= 2.5x"
    )
    out = {
        "benchmark": "P2",
        "payload_bytes": nbytes,
        "repeats": repeats,
        "mesatee_s": times,
        "bare_s": bare,
        "median_mesatee_s": mt,
        "median_bare_s": bt,
        "mesatee_cpu_s": cpus,
        "bare_cpu_s": bare_cpus,
        "median_mesatee_cpu_s": mc,
        "median_bare_cpu_s": bc,
        "throughput_ratio": ratio,
        "bare_fresh_s": fresh,
        "bare_fresh_cpu_s": fresh_cpus,
        "median_bare_fresh_s": ft,
        "median_bare_fresh_cpu_s": fc,
        "throughput_ratio_vs_fresh": ft / mt,
        "peak_pss_bytes": peak,
        "peak_over_payload": peak / nbytes,
    }
    path = Path(__file__).parent / "results" / "p2_upload.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
