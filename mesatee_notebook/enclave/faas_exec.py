"""The supervisor's half of running a registered function (issue 17): a never-used sandboxed executor per run.

The service worker decides *whether* a task may run (approvals, input digests) and packs the function with its
bound inputs; it never runs the function itself. It asks the supervisor (``faas.run``), which takes an executor
from its :class:`FunctionPool` (each in its own sandbox: bubblewrap, its own uid, seccomp, Landlock, no network, a
private /tmp, and not the host directory shared with cells), sends it one cell that calls
:func:`mesatee_notebook.enclave.faas_runtime.run_blob`, and kills it afterwards: no executor runs two functions,
so no task sees another's data. The pool starts executors ahead of time and warms each with a fixed import cell
(no data), so a run does not wait for bubblewrap and the imports of numpy/pandas/pyarrow/wasmtime.

During the run the supervisor answers none of the executor's requests (no sealed storage, no datasets), except
``key.call`` for the keys the task names (``keys=[...]``, part of the spec every data owner approved): those run
the ``key.*`` service as the task's creator, and each use is audited with the task id. The function's
stdout/stderr are dropped (they could carry data to the host log).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from mesatee_notebook.enclave.ipc import ipc_send
from mesatee_notebook.enclave.ipc import unpack_values as ipc_unpack
from mesatee_notebook.enclave.sessions import ExecutorHandle
from mesatee_notebook.errors import MesateeError, NotAvailableYet, PolicyViolation, error_from_wire
from mesatee_notebook.wire.codecs import decode_value, encode_value

if TYPE_CHECKING:
    from mesatee_notebook.enclave.kernel import Kernel
    from mesatee_notebook.wire.stream import Message

__all__ = ["HARNESS", "FunctionPool", "KeyGrant", "cell_key_call", "function_pool", "run_function", "shutdown_pool"]

log = logging.getLogger("mesatee.enclave")
HARNESS: Final = (
    "from mesatee_notebook.enclave.faas_runtime import run_blob as _run_blob\n"
    "faas_out = _run_blob(faas_blob, mesatee.keys)\n"
    "del faas_blob, _run_blob\n"
)
#: Run once in every pooled executor before it is handed out: imports only, no data.
WARM: Final = (
    "import numpy, pandas, pyarrow, wasmtime\n"
    "import mesatee_notebook.enclave.faas_runtime, mesatee_notebook.enclave.services.jobstore\n"
)
_DEFAULT_TIMEOUT: Final = 600.0
#: How many warmed executors wait for functions (``MESATEE_FUNCTION_POOL``; 0 starts one per run, as before).
POOL_ENV: Final = "MESATEE_FUNCTION_POOL"
_DEFAULT_POOL: Final = 1
_MAX_POOL: Final = 4
_TAKE_WAIT: Final = 30.0  # at most this long for a starting executor before starting another
_STORAGE: Final = frozenset({"seal.get", "seal.put", "seal.list", "seal.delete", "data.get", "audit"})


@dataclasses.dataclass(frozen=True)
class KeyGrant:
    """The keys a task's function may use, as whom, and for which task (from the trusted service worker)."""

    act_as: str | None = None
    keys: tuple[str, ...] = ()
    task: str | None = None
    parties: tuple[str, ...] = ()

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> KeyGrant:
        keys = header.get("keys") or []
        parties = header.get("parties") or []
        act_as = header.get("act_as")
        return cls(
            act_as=str(act_as) if isinstance(act_as, str) and act_as else None,
            keys=tuple(str(k) for k in keys) if isinstance(keys, list) else (),
            task=str(header["task"]) if header.get("task") else None,
            parties=tuple(str(p) for p in parties) if isinstance(parties, list) else (),
        )


class FunctionPool:
    """Warmed sandboxed executors for registered functions; each serves one run and is then killed."""

    def __init__(self, start: Callable[[], ExecutorHandle], size: int) -> None:
        self._start = start
        self.size = size
        self._ready: list[ExecutorHandle] = []
        self._filling = 0
        self._cond = threading.Condition()
        self._closed = False

    def take(self) -> ExecutorHandle:
        """A warmed executor that never ran a function; refills behind it.

        With none ready, it waits for one already starting (sooner than starting another beside it on the same
        cores), and starts one itself only when none is on its way.
        """
        handle = None
        deadline = time.monotonic() + _TAKE_WAIT
        with self._cond:
            while handle is None and not self._closed:
                while self._ready and handle is None:
                    candidate = self._ready.pop()
                    if candidate.alive:
                        handle = candidate
                    else:
                        candidate.kill()
                left = deadline - time.monotonic()
                if handle is not None or self._filling == 0 or left <= 0:
                    break
                self._cond.wait(left)
        self.refill()
        return handle if handle is not None else self._start()

    def refill(self) -> None:
        """Start executors in the background until ``size`` are ready or starting."""
        with self._cond:
            missing = self.size - len(self._ready) - self._filling
            if self._closed or missing <= 0:
                return
            self._filling += missing
        for _ in range(missing):
            threading.Thread(target=self._fill_one, name="mesatee-function-pool", daemon=True).start()

    def _fill_one(self) -> None:
        handle: ExecutorHandle | None = None
        try:
            handle = self._start()
            _warm(handle)
        except MesateeError as exc:
            log.warning("could not pre-start a function executor: %s", exc)
            if handle is not None:
                handle.kill()
            handle = None
        with self._cond:
            self._filling -= 1
            self._cond.notify_all()
            if handle is not None and not self._closed:
                self._ready.append(handle)
                return
        if handle is not None:
            handle.shutdown()

    def shutdown(self) -> None:
        """Stop every waiting executor; later ``take`` calls start fresh ones (nothing is refilled)."""
        with self._cond:
            self._closed = True
            ready, self._ready = self._ready, []
            self._cond.notify_all()
        for handle in ready:
            handle.shutdown()


