"""The sandbox every executor runs in: bubblewrap namespaces, a libseccomp filter, Landlock, rlimits.

Nothing here is a hand-made sandbox. Each executor process (a session's cell executor, or
a service worker) starts as::

    bwrap --args FD  [setpriv --reuid=U ... --]  python -m mesatee_notebook.enclave.executor ...

* **bubblewrap** (Debian ``bubblewrap``) makes the mount, PID, network, IPC, UTS and cgroup
  namespaces: an empty tmpfs root, read-only binds of the system and of the Python
  environment and package, private size-limited tmpfs ``/tmp`` and ``/dev/shm``, a fresh
  ``/proc`` of the sandbox's own PID namespace, no network but loopback. Its PID 1 ends the
  namespace (every process in it) when the executor exits, and ``--die-with-parent`` ends
  it when the supervisor dies. Its arguments come through a memfd (``--args``), so no path
  of the host shows in ``/proc/1/cmdline``.
* **Its own uid.** A kernel run as root runs bubblewrap privileged and drops each sandbox
  to its own unprivileged uid from a range with ``setpriv`` (util-linux), with no
  capabilities. A kernel run as a normal user runs bubblewrap in a new user namespace
  (``--unshare-user --disable-userns``).
* **seccomp**, compiled by libseccomp (Debian ``python3-seccomp``) from the profile in
  :mod:`mesatee_notebook.attestation.sandbox`, loaded by bubblewrap before the executor's
  first instruction, with ``NO_NEW_PRIVS``.
* **Landlock** and **rlimits** are applied by the executor itself before it imports
  anything (``enclave/landlock.py``, :func:`confine`).
* The supervisor watches each sandbox's total memory and per-cell CPU time
  (:meth:`mesatee_notebook.enclave.sessions.ExecutorHandle.check_usage`).

See ``docs/sandbox.md`` for what each mechanism stops and what it does not.

Why this module is over ~500 lines: the executor sandbox: bubblewrap arguments, the seccomp profile, ``confine()``
and the self-test probe; one file so that every wall can be audited together.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import importlib.machinery
import importlib.util
import itertools
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mesatee_notebook.attestation.sandbox import (
    DENIED_CLONE_FLAGS,
    DENIED_IOCTLS,
    DENIED_SYSCALLS,
    ENOSYS_SYSCALLS,
    sandbox_profile,
)
from mesatee_notebook.errors import MesateeError, SandboxUnavailable

__all__ = ["Sandbox", "SandboxLimits", "confine", "host_support"]

log = logging.getLogger("mesatee.enclave")

_REQUIRED_BWRAP_OPTIONS = (
    "--args",
    "--unshare-pid",
    "--unshare-net",
    "--die-with-parent",
    "--new-session",
    "--seccomp",
    "--size",
    "--perms",
    "--disable-userns",
    "--remount-ro",
)
_DEBIAN_SECCOMP = "/usr/lib/python3/dist-packages/seccomp.cpython-{v}-{arch}-linux-gnu.so"
_SYSTEM_BINDS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/localtime")
_SYS_BINDS = ("/sys/devices/system/cpu",)
_UID_BASE = 1_800_000_000
_UID_COUNT = 65_536


@dataclass(frozen=True)
class SandboxLimits:
    """Per-sandbox limits (bytes, counts, seconds). ``None`` switches a limit off."""

    cell_memory: int | None = 8 << 30
    service_memory: int | None = 16 << 30
    processes: int = 256
    file_size: int = 1 << 30
    open_files: int = 4096
    cell_cpu: float | None = 4 * 3600.0
    tmp_size: int = 1 << 30
    shm_size: int = 1 << 30

    def memory_for(self, service: bool) -> int | None:
        return self.service_memory if service else self.cell_memory


def _load_seccomp() -> Any:
    """Libseccomp's Python binding: Debian's python3-seccomp (or any importable ``seccomp``)."""
    try:
        import seccomp  # type: ignore[import-not-found]

        return seccomp
    except ImportError:
        pass
    v = f"{sys.version_info.major}{sys.version_info.minor}"
    arch = os.uname().machine
    path = _DEBIAN_SECCOMP.format(v=v, arch=f"{arch}")
    if not Path(path).exists():
        return None
    loader = importlib.machinery.ExtensionFileLoader("seccomp", path)
    spec = importlib.util.spec_from_file_location("seccomp", path, loader=loader)
    if spec is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        loader.exec_module(module)
    except ImportError:
        return None
    return module


def compile_seccomp() -> tuple[bytes, list[str]]:
    """The BPF program for the profile, compiled by libseccomp; and the syscalls it names."""
    sc = _load_seccomp()
    if sc is None:
        msg = "libseccomp's Python binding is missing"
        raise SandboxUnavailable(msg, missing="seccomp")
    filt = sc.SyscallFilter(defaction=sc.ALLOW)
    applied: list[str] = []
    for name in DENIED_SYSCALLS:
        try:
            filt.add_rule(sc.ERRNO(errno.EPERM), name)
            applied.append(name)
        except (RuntimeError, ValueError, OSError):
            continue  # not a syscall on this architecture
    for name in ENOSYS_SYSCALLS:
        try:
            filt.add_rule(sc.ERRNO(errno.ENOSYS), name)
            applied.append(name)
        except (RuntimeError, ValueError, OSError):
            continue
    for flag in DENIED_CLONE_FLAGS.values():
        filt.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    for req in DENIED_IOCTLS.values():
        filt.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, req))
    applied += ["clone(namespace flags)", "ioctl(TIOCSTI, TIOCLINUX)"]
    r, w = os.pipe()
    try:
        with os.fdopen(w, "wb", closefd=True) as wf:
            # A pipe holds 64 KiB; the program is a few KiB, and a reader thread keeps this safe.
            out: list[bytes] = []
            reader = threading.Thread(target=lambda: out.append(_read_all(r)), daemon=True)
            reader.start()
            filt.export_bpf(wf)
        reader.join()
    finally:
        os.close(r)
    return out[0], applied


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _bwrap_help(bwrap: str) -> tuple[str, str]:
    res = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10, check=False)
    ver = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10, check=False)
    return res.stdout + res.stderr, (ver.stdout or ver.stderr).strip()


def host_support() -> dict[str, Any]:
    """What this host offers for sandboxing, and for each missing piece, how to get it."""
    from mesatee_notebook.enclave.landlock import abi_version

    found: dict[str, Any] = {"root": os.geteuid() == 0, "missing": []}
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        found["missing"].append("bubblewrap: install it (apt-get install bubblewrap)")
    else:
        help_text, version = _bwrap_help(bwrap)
        lacking = [o for o in _REQUIRED_BWRAP_OPTIONS if o not in help_text]
        if lacking:
            found["missing"].append(f"bubblewrap {version} lacks {', '.join(lacking)}: install bubblewrap >= 0.8")
        found["bwrap"] = bwrap
        found["bwrap_version"] = version
    if found["root"]:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            found["missing"].append("setpriv (util-linux) is needed to give each sandbox its own uid")
        found["setpriv"] = setpriv
    else:
        max_ns = _read_int("/proc/sys/user/max_user_namespaces")
        if max_ns == 0:
            found["missing"].append("user namespaces are off: sysctl -w user.max_user_namespaces=15000")
        if _read_int("/proc/sys/kernel/unprivileged_userns_clone") == 0:
            found["missing"].append(
                "unprivileged user namespaces are off: sysctl -w kernel.unprivileged_userns_clone=1"
            )
        if _read_int("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == 1:
            found["missing"].append(
                "AppArmor restricts unprivileged user namespaces: run the kernel as root, or allow bwrap with an "
                "AppArmor profile (sysctl kernel.apparmor_restrict_unprivileged_userns=0 disables the restriction)"
            )
    if _load_seccomp() is None:
        found["missing"].append("libseccomp's Python binding: install it (apt-get install python3-seccomp)")
    if "Seccomp:" not in Path("/proc/self/status").read_text():
        found["missing"].append("this kernel has no seccomp (CONFIG_SECCOMP_FILTER)")
    found["landlock_abi"] = abi_version()
    found["cgroup"] = _cgroup_note()
    return found


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def _cgroup_note() -> str:
    try:
        controllers = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    except OSError:
        return (
            "not used: no cgroup v2 hierarchy at /sys/fs/cgroup (v1 or hybrid host); "
            "rlimits and the supervisor's watch apply"
        )
    if "memory" in controllers and "pids" in controllers and os.access("/sys/fs/cgroup", os.W_OK):
        return (
            "not used yet: cgroup v2 is writable here, but this release bounds memory with rlimits "
            "and the supervisor's watch"
        )
    return "not used: cgroup v2 is not delegated to this kernel; rlimits and the supervisor's watch apply"


def _ancestors(path: str) -> list[str]:
    parts = Path(path).parts
    return [str(Path(*parts[:i])) for i in range(2, len(parts))]


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


_SPAWNER: concurrent.futures.ThreadPoolExecutor | None = None
_SPAWNER_LOCK = threading.Lock()


def _spawner() -> concurrent.futures.ThreadPoolExecutor:
    """One long-lived thread starts every sandbox: ``--die-with-parent`` follows the *thread* that forked."""
    global _SPAWNER
    with _SPAWNER_LOCK:
        if _SPAWNER is None:
            _SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesatee-spawn")
        return _SPAWNER


@dataclass
class Sandbox:
    """Builds and starts sandboxed executor processes; describes itself for the evidence."""

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    hidden: tuple[Path, ...] = ()
    untrusted_dir: Path | None = None
    uid_base: int = _UID_BASE
    uid_count: int = _UID_COUNT
    support: dict[str, Any] = field(default_factory=dict)
    bpf: bytes = b""
    seccomp_rules: list[str] = field(default_factory=list)
    binds: list[str] = field(default_factory=list)
    self_test: dict[str, Any] = field(default_factory=dict)
    _uids: itertools.cycle[int] | None = None
    _uid_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(
        cls,
        limits: SandboxLimits,
        *,
        hidden: Sequence[Path] = (),
        untrusted_dir: Path | None = None,
        run_self_test: bool = True,
    ) -> Sandbox:
        """Probe the host, compile the filter, check the binds; refuse (SandboxUnavailable) if anything lacks."""
        support = host_support()
        if support["missing"]:
            msg = (
                "this host cannot sandbox cells, so the kernel will not serve them at softtee. Missing: "
                + "; ".join(support["missing"])
                + ". To run without isolation between parties anyway, start the kernel with --no-sandbox "
                "(loud everywhere, and clients that require a sandbox refuse it)."
            )
            raise SandboxUnavailable(msg, missing=support["missing"])
        bpf, rules = compile_seccomp()
        sb = cls(
            limits=limits,
            hidden=tuple(Path(h).resolve() for h in hidden),
            support=support,
            bpf=bpf,
            seccomp_rules=rules,
            untrusted_dir=Path(untrusted_dir).resolve() if untrusted_dir else None,
        )
        if sb.untrusted_dir is not None:
            for h in sb.hidden:
                if _inside(str(h), str(sb.untrusted_dir)) or _inside(str(sb.untrusted_dir), str(h)):
                    msg = f"the untrusted directory {sb.untrusted_dir} must not overlap the data directory {h}"
                    raise SandboxUnavailable(msg, missing=["an untrusted directory apart from the data directory"])
        sb.binds = sb._binds()
        sb._uids = itertools.cycle(range(sb.uid_base, sb.uid_base + sb.uid_count))
        if run_self_test:
            sb.self_test = sb.run_self_test()
        return sb

    # -- what the sandbox sees -------------------------------------------------------------------
    def _binds(self) -> list[str]:
        import mesatee_notebook

        wanted: list[str] = []
        for p in _SYSTEM_BINDS + _ETC_FILES + _SYS_BINDS:
            if os.path.lexists(p):
                wanted.append(p)
        prefixes = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
        # What the sandboxed interpreter imports from: its prefixes, PYTHONPATH and the package itself. Not the
        # supervisor's working directory (``python -m`` puts it on sys.path; the sandbox runs in its own /tmp).
        pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.isabs(p)]
        py = prefixes + pythonpath
        py += [p for p in sys.path if p and os.path.isabs(p) and any(_inside(p, q) for q in prefixes)]
        py.append(str(Path(mesatee_notebook.__file__).resolve().parent))
        for p in py:
            if os.path.exists(p):
                wanted.append(os.path.abspath(p))
                real = os.path.realpath(p)
                if real != os.path.abspath(p):
                    wanted.append(real)
        out: list[str] = []
        for p in sorted(set(wanted), key=lambda s: (s.count("/"), s)):
            if any(_inside(p, q) and not os.path.islink(q) for q in out):
                continue
            out.append(p)
        for hidden in self.hidden:
            for p in out:
                if _inside(str(hidden), p) or _inside(p, str(hidden)):
                    msg = (
                        f"the kernel's data directory {hidden} lies inside {p}, which every sandbox must see "
                        "(read-only). Choose a data directory outside the Python environment and the package "
                        "(--data-dir)."
                    )
                    raise SandboxUnavailable(msg, missing=["a data directory outside the sandbox's view"])
        return out

    def _bind_args(self, paths: list[str], made: set[str]) -> list[str]:
        """Read-only binds (symlinks as symlinks), with the directories leading to them made first."""
        a: list[str] = []
        for p in paths:
            for anc in _ancestors(p):
                if anc not in made and not any(_inside(anc, b) for b in self.binds if b != anc):
                    a += ["--perms", "0755", "--dir", anc]
                    made.add(anc)
            if os.path.islink(p):
                a += ["--symlink", os.readlink(p), p]
            else:
                a += ["--ro-bind", p, p]
        return a

    def _args(self, service: bool, uid: int | None) -> list[str]:
        lim = self.limits
        a = [
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--new-session",
            "--tmpfs",
            "/",
        ]
        # bwrap mounts in order: what lies under /tmp or /dev/shm (a venv or checkout in /tmp) is bound after the
        # private tmpfs mounts there, or they would hide it.
        private = ("/tmp", "/dev/shm")
        under = [p for p in self.binds if any(_inside(p, t) and p != t for t in private)]
        made: set[str] = set()
        a += self._bind_args([p for p in self.binds if p not in under], made)
        a += ["--proc", "/proc", "--dev", "/dev"]
        a += ["--perms", "1777", "--size", str(lim.tmp_size), "--tmpfs", "/tmp"]
        # A service worker spools its (trusted) outputs there: give it room up to its memory limit.
        shm = max(lim.shm_size, lim.service_memory or 0) if service else lim.shm_size
        a += ["--perms", "1777", "--size", str(shm), "--tmpfs", "/dev/shm"]
        a += self._bind_args(under, {*made, *private})
        if self.untrusted_dir is not None and not service:
            for anc in _ancestors(str(self.untrusted_dir)):
                if not any(_inside(anc, b) for b in self.binds):
                    a += ["--perms", "0755", "--dir", anc]
            a += ["--bind", str(self.untrusted_dir), str(self.untrusted_dir)]
        a += ["--remount-ro", "/", "--chdir", "/tmp"]
        if uid is None:
            a += ["--unshare-user", "--disable-userns", "--uid", str(os.getuid()), "--gid", str(os.getgid())]
        else:
            a += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        return a

    def _next_uid(self) -> int | None:
        if not self.support.get("root"):
            return None
        assert self._uids is not None
        with self._uid_lock:
            busy = _uids_in_use()
            for _ in range(self.uid_count):
                uid = next(self._uids)
                if uid not in busy:
                    return uid
        msg = f"every sandbox uid in {self.uid_base}..{self.uid_base + self.uid_count - 1} is in use"
        raise SandboxUnavailable(msg, missing=["a free sandbox uid"])

    def command(self, argv: Sequence[str], *, service: bool) -> tuple[list[str], list[int], int | None]:
        """(command line, fds to pass, uid) for one sandboxed process running ``argv``."""
        uid = self._next_uid()
        args_fd = _memfd("mesatee-bwrap-args", b"\0".join(s.encode() for s in self._args(service, uid)) + b"\0")
        bpf_fd = _memfd("mesatee-seccomp", self.bpf)
        cmd = [str(self.support["bwrap"]), "--args", str(args_fd), "--seccomp", str(bpf_fd)]
        if uid is not None:
            cmd += [
                str(self.support["setpriv"]),
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--no-new-privs",
                "--",
            ]
        cmd += list(argv)
        return cmd, [args_fd, bpf_fd], uid

    def environment(self) -> dict[str, str]:
        """The executor's whole environment: nothing of the supervisor's is passed on."""
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp",
            "TMPDIR": "/tmp",
            "USER": "mesatee",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "MPLCONFIGDIR": "/tmp",
        }
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TVM_NUM_THREADS"):
            if key in os.environ:
                env[key] = os.environ[key]
        return env

    def spawn(
        self, argv: Sequence[str], *, pass_fds: Sequence[int], service: bool
    ) -> tuple[subprocess.Popen[bytes], int | None]:
        """Start ``argv`` in a fresh sandbox (from the one spawner thread)."""
        cmd, fds, uid = self.command(argv, service=service)

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                cmd, pass_fds=[*pass_fds, *fds], stdin=subprocess.DEVNULL, env=self.environment(), close_fds=True
            )

        try:
            proc = _spawner().submit(start).result()
        finally:
            for fd in fds:
                os.close(fd)
        return proc, uid

    def confinement(self, service: bool) -> dict[str, Any]:
        """What the executor applies to itself before its first import (passed on its command line)."""
        lim = self.limits
        shared = str(self.untrusted_dir) if self.untrusted_dir is not None and not service else None
        return {
            "memory": lim.memory_for(service),
            "processes": lim.processes,
            "file_size": lim.file_size,
            "open_files": lim.open_files,
            "landlock": True,
            "untrusted_dir": shared,
        }

    # -- evidence ---------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The runtime description that goes into the signed evidence (the profile is in the measurement)."""
        s = self.support
        mode = (
            (
                f"kernel runs as root: each sandbox gets its own unprivileged uid from {self.uid_base} "
                f"(setpriv), no capabilities"
            )
            if s.get("root")
            else (
                f"kernel runs as uid {os.getuid()}: each sandbox is its own user namespace with no capabilities "
                "outside it (the host sees the kernel's uid; run the kernel as root for a uid per sandbox)"
            )
        )
        from mesatee_notebook.enclave.landlock import LandlockResult

        ll = self.self_test.get("landlock") or LandlockResult(s.get("landlock_abi", 0), False, False, False).describe()
        return {
            "active": True,
            "profile_sha256": hashlib.sha256(json.dumps(sandbox_profile(), sort_keys=True).encode()).hexdigest(),
            "bubblewrap": s.get("bwrap_version"),
            "uid_mode": mode,
            "seccomp": {
                "bpf_sha256": hashlib.sha256(self.bpf).hexdigest(),
                "rules": len(self.seccomp_rules),
                "library": "libseccomp (python3-seccomp)",
            },
            "landlock": ll,
            "cgroup": s.get("cgroup"),
            "limits": asdict(self.limits),
            "untrusted_dir": "shared read-write with cells (host-visible)" if self.untrusted_dir else None,
            "self_test": sorted(k for k, v in self.self_test.get("checks", {}).items() if v),
        }

    def summary(self) -> str:
        """One line for the console: the mechanisms in force."""
        who = "own uid per sandbox" if self.support.get("root") else "user namespace per sandbox"
        ll = self.self_test.get("landlock") or "landlock off"
        return (
            f"bubblewrap ({who}), seccomp ({len(self.seccomp_rules)} rules), landlock {ll}, "
            f"memory {_gib(self.limits.cell_memory)} per session / {_gib(self.limits.service_memory)} per "
            f"service worker, {self.limits.processes} processes"
        )

    # -- the start-up self test -------------------------------------------------------------------
    def run_self_test(self) -> dict[str, Any]:
        """Start one sandbox running a probe; refuse to serve if any wall is missing."""
        import mesatee_notebook

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        package = str(Path(mesatee_notebook.__file__).resolve().parent)
        probe_in = {
            "hidden": [str(h) for h in self.hidden],
            "package": package,
            "port": listener.getsockname()[1],
            "supervisor_pid": os.getpid(),
            "supervisor_uid": os.getuid(),
            "confine": self.confinement(False),
        }
        parent, child = socket.socketpair()
        try:
            proc, uid = self.spawn(
                [sys.executable, "-m", "mesatee_notebook.enclave.sandbox", str(child.fileno())],
                pass_fds=[child.fileno()],
                service=False,
            )
            child.close()
            parent.sendall(json.dumps(probe_in).encode() + b"\n")
            parent.settimeout(60)
            data = _read_line(parent)
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            msg = f"the sandbox self-test could not run: {exc}"
            raise SandboxUnavailable(msg, missing=["a working bubblewrap sandbox"]) from exc
        finally:
            parent.close()
            listener.close()
        try:
            result = json.loads(data)
        except ValueError as exc:
            msg = (
                f"the sandbox self-test died before it reported (exit status {proc.returncode}); bubblewrap could "
                "not build the sandbox on this host: run the kernel with -v to see its message"
            )
            raise SandboxUnavailable(msg, missing=["a working bubblewrap sandbox"]) from exc
        checks: dict[str, bool] = result.get("checks", {})
        if uid is not None:
            checks["own uid"] = result.get("uid") == uid
        failed = sorted(k for k, v in checks.items() if not v)
        if failed:
            msg = "the sandbox self-test failed, so the kernel will not serve cells: " + "; ".join(
                f"{k} ({result.get('why', {}).get(k, 'failed')})" for k in failed
            )
            raise SandboxUnavailable(msg, missing=failed)
        log.info("sandbox self-test passed: %s", ", ".join(sorted(checks)))
        return dict(result)


