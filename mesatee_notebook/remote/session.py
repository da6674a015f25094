"""Sessions on an attested kernel: run cells, send inputs, get verified outputs with receipts.

Why this module is over ~500 lines: the client ``Session``: each public method is a thin request, and users read the
whole API of a session in one place.
"""

from __future__ import annotations

import hashlib
import secrets
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesatee_notebook.attestation.policy import AttestationReport, Policy
from mesatee_notebook.attestation.receipts import Receipt, VerifiedReceipt, verify_receipt
from mesatee_notebook.errors import EncodingError, MalformedFrame, ProtocolError, ReceiptError
from mesatee_notebook.errors import PolicyViolation as PolicyViolationError
from mesatee_notebook.remote._public import public_api, public_methods
from mesatee_notebook.remote.channel import Channel, Reply, open_channel
from mesatee_notebook.remote.frames_result import ResultChunks
from mesatee_notebook.wire.codecs import decode_value, encode_value
from mesatee_notebook.wire.digest import payload_digest
from mesatee_notebook.wire.stream import Message, Progress

if TYPE_CHECKING:
    from mesatee_notebook.remote.faas import FunctionsClient, KeysClient, TasksClient
    from mesatee_notebook.remote.frame import SecureDataFrame
    from mesatee_notebook.remote.jobs import JobsClient
    from mesatee_notebook.remote.ml import GbdtClient, TvmClient
    from mesatee_notebook.remote.psi import PsiClient
    from mesatee_notebook.wire.datapolicy import DataPolicy

__all__ = ["CallResult", "RunResult", "Session", "connect", "default_policy", "verify_receipt_default"]

StreamCallback = Callable[[str, str], None]
"""``callback(name, text)`` with name ``"stdout"`` or ``"stderr"``."""


@dataclass
class RunResult:
    """What a cell returned: its last expression, declared outputs, captured output, and the receipt."""

    value: Any
    outputs: dict[str, Any]
    stdout: str
    stderr: str
    receipt: Receipt
    verified: VerifiedReceipt = field(repr=False)
    value_repr: str | None = None

    def __repr__(self) -> str:
        shown = self.value_repr if self.value_repr is not None else type(self.value).__name__
        return f"<RunResult value={shown} outputs={sorted(self.outputs)} receipt=verified>"


def default_policy(*, allow_unprotected: bool = False) -> Policy:
    """Pin the local embedded platform (if any) and the measurement of this install."""
    from mesatee_notebook.remote.embedded import local_platform_fingerprint

    fp = local_platform_fingerprint()
    return Policy(platform_roots=[fp] if fp else [], allow_unprotected=allow_unprotected)


def verify_receipt_default(
    receipt: Receipt | Mapping[str, Any] | str | bytes | Path, policy: Policy | None = None, **expect: Any
) -> VerifiedReceipt:
    """Check a receipt offline; with no policy, pin the local embedded platform and this install's code."""
    return verify_receipt(receipt, policy or default_policy(), **expect)


@dataclass
class CallResult:
    """What a trusted service returned: public ``info``, named values, and the verified receipt."""

    info: dict[str, Any]
    values: dict[str, Any]
    receipt: Receipt
    verified: VerifiedReceipt = field(repr=False)


