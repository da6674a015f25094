"""``mesatee-enclave scheduler|worker``: a Dask scheduler or worker as an attested, confined cluster node.

A node loads the softtee platform, builds its evidence over the cluster measurement, confines its own process
(no core dumps, not dumpable, NO_NEW_PRIVS, Landlock: write only its private work directory) and serves Dask on
``atls://`` only. It is *not* in a bubblewrap sandbox: it needs TCP, and it runs no user code (docs/cluster.md).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask

from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.enclave.cluster.comm import SCHEME, AttestedSecurity
from mesatee_notebook.enclave.cluster.node_identity import ClusterNode, NodeIdentity, cluster_policy
from mesatee_notebook.enclave.hardening import harden_process
from mesatee_notebook.enclave.landlock import restrict
from mesatee_notebook.enclave.platform import load_platform
from mesatee_notebook.errors import AttestationError, MesateeError

__all__ = ["NodeOptions", "dask_settings", "make_node", "run_node"]

log = logging.getLogger("mesatee.cluster")
_PR_SET_NO_NEW_PRIVS = 38


def dask_settings() -> dict[str, Any]:
    """Dask configuration every node and the head use: nothing in plaintext, nothing on disk, no HTTP routes."""
    return {
        "distributed.comm.require-encryption": True,
        "distributed.worker.memory.target": False,
        "distributed.worker.memory.spill": False,
        "distributed.scheduler.http.routes": [],
        "distributed.worker.http.routes": [],
        "distributed.admin.system-monitor.gil.enabled": False,
    }


@dataclass(frozen=True)
class NodeOptions:
    """How a node starts (from the command line)."""

    role: str
    data_dir: Path
    level: Level = Level.SOFTTEE
    host: str = "127.0.0.1"
    port: int = 0
    scheduler: str | None = None
    platform_roots: tuple[str, ...] = ()
    measurements: tuple[str, ...] = ()
    nthreads: int = 1
    memory_limit: str = "auto"
    name: str | None = None
    confine: bool = True


def make_node(
    role: str, platform_key: Any, platform_fp: str, options: NodeOptions | None = None, workdir: Path | None = None
) -> ClusterNode:
    """A node identity and the cluster policy (pins this platform unless others are named).

    With ``options.confine`` (the CLI nodes), this process is confined first and the evidence says how.
    """
    roots = options.platform_roots if options and options.platform_roots else (platform_fp,)
    measurements = options.measurements if options and options.measurements else None
    level = options.level if options else Level.SOFTTEE
    confined = options is not None and options.confine and workdir is not None
    confinement = _confine_self(workdir) if confined and workdir is not None else {"applied": []}
    identity = NodeIdentity.create(role, platform_key, level=level, confinement=confinement)
    return ClusterNode(identity, cluster_policy(roots, measurements))


def _confine_self(workdir: Path) -> dict[str, Any]:
    """Apply the node confinement to this process before it serves; return what was applied (for the evidence)."""
    applied = harden_process()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_NO_NEW_PRIVS) failed")
    applied.append("NO_NEW_PRIVS")
    result = restrict(writable=(str(workdir),), allow_tcp=True)
    applied.append(f"landlock {result.describe()} (write: {workdir})")
    return {"applied": applied, "workdir": str(workdir)}


def _workdir(options: NodeOptions) -> Path:
    base = Path(tempfile.gettempdir())
    path = Path(tempfile.mkdtemp(prefix=f"mesatee-{options.role}-", dir=base))
    os.chmod(path, 0o700)
    return path


async def _serve(node: ClusterNode, options: NodeOptions, workdir: Path) -> None:
    from distributed import Scheduler, Worker

    security = AttestedSecurity(node)
    http = f"{options.host}:0"
    server: Any
    if options.role == "scheduler":
        server = Scheduler(
            host=options.host,
            port=options.port,
            protocol=SCHEME,
            security=security,
            dashboard=False,
            dashboard_address=http,
        )
    else:
        server = Worker(
            options.scheduler,
            host=options.host,
            port=options.port or None,
            protocol=SCHEME,
            security=security,
            nthreads=options.nthreads,
            memory_limit=options.memory_limit,
            name=options.name,
            local_directory=str(workdir),
            dashboard=False,
            dashboard_address=http,
        )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server
    stop_refresh = node.identity.refresh_every()
    print(f"mesatee-enclave {options.role} serving on {server.address}", flush=True)
    print(f"  measurement {node.identity.measurement}", flush=True)
    print(f"  platform    {node.identity.platform_fingerprint}", flush=True)
    print("  softtee is SOFTWARE trust: whoever runs this host can read the node's memory.", flush=True)
    finished = asyncio.ensure_future(server.finished())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({finished, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stop_refresh.set()
    if not finished.done():
        await server.close()
    stopping.cancel()


def _attestation_cause(exc: BaseException) -> AttestationError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, AttestationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def run_node(options: NodeOptions) -> int:
    """Run a scheduler or worker node until SIGTERM; 2 when a peer or the setup is refused."""
    platform = load_platform(options.data_dir)
    workdir = _workdir(options)
    try:
        node = make_node(options.role, platform.key, platform.fingerprint, options, workdir)
        with dask.config.set({**dask_settings(), "temporary-directory": str(workdir)}):
            asyncio.run(_serve(node, options, workdir))
    except MesateeError as exc:
        print(f"mesatee-enclave {options.role}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        cause = _attestation_cause(exc)
        if cause is None:
            raise
        print(f"mesatee-enclave {options.role}: refused: {type(cause).__name__}: {cause}", file=sys.stderr)
        return 2
    finally:
        # Nothing is spilled, but Dask keeps lock files and scratch space here: remove the node's directory.
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
