"""``mesatee-enclave cluster up|down|status``: a scheduler, N attested workers and a head kernel on one host.

This module checks the request, holds the state and offers the detached API (:func:`up`, :func:`down`,
:func:`status`); the launcher process itself is :mod:`.launcher`. The launcher starts each node as its own process
(``mesatee-enclave scheduler``, ``worker``, ``serve --cluster``), on loopback or, with ``--netns``, each in a
network namespace of its own (:mod:`.netns`), and with ``--bwrap`` the scheduler and workers in bubblewrap
(:mod:`.node_bwrap`). It holds ``DATA_DIR/cluster/lock`` while it runs and writes ``DATA_DIR/cluster/state.json``
(addresses, pids, what a notebook pins) once every worker has registered and the head serves. On SIGINT/SIGTERM it
stops the head, the workers and the scheduler, in that order, and removes the namespaces. Every node also gets
``PR_SET_PDEATHSIG``: if the launcher is killed, its nodes stop too, and the next ``up`` or ``down`` on the same
directory removes what was left (stale namespaces and links). No Dask import here: the ``cluster`` extra is checked,
not assumed.

Layout: ``DATA_DIR/platform`` (one softtee platform for every node; created if missing), ``DATA_DIR/head`` (the head
kernel's data directory, with a copy of the platform), ``DATA_DIR/cluster/logs/NODE.log``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mesatee_notebook.enclave.cluster import netns
from mesatee_notebook.errors import ClusterSetupError

__all__ = [
    "MAX_WORKERS",
    "ClusterSpec",
    "LocalCluster",
    "check_spec",
    "clean_stale",
    "describe",
    "down",
    "status",
    "up",
]

MAX_WORKERS = 32
_START_TIMEOUT = 180.0
# Launchers this process started with up(): kept so that down() (or the next up()) reaps them (no zombie, no warning).
_DETACHED: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class ClusterSpec:
    """What ``cluster up`` starts."""

    data_dir: Path
    workers: int = 2
    use_netns: bool = False
    port: int = 0
    head_port: int = 0
    nthreads: int = 1
    bwrap: bool = False
    level: str = "softtee"


@dataclass
class LocalCluster:
    """A running local cluster, as its launcher recorded it (``DATA_DIR/cluster/state.json``)."""

    data_dir: Path
    state: dict[str, Any]

    @property
    def head_url(self) -> str:
        return str(self.state["head"]["url"])

    @property
    def scheduler(self) -> str:
        return str(self.state["scheduler"]["address"])

    @property
    def workers(self) -> list[dict[str, Any]]:
        return list(self.state["workers"])

    def policy(self) -> Any:
        """The verification policy a notebook connects to the head with: this platform and the head's measurement."""
        import mesatee_notebook as mn

        head = self.state["head"]
        return mn.Policy(platform_roots=[head["platform"]], measurements=[head["measurement"]])

    def stop(self) -> None:
        down(self.data_dir)

    def __str__(self) -> str:
        return describe(self.state)


def _cluster_dir(data_dir: Path) -> Path:
    return Path(data_dir).expanduser().resolve() / "cluster"


# -- checks -------------------------------------------------------------------------------------------------------


def check_spec(spec: ClusterSpec) -> None:
    """Raise :class:`ClusterSetupError` for what would fail later: worker count, ports, the extra, ``--netns``."""
    if not 1 <= spec.workers <= MAX_WORKERS:
        msg = f"--workers {spec.workers}: give 1 to {MAX_WORKERS} workers"
        raise ClusterSetupError(msg)
    if spec.nthreads < 1:
        msg = f"--nthreads {spec.nthreads}: give at least 1 thread per worker"
        raise ClusterSetupError(msg)
    for flag, port in (("--port", spec.port), ("--head-port", spec.head_port)):
        if not 0 <= port <= 65535:
            msg = f"{flag} {port} is not a TCP port: give 0 to 65535 (0: any free port)"
            raise ClusterSetupError(msg)
    if importlib.util.find_spec("distributed") is None:
        msg = "needs the cluster extra (Dask distributed): pip install 'mesatee_notebook[cluster]'"
        raise ClusterSetupError(msg)
    if spec.bwrap:
        from mesatee_notebook.enclave.cluster.node_bwrap import require_bwrap

        require_bwrap()
    _check_level(spec.level)
    if spec.use_netns:
        netns.require_netns()
        return
    for flag, port in (("--port", spec.port), ("--head-port", spec.head_port)):
        if port:
            _check_port_free(flag, port)


