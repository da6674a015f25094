"""The supervisor's half of running a registered function (issue 17): a fresh sandboxed executor per run.

The service worker decides *whether* a task may run (approvals, input digests) and packs the function with its
bound inputs; it never runs the function itself. It asks the supervisor (``faas.run``), which starts a new
:class:`~mesatee_notebook.enclave.sessions.ExecutorHandle` in its own sandbox (bubblewrap, its own uid, seccomp,
Landlock, no network, a private /tmp, and not the host directory shared with cells), sends it one cell that calls
:func:`mesatee_notebook.enclave.faas_runtime.run_blob`, answers none of its requests (no sealed storage, no datasets,
no keys: only the bound inputs are reachable), and kills it afterwards. The function's stdout/stderr are dropped
(they could carry data to the host log).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Final

from mesatee_notebook.enclave.ipc import ipc_send
from mesatee_notebook.enclave.ipc import unpack_values as ipc_unpack
from mesatee_notebook.enclave.sessions import ExecutorHandle
from mesatee_notebook.errors import MesateeError, PolicyViolation, error_from_wire
from mesatee_notebook.wire.codecs import decode_value, encode_value

if TYPE_CHECKING:
    from mesatee_notebook.enclave.kernel import Kernel
    from mesatee_notebook.wire.stream import Message

__all__ = ["HARNESS", "cell_key_call", "run_function"]

log = logging.getLogger("mesatee.enclave")
HARNESS: Final = (
    "from mesatee_notebook.enclave.faas_runtime import run_blob as _run_blob\n"
    "faas_out = _run_blob(faas_blob)\n"
    "del faas_blob, _run_blob\n"
)
_DEFAULT_TIMEOUT: Final = 600.0


def run_function(kernel: Kernel, blob: bytes, timeout: float | None = None) -> bytes:
    """Run the packed function ``blob`` in a new sandboxed executor; return its packed result."""
    sandbox = kernel.sandbox
    if sandbox is None:
        log.warning("running a registered function WITHOUT a sandbox (--no-sandbox)")
    else:
        # A cell's sandbox, minus the host directory shared with cells (serve --untrusted-dir): a function
        # could write its inputs there for the host to read.
        sandbox = dataclasses.replace(sandbox, untrusted_dir=None)
    handle = ExecutorHandle(kernel.config.executor_memory, sandbox=sandbox)
    try:
        enc = encode_value(blob)
        spec = {"name": "faas_blob", "kind": enc.kind, "meta": enc.meta, "inline": 0}
        payload = b"".join(bytes(memoryview(p).cast("B")) for p in enc.parts)

        def on_message(m: Message) -> bool:
            if m.type in ("stream", "log", "progress"):
                return False  # dropped: a function's prints could carry data to the host
            if m.type in ("seal.get", "seal.put", "seal.list", "seal.delete", "data.get", "audit"):
                err = PolicyViolation("a registered function reaches only its bound inputs")
                ipc_send(handle.sock, {"t": "error", **err.to_wire()})
                return False
            return True

        limit = min(float(timeout or _DEFAULT_TIMEOUT), kernel.config.max_cell_timeout)
        cpu = kernel.sandbox.limits.cell_cpu if kernel.sandbox is not None else None
        result = handle.exchange(
            {"t": "execute", "code": HARNESS, "inputs": [spec], "outputs": ["faas_out"], "allow_pickle": False},
            [payload],
            [],
            on_message,
            limit,
            cell_cpu=cpu,
        )
        if result.type == "error":
            raise error_from_wire(
                {
                    "code": result.header.get("code"),
                    "message": result.header.get("message"),
                    "details": _safe_details(result.header.get("details")),
                }
            )
        for vspec, buf in ipc_unpack(result.header.get("values", []), result):
            if vspec.get("name") == "out/faas_out":
                value = decode_value(str(vspec["kind"]), buf, meta=vspec.get("meta"))
                return bytes(value)
        msg = "the function's executor returned no result"
        raise MesateeError(msg)
    finally:
        handle.kill()


def _safe_details(details: Any) -> dict[str, Any]:
    """Keep the typed details (limit names, numbers), drop tracebacks (they could quote data)."""
    if not isinstance(details, dict):
        return {}
    return {k: v for k, v in details.items() if k in {"limit", "allowed", "used", "exit_code", "fuel", "trap", "ename"}}


_CELL_KEY_OPS: Final = frozenset({"sign", "verify", "encrypt", "decrypt", "info"})


def cell_key_call(kernel: Kernel, m: Message, party: str | None) -> bytes:
    """A cell's ``mesatee.keys.<op>``: run the ``key.<op>`` service as the session's party; pack what it returns.

    The service worker does the cryptography (the cell never holds key bytes) and audits the use as this party.
    """
    from mesatee_notebook.enclave.services.jobstore import pack_values, unpack_values

    op = str(m.header.get("op", ""))
    if op not in _CELL_KEY_OPS:
        msg = f"mesatee.keys has no operation {op!r} (cells can {', '.join(sorted(_CELL_KEY_OPS))})"
        raise PolicyViolation(msg)
    if party is None:
        msg = "mesatee.keys needs a session opened by a proven party (connect with an identity)"
        raise PolicyViolation(msg)
    values, extra = unpack_values(bytes(m.payloads[0]) if m.payloads else b"")
    specs: list[dict[str, Any]] = []
    payloads: list[Any] = []
    for name, value in values.items():
        enc = encode_value(value)
        specs.append({"name": name, "kind": enc.kind, "meta": enc.meta, "inline": len(payloads)})
        payloads.append(b"".join(bytes(memoryview(p).cast("B")) for p in enc.parts))

    def answer(worker: ExecutorHandle, mm: Message) -> bool:
        if mm.type in ("seal.get", "seal.put", "seal.list", "seal.delete", "audit"):
            kernel.handle_executor_request(worker, mm, prefix="svc", party=party, service=True)
            return False
        return mm.type not in ("log", "progress")

    header = {
        "t": "call",
        "service": f"key.{op}",
        "args": dict(extra.get("args") or {}),
        "party": party,
        "inputs": specs,
    }
    result = _run_service(kernel, party, header, payloads, answer)
    if result.type == "error":
        raise error_from_wire(
            {
                "code": result.header.get("code"),
                "message": result.header.get("message"),
                "details": result.header.get("details") or {},
            }
        )
    out = {
        str(vspec["name"]).removeprefix("out/"): decode_value(str(vspec["kind"]), buf, meta=vspec.get("meta"))
        for vspec, buf in ipc_unpack(result.header.get("values", []), result)
    }
    return pack_values(out, info=result.header.get("info") or {})


def _run_service(kernel: Kernel, party: str, header: dict[str, Any], payloads: list[Any], answer: Any) -> Message:
    """Run a service call for ``party`` in the kernel's service-worker pools (fair queue per party)."""
    import secrets

    return kernel.run_service(party, secrets.token_hex(16), header, payloads, [], answer, 60.0)
