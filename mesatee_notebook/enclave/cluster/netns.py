"""Network namespaces for ``mesatee-enclave cluster up --netns``: one per node, joined by a bridge on a private /24.

Each node gets a namespace ``mtc<tag>-<node>`` with its loopback up and one veth end (``eth0``) addressed
``10.213.<net>.<10+i>/24``; the other end (``mtc<tag>v<i>``) is a port of the bridge ``mtc<tag>br`` in the launcher's
namespace, which holds ``10.213.<net>.1`` so that a notebook on the host reaches the head. ``<net>`` is chosen, and
the bridge given its address, under a host-wide lock (``/run/lock/mesatee-cluster-netns.lock``), so two launchers
starting at once never take the same /24. Dask traffic between two
nodes therefore leaves one namespace on a veth, crosses the bridge and enters the other: a real interface whose
counters (``/sys/class/net/mtc<tag>v<i>/statistics``) grow, unlike loopback.

``tag`` is derived from the cluster's data directory, so a launcher that was killed leaves names the next ``up`` (or
``down``) on the same directory finds and removes (:func:`remove`). Everything here runs ``ip`` (iproute2) and needs
root or CAP_NET_ADMIN.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mesatee_notebook.errors import ClusterSetupError

__all__ = ["NetNode", "NetPlan", "create", "node_names", "remove", "require_netns", "tag_for"]

_CAP_NET_ADMIN = 12
_PREFIX = "10.213"
_LOCK_NAME = "mesatee-cluster-netns.lock"


@dataclass(frozen=True)
class NetNode:
    """One node's namespace, its address, and the bridge port that carries its traffic."""

    name: str
    netns: str
    address: str
    host_veth: str


@dataclass(frozen=True)
class NetPlan:
    """The bridge, the subnet and the nodes of one cluster's namespaces."""

    tag: str
    bridge: str
    gateway: str
    subnet: str
    nodes: tuple[NetNode, ...]

    def node(self, name: str) -> NetNode:
        return next(n for n in self.nodes if n.name == name)


def tag_for(data_dir: Path) -> str:
    """Six hex digits naming this data directory's namespaces and links (interface names allow 15 characters)."""
    return hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:6]


def _has_net_admin() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def require_netns() -> str:
    """The path of ``ip``; raise :class:`ClusterSetupError` when this process cannot make namespaces."""
    if not _has_net_admin():
        msg = "--netns needs root (CAP_NET_ADMIN) to create network namespaces and veth links; run without --netns"
        raise ClusterSetupError(msg)
    ip = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if Path(p).exists()), None)
    if ip is None:
        msg = "--netns needs the `ip` command (Debian package iproute2)"
        raise ClusterSetupError(msg)
    return ip


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([require_netns(), *args], capture_output=True, text=True, check=False)
    if check and run.returncode != 0:
        msg = f"ip {' '.join(args)} failed: {run.stderr.strip() or run.stdout.strip()}"
        raise ClusterSetupError(msg)
    return run


def node_names(tag: str) -> list[str]:
    """The namespaces that exist now for this tag."""
    out = _ip("netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"mtc{tag}-")]


def _free_subnet(tag: str) -> int:
    """A third octet whose 10.213.X.0/24 no interface on this host uses yet (starting from the tag's own)."""
    used = _ip("-o", "-4", "addr", "show", check=False).stdout
    taken = set()
    for word in used.split():
        if "/" in word and word.startswith(_PREFIX + "."):
            taken.add(int(word.split(".")[2]))
    start = int(tag, 16) % 250
    for k in range(250):
        net = (start + k) % 250 + 1
        if net not in taken:
            return net
    msg = f"no free /24 left in {_PREFIX}.0.0/16 for the cluster's namespaces"
    raise ClusterSetupError(msg)


@contextlib.contextmanager
def _subnet_lock() -> Iterator[None]:
    """A host-wide lock around choosing a /24 and putting its gateway on the bridge.

    Without it two launchers at once could both see 10.213.X.0/24 free and both take it (check, then use). The
    chosen subnet is visible to the next launcher once the bridge holds its address, so that is when it is released.
    """
    base = Path("/run/lock") if Path("/run/lock").is_dir() else Path(tempfile.gettempdir())
    fd = os.open(base / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def create(tag: str, names: list[str]) -> NetPlan:
    """Create the bridge and one namespace per node name; on any failure remove what was made, then raise."""
    bridge = f"mtc{tag}br"
    try:
        with _subnet_lock():
            net = _free_subnet(tag)
            gateway = f"{_PREFIX}.{net}.1"
            _ip("link", "add", bridge, "type", "bridge")
            _ip("addr", "add", f"{gateway}/24", "dev", bridge)
    except ClusterSetupError:
        remove(tag)
        raise
    subnet = f"{_PREFIX}.{net}.0/24"
    nodes = tuple(
        NetNode(name, f"mtc{tag}-{name}", f"{_PREFIX}.{net}.{10 + i}", f"mtc{tag}v{i}") for i, name in enumerate(names)
    )
    plan = NetPlan(tag, bridge, gateway, subnet, nodes)
    try:
        _ip("link", "set", bridge, "up")
        for n in nodes:
            _ip("netns", "add", n.netns)
            _ip("-n", n.netns, "link", "set", "lo", "up")
            _ip("link", "add", n.host_veth, "type", "veth", "peer", "name", "eth0", "netns", n.netns)
            _ip("link", "set", n.host_veth, "master", bridge, "up")
            _ip("-n", n.netns, "addr", "add", f"{n.address}/24", "dev", "eth0")
            _ip("-n", n.netns, "link", "set", "eth0", "up")
    except ClusterSetupError:
        remove(tag)
        raise
    return plan


def _kill_inside(netns: str) -> None:
    """SIGKILL what still runs in a stale namespace (only processes in it: ours, by construction)."""
    pids = _ip("netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            continue


def remove(tag: str) -> list[str]:
    """Remove every namespace, veth and bridge of this tag (also a killed launcher's); return what was removed."""
    removed = []
    for netns in node_names(tag):
        _kill_inside(netns)
        if _ip("netns", "delete", netns, check=False).returncode == 0:
            removed.append(netns)
    links = _ip("-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        if name.startswith(f"mtc{tag}") and _ip("link", "delete", name, check=False).returncode == 0:
            removed.append(name)
    return removed


def ip_exec(netns: str) -> list[str]:
    """The command prefix that runs a program inside ``netns``."""
    return [require_netns(), "netns", "exec", netns]