def _read_line(sock: socket.socket) -> bytes:
    """Bytes up to and including the first newline (or what came before EOF)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    return data


def _gib(n: int | None) -> str:
    return "unlimited" if not n else f"{n / 2**30:g} GiB"


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _uids_in_use() -> set[int]:
    out = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                out.add(entry.stat().st_uid)
            except OSError:
                continue
    return out


# -- inside the sandbox -------------------------------------------------------------------------
def confine(settings: dict[str, Any], keep_fds: Sequence[int]) -> dict[str, Any]:
    """Run first in every sandboxed executor: close stray fds, set rlimits, enter Landlock."""
    keep = sorted({0, 1, 2, *keep_fds})
    low = 3
    for fd in keep:
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 16)
    applied: dict[str, Any] = {}

    def limit(res: int, value: int | None, name: str) -> None:
        if value:
            resource.setrlimit(res, (value, value))
            applied[name] = value

    mem = settings.get("memory")
    # Address space: the sandbox's memory plus room for the reservations allocators make.
    limit(resource.RLIMIT_AS, int(mem) + (4 << 30) if mem else None, "RLIMIT_AS")
    limit(resource.RLIMIT_NPROC, settings.get("processes"), "RLIMIT_NPROC")
    limit(resource.RLIMIT_FSIZE, settings.get("file_size"), "RLIMIT_FSIZE")
    limit(resource.RLIMIT_NOFILE, settings.get("open_files"), "RLIMIT_NOFILE")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead of killing
    from mesatee_notebook.enclave.shm import spool_in

    spool_in("/dev/shm")
    if settings.get("landlock"):
        from mesatee_notebook.enclave.landlock import restrict

        writable = ("/tmp", "/dev/shm") + ((settings["untrusted_dir"],) if settings.get("untrusted_dir") else ())
        applied["landlock"] = restrict(writable).describe()
    applied["untrusted_dir"] = settings.get("untrusted_dir")
    return applied


_Check = Callable[[str, bool, str], None]


def _probe(fd: int) -> None:
    """The self-test, run inside a fresh sandbox: every wall must hold."""
    sock = socket.socket(fileno=fd)
    data = _read_line(sock)
    if not data:
        return
    given = json.loads(data)
    checks: dict[str, bool] = {}
    why: dict[str, str] = {}
    result: dict[str, Any] = {"uid": os.getuid(), "pid": os.getpid(), "checks": checks, "why": why}

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks[name] = bool(ok)
        if not ok:
            why[name] = detail or "failed"

    _probe_process_walls(check, given)
    _probe_file_walls(check, given)
    try:
        with socket.create_connection(("127.0.0.1", int(given["port"])), timeout=2):
            reached = True
    except OSError:
        reached = False
    check("no network", not reached, "reached the supervisor's loopback listener")
    applied = confine(given["confine"], [fd])
    result["landlock"] = applied.get("landlock")
    try:
        Path("/tmp/.probe").write_bytes(b"ok")
        tmp_ok = True
    except OSError:
        tmp_ok = False
    check("private /tmp writable", tmp_ok, "")
    if given["supervisor_uid"] == 0:
        check("not root", os.getuid() != 0, f"uid {os.getuid()}")
    sock.sendall(json.dumps(result).encode() + b"\n")


def _probe_process_walls(check: _Check, given: dict[str, Any]) -> None:
    """seccomp, no_new_privs, capabilities, ptrace, unshare and the pid namespace."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    status = Path("/proc/self/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    check("seccomp filter", fields.get("Seccomp", "").strip() == "2", f"Seccomp: {fields.get('Seccomp')}")
    check("no new privileges", fields.get("NoNewPrivs", "").strip() == "1", "")
    caps = ("CapEff", "CapPrm", "CapBnd")
    check(
        "no capabilities",
        all(fields.get(k, "").strip() == "0" * 16 for k in caps),
        " ".join(f"{k}={fields.get(k, '').strip()}" for k in caps),
    )
    check(
        "ptrace denied",
        libc.ptrace(0, 0, None, None) == -1 and ctypes.get_errno() == errno.EPERM,
        f"errno {ctypes.get_errno()}",
    )
    clone_newuser = 0x10000000
    check(
        "unshare denied",
        libc.unshare(clone_newuser) == -1 and ctypes.get_errno() == errno.EPERM,
        f"errno {ctypes.get_errno()}",
    )
    check(
        "own pid namespace",
        given["supervisor_pid"] not in {int(p) for p in os.listdir("/proc") if p.isdigit()} and os.getpid() < 100,
        f"pid {os.getpid()}",
    )


def _probe_file_walls(check: _Check, given: dict[str, Any]) -> None:
    """The data directory is invisible and the package is read-only."""
    check("data directory invisible", not any(os.path.lexists(h) for h in given["hidden"]), "")
    pkg = Path(given["package"])
    writable = []
    for target in [pkg, *sorted(pkg.rglob("*.py"))]:
        try:
            if target.is_dir():
                (target / ".mesatee-probe").write_bytes(b"x")
            else:
                with target.open("ab"):
                    pass
            writable.append(str(target))
        except OSError:
            continue
    check("package read-only", not writable, f"writable: {', '.join(writable[:3])}")


if __name__ == "__main__":
    try:
        _probe(int(sys.argv[1]))
    except MesateeError:
        sys.exit(3)
