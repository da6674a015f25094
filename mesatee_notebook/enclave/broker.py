"""The supervisor's answers to an executor's requests in the middle of a call, one handler per message class.

A cell or a service asks for sealed storage, a dataset, an audit entry, a registered function or a key operation
(:data:`~mesatee_notebook.wire.protocol.EXECUTOR_REQUESTS`); the supervisor answers ``ok`` (with the bytes, if any)
or a typed ``error``. What a caller may reach is decided here: sealed names are prefixed with the caller's namespace,
only trusted services write the audit log or run registered functions, and a dataset goes to a cell only if its
owner's policy gives that party code access.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mesatee_notebook.enclave.ipc import ipc_send
from mesatee_notebook.errors import KernelConnectionError, MesateeError, PolicyViolation, ProtocolError
from mesatee_notebook.wire.protocol import (
    EXECUTOR_REQUESTS,
    AuditAppend,
    ClusterPsi,
    DataGet,
    FaasRun,
    KeyCall,
    ProtocolMessage,
    SealDelete,
    SealGet,
    SealList,
    SealPut,
)
from mesatee_notebook.wire.stream import Message

if TYPE_CHECKING:
    from mesatee_notebook.enclave.sessions import ExecutorHandle
    from mesatee_notebook.enclave.supervisor import Kernel

__all__ = ["answer_executor", "dataset_for_cell"]


@dataclass(frozen=True, slots=True)
class _Asker:
    """Who is asking: the sealed namespace, the party, and whether it is a trusted service."""

    kernel: Kernel
    prefix: str
    party: str | None
    service: bool


_Answer = Callable[[_Asker, Any, Message], list[Any]]


def _audit(who: _Asker, req: AuditAppend, m: Message) -> list[Any]:
    if not who.service:
        raise PolicyViolation("only trusted services write the audit log")  # noqa: EM101
    who.kernel.audit_log.append(req.kind, who.party, req.details, concerns=list(req.concerns))
    return []


def _faas_run(who: _Asker, req: FaasRun, m: Message) -> list[Any]:
    """Issue 17: a registered function, in a fresh sandboxed executor."""
    if not who.service:
        raise PolicyViolation("only trusted services run registered functions")  # noqa: EM101
    from mesatee_notebook.enclave.faas_exec import run_function

    # the key grant (keys, act_as, task, parties) is read and validated by faas_exec.KeyGrant.from_header
    return [run_function(who.kernel, bytes(m.payloads[0]) if m.payloads else b"", req.timeout, m.header)]


def _key_call(who: _Asker, req: KeyCall, m: Message) -> list[Any]:
    """Issue 17: a cell's mesatee.keys, served by the KeyStore as its party."""
    from mesatee_notebook.enclave.faas_exec import cell_key_call

    return [cell_key_call(who.kernel, m, who.party)]


def _data_get(who: _Asker, req: DataGet, m: Message) -> list[Any]:
    return [dataset_for_cell(who.kernel, req.name, who.party)]


def _cluster_psi(who: _Asker, req: ClusterPsi, m: Message) -> list[Any]:
    """Issue 18: a PSI job's intersection, sharded on the cluster (the jobs worker keeps approvals and release)."""
    if not who.service:
        raise PolicyViolation("only trusted services run a PSI on the cluster")  # noqa: EM101
    from mesatee_notebook.enclave.cluster.cluster_psi import job_psi

    return [job_psi(who.kernel, str(who.party), req.name, list(m.payloads))]


def _seal_put(who: _Asker, req: SealPut, m: Message) -> list[Any]:
    store, full = who.kernel.sealed_store(), f"{who.prefix}/{req.name}"
    data = m.payloads[0] if m.payloads else b""
    quotas = who.kernel.quotas
    quotas.seal(quotas.holder(who.party), full, memoryview(data).nbytes, lambda: store.put(full, data))
    return []


def _seal_get(who: _Asker, req: SealGet, m: Message) -> list[Any]:
    return [who.kernel.sealed_store().get_buffer(f"{who.prefix}/{req.name}")]


def _seal_delete(who: _Asker, req: SealDelete, m: Message) -> list[Any]:
    store, full = who.kernel.sealed_store(), f"{who.prefix}/{req.name}"
    who.kernel.quotas.unseal(full, lambda: store.delete(full))
    return []


def _seal_list(who: _Asker, req: SealList, m: Message) -> list[Any]:
    store = who.kernel.sealed_store()
    names = [n[len(who.prefix) + 1 :] for n in store.list(f"{who.prefix}/{req.name}".rstrip("/"))]
    return [json.dumps(names).encode()]


_ANSWERS: dict[type[ProtocolMessage], _Answer] = {
    AuditAppend: _audit,
    ClusterPsi: _cluster_psi,
    FaasRun: _faas_run,
    KeyCall: _key_call,
    DataGet: _data_get,
    SealPut: _seal_put,
    SealGet: _seal_get,
    SealDelete: _seal_delete,
    SealList: _seal_list,
}
if set(_ANSWERS) != set(EXECUTOR_REQUESTS.values()):  # a new executor request needs its answer here
    _msg = "every executor request in wire/protocol.py needs an answer in enclave/broker.py"
    raise ImportError(_msg)


def answer_executor(
    kernel: Kernel, executor: ExecutorHandle, m: Message, *, prefix: str, party: str | None, service: bool = False
) -> None:
    """Answer an executor's mid-call request; a failure to reach the executor is its crash, not the client's."""
    try:
        try:
            cls = EXECUTOR_REQUESTS.get(m.type)
            if cls is None:
                raise ProtocolError(f"executor: unknown request {m.type!r}", type=m.type)  # noqa: EM102
            req = cls.from_header(m.header, len(m.payloads))
            payloads = _ANSWERS[cls](_Asker(kernel, prefix, party, service), req, m)
            ipc_send(executor.comm, {"t": "ok"}, payloads)
        except MesateeError as exc:
            ipc_send(executor.comm, {"t": "error", **exc.to_wire()})
    except (OSError, KernelConnectionError) as exc:
        # The executor died while we answered it: that is its crash, not the client's connection.
        raise executor.crashed_error() from exc


def dataset_for_cell(kernel: Kernel, name: str, party: str | None) -> bytes:
    """Arrow bytes of a dataset, for a cell whose party the owner's policy gives code access."""
    from mesatee_notebook.enclave.datasets import data_name, load_meta

    store = kernel.sealed_store()
    meta = load_meta(store, name)
    allowed = party is not None and (party == meta["owner"] or party in meta["policy"].get("code_access", []))
    if not allowed:
        kernel.audit_log.append(
            "refusal", party, {"dataset": name, "reason": "no code access"}, concerns=[str(meta["owner"])]
        )
        msg = (
            f"dataset {name!r} is not available to code cells of this party: its owner's policy gives code "
            "access only to the parties in code_access. Use the SecureDataFrame API (policy-checked queries)."
        )
        raise PolicyViolation(msg, dataset=name)
    kernel.audit_log.append("release", party, {"dataset": name, "to": "code cell"}, concerns=[str(meta["owner"])])
    if "partitions" in meta:  # issue 18: a partitioned dataset is gathered from the workers (same checks above)
        from mesatee_notebook.enclave.cluster.datasets import cell_dataset

        return cell_dataset(kernel, name, str(party))
    return bytes(store.get(data_name(name)))