def _check_level(level: str) -> None:
    if level not in ("softtee", "tpm"):
        msg = f"--level {level}: a local cluster runs at softtee or tpm (one swtpm, a SOFTWARE TPM, per node)"
        raise ClusterSetupError(msg)
    if level == "tpm":
        import shutil

        missing = [] if shutil.which("swtpm") else ["swtpm (Debian package swtpm)"]
        if importlib.util.find_spec("tpm2_pytss") is None:
            missing.append("tpm2-pytss (pip install 'mesatee_notebook[tpm]')")
        if missing:
            msg = f"--level tpm needs {' and '.join(missing)}"
            raise ClusterSetupError(msg)


def _check_port_free(flag: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            msg = f"{flag} {port}: 127.0.0.1:{port} is in use ({exc.strerror}); choose another port, or 0 for any"
            raise ClusterSetupError(msg) from None


def _take_lock(data_dir: Path) -> IO[str]:
    """The launcher's lock on ``DATA_DIR/cluster/lock`` (held while it runs; released by the kernel if it dies)."""
    cdir = _cluster_dir(data_dir)
    cdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fh = (cdir / "lock").open("a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        pid = _read_state(data_dir).get("launcher_pid", "?")
        msg = (
            f"a cluster already runs from {data_dir} (launcher pid {pid}); "
            f"stop it with `mesatee-enclave cluster down --data-dir {data_dir}`"
        )
        raise ClusterSetupError(msg) from None
    return fh


def _launcher_alive(data_dir: Path) -> bool:
    path = _cluster_dir(data_dir) / "lock"
    if not path.exists():
        return False
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def _read_state(data_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((_cluster_dir(data_dir) / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(data_dir: Path, state: dict[str, Any]) -> None:
    path = _cluster_dir(data_dir) / "state.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


# -- stale clean-up -----------------------------------------------------------------------------------------------


def _ours(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` still runs a node of this cluster (its command line names the data directory)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return str(Path(data_dir).expanduser().resolve()) in cmdline


def clean_stale(data_dir: Path) -> list[str]:
    """Remove what a dead launcher left: node processes (checked by command line), namespaces, links, state."""
    removed = []
    state = _read_state(data_dir)
    nodes = [n for n in [state.get("scheduler"), state.get("head"), *state.get("workers", [])] if isinstance(n, dict)]
    tpms = [n["tpm"] for n in nodes if isinstance(n.get("tpm"), dict)]  # each node's swtpm (its state names D)
    for node in [*nodes, *tpms]:
        pid = int(node.get("pid", 0) or 0)
        if pid and _ours(pid, data_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                removed.append(f"pid {pid}")
    tag = netns.tag_for(data_dir)
    with contextlib.suppress(ClusterSetupError):  # no root or no `ip`: there can be no namespaces of ours either
        removed.extend(netns.remove(tag))
    with contextlib.suppress(FileNotFoundError):
        (_cluster_dir(data_dir) / "state.json").unlink()
    return removed


def _where(node: dict[str, Any]) -> str:
    netns_note = f"  [netns {node['netns']}]" if node.get("netns") else ""
    tpm = node.get("tpm")
    tpm_note = f"  [SOFTWARE TPM, AK {str(tpm.get('ak'))[:16]}…]" if isinstance(tpm, dict) else ""
    return netns_note + ("  [bubblewrap]" if node.get("bwrap") else "") + tpm_note


def describe(state: dict[str, Any]) -> str:
    """What ``cluster up`` prints: the nodes, and what a notebook pins to connect to the head."""
    head = state["head"]
    lines = [f"mesatee-enclave cluster: {len(state['workers'])} workers up (launcher pid {state['launcher_pid']})"]
    lines.append(
        f"  scheduler  {state['scheduler']['address']}  pid {state['scheduler']['pid']}{_where(state['scheduler'])}"
    )
    lines += [f"  worker {w['name']:<3} {w['address']}  pid {w['pid']}{_where(w)}" for w in state["workers"]]
    lines.append(f"  head       {head['url']}  pid {head['pid']}{_where(head)}")
    lines.append(f"  platform   {head['platform']}")
    lines.append(f"  head measurement     {head['measurement']}")
    lines.append(f"  cluster measurement  {state['cluster_measurement']}")
    if state.get("netns"):
        net = state["netns"]
        lines.append(f"  network    bridge {net['bridge']} {net['subnet']} (this host: {net['gateway']})")
    if state.get("level") == "tpm":
        from mesatee_notebook.enclave.cluster.node_tpm import SOFTWARE_TPM_NOTE

        lines.append(f"  level      tpm: {SOFTWARE_TPM_NOTE}.")
        lines.append("  The head kernel faces notebooks at softtee: SOFTWARE trust.")
    else:
        lines.append("  softtee is SOFTWARE trust: whoever runs this host can read every node's memory.")
    if state.get("confinement"):
        lines.append(f"  every node requires confinement {state['confinement']!r} of the scheduler and workers")
    lines.append(
        f'  connect:   mn.connect("{head["url"]}", policy=mn.Policy(platform_roots=["{head["platform"]}"], '
        f'measurements=["{head["measurement"]}"]))'
    )
    lines.append(f"  stop:      Ctrl-C the launcher, or `mesatee-enclave cluster down --data-dir {state['data_dir']}`")
    return "\n".join(lines)


def _enclave(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesatee_notebook.cli", "enclave", *args]


# -- detached use (notebooks, scripts) ----------------------------------------------------------------------------


def up(
    workers: int = 2,
    data_dir: Path | str | None = None,
    *,
    use_netns: bool = False,
    port: int = 0,
    head_port: int = 0,
    nthreads: int = 1,
    bwrap: bool = False,
    level: str = "softtee",
) -> LocalCluster:
    """Start ``mesatee-enclave cluster up`` in the background (its own session) and return once it serves."""
    spec = ClusterSpec(
        Path(data_dir or default_data_dir()).expanduser().resolve(),
        workers,
        use_netns,
        port,
        head_port,
        nthreads,
        bwrap,
        level,
    )
    check_spec(spec)
    _reap()  # launchers of earlier up() calls that have exited since (a test's kill -9, a `cluster down` elsewhere)
    if _launcher_alive(spec.data_dir):
        _take_lock(spec.data_dir).close()  # raises "already runs", naming the launcher
    cdir = _cluster_dir(spec.data_dir)
    cdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    args = [
        "cluster",
        "up",
        "--workers",
        str(workers),
        "--data-dir",
        str(spec.data_dir),
        "--port",
        str(port),
        "--head-port",
        str(head_port),
        "--nthreads",
        str(nthreads),
        *(["--netns"] if use_netns else []),
        *(["--bwrap"] if bwrap else []),
        "--level",
        level,
    ]
    with (cdir / "launcher.log").open("wb") as fh:
        proc = subprocess.Popen(
            _enclave(*args), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    deadline = time.monotonic() + _START_TIMEOUT + 30
    while time.monotonic() < deadline:
        state = _read_state(spec.data_dir)
        if state.get("ready") and state.get("launcher_pid") == proc.pid:
            _DETACHED[proc.pid] = proc
            return LocalCluster(spec.data_dir, state)
        if proc.poll() is not None:
            log = (cdir / "launcher.log").read_text(errors="replace").strip()
            msg = f"the cluster did not start: {log.splitlines()[-1] if log else f'exit {proc.returncode}'}"
            raise ClusterSetupError(msg)
        time.sleep(0.2)
    proc.terminate()
    proc.wait()
    msg = f"the cluster did not start within {_START_TIMEOUT + 30:.0f} s (log: {cdir / 'launcher.log'})"
    raise ClusterSetupError(msg)


def _reap(stopped: int = 0) -> None:
    """Reap the launchers this process started that have exited, so none is left a zombie or warned about at exit.

    ``stopped`` was just signalled: it drops its lock before its interpreter exits, so it is waited for a little.
    """
    for child in list(_DETACHED.values()):
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=10.0 if child.pid == stopped else 0)
        if child.returncode is not None:
            del _DETACHED[child.pid]


def down(data_dir: Path | str | None = None, timeout: float = 60.0) -> list[str]:
    """Stop the launcher of ``data_dir`` (it tears the cluster down), then remove anything stale; say what stopped."""
    data_dir = Path(data_dir or default_data_dir()).expanduser().resolve()
    done: list[str] = []
    pid = int(_read_state(data_dir).get("launcher_pid", 0) or 0)
    if _launcher_alive(data_dir) and pid and _ours(pid, data_dir):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _launcher_alive(data_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _launcher_alive(data_dir):
            os.kill(pid, signal.SIGKILL)
        done.append(f"launcher pid {pid}")
    _reap(pid)
    if not _launcher_alive(data_dir):
        done.extend(clean_stale(data_dir))
    return done


def status(data_dir: Path | str | None = None) -> LocalCluster | None:
    """The running cluster of ``data_dir`` (None when no launcher holds it)."""
    data_dir = Path(data_dir or default_data_dir()).expanduser().resolve()
    state = _read_state(data_dir)
    if not _launcher_alive(data_dir) or not state.get("ready"):
        return None
    return LocalCluster(data_dir, state)


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "mesatee_notebook" / "cluster"
