"""The launcher behind ``mesatee-enclave cluster up`` (see :mod:`.local` for the layout, the lock and clean-up).

It starts the scheduler, then the workers, waits until every one has registered, then starts the head kernel; it
serves until SIGINT/SIGTERM/SIGHUP or until the scheduler or head dies, then stops the head, the workers and the
scheduler in that order and removes the namespaces. Each node gets ``PR_SET_PDEATHSIG`` (SIGTERM), so a launcher
killed with SIGKILL takes its nodes with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mesatee_notebook.enclave.cluster import netns
from mesatee_notebook.enclave.cluster.local import (
    _START_TIMEOUT,
    ClusterSpec,
    _cluster_dir,
    _enclave,
    _take_lock,
    _write_state,
    check_spec,
    clean_stale,
    describe,
)
from mesatee_notebook.enclave.cluster.node_tpm import SwtpmProc, prepared, run_prepare, start_swtpm
from mesatee_notebook.errors import ClusterSetupError

__all__ = ["run_foreground"]

_PR_SET_PDEATHSIG = 1
_SERVING = re.compile(r"serving on (atls://\S+)")
_MEASUREMENT = re.compile(r"measurement ([0-9a-f]{64})")


# -- nodes -------------------------------------------------------------------------------------------------


def _pdeathsig() -> None:
    """In the child before exec: SIGTERM when the launcher dies (kept across exec), so no node is orphaned."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class _Node:
    name: str
    role: str
    proc: subprocess.Popen[bytes]
    log: Path
    host: str
    netns: str | None = None
    address: str = ""
    bwrap: bool = False
    tpm: dict[str, Any] | None = None  # its swtpm: pid, tcti, AK fingerprint, kind

    def terminate(self) -> None:
        """SIGTERM to the node (for a bubblewrapped node: the processes of its group that are not bubblewrap).

        bwrap does not pass signals on, and its ``--die-with-parent`` would SIGKILL the node: no clean stop. Nor may
        bwrap itself get the SIGTERM: when its init (pid 1 of the node's PID namespace) exits, the kernel SIGKILLs
        the node before it has stopped. bwrap exits by itself once the node has.
        """
        with contextlib.suppress(ProcessLookupError):
            if not self.bwrap:
                self.proc.send_signal(signal.SIGTERM)
                return
            inside = _group_members(self.proc.pid, skip="bwrap")
            for pid in inside:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            if not inside:  # nothing but bwrap left (or not started yet): stop it
                os.killpg(self.proc.pid, signal.SIGTERM)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.address,
            "pid": self.proc.pid,
            "host": self.host,
            "netns": self.netns,
            "bwrap": self.bwrap,
            "log": str(self.log),
            **({"tpm": self.tpm} if self.tpm else {}),
        }


def _prepare_here(tcti: str, profile: dict[str, Any] | None, name: str) -> dict[str, str]:
    from mesatee_notebook.enclave.cluster.node_tpm import prepare
    from mesatee_notebook.errors import LevelNotAvailableError

    try:
        return prepare(tcti, profile)
    except LevelNotAvailableError as exc:
        msg = f"the TPM of {name} did not answer: {exc}"
        raise ClusterSetupError(msg) from None


