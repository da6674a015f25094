"""A cluster node's attested identity, and the cluster's admission policy.

Every node (scheduler, worker, and the head kernel as Dask's one client) holds a fresh P-256 TLS key in memory and
presents a certificate whose TCG DICE extension carries evidence over the *cluster node measurement*: the kernel's
manifest plus the code of the distributed engine (dask, distributed, tornado, cloudpickle, xgboost) and the node
confinement profile. At softtee the evidence is signed by the platform key (``attestation/evidence.make_evidence``);
at tpm it is the single-node tpm level's statement quoted by the node's own TPM (``attestation/tpm.make_tpm_evidence``;
the TPM is ``enclave/tpm.py``, see ``node_tpm.py``), and peers pin its AK. Either way a peer checks it with
``attestation.policy.verify_certificate``, then the stated confinement (``node_confinement.py``).

Why an issuer at all: the standard library's ``ssl`` has no certificate callback, and OpenSSL refuses a self-signed
client certificate, so mutual TLS needs a CA both sides load. The *handshake issuer* is derived from a public
constant; anyone can derive its key, so its signature vouches for nothing. Trust comes only from the evidence check
(:meth:`ClusterNode.admit`) that runs on both ends of every connection before the first Dask byte.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from cryptography.x509.oid import NameOID

from mesatee_notebook.attestation.evidence import TCG_TAGGED_EVIDENCE_OID, fingerprint, make_evidence, report_data_for
from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.attestation.measurement import build_manifest, measurement_of
from mesatee_notebook.attestation.policy import AttestationReport, Policy, verify_certificate
from mesatee_notebook.attestation.tpm import TPM_EVIDENCE_FORMAT, ak_fingerprint, make_tpm_evidence
from mesatee_notebook.enclave.cluster.node_confinement import check_confinement, peer_role
from mesatee_notebook.errors import AttestationError, LevelNotAvailableError, MalformedEvidence, NotAvailableYet

if TYPE_CHECKING:
    from mesatee_notebook.enclave.tpm import Tpm

__all__ = [
    "CLUSTER_COMPONENTS",
    "REFRESH_INTERVAL",
    "NODE_CONFINEMENT",
    "ClusterNode",
    "NodeIdentity",
    "PeerRecord",
    "cluster_manifest",
    "cluster_measurement",
    "cluster_policy",
]

log = logging.getLogger("mesatee.cluster")

#: The distributed engine's pure-Python code: it schedules, moves and (cloud)unpickles task data between nodes; and
#: every file of xgboost (its Python collective and tracker, which cluster GBDT runs on the workers, and its library).
CLUSTER_COMPONENTS: Final = ("dask", "distributed", "tornado", "cloudpickle", "xgboost")
#: What a node process applies to itself (enclave/cluster/node.py); measured, so a change is a new measurement.
NODE_CONFINEMENT: Final = {
    "format": 1,
    "bubblewrap": "per node: the profile its launcher put it in, stated in sandbox.cluster_node.profile (at tpm "
    "measured into PCR 16 before the node starts); none by default",
    "why": "a Dask node must open TCP connections; it runs no user code (tasks come only from the attested head)",
    "no_new_privs": True,
    "dumpable": False,
    "core_dumps": False,
    "landlock": "read anywhere, write only the node's private work directory; TCP allowed",
    "spill_to_disk": False,
    "http_routes": [],
    "plaintext_comms": False,
}
#: Evidence is re-issued this often (seconds); the cluster policy accepts evidence up to 24 h old.
REFRESH_INTERVAL: Final = 3600.0
_HANDSHAKE_SEED: Final = b"mesatee-notebook cluster handshake issuer v1: a PUBLIC key that vouches for nothing"
_HANDSHAKE_NAME: Final = "mesatee cluster handshake issuer (public; vouches for nothing)"


def _pure_component(name: str) -> dict[str, Any]:
    """Version and a digest over every file of a pure-Python package (path and SHA-256, sorted)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return {"name": name, "present": False}
    try:
        version: str | None = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = None
    h = hashlib.sha256()
    count = 0
    for location in spec.submodule_search_locations:
        base = Path(location)
        for path in sorted(base.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
                continue
            rel = path.relative_to(base.parent).as_posix()
            h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
            count += 1
    return {"name": name, "present": True, "version": version, "files": count, "sha256": h.hexdigest()}


@functools.cache
def _components() -> tuple[dict[str, Any], ...]:
    return tuple(_pure_component(n) for n in CLUSTER_COMPONENTS)


def cluster_manifest() -> dict[str, Any]:
    """The manifest every cluster node measures: the kernel's code and engines, plus the distributed engine.

    The executor sandbox profile is the unsandboxed one: a node does not start executors, and its own
    confinement is the ``cluster.confinement`` entry, not bubblewrap.
    """
    manifest = build_manifest(sandboxed=False)
    manifest["cluster"] = {"format": 1, "components": list(_components()), "confinement": NODE_CONFINEMENT}
    return manifest


def cluster_measurement() -> str:
    """The measurement a genuine cluster node built from this install presents."""
    return measurement_of(cluster_manifest())


def cluster_policy(
    platform_roots: tuple[str, ...], measurements: tuple[str, ...] | None = None, min_level: Level = Level.SOFTTEE
) -> Policy:
    """What every node accepts from its peers: ``min_level`` or better, pinned roots, the cluster measurement.

    A root is a softtee platform fingerprint or, at tpm, a TPM's attestation key fingerprint (pinned as the
    single-node tpm level pins it). ``require_sandbox=False`` because a node is not in the kernel's executor
    sandbox (docs/cluster.md says why); the confinement each node applies is in its measured manifest, and the
    bubblewrap profile a launcher put it in is checked by :func:`check_confinement`.
    """
    return Policy(
        measurements=measurements if measurements else (cluster_measurement(),),
        platform_roots=platform_roots,
        min_level=min_level,
        require_sandbox=False,
    )


@functools.cache
def _handshake_issuer() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    scalar = int.from_bytes(hashlib.sha256(_HANDSHAKE_SEED).digest(), "big")
    key = ec.derive_private_key(scalar, ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _HANDSHAKE_NAME)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2099, 12, 31, tzinfo=dt.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _node_certificate(key: ec.EllipticCurvePrivateKey, evidence: bytes, role: str, lifetime: float) -> x509.Certificate:
    issuer_key, issuer = _handshake_issuer()
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mesatee cluster {role}")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(seconds=lifetime))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(TCG_TAGGED_EVIDENCE_OID), evidence), critical=False
        )
        .sign(issuer_key, hashes.SHA256())
    )


