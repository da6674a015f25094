"""C1: what attested comms cost. The same in-process Dask cluster (a scheduler, 2 workers, a client) on
``tcp://``, Dask's ``tls://`` (a throwaway CA) and mesatee's ``atls://``, in one run.

Measures, per transport:
* a fresh connection to the scheduler, Dask's handshake included (connect, identity, close),
* 200 small tasks (submit, gather) on a warm client,
* moving a 64 MiB bytes object from worker A to a task on worker B (worker-to-worker transfer).

Prints a table and writes bench/results/c1_cluster_comms.json. Usage: python bench/c1_cluster_comms.py [N]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dask
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from distributed import Client, Scheduler, Worker
from distributed.comm import connect
from distributed.security import Security

from mesatee_notebook.enclave.cluster.comm import AttestedSecurity
from mesatee_notebook.enclave.cluster.node import dask_settings
from mesatee_notebook.enclave.cluster.node_identity import ClusterNode, NodeIdentity, cluster_policy


def _security(protocol: str) -> tuple[Any, Any, Any]:
    """Security for the scheduler, the workers and the client."""
    if protocol == "tcp":
        return None, None, None
    if protocol == "tls":
        sec = Security.temporary()
        return sec, sec, sec
    key = Ed25519PrivateKey.generate()
    nodes = [NodeIdentity.create(role, key) for role in ("scheduler", "worker", "head")]
    fp = nodes[0].platform_fingerprint
    policy = cluster_policy((fp,), (nodes[0].measurement,))
    return tuple(AttestedSecurity(ClusterNode(n, policy)) for n in nodes)  # type: ignore[return-value]


def _size(payload: bytes) -> int:
    return len(payload)


def _make(n: int) -> bytes:
    return b"x" * n


async def _run(protocol: str, n: int) -> dict[str, float]:
    s_sec, w_sec, c_sec = _security(protocol)
    kw = {"security": s_sec} if s_sec else {}
    async with Scheduler(protocol=protocol, host="127.0.0.1", dashboard_address="127.0.0.1:0", **kw) as s:
        wkw = {"security": w_sec} if w_sec else {}
        async with (
            Worker(s.address, host="127.0.0.1", nthreads=1, **wkw) as a,
            Worker(s.address, host="127.0.0.1", nthreads=1, **wkw) as b,
        ):
            ckw = {"security": c_sec} if c_sec else {}
            async with Client(s.address, asynchronous=True, **ckw) as c:
                args = c_sec.get_connection_args("client") if c_sec else {}
                connects = []
                for _ in range(n):
                    t = time.perf_counter()
                    comm = await connect(s.address, **args)
                    await comm.close()
                    connects.append(time.perf_counter() - t)
                t = time.perf_counter()
                futures = [c.submit(_size, b"k", pure=False) for _ in range(200)]
                await c.gather(futures)
                tasks = time.perf_counter() - t
                moves = []
                for _ in range(max(3, n // 10)):
                    src = c.submit(_make, 64 << 20, workers=[a.address], pure=False)
                    await src
                    t = time.perf_counter()
                    await c.submit(_size, src, workers=[b.address], allow_other_workers=False, pure=False)
                    moves.append(time.perf_counter() - t)
                    del src
    return {
        "connect_ms": float(np.median(connects) * 1e3),
        "tasks_200_ms": tasks * 1e3,
        "move_64mib_ms": float(np.median(moves) * 1e3),
    }


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    results: dict[str, dict[str, float]] = {}
    with dask.config.set({**dask_settings(), "distributed.comm.require-encryption": False}):
        for protocol in ("tcp", "tls", "atls"):
            results[protocol] = asyncio.run(_run(protocol, n))
    base = results["tls"]
    print(f"{'':<8} {'connect ms':>11} {'200 tasks ms':>13} {'64 MiB A->B ms':>15}")
    for protocol, r in results.items():
        print(f"{protocol:<8} {r['connect_ms']:>11.2f} {r['tasks_200_ms']:>13.1f} {r['move_64mib_ms']:>15.1f}")
    print(
        f"atls/tls: connect {results['atls']['connect_ms'] / base['connect_ms']:.2f}x, "
        f"tasks {results['atls']['tasks_200_ms'] / base['tasks_200_ms']:.2f}x, "
        f"move {results['atls']['move_64mib_ms'] / base['move_64mib_ms']:.2f}x"
    )
    out = Path(__file__).resolve().parent / "results" / "c1_cluster_comms.json"
    out.write_text(json.dumps({"n": n, "results": results}, indent=2))


if __name__ == "__main__":
    main()
