"""Every message of the mesatee protocol, one frozen dataclass each (pure: no I/O).

Two conversations use these classes:

* **client ↔ kernel** over the attested TLS channel: the requests in :data:`REQUESTS` (``hello``, ``execute``,
  ``call`` ...). The kernel's connection dispatches on the class (``enclave/connection.py``'s handler table).
* **executor ↔ supervisor** over the executor's Unix socket: the supervisor's orders (:class:`RunCell`,
  :class:`RunService`, :class:`Shutdown`), the executor's requests mid-call (:data:`EXECUTOR_REQUESTS`: sealed
  storage, datasets, audit, registered functions, keys) and its messages (:class:`Ready`, :class:`Stream`, ...).

Each class carries its type tag ``T`` (the ``t`` of the header), and ``from_header`` is the one place its fields are
checked; a bad field raises :class:`~mesatee_notebook.errors.MalformedFrame` with a sentence a person understands.
``to_header`` is its inverse (``from_header(m.to_header()) == m``, tested with Hypothesis).

One framing and one value layout
--------------------------------
Both conversations use the same framing (``wire/framing.py``: ``MTEE`` prefix, msgpack header, raw payloads; moved
by ``wire/stream.py``) and the same value spec (``{name, kind, meta}`` plus ``inline: i`` for the i-th payload, or
``fd: j`` for the j-th passed memfd on the Unix socket: ``enclave/ipc.py``). The one format that differs is the job
store's sealed blob (``MTJV1``, ``enclave/services/jobstore.py``): it is a format *at rest*, inside sealed files that
already exist on operators' disks and that migrations carry between measurements, so changing it would orphan
stored jobs and models; it is a file format, not a message, and it stays.

(This module is long on purpose: it is the catalogue, one short class per message of both conversations, which
share the tag space and the field checks; split, the catalogue would no longer be readable in one place.)

Where does a new request type go? Here: one dataclass with ``T`` and ``from_header``, added to :data:`REQUESTS`;
its handler goes in the kernel's connection table, and its round trip in ``tests/core/test_protocol_messages.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from mesatee_notebook.errors import MalformedFrame, ProtocolError

__all__ = [
    "EXECUTOR_MESSAGES",
    "EXECUTOR_REQUESTS",
    "REQUESTS",
    "REQUEST_TYPES",
    "AuditAppend",
    "AuditRequest",
    "Auth",
    "Call",
    "CallCancel",
    "ClusterPsi",
    "DataGet",
    "Execute",
    "ExecutorError",
    "FaasRun",
    "Hello",
    "Interrupt",
    "KeyCall",
    "LogLine",
    "Migration",
    "Ping",
    "ProgressUpdate",
    "ResultChunk",
    "ProtocolMessage",
    "Ready",
    "Result",
    "RunCell",
    "RunService",
    "SealDelete",
    "SealGet",
    "SealList",
    "SealPut",
    "SessionClose",
    "SessionList",
    "SessionOpen",
    "SessionRestart",
    "Shutdown",
    "Stream",
    "ValueSpec",
    "Whoami",
    "parse_executor_message",
    "parse_request",
]

M = TypeVar("M", bound="ProtocolMessage")
_NONCE_MIN, _NONCE_MAX = 16, 128
_SESSION_NAME_MAX = 128


def _require(header: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        msg = f"message {header.get('t')!r} needs field {key!r} of type {names}"
        raise MalformedFrame(msg)
    return value


def _nonce(header: Mapping[str, Any]) -> str:
    nonce = header.get("nonce")
    if not isinstance(nonce, str) or not _NONCE_MIN <= len(nonce) <= _NONCE_MAX:
        msg = "a request needs a fresh random nonce of 16 to 128 characters"
        raise MalformedFrame(msg)
    return nonce


def _timeout(header: Mapping[str, Any]) -> float | None:
    """A requested timeout in seconds, or None (the kernel's limit applies); nonsense means "no request"."""
    value = header.get("timeout")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return None
    return float(value)


def _str_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


@dataclass(frozen=True, slots=True)
class ValueSpec:
    """A named value as it crosses the wire: codec ``kind`` and ``meta``; its bytes are one payload."""

    name: str
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def list_from(cls, raw: Any, payloads: int, *, what: str = "input") -> tuple[ValueSpec, ...]:
        """Specs of a request's inputs: a list, one per payload, each named by a Python identifier."""
        if not isinstance(raw, list) or len(raw) != payloads:
            msg = f"each {what} needs exactly one payload"
            raise MalformedFrame(msg)
        out = []
        for spec in raw:
            if not isinstance(spec, dict) or not str(spec.get("name", "")).isidentifier():
                msg = f"each {what} needs a name that is a Python identifier"
                raise MalformedFrame(msg)
            meta = spec.get("meta") or {}
            if not isinstance(meta, dict):
                msg = f"the meta of {what} {spec['name']!r} must be a map"
                raise MalformedFrame(msg)
            out.append(cls(str(spec["name"]), str(spec.get("kind")), meta))
        return tuple(out)

    def to_wire(self) -> dict[str, Any]:
        """The spec as a header map."""
        return {"name": self.name, "kind": self.kind, "meta": dict(self.meta)}


@dataclass(frozen=True, slots=True)
class ProtocolMessage:
    """Base of every message: ``T`` is its type tag; ``id`` (requests) and ``re`` (replies) pair them up."""

    T: ClassVar[str] = ""

    @classmethod
    def from_header(cls: type[M], header: Mapping[str, Any], payloads: int = 0) -> M:
        """Check the fields of a received header (with ``payloads`` payloads) and build the message."""
        del header, payloads
        return cls()

    def to_header(self) -> dict[str, Any]:
        """The header to send (without ``p``, which the framing adds)."""
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in list(body.items()):
            if isinstance(value, tuple):
                body[key] = [v.to_wire() if isinstance(v, ValueSpec) else v for v in value]
        return {"t": self.T, **body}


# -- client → kernel --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello(ProtocolMessage):
    """The version handshake; a TPM client adds a fresh nonce and a credential challenge."""

    T: ClassVar[str] = "hello"
    versions: tuple[int, ...] = ()
    client: str = "?"
    tpm_nonce: bytes | None = None
    tpm_credential: dict[str, Any] | None = None

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> Hello:
        offered = header.get("versions")
        if not isinstance(offered, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in offered):
            msg = "hello must offer a list of integer protocol versions"
            raise MalformedFrame(msg)
        nonce, challenge = header.get("tpm_nonce"), header.get("tpm_credential")
        return cls(
            tuple(offered),
            str(header.get("client", "?")),
            nonce if isinstance(nonce, bytes) else None,
            challenge if isinstance(challenge, dict) else None,
        )

    def to_header(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.T, "versions": list(self.versions), "client": self.client}
        if self.tpm_nonce is not None:
            out["tpm_nonce"] = self.tpm_nonce
        if self.tpm_credential is not None:
            out["tpm_credential"] = self.tpm_credential
        return out


@dataclass(frozen=True, slots=True)
class Auth(ProtocolMessage):
    """A party proves its key: a signature over the connection's nonce and the certificate it was shown."""

    T: ClassVar[str] = "auth"
    public_key: bytes = b""
    signature: bytes = b""

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> Auth:
        return cls(_require(header, "public_key", bytes), _require(header, "signature", bytes))


@dataclass(frozen=True, slots=True)
class Whoami(ProtocolMessage):
    """The proven party (if any) and its quota."""

    T: ClassVar[str] = "whoami"


@dataclass(frozen=True, slots=True)
class AuditRequest(ProtocolMessage):
    """The audit log entries visible to the proven party."""

    T: ClassVar[str] = "audit"


@dataclass(frozen=True, slots=True)
class Ping(ProtocolMessage):
    """Keepalive."""

    T: ClassVar[str] = "ping"


@dataclass(frozen=True, slots=True)
class SessionList(ProtocolMessage):
    """The sessions this connection opened."""

    T: ClassVar[str] = "session.list"


@dataclass(frozen=True, slots=True)
class Migration(ProtocolMessage):
    """State sealed for other measurements (``op: status``), or an owner's signed grant (``op: approve``)."""

    T: ClassVar[str] = "migration"
    op: str = "status"
    grant: Any = None
    public_key: bytes | None = None
    signature: bytes | None = None

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> Migration:
        op = header.get("op")
        if op == "status":
            return cls("status")
        if op != "approve":
            msg = "migration requests need op 'status' or 'approve'"
            raise MalformedFrame(msg)
        return cls(
            "approve", header.get("grant"), _require(header, "public_key", bytes), _require(header, "signature", bytes)
        )

    def to_header(self) -> dict[str, Any]:
        if self.op == "status":
            return {"t": self.T, "op": "status"}
        return {
            "t": self.T,
            "op": self.op,
            "grant": self.grant,
            "public_key": self.public_key,
            "signature": self.signature,
        }


@dataclass(frozen=True, slots=True)
class SessionOpen(ProtocolMessage):
    """Open a session (one executor) under a name."""

    T: ClassVar[str] = "session.open"
    name: str = "default"

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> SessionOpen:
        name = header.get("name") or "default"
        if not isinstance(name, str) or len(name) > _SESSION_NAME_MAX:
            msg = "session name must be a string of at most 128 characters"
            raise MalformedFrame(msg)
        return cls(name)


@dataclass(frozen=True, slots=True)
class _SessionRequest(ProtocolMessage):
    """A request about one session: its id, and the token only its opener holds (checked by the kernel)."""

    session: str = ""
    token: str = ""

    @classmethod
    def from_header(cls: type[M], header: Mapping[str, Any], payloads: int = 0) -> M:
        token = header.get("token")
        return cls(str(header.get("session")), token if isinstance(token, str) else "")  # type: ignore[call-arg]


@dataclass(frozen=True, slots=True)
class SessionClose(_SessionRequest):
    """Close a session and stop its executor."""

    T: ClassVar[str] = "session.close"


@dataclass(frozen=True, slots=True)
class SessionRestart(_SessionRequest):
    """Kill a session's executor and start a fresh one."""

    T: ClassVar[str] = "session.restart"


@dataclass(frozen=True, slots=True)
class Interrupt(_SessionRequest):
    """Interrupt the cell a session is running (sent on a second connection)."""

    T: ClassVar[str] = "interrupt"


@dataclass(frozen=True, slots=True)
class Execute(_SessionRequest):
    """Run a cell in a session with named inputs (one payload each); bring back named outputs."""

    T: ClassVar[str] = "execute"
    nonce: str = ""
    code: str = ""
    inputs: tuple[ValueSpec, ...] = ()
    outputs: tuple[str, ...] = ()
    timeout: float | None = None
    allow_pickle: bool = False

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> Execute:
        token = header.get("token")
        nonce = _nonce(header)
        code = _require(header, "code", str)
        outputs = header.get("outputs") or []
        if not isinstance(outputs, list) or not all(isinstance(o, str) and o.isidentifier() for o in outputs):
            msg = "outputs must be a list of Python identifiers"
            raise MalformedFrame(msg)
        return cls(
            str(header.get("session")),
            token if isinstance(token, str) else "",
            nonce,
            code,
            ValueSpec.list_from(header.get("inputs") or [], payloads),
            tuple(outputs),
            _timeout(header),
            bool(header.get("allow_pickle", False)),
        )


@dataclass(frozen=True, slots=True)
class Call(ProtocolMessage):
    """Run a trusted service for the proven party, with JSON ``args`` and named inputs."""

    T: ClassVar[str] = "call"
    service: str = ""
    nonce: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[ValueSpec, ...] = ()
    timeout: float | None = None
    chunked: bool = False  # the client reads large DataFrame results as a stream of ResultChunk frames

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> Call:
        nonce = _nonce(header)
        service = _require(header, "service", str)
        args = header.get("args") or {}
        if not isinstance(args, dict):
            msg = "service arguments must be a map"
            raise MalformedFrame(msg)
        inputs = ValueSpec.list_from(header.get("inputs") or [], payloads)
        return cls(service, nonce, args, inputs, _timeout(header), header.get("chunked") is True)


@dataclass(frozen=True, slots=True)
class CallCancel(ProtocolMessage):
    """Cancel a queued or running service call; its nonce is the capability."""

    T: ClassVar[str] = "call.cancel"
    nonce: str = ""

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> CallCancel:
        return cls(_require(header, "nonce", str))


#: Requests a client may send, by type tag; anything else is refused with a typed error.
REQUESTS: dict[str, type[ProtocolMessage]] = {
    c.T: c
    for c in (
        Hello,
        SessionOpen,
        SessionClose,
        SessionRestart,
        SessionList,
        Execute,
        Interrupt,
        Call,
        CallCancel,
        Ping,
        Auth,
        Whoami,
        AuditRequest,
        Migration,
    )
}
REQUEST_TYPES = frozenset(REQUESTS)


def parse_request(header: Mapping[str, Any], payloads: int) -> ProtocolMessage:
    """The typed request of a received header; ProtocolError for a type the kernel does not serve."""
    t = header.get("t")
    cls = REQUESTS.get(str(t))
    if cls is None:
        msg = f"unknown message type {t!r}"
        raise ProtocolError(msg, type=t)
    return cls.from_header(header, payloads)


# -- supervisor → executor ---------------------------------------------------------------------------------------
def _wire_specs(raw: Any) -> tuple[dict[str, Any], ...]:
    """Value specs that point at inline payloads or passed fds (checked when they are unpacked: ``enclave/ipc``)."""
    if not isinstance(raw, list) or not all(isinstance(s, dict) for s in raw):
        msg = "value specs must be a list of maps"
        raise MalformedFrame(msg)
    return tuple(raw)


@dataclass(frozen=True, slots=True)
class RunCell(ProtocolMessage):
    """The supervisor asks a cell executor to run one cell."""

    T: ClassVar[str] = "execute"
    code: str = ""
    inputs: tuple[dict[str, Any], ...] = ()
    outputs: tuple[str, ...] = ()
    allow_pickle: bool = False

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> RunCell:
        return cls(
            str(header.get("code", "")),
            _wire_specs(header.get("inputs", [])),
            tuple(_str_list(header.get("outputs", []))),
            bool(header.get("allow_pickle", False)),
        )

    def to_header(self) -> dict[str, Any]:
        return {
            "t": self.T,
            "code": self.code,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "allow_pickle": self.allow_pickle,
        }


@dataclass(frozen=True, slots=True)
class RunService(ProtocolMessage):
    """The supervisor asks a service worker to run a trusted service for a proven party."""

    T: ClassVar[str] = "call"
    service: str = ""
    party: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[dict[str, Any], ...] = ()
    fresh: bool = False
    chunked: bool = False  # large DataFrame results go as ResultChunk messages before the Result

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> RunService:
        args = header.get("args") or {}
        if not isinstance(args, dict):
            msg = "service arguments must be a map"
            raise MalformedFrame(msg)
        return cls(
            _require(header, "service", str),
            _require(header, "party", str),
            args,
            _wire_specs(header.get("inputs", [])),
            bool(header.get("fresh")),
            header.get("chunked") is True,
        )

    def to_header(self) -> dict[str, Any]:
        return {
            "t": self.T,
            "service": self.service,
            "party": self.party,
            "args": self.args,
            "inputs": list(self.inputs),
            "fresh": self.fresh,
            "chunked": self.chunked,
        }


@dataclass(frozen=True, slots=True)
class Shutdown(ProtocolMessage):
    """The supervisor asks an executor to exit."""

    T: ClassVar[str] = "shutdown"


# -- executor → supervisor: requests mid-call (answered ``ok`` or ``error``) --------------------------------------
@dataclass(frozen=True, slots=True)
class _Named(ProtocolMessage):
    name: str = ""

    @classmethod
    def from_header(cls: type[M], header: Mapping[str, Any], payloads: int = 0) -> M:
        return cls(str(header.get("name", "")))  # type: ignore[call-arg]


@dataclass(frozen=True, slots=True)
class SealGet(_Named):
    """Read a sealed object of the caller's namespace."""

    T: ClassVar[str] = "seal.get"


@dataclass(frozen=True, slots=True)
class SealPut(_Named):
    """Write a sealed object (its bytes are the one payload)."""

    T: ClassVar[str] = "seal.put"


@dataclass(frozen=True, slots=True)
class SealList(_Named):
    """Names of sealed objects under a prefix (a JSON list comes back)."""

    T: ClassVar[str] = "seal.list"


@dataclass(frozen=True, slots=True)
class SealDelete(_Named):
    """Delete a sealed object."""

    T: ClassVar[str] = "seal.delete"


@dataclass(frozen=True, slots=True)
class DataGet(_Named):
    """A dataset for a cell whose party has code access (Arrow bytes come back)."""

    T: ClassVar[str] = "data.get"


@dataclass(frozen=True, slots=True)
class ClusterPsi(_Named):
    """Issue 18: a PSI job's intersection on the cluster (``name``: the mode; one Arrow items stream per input)."""

    T: ClassVar[str] = "cluster.psi"


@dataclass(frozen=True, slots=True)
class AuditAppend(ProtocolMessage):
    """A trusted service appends an entry to the signed audit log."""

    T: ClassVar[str] = "audit"
    kind: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    concerns: tuple[str, ...] = ()

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> AuditAppend:
        details = header.get("details") or {}
        return cls(
            str(header.get("kind")),
            details if isinstance(details, dict) else {},
            tuple(_str_list(header.get("concerns") or [])),
        )


@dataclass(frozen=True, slots=True)
class FaasRun(ProtocolMessage):
    """A trusted service runs a packed registered function in a fresh sandboxed executor."""

    T: ClassVar[str] = "faas.run"
    timeout: float | None = None

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> FaasRun:
        return cls(_timeout(header))


@dataclass(frozen=True, slots=True)
class KeyCall(ProtocolMessage):
    """A cell's ``mesatee.keys.<op>``, served by the KeyStore as the session's party."""

    T: ClassVar[str] = "key.call"
    op: str = ""

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> KeyCall:
        return cls(str(header.get("op", "")))


#: What an executor may ask the supervisor in the middle of a call, by type tag.
EXECUTOR_REQUESTS: dict[str, type[ProtocolMessage]] = {
    c.T: c for c in (SealGet, SealPut, SealList, SealDelete, DataGet, AuditAppend, FaasRun, KeyCall, ClusterPsi)
}


# -- executor → supervisor: messages ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready(ProtocolMessage):
    """The executor's first message, with its pid (inside its sandbox's PID namespace)."""

    T: ClassVar[str] = "ready"
    pid: int | None = None

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> Ready:
        pid = header.get("pid")
        return cls(pid if isinstance(pid, int) and not isinstance(pid, bool) else None)


@dataclass(frozen=True, slots=True)
class Stream(ProtocolMessage):
    """Text a cell wrote to stdout or stderr."""

    T: ClassVar[str] = "stream"
    name: str = "stdout"
    text: str = ""

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> Stream:
        return cls("stderr" if header.get("name") == "stderr" else "stdout", str(header.get("text", "")))


@dataclass(frozen=True, slots=True)
class LogLine(ProtocolMessage):
    """``mesatee.untrusted_log``: a line for the host's log."""

    T: ClassVar[str] = "log"
    text: str = ""

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> LogLine:
        return cls(str(header.get("text")))


@dataclass(frozen=True, slots=True)
class ProgressUpdate(ProtocolMessage):
    """A service's progress (e.g. a training round's metrics), streamed to the caller."""

    T: ClassVar[str] = "progress"
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> ProgressUpdate:
        data = header.get("data") or {}
        return cls(data if isinstance(data, dict) else {})


@dataclass(frozen=True, slots=True)
class ResultChunk(ProtocolMessage):
    """One chunk (its one payload) of a large result value's bytes, sent before the Result.

    ``size`` is the whole value's size; the value's spec in the Result says ``chunks: n``, and the chunks back to
    back are its bytes, which the receipt's digest covers (``wire/arrow_chunks.py``). The supervisor passes each
    chunk on to the caller as it comes.
    """

    T: ClassVar[str] = "result.chunk"
    name: str = ""
    index: int = 0
    size: int = 0

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> ResultChunk:
        index, size = header.get("index"), header.get("size")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (index, size)):
            msg = "a result chunk needs non-negative integers 'index' and 'size'"
            raise MalformedFrame(msg)
        assert isinstance(index, int) and isinstance(size, int)
        return cls(_require(header, "name", str), index, size)


