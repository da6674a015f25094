"""xgboost's federated communicator (gRPC, mutual TLS) with both ends pinned to attested evidence.

Cluster GBDT's collective traffic (sketches, histograms, the model's broadcast) goes through xgboost's federated
server, which the head runs in a child process of its own (:class:`FederatedServer`). Every byte is gRPC over TLS,
and both ends of every connection are pinned to keys verified by attestation, not chained to a CA:

- **The server** presents a self-signed certificate over the *head's own cluster TLS key*, with an IP
  subjectAltName for each address the workers dial. With the task, each worker gets the head's node certificate
  (the RA-TLS one, whose evidence binds that key), verifies its evidence under its own cluster policy (platform,
  cluster measurement, key binding), and checks that the server certificate is over the same key and names the
  address it dials. It then hands exactly that certificate to gRPC as its only root: gRPC accepts only a server
  holding that key, at that IP (gRPC checks an IP target against the IP SANs, never against the CN). A Python TLS
  handshake with the same pins runs first, so a wrong server is a fast typed :class:`AttestationError` instead of
  gRPC's endless ``wait_for_ready`` retry.
- **The clients.** Each worker presents a self-signed certificate over its own cluster TLS key
  (:func:`client_certificate`, made in the summary task). The head checks that its key is the key of the node
  certificate the worker presented on the head's own attested ``atls://`` connection to it (evidence verified by
  :meth:`ClusterNode.admit`). The server's client-root bundle is exactly those certificates: a worker not in this
  training cannot complete a TLS handshake with the server.

The evidence itself is not copied into these certificates: it is ~57 KB (the manifest), and gRPC's TLS refuses
certificates past a few KB; the key is what binds each certificate to its attested node.

Keys reach libxgboost as ``/proc/self/fd/N`` paths of anonymous memfds: never on disk, argv or environment.

**Faults.** xgboost 3.2's federated RPCs carry no deadline (``wait_for_ready`` and a server handler that waits for
every rank), so a lost worker would block its peers forever. The head therefore owns the server's lifetime: when a
worker leaves or time runs out it SIGKILLs the server process, which fails every peer's RPC in flight at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from cryptography.x509.oid import NameOID

from mesatee_notebook.attestation.ratls import load_certificate
from mesatee_notebook.errors import AttestationError, KeyBindingError, NotAvailableYet, RemoteExecutionError

if TYPE_CHECKING:
    from mesatee_notebook.attestation.policy import Policy
    from mesatee_notebook.enclave.cluster.node_identity import ClusterNode, NodeIdentity

__all__ = [
    "FederatedServer",
    "attested_key",
    "check_pinned",
    "client_certificate",
    "federated_available",
    "joined",
    "local_address_towards",
    "server_certificate",
]

#: Seconds the server process may take to start listening.
START_TIMEOUT = 60.0
#: Seconds a worker's pre-flight TLS handshake with the server may take.
PREFLIGHT_TIMEOUT = 15.0
_CERT_LIFETIME = dt.timedelta(hours=24)


def federated_available() -> NotAvailableYet | None:
    """None when the installed xgboost has the federated communicator; otherwise the error saying what to install."""
    import xgboost

    if xgboost.build_info().get("USE_FEDERATED"):
        return None
    msg = (
        "gbdt.train on a partitioned dataset needs xgboost built with its federated (gRPC + TLS) communicator; "
        f"the installed xgboost {xgboost.__version__} has none (build_info()['USE_FEDERATED'] is False: the "
        "xgboost-cpu wheel). Install the full wheel without NCCL: pip install --no-deps xgboost==3.2.0 "
        "(scripts/_venv.sh does; docs/cluster.md)"
    )
    return NotAvailableYet(msg)


# ---------------------------------------------------------------------------------------------
# Certificates over a node's own key, carrying its evidence


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _self_signed(identity: NodeIdentity, common_name: str, ips: list[str]) -> str:
    """A self-signed certificate over the node's cluster TLS key (PEM), naming ``ips``.

    Its subject names the key's fingerprint, and it carries key identifiers: a trust store finds an issuer by
    subject, so certificates of a bundle must not share one (OpenSSL would try the first and fail the others).
    """
    public = identity.tls_key.public_key()
    tag = hashlib.sha256(_spki(public)).hexdigest()[:32]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} {tag}")])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.tls_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
    )
    if ips:
        sans = [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(identity.tls_key, hashes.SHA256())
    return cert.public_bytes(Encoding.PEM).decode()


def server_certificate(identity: NodeIdentity, ips: list[str]) -> str:
    """The federated server's certificate: over the head's cluster key, an IP SAN per address workers dial."""
    return _self_signed(identity, "mesatee federated server", ips)


def client_certificate() -> str:
    """The calling worker's federated client certificate (a task: runs on the worker, returns PEM)."""
    return _self_signed(_worker_node().identity, "mesatee federated client", [])


def attested_key(cert_der: bytes, policy: Policy) -> bytes:
    """The key (DER SPKI) an RA-TLS node certificate's evidence binds, once verified under ``policy``."""
    from mesatee_notebook.attestation.policy import verify_certificate
    from mesatee_notebook.attestation.ratls import spki_der

    verify_certificate(cert_der, policy)
    return spki_der(load_certificate(cert_der))


