"""Jobs in the service worker: a :class:`~mesatee_notebook.enclave.jobs.JobStore` over ``ctx.seal_*``/``ctx.audit``.

The service worker holds no keys, so the job store's sealed storage and audit log are views that go through the
supervisor for the current call (:class:`ServiceBlobStore`, :class:`ServiceAudit`). There is one service worker per
kernel and it runs one call at a time, so one ``JobStore`` per worker (kept in ``ctx.state``) is the single writer of
``svc/jobs/``; a restarted worker (or kernel) rebuilds it from sealed storage.

Job inputs and results are sealed as *packed values*: a small self-describing container of encoded values (the same
codecs as the wire), so any value a party can send can be a job input and be decoded again after a restart::

    "MTJV1" LF | u32 BE header length | JSON header {"parts": [{name, kind, meta, size}], ...extra} | part bytes...
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any, Final

from mesatee_notebook.attestation.audit_verify import ALL_PARTIES
from mesatee_notebook.enclave.jobs import Job, JobStore
from mesatee_notebook.enclave.services import ServiceContext
from mesatee_notebook.errors import EncodingError, MalformedFrame, NotFound, PolicyViolation
from mesatee_notebook.wire.codecs import decode_value, encode_value

__all__ = [
    "ServiceAudit",
    "ServiceBlobStore",
    "job_id_for_name",
    "job_store",
    "pack_values",
    "refuse",
    "resolve_job",
    "unpack_values",
]

_MAGIC: Final = b"MTJV1\n"
_LEN: Final = struct.Struct(">I")
_NAME: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_JOB_ID: Final = re.compile(r"^[0-9a-f]{32}$")
_STATE_KEY: Final = "jobs.store"


class ServiceBlobStore:
    """A ``SealedStore``-like view of the supervisor's sealed storage under ``svc/`` for the current call."""

    def __init__(self) -> None:
        self.ctx: ServiceContext | None = None

    def _c(self) -> ServiceContext:
        if self.ctx is None:
            msg = "the job store is used outside a service call"
            raise RuntimeError(msg)
        return self.ctx

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Seal ``data`` under ``name``."""
        self._c().seal_put(name, data)

    def get(self, name: str) -> bytes:
        """Read a sealed blob (``NotFound``, ``TamperedData``)."""
        return self._c().seal_get(name)

    def list(self, prefix: str = "") -> list[str]:
        """Names starting with ``prefix``."""
        return [n for n in self._c().seal_list(prefix) if n.startswith(prefix)]

    def delete(self, name: str) -> None:
        """Delete a sealed blob."""
        self._c().seal_delete(name)


class ServiceAudit:
    """An ``AuditLog``-like view of the kernel's audit log; the kernel records the calling party itself."""

    def __init__(self) -> None:
        self.ctx: ServiceContext | None = None

    def append(
        self, kind: str, party: str | None, details: Mapping[str, Any] | None = None, *, concerns: Iterable[str] = ()
    ) -> None:
        """Append an entry; an event the enclave itself caused (``party=None``) is marked ``actor: enclave``."""
        if self.ctx is None:
            msg = "the audit log is used outside a service call"
            raise RuntimeError(msg)
        extra = {"actor": "enclave"} if party is None else {}
        self.ctx.audit(kind, {**dict(details or {}), **extra}, concerns=sorted(set(concerns)))


def job_store(ctx: ServiceContext) -> JobStore:
    """Return this worker's job store, bound to the current call (built from sealed storage on first use)."""
    entry = ctx.state.get(_STATE_KEY)
    if entry is None:
        blobs, audit = ServiceBlobStore(), ServiceAudit()
        blobs.ctx, audit.ctx = ctx, ctx
        store = JobStore(blobs, audit)
        for job_id, why in sorted(store.damaged.items()):
            # Reported, never silently dropped: the job stays listed and every access to it fails. Told to every party
            # (unlike a worker's restart, which is scoped to whose call it was): no party's call caused it (sealed job
            # data failed to authenticate, i.e. the host changed it, or a crash of the kernel), the job store is the
            # one every party's jobs live in, and the job id is a hash of its name (job names are global in a kernel).
            ctx.audit("recovery", {"job_id": job_id, "damaged": why}, concerns=[ALL_PARTIES])
        ctx.state[_STATE_KEY] = (store, blobs, audit)
        return store
    store, blobs, audit = entry
    blobs.ctx, audit.ctx = ctx, ctx
    assert isinstance(store, JobStore)
    return store


def job_id_for_name(name: str) -> str:
    """The job id of a named job: names are global in a kernel, like dataset names."""
    if not isinstance(name, str) or not _NAME.match(name):
        msg = f"invalid job name {name!r}: use letters, digits and _.- (at most 100 characters)"
        raise EncodingError(msg)
    return hashlib.sha256(b"mesatee-notebook job name\x00" + name.encode()).hexdigest()[:32]


def resolve_job(store: JobStore, ref: object) -> Job:
    """The job named (or with the id) ``ref``; ``NotFound`` says which."""
    if not isinstance(ref, str) or not ref:
        msg = "name the job: pass its name (or its 32-hex id)"
        raise EncodingError(msg)
    if _JOB_ID.match(ref):
        try:
            return store.get(ref)
        except NotFound:
            pass
    try:
        return store.get(job_id_for_name(ref))
    except NotFound:
        msg = f"no job named {ref!r} in this kernel"
        raise NotFound(msg, job=ref) from None


def refuse(ctx: ServiceContext, job: Job, message: str, **details: Any) -> PolicyViolation:
    """Audit a refusal about ``job`` (visible to all its parties) and return the error to raise."""
    name = job.spec.params.get("name")
    label = f"job {name!r}" if isinstance(name, str) else f"job {job.job_id}"
    ctx.audit("refusal", {"job_id": job.job_id, "reason": message, **details}, concerns=sorted(job.spec.parties))
    return PolicyViolation(f"{label}: {message}", job_id=job.job_id)


def pack_values(values: Mapping[str, Any], **extra: Any) -> bytes:
    """Encode named values (and JSON ``extra``) into one sealed-able blob."""
    parts: list[dict[str, Any]] = []
    bodies: list[memoryview] = []
    for name, value in values.items():
        enc = encode_value(value)
        views = [memoryview(p).cast("B") for p in enc.parts]
        parts.append({"name": name, "kind": enc.kind, "meta": enc.meta, "size": sum(v.nbytes for v in views)})
        bodies += views
    header = json.dumps({"parts": parts, **extra}, sort_keys=True).encode()
    return b"".join([_MAGIC, _LEN.pack(len(header)), header, *bodies])  # one copy of the bodies


def unpack_values(blob: bytes | memoryview) -> tuple[dict[str, Any], dict[str, Any]]:
    """Decode :func:`pack_values`' blob into (values, extra)."""
    view = memoryview(blob).cast("B")
    if bytes(view[: len(_MAGIC)]) != _MAGIC or view.nbytes < len(_MAGIC) + _LEN.size:
        msg = "a sealed job value has an unknown format"
        raise MalformedFrame(msg)
    (hlen,) = _LEN.unpack_from(view, len(_MAGIC))
    start = len(_MAGIC) + _LEN.size
    header = json.loads(bytes(view[start : start + hlen]))
    pos = start + hlen
    values: dict[str, Any] = {}
    for part in header.pop("parts"):
        size = int(part["size"])
        values[str(part["name"])] = decode_value(str(part["kind"]), view[pos : pos + size], meta=part.get("meta"))
        pos += size
    if pos != view.nbytes:
        msg = "a sealed job value has trailing bytes"
        raise MalformedFrame(msg)
    return values, header