@dataclass
class NodeIdentity:
    """One node's keys (memory only), evidence and certificate; :meth:`refresh` re-issues the evidence."""

    role: str
    level: Level
    manifest: dict[str, Any]
    platform_fingerprint: str
    tls_key: ec.EllipticCurvePrivateKey
    receipt_key: Ed25519PrivateKey
    certificate_der: bytes = b""
    _pem: bytes = field(default=b"", repr=False)
    platform_key: Ed25519PrivateKey | None = field(default=None, repr=False)
    confinement: dict[str, Any] = field(default_factory=dict)
    lifetime: float = 7 * 24 * 3600.0
    issued_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    tpm: Tpm | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        role: str,
        platform_key: Ed25519PrivateKey | None,
        *,
        level: Level = Level.SOFTTEE,
        manifest: dict[str, Any] | None = None,
        lifetime: float = 7 * 24 * 3600.0,
        confinement: dict[str, Any] | None = None,
        tpm: Tpm | None = None,
    ) -> NodeIdentity:
        """Fresh keys, evidence and the node certificate.

        softtee: evidence signed by ``platform_key``. tpm: ``tpm`` (the node's own TPM, ``node_tpm.open_node_tpm``)
        gets the cluster measurement in its application PCR, and every certificate carries its quote.
        """
        if level is Level.TPM and tpm is None:
            msg = "a cluster node at level tpm needs its TPM: give --tcti (swtpm:host=...,port=... or device:...)"
            raise LevelNotAvailableError(msg, level="tpm")
        if level not in (Level.SOFTTEE, Level.TPM):
            msg = f"cluster nodes at level {level.label} are not available yet; cluster nodes run at softtee or tpm"
            raise NotAvailableYet(msg)
        if level is Level.SOFTTEE and platform_key is None:
            msg = "a softtee cluster node needs the platform key to sign its evidence"
            raise NotAvailableYet(msg)
        ident = cls(
            role,
            level,
            manifest if manifest is not None else cluster_manifest(),
            "",
            ec.generate_private_key(ec.SECP256R1()),
            Ed25519PrivateKey.generate(),
            platform_key=platform_key if level is Level.SOFTTEE else None,
            confinement=dict(confinement or {}),
            lifetime=lifetime,
            tpm=tpm if level is Level.TPM else None,
        )
        if ident.tpm is not None:
            ident.platform_fingerprint = ak_fingerprint(ident.tpm.ak_public)
            ident.tpm.measured_launch(ident.measurement)  # the cluster measurement into the application PCR
        elif platform_key is not None:
            ident.platform_fingerprint = fingerprint(
                platform_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            )
        ident.refresh()
        return ident

    def _sandbox_report(self) -> dict[str, Any]:
        # The runtime report: not the kernel's bubblewrap sandbox (active False), and what the node did apply.
        return {"active": False, "why": "cluster node", "cluster_node": {"role": self.role, **self.confinement}}

    def _evidence(self) -> bytes:
        spki = self.tls_key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        receipt = self.receipt_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        now = int(time.time())
        if self.tpm is not None:  # the single-node tpm level's statement and quote (attestation/tpm.py)
            tpm = self.tpm
            statement = {
                "format": TPM_EVIDENCE_FORMAT,
                "level": Level.TPM.label,
                "measurement": self.measurement,
                "manifest": self.manifest,
                "time": now,
                "report_data": report_data_for(spki, receipt),
                "receipt_key": receipt.hex(),
                "audit_key": "",
                "sandbox": self._sandbox_report(),
                "tpm_kind": tpm.kind,
                "tpm_vendor": tpm.vendor,
                "app_pcr": tpm.app_pcr,
                "pcrs": {str(i): v for i, v in tpm.read_pcrs().items()},
                "event_log": tpm.event_log,
            }
            return make_tpm_evidence(
                statement=statement, quoter=tpm.quote, ak_public=tpm.ak_public, ek_cert=tpm.ek_cert
            )
        if self.platform_key is None:
            msg = "this identity has no platform key to re-sign its evidence with"
            raise NotAvailableYet(msg)
        return make_evidence(
            level=self.level,
            manifest=self.manifest,
            tls_spki_der=spki,
            receipt_key=receipt,
            time=now,
            platform_key=self.platform_key,
            sandbox=self._sandbox_report(),
        )

    def refresh(self) -> None:
        """Issue fresh evidence and certificate for the same keys, and load them into the live SSL contexts.

        Dask keeps the contexts it was given for the life of a listener, so they are updated in place; connections
        made from then on present the new certificate.
        """
        evidence = self._evidence()
        cert = _node_certificate(self.tls_key, evidence, self.role, self.lifetime)
        pem = cert.public_bytes(Encoding.PEM) + self.tls_key.private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )
        with self._lock:
            self.certificate_der, self._pem, self.issued_at = cert.public_bytes(Encoding.DER), pem, time.time()
            for name in ("server_context", "client_context"):
                ctx = self.__dict__.get(name)
                if isinstance(ctx, ssl.SSLContext):
                    self._load_chain(ctx)

    def close(self) -> None:
        """Close the node's TPM (flushes its AK: swtpm without a resource manager would keep it)."""
        if self.tpm is not None:
            self.tpm.close()

    def refresh_every(self, interval: float = REFRESH_INTERVAL) -> threading.Event:
        """Re-issue the evidence every ``interval`` seconds on a daemon thread; set the returned event to stop."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.refresh()
                except (OSError, ValueError, ssl.SSLError, LevelNotAvailableError) as exc:  # keep the old certificate
                    log.error("cluster %s: could not refresh the evidence: %s", self.role, exc)

        threading.Thread(target=loop, name=f"mesatee-cluster-refresh-{self.role}", daemon=True).start()
        return stop

    @property
    def measurement(self) -> str:
        return measurement_of(self.manifest)

    def _load_chain(self, ctx: ssl.SSLContext) -> None:
        # The key reaches OpenSSL through an anonymous memfd: never on disk, argv or environment.
        fd = os.memfd_create("mesatee-cluster-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, self._pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)

    def _context(self, purpose: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        # CERT_REQUIRED on both sides only makes OpenSSL ask for and hand over the peer's certificate; the public
        # handshake issuer proves nothing. ClusterNode.admit checks the evidence.
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=_handshake_issuer()[1].public_bytes(Encoding.PEM).decode())
        self._load_chain(ctx)
        return ctx

    @functools.cached_property
    def server_context(self) -> ssl.SSLContext:
        with self._lock:
            return self._context(ssl.PROTOCOL_TLS_SERVER)

    @functools.cached_property
    def client_context(self) -> ssl.SSLContext:
        with self._lock:
            return self._context(ssl.PROTOCOL_TLS_CLIENT)


@dataclass(frozen=True)
class PeerRecord:
    """A peer this node admitted: what its verified evidence says."""

    address: str
    role: str
    measurement: str
    platform: str
    level: str
    verified_at: float
    confinement: str = "none"
    tpm_kind: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "address": self.address,
            "role": self.role,
            "measurement": self.measurement,
            "platform": self.platform,
            "level": self.level,
            "verified_at": self.verified_at,
            "confinement": self.confinement,
        }
        if self.tpm_kind is not None:  # "software" for swtpm: a software TPM is software trust
            out["tpm_kind"] = self.tpm_kind
        return out


@dataclass
class ClusterNode:
    """A node: its identity, the cluster policy, and the peers it admitted or refused (for receipts and logs)."""

    identity: NodeIdentity
    policy: Policy
    #: A confinement profile name (``bwrap``) every scheduler and worker must show, or None (check_confinement).
    require_confinement: str | None = None
    peers: dict[str, PeerRecord] = field(default_factory=dict)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def admit(self, cert_der: bytes | None, address: str, direction: str) -> AttestationReport:
        """Verify a peer's certificate under the cluster policy; raise (and log) the failing check's error."""
        try:
            if not cert_der:
                msg = "the peer presented no certificate"
                raise MalformedEvidence(msg)
            report = verify_certificate(cert_der, self.policy)
            confinement = check_confinement(report, self.require_confinement)
        except AttestationError as exc:
            log.warning(
                "cluster %s: refused %s peer %s: %s: %s",
                self.identity.role,
                direction,
                address,
                type(exc).__name__,
                exc,
            )
            with self._lock:
                self.refusals.append(
                    {"address": address, "direction": direction, "error": type(exc).__name__, "message": str(exc)}
                )
                del self.refusals[:-100]
            raise
        role = peer_role(report)
        record = PeerRecord(
            address,
            role,
            report.measurement,
            report.platform,
            report.level.label,
            time.time(),
            confinement,
            report.tpm_kind,
        )
        with self._lock:
            self.peers[address] = record
        log.info(
            "cluster %s: admitted %s %s %s (%s…)", self.identity.role, direction, role, address, report.measurement[:16]
        )
        return report
