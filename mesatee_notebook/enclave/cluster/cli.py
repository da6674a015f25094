"""Command-line arguments of the cluster (no Dask import here: the ``cluster`` extra is optional)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_node_parsers", "add_serve_arguments", "run_node_command"]


def _common(p: argparse.ArgumentParser, data_dir: Path) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--data-dir", type=Path, default=data_dir, help="the softtee platform (shared by the cluster)")
    p.add_argument(
        "--level", default="softtee", help="softtee, or tpm with --tcti (sev, sgx: not available yet for nodes)"
    )
    p.add_argument("--tcti", default=None, help="at --level tpm: this node's TPM (swtpm:host=H,port=P: a SOFTWARE TPM)")
    p.add_argument(
        "--confinement",
        default=None,
        choices=("none", "bwrap"),
        help="the profile this node runs in, stated in its evidence (set by `cluster up --bwrap`; checked at start)",
    )
    p.add_argument(
        "--require-confinement",
        default=None,
        choices=("bwrap",),
        help="refuse a scheduler or worker peer that does not show this confinement profile",
    )
    p.add_argument(
        "--platform-root",
        action="append",
        default=[],
        help="pinned platform fingerprint of peers (repeat; default: this node's own platform)",
    )
    p.add_argument(
        "--measurement",
        action="append",
        default=[],
        help="accepted cluster measurement (repeat; default: this install's cluster measurement)",
    )
    p.add_argument("-v", "--verbose", action="store_true")


def add_node_parsers(sub: Any, data_dir: Path) -> None:
    """``scheduler`` and ``worker`` subcommands."""
    sp = sub.add_parser("scheduler", help="run an attested Dask scheduler on atls:// (cluster extra)")
    _common(sp, data_dir)
    sp.add_argument("--port", type=int, default=8786)
    wp = sub.add_parser("worker", help="run an attested Dask worker that joins --scheduler (cluster extra)")
    _common(wp, data_dir)
    wp.add_argument("--scheduler", required=True, help="atls://HOST:PORT of the scheduler")
    wp.add_argument("--port", type=int, default=0)
    wp.add_argument("--nthreads", type=int, default=1)
    wp.add_argument("--memory-limit", default="auto")
    wp.add_argument("--name", default=None)
    _cluster_parser(sub)


def _workers(text: str) -> int:
    from mesatee_notebook.enclave.cluster.local import MAX_WORKERS

    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_WORKERS:
        msg = f"{text!r} workers: give a whole number from 1 to {MAX_WORKERS}"
        raise argparse.ArgumentTypeError(msg)
    return n


def _cluster_parser(sub: Any) -> None:
    """``cluster up|down|status``: a scheduler, N workers and a head kernel on this host (docs/cluster.md)."""
    from mesatee_notebook.enclave.cluster.local import default_data_dir

    cp = sub.add_parser("cluster", help="start, stop or show a local cluster: scheduler, N workers, a head kernel")
    actions = cp.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="start it and serve until Ctrl-C/SIGTERM (--detach: in the background)")
    up.add_argument("--workers", type=_workers, default=2, help="attested workers to start (default 2)")
    up.add_argument("--netns", action="store_true", help="each node in its own network namespace (root only)")
    up.add_argument("--port", type=int, default=0, help="the scheduler's port (default 0: any free port)")
    up.add_argument("--head-port", type=int, default=0, help="the head kernel's port (default 0: any free port)")
    up.add_argument("--nthreads", type=int, default=1, help="threads per worker")
    up.add_argument(
        "--bwrap", action="store_true", help="scheduler and workers in bubblewrap: private /tmp, read-only system"
    )
    up.add_argument(
        "--level",
        default="softtee",
        choices=("softtee", "tpm"),
        help="tpm: one swtpm (a SOFTWARE TPM) per node, each node's certificate a quote (default softtee)",
    )
    up.add_argument("--detach", action="store_true", help="start in the background, print the state, return")
    for name in ("up", "down", "status"):
        p = up if name == "up" else actions.add_parser(name, help=f"{name} the cluster of --data-dir")
        p.add_argument(
            "--data-dir", type=Path, default=default_data_dir(), help="platform, head and logs (default %(default)s)"
        )


def _megabytes(text: str) -> float:
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not 0 <= mb < 1e9:  # also NaN and inf
        msg = f"expected a size in megabytes, at least 0 and under 1e9, not {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return mb


def add_serve_arguments(sp: argparse.ArgumentParser) -> None:
    """``serve --cluster URL``: the kernel becomes the cluster's head (its only Dask client)."""
    sp.add_argument("--cluster", default=None, help="atls://HOST:PORT of an attested scheduler (cluster extra)")
    sp.add_argument(
        "--cluster-platform-root",
        action="append",
        default=[],
        help="pinned platform of cluster nodes (repeat; default: this kernel's platform)",
    )
    sp.add_argument("--cluster-measurement", action="append", default=[], help="accepted node measurement (repeat)")
    sp.add_argument(
        "--auto-partition-mb",
        type=_megabytes,
        default=None,
        metavar="MB",
        help="partition a plain upload of at least MB megabytes (2^20 bytes) across the workers (default 1024; 0: off)",
    )
    sp.add_argument(
        "--cluster-level",
        default="softtee",
        help="the head's level on the cluster: softtee, or tpm with --cluster-tcti",
    )
    sp.add_argument("--cluster-tcti", default=None, help="the TPM the head's cluster identity quotes with (tpm)")
    sp.add_argument(
        "--cluster-require-confinement",
        default=None,
        choices=("bwrap",),
        help="refuse a scheduler or worker that does not show this confinement profile",
    )


