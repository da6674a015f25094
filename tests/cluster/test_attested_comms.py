"""Attested comms on a real loopback cluster: admitted peers, refused tampered/forged/unpinned ones, a task runs."""

from __future__ import annotations

import copy
import ssl
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from mesatee_notebook.attestation.ratls import evidence_from_certificate, load_certificate
from mesatee_notebook.enclave.cluster.node_identity import (
    ClusterNode,
    NodeIdentity,
    _node_certificate,
    cluster_manifest,
    cluster_measurement,
    cluster_policy,
)
from mesatee_notebook.enclave.platform import load_platform
from mesatee_notebook.errors import KeyBindingError, MeasurementMismatch, UntrustedPlatform

from .conftest import Cluster, init_platform, spawn_node, start_node, stop_node, try_connect, wait_for


def _node(
    cluster: Cluster, *, manifest: dict | None = None, platform_key: Ed25519PrivateKey | None = None
) -> ClusterNode:
    key = platform_key or load_platform(cluster.data_dir).key
    ident = NodeIdentity.create("head", key, manifest=manifest)
    return ClusterNode(ident, cluster_policy((cluster.fingerprint,), (cluster_measurement(),)))


def _peer_certificate(address: str) -> bytes:
    """The certificate a node presents, read over a raw TLS connection (no Dask)."""
    import socket

    host, port = address.removeprefix("atls://").rsplit(":", 1)
    ident = NodeIdentity.create("probe", Ed25519PrivateKey.generate())
    ctx = ident.client_context
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der
    return der


def test_nodes_admit_each_other_by_evidence(cluster: Cluster) -> None:
    expected = cluster_measurement()
    sched = cluster.scheduler.text()
    assert f"measurement {expected}" in sched
    assert sched.count("admitted incoming worker") >= 2
    for w in cluster.workers:
        text = w.text()
        assert f"measurement {expected}" in text
        assert f"admitted outgoing scheduler {cluster.url}" in text
    assert "refused" not in sched


def test_task_runs_on_attested_cluster(cluster: Cluster) -> None:
    from mesatee_notebook.enclave.cluster.head import ClusterHead

    head = ClusterHead(cluster.url, _node(cluster))
    try:
        info = head.probe()
    finally:
        head.close()
    assert info["scheduler"]["role"] == "scheduler"
    assert info["scheduler"]["measurement"] == cluster_measurement()
    workers = {w["address"]: w for w in info["workers"]}
    assert set(workers) == {w.address for w in cluster.workers}
    for w in cluster.workers:
        rec = workers[w.address]
        assert rec["role"] == "worker"
        assert rec["measurement"] == cluster_measurement()
        assert rec["platform"] == cluster.fingerprint
        assert rec["pid"] == w.proc.pid  # the task ran in that worker process


def test_tampered_measurement_refused_by_scheduler_and_workers(cluster: Cluster) -> None:
    manifest = copy.deepcopy(cluster_manifest())
    manifest["files"][0][1] = "0" * 64  # one measured file changed
    node = _node(cluster, manifest=manifest)
    assert node.identity.measurement != cluster_measurement()
    for target in (cluster.scheduler, cluster.workers[0]):
        with pytest.raises(OSError):  # the peer closes the stream before any Dask byte
            try_connect(node, target.address)
        wait_for(lambda t=target: "MeasurementMismatch" in t.text(), what=f"{target.role} logs the refusal")
        assert "refused incoming peer" in target.text()


def test_unpinned_platform_refused(cluster: Cluster) -> None:
    node = _node(cluster, platform_key=Ed25519PrivateKey.generate())
    with pytest.raises(OSError):
        try_connect(node, cluster.workers[1].address)
    wait_for(lambda: "UntrustedPlatform" in cluster.workers[1].text(), what="worker logs the refusal")


def test_forged_certificate_refused(cluster: Cluster) -> None:
    """Genuine evidence lifted from the scheduler, presented with another TLS key: the key binding fails."""
    genuine = _peer_certificate(cluster.url)
    evidence = evidence_from_certificate(load_certificate(genuine))
    key = ec.generate_private_key(ec.SECP256R1())
    forged = _node_certificate(key, evidence, "worker", 3600)
    forged_der = forged.public_bytes(Encoding.DER)
    checker = _node(cluster)
    with pytest.raises(KeyBindingError):
        checker.admit(forged_der, "test", "incoming")
    checker.admit(genuine, "test", "incoming")  # the genuine certificate passes the same checks
    honest = checker.identity
    pem = forged.public_bytes(Encoding.PEM) + key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fake = NodeIdentity(
        "worker", honest.level, honest.manifest, honest.platform_fingerprint, key, honest.receipt_key, forged_der, pem
    )
    node = ClusterNode(fake, checker.policy)
    with pytest.raises(OSError):
        try_connect(node, cluster.url)
    wait_for(lambda: "KeyBindingError" in cluster.scheduler.text(), what="scheduler logs the refusal")


