"""Command-line arguments of the cluster (no Dask import here: the ``cluster`` extra is optional)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_node_parsers", "add_serve_arguments", "run_node_command"]


def _common(p: argparse.ArgumentParser, data_dir: Path) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--data-dir", type=Path, default=data_dir, help="the softtee platform (shared by the cluster)")
    p.add_argument("--level", default="softtee", help="softtee (tpm, sev, sgx: not available yet for nodes)")
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


def run_node_command(args: argparse.Namespace) -> int:
    """Run ``mesatee-enclave scheduler|worker``."""
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
    )
    return run_node(options)
