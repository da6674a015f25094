"""Landlock, from inside a sandbox: limit this process (and its children) to the sandbox's own files.

Landlock is the kernel's unprivileged access-control LSM. There is no Landlock binding in
Debian or a maintained one on PyPI for Python 3.11, so this calls its stable syscall ABI
(``landlock_create_ruleset``, ``landlock_add_rule``, ``landlock_restrict_self``) through
ctypes, with the structures from ``<linux/landlock.h>``. It is a second wall behind the
mount namespace: even if a path were bound by mistake, the process can write only under
``/tmp`` and ``/dev/shm``, make no TCP connection or listener (ABI ≥ 4), and send signals
or connect to abstract Unix sockets only inside its own domain (ABI ≥ 6).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from dataclasses import dataclass

__all__ = ["LandlockResult", "abi_version", "restrict"]

_SYSCALLS = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

# filesystem access rights, by the ABI that introduced them
_FS_V1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


@dataclass(frozen=True)
class LandlockResult:
    """What was enforced (``abi`` 0 means the kernel has no Landlock, and nothing was)."""

    abi: int
    fs: bool
    net: bool
    scoped: bool

    def describe(self) -> str:
        if not self.abi:
            return "not available in this kernel"
        parts = ["filesystem"] + (["tcp"] if self.net else []) + (["signal+abstract-unix scope"] if self.scoped else [])
        return f"ABI {self.abi}: " + ", ".join(parts)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _numbers() -> tuple[int, int, int] | None:
    return _SYSCALLS.get(platform.machine())


def abi_version() -> int:
    """The Landlock ABI this kernel offers (0: none)."""
    nums = _numbers()
    if nums is None:
        return 0
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    v = libc.syscall(ctypes.c_long(nums[0]), None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return int(v) if v > 0 else 0


def restrict(
    writable: tuple[str, ...] = ("/tmp", "/dev/shm"),  # noqa: S108
    devices: str = "/dev",
    *,
    allow_tcp: bool = False,
) -> LandlockResult:
    """Restrict this process for good: read and execute anywhere it can see, write only to ``writable``.

    Needs ``NO_NEW_PRIVS`` (bubblewrap sets it). ``allow_tcp`` leaves TCP unrestricted (a cluster node must
    connect and listen). Returns what was enforced; raises OSError if the kernel offers Landlock but refuses
    the ruleset.
    """
    abi = abi_version()
    if abi == 0:
        return LandlockResult(0, fs=False, net=False, scoped=False)
    nums = _numbers()
    assert nums is not None
    create, add, restrict_self = nums
    fs = _FS_V1
    if abi >= 2:
        fs |= _FS_REFER
    if abi >= 3:
        fs |= _FS_TRUNCATE
    if abi >= 5:
        fs |= _FS_IOCTL_DEV
    net = (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 and not allow_tcp else 0
    scoped = (_SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL) if abi >= 6 else 0
    attr = _RulesetAttr(fs, net, scoped)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    rfd = libc.syscall(ctypes.c_long(create), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if rfd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_create_ruleset failed: {os.strerror(err)}")
    try:
        rules = [("/", _EXECUTE | _READ_FILE | _READ_DIR)]
        rules += [(path, fs) for path in writable]
        dev_access = _READ_FILE | _WRITE_FILE | (_FS_IOCTL_DEV if abi >= 5 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
        rules.append((devices, dev_access))
        for path, access in rules:
            try:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                rule = _PathBeneathAttr(access, pfd)
                if (
                    libc.syscall(
                        ctypes.c_long(add),
                        ctypes.c_int(rfd),
                        ctypes.c_int(_RULE_PATH_BENEATH),
                        ctypes.byref(rule),
                        ctypes.c_uint32(0),
                    )
                    != 0
                ):
                    err = ctypes.get_errno()
                    raise OSError(err, f"landlock_add_rule({path}) failed: {os.strerror(err)}")
            finally:
                os.close(pfd)
        if libc.syscall(ctypes.c_long(restrict_self), ctypes.c_int(rfd), ctypes.c_uint32(0)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_restrict_self failed: {os.strerror(err)}")
    finally:
        os.close(rfd)
    return LandlockResult(abi, fs=True, net=bool(net), scoped=bool(scoped))
