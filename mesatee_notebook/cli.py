"""Command lines: ``mesatee-enclave init-platform|serve|migrate|tpm-info|tpm-reseal|scheduler|worker``, ``mesatee``.

Why this module is over ~500 lines: the two command lines (``mesatee-enclave``, ``mesatee``): argparse trees and the
one-line error for each refusal; each command is a short function, and one file keeps every flag findable.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import signal
import socket
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

from mesatee_notebook.errors import KernelConnectionError, MesateeError, UntrustedPlatform

if TYPE_CHECKING:
    from mesatee_notebook.attestation.levels import Level
    from mesatee_notebook.enclave.kernel import KernelConfig

__all__ = ["client_main", "enclave_main", "main"]


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "mesatee_notebook" / "kernel"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (not the whole usage) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _Refused(Exception):
    """A command-line refusal: printed as one line, exit status 2."""


def _size(text: str) -> int:
    """``8g``, ``512m``, ``64k``, ``1t`` or a byte count (``0`` turns a limit off)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").rstrip("b")
    try:
        value = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        msg = f"{text!r} is not a size: give bytes, or a number with k, m, g or t (e.g. 512m, 8g)"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 0:
        msg = f"{text!r} is negative: a size is 0 (no limit) or more"
        raise argparse.ArgumentTypeError(msg)
    return value


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        msg = f"{text!r} is not a TCP port: give 0 to 65535 (0: any free port)"
        raise argparse.ArgumentTypeError(msg)
    return port


