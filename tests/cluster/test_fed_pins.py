"""The federated collective's pins: xgboost's real gRPC server (in its child process) and real TLS clients.

No Dask here: the nodes are in-process identities on one softtee platform, the server is ``FederatedServer`` (what
the head starts), and a worker joins with ``gbdt_fed.joined`` (what a training task runs). gRPC's own checks are
exercised by xgboost clients in subprocesses that skip the pre-flight handshake.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mesatee_notebook.enclave.cluster.node_identity import ClusterNode, NodeIdentity, cluster_policy
from mesatee_notebook.enclave.platform import load_platform
from mesatee_notebook.errors import AttestationError, KeyBindingError, UntrustedPlatform

from .conftest import init_platform

xgboost = pytest.importorskip("xgboost")
pytestmark = [
    pytest.mark.skipif(not xgboost.build_info().get("USE_FEDERATED"), reason="this xgboost has no federated plugin"),
    pytest.mark.timeout(300),
]


@dataclass
class Nodes:
    head: ClusterNode
    w1: ClusterNode
    w2: ClusterNode
    policy: object


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Nodes:
    data_dir = tmp_path_factory.mktemp("fedpins")
    fp = init_platform(data_dir)
    key = load_platform(data_dir).key
    policy = cluster_policy((fp,))

    def node(role: str) -> ClusterNode:
        return ClusterNode(NodeIdentity.create(role, key), policy)

    return Nodes(node("head"), node("worker"), node("worker"), policy)


def _key_pem(node: ClusterNode) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    return node.identity.tls_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


@pytest.fixture(scope="module")
def server(nodes: Nodes) -> Iterator[dict]:
    """One server for a world of one: the head's pinned certificate, a bundle of exactly w1's certificate."""
    from mesatee_notebook.enclave.cluster.gbdt_fed import FederatedServer, _self_signed, server_certificate

    cert = server_certificate(nodes.head.identity, ["127.0.0.1"])
    w1 = _self_signed(nodes.w1.identity, "w1", [])
    srv = FederatedServer(1, _key_pem(nodes.head), cert, w1)
    try:
        fed = {"host": "127.0.0.1", "port": srv.port, "server_cert": cert, "client_certs": [w1]}
        yield {"srv": srv, "fed": {**fed, "head_cert": nodes.head.identity.certificate_der}}
    finally:
        srv.stop()


def _train_one(fed: dict, node: ClusterNode) -> int:
    from mesatee_notebook.enclave.cluster.gbdt_fed import joined

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 3))
    y = (X[:, 0] > 0).astype(float)
    with joined(fed, 0, node):
        booster = xgboost.train({"max_depth": 2, "nthread": 1}, xgboost.DMatrix(X, label=y), num_boost_round=3)
    return booster.num_boosted_rounds()


def test_a_pinned_worker_trains_through_the_pinned_server(nodes: Nodes, server: dict) -> None:
    assert _train_one(server["fed"], nodes.w1) == 3


def test_a_worker_not_in_the_bundle_is_refused_by_the_server(nodes: Nodes, server: dict) -> None:
    from mesatee_notebook.enclave.cluster.gbdt_fed import _self_signed

    # w2 is a genuine node of the same cluster, but not one the head attested for this training.
    fed = {**server["fed"], "client_certs": [_self_signed(nodes.w2.identity, "w2", [])]}
    with pytest.raises(AttestationError, match="refused this worker's certificate"):
        _train_one(fed, nodes.w2)


def test_a_server_that_is_not_the_pinned_one_is_refused(nodes: Nodes, server: dict) -> None:
    from mesatee_notebook.enclave.cluster.gbdt_fed import server_certificate

    fed = server["fed"]
    # A server certificate over another genuine node's key, naming the right IP: not the attested head's key.
    other = server_certificate(nodes.w2.identity, ["127.0.0.1"])
    with pytest.raises(KeyBindingError, match="not over the key"):
        _train_one({**fed, "server_cert": other}, nodes.w1)
    # Pinned to another node (its attested certificate and a server certificate over its key): the server that
    # answers at that address holds the head's key, so the TLS handshake refuses it.
    with pytest.raises(AttestationError, match="not the pinned one"):
        _train_one({**fed, "server_cert": other, "head_cert": nodes.w2.identity.certificate_der}, nodes.w1)
    # The head's own key, but naming another address than the one dialled.
    wrong_ip = server_certificate(nodes.head.identity, ["127.0.0.2"])
    with pytest.raises(KeyBindingError, match=r"does not name 127\.0\.0\.1"):
        _train_one({**fed, "server_cert": wrong_ip}, nodes.w1)


def test_pins_come_from_verified_evidence(nodes: Nodes, tmp_path: Path) -> None:
    from mesatee_notebook.enclave.cluster.gbdt_fed import _self_signed, _spki, attested_key, check_pinned

    head_key = attested_key(nodes.head.identity.certificate_der, nodes.policy)
    assert head_key == _spki(nodes.head.identity.tls_key.public_key())
    w1 = _self_signed(nodes.w1.identity, "w1", [])
    check_pinned(w1, _spki(nodes.w1.identity.tls_key.public_key()))
    # The head pins each worker's certificate to the key it saw on its own attested connection to that worker.
    with pytest.raises(KeyBindingError, match="not over the key"):
        check_pinned(w1, _spki(nodes.w2.identity.tls_key.public_key()))
    # A node of another platform: its evidence does not verify under this cluster's policy, so nothing is pinned.
    init_platform(tmp_path)
    stranger = NodeIdentity.create("head", load_platform(tmp_path).key)
    with pytest.raises(UntrustedPlatform):
        attested_key(stranger.certificate_der, nodes.policy)


_GRPC_CLIENT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import xgboost as xgb
    from mesatee_notebook.enclave.cluster.gbdt_fed import _memfds
    fed = json.loads(sys.stdin.read())
    with _memfds(fed["server_cert"].encode(), fed["key"].encode(), fed["cert"].encode()) as paths:
        args = dict(dmlc_communicator="federated", federated_server_address=f"127.0.0.1:{fed['port']}",
                    federated_world_size=1, federated_rank=0, federated_server_cert_path=paths[0],
                    federated_client_key_path=paths[1], federated_client_cert_path=paths[2])
        X = np.arange(40.0).reshape(20, 2)
        with xgb.collective.CommunicatorContext(**args):
            xgb.train({"nthread": 1}, xgb.DMatrix(X, label=X[:, 0] > 9), num_boost_round=2)
    print("trained")
    """
)