def check_pinned(pem: str, spki: bytes, *, ip: str | None = None) -> None:
    """Raise unless the federated certificate ``pem`` is over the attested key ``spki`` (and names ``ip``)."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        msg = f"a federated certificate cannot be parsed: {exc}"
        raise AttestationError(msg) from None
    if cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) != spki:
        msg = "a federated certificate is not over the key of the node verified by attestation"
        raise KeyBindingError(msg)
    if ip is not None:
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            names = x509.SubjectAlternativeName([])
        if ipaddress.ip_address(ip) not in names.get_values_for_type(x509.IPAddress):
            msg = f"the federated server's certificate does not name {ip}"
            raise KeyBindingError(msg)


def peer_spki(node: ClusterNode, client: Any, address: str) -> bytes:
    """The key of the worker at ``address``, from a fresh attested connection the head opens itself."""
    from distributed.comm import connect

    from mesatee_notebook.enclave.cluster.comm import AttestedSecurity

    args = AttestedSecurity(node).get_connection_args("client")

    async def key_of() -> bytes:
        comm = await connect(address, timeout=10, **args)
        try:
            der = comm.stream.socket.getpeercert(binary_form=True)
        finally:
            await comm.close()
        return _spki(load_certificate(bytes(der)).public_key())  # type: ignore[arg-type]

    try:
        return bytes(client.sync(key_of))
    except OSError as exc:
        msg = f"cannot reach cluster worker {address} over atls:// ({exc})"
        raise RemoteExecutionError(msg) from None


def local_address_towards(host: str) -> str:
    """The local source address for packets to ``host`` (the routing table's answer; nothing is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return str(s.getsockname()[0])


# ---------------------------------------------------------------------------------------------
# The server: a child process of the head


class FederatedServer:
    """xgboost's federated server in a child process; :meth:`stop` SIGKILLs it (which fails every RPC in flight)."""

    def __init__(self, n_workers: int, key_pem: bytes, cert_pem: str, clients_pem: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesatee_notebook.enclave.cluster.gbdt_fed_server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = {"n_workers": n_workers, "key": key_pem.decode(), "cert": cert_pem, "clients": clients_pem}
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            line = self._first_line()
            self.port = int(json.loads(line)["port"])
        except (OSError, ValueError, KeyError) as exc:
            err = self._stderr()
            self.stop()
            msg = f"xgboost's federated server did not start ({type(exc).__name__}: {exc}) {err}".strip()
            raise RemoteExecutionError(msg) from None

    def _first_line(self) -> bytes:
        import selectors

        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(START_TIMEOUT):
                msg = f"no answer within {START_TIMEOUT:g} s"
                raise OSError(msg)
        line = self.proc.stdout.readline()
        if not line:
            msg = "it exited"
            raise OSError(msg)
        return line

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace").strip()[-500:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


# ---------------------------------------------------------------------------------------------
# The worker side


def _worker_node() -> ClusterNode:
    from distributed import get_worker

    node = getattr(get_worker().security, "node", None)
    if node is None:
        msg = "this Dask worker is not an attested mesatee cluster node"
        raise AttestationError(msg)
    return node  # type: ignore[no-any-return]


@contextlib.contextmanager
def _memfds(*blobs: bytes) -> Iterator[list[str]]:
    fds = []
    try:
        for blob in blobs:
            fd = os.memfd_create("mesatee-fed", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, blob)
        yield [f"/proc/self/fd/{fd}" for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)


def _preflight(host: str, port: int, paths: list[str]) -> None:
    """A TLS 1.3 handshake with the same pins gRPC will use: a fast typed error for a server that is not pinned."""
    server_cert, client_key, client_cert = paths
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(server_cert)
    ctx.load_cert_chain(client_cert, client_key)
    ctx.set_alpn_protocols(["h2"])
    deadline = time.monotonic() + PREFLIGHT_TIMEOUT
    while True:
        try:
            with (
                socket.create_connection((host, port), timeout=PREFLIGHT_TIMEOUT) as raw,
                ctx.wrap_socket(raw, server_hostname=host) as tls,
            ):
                # TLS 1.3: the server checks the client's certificate after the client's handshake ends; it then
                # sends HTTP/2 SETTINGS, or closes (or alerts) when the certificate is not in its bundle.
                if tls.recv(1):
                    return
            msg = f"the federated server at {host}:{port} refused this worker's certificate (not in its bundle)"
            raise AttestationError(msg)
        except ssl.SSLCertVerificationError as exc:
            msg = f"the federated server at {host}:{port} is not the pinned one: {exc.verify_message}"
            raise AttestationError(msg) from None
        except ssl.SSLError as exc:
            msg = f"the federated server at {host}:{port} refused this worker's certificate ({exc.reason})"
            raise AttestationError(msg) from None
        except OSError as exc:
            if time.monotonic() > deadline:
                msg = f"cannot reach the federated server at {host}:{port} ({exc})"
                raise RemoteExecutionError(msg) from None
            time.sleep(0.2)


@contextlib.contextmanager
def joined(fed: dict[str, Any], rank: int, node: ClusterNode | None = None) -> Iterator[None]:
    """Join the federated collective as ``rank``; checks the server's evidence and pin first.

    ``node``: this process's cluster node (default: the Dask worker running the task).
    """
    import xgboost as xgb

    node = node if node is not None else _worker_node()
    host, port = str(fed["host"]), int(fed["port"])
    check_pinned(str(fed["server_cert"]), attested_key(bytes(fed["head_cert"]), node.policy), ip=host)
    mine = str(fed["client_certs"][rank])
    key = node.identity.tls_key
    check_pinned(mine, _spki(key.public_key()))  # the head sent this rank's certificate: it must be over our key
    key_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with _memfds(str(fed["server_cert"]).encode(), key_pem, mine.encode()) as paths:
        _preflight(host, port, paths)
        args: dict[str, str | int] = {
            "dmlc_communicator": "federated",
            "federated_server_address": f"{host}:{port}",
            "federated_world_size": len(fed["client_certs"]),
            "federated_rank": rank,
            "federated_server_cert_path": paths[0],
            "federated_client_key_path": paths[1],
            "federated_client_cert_path": paths[2],
        }
        with xgb.collective.CommunicatorContext(**args):
            yield
