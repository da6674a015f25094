"""Client side of functions as a service and the KeyStore (issue 17): ``Session.functions``, ``.tasks``, ``.keys``.

Every call goes over the session's attested channel as its proven party and comes back with a verified receipt
(``CallResult.receipt``; ``last_receipt`` on the objects below).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mesatee_notebook.errors import EncodingError, MesateeError, NotFound, error_from_wire

if TYPE_CHECKING:
    from mesatee_notebook.attestation.receipts import Receipt
    from mesatee_notebook.remote.jobs import JobStatus
    from mesatee_notebook.remote.session import CallResult, Session

__all__ = ["FunctionsClient", "KeysClient", "SecureFunction", "TaskResult", "TasksClient"]


@dataclass(frozen=True)
class SecureFunction:
    """A registered function as every party sees it: interface, digest, and (after ``get``) its code."""

    name: str
    digest: str
    lang: str
    entry: str
    inputs: list[str]
    outputs: list[str]
    description: str
    registered_by: str
    size: int
    code: str | bytes | None = field(default=None, repr=False)
    info: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_info(cls, info: Mapping[str, Any], code: str | bytes | None = None) -> SecureFunction:
        """Build from a ``function.*`` reply."""
        return cls(
            name=str(info["name"]),
            digest=str(info["digest"]),
            lang=str(info["lang"]),
            entry=str(info["entry"]),
            inputs=list(info.get("inputs") or []),
            outputs=list(info.get("outputs") or []),
            description=str(info.get("description") or ""),
            registered_by=str(info.get("registered_by", "")),
            size=int(info.get("size") or 0),
            code=code,
            info=dict(info),
        )

    def __repr__(self) -> str:
        ins = ", ".join(self.inputs)
        outs = ", ".join(self.outputs) or "result"
        return (
            f"<SecureFunction {self.name}({ins}) -> {outs} [{self.lang}, {self.size} bytes] "
            f"digest={self.digest[:16]}… by {self.registered_by[:16]}>"
        )

    def _repr_html_(self) -> str:
        e = html.escape
        rows = [
            ("digest", f"<code>{e(self.digest)}</code>"),
            (
                "language",
                e(self.lang)
                + (" (wasmtime, WASI, fuel-metered)" if self.lang == "wasm" else " (fresh sandboxed executor)"),
            ),
            ("entry", f"<code>{e(self.entry)}</code>"),
            ("inputs", e(", ".join(self.inputs)) or "none"),
            ("outputs", e(", ".join(self.outputs)) or "result"),
            ("registered by", f"<code>{e(self.registered_by)}</code>"),
            ("size", f"{self.size} bytes"),
        ]
        body = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>" for k, v in rows)
        code = ""
        if isinstance(self.code, str):
            code = f"<details><summary>source</summary><pre>{e(self.code)}</pre></details>"
        elif isinstance(self.code, bytes):
            code = f"<details><summary>module</summary><pre>{e(self.code[:64].hex())}…</pre></details>"
        desc = f"<p>{e(self.description)}</p>" if self.description else ""
        return f"<div><b>SecureFunction {e(self.name)}</b>{desc}<table>{body}</table>{code}</div>"


@dataclass(frozen=True)
class TaskResult:
    """A receiver's result: the function's outputs, the task's facts, and the verified receipt."""

    name: str
    values: dict[str, Any]
    function: str
    inputs: dict[str, str]
    approvals: list[str]
    fuel: int | None
    dataset: str | None
    receipt: Receipt = field(repr=False)
    info: dict[str, Any] = field(repr=False)

    @property
    def value(self) -> Any:
        """The single output (``result`` for a Python function, ``stdout`` for WebAssembly)."""
        if len(self.values) != 1:
            msg = f"this task has several outputs: {sorted(self.values)}; use .values"
            raise EncodingError(msg)
        return next(iter(self.values.values()))


