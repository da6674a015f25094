"""Command lines: ``mesatee-enclave init-platform|serve`` and ``mesatee attest|verify-receipt``."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from mesatee_notebook.errors import MesateeError

__all__ = ["client_main", "enclave_main", "main"]


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "mesatee_notebook" / "kernel"


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _timeout(text: str) -> float | None:
    value = float(text)
    return None if value <= 0 else value


def _enclave_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mesatee-enclave", description="Run a mesatee enclave kernel.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ip = sub.add_parser("init-platform", help="create the softtee platform key and sealing secret")
    ip.add_argument("--data-dir", type=Path, default=_default_data_dir())
    sp = sub.add_parser("serve", help="serve the attested channel")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=7443)
    sp.add_argument("--level", default="softtee", help="unprotected | softtee | tpm | sev | sgx")
    sp.add_argument("--data-dir", type=Path, default=_default_data_dir())
    sp.add_argument("--idle-timeout", type=float, default=None, help="exit after this many idle seconds")
    sp.add_argument("--executor-memory", type=_size, default=0, help="address-space limit per executor, e.g. 8G")
    sp.add_argument("--max-payload", type=_size, default=16 << 30, help="largest accepted request payload")
    sp.add_argument("--max-cell-timeout", type=float, default=24 * 3600.0)
    sp.add_argument(
        "--anonymous-max-payload", type=_size, default=64 << 20,
        help="largest request payload before a client proves a party identity",
    )
    sp.add_argument(
        "--anonymous-inflight-bytes", type=_size, default=256 << 20,
        help="request bytes all unauthenticated connections together may hold at once",
    )
    sp.add_argument(
        "--idle-connection-timeout", type=_timeout, default=300.0,
        help="close a connection that sends nothing for this many seconds (0: never); clients ping to stay open",
    )
    sp.add_argument(
        "--service-workers", type=int, default=None,
        help="service workers in the general pool, shared fairly by the parties (default: the core count, 2 to 8; "
        "0: every service in one serial worker, the old design, for comparison)",
    )
    from mesatee_notebook.enclave.quotas import ANONYMOUS_QUOTA, LIMITS, PARTY_QUOTA, flag

    for kind, quota in (("party", PARTY_QUOTA), ("anonymous", ANONYMOUS_QUOTA)):
        who = "per proven party" if kind == "party" else "for all anonymous clients together"
        for limit in LIMITS:
            default = getattr(quota, limit)
            sp.add_argument(
                flag(kind, limit),
                dest=f"{kind}_{limit}",
                type=_size if limit == "sealed_bytes" else int,
                default=default,
                help=f"quota: {limit.replace('_', ' ')} {who} (default {default})",
            )
    sp.add_argument("-v", "--verbose", action="store_true")
    return p


def enclave_main(argv: list[str] | None = None) -> int:
    """``mesatee-enclave``."""
    args = _enclave_parser().parse_args(argv)
    try:
        if args.cmd == "init-platform":
            from mesatee_notebook.enclave.platform import init_platform

            fp = init_platform(args.data_dir)
            print(f"softtee platform in {args.data_dir / 'platform'}")
            print(f"fingerprint (pin this in client policies): {fp}")
            print("softtee is SOFTWARE trust: whoever runs this host can read the kernel's memory.")
            return 0
        from dataclasses import replace

        from mesatee_notebook.attestation.levels import Level
        from mesatee_notebook.enclave.kernel import ANONYMOUS_LIMITS, Kernel, KernelConfig
        from mesatee_notebook.enclave.quotas import LIMITS, Quota
        from mesatee_notebook.wire.framing import Limits

        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
        )
        level = Level.parse(args.level)
        if level is Level.UNPROTECTED:
            print("WARNING: serving UNPROTECTED: no attestation; clients must opt in explicitly.", file=sys.stderr)
        cfg = KernelConfig(
            data_dir=args.data_dir,
            level=level,
            host=args.host,
            port=args.port,
            idle_timeout=args.idle_timeout,
            executor_memory=args.executor_memory,
            limits=Limits(max_payload=args.max_payload),
            max_cell_timeout=args.max_cell_timeout,
            anonymous_limits=replace(ANONYMOUS_LIMITS, max_payload=min(args.anonymous_max_payload, args.max_payload)),
            idle_connection_timeout=args.idle_connection_timeout,
            anonymous_inflight_bytes=args.anonymous_inflight_bytes,
            party_quota=Quota(**{limit: getattr(args, f"party_{limit}") for limit in LIMITS}),
            anonymous_quota=Quota(**{limit: getattr(args, f"anonymous_{limit}") for limit in LIMITS}),
        )
        if args.service_workers is not None:
            cfg.service_workers = max(0, args.service_workers)
        kernel = Kernel(cfg)
        host, port = kernel.bind()
        print(f"mesatee-enclave serving {level.label} on mesatee://{host}:{port}", flush=True)
        print(f"  measurement {kernel.identity.measurement}", flush=True)
        print(f"  platform    {kernel.platform_fingerprint}", flush=True)
        print(f"  {level.trust_note}", flush=True)
        kernel.serve_forever()
        return 0
    except MesateeError as exc:
        print(f"mesatee-enclave: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _client_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mesatee", description="Attest mesatee kernels and verify receipts.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ap = sub.add_parser("attest", help="attest a kernel (URL) or verify standalone evidence (--evidence)")
    ap.add_argument("url", nargs="?", help="mesatee://HOST:PORT")
    ap.add_argument("--policy", type=Path, help="policy TOML file")
    ap.add_argument("--platform-root", action="append", default=[], help="pinned platform fingerprint/PEM (repeat)")
    ap.add_argument("--measurement", action="append", default=None, help="accepted measurement (repeat)")
    ap.add_argument("--min-level", default=None)
    ap.add_argument("--allow-unprotected", action="store_true")
    ap.add_argument("--evidence", type=Path, help="a quote, SNP report or RA-TLS certificate file")
    ap.add_argument("--cert-chain", type=Path, help="PEM chain for --evidence (e.g. VCEK/ASK/ARK)")
    ap.add_argument("--as-of", help="judge certificate validity at this date (YYYY-MM-DD)")
    ap.add_argument("--allow-debug", action="store_true", help="accept debug enclaves/guests (--evidence)")
    vp = sub.add_parser("verify-receipt", help="verify a receipt offline")
    vp.add_argument("receipt", type=Path)
    vp.add_argument("--policy", type=Path)
    vp.add_argument("--platform-root", action="append", default=[])
    vp.add_argument("--measurement", action="append", default=None)
    return p


def _policy(args: argparse.Namespace) -> object:
    from mesatee_notebook.attestation.policy import Policy
    from mesatee_notebook.remote.session import default_policy

    if args.policy:
        pol = Policy.from_toml(args.policy)
    elif args.platform_root or args.measurement:
        pol = Policy(platform_roots=args.platform_root, measurements=args.measurement)
    else:
        pol = default_policy()
    from dataclasses import replace

    if args.platform_root and args.policy:
        pol = pol.with_roots(*args.platform_root)
    if getattr(args, "min_level", None):
        from mesatee_notebook.attestation.levels import Level

        pol = replace(pol, min_level=Level.parse(args.min_level))
    if getattr(args, "allow_unprotected", False):
        pol = replace(pol, allow_unprotected=True)
    return pol


def client_main(argv: list[str] | None = None) -> int:
    """``mesatee``."""
    args = _client_parser().parse_args(argv)
    try:
        if args.cmd == "attest":
            if args.evidence is not None:
                return _attest_evidence(args)
            if not args.url:
                print("mesatee attest: give a mesatee://HOST:PORT URL or --evidence FILE", file=sys.stderr)
                return 2
            from mesatee_notebook.attestation.policy import Policy, UnprotectedWarning
            from mesatee_notebook.remote.channel import open_channel

            policy = _policy(args)
            assert isinstance(policy, Policy)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UnprotectedWarning)
                channel = open_channel(args.url, policy)
            for w in caught:
                print(f"WARNING: {w.message}", file=sys.stderr)
            try:
                print(repr(channel.attestation))
                print(f"  kernel mesatee_notebook {channel.server_version}, protocol {channel.protocol}")
            finally:
                channel.close()
            return 0
        from mesatee_notebook.attestation.policy import Policy
        from mesatee_notebook.attestation.receipts import verify_receipt

        policy = _policy(args)
        assert isinstance(policy, Policy)
        v = verify_receipt(args.receipt, policy)
        p = v.predicate
        print(f"receipt OK: {p.get('kind')} in session {p.get('session')} at level {p.get('level')}")
        print(f"  measurement {p.get('measurement')}")
        print(f"  nonce       {p.get('nonce')}")
        print(f"  code sha256 {p.get('code', {}).get('sha256')}")
        for name, digest in sorted(p.get("inputs", {}).items()):
            print(f"  input  {name:<20} sha256 {digest}")
        for name, digest in sorted(v.subjects.items()):
            print(f"  output {name:<20} sha256 {digest}")
        print(f"  {v.attestation.trust_note}")
        return 0
    except MesateeError as exc:
        check = getattr(exc, "check", None)
        label = f" [{check}]" if check else ""
        print(f"REFUSED{label} ({type(exc).__name__}): {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"mesatee: {exc}", file=sys.stderr)
        return 2


def _attest_evidence(args: argparse.Namespace) -> int:
    try:
        from mesatee_notebook.attestation.hardware import verify_evidence_file
    except ImportError:
        print(
            "mesatee attest --evidence: hardware evidence verification is not available in this build", file=sys.stderr
        )
        return 2
    verdict = verify_evidence_file(
        args.evidence, cert_chain_path=args.cert_chain, as_of=args.as_of, allow_debug=args.allow_debug
    )
    print(verdict.render_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mesatee_notebook.cli enclave|client ...``."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "enclave":
        return enclave_main(args[1:])
    if args and args[0] == "client":
        return client_main(args[1:])
    return client_main(args)


if __name__ == "__main__":
    sys.exit(main())
