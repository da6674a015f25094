"""``mesatee-enclave cluster up|down|status``: a scheduler, N attested workers and a head kernel on one host.

The launcher starts each node as its own process (``mesatee-enclave scheduler``, ``worker``, ``serve --cluster``),
on loopback or, with ``--netns``, each in a network namespace of its own (:mod:`.netns`). It holds
``DATA_DIR/cluster/lock`` while it runs and writes ``DATA_DIR/cluster/state.json`` (addresses, pids, what a notebook
pins) once every worker has registered and the head serves. On SIGINT/SIGTERM it stops the head, the workers and
the scheduler, in that order, and removes the namespaces. Every node also gets ``PR_SET_PDEATHSIG``: if the launcher
is killed, its nodes stop too, and the next ``up`` or ``down`` on the same directory removes what was left (stale
namespaces and links). No Dask import here: the ``cluster`` extra is checked, not assumed.

Layout: ``DATA_DIR/platform`` (one softtee platform for every node; created if missing), ``DATA_DIR/head`` (the head
kernel's data directory, with a copy of the platform), ``DATA_DIR/cluster/logs/NODE.log``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mesatee_notebook.enclave.cluster import netns
from mesatee_notebook.errors import ClusterSetupError

__all__ = ["MAX_WORKERS", "ClusterSpec", "LocalCluster", "down", "run_foreground", "status", "up"]

MAX_WORKERS = 32
_PR_SET_PDEATHSIG = 1
_SERVING = re.compile(r"serving on (atls://\S+)")
_MEASUREMENT = re.compile(r"measurement ([0-9a-f]{64})")
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
    if spec.use_netns:
        netns.require_netns()
        return
    for flag, port in (("--port", spec.port), ("--head-port", spec.head_port)):
        if port:
            _check_port_free(flag, port)


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
    for node in [state.get("scheduler"), state.get("head"), *state.get("workers", [])]:
        pid = int(node.get("pid", 0)) if isinstance(node, dict) else 0
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


# -- the launcher -------------------------------------------------------------------------------------------------


def _pdeathsig() -> None:
    """In the child before exec: SIGTERM when the launcher dies (kept across exec), so no node is orphaned."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _enclave(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesatee_notebook.cli", "enclave", *args]


@dataclass
class _Node:
    name: str
    role: str
    proc: subprocess.Popen[bytes]
    log: Path
    host: str
    netns: str | None = None
    address: str = ""

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "pid": self.proc.pid,
            "host": self.host,
            "netns": self.netns,
            "log": str(self.log),
        }


class _Stopped(Exception):
    """The launcher was asked to stop while it was starting the cluster."""