class FunctionsClient:
    """Register, read and list functions (``function.*`` services)."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self.last_receipt: Receipt | None = None

    def register(
        self,
        name: str,
        *,
        python: str | None = None,
        wasm: bytes | None = None,
        entry: str | None = None,
        inputs: Sequence[str] = (),
        outputs: Sequence[str] = (),
        description: str = "",
        raw_inputs: Sequence[str] = (),
    ) -> SecureFunction:
        """Seal a function in the enclave; return it (``.digest`` is what owners approve).

        ``raw_inputs`` (WebAssembly): inputs passed as their one numeric column's little-endian values instead of
        an Arrow IPC stream.
        """
        if (python is None) == (wasm is None):
            msg = "give exactly one of python=<source text> or wasm=<module bytes>"
            raise EncodingError(msg)
        lang = "python" if python is not None else "wasm"
        args = {
            "name": name,
            "lang": lang,
            "entry": entry,
            "inputs": list(inputs),
            "outputs": list(outputs),
            "description": description,
            "raw_inputs": list(raw_inputs),
        }
        res = self._session.call("function.register", args, {"code": python if python is not None else wasm})
        self.last_receipt = res.receipt
        return SecureFunction.from_info(res.info, python if python is not None else wasm)

    def get(self, digest: str | SecureFunction) -> SecureFunction:
        """The function with this digest, with its code, to read before approving."""
        d = digest.digest if isinstance(digest, SecureFunction) else digest
        res = self._session.call("function.get", {"function": d})
        self.last_receipt = res.receipt
        return SecureFunction.from_info(res.info, res.values.get("code"))

    def builtin(self, name: str) -> SecureFunction:
        """A built-in function (registered by the enclave at start), with its source to read before approving."""
        found = [f for f in self.list() if f.registered_by == "enclave" and f.name == name]
        if not found:
            names = sorted({f.name for f in self.list() if f.registered_by == "enclave"})
            msg = f"no built-in function {name!r} (built-ins: {', '.join(names)})"
            raise NotFound(msg, function=name)
        return self.get(found[-1].digest)

    def list(self) -> list[SecureFunction]:
        """Every registered function (without code)."""
        return [SecureFunction.from_info(f) for f in self._session.call("function.list").info.get("functions", [])]


class TasksClient:
    """Tasks: a registered function over datasets, approved by each dataset's owner (the jobs path)."""

    def __init__(self, session: Session) -> None:
        self._session = session
        from mesatee_notebook.remote.jobs import JobsClient

        self._jobs = JobsClient(session)

    def create(
        self,
        name: str,
        *,
        function: str | SecureFunction,
        inputs: Mapping[str, str],
        args: Mapping[str, Any] | None = None,
        receivers: Sequence[str] | None = None,
        limits: Mapping[str, float] | None = None,
        output_dataset: str | None = None,
        keys: Sequence[str] | None = None,
        approve: bool = True,
    ) -> JobStatus:
        """Create task ``name``; ``inputs`` maps each function input to a dataset. A creator who owns one approves.

        ``keys`` names KeyStore keys the (Python) function may use as ``mesatee.keys``, acting as this party (the
        task's creator, who must own or be a user of each); every data owner approves that list with the task.
        """
        from mesatee_notebook.remote.jobs import JobStatus

        digest = function.digest if isinstance(function, SecureFunction) else function
        call_args = {
            "name": name,
            "function": digest,
            "inputs": dict(inputs),
            "args": dict(args or {}),
            "receivers": list(receivers or []),
            "limits": dict(limits or {}),
            "output_dataset": output_dataset,
        }
        if keys:
            call_args["keys"] = list(keys)
        status = JobStatus.from_info(self._session.call("job.create_task", call_args).info)
        if approve and self._session.party_id in status.owners.values():
            return self.approve(name, spec_digest=status.spec_digest)
        return status

    def status(self, name: str) -> JobStatus:
        """The task as a party to it sees it (function digest, args, receivers, approvals)."""
        return self._jobs.status(name)

    def approve(self, name: str, *, spec_digest: str | None = None) -> JobStatus:
        """Approve (only ``spec_digest``, if given: the exact function digest, args and receivers you checked)."""
        return self._jobs.approve(name, spec_digest=spec_digest)

    def reject(self, name: str) -> JobStatus:
        """Refuse the task (an input owner or its creator): it is cancelled and its sealed inputs deleted."""
        return self._jobs.cancel(name)

    def list(self) -> list[JobStatus]:
        """Tasks that concern this party."""
        return [j for j in self._jobs.list() if j.kind == "faas.task"]

    def result(self, name: str) -> TaskResult:
        """A receiver's result; a failed task raises its typed error (e.g. ``ResourceExhausted``)."""
        status = self.status(name)
        if status.state == "failed" and status.error:
            raise _task_error(name, status.error)
        res: CallResult = self._session.call("job.result", {"job": name})
        extra = dict(res.info.get("result") or {})
        return TaskResult(
            name=name,
            values=res.values,
            function=str(extra.get("function")),
            inputs=dict(extra.get("inputs") or {}),
            approvals=list(extra.get("approvals") or []),
            fuel=extra.get("fuel"),
            dataset=extra.get("dataset"),
            receipt=res.receipt,
            info=dict(res.info),
        )


