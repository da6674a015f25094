"""What a receipt says about a cell or a service call, built in one place; and the one timeout clamp.

The connection (``enclave/connection.py``) hands inputs on to an executor with :func:`forward_inputs` (their digests
become the receipt's ``inputs``), reads the executor's result with :func:`result_values` (their digests become the
receipt's subjects), and signs with :func:`sign` over :func:`predicate`.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import TYPE_CHECKING, Any

from mesatee_notebook.attestation.receipts import build_receipt
from mesatee_notebook.enclave.ipc import unpack_values
from mesatee_notebook.wire.digest import payload_digest
from mesatee_notebook.wire.protocol import ExecutorError, ValueSpec
from mesatee_notebook.wire.stream import Message

if TYPE_CHECKING:
    from mesatee_notebook.enclave.kernel_keys import KernelIdentity
    from mesatee_notebook.enclave.shm import SharedAllocator

__all__ = ["clamp_timeout", "forward_inputs", "predicate", "raise_if_error", "result_values", "sign"]


def clamp_timeout(requested: float | None, limit: float) -> float:
    """The seconds a cell or call may run: what the client asked for (if anything), at most the kernel's limit."""
    return limit if requested is None or requested <= 0 else min(float(requested), limit)


def forward_inputs(
    inputs: tuple[ValueSpec, ...], msg: Message, alloc: SharedAllocator
) -> tuple[dict[str, str], list[dict[str, Any]], list[Any], list[int]]:
    """Input digests, and specs/payloads/fds to hand the inputs on to an executor without copying."""
    digests = msg.digests or []
    input_digests: dict[str, str] = {}
    specs: list[dict[str, Any]] = []
    payloads: list[Any] = []
    fds: list[int] = []
    for i, (spec, buf) in enumerate(zip(inputs, msg.payloads, strict=True)):
        input_digests[spec.name] = digests[i]
        out: dict[str, Any] = spec.to_wire()
        fd = alloc.fd_of(buf)
        if fd is not None:
            out["fd"] = len(fds)
            fds.append(os.dup(fd))
        else:
            out["inline"] = len(payloads)
            payloads.append(buf)
        specs.append(out)
    return input_digests, specs, payloads, fds


def raise_if_error(result: Message) -> None:
    """Raise an executor's error reply as its local error class."""
    if result.type == "error":
        from mesatee_notebook.errors import error_from_wire

        raise error_from_wire(ExecutorError.from_header(result.header).wire())


def result_values(result: Message) -> tuple[dict[str, str], list[dict[str, Any]], list[Any]]:
    """Digests (receipt subjects), specs and buffers of an executor's result values."""
    subjects: dict[str, str] = {}
    specs: list[dict[str, Any]] = []
    buffers: list[Any] = []
    for spec, buf in unpack_values(result.header.get("values", []), result):
        subjects[str(spec["name"])] = payload_digest(memoryview(buf).cast("B"))
        specs.append({"name": spec["name"], "kind": spec["kind"], "meta": spec.get("meta") or {}})
        buffers.append(buf)
    return subjects, specs, buffers


def predicate(
    kind: str,
    identity: KernelIdentity,
    *,
    party: str | None,
    session: str | None,
    nonce: str,
    code_sha256: str,
    inputs: dict[str, str],
    started: float,
    service: str | None = None,
) -> dict[str, Any]:
    """The receipt's predicate for an ``execute`` (a cell) or a ``call`` (a service); finished now."""
    head: dict[str, Any] = {"kind": kind}
    if service is not None:
        head["service"] = service
    return {
        **head,
        "party": party,
        "measurement": identity.measurement,
        "level": identity.level.label,
        **identity.tpm_claims,
        "session": session,
        "nonce": nonce,
        "code": {"sha256": code_sha256},
        "inputs": inputs,
        "startedAt": started,
        "finishedAt": time.time(),
    }


def sign(identity: KernelIdentity, subjects: dict[str, str], pred: dict[str, Any]) -> dict[str, Any]:
    """A receipt signed with the kernel's receipt key, bound to its certificate."""
    return build_receipt(
        subjects=subjects,
        predicate=pred,
        certificate_der=identity.certificate_der,
        sign=identity.sign_receipt,
        keyid=hashlib.sha256(identity.receipt_public).hexdigest()[:16],
    )
