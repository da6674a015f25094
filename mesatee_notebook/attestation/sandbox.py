"""The sandbox profile: what every executor's sandbox is made of, as data both sides share (pure).

The profile is part of the measured manifest (``manifest["sandbox"]``), so a client that
recomputes :func:`~mesatee_notebook.attestation.measurement.expected_measurement` expects a
kernel that sandboxes its executors *this* way, and a kernel started with ``--no-sandbox``
reports a different measurement. The kernel builds its bubblewrap command line, its
seccomp filter (compiled by libseccomp) and its Landlock ruleset from these constants
(``enclave/sandbox.py``); the runtime details that depend on the host (the BPF digest,
the uid mode, the limits the operator chose) ride in the signed evidence statement
(``statement["sandbox"]``), not in the measurement.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = [
    "DENIED_CLONE_FLAGS",
    "DENIED_SYSCALLS",
    "ENOSYS_SYSCALLS",
    "NAMESPACES",
    "PROFILE_VERSION",
    "sandbox_profile",
    "unsandboxed_profile",
]

PROFILE_VERSION: Final = 1

#: Namespaces each sandbox gets of its own (bubblewrap ``--unshare-*``).
NAMESPACES: Final = ("mount", "pid", "net", "ipc", "uts", "cgroup", "user-or-uid")

#: Denied with EPERM by the seccomp filter: cross-process access, kernel attack surface,
#: anything that changes namespaces, mounts, keys or the running kernel.
DENIED_SYSCALLS: Final = (
    # reading or writing other processes
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "kcmp",
    # mounts and namespaces
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    # kernel attack surface
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "keyctl",
    "add_key",
    "request_key",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "open_by_handle_at",
    "name_to_handle_at",
    "iopl",
    "ioperm",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "quotactl",
    "syslog",
    "lookup_dcookie",
    "vhangup",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "personality",
)

#: Answered with ENOSYS, so the C library falls back to a call the filter can inspect
#: (``clone3`` passes its flags in memory, which seccomp cannot read).
ENOSYS_SYSCALLS: Final = ("clone3",)

#: ``clone`` is allowed (threads, fork) but not with a flag that makes a namespace.
DENIED_CLONE_FLAGS: Final = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
    "CLONE_NEWTIME": 0x00000080,
}

#: ioctl requests refused on any fd (terminal input injection).
DENIED_IOCTLS: Final = {"TIOCSTI": 0x5412, "TIOCLINUX": 0x541C}


def sandbox_profile() -> dict[str, Any]:
    """The measured description of the sandbox every executor runs in."""
    return {
        "enabled": True,
        "version": PROFILE_VERSION,
        "tool": "bubblewrap",
        "namespaces": list(NAMESPACES),
        "filesystem": "empty tmpfs root; Python environment and package read-only; private tmpfs /tmp and /dev/shm",
        "network": "none (own network namespace)",
        "privileges": "no capabilities, NO_NEW_PRIVS, own uid (root kernel) or own user namespace",
        "seccomp": {
            "default": "allow",
            "eperm": sorted(DENIED_SYSCALLS),
            "enosys": sorted(ENOSYS_SYSCALLS),
            "clone_flags": sorted(DENIED_CLONE_FLAGS),
            "ioctls": sorted(DENIED_IOCTLS),
        },
        "landlock": "filesystem writes only to /tmp and /dev/shm; no TCP; signals scoped (where the kernel has it)",
        "lifetime": "the sandbox's PID namespace ends with its executor; killed with the supervisor",
    }


def unsandboxed_profile() -> dict[str, Any]:
    """The measured description of a kernel started with ``--no-sandbox``."""
    return {"enabled": False, "version": PROFILE_VERSION, "why": "--no-sandbox: cells share the supervisor's uid"}
