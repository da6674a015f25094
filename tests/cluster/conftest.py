"""A real attested cluster on loopback: `mesatee-enclave scheduler` and `worker` processes, always killed."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.waiting import PATIENCE, wait_until

if TYPE_CHECKING:
    from mesatee_notebook.enclave.cluster.node_identity import ClusterNode

pytest.importorskip("distributed")

_SERVING = re.compile(r"serving on (atls://\S+)")


@dataclass
class NodeProc:
    role: str
    proc: subprocess.Popen[bytes]
    log: Path
    address: str = ""

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    data_dir: Path
    fingerprint: str
    scheduler: NodeProc
    workers: list[NodeProc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.scheduler.address


def enclave(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesatee_notebook.cli", "enclave", *args]


def init_platform(data_dir: Path) -> str:
    data_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(enclave("init-platform", "--data-dir", str(data_dir)), check=True, capture_output=True)
    return (data_dir / "platform" / "fingerprint").read_text().strip()


def spawn_node(role: str, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> NodeProc:
    """Start a node process (see :func:`wait_serving`)."""
    log = data_dir / f"{role}-{time.monotonic_ns()}.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            enclave(role, "--data-dir", str(data_dir), "-v", *extra),
            stdout=fh,
            stderr=fh,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    return NodeProc(role, proc, log)


def wait_serving(node: NodeProc, timeout: float = 120) -> NodeProc:
    """Wait until the node prints its atls:// address; raise with its log if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _SERVING.search(node.text())
        if m:
            node.address = m.group(1)
            return node
        if node.proc.poll() is not None:
            raise RuntimeError(f"{node.role} exited ({node.proc.returncode}):\n{node.text()[-3000:]}")
        time.sleep(0.1)
    stop_node(node)
    raise RuntimeError(f"{node.role} did not start:\n{node.text()[-3000:]}")


def start_node(role: str, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> NodeProc:
    return wait_serving(spawn_node(role, data_dir, *extra, env=env))


def stop_node(node: NodeProc) -> None:
    if node.proc.poll() is None:
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()


def try_connect(node: ClusterNode, address: str) -> None:
    """Open an attested Dask comm to ``address`` as ``node`` and ask for its identity (raises what the check raises)."""
    from distributed.comm import connect

    from mesatee_notebook.enclave.cluster.comm import AttestedSecurity

    async def go() -> None:
        comm = await connect(address, timeout=5, **AttestedSecurity(node).get_connection_args("client"))
        try:
            await comm.write({"op": "identity"})
            await comm.read()
        finally:
            await comm.close()

    asyncio.run(go())


def wait_for(predicate: Callable[[], object], timeout: float = PATIENCE, what: str = "condition") -> None:
    """:func:`tests.waiting.wait_until` under the name the cluster tests use."""
    wait_until(predicate, what, timeout=timeout, interval=0.1)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A scheduler and two workers sharing one softtee platform."""
    data_dir = tmp_path_factory.mktemp("cluster")
    fp = init_platform(data_dir)
    nodes: list[NodeProc] = []
    try:
        scheduler = start_node("scheduler", data_dir, "--port", "0")
        nodes.append(scheduler)
        c = Cluster(data_dir, fp, scheduler)
        workers = [
            spawn_node("worker", data_dir, "--scheduler", scheduler.address, "--name", f"w{i}") for i in range(2)
        ]
        nodes.extend(workers)
        c.workers.extend(wait_serving(w) for w in workers)
        wait_for(lambda: scheduler.text().count("Register worker") >= 2, what="both workers registered")
        yield c
    finally:
        for n in nodes:
            stop_node(n)