_CODES = {
    "ResourceExhausted": "remote.limit.exhausted",
    "ResourceLimitExceeded": "remote.limit",
    "WasmError": "remote.wasm",
    "PolicyViolation": "policy",
    "NotFound": "not-found",
    "TamperedData": "sealing.tampered",
    "RemoteTimeout": "remote.timeout",
}


def _task_error(name: str, error: str) -> MesateeError:
    cls, _, message = error.partition(": ")
    code = _CODES.get(cls, "remote")
    return error_from_wire(
        {"code": code, "message": f"task {name!r} failed: {message or error}", "details": {"task": name}}
    )


class KeysClient:
    """Keys held in the enclave (``key.*`` services); the private material never leaves it."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self.last_receipt: Receipt | None = None

    def _call(self, service: str, args: Mapping[str, Any], inputs: Mapping[str, Any] | None = None) -> CallResult:
        res = self._session.call(service, args, inputs)
        self.last_receipt = res.receipt
        return res

    def create(self, name: str, kind: str = "ed25519", *, users: Sequence[str] = ()) -> dict[str, Any]:
        """Make a key owned by this party; ``users`` may use it too. Returns its info (``public_key`` PEM)."""
        return self._call("key.create", {"name": name, "kind": kind, "users": list(users)}).info

    generate = create

    def info(self, name: str) -> dict[str, Any]:
        """Kind, owner, users, versions and public key (owner and users only)."""
        return self._call("key.info", {"name": name}).info

    def public_key(self, name: str, *, version: int | None = None) -> str:
        """The PEM public key (``NotFound`` style error for symmetric keys, which have none)."""
        pem = self._call("key.info", {"name": name, "version": version}).info.get("public_key")
        if not pem:
            msg = f"key {name!r} is symmetric: it has no public key"
            raise EncodingError(msg)
        return str(pem)

    def list(self) -> list[dict[str, Any]]:
        """Keys this party owns or may use."""
        return list(self._call("key.list", {}).info.get("keys", []))

    def sign(self, name: str, data: bytes | str) -> bytes:
        """Sign with the key's current version."""
        return bytes(self._call("key.sign", {"name": name}, {"data": _b(data)}).values["signature"])

    def verify(self, name: str, data: bytes | str, signature: bytes, *, version: int | None = None) -> bool:
        """Whether ``signature`` is the key's over ``data``."""
        res = self._call("key.verify", {"name": name, "version": version}, {"data": _b(data), "signature": signature})
        return bool(res.info.get("valid"))

    def encrypt(self, name: str, data: bytes | str, *, aad: bytes | None = None) -> bytes:
        """AEAD (``aes-256-gcm``) or RSA-OAEP (``rsa-3072``) encryption in the enclave."""
        inputs = {"data": _b(data)} | ({} if aad is None else {"aad": _b(aad)})
        return bytes(self._call("key.encrypt", {"name": name}, inputs).values["ciphertext"])

    def decrypt(self, name: str, ciphertext: bytes, *, aad: bytes | None = None) -> bytes:
        """Decrypt what ``encrypt`` made; a forged or altered ciphertext raises ``PolicyViolation``."""
        inputs = {"ciphertext": _b(ciphertext)} | ({} if aad is None else {"aad": _b(aad)})
        return bytes(self._call("key.decrypt", {"name": name}, inputs).values["plaintext"])

    def rotate(self, name: str) -> dict[str, Any]:
        """Owner only: a new current version (old ones still verify and decrypt)."""
        return self._call("key.rotate", {"name": name}).info

    def destroy(self, name: str) -> dict[str, Any]:
        """Owner only: the key can never be used again, even after a restart."""
        return self._call("key.destroy", {"name": name}).info

    def wrap(self, name: str, key_material: bytes) -> bytes:
        """Wrap ``key_material`` under ``aes-256-gcm`` key ``name`` (AES key wrap with padding, RFC 5649)."""
        return bytes(self._call("key.wrap", {"name": name}, {"key": _b(key_material)}).values["wrapped"])

    def unwrap(self, name: str, wrapped: bytes) -> bytes:
        """The key material ``wrap`` wrapped; an altered or foreign one raises ``PolicyViolation``."""
        return bytes(self._call("key.unwrap", {"name": name}, {"wrapped": _b(wrapped)}).values["key"])


def _b(data: bytes | str) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    msg = f"give bytes or text, not {type(data).__name__}"
    raise EncodingError(msg)