@dataclass
class _Launcher:
    spec: ClusterSpec
    data_dir: Path
    stop: threading.Event = field(default_factory=threading.Event)
    nodes: list[_Node] = field(default_factory=list)
    plan: netns.NetPlan | None = None

    def spawn(self, name: str, role: str, args: list[str]) -> _Node:
        logs = _cluster_dir(self.data_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        host = self.plan.node(name).address if self.plan else "127.0.0.1"
        space = self.plan.node(name).netns if self.plan else None
        prefix = netns.ip_exec(space) if space else []
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [*prefix, *_enclave(*args, "--host", host)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the launcher only; it stops the nodes in order
                preexec_fn=_pdeathsig,  # noqa: PLW1509 (the launcher runs no threads)
            )
        node = _Node(name, role, proc, log, host, space)
        self.nodes.append(node)
        return node

    def wait_until(self, what: str, ready: Any, watch: list[_Node]) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while not ready():
            if self.stop.is_set():
                raise _Stopped
            for n in watch:
                if n.proc.poll() is not None:
                    tail = "\n".join(n.text().strip().splitlines()[-8:])
                    msg = f"{n.name} exited ({n.proc.returncode}) before {what}; its log ({n.log}):\n{tail}"
                    raise ClusterSetupError(msg)
            if time.monotonic() > deadline:
                msg = f"timed out after {_START_TIMEOUT:.0f} s waiting for {what} (logs: {self.data_dir}/cluster/logs)"
                raise ClusterSetupError(msg)
            time.sleep(0.1)

    def serving(self, node: _Node) -> bool:
        m = _SERVING.search(node.text())
        if m:
            node.address = m.group(1)
        return bool(m)

    def start(self) -> dict[str, Any]:
        d = str(self.data_dir)
        names = ["sched", *[f"w{i}" for i in range(self.spec.workers)], "head"]
        if self.spec.use_netns:
            self.plan = netns.create(netns.tag_for(self.data_dir), names)
        sched = self.spawn("sched", "scheduler", ["scheduler", "--data-dir", d, "-v", "--port", str(self.spec.port)])
        self.wait_until("the scheduler serves", lambda: self.serving(sched), [sched])
        workers = [
            self.spawn(
                name,
                "worker",
                [
                    "worker",
                    "--data-dir",
                    d,
                    "-v",
                    "--scheduler",
                    sched.address,
                    "--name",
                    name,
                    "--nthreads",
                    str(self.spec.nthreads),
                ],
            )
            for name in names[1:-1]
        ]
        self.wait_until("the workers serve", lambda: all([self.serving(w) for w in workers]), [sched, *workers])
        self.wait_until(
            "every worker registered with the scheduler",
            lambda: sched.text().count("Register worker") >= len(workers),
            [sched, *workers],
        )
        head_dir = _head_dir(self.data_dir)
        head = self.spawn(
            "head",
            "head",
            ["serve", "--data-dir", str(head_dir), "--port", str(self.spec.head_port), "--cluster", sched.address],
        )
        info: dict[str, Any] = {}
        self.wait_until("the head kernel serves", lambda: _kernel_info(head_dir, head.proc.pid, info), [sched, head])
        head.address = f"mesatee://{head.host}:{info['port']}"
        return self.state(sched, workers, head, info)

    def state(self, sched: _Node, workers: list[_Node], head: _Node, info: dict[str, Any]) -> dict[str, Any]:
        m = _MEASUREMENT.search(sched.text())
        fingerprint = (self.data_dir / "platform" / "fingerprint").read_text().strip()
        net = None
        if self.plan:
            net = {
                "bridge": self.plan.bridge,
                "gateway": self.plan.gateway,
                "subnet": self.plan.subnet,
                "veth": {n.name: n.host_veth for n in self.plan.nodes},
            }
        return {
            "ready": True,
            "launcher_pid": os.getpid(),
            "data_dir": str(self.data_dir),
            "cluster_measurement": m.group(1) if m else "",
            "scheduler": {**sched.record(), "address": sched.address},
            "workers": [w.record() for w in workers],
            "head": {**head.record(), "url": head.address, "measurement": info["measurement"], "platform": fingerprint},
            "netns": net,
        }

    def teardown(self) -> None:
        """Stop the head, then the workers, then the scheduler (SIGTERM, then SIGKILL after a grace period)."""
        for group in ([n for n in self.nodes if n.role == r] for r in ("head", "worker", "scheduler")):
            for n in group:
                if n.proc.poll() is None:
                    n.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            for n in group:
                try:
                    n.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait()
        if self.plan is not None:
            netns.remove(self.plan.tag)


def _head_dir(data_dir: Path) -> Path:
    """The head's data directory, holding a copy of the cluster's platform (replaced if it differs)."""
    head = data_dir / "head"
    src, dst = data_dir / "platform", head / "platform"
    if not dst.exists() or (dst / "fingerprint").read_bytes() != (src / "fingerprint").read_bytes():
        shutil.rmtree(dst, ignore_errors=True)
        head.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.copytree(src, dst)
    return head


def _kernel_info(head_dir: Path, pid: int, out: dict[str, Any]) -> bool:
    try:
        info = json.loads((head_dir / "kernel.json").read_text())
    except (OSError, ValueError):
        return False
    if info.get("pid") != pid:
        return False
    out.update(info)
    return True


def _where(node: dict[str, Any]) -> str:
    return f"  [netns {node['netns']}]" if node.get("netns") else ""


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
    lines.append("  softtee is SOFTWARE trust: whoever runs this host can read every node's memory.")
    lines.append(
        f'  connect:   mn.connect("{head["url"]}", policy=mn.Policy(platform_roots=["{head["platform"]}"], '
        f'measurements=["{head["measurement"]}"]))'
    )
    lines.append(f"  stop:      Ctrl-C the launcher, or `mesatee-enclave cluster down --data-dir {state['data_dir']}`")
    return "\n".join(lines)


def _install_stop(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stop.set())


def run_foreground(spec: ClusterSpec, *, out: IO[str] | None = None) -> int:
    """``cluster up``: start everything, print the state, serve until a signal or until the scheduler or head dies."""
    out = out or sys.stdout
    check_spec(spec)
    data_dir = Path(spec.data_dir).expanduser().resolve()
    lock = _take_lock(data_dir)
    try:
        stale = clean_stale(data_dir)
        if stale:
            print(f"mesatee-enclave cluster: removed what a stopped launcher left: {', '.join(stale)}", file=out)
        from mesatee_notebook.enclave.platform import init_platform

        init_platform(data_dir)
        launcher = _Launcher(spec, data_dir)
        _install_stop(launcher.stop)
        return _serve(launcher, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            (_cluster_dir(data_dir) / "state.json").unlink()
        lock.close()


def _serve(launcher: _Launcher, out: IO[str]) -> int:
    try:
        state = launcher.start()
        _write_state(launcher.data_dir, state)
        print(describe(state), file=out, flush=True)
        vital = [n for n in launcher.nodes if n.role in ("scheduler", "head")]
        while not launcher.stop.wait(0.5):
            dead = [n for n in vital if n.proc.poll() is not None]
            if dead:
                print(f"mesatee-enclave cluster: {dead[0].name} exited ({dead[0].proc.returncode}); stopping", file=out)
                return 1
        return 0
    except _Stopped:
        return 130
    finally:
        launcher.teardown()
        print("mesatee-enclave cluster: stopped", file=out, flush=True)


# -- detached use (notebooks, scripts) ----------------------------------------------------------------------------


def up(
    workers: int = 2,
    data_dir: Path | str | None = None,
    *,
    use_netns: bool = False,
    port: int = 0,
    head_port: int = 0,
    nthreads: int = 1,
) -> LocalCluster:
    """Start ``mesatee-enclave cluster up`` in the background (its own session) and return once it serves."""
    spec = ClusterSpec(
        Path(data_dir or default_data_dir()).expanduser().resolve(), workers, use_netns, port, head_port, nthreads
    )
    check_spec(spec)
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
    for child in [p for p in _DETACHED.values() if p.poll() is not None]:
        del _DETACHED[child.pid]
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