def run_cluster_command(args: argparse.Namespace) -> int:
    """Run ``mesatee-enclave cluster up|down|status`` (a :class:`ClusterSetupError` is printed by the caller)."""
    from mesatee_notebook.enclave.cluster import local

    if args.action == "down":
        stopped = local.down(args.data_dir)
        print(f"mesatee-enclave cluster: {'stopped ' + ', '.join(stopped) if stopped else 'nothing was running'}")
        return 0
    if args.action == "status":
        running = local.status(args.data_dir)
        print(running if running else f"mesatee-enclave cluster: none running from {args.data_dir}")
        return 0 if running else 1
    if args.detach:
        kw = {"use_netns": args.netns, "port": args.port, "head_port": args.head_port, "nthreads": args.nthreads}
        print(local.up(args.workers, args.data_dir, **kw, bwrap=args.bwrap, level=args.level))
        return 0
    spec = local.ClusterSpec(
        args.data_dir, args.workers, args.netns, args.port, args.head_port, args.nthreads, args.bwrap, args.level
    )
    from mesatee_notebook.enclave.cluster.launcher import run_foreground

    return run_foreground(spec)


def run_node_command(args: argparse.Namespace) -> int:
    """Run ``mesatee-enclave scheduler|worker`` (and ``cluster``)."""
    if args.cmd == "cluster":
        return run_cluster_command(args)
    import logging

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from mesatee_notebook.attestation.levels import Level

    try:
        from mesatee_notebook.enclave.cluster.node import NodeOptions, run_node
    except ImportError as exc:
        print(f"mesatee-enclave {args.cmd}: needs the cluster extra (pip install 'mesatee_notebook[cluster]'): {exc}")
        return 2
    options = NodeOptions(
        role=args.cmd,
        data_dir=args.data_dir,
        level=Level.parse(args.level),
        host=args.host,
        port=args.port,
        scheduler=getattr(args, "scheduler", None),
        platform_roots=tuple(args.platform_root),
        measurements=tuple(m.lower() for m in args.measurement),
        nthreads=getattr(args, "nthreads", 1),
        memory_limit=getattr(args, "memory_limit", "auto"),
        name=getattr(args, "name", None),
        tcti=args.tcti,
        confinement=args.confinement,
        require_confinement=args.require_confinement,
    )
    return run_node(options)