def _level_name(text: str) -> str:
    from mesatee_notebook.attestation.levels import Level

    try:
        Level.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _timeout(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        msg = f"{text!r} is not a number of seconds"
        raise argparse.ArgumentTypeError(msg) from None
    return None if value <= 0 else value


def _bind(kernel: Any, host: str, port: int) -> tuple[str, int]:
    """``kernel.bind()``, with the usual socket failures said in one sentence."""
    try:
        return cast("tuple[str, int]", kernel.bind())
    except socket.gaierror as exc:
        msg = f"cannot resolve --host {host!r} ({exc.strerror}); give an IP address, or a name this machine resolves"
        raise _Refused(msg) from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            msg = (
                f"port {port} on {host} is already in use (another kernel?); choose another with --port "
                "(0: any free port), or stop what holds it"
            )
        elif exc.errno == errno.EADDRNOTAVAIL:
            msg = f"--host {host} is not an address of this machine; give one of its addresses (e.g. 127.0.0.1)"
        elif exc.errno == errno.EACCES:
            msg = f"not allowed to listen on port {port} (ports below 1024 need privileges); choose another --port"
        else:
            msg = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        raise _Refused(msg) from None


def _enclave_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mesatee-enclave", description="Run a mesatee enclave kernel.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ip = sub.add_parser("init-platform", help="create the softtee platform key and sealing secret")
    ip.add_argument("--data-dir", type=Path, default=_default_data_dir())
    sp = sub.add_parser("serve", help="serve the attested channel")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=_port, default=7443)
    sp.add_argument(
        "--level",
        type=_level_name,
        default="softtee",
        help="unprotected | softtee | tpm | sgx | tdx | sev-snp (sev: tdx or sev-snp)",
    )
    sp.add_argument("--data-dir", type=Path, default=_default_data_dir())
    sp.add_argument("--idle-timeout", type=float, default=None, help="exit after this many idle seconds")
    sp.add_argument("--executor-memory", type=_size, default=None, help="alias of --cell-memory")
    sb = sp.add_argument_group("sandbox (every executor runs in one; see docs/sandbox.md)")
    sb.add_argument(
        "--no-sandbox",
        action="store_true",
        help="DANGEROUS: run cells with the kernel's uid and no isolation between parties",
    )
    sb.add_argument("--cell-memory", type=_size, default=8 << 30, help="memory per session's sandbox (0: off)")
    sb.add_argument("--service-memory", type=_size, default=16 << 30, help="memory per service worker (0: off)")
    sb.add_argument("--cell-cpu", type=float, default=4 * 3600.0, help="CPU seconds per cell (0: off)")
    sb.add_argument("--max-processes", type=int, default=256, help="processes and threads per sandbox")
    sb.add_argument("--max-file-size", type=_size, default=1 << 30, help="largest file a sandbox may write")
    sb.add_argument("--max-open-files", type=int, default=4096)
    sb.add_argument(
        "--untrusted-dir",
        type=Path,
        default=None,
        help="a host directory cells may reach with mesatee.untrusted_open (shared, host-visible)",
    )
    sb.add_argument("--tmp-size", type=_size, default=1 << 30, help="size of each sandbox's /tmp and /dev/shm")
    sp.add_argument("--max-payload", type=_size, default=16 << 30, help="largest accepted request payload")
    sp.add_argument("--max-cell-timeout", type=float, default=24 * 3600.0)
    _tpm_arguments(sp)
    sp.add_argument(
        "--hw-root",
        type=Path,
        default=None,
        help="TESTS ONLY (needs MESATEE_TEST_MIMIC_HARDWARE=1): serve --level sev|tdx|sev-snp|sgx from a mimic "
        "configfs-tsm or Gramine tree signed by a test chain; NOT hardware",
    )
    sp.add_argument(
        "--anonymous-max-payload",
        type=_size,
        default=64 << 20,
        help="largest request payload before a client proves a party identity",
    )
    sp.add_argument(
        "--anonymous-inflight-bytes",
        type=_size,
        default=256 << 20,
        help="request bytes all unauthenticated connections together may hold at once",
    )
    sp.add_argument(
        "--idle-connection-timeout",
        type=_timeout,
        default=300.0,
        help="close a connection that sends nothing for this many seconds (0: never); clients ping to stay open",
    )
    sp.add_argument(
        "--result-send-timeout",
        type=_timeout,
        default=30.0,
        help="close a connection whose client takes longer than this many seconds to read one 8 MiB chunk of a "
        "large result (0: never); a stalled reader would hold a service worker",
    )
    sp.add_argument(
        "--service-workers",
        type=int,
        default=None,
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
    mp = sub.add_parser(
        "migrate",
        help="re-seal, for measurement --to, the state the owners' grants approve (run it with the OLD version)",
    )
    mp.add_argument("--to", required=True, help="the measurement of the new version (64 hex digits)")
    mp.add_argument("--data-dir", type=Path, default=_default_data_dir())
    tp = sub.add_parser("tpm-info", help="print a TPM's attestation key fingerprint and PCRs (what clients pin)")
    _tpm_arguments(tp)
    rp = sub.add_parser(
        "tpm-reseal", help="seal the TPM-held sealing secret for the next version's measurement (run the OLD one)"
    )
    rp.add_argument("--for", dest="for_", required=True, help="the new version's measurement (64 hex digits)")
    rp.add_argument("--data-dir", type=Path, default=_default_data_dir())
    _tpm_arguments(rp)
    from mesatee_notebook.enclave.cluster.cli import add_node_parsers, add_serve_arguments

    add_node_parsers(sub, _default_data_dir())  # scheduler, worker, cluster (docs/cluster.md)
    add_serve_arguments(sp)
    return p


def _migrate(args: argparse.Namespace) -> int:
    """``mesatee-enclave migrate --to B``: this install (measurement A) moves what the grants for (A, B) approve."""
    import json
    import os

    from mesatee_notebook.attestation.measurement import expected_measurement
    from mesatee_notebook.enclave.audit import AuditLog
    from mesatee_notebook.enclave.migration import SealedState
    from mesatee_notebook.enclave.platform import load_platform
    from mesatee_notebook.enclave.sealing import SealedStore

    data_dir: Path = args.data_dir
    with contextlib.suppress(OSError, ValueError, KeyError):
        pid = int(json.loads((data_dir / "kernel.json").read_text())["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 0)
            print(f"mesatee-enclave migrate: a kernel (pid {pid}) serves {data_dir}; stop it first", file=sys.stderr)
            return 2
    platform = load_platform(data_dir)
    here = expected_measurement()
    target = str(args.to).strip().lower()
    state = SealedState(data_dir, platform.sealing_secret, here)
    state.versions.register(here)
    head = SealedStore(state.store_dir(here), platform.sealing_secret, here)
    with AuditLog(data_dir / "audit.log", platform.key, head_store=head) as audit:
        result = state.migrate(here, target, audit)
    moved = ", ".join(f"{u['kind']} {u['key']}" for u in result["migrated"]) or "nothing"
    print(f"re-sealed for {target}: {moved}")
    for held in result["held"]:
        why = held.get("reason") or "waiting for " + ", ".join(p[:16] + "…" for p in held["waiting_for"])
        print(f"  kept sealed for {here[:16]}…: {held['kind']} {held['key']} ({why})")
    print(
        "softtee: this version derived the new measurement's key from the platform sealing secret; on SGX it "
        "would hand the data to the new enclave over a locally attested channel instead (not built yet)."
    )
    return 0


def _pcr_list(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


def _tpm_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--tcti",
        default=None,
        help="TPM for --level tpm: device:/dev/tpmrm0 (a chip) or swtpm:host=127.0.0.1,port=2321 (software TPM)",
    )
    sp.add_argument("--tpm-app-pcr", type=int, default=23, help="resettable PCR the kernel measures into (23, or 16)")
    sp.add_argument("--tpm-boot-pcrs", type=_pcr_list, default=(0, 1, 2, 3, 4, 5, 6, 7), help="boot PCRs to quote")
    sp.add_argument(
        "--tpm-ek",
        choices=("auto", "rsa", "ecc"),
        default="auto",
        help="certified EK: RSA 2048 or ECC P-256 (TCG L-1/L-2)",
    )


def _tpm_info(args: argparse.Namespace) -> int:
    from mesatee_notebook.attestation.measurement import expected_measurement
    from mesatee_notebook.attestation.tpm import ak_fingerprint, app_pcr_value
    from mesatee_notebook.enclave.tpm import open_tpm

    # with_ek=False: the EK's certificate is read, but no EK object is loaded (a serving kernel may hold
    # two of swtpm's three object slots).
    with open_tpm(
        args.tcti, app_pcr=args.tpm_app_pcr, boot_pcrs=args.tpm_boot_pcrs, with_ek=False, ek=args.tpm_ek
    ) as tpm:
        pcrs = tpm.read_pcrs()
        kind = "software TPM" if tpm.kind == "software" else "says it is a chip"
        print(f"TPM 2.0 {tpm.vendor} ({kind}) at {args.tcti}")
        print(f"attestation key fingerprint (pin this as a platform root): {ak_fingerprint(tpm.ak_public)}")
        if tpm.ek_cert:
            from cryptography import x509

            issuer = x509.load_der_x509_certificate(tpm.ek_cert).issuer.rfc4514_string()
            print(
                f"{tpm.ek_kind.upper()} EK certificate issued by {issuer} (pin that CA's certificates as tpm_ek_roots)"
            )
        else:
            print("no EK certificate (RSA 2048 or ECC P-256) in NV: clients must pin the AK")
        print("boot PCRs (SHA-256; pin the ones you trust as tpm_pcrs in the client policy):")
        for i, v in sorted(pcrs.items()):
            if i != tpm.app_pcr:
                print(f"  {i:>2} = {v}")
        print(f"application PCR {tpm.app_pcr} after launch of this install: {app_pcr_value(expected_measurement())}")
        if tpm.kind == "software":
            print("a software TPM is SOFTWARE trust: whoever runs it holds its keys and can reset its PCRs.")
    return 0


def _init_platform(args: argparse.Namespace) -> int:
    from mesatee_notebook.enclave.platform import init_platform

    fp = init_platform(args.data_dir)
    print(f"softtee platform in {args.data_dir / 'platform'}")
    print(f"fingerprint (pin this in client policies): {fp}")
    print("softtee is SOFTWARE trust: whoever runs this host can read the kernel's memory.")
    return 0


def _reseal(args: argparse.Namespace) -> int:
    """``mesatee-enclave tpm-reseal --for B``: this install (measurement A) seals the TPM-held secret for B too."""
    from mesatee_notebook.attestation.measurement import expected_measurement
    from mesatee_notebook.enclave.tpm import open_tpm
    from mesatee_notebook.enclave.tpm_secret import reseal_for

    if _serving_pid(args.data_dir) is not None:
        print(f"mesatee-enclave tpm-reseal: a kernel serves {args.data_dir}; stop it first", file=sys.stderr)
        return 2
    with open_tpm(
        args.tcti, app_pcr=args.tpm_app_pcr, boot_pcrs=args.tpm_boot_pcrs, with_ek=False, ek=args.tpm_ek
    ) as tpm:
        path = reseal_for(tpm, args.data_dir, expected_measurement(), args.for_)
        print(f"sealing secret sealed in the TPM for measurement {args.for_} ({path})")
        print(f"  policy: PCRs {','.join(map(str, tpm.pcrs))} (boot PCRs as now, application PCR {tpm.app_pcr} "
              "as a launch of that version leaves it); start that version next")  # fmt: skip
        if tpm.kind == "software":
            print("  a software TPM is SOFTWARE trust: whoever runs it holds its state file and the seal.")
    return 0


def _serving_pid(data_dir: Path) -> int | None:
    import json
    import os

    with contextlib.suppress(OSError, ValueError, KeyError, ProcessLookupError):
        pid = int(json.loads((data_dir / "kernel.json").read_text())["pid"])
        os.kill(pid, 0)
        return pid
    return None


def _serve_level(text: str) -> Level:
    """The level to serve (sev, tdx, sev-snp, sgx: the kernel opens the device, or says what it did not find)."""
    from mesatee_notebook.attestation.levels import Level

    return Level.parse(text)


def _cluster_node(args: argparse.Namespace) -> int:
    from mesatee_notebook.enclave.cluster.cli import run_node_command

    return run_node_command(args)


def _serve_config(args: argparse.Namespace) -> tuple[Level, KernelConfig]:
    """The kernel's configuration from the ``serve`` flags (and the warnings they deserve)."""
    from dataclasses import replace

    from mesatee_notebook.attestation.levels import Level
    from mesatee_notebook.enclave.kernel import ANONYMOUS_LIMITS, KernelConfig
    from mesatee_notebook.enclave.quotas import LIMITS, Quota
    from mesatee_notebook.wire.framing import Limits

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    level = _serve_level(args.level)
    if level is Level.UNPROTECTED:
        print("WARNING: serving UNPROTECTED: no attestation; clients must opt in explicitly.", file=sys.stderr)
    if args.no_sandbox:
        print(
            "WARNING: SANDBOX OFF (--no-sandbox): cells run with this kernel's uid, can read its platform key "
            "and sealing secret, and can reach every other party's data. Clients that require a sandbox "
            "(the default above unprotected) refuse this kernel.",
            file=sys.stderr,
        )
    from mesatee_notebook.enclave.sandbox import SandboxLimits

    cell_memory = args.executor_memory if args.executor_memory is not None else args.cell_memory
    limits = SandboxLimits(
        cell_memory=cell_memory or None,
        service_memory=args.service_memory or None,
        cell_cpu=args.cell_cpu or None,
        processes=args.max_processes,
        file_size=args.max_file_size,
        open_files=args.max_open_files,
        tmp_size=args.tmp_size,
        shm_size=args.tmp_size,
    )
    cfg = KernelConfig(
        data_dir=args.data_dir,
        level=level,
        host=args.host,
        port=args.port,
        idle_timeout=args.idle_timeout,
        executor_memory=0 if not args.no_sandbox else (cell_memory or 0),
        sandbox=not args.no_sandbox,
        untrusted_dir=args.untrusted_dir,
        sandbox_limits=limits,
        limits=Limits(max_payload=args.max_payload),
        max_cell_timeout=args.max_cell_timeout,
        tcti=args.tcti,
        tpm_app_pcr=args.tpm_app_pcr,
        tpm_boot_pcrs=args.tpm_boot_pcrs,
        tpm_ek=args.tpm_ek,
        hw_tee=str(args.level).strip().lower(),
        hw_root=args.hw_root,
        anonymous_limits=replace(ANONYMOUS_LIMITS, max_payload=min(args.anonymous_max_payload, args.max_payload)),
        idle_connection_timeout=args.idle_connection_timeout,
        result_send_timeout=args.result_send_timeout,
        anonymous_inflight_bytes=args.anonymous_inflight_bytes,
        party_quota=Quota(**{limit: getattr(args, f"party_{limit}") for limit in LIMITS}),
        anonymous_quota=Quota(**{limit: getattr(args, f"anonymous_{limit}") for limit in LIMITS}),
    )
    if args.service_workers is not None:
        cfg.service_workers = max(0, args.service_workers)
    return level, cfg


def _serve(args: argparse.Namespace) -> int:
    """``mesatee-enclave serve``: build the kernel from the flags, bind, say what it is, serve."""
    from mesatee_notebook.enclave.kernel import Kernel

    level, cfg = _serve_config(args)
    kernel = Kernel(cfg)
    if args.cluster:
        from mesatee_notebook.enclave.cluster.head import attach_head

        mb = args.auto_partition_mb
        attach_head(
            kernel,
            args.cluster,
            args.cluster_platform_root,
            args.cluster_measurement,
            level=args.cluster_level,
            tcti=args.cluster_tcti,
            require_confinement=args.cluster_require_confinement,
            auto_partition_bytes=None if mb is None else int(mb * (1 << 20)),
        )
    # SIGTERM stops the kernel cleanly, like Ctrl-C: executors end and TPM objects are flushed
    # (swtpm without a resource manager would otherwise keep them).
    signal.signal(signal.SIGTERM, lambda signum, frame: kernel.stopping.set())
    host, port = _bind(kernel, args.host, args.port)
    print(f"mesatee-enclave serving {level.label} on mesatee://{host}:{port}", flush=True)
    print(f"  measurement {kernel.identity.measurement}", flush=True)
    print(f"  platform    {kernel.platform_fingerprint}", flush=True)
    if kernel.tpm is not None:
        from mesatee_notebook.attestation.tpm import ak_fingerprint

        tpm = kernel.tpm
        print(f"  TPM AK      {ak_fingerprint(tpm.ak_public)} (pin this as a platform root)", flush=True)
        print(f"  TPM         {tpm.vendor} ({tpm.kind}), application PCR {tpm.app_pcr}", flush=True)
        if tpm.kind == "software":
            print("  a software TPM is SOFTWARE trust: whoever runs swtpm holds its keys.", flush=True)
    if kernel.hw is not None:
        print(f"  hardware    {kernel.hw.description}", flush=True)
        if kernel.hw.mimic:
            print(f"WARNING: {kernel.hw.description}", file=sys.stderr, flush=True)
    mimic = kernel.hw is not None and kernel.hw.mimic
    print(
        f"  {'MIMIC: NOT a TEE and NOT hardware trust (a test chain signs)' if mimic else level.trust_note}", flush=True
    )
    if kernel.sandbox is not None:
        print(f"  sandbox     {kernel.sandbox.summary()}", flush=True)
    else:
        print("  sandbox     OFF (--no-sandbox): NO isolation between parties", flush=True)
    kernel.serve_forever()
    return 0


def enclave_main(argv: list[str] | None = None) -> int:
    """``mesatee-enclave``."""
    args = _enclave_parser().parse_args(argv)
    commands = {
        "init-platform": _init_platform,
        "migrate": _migrate,
        "tpm-info": _tpm_info,
        "tpm-reseal": _reseal,
        "scheduler": _cluster_node,
        "worker": _cluster_node,
        "cluster": _cluster_node,
        "serve": _serve,
    }
    try:
        return commands[args.cmd](args)
    except (MesateeError, _Refused) as exc:
        print(f"mesatee-enclave: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a --data-dir that cannot be created or read
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"mesatee-enclave: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _client_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mesatee", description="Attest mesatee kernels and verify receipts.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ap = sub.add_parser("attest", help="attest a kernel (URL) or verify standalone evidence (--evidence)")
    ap.add_argument("url", nargs="?", help="mesatee://HOST:PORT")
    ap.add_argument("--policy", type=Path, help="policy TOML file")
    ap.add_argument("--platform-root", action="append", default=[], help="pinned platform fingerprint/PEM (repeat)")
    ap.add_argument(
        "--measurement", action="append", type=_measurement, default=None, help="accepted measurement (repeat)"
    )
    ap.add_argument("--min-level", default=None)
    ap.add_argument("--allow-unprotected", action="store_true")
    ap.add_argument("--refuse-software-tpm", action="store_true", help="refuse swtpm and uncertified TPMs")
    ap.add_argument("--tpm-pcr", action="append", default=[], help="golden boot PCR INDEX=HEX (repeat)")
    ap.add_argument("--evidence", type=Path, help="a quote, SNP report or RA-TLS certificate file")
    ap.add_argument(
        "--cert-chain",
        type=Path,
        action="append",
        default=[],
        help="certificates for --evidence, PEM or DER (e.g. the VCEK, then the ASK/ARK chain); repeat per file",
    )
    ap.add_argument("--as-of", help="judge certificate validity at this date (YYYY-MM-DD)")
    ap.add_argument("--allow-debug", action="store_true", help="accept debug enclaves/guests (--evidence)")
    vp = sub.add_parser("verify-receipt", help="verify a receipt offline")
    vp.add_argument("receipt", type=Path)
    vp.add_argument("--policy", type=Path)
    vp.add_argument("--platform-root", action="append", default=[])
    vp.add_argument("--measurement", action="append", type=_measurement, default=None)
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
    if getattr(args, "refuse_software_tpm", False):
        pol = replace(pol, allow_software_tpm=False)
    if getattr(args, "tpm_pcr", None):
        golden = dict(pol.tpm_pcrs) | {int(i): v for i, _, v in (t.partition("=") for t in args.tpm_pcr)}
        pol = replace(pol, tpm_pcrs=tuple(sorted(golden.items())))
    return pol


def _attest_url(args: argparse.Namespace) -> int:
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
        for line in _sealed_state_lines(channel):
            print(f"  SEALED STATE: {line}")
    finally:
        channel.close()
    return 0


def _verify_receipt(args: argparse.Namespace) -> int:
    from mesatee_notebook.attestation.policy import Policy
    from mesatee_notebook.attestation.receipts import verify_receipt

    policy = _policy(args)
    assert isinstance(policy, Policy)
    v = verify_receipt(args.receipt, policy)
    p = v.predicate
    print(f"receipt OK: {p.get('kind')} in session {p.get('session')} at level {v.attestation.level_text}")
    print(f"  measurement {p.get('measurement')}")
    print(f"  nonce       {p.get('nonce')}")
    print(f"  code sha256 {p.get('code', {}).get('sha256')}")
    alg = v.receipt.digest_algorithm
    for name, digest in sorted(p.get("inputs", {}).items()):
        print(f"  input  {name:<20} {alg} {digest}")
    for name, digest in sorted(v.subjects.items()):
        print(f"  output {name:<20} {alg} {digest}")
    print(f"  {v.attestation.trust_note}")
    return 0


def client_main(argv: list[str] | None = None) -> int:
    """``mesatee``."""
    args = _client_parser().parse_args(argv)
    try:
        if args.cmd == "verify-receipt":
            return _verify_receipt(args)
        return _attest_evidence(args) if args.evidence is not None else _attest_url(args)
    except KernelConnectionError as exc:
        print(f"mesatee: {exc}", file=sys.stderr)
        return 2
    except MesateeError as exc:
        check = getattr(exc, "check", None)
        label = f" [{check}]" if check else ""
        print(
            f"REFUSED{label} ({type(exc).__name__}): {_in_cli_words(str(exc))}{_pin_hint(exc, args)}", file=sys.stderr
        )
        return 1
    except (OSError, ValueError) as exc:
        print(f"mesatee: {exc}", file=sys.stderr)
        return 2


# The Python API's words in a refusal, and the flags of this command line that mean the same
_CLI_WORDS = {
    "allow_unprotected=True": "--allow-unprotected",
    "allow_debug=True": "--allow-debug",
    "allow_software_tpm=False": "--refuse-software-tpm",
}


def _in_cli_words(text: str) -> str:
    for words, flag in _CLI_WORDS.items():
        text = text.replace(f"the policy sets {words}", f"{flag} is given").replace(words, flag)
    return text


def _pin_hint(exc: MesateeError, args: argparse.Namespace) -> str:
    """Without a pinned root the policy pins only this machine's embedded kernel: say how to pin another."""
    if not isinstance(exc, UntrustedPlatform) or getattr(args, "policy", None) or getattr(args, "platform_root", None):
        return ""
    found = str(exc.details.get("platform") or "FINGERPRINT")
    return (
        ". With no --platform-root or --policy, only this machine's own embedded kernel is pinned. If this kernel "
        f"is the one you mean (its operator sees the fingerprint when it starts), pin it: --platform-root {found}"
    )


def _measurement(text: str) -> str:
    value = text.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        msg = f"{text!r} is not a measurement: give 64 hex digits (SHA-256), as `mesatee attest` prints it"
        raise argparse.ArgumentTypeError(msg)
    return value


def _sealed_state_lines(channel: object) -> list[str]:
    """What the kernel reports about state sealed for other measurements (nothing from a kernel that predates it)."""
    from mesatee_notebook.remote.channel import Channel
    from mesatee_notebook.wire.messages import sealed_state_summary

    assert isinstance(channel, Channel)
    try:
        status = channel.request({"t": "migration", "op": "status"}).header.get("status")
    except MesateeError:
        return []
    return sealed_state_summary(status if isinstance(status, dict) else None)


def _attest_evidence(args: argparse.Namespace) -> int:
    try:
        from mesatee_notebook.attestation.hardware import verify_evidence_file
    except ImportError:
        print(
            "mesatee attest --evidence: hardware evidence verification is not available in this build", file=sys.stderr
        )
        return 2
    verdict = verify_evidence_file(
        args.evidence, cert_chain_path=args.cert_chain or None, as_of=args.as_of, allow_debug=args.allow_debug or None
    )
    print(_in_cli_words(verdict.render_text()))
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