@public_methods
class Session:
    """A session on an enclave kernel: one executor process with a persistent namespace."""

    def __init__(
        self, channel: Channel, name: str = "default", party_id: str | None = None, *, identity: Any = None
    ) -> None:
        self._channel = channel
        self.party_id = party_id
        self._identity = identity
        reply = channel.request({"t": "session.open", "name": name})
        self.name = name
        self.id = str(reply.header["session"])
        self._token = str(reply.header["token"])
        self.last_receipt: Receipt | None = None
        self._inflight: set[str] = set()  # nonces of service calls in flight (each is its call's cancel capability)

    # -- identity -------------------------------------------------------------------------------
    @property
    def attestation(self) -> AttestationReport:
        """The verified attestation of the kernel this session runs on."""
        return self._channel.attestation

    @property
    def policy(self) -> Policy:
        """The policy the kernel was verified under."""
        return self._channel.policy

    @property
    def url(self) -> str:
        """``mesatee://host:port`` of the kernel."""
        return self._channel.url

    def __repr__(self) -> str:
        a = self.attestation
        return (
            f"<mesatee Session {self.name!r} on {self.url} level={a.level.label} ({a.trust_label}) "
            f"measurement={a.measurement[:12]}…>"
        )

    # -- running code ---------------------------------------------------------------------------
    def run(
        self,
        code: str,
        inputs: Mapping[str, Any] | None = None,
        outputs: Iterable[str] = (),
        *,
        timeout: float | None = None,
        stream: StreamCallback | bool | None = None,
        allow_pickle: bool = False,
        upload_progress: Progress | None = None,
        download_progress: Progress | None = None,
    ) -> RunResult:
        """Run ``code`` in the enclave with ``inputs`` bound as variables; return verified results.

        ``outputs`` names enclave variables to bring back. The last expression's value comes
        back as ``value``. stdout/stderr are captured; ``stream=True`` echoes them live, or pass
        ``callback(name, text)``. The receipt's signature, nonce, code, input and output digests
        are checked before anything is returned.
        """
        names = list(outputs)
        inputs = dict(inputs or {})
        specs, payloads = _encode_inputs(inputs, allow_pickle=allow_pickle)
        nonce = secrets.token_hex(16)
        out_text: dict[str, list[str]] = {"stdout": [], "stderr": []}
        callback: StreamCallback | None
        if stream is True:
            callback = _echo
        elif callable(stream):
            callback = stream
        else:
            callback = None

        def on_stream(m: Message) -> None:
            name = "stderr" if m.header.get("name") == "stderr" else "stdout"
            text = str(m.header.get("text", ""))
            out_text[name].append(text)
            if callback is not None:
                callback(name, text)

        header = {
            "t": "execute",
            "session": self.id,
            "token": self._token,
            "nonce": nonce,
            "code": code,
            "inputs": specs,
            "outputs": names,
            "timeout": timeout,
            "allow_pickle": allow_pickle,
        }
        reply = self._channel.request(
            header,
            payloads,
            on_stream=on_stream,
            digests=True,
            upload_progress=upload_progress,
            download_progress=download_progress,
            on_interrupt=self.interrupt,
        )
        return self._verified_result(reply, nonce, code, specs, out_text, names, allow_pickle)

    def _verified_result(
        self,
        reply: Reply,
        nonce: str,
        code: str,
        specs: list[dict[str, Any]],
        out_text: dict[str, list[str]],
        names: list[str],
        allow_pickle: bool,
    ) -> RunResult:
        sent = reply.sent or []
        input_digests = {str(s["name"]): d for s, d in zip(specs, sent, strict=True)}
        stdout, stderr = "".join(out_text["stdout"]), "".join(out_text["stderr"])
        got = {
            "stdout": payload_digest(stdout.encode()),
            "stderr": payload_digest(stderr.encode()),
        }
        value_specs = reply.header.get("values")
        if not isinstance(value_specs, list) or len(value_specs) != len(reply.payloads):
            msg = "result values and payloads do not match"
            raise MalformedFrame(msg)
        for spec, digest in zip(value_specs, reply.digests or [], strict=True):
            got[str(spec["name"])] = digest
        value_repr = reply.header.get("value_repr")
        if isinstance(value_repr, str):
            got["value_repr"] = payload_digest(value_repr.encode())
        receipt = Receipt.load(reply.header.get("receipt") or {})
        verified = verify_receipt(
            receipt, self.policy, nonce=nonce, outputs=got, inputs=input_digests, code=code, attested=self.attestation
        )
        if verified.predicate.get("session") != self.id or verified.predicate.get("party") != self.party_id:
            msg = "the receipt was issued for another session or party"
            raise ReceiptError(msg)
        self.last_receipt = receipt
        decoded: dict[str, Any] = {}
        value: Any = None
        for spec, buf in zip(value_specs, reply.payloads, strict=True):
            obj = decode_value(str(spec["kind"]), buf, allow_pickle=allow_pickle, meta=spec.get("meta"))
            if spec["name"] == "value":
                value = obj
            else:
                decoded[str(spec["name"]).removeprefix("out/")] = obj
        missing = set(names) - set(decoded)
        if missing:
            msg = f"the kernel did not return declared outputs {sorted(missing)}"
            raise ReceiptError(msg)
        return RunResult(
            value=value,
            outputs=decoded,
            stdout=stdout,
            stderr=stderr,
            receipt=receipt,
            verified=verified,
            value_repr=value_repr if isinstance(value_repr, str) else None,
        )

    # -- trusted services ------------------------------------------------------------------------
    def call(
        self,
        service: str,
        args: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Any] | None = None,
        *,
        progress: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
        upload_progress: Progress | None = None,
    ) -> CallResult:
        """Call a trusted service in the kernel (datasets, queries, PSI, GBDT, TVM) as this party.

        The receipt binds the service name and arguments, the input digests, the returned
        values and ``info``; it is verified before anything is returned.
        """
        from mesatee_notebook.attestation.measurement import canonical_json

        args = dict(args or {})
        specs, payloads = _encode_inputs(inputs or {}, allow_pickle=False)
        nonce = secrets.token_hex(16)
        chunks = ResultChunks(self._channel.limits.max_payload)  # a large DataFrame result comes in chunks

        def on_stream(m: Message) -> None:
            if m.type == "result.chunk":
                chunks.add(m)
            elif m.type == "progress" and progress is not None:
                progress(dict(m.header.get("data") or {}))

        header = {"t": "call", "service": service, "args": args, "inputs": specs, "nonce": nonce, "timeout": timeout}
        header["chunked"] = True
        self._inflight.add(nonce)
        try:
            reply = self._channel.request(
                header,
                payloads,
                on_stream=on_stream,
                digests=True,
                upload_progress=upload_progress,
                on_interrupt=lambda: self._cancel([nonce]),
                hasher_for=chunks.hasher_for,
                allocator=chunks.allocate,
            )
        except BaseException:
            chunks.clear()
            raise
        finally:
            self._inflight.discard(nonce)
        sent = reply.sent or []
        info = reply.header.get("info") or {}
        all_specs = reply.header.get("values")
        if not isinstance(all_specs, list) or not all(isinstance(s, dict) for s in all_specs):
            msg = "result values must be a list of maps"
            raise MalformedFrame(msg)
        value_specs = [s for s in all_specs if "chunks" not in s]
        streamed = [s for s in all_specs if "chunks" in s]
        if len(value_specs) != len(reply.payloads):
            msg = "result values and payloads do not match"
            raise MalformedFrame(msg)
        got = {str(s["name"]): d for s, d in zip(value_specs, reply.digests or [], strict=True)}
        got.update(chunks.digests(streamed))
        got["info"] = payload_digest(canonical_json(info))
        receipt = Receipt.load(reply.header.get("receipt") or {})
        verified = verify_receipt(
            receipt,
            self.policy,
            nonce=nonce,
            outputs=got,
            inputs={str(s["name"]): d for s, d in zip(specs, sent, strict=True)},
            attested=self.attestation,
        )
        pred = verified.predicate
        want_code = hashlib.sha256(canonical_json({"service": service, "args": args})).hexdigest()
        if pred.get("service") != service or pred.get("code", {}).get("sha256") != want_code:
            msg = "the receipt names another service call than the one sent"
            raise ReceiptError(msg)
        if pred.get("party") != self.party_id:
            msg = "the receipt was issued to another party"
            raise ReceiptError(msg)
        self.last_receipt = receipt
        values = {
            str(s["name"]).removeprefix("out/"): decode_value(str(s["kind"]), buf, meta=s.get("meta"))
            for s, buf in zip(value_specs, reply.payloads, strict=True)
        }
        values |= {str(s["name"]).removeprefix("out/"): chunks.decode(s) for s in streamed}
        return CallResult(info=dict(info), values=values, receipt=receipt, verified=verified)

    def whoami(self) -> str | None:
        """The party id the kernel recorded for this connection (None if anonymous)."""
        party = self._channel.request({"t": "whoami"}).header.get("party")
        return None if party is None else str(party)

    def quotas(self) -> dict[str, Any]:
        """The quota of this connection, as ``whoami`` reports it: ``holder``, ``limits`` and what is ``used`` now.

        ``holder`` is ``"party"`` (per proven party) or ``"anonymous"`` (one quota shared by every anonymous
        client). A request over a limit raises :class:`~mesatee_notebook.errors.QuotaExceeded`.
        """
        quota = self._channel.request({"t": "whoami"}).header.get("quota")
        if not isinstance(quota, dict):
            msg = "the kernel did not report quotas (it predates them)"
            raise MalformedFrame(msg)
        return dict(quota)

    def audit(self) -> list[dict[str, Any]]:
        """The audit entries this party may see, verified (signatures, hash chain, platform key)."""
        from mesatee_notebook.attestation.audit_verify import verify_audit_log
        from mesatee_notebook.attestation.evidence import fingerprint

        reply = self._channel.request({"t": "audit"})
        entries = list(reply.header.get("entries") or [])
        pub = bytes(reply.header.get("public_key") or b"")
        if self.attestation.level.label != "unprotected" and fingerprint(pub) != self.attestation.audit_signer:
            msg = "the audit log is not signed by the attested platform key"
            raise ReceiptError(msg)
        verify_audit_log(entries, pub, partial=True)
        return entries

    # -- service facades (each in its own module) -------------------------------------------------
    @property
    def psi(self) -> PsiClient:
        """Private set intersection jobs among parties (``remote/psi.py``)."""
        from mesatee_notebook.remote.psi import PsiClient

        return PsiClient(self)

    @property
    def jobs(self) -> JobsClient:
        """Multi-party jobs: create, submit, approve, result (``remote/jobs.py``)."""
        from mesatee_notebook.remote.jobs import JobsClient

        return JobsClient(self)

    @property
    def functions(self) -> FunctionsClient:
        """Registered Python and WebAssembly functions (``remote/faas.py``)."""
        from mesatee_notebook.remote.faas import FunctionsClient

        return FunctionsClient(self)

    @property
    def tasks(self) -> TasksClient:
        """Tasks: a registered function run on datasets once their owners approve (``remote/faas.py``)."""
        from mesatee_notebook.remote.faas import TasksClient

        return TasksClient(self)

    @property
    def keys(self) -> KeysClient:
        """The KeyStore: keys held in the enclave, used by name (``remote/faas.py``)."""
        from mesatee_notebook.remote.faas import KeysClient

        return KeysClient(self)

    @property
    def gbdt(self) -> GbdtClient:
        """GBDT training and prediction with xgboost in the enclave (``remote/ml.py``)."""
        from mesatee_notebook.remote.ml import GbdtClient

        return GbdtClient(self)

    @property
    def tvm(self) -> TvmClient:
        """TVM-compiled model inference in the enclave (``remote/ml.py``)."""
        from mesatee_notebook.remote.ml import TvmClient

        return TvmClient(self)

    # -- SecureDataFrame -------------------------------------------------------------------------
    def upload(
        self,
        df: Any,
        name: str,
        *,
        policy: DataPolicy | None = None,
        replace: bool = False,
        partitions: int | None = None,
    ) -> SecureDataFrame:
        """Put a DataFrame into the enclave as dataset ``name`` under ``policy``; return a SecureDataFrame.

        ``partitions=N``: on a kernel served with ``--cluster``, the frame is split into N row partitions, each
        sealed in a cluster worker's store; the receipt's info holds a digest per partition and of the whole
        (docs/cluster.md). Any other kernel refuses it with ``NotAvailableYet``.
        """
        from mesatee_notebook.remote.frame import SecureDataFrame
        from mesatee_notebook.wire.datapolicy import DataPolicy

        pol = policy if policy is not None else DataPolicy()
        args: dict[str, Any] = {"name": name, "policy": pol.to_dict(), "replace": replace}
        if partitions is not None:
            if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1:
                msg = f"partitions must be a positive integer, not {partitions!r}"
                raise EncodingError(msg)
            res = self.call("cluster.upload", {**args, "partitions": partitions}, {"data": df})
        else:
            res = self.call("dataset.upload", args, {"data": df})
        return SecureDataFrame.from_dataset_info(res.info, _FrameBackend(self))

    def dataframe(self, name: str) -> SecureDataFrame:
        """A lazy SecureDataFrame over dataset ``name`` (any party; the owner's policy decides what leaves)."""
        from mesatee_notebook.remote.frame import SecureDataFrame

        res = self.call("frame.info", {"name": name})
        return SecureDataFrame.from_dataset_info(res.info, _FrameBackend(self))

    def delete_dataset(self, name: str) -> None:
        """Delete dataset ``name`` from the kernel (its owner only; anyone else is refused)."""
        self.call("dataset.delete", {"name": name})

    def datasets(self) -> list[dict[str, Any]]:
        """Public descriptions (name, owner, schema, policy) of the kernel's datasets.

        Datasets sealed for another measurement (an earlier or later version of the kernel) follow, marked
        ``pending_migration=True`` with their owner, rows, size and measurement: this kernel cannot read them until
        their owner approves a migration (:meth:`approve_migration`).
        """
        ready = list(self.call("dataset.list").info.get("datasets", []))
        try:
            status = self.migration_status()
        except ProtocolError:  # a kernel from before migrations: it has nothing to report
            status = None
        for store in (status or {}).get("stores", []):
            for d in store.get("visible", []):
                ready.append({**d, "pending_migration": True, "rollback": store.get("rollback", False)})
        return ready

    # -- migration across measurements ---------------------------------------------------------
    def migration_status(self) -> dict[str, Any] | None:
        """State sealed for other measurements on this kernel's platform (None on an unprotected kernel)."""
        status = self._channel.request({"t": "migration", "op": "status"}).header.get("status")
        return dict(status) if isinstance(status, dict) else None

    def approve_migration(
        self, dataset: str = "*", *, from_: str, to: str | None = None, rollback: bool = False
    ) -> dict[str, Any]:
        """Sign and send a grant that moves ``dataset`` (or ``"*"``: all this party's state) from ``from_`` to ``to``.

        ``to`` defaults to the attested measurement of this kernel.

        The kernel checks the signature, keeps the grant sealed, enters it in the audit log, and re-seals what the
        grants so far approve, atomically. ``rollback=True`` is needed to move state to an *older* version.
        Returns ``{"migrated": [...], "held": [...], ...}``: units moved and units still waiting (for whom).
        """
        import time

        from mesatee_notebook.attestation.party_proof import migration_grant

        if self._identity is None or self.party_id is None:
            msg = "approve_migration needs this session's party key: connect with an identity"
            raise PolicyViolationError(msg)
        grant = migration_grant(
            self.party_id, dataset, from_, to or self.attestation.measurement, rollback=rollback, time=time.time()
        )
        signature = self._identity.sign_migration_grant(grant)
        reply = self._channel.request(
            {
                "t": "migration",
                "op": "approve",
                "grant": grant,
                "public_key": self._identity.public_key_raw,
                "signature": signature,
            }
        )
        return dict(reply.header.get("result") or {})

    def privacy_budgets(self) -> list[Any]:
        """Return this party's budget on every DP-mode dataset (``budget_meters_html`` renders them)."""
        from mesatee_notebook.remote.frame import PrivacyBudget

        out = []
        for d in self.datasets():
            if (d.get("policy") or {}).get("privacy") is not None:
                budget = self.call("frame.budget", {"name": d["name"]}).info.get("privacy_budget")
                if budget is not None:
                    out.append(PrivacyBudget.from_dict(budget))
        return out

    # -- control --------------------------------------------------------------------------------
    def cancel_calls(self) -> int:
        """Cancel this session's service calls in flight; returns how many the kernel cancelled.

        For a long PSI or training run started in another thread. A running call's worker is stopped and the
        call raises ``RemoteInterrupted``; nothing is released. Ctrl-C during ``call()`` does the same.
        """
        return self._cancel(list(self._inflight))

    def _cancel(self, nonces: list[str]) -> int:
        if not nonces:
            return 0
        side = self._side_channel()
        try:
            return sum(bool(side.request({"t": "call.cancel", "nonce": n}).header.get("cancelled")) for n in nonces)
        finally:
            side.close()

    def _side_channel(self) -> Channel:
        from dataclasses import replace

        # Pin what was attested at connect time: the same kernel, not whatever is installed now.
        pinned = replace(self.policy, measurements=(self.attestation.measurement,))
        return open_channel(self._channel.url, pinned)

    def interrupt(self) -> bool:
        """Interrupt the running cell (over a second attested connection). True if one was running."""
        side = self._side_channel()
        try:
            reply = side.request({"t": "interrupt", "session": self.id, "token": self._token})
        finally:
            side.close()
        return bool(reply.header.get("interrupted"))

    def restart(self) -> None:
        """Kill the executor and start a fresh one (the namespace is cleared)."""
        self._channel.request({"t": "session.restart", "session": self.id, "token": self._token})

    def sessions(self) -> list[dict[str, Any]]:
        """Sessions opened on this connection."""
        reply = self._channel.request({"t": "session.list"})
        return list(reply.header.get("sessions", []))

    def ping(self) -> float:
        """Round trip to the kernel; returns the kernel's clock."""
        return float(self._channel.request({"t": "ping"}).header["time"])

    def close(self) -> None:
        """Close the session and the connection."""
        if self._channel.closed:
            return
        try:
            self._channel.request({"t": "session.close", "session": self.id, "token": self._token})
        finally:
            self._channel.close()

    def __copy__(self) -> Session:
        return self  # a live attested connection: copies share it (sklearn's clone deep-copies params)

    def __deepcopy__(self, memo: dict[int, Any]) -> Session:
        return self

    def __reduce__(self) -> Any:
        msg = "a Session is a live attested connection and cannot be pickled; reconnect with mn.connect()"
        raise TypeError(msg)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode_inputs(inputs: Mapping[str, Any], *, allow_pickle: bool) -> tuple[list[dict[str, Any]], list[Any]]:
    """Wire specs and payload parts for named input values (names must be identifiers)."""
    specs: list[dict[str, Any]] = []
    payloads: list[Any] = []
    for name, value in inputs.items():
        if not name.isidentifier():
            msg = f"input name {name!r} is not a Python identifier"
            raise ValueError(msg)
        enc = encode_value(value, allow_pickle=allow_pickle)
        specs.append({"name": name, "kind": enc.kind, "meta": enc.meta})
        payloads.append(enc.parts)
    return specs, payloads


