"""The core protocol against a real supervisor and real handlers in this process, over the in-process comm.

No TLS and no kernel process: a :class:`Kernel` is built here and ``listen_inproc`` lets ``inproc://NAME`` reach
its connection handlers on threads. What needs an executor (a session) starts one, sandboxed as usual. The same
behaviour over real TLS to a kernel process is in test_protocol.py / test_abuse.py (marked ``process``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mesatee_notebook as mn
from mesatee_notebook.enclave.connection import Connection
from mesatee_notebook.enclave.kernel import Kernel, KernelConfig
from mesatee_notebook.enclave.platform import init_platform
from mesatee_notebook.errors import (
    FrameTooLarge,
    MalformedFrame,
    NotFound,
    PolicyViolation,
    ProtocolError,
    VersionMismatch,
    error_from_wire,
)
from mesatee_notebook.remote.channel import Channel, open_channel
from mesatee_notebook.remote.party_key import PartyIdentity
from mesatee_notebook.wire.comm import Comm, InprocComm, connect
from mesatee_notebook.wire.framing import MAGIC, PREFIX, Limits
from mesatee_notebook.wire.messages import PROTOCOL_VERSION
from mesatee_notebook.wire.protocol import REQUESTS


class InprocKernel:
    def __init__(self, kernel: Kernel, url: str, fingerprint: str) -> None:
        self.kernel, self.url, self.fingerprint = kernel, url, fingerprint

    def policy(self) -> mn.Policy:
        return mn.Policy(platform_roots=[self.fingerprint], measurements=[self.kernel.identity.measurement])


@pytest.fixture(scope="module")
def ik(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InprocKernel]:
    data = tmp_path_factory.mktemp("inproc-kernel")
    fp = init_platform(data)
    kernel = Kernel(KernelConfig(data_dir=Path(data), service_workers=1))
    url = kernel.listen_inproc(f"test-{secrets.token_hex(4)}")
    yield InprocKernel(kernel, url, fp)
    kernel.shutdown()


def raw(ik: InprocKernel) -> Comm:
    comm = connect(ik.url)
    comm.set_timeout(30)
    return comm


def hello(comm: Comm) -> dict[str, Any]:
    comm.send({"t": "hello", "id": 1, "versions": [PROTOCOL_VERSION], "client": "test"})
    reply = comm.recv(Limits())
    assert reply.type == "hello.ok"
    return reply.header


def ask(comm: Comm, header: dict[str, Any], payloads: list[Any] | None = None) -> Any:
    comm.send(header, payloads or [])
    return comm.recv(Limits())


def refusal(comm: Comm, header: dict[str, Any], payloads: list[Any] | None = None) -> mn.MesateeError:
    reply = ask(comm, header, payloads)
    assert reply.type == "error", reply.header
    return error_from_wire(reply.header)


def test_every_request_class_has_exactly_one_handler() -> None:
    assert set(Connection.HANDLERS) == set(REQUESTS.values())


def test_hello_attests_what_the_comm_presents(ik: InprocKernel) -> None:
    ch = open_channel(ik.url, ik.policy())
    try:
        assert ch.protocol == PROTOCOL_VERSION
        assert ch.attestation.level is mn.Level.SOFTTEE
        assert ch.attestation.measurement == ik.kernel.identity.measurement
        assert ch.request({"t": "ping"}).type == "pong"
    finally:
        ch.close()
    assert ch.closed


def test_a_comm_presenting_no_certificate_is_refused_before_hello(ik: InprocKernel) -> None:
    comm = connect(ik.url)
    assert isinstance(comm, InprocComm)
    bare = InprocComm(comm.sock, None, url=ik.url)  # the same link, presenting nothing
    with pytest.raises(mn.KernelConnectionError, match="no certificate"):
        Channel(bare, ik.policy())
    assert bare.closed


def test_a_kernel_outside_the_policy_is_refused(ik: InprocKernel) -> None:
    with pytest.raises(mn.AttestationError):
        open_channel(ik.url, mn.Policy(platform_roots=["ab" * 32]))


def test_requests_before_hello_and_unknown_types(ik: InprocKernel) -> None:
    comm = raw(ik)
    try:
        err = refusal(comm, {"t": "ping", "id": 1})
        assert isinstance(err, ProtocolError) and "hello" in str(err)
        hello(comm)
        err = refusal(comm, {"t": "format_disk", "id": 2})
        assert isinstance(err, ProtocolError) and "format_disk" in str(err)
        assert ask(comm, {"t": "ping", "id": 3}).type == "pong"  # the connection is kept
    finally:
        comm.close()


def test_wrong_protocol_version_gets_one_clear_sentence(ik: InprocKernel) -> None:
    comm = raw(ik)
    try:
        err = refusal(comm, {"t": "hello", "id": 1, "versions": [99], "client": "9.9"})
        assert isinstance(err, VersionMismatch) and "upgrade mesatee_notebook on the kernel side" in str(err)
    finally:
        comm.close()


def test_frame_limits_before_hello_then_hang_up(ik: InprocKernel) -> None:
    comm = raw(ik)
    assert isinstance(comm, InprocComm)
    try:
        comm.sock.sendall(PREFIX.pack(MAGIC, 1 << 20, 0))  # a header far over the pre-hello limit
        err = error_from_wire(comm.recv(Limits()).header)
        assert isinstance(err, FrameTooLarge) and "before 'hello'" in str(err)
        with pytest.raises((EOFError, mn.KernelConnectionError)):
            comm.recv(Limits())  # and the kernel hung up: the rest of the stream cannot be trusted
    finally:
        comm.close()


def test_bad_magic_is_a_typed_error(ik: InprocKernel) -> None:
    comm = raw(ik)
    assert isinstance(comm, InprocComm)
    try:
        comm.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        err = error_from_wire(comm.recv(Limits()).header)
        assert isinstance(err, MalformedFrame) and "mesatee" in str(err)
    finally:
        comm.close()


def test_malformed_fields_are_error_frames_and_the_connection_stays(ik: InprocKernel) -> None:
    comm = raw(ik)
    try:
        hello(comm)
        cases = [
            ({"t": "session.open", "name": "x" * 200}, "at most 128 characters"),
            ({"t": "auth", "public_key": "not bytes", "signature": b""}, "public_key"),
            ({"t": "call.cancel"}, "nonce"),
            ({"t": "migration", "op": "drop"}, "'status' or 'approve'"),
        ]
        for i, (header, needle) in enumerate(cases, start=10):
            err = refusal(comm, {**header, "id": i})
            assert isinstance(err, MalformedFrame) and needle in str(err)
        reply = ask(comm, {"t": "ping", "id": 99})
        assert reply.type == "pong" and reply.header["re"] == 99
    finally:
        comm.close()


def _execute(session: str, token: str, **over: Any) -> dict[str, Any]:
    base = {"t": "execute", "id": 5, "session": session, "token": token, "nonce": secrets.token_hex(16)}
    return {**base, "code": "1", "inputs": [], "outputs": [], **over}


def test_execute_refusals_that_need_no_executor(ik: InprocKernel) -> None:
    comm = raw(ik)
    try:
        hello(comm)
        err = refusal(comm, _execute("nope", "t" * 32))
        assert isinstance(err, NotFound) and "no session 'nope'" in str(err)
        err = refusal(comm, _execute("nope", "t" * 32, nonce="short"))
        assert isinstance(err, MalformedFrame) and "nonce" in str(err)
        err = refusal(comm, _execute("nope", "t" * 32, outputs=["not an id"]))
        assert isinstance(err, MalformedFrame) and "identifiers" in str(err)
        err = refusal(comm, _execute("nope", "t" * 32, inputs=[{"name": "x", "kind": "bytes"}]))
        assert isinstance(err, MalformedFrame) and "exactly one payload" in str(err)
        err = refusal(comm, _execute("nope", "t" * 32, code=7))
        assert isinstance(err, MalformedFrame) and "'code'" in str(err)
    finally:
        comm.close()


def test_execute_on_a_session_token_replay_and_busy(ik: InprocKernel) -> None:
    comm = raw(ik)
    try:
        hello(comm)
        opened = ask(comm, {"t": "session.open", "id": 2, "name": "inproc"}).header
        sid, token = opened["session"], opened["token"]
        err = refusal(comm, _execute(sid, "0" * 32))
        assert isinstance(err, PolicyViolation) and "token" in str(err)
        req = _execute(sid, token, code="6 * 7")
        started = time.monotonic()
        result = ask(comm, req)
        assert result.type == "result" and result.header["receipt"]
        assert time.monotonic() - started < 30
        err = refusal(comm, {**req, "id": 6})
        assert isinstance(err, PolicyViolation) and "replayed" in str(err)
        closed = ask(comm, {"t": "session.close", "id": 7, "session": sid, "token": token})
        assert closed.type == "session.closed"
        err = refusal(comm, _execute(sid, token))
        assert isinstance(err, NotFound)
    finally:
        comm.close()


def test_party_proof_on_the_channel(ik: InprocKernel) -> None:
    ch = open_channel(ik.url, ik.policy())
    try:
        with pytest.raises(PolicyViolation, match="party identity"):
            ch.request({"t": "audit"})
        with pytest.raises(PolicyViolation, match="party identity"):
            ch.request({"t": "call", "service": "dataset.list", "nonce": secrets.token_hex(16)})
        assert ch.request({"t": "whoami"}).header["party"] is None
        me = PartyIdentity.generate()
        party = ch.authenticate(me)
        assert party == me.party_id
        assert ch.request({"t": "whoami"}).header["party"] == party
        assert isinstance(ch.request({"t": "audit"}).header["entries"], list)
    finally:
        ch.close()


def test_a_proof_for_another_connection_is_refused(ik: InprocKernel) -> None:
    first, second = open_channel(ik.url, ik.policy()), open_channel(ik.url, ik.policy())
    try:
        me = PartyIdentity.generate()
        import hashlib

        cert_sha = hashlib.sha256(first.attestation.certificate_der).digest()
        sig = me.prove(first.kernel_nonce, cert_sha)  # signed for the first connection's nonce
        with pytest.raises(PolicyViolation):
            second.request({"t": "auth", "public_key": me.public_key_raw, "signature": sig})
        assert second.request({"t": "whoami"}).header["party"] is None
    finally:
        first.close()
        second.close()


def test_reply_carries_the_sent_digests(ik: InprocKernel) -> None:
    from mesatee_notebook.wire.digest import payload_digest

    ch = open_channel(ik.url, ik.policy())
    try:
        opened = ch.request({"t": "session.open", "name": "digests"}).header
        payload = b"hello bytes"
        spec = {"name": "x", "kind": "bytes", "meta": {}}
        req = _execute(opened["session"], opened["token"], code="len(x)", inputs=[spec])
        reply = ch.request({k: v for k, v in req.items() if k != "id"}, [payload], digests=True)
        assert reply.sent == [payload_digest(payload)]
        assert "_sent" not in reply.header
        statement = mn.Receipt.load(reply.header["receipt"]).statement
        assert statement["predicate"]["inputs"] == {"x": reply.sent[0]}
    finally:
        ch.close()


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any level (also under TYPE_CHECKING and inside functions)."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_the_workers_and_the_services_import_no_circle() -> None:
    """The services know only the SupervisorClient; the cell executor never loads a trusted service."""
    import mesatee_notebook.enclave as enclave

    root = Path(enclave.__file__).parent
    workers = {f"mesatee_notebook.enclave.{m}" for m in ("executor", "cell_executor", "service_worker")}
    for path in sorted((root / "services").glob("*.py")):
        assert not _imports(path) & workers, f"{path.name} imports a worker module"
    for name in ("cell_executor.py", "supervisor_client.py"):
        assert not [m for m in _imports(root / name) if m.startswith("mesatee_notebook.enclave.services")], name
    assert "mesatee_notebook.enclave.supervisor_client" in _imports(root / "services" / "__init__.py")
