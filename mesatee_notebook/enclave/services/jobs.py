"""Job services: multi-party jobs with approvals (``job.*``), the one path every kind of job takes.

Generic jobs (``job.*``) follow :mod:`mesatee_notebook.enclave.jobs`: a job names its inputs and their owners and
its receivers; it runs only when every input is in and every owner approved the exact spec; its result goes only to
the receivers. Every step and every refusal is in the audit log. A kind of job is run by the runner registered for
it (:func:`register_runner`): PSI (:mod:`~mesatee_notebook.enclave.services.psi`), ``gbdt.train``
(:mod:`~mesatee_notebook.enclave.services.gbdt_jobs`) and FaaS tasks (:mod:`~mesatee_notebook.enclave.services.faas`)
register theirs.

An owner submits and approves through :func:`submit_input` and :func:`approve_job` (the service-side binding of
:func:`mesatee_notebook.enclave.jobs.submit`/:func:`~mesatee_notebook.enclave.jobs.approve`); ``job.submit_dataset``
fills an owner's inputs from the datasets the spec names (bound to their current digest) and approves in one call.

The job runs in the call that completes it (the last submission or approval), or, after a restart, in the first
call that finds it approved.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import pandas as pd

from mesatee_notebook.enclave import jobs as jobs_core
from mesatee_notebook.enclave.datasets import data_name, meta_name
from mesatee_notebook.enclave.jobs import Job, JobState, JobStore
from mesatee_notebook.enclave.services import ServiceContext, ServiceResult, service
from mesatee_notebook.enclave.services.datasets import load_meta
from mesatee_notebook.enclave.services.jobstore import (
    job_id_for_name,
    job_store,
    pack_values,
    refuse,
    resolve_job,
    unpack_values,
)
from mesatee_notebook.errors import (
    EncodingError,
    NotFound,
    PolicyViolation,
    RemoteTimeout,
    ResourceLimitExceeded,
    TamperedData,
    WasmError,
)
from mesatee_notebook.wire.codecs import encode_value

if TYPE_CHECKING:
    from mesatee_notebook.wire.datapolicy import DataPolicy

__all__ = [
    "RUNNERS",
    "approve_job",
    "dataset_inputs",
    "job_info",
    "new_job_id",
    "party_ids",
    "register_check",
    "register_cleanup",
    "register_result_view",
    "register_runner",
    "store_job_dataset",
    "submit_input",
]

Runner = Callable[[ServiceContext, JobStore, Job], bytes]
Check = Callable[[Job], object]
Cleanup = Callable[[ServiceContext, str], None]
ServiceFn = Callable[[ServiceContext, dict[str, Any], dict[str, Any]], ServiceResult]
#: kind -> function that computes a running job's result (sealed as the job's result).
RUNNERS: dict[str, Runner] = {}
#: kind -> spec check run before an owner binds datasets and approves (``EncodingError`` says what to fix).
_CHECKS: dict[str, Check] = {}
#: run when a job ends or is cancelled (an engine drops what it cached for the job in the worker).
_CLEANUPS: list[Cleanup] = []
#: kind -> the ``job.result`` view of a kind whose result has its own service (``psi.result``).
_RESULT_VIEWS: dict[str, ServiceFn] = {}
#: kinds whose inputs are submitted through their own service, not ``job.submit``/``job.submit_dataset``.
_OWN_SUBMIT: Final = {"psi": "submit PSI inputs with psi.submit"}


def register_runner(kind: str) -> Callable[[Runner], Runner]:
    """Register the function that runs approved jobs of ``kind``."""

    def deco(fn: Runner) -> Runner:
        RUNNERS[kind] = fn
        return fn

    return deco


def register_check(kind: str, check: Check) -> None:
    """Register the spec check of ``kind`` (``job.submit_dataset`` refuses a spec that cannot run)."""
    _CHECKS[kind] = check


def register_cleanup(fn: Cleanup) -> Cleanup:
    """Register ``fn(ctx, job_id)``, called when a job ends or is cancelled."""
    _CLEANUPS.append(fn)
    return fn


def register_result_view(kind: str, fn: ServiceFn) -> None:
    """``job.result`` of a job of ``kind`` answers as ``fn`` (called with ``name`` set to the job)."""
    _RESULT_VIEWS[kind] = fn


# -- helpers ---------------------------------------------------------------------------------------------------


def job_info(job: Job, party: str) -> dict[str, Any]:
    """What a party to the job may know about it: spec, state, who submitted and approved (no data)."""
    spec = job.spec
    return {
        "job_id": job.job_id,
        "name": spec.params.get("name"),
        "kind": spec.kind,
        "state": job.state.value,
        "creator": spec.creator,
        "inputs": [{"name": i.name, "owner": i.owner, "submitted": i.name in job.submitted} for i in spec.inputs],
        "receivers": list(spec.receivers),
        "params": dict(spec.params),
        "spec_digest": spec.digest(),
        "approvals": sorted(job.approvals),
        "missing_inputs": job.missing_inputs,
        "missing_approvals": job.missing_approvals,
        "error": job.error,
        "cancelled_by": job.cancelled_by,
        "you": {
            "owner_of": [i.name for i in spec.inputs if i.owner == party],
            "receiver": party in spec.receivers,
            "approved": party in job.approvals,
        },
    }


def _visible_job(ctx: ServiceContext, store: JobStore, ref: object) -> Job:
    job = resolve_job(store, ref)
    if ctx.party not in job.spec.parties:
        raise refuse(ctx, job, f"party {ctx.party} is not a party to this job")
    return job


def _refuser(ctx: ServiceContext) -> jobs_core.Refuse:
    return lambda job, reason, details: refuse(ctx, job, reason, **details)


def _runner(ctx: ServiceContext, store: JobStore) -> jobs_core.Run:
    return lambda job: _run(ctx, store, job)


def check_submit(ctx: ServiceContext, job: Job, input_name: str) -> None:
    """Whether the caller may submit ``input_name`` now (before any work on it); a refusal is audited."""
    jobs_core.check_submit(job, ctx.party, input_name, _refuser(ctx))


def submit_input(
    ctx: ServiceContext, store: JobStore, job: Job, input_name: str, data: bytes, sha256: str | None = None
) -> Job:
    """The caller submits one input of ``job``; the job runs if that completed it. Returns the job as it is now.

    ``sha256``: the digest of ``data`` if the caller computed it already (PSI does, for its cache).
    """
    return jobs_core.submit(
        store, job, ctx.party, input_name, data, refuse=_refuser(ctx), run=_runner(ctx, store), sha256=sha256
    )


def approve_job(ctx: ServiceContext, store: JobStore, job: Job, spec_digest: str) -> Job:
    """The caller approves ``job``'s spec; the job runs if that completed it. Returns the job as it is now."""
    return jobs_core.approve(store, job, ctx.party, spec_digest, refuse=_refuser(ctx), run=_runner(ctx, store))