class _FrameBackend:
    """Evaluates SecureDataFrame plans through the session's ``frame.collect`` service."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def collect(self, plan_json: str, **options: Any) -> tuple[Any, Any]:
        from mesatee_notebook.remote.frame import DPResult

        res = self._session.call("frame.collect", {"plan": plan_json, **options})
        value = res.values.get("result")
        if "dp" in res.info:
            value = DPResult(value, res.values.get("accuracy"), res.info["dp"], res.receipt)
        return value, res.receipt

    def privacy_budget(self, name: str) -> dict[str, Any] | None:
        budget = self._session.call("frame.budget", {"name": name}).info.get("privacy_budget")
        return None if budget is None else dict(budget)


def _echo(name: str, text: str) -> None:
    stream = sys.stderr if name == "stderr" else sys.stdout
    stream.write(text)
    stream.flush()


@public_api
def connect(
    url: str | None = None,
    *,
    policy: Policy | None = None,
    session: str = "default",
    allow_unprotected: bool = False,
    timeout: float = 30.0,
    identity: Any = None,
) -> Session:
    """Connect to an enclave kernel, attest it, and open a session.

    With no ``url``, start (or reuse) the local embedded softtee kernel and pin the
    platform key it created. With a ``mesatee://host:port`` URL, the ``policy`` names the
    platform roots, measurements and minimum level to accept. ``identity`` is this party's
    key directory (created on first use; default ``~/.config/mesatee_notebook/identity``), a
    PartyIdentity, or False to stay anonymous; the key is proven on the verified channel.
    """
    if url is None:
        from mesatee_notebook.remote.embedded import ensure_embedded_kernel

        host, port, fp = ensure_embedded_kernel()
        url = f"mesatee://{host}:{port}"
        pol = policy or Policy(platform_roots=[fp], allow_unprotected=allow_unprotected)
    else:
        pol = policy or Policy(allow_unprotected=allow_unprotected)
    if allow_unprotected and not pol.allow_unprotected:
        from dataclasses import replace

        pol = replace(pol, allow_unprotected=True)
    channel = open_channel(url, pol, timeout=timeout)
    try:
        party = None
        if identity is not False:
            from mesatee_notebook.remote.party_key import PartyIdentity

            if isinstance(identity, PartyIdentity):
                ident = identity
            else:
                ident = PartyIdentity.load_or_create(None if identity is None else Path(identity).expanduser())
            party = channel.authenticate(ident)
            return Session(channel, session, party, identity=ident)
        return Session(channel, session, party)
    except BaseException:
        channel.close()
        raise