@dataclass(frozen=True, slots=True)
class Result(ProtocolMessage):
    """A cell's or a service's result: value specs (inline payloads or memfds), public info, a repr."""

    T: ClassVar[str] = "result"
    values: tuple[dict[str, Any], ...] = ()
    info: dict[str, Any] | None = None
    value_repr: str | None = None

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> Result:
        info, value_repr = header.get("info"), header.get("value_repr")
        return cls(
            _wire_specs(header.get("values", [])),
            info if isinstance(info, dict) else None,
            value_repr if isinstance(value_repr, str) else None,
        )

    def to_header(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": self.T, "values": list(self.values)}
        if self.info is not None:
            out["info"] = self.info
        out["value_repr"] = self.value_repr
        return out


@dataclass(frozen=True, slots=True)
class ExecutorError(ProtocolMessage):
    """A typed error (its wire code, message and details), from either side of the Unix socket."""

    T: ClassVar[str] = "error"
    code: str = "remote"
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_header(cls, header: Mapping[str, Any], payloads: int = 0) -> ExecutorError:
        details = header.get("details") or {}
        return cls(str(header.get("code")), str(header.get("message")), details if isinstance(details, dict) else {})

    def wire(self) -> dict[str, Any]:
        """The ``code``/``message``/``details`` map ``error_from_wire`` rebuilds the local class from."""
        return asdict(self)


#: Everything an executor may send, by type tag (its requests, then its messages).
EXECUTOR_MESSAGES: dict[str, type[ProtocolMessage]] = {
    **EXECUTOR_REQUESTS,
    **{c.T: c for c in (Ready, Stream, LogLine, ProgressUpdate, ResultChunk, Result, ExecutorError)},
}
#: What the supervisor may order an executor to do, by type tag.
SUPERVISOR_ORDERS: dict[str, type[ProtocolMessage]] = {c.T: c for c in (RunCell, RunService, Shutdown)}


def parse_executor_message(header: Mapping[str, Any], payloads: int = 0) -> ProtocolMessage | None:
    """The typed form of an executor's message, or None for a type the supervisor does not know."""
    cls = EXECUTOR_MESSAGES.get(str(header.get("t")))
    return None if cls is None else cls.from_header(header, payloads)