def _run(ctx: ServiceContext, store: JobStore, job: Job) -> Job:
    runner = RUNNERS.get(job.spec.kind)
    if runner is None or job.state is not JobState.APPROVED:
        return job  # another engine's service runs it
    store.start(job.job_id)
    ctx.progress(job=job.job_id, state="running")
    try:
        result = runner(ctx, store, store.get(job.job_id))
    except (TamperedData, PolicyViolation, NotFound, ResourceLimitExceeded, WasmError, RemoteTimeout) as exc:
        # our own messages: ids, names and limits, never data
        store.fail(job.job_id, f"{type(exc).__name__}: {exc.message}")
        return store.get(job.job_id)
    except Exception as exc:  # an engine's message could quote items: every party sees job.error
        store.fail(job.job_id, f"the engine failed ({type(exc).__name__}; details withheld: they could hold data)")
        return store.get(job.job_id)
    finally:
        _cleanup(ctx, job.job_id)
    store.finish(job.job_id, result)
    ctx.progress(job=job.job_id, state="done")
    return store.get(job.job_id)


def _cleanup(ctx: ServiceContext, job_id: str) -> None:
    for fn in _CLEANUPS:
        fn(ctx, job_id)


def ensure_run(ctx: ServiceContext, store: JobStore, job: Job) -> Job:
    """A job restored in the approved state (the kernel stopped before running it) runs now."""
    return _run(ctx, store, job) if job.state is JobState.APPROVED else job


def party_ids(value: object, what: str) -> list[str]:
    """``value`` as a list of party ids (``EncodingError`` naming ``what`` otherwise)."""
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        msg = f"{what} must be a list of party ids"
        raise EncodingError(msg)
    return list(value)