@pytest.mark.slow
def test_head_refuses_scheduler_of_unpinned_platform(cluster: Cluster, tmp_path: Path) -> None:
    """A scheduler on another platform: the head (and a worker) refuse it with the typed error."""
    from mesatee_notebook.enclave.cluster.head import ClusterHead

    other_dir = tmp_path / "other"
    init_platform(other_dir)
    rogue = start_node("scheduler", other_dir, "--port", "0")
    try:
        t0 = time.monotonic()
        with pytest.raises(UntrustedPlatform):
            ClusterHead(rogue.address, _node(cluster), timeout=60)
        assert time.monotonic() - t0 < 30  # refused at once, not retried until the 60 s timeout (a loaded machine)
        worker = spawn_node("worker", cluster.data_dir, "--scheduler", rogue.address)
        try:
            assert worker.proc.wait(timeout=60) == 2
        finally:
            stop_node(worker)
        assert "refused: UntrustedPlatform" in worker.text()
    finally:
        stop_node(rogue)


def test_policy_refuses_other_measurement_offline(cluster: Cluster) -> None:
    """The same check without a network: a genuine certificate under a policy that pins another measurement."""
    node = ClusterNode(_node(cluster).identity, cluster_policy((cluster.fingerprint,), ("ab" * 32,)))
    with pytest.raises(MeasurementMismatch):
        node.admit(_peer_certificate(cluster.url), "test", "incoming")
    assert node.refusals[-1]["error"] == "MeasurementMismatch"


def test_plain_tls_client_gets_no_dask_bytes(cluster: Cluster) -> None:
    """A TLS client with an ordinary self-signed certificate fails the handshake: nothing is read."""
    import socket

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    host, port = cluster.url.removeprefix("atls://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"x")
                assert tls.recv(1) == b""
                raise OSError("closed")


def test_worker_to_worker_transfer_is_attested(cluster: Cluster) -> None:
    """Data on worker A needed by a task on worker B moves over an attested A<->B connection."""
    from mesatee_notebook.enclave.cluster.head import ClusterHead

    a, b = cluster.workers
    head = ClusterHead(cluster.url, _node(cluster))
    try:
        [data] = head.client.scatter([b"x" * 1000], workers=[a.address], broadcast=False)
        n = head.submit_to(b.address, len, data).result()
    finally:
        head.close()
    assert n == 1000
    wait_for(lambda: "admitted incoming worker" in a.text() and "admitted outgoing worker" in b.text(), what="A<->B")


def test_refresh_presents_new_evidence_on_live_contexts() -> None:
    """refresh() re-signs the evidence and the SSL context already handed to Dask serves the new certificate."""
    import socket
    import threading

    key = Ed25519PrivateKey.generate()
    server = NodeIdentity.create("worker", key)
    client = NodeIdentity.create("head", key)
    ctx = server.server_context
    old = server.certificate_der
    server.refresh()
    assert server.certificate_der != old
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def accept() -> None:
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            seen.append(tls.getpeercert(binary_form=True) or b"")
            tls.sendall(b"k")

    t = threading.Thread(target=accept)
    t.start()
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port)) as raw, client.client_context.wrap_socket(raw) as tls:
        assert tls.getpeercert(binary_form=True) == server.certificate_der
        assert tls.recv(1) == b"k"
    t.join(5)
    listener.close()
    assert seen == [client.certificate_der]
    node = ClusterNode(client, cluster_policy((server.platform_fingerprint,), (server.measurement,)))
    assert node.admit(server.certificate_der, "test", "incoming").measurement == server.measurement


def test_dask_http_server_serves_no_routes(cluster: Cluster) -> None:
    """Dask always starts an HTTP server; on a node it is on loopback with no routes (no dashboard, info, metrics)."""
    import re
    import urllib.error
    import urllib.request

    m = re.search(r"dashboard at:\s+http://([\d.]+):(\d+)", cluster.scheduler.text())
    assert m, "the scheduler logs its HTTP address"
    assert m.group(1) == "127.0.0.1"
    for path in ("/status", "/info/main/workers.html", "/metrics", "/health", "/json/identity.json"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{m.group(2)}{path}", timeout=5)
        err.value.close()
        assert err.value.code == 404


@pytest.mark.slow
def test_kill_9_of_a_worker_gives_a_typed_error_or_the_live_workers(cluster: Cluster) -> None:
    """A worker killed with SIGKILL during a probe: the head answers with the live workers or a typed error, never
    hangs and never reports the dead worker as having taken part."""
    import signal

    from mesatee_notebook.enclave.cluster.head import ClusterHead
    from mesatee_notebook.errors import RemoteExecutionError

    extra = start_node("worker", cluster.data_dir, "--scheduler", cluster.url, "--name", "doomed")
    head = ClusterHead(cluster.url, _node(cluster))
    try:
        wait_for(lambda: extra.address in head._workers(), what="the extra worker registered")
        extra.proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        try:
            info = head.probe(timeout=20)
        except RemoteExecutionError as exc:  # RemoteTimeout included
            assert "did not all answer" in str(exc) or "cannot reach" in str(exc) or "task failed" in str(exc)
        else:
            assert extra.address not in {w["address"] for w in info["workers"]}
        assert time.monotonic() - t0 < 60
        info = head.probe(timeout=30)  # the cluster goes on with the others
        assert {w["address"] for w in info["workers"]} == {w.address for w in cluster.workers}
    finally:
        head.close()
        stop_node(extra)
