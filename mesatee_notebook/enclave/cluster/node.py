"""``mesatee-enclave scheduler|worker``: a Dask scheduler or worker as an attested, confined cluster node.

A node loads the softtee platform (or, at ``--level tpm``, opens its TPM and measures the cluster measurement into
its application PCR), builds its evidence over the cluster measurement, confines its own process (no core dumps,
not dumpable, NO_NEW_PRIVS, Landlock: write only its private work directory) and serves Dask on ``atls://`` only.
It is not in the kernel's executor sandbox: it needs TCP, and it runs no user code (docs/cluster.md). With
``--confinement bwrap`` (``cluster up --bwrap``) it checks that it runs in bubblewrap and states that profile in its
evidence; at tpm the profile must already be in PCR 16 (the launcher measures it).
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
from mesatee_notebook.errors import AttestationError, ClusterSetupError, MesateeError

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
    tcti: str | None = None
    #: The confinement profile its launcher put it in (``bwrap``), stated in the evidence; None: none.
    confinement: str | None = None
    #: A profile every scheduler and worker peer must show (node_identity.check_confinement).
    require_confinement: str | None = None


def make_node(
    role: str, platform_key: Any, platform_fp: str, options: NodeOptions | None = None, workdir: Path | None = None
) -> ClusterNode:
    """A node identity and the cluster policy (pins this platform, or at tpm this TPM's AK, unless others are named).

    With ``options.confine`` (the CLI nodes), this process is confined first and the evidence says how. At tpm the
    node opens its TPM (``options.tcti``) and the policy requires tpm of every peer.
    """
    level = options.level if options else Level.SOFTTEE
    measurements = options.measurements if options and options.measurements else None
    confined = options is not None and options.confine and workdir is not None
    confinement = _confine_self(workdir) if confined and workdir is not None else {"applied": []}
    profile = _profile(options)
    if profile is not None:
        confinement["profile"] = profile
    tpm = None
    if level is Level.TPM:
        from mesatee_notebook.enclave.cluster.node_tpm import open_node_tpm
        from mesatee_notebook.enclave.tpm import open_tpm

        tpm = open_node_tpm(options.tcti) if options and options.tcti else open_tpm(None)
    try:
        _check_measured_profile(tpm, profile)
        identity = NodeIdentity.create(role, platform_key, level=level, confinement=confinement, tpm=tpm)
    except BaseException:
        if tpm is not None:
            tpm.close()
        raise
    own = identity.platform_fingerprint if tpm is not None else platform_fp
    roots = options.platform_roots if options and options.platform_roots else (own,)
    require = options.require_confinement if options else None
    return ClusterNode(identity, cluster_policy(roots, measurements, min_level=level), require_confinement=require)


def _profile(options: NodeOptions | None) -> dict[str, Any] | None:
    """The profile a launcher says it put this node in, after the node checked that it is in it."""
    if options is None or not options.confinement or options.confinement == "none":
        return None
    from mesatee_notebook.enclave.cluster.node_bwrap import PROFILES

    profile = PROFILES.get(options.confinement)
    if profile is None:
        msg = f"--confinement {options.confinement!r}: known profiles are {', '.join(PROFILES)} (or none)"
        raise ClusterSetupError(msg)
    _check_bwrapped()
    return dict(profile)


def _check_bwrapped() -> None:
    """Refuse to state the bwrap profile unless this process is in it: pid 1 is bubblewrap and / is read-only."""
    try:
        init = Path("/proc/1/comm").read_text().strip()
    except OSError:
        init = "?"
    if init != "bwrap" or not os.statvfs("/").f_flag & os.ST_RDONLY:
        msg = (
            "--confinement bwrap, but this node is not in bubblewrap (its pid 1 is "
            f"{init!r}, and / must be read-only): start it with `cluster up --bwrap`"
        )
        raise ClusterSetupError(msg)


def _check_measured_profile(tpm: Any, profile: dict[str, Any] | None) -> None:
    """At tpm, a stated profile must be in the confinement PCR already (the launcher measures it before the start)."""
    if tpm is None or profile is None:
        return
    from mesatee_notebook.enclave.cluster.node_tpm import CONFINEMENT_PCR, confinement_pcr_value

    if tpm.read_pcrs().get(CONFINEMENT_PCR) != confinement_pcr_value(profile):
        msg = (
            f"--confinement {profile['name']}: PCR {CONFINEMENT_PCR} of this node's TPM does not hold that profile; "
            "the launcher measures it before it starts the node (`cluster up --level tpm --bwrap`)"
        )
        raise ClusterSetupError(msg)


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
    print(f"  {trust_line(node.identity)}", flush=True)
    finished = asyncio.ensure_future(server.finished())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({finished, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stop_refresh.set()
    if not finished.done():
        await server.close()
    stopping.cancel()


def trust_line(identity: NodeIdentity) -> str:
    """What a node says of its level, in every display: never more than it proves."""
    tpm = identity.tpm
    if tpm is None:
        return "softtee is SOFTWARE trust: whoever runs this host can read the node's memory."
    if tpm.kind == "software":
        return (
            f"tpm with {tpm.vendor}, a SOFTWARE TPM (swtpm): real TPM 2.0 quotes, but whoever runs this host holds "
            "its keys, can set its PCRs and can read the node's memory."
        )
    return f"tpm with {tpm.vendor} (says it is a chip): the AK you pin vouches; the host can still read the memory."


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
    node: ClusterNode | None = None
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
        if node is not None:
            node.identity.close()
        # Nothing is spilled, but Dask keeps lock files and scratch space here: remove the node's directory.
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