def new_job_id(store: JobStore, name: str, what: str = "a job") -> str:
    """The id of a new job named ``name`` (refused if a job, or a damaged job record, already has it)."""
    job_id = job_id_for_name(name)
    if job_id in {j.job_id for j in store.jobs()} or job_id in store.damaged:
        msg = f"{what} named {name!r} already exists; choose another name"
        raise PolicyViolation(msg, job=name)
    return job_id


def _own_submit(job: Job) -> None:
    why = _OWN_SUBMIT.get(job.spec.kind)
    if why is not None:
        raise EncodingError(why)


# -- generic jobs ----------------------------------------------------------------------------------------------


@service("job.create")
def job_create(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Define a job: ``{name, kind, inputs: {input: owner}, receivers, params}``; the caller is its creator."""
    store = job_store(ctx)
    name = str(args.get("name", ""))
    job_id_for_name(name)  # the name's own error first
    spec_inputs = args.get("inputs")
    if not isinstance(spec_inputs, dict) or not all(isinstance(v, str) for v in spec_inputs.values()):
        msg = "inputs must map each input name to its owner's party id"
        raise EncodingError(msg)
    job_id = new_job_id(store, name)
    params = dict(args.get("params") or {})
    params["name"] = name
    kind = str(args.get("kind", ""))
    if kind == "psi" and not params.get("psi.v1"):
        msg = "create PSI jobs with psi.create"
        raise EncodingError(msg)
    tr = store.create(
        creator=ctx.party,
        kind=kind,
        inputs={str(k): v for k, v in spec_inputs.items()},
        receivers=party_ids(args.get("receivers") or [ctx.party], "receivers"),
        params=params,
        job_id=job_id,
    )
    job = tr.job
    if args.get("approve", True) and ctx.party in job.spec.owners:
        job = approve_job(ctx, store, job, job.spec.digest())
    return ServiceResult(info=job_info(job, ctx.party))


@service("job.submit")
def job_submit(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Submit the caller's input ``args['input']`` (any value, as ``inputs['data']``) to a job."""
    store = job_store(ctx)
    job = resolve_job(store, args.get("job"))
    _own_submit(job)
    name = str(args.get("input", ""))
    check_submit(ctx, job, name)
    if "data" not in inputs:
        msg = "job.submit needs the input's value as input 'data'"
        raise EncodingError(msg)
    job = submit_input(ctx, store, job, name, pack_values({"data": inputs["data"]}))
    return ServiceResult(info=job_info(job, ctx.party))


@service("job.approve")
def job_approve(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Approve the job whose spec has ``args['spec_digest']`` (from job.status: what the owner was shown)."""
    store = job_store(ctx)
    job = resolve_job(store, args.get("job"))
    job = approve_job(ctx, store, job, str(args.get("spec_digest", "")))
    return ServiceResult(info=job_info(job, ctx.party))


@service("job.status")
def job_status(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """The job as its parties may see it (others are refused)."""
    store = job_store(ctx)
    job = ensure_run(ctx, store, _visible_job(ctx, store, args.get("job")))
    return ServiceResult(info=job_info(job, ctx.party))


@service("job.cancel")
def job_cancel(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Cancel a job (its creator or an input owner) and delete its sealed inputs."""
    store = job_store(ctx)
    job = resolve_job(store, args.get("job"))
    tr = store.cancel(job.job_id, ctx.party)
    store.purge(job.job_id)
    _cleanup(ctx, job.job_id)
    return ServiceResult(info=job_info(tr.job, ctx.party))


@service("job.list")
def job_list(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """The jobs that concern the caller, and any job whose sealed state failed to authenticate."""
    store = job_store(ctx)
    jobs = [job_info(j, ctx.party) for j in store.jobs(ctx.party)]
    damaged = [{"job_id": k, "error": v} for k, v in sorted(store.damaged.items())]
    return ServiceResult(info={"jobs": sorted(jobs, key=lambda j: str(j["name"])), "damaged": damaged})


@service("job.result")
def job_result(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """A receiver fetches a done job's result (decoded); anyone else is refused."""
    store = job_store(ctx)
    job = ensure_run(ctx, store, resolve_job(store, args.get("job")))
    view = _RESULT_VIEWS.get(job.spec.kind)
    if view is not None:
        return view(ctx, args | {"name": args.get("job")}, inputs)
    values, extra = unpack_values(store.fetch_result(job.job_id, ctx.party))
    return ServiceResult(info={**job_info(job, ctx.party), "result": extra}, values=values)


# -- binding a dataset to a job input --------------------------------------------------------------------------


def dataset_inputs(job: Job) -> dict[str, dict[str, Any]]:
    """Input name -> ``{"dataset": name}`` for the inputs the spec fills from stored datasets."""
    refs = job.spec.params.get("datasets") or {}
    if not isinstance(refs, dict):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, ref in refs.items():
        if isinstance(ref, dict) and isinstance(ref.get("dataset"), str):
            out[str(name)] = dict(ref)
    return out


@service("job.submit_dataset")
def submit_dataset(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Fill the caller's dataset inputs of a job (``{job, spec_digest, approve=True}``), then approve that spec.

    The caller must own the input (the job's spec) and the dataset (its metadata); the sealed input is a reference
    bound to the dataset's digest. With ``approve`` the same call approves ``spec_digest``, and the job runs once
    every input is in and every owner approved.
    """
    store = job_store(ctx)
    job = resolve_job(store, args.get("job"))
    if ctx.party not in job.spec.parties:
        raise refuse(ctx, job, f"party {ctx.party} is not a party to this job")
    if ctx.party not in job.spec.owners:
        raise refuse(ctx, job, f"party {ctx.party} owns no input of this job, so it has nothing to submit or approve")
    _own_submit(job)
    digest = str(args.get("spec_digest", ""))
    if digest != job.spec.digest():
        raise refuse(ctx, job, "the spec digest does not match this job (fetch the job again and check it)")
    check = _CHECKS.get(job.spec.kind)
    if check is not None:
        try:
            check(job)
        except EncodingError as exc:
            raise refuse(ctx, job, f"its spec cannot run: {exc.message}") from None
    refs = dataset_inputs(job)
    for inp in job.spec.inputs:
        if inp.owner != ctx.party or inp.name not in refs or inp.name in job.submitted:
            continue
        job = _bind(ctx, store, job, inp.name, str(refs[inp.name]["dataset"]))
    if args.get("approve", True) and ctx.party in job.missing_approvals:
        job = approve_job(ctx, store, job, digest)
    else:
        job = ensure_run(ctx, store, job)  # runs the job if binding completed it
    return ServiceResult(info=job_info(job, ctx.party))


def _bind(ctx: ServiceContext, store: JobStore, job: Job, input_name: str, dataset: str) -> Job:
    check_submit(ctx, job, input_name)
    meta = load_meta(ctx, dataset)
    if meta.get("owner") != ctx.party or meta.get("readers") is not None:
        raise refuse(
            ctx,
            job,
            f"dataset {dataset!r} is not party {ctx.party}'s: only a dataset's owner can put it into a job",
            dataset=dataset,
        )
    blob = pack_values({}, dataset=dataset, owner=ctx.party, sha256=str(meta["sha256"]))
    tr = store.submit_input(job.job_id, ctx.party, input_name, blob)
    return tr.job  # not run yet: the same call approves (or finds it runnable) next


# -- outputs ---------------------------------------------------------------------------------------------------


def store_job_dataset(ctx: ServiceContext, job: Job, name: str, df: pd.DataFrame, policy: DataPolicy) -> None:
    """Seal a job's output rows as a dataset owned by the job (``job:<id>``), readable by its receivers only."""
    enc = encode_value(df.reset_index(drop=True))
    data = b"".join(bytes(memoryview(p).cast("B")) for p in enc.parts)
    digest = hashlib.sha256(data).hexdigest()
    ctx.seal_put(data_name(name, prefix=""), data)
    meta = {
        "name": name,
        "owner": f"job:{job.job_id}",
        "policy": policy.to_dict(),
        "columns": [[str(c), str(t)] for c, t in df.dtypes.items()],
        "rows": len(df),
        "sha256": digest,
        "created": time.time(),
        "job_id": job.job_id,
        "readers": list(job.spec.receivers),
    }
    ctx.seal_put(meta_name(name, prefix=""), json.dumps(meta).encode())
    ctx.audit(
        "upload",
        # no row count: the host reads the log, and the join's size is its cardinality
        {"dataset": name, "sha256": digest, "job_id": job.job_id, "owner": meta["owner"]},
        concerns=sorted(job.spec.parties),
    )