def _warm(handle: ExecutorHandle) -> None:
    result = handle.exchange(
        {"t": "execute", "code": WARM, "inputs": [], "outputs": [], "allow_pickle": False},
        [],
        [],
        lambda m: m.type not in ("stream", "log", "progress"),
        120.0,
    )
    if result.type == "error":
        msg = f"the function executor's warm-up failed: {result.header.get('message')}"
        raise MesateeError(msg)


_POOLS_LOCK: Final = threading.Lock()


def _pool_size() -> int:
    raw = os.environ.get(POOL_ENV, "")
    try:
        size = int(raw) if raw else _DEFAULT_POOL
    except ValueError:
        log.warning("%s=%r is not a number; using %d", POOL_ENV, raw, _DEFAULT_POOL)
        size = _DEFAULT_POOL
    return max(0, min(size, _MAX_POOL))


def function_pool(kernel: Kernel) -> FunctionPool:
    """The kernel's pool of function executors (made on first use, sized by ``MESATEE_FUNCTION_POOL``)."""
    with _POOLS_LOCK:
        pool = getattr(kernel, "_function_pool", None)
        if pool is None:
            sandbox = kernel.sandbox
            if sandbox is None:
                log.warning("registered functions run WITHOUT a sandbox (--no-sandbox)")
            else:
                # A cell's sandbox, minus the host directory shared with cells (serve --untrusted-dir): a function
                # could write its inputs there for the host to read.
                sandbox = dataclasses.replace(sandbox, untrusted_dir=None)
            memory = kernel.config.executor_memory
            pool = FunctionPool(lambda: ExecutorHandle(memory, sandbox=sandbox), _pool_size())
            kernel._function_pool = pool  # type: ignore[attr-defined]
        return pool


def shutdown_pool(kernel: Kernel) -> None:
    """Stop the kernel's waiting function executors (at kernel shutdown)."""
    pool = getattr(kernel, "_function_pool", None)
    if pool is not None:
        pool.shutdown()


def run_function(kernel: Kernel, blob: bytes, timeout: float | None = None, header: Any = None) -> bytes:
    """Run the packed function ``blob`` in a never-used sandboxed executor; return its packed result.

    ``header`` is the service worker's ``faas.run`` request: its ``keys``/``act_as``/``task`` say which keys the
    function may use and as whom.
    """
    grant = KeyGrant.from_header(header if isinstance(header, dict) else {})
    handle = function_pool(kernel).take()
    try:
        enc = encode_value(blob)
        spec = {"name": "faas_blob", "kind": enc.kind, "meta": enc.meta, "inline": 0}
        payload = b"".join(bytes(memoryview(p).cast("B")) for p in enc.parts)

        def on_message(m: Message) -> bool:
            if m.type in ("stream", "log", "progress"):
                return False  # dropped: a function's prints could carry data to the host
            if m.type == "key.call":
                _function_key_call(kernel, handle, m, grant)
                return False
            if m.type in _STORAGE:
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
        return _result_blob(result)
    finally:
        handle.kill()


def _result_blob(result: Message) -> bytes:
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


def _function_key_call(kernel: Kernel, handle: ExecutorHandle, m: Message, grant: KeyGrant) -> None:
    """A function's ``mesatee.keys.<op>``: only the task's named keys, as the task's creator; audited per task."""
    try:
        name = _key_name_of(m)
        if not grant.keys or grant.act_as is None:
            msg = "this task names no keys, so its function cannot use any (create the task with keys=[names])"
            raise PolicyViolation(msg)
        if name not in grant.keys:
            named = ", ".join(grant.keys)
            msg = f"key {name!r} is not among the keys this task names ({named}); its function cannot use it"
            raise PolicyViolation(msg, key=name)
        if kernel.config.service_workers <= 0:
            msg = (
                "keys inside registered functions need the service-worker pools (the task holds the one serial "
                "worker); serve with --service-workers 1 or more"
            )
            raise NotAvailableYet(msg)
        out = cell_key_call(kernel, m, grant.act_as)
    except MesateeError as exc:
        concerns = sorted({*grant.parties, grant.act_as or ""} - {""})
        kernel.audit_log.append(
            "refusal", grant.act_as, {"task": grant.task, "via": "function", "reason": exc.message}, concerns=concerns
        )
        ipc_send(handle.sock, {"t": "error", **exc.to_wire()})
        return
    kernel.audit_log.append(
        "key",
        grant.act_as,
        {"key": name, "op": str(m.header.get("op", "")), "task": grant.task, "via": "function"},
        concerns=sorted({*grant.parties, grant.act_as}),
    )
    ipc_send(handle.sock, {"t": "ok"}, [out])


def _key_name_of(m: Message) -> str:
    from mesatee_notebook.enclave.services.jobstore import unpack_values

    _, extra = unpack_values(bytes(m.payloads[0]) if m.payloads else b"")
    name = (extra.get("args") or {}).get("name")
    return str(name) if isinstance(name, str) else ""


def _safe_details(details: Any) -> dict[str, Any]:
    """Keep the typed details (limit names, numbers), drop tracebacks (they could quote data)."""
    if not isinstance(details, dict):
        return {}
    return {k: v for k, v in details.items() if k in {"limit", "allowed", "used", "exit_code", "fuel", "trap", "ename"}}


_CELL_KEY_OPS: Final = frozenset({"sign", "verify", "encrypt", "decrypt", "wrap", "unwrap", "info"})


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