def _group_members(pgid: int, skip: str) -> list[int]:
    """Processes of process group ``pgid`` whose command name is not ``skip`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if len(rest) > 2 and int(rest[2]) == pgid and comm != skip:
            out.append(int(entry.name))
    return out


class _Stopped(Exception):
    """The launcher was asked to stop while it was starting the cluster."""


@dataclass
class _Launcher:
    spec: ClusterSpec
    data_dir: Path
    stop: threading.Event = field(default_factory=threading.Event)
    nodes: list[_Node] = field(default_factory=list)
    plan: netns.NetPlan | None = None
    tpms: dict[str, tuple[SwtpmProc, dict[str, str]]] = field(default_factory=dict)

    def _wrapped(self, role: str) -> bool:
        return self.spec.bwrap and role != "head"  # the head runs its own bubblewrap sandboxes (node_bwrap.py)

    def start_tpms(self, names: list[str]) -> None:
        """One swtpm per node (state in ``D/cluster/tpm/NODE``), then measure each wrapped node's profile.

        The profile goes into PCR 16 of that node's TPM before the node starts, so its quotes cover it. Every
        node's AK is read here, so that every node can pin every other's.
        """
        from mesatee_notebook.enclave.cluster.node_bwrap import BWRAP_PROFILE

        base = _cluster_dir(self.data_dir) / "tpm"
        for name in names:
            prefix = netns.ip_exec(self.plan.node(name).netns) if self.plan else []
            log = _cluster_dir(self.data_dir) / "logs" / f"{name}-swtpm.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            proc = start_swtpm(base / name, log, prefix, _pdeathsig, in_netns=self.plan is not None)
            self.tpms[name] = (proc, {})
        waiting = {}
        for name, (proc, _) in self.tpms.items():
            profile = BWRAP_PROFILE if self._wrapped("head" if name == "head" else "worker") else None
            if self.plan is None:  # the swtpm listens on this namespace's loopback: measure from here
                self.tpms[name] = (proc, _prepare_here(proc.tcti, profile, name))
                continue
            waiting[name] = run_prepare(proc.tcti, profile, netns.ip_exec(self.plan.node(name).netns))
        for name, child in waiting.items():  # in the node's own namespace, where its swtpm listens
            self.tpms[name] = (self.tpms[name][0], prepared(child, name))

    def level_args(self, name: str, head: bool = False) -> list[str]:
        """The level, TPM and pinned AKs, and the confinement flags of one node's command line."""
        flag = "--cluster-" if head else "--"
        out: list[str] = []
        if self.tpms:
            out += [f"{flag}level", "tpm", f"{flag}tcti", self.tpms[name][0].tcti]
            for _, answer in self.tpms.values():
                out += [f"{flag}platform-root", answer["ak"]]
        if self.spec.bwrap:
            out += [f"{flag}require-confinement", "bwrap"]
            if not head:
                out += ["--confinement", "bwrap"]
        return out

    def spawn(self, name: str, role: str, args: list[str]) -> _Node:
        logs = _cluster_dir(self.data_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        host = self.plan.node(name).address if self.plan else "127.0.0.1"
        space = self.plan.node(name).netns if self.plan else None
        prefix = netns.ip_exec(space) if space else []
        if self._wrapped(role):
            from mesatee_notebook.enclave.cluster.node_bwrap import bwrap_prefix

            prefix += bwrap_prefix(self.data_dir / "platform")
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [*prefix, *_enclave(*args, "--host", host)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the launcher only; it stops the nodes in order
                preexec_fn=_pdeathsig,  # noqa: PLW1509 (the launcher runs no threads)
            )
        node = _Node(name, role, proc, log, host, space, bwrap=self._wrapped(role))
        if name in self.tpms:
            swtpm, answer = self.tpms[name]
            node.tpm = {"pid": swtpm.proc.pid, "tcti": swtpm.tcti, **answer}
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
        if self.spec.level == "tpm":
            self.start_tpms(names)
        sched = self.spawn(
            "sched",
            "scheduler",
            ["scheduler", "--data-dir", d, "-v", "--port", str(self.spec.port), *self.level_args("sched")],
        )
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
                    *self.level_args(name),
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
            [
                "serve",
                "--data-dir",
                str(head_dir),
                "--port",
                str(self.spec.head_port),
                "--cluster",
                sched.address,
                *self.level_args("head", head=True),
            ],
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
            "level": self.spec.level,
            "confinement": "bwrap" if self.spec.bwrap else None,
        }

    def teardown(self) -> None:
        """Stop the head, then the workers, then the scheduler (SIGTERM, then SIGKILL after a grace period)."""
        for group in ([n for n in self.nodes if n.role == r] for r in ("head", "worker", "scheduler")):
            for n in group:
                if n.proc.poll() is None:
                    n.terminate()
            deadline = time.monotonic() + 15
            for n in group:
                try:
                    n.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait()
        for swtpm, _ in self.tpms.values():  # after the nodes: each one flushed its objects as it stopped
            swtpm.stop()
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
        # not ready yet, but `cluster down` can already find (and stop) this launcher while it starts the nodes
        _write_state(data_dir, {"ready": False, "launcher_pid": os.getpid(), "data_dir": str(data_dir)})
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