def _grpc_client(fed: dict) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _GRPC_CLIENT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(fed))
    proc.stdin.close()
    return proc


@pytest.mark.slow
def test_grpc_itself_enforces_both_pins(nodes: Nodes, server: dict, tmp_path: Path) -> None:
    """Without the pre-flight handshake, gRPC's own TLS refuses (and so never trains) with a wrong pin."""
    from mesatee_notebook.enclave.cluster.gbdt_fed import _self_signed, server_certificate

    fed = server["fed"]
    base = {"port": fed["port"], "server_cert": fed["server_cert"]}
    w1 = {"key": _key_pem(nodes.w1).decode(), "cert": fed["client_certs"][0]}
    w2 = {"key": _key_pem(nodes.w2).decode(), "cert": _self_signed(nodes.w2.identity, "w2", [])}
    cases = {
        "pinned": _grpc_client({**base, **w1}),
        "client not in the bundle": _grpc_client({**base, **w2}),
        "server cert of another key": _grpc_client(
            {**base, **w1, "server_cert": server_certificate(nodes.w2.identity, ["127.0.0.1"])}
        ),
        "server cert naming another IP": _grpc_client(
            {**base, **w1, "server_cert": server_certificate(nodes.head.identity, ["127.0.0.2"])}
        ),
    }
    try:
        pinned = cases["pinned"]
        assert pinned.wait(timeout=120) == 0
        assert pinned.stdout is not None and "trained" in pinned.stdout.read()
        # gRPC retries a failed handshake forever (wait_for_ready): refused means never trained.
        for what, proc in cases.items():
            if what != "pinned":
                with pytest.raises(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
    finally:
        for proc in cases.values():
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def test_every_certificate_of_a_bundle_is_accepted(nodes: Nodes) -> None:
    """Regression: certificates sharing a subject made the trust store try only the first one of the bundle."""
    from mesatee_notebook.enclave.cluster.gbdt_fed import FederatedServer, _self_signed, server_certificate

    cert = server_certificate(nodes.head.identity, ["127.0.0.1"])
    w1, w2 = (_self_signed(n.identity, "mesatee federated client", []) for n in (nodes.w1, nodes.w2))
    srv = FederatedServer(1, _key_pem(nodes.head), cert, w2 + w1)  # w1 second
    try:
        fed = {"host": "127.0.0.1", "port": srv.port, "server_cert": cert, "client_certs": [w1]}
        assert _train_one({**fed, "head_cert": nodes.head.identity.certificate_der}, nodes.w1) == 3
    finally:
        srv.stop()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2's ip")
def test_the_server_starts_in_a_namespace_without_a_route_and_exits_when_the_head_closes(
    nodes: Nodes, tmp_path: Path
) -> None:
    """Regressions: xgboost's worker_args() fails with no default route (cluster up --netns), and a server whose
    tracker is freed at exit waits for its handlers instead of exiting."""
    from mesatee_notebook.enclave.cluster.gbdt_fed import _self_signed, server_certificate

    request = {
        "n_workers": 1,
        "key": _key_pem(nodes.head).decode(),
        "cert": server_certificate(nodes.head.identity, ["127.0.0.1"]),
        "clients": _self_signed(nodes.w1.identity, "w1", []),
    }
    (tmp_path / "req").write_text(json.dumps(request) + "\n")
    ns = f"mtfedtest{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        with (tmp_path / "req").open() as stdin:  # stdin ends after the request: the head closed the pipe
            run = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "mesatee_notebook.enclave.cluster.gbdt_fed_server"],
                stdin=stdin,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["port"] > 0
