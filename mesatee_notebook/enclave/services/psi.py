"""PSI services: private set intersection as a job of kind ``psi`` on the one jobs path (``services/jobs.py``).

PSI (``psi.*``) is a job of kind ``psi`` with one input per party::

    psi.create  {name, parties: [id...] | {label: id}, mode, receivers, dataset?}   the creator approves at once
    psi.submit  {name, source?: {dataset, column, values?}, policy?} + inputs {items, values?}
    psi.approve {name, spec_digest}
    psi.result  {name}          -> info {mode, cardinality, ...}, values {items} (intersection)
    psi.status / psi.parties

Items are canonicalised and hashed when they arrive (the worker keeps the hashed input in memory) and sealed as
received, so a restarted kernel hashes them again under a fresh key. The job runs in the call that completes it
(the last submission or approval), or, after a restart, in the first call that finds it approved.

Join mode: the joined rows never leave. They become dataset ``dataset`` (default ``psi-<name>``) owned by the job
(``job:<id>``), readable only by the receivers, under the strictest of the inputs' policies with ``allow_rows``
off and the item column hidden. Receivers query it through ``Session.dataframe``; only aggregates that pass the
policy come out.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Final, cast

import numpy as np
import pandas as pd

from mesatee_notebook.enclave.datasets import validate_dataset_name
from mesatee_notebook.enclave.jobs import Job, JobState, JobStore
from mesatee_notebook.enclave.services import ServiceContext, ServiceResult, service
from mesatee_notebook.enclave.services.datasets import load_dataset, load_meta
from mesatee_notebook.enclave.services.jobs import (
    check_submit,
    ensure_run,
    job_approve,
    job_create,
    job_info,
    job_status,
    party_ids,
    register_cleanup,
    register_result_view,
    register_runner,
    store_job_dataset,
    submit_input,
)
from mesatee_notebook.enclave.services.jobstore import (
    job_store,
    pack_values,
    refuse,
    resolve_job,
    unpack_values,
)
from mesatee_notebook.errors import EncodingError, NotAvailableYet, NotFound, PolicyViolation
from mesatee_notebook.ml.psi import PsiInput, PsiKey, PsiMode, run_psi
from mesatee_notebook.wire.datapolicy import DataPolicy

__all__ = ["strictest_policy"]

_MODES: Final = ("intersection", "cardinality", "join")
_CACHE: Final = "psi.inputs"  # job id -> (PsiKey, {input name: (digest, PsiInput)})
_HEAP: Final = "psi.heap"  # set once the worker's allocator keeps freed memory for reuse
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3


def _keep_freed_memory(ctx: ServiceContext) -> None:
    """Let glibc reuse freed memory instead of unmapping it (once per service worker).

    A PSI over 10^7 items per side allocates and frees a few GB of numpy arrays. By default every array over
    32 MiB is a fresh ``mmap`` that the kernel must fault in and zero page by page; on the benchmark VM that was
    half of the engine's time. Serving large blocks from the heap and never trimming it keeps the pages mapped,
    so the worker's resident size stays at its peak (which an enclave reserves up front anyway). No effect where
    ``mallopt`` is missing (not glibc).
    """
    if ctx.state.get(_HEAP):
        return
    ctx.state[_HEAP] = True
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_MMAP_THRESHOLD, 1 << 30)  # arrays under 1 GiB come from the heap
    mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)  # and freed ones stay there (up to 2 GiB free at the top)


# -- PSI -------------------------------------------------------------------------------------------------------


@service("psi.create")
def psi_create(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Define a PSI among ``parties`` (a list of ids, or ``{label: id}``); the creator, if a party, approves."""
    name = str(args.get("name", ""))
    mode = str(args.get("mode", "intersection"))
    if mode not in _MODES:
        msg = f"unknown PSI mode {mode!r}; expected one of {list(_MODES)}"
        raise EncodingError(msg)
    parties = args.get("parties")
    if isinstance(parties, dict):
        labelled = {str(k): str(v) for k, v in parties.items()}
    else:
        labelled = {f"p{i}": p for i, p in enumerate(party_ids(parties, "parties"))}
    if len(labelled) < 2:
        msg = "a PSI needs at least two parties"
        raise PolicyViolation(msg)
    if len(set(labelled.values())) != len(labelled):
        msg = "each party may appear once in a PSI (one input per party)"
        raise PolicyViolation(msg)
    params: dict[str, Any] = {"psi.v1": True, "mode": mode}
    if mode == "join":
        dataset = validate_dataset_name(str(args.get("dataset") or f"psi-{name}"))
        try:
            load_meta(ctx, dataset)
        except NotFound:
            pass
        else:
            msg = f"dataset {dataset!r} already exists; pass another dataset name for the join's output"
            raise PolicyViolation(msg, dataset=dataset)
        params["dataset"] = dataset
    if args.get("max_items") is not None:
        params["max_items"] = int(args["max_items"])
    if args.get("cluster"):  # issue 18: intersect sharded on the workers (a kernel served with --cluster)
        if mode == "join":
            msg = "a PSI join on the cluster is not available yet; use mode 'intersection' or 'cardinality'"
            raise NotAvailableYet(msg)
        params["cluster"] = True
    return job_create(
        ctx,
        {
            "name": name,
            "kind": "psi",
            "inputs": labelled,
            "receivers": args.get("receivers") or [ctx.party],
            "params": params,
            "approve": args.get("approve", True),
        },
        {},
    )


_FORMATS: Final = ("npy", "arrow", "int-decimal", "msgpack", "series")


def _decode_items(raw: Any, fmt: str) -> Any:
    """Items as sent (see remote/psi.py): ndarray, Arrow IPC bytes (strings, bytes, or ints as decimal text), list."""
    if fmt in ("arrow", "int-decimal"):
        import pyarrow as pa

        if not isinstance(raw, (bytes, bytearray, memoryview)):
            msg = f"items in format {fmt!r} must be an Arrow IPC stream"
            raise EncodingError(msg)
        table = pa.ipc.open_stream(pa.py_buffer(raw)).read_all()
        if table.column_names != ["item"]:
            msg = "the items' Arrow stream must have exactly one column, 'item'"
            raise EncodingError(msg)
        column = table.column("item")
        if fmt == "int-decimal":
            try:
                return [int(v) for v in column.to_pylist()]
            except (TypeError, ValueError):
                msg = "int-decimal items must be decimal integers"
                raise EncodingError(msg) from None
        return column
    if fmt == "npy" and not isinstance(raw, np.ndarray):
        msg = "items in format 'npy' must be a numpy array"
        raise EncodingError(msg)
    if fmt == "msgpack" and not isinstance(raw, list):
        msg = "items in format 'msgpack' must be a list"
        raise EncodingError(msg)
    return raw


def _submitted_items(
    ctx: ServiceContext, job: Job, args: dict[str, Any], inputs: dict[str, Any]
) -> tuple[Any, str, pd.DataFrame | None, DataPolicy | None, str | None]:
    """(raw items, format, values, policy, source dataset): uploaded items, or a column of the caller's dataset."""
    source = args.get("source")
    policy = DataPolicy.from_dict(args["policy"]) if args.get("policy") else None
    if source is None:
        if "items" not in inputs:
            msg = "psi.submit needs the items (input 'items') or a source {dataset, column}"
            raise EncodingError(msg)
        fmt = str(args.get("items_format", "msgpack"))
        if fmt not in _FORMATS:
            msg = f"unknown items format {fmt!r}; expected one of {list(_FORMATS)}"
            raise EncodingError(msg)
        values = inputs.get("values")
        if values is not None and not isinstance(values, pd.DataFrame):
            msg = "join values must be a pandas DataFrame row-aligned with the items"
            raise EncodingError(msg)
        if job.spec.params.get("mode") == "join" and policy is not None and policy.privacy is not None:
            raise refuse(ctx, job, _DP_JOIN)
        return inputs["items"], fmt, values, policy, None
    if not isinstance(source, dict):
        msg = "source must be {'dataset': name, 'column': column}"
        raise EncodingError(msg)
    name, column = str(source.get("dataset", "")), str(source.get("column", ""))
    df, ds_policy, owner = load_dataset(ctx, name)
    if owner != ctx.party:
        raise refuse(ctx, job, f"party {ctx.party} does not own dataset {name!r} and cannot submit it", dataset=name)
    if column not in df.columns:
        msg = f"dataset {name!r} has no column {column!r}"
        raise NotFound(msg, dataset=name)
    value_cols = source.get("values")
    if job.spec.params.get("mode") != "join":
        values = None
    elif value_cols is None:
        values = df.drop(columns=[column])
    else:
        values = df[[str(c) for c in value_cols]]
    chosen = policy or ds_policy
    if job.spec.params.get("mode") == "join" and chosen.privacy is not None:
        raise refuse(ctx, job, _DP_JOIN, dataset=name)
    return df[column], "series", values, chosen, name


_DP_JOIN = (
    "cannot take a DP-mode policy in join mode: a PSI join whose result keeps the DP budget of its inputs is not "
    "available yet (the result would start a fresh budget); submit the join under a threshold policy, or "
    "aggregate the DP dataset directly"
)


def _input_of(job: Job, party: str) -> str:
    return next((i.name for i in job.spec.inputs if i.owner == party), job.spec.inputs[0].name)


def _cache(ctx: ServiceContext, job_id: str) -> tuple[PsiKey, dict[str, tuple[str, PsiInput]]]:
    caches: dict[str, tuple[PsiKey, dict[str, tuple[str, PsiInput]]]] = ctx.state.setdefault(_CACHE, {})
    if job_id not in caches:
        caches[job_id] = (PsiKey.generate(), {})
    return caches[job_id]


@service("psi.submit")
def psi_submit(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Submit the caller's set: items are canonicalised and hashed now, and sealed as received."""
    store = job_store(ctx)
    job = resolve_job(store, args.get("name"))
    if job.spec.kind != "psi":
        msg = f"job {args.get('name')!r} is not a PSI job; use job.submit"
        raise EncodingError(msg)
    name = _input_of(job, ctx.party)
    check_submit(ctx, job, name)
    raw, fmt, values, policy, source = _submitted_items(ctx, job, args, inputs)
    items = _decode_items(raw, fmt)
    if job.spec.params.get("mode") == "join" and values is None:
        values = pd.DataFrame(index=pd.RangeIndex(len(items)))
    key, cached = _cache(ctx, job.job_id)
    _keep_freed_memory(ctx)
    started = time.perf_counter()
    hashed = PsiInput(name, key, max_items=job.spec.params.get("max_items"))
    hashed.add_chunk(items, values)  # refuses bad items before anything is stored
    hash_s = time.perf_counter() - started
    packed_values: dict[str, Any] = {"items": raw}
    if values is not None:
        packed_values["values"] = values
    blob = pack_values(
        packed_values, items_format=fmt, policy=None if policy is None else policy.to_dict(), source=source
    )
    digest = hashlib.sha256(blob).hexdigest()  # the SHA-256 the job records for the sealed input
    cached[name] = (digest, hashed)  # first: this submission may complete the job, whose runner reads the cache
    try:
        job = submit_input(ctx, store, job, name, blob, digest)  # seals it (the digest is computed once)
    except BaseException:
        cached.pop(name, None)
        raise
    info = job_info(job, ctx.party)
    info["submitted"] = {"input": name, "items": len(hashed), "sha256": digest, "hash_s": round(hash_s, 4)}
    return ServiceResult(info=info)


@service("psi.approve")
def psi_approve(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Approve a PSI (``spec_digest``: the digest of the spec the owner was shown)."""
    return job_approve(ctx, {"job": args.get("name"), "spec_digest": args.get("spec_digest", "")}, inputs)


@service("psi.status")
def psi_status(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """A PSI job as its parties see it."""
    return job_status(ctx, {"job": args.get("name")}, inputs)


@service("psi.parties")
def psi_parties(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Who is in the job: input owners (by label), receivers, creator."""
    info = job_status(ctx, {"job": args.get("name")}, inputs).info
    return ServiceResult(
        info={
            "owners": {i["name"]: i["owner"] for i in info["inputs"]},
            "receivers": info["receivers"],
            "creator": info["creator"],
        }
    )


@service("psi.result")
def psi_result(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """The result for a receiver: the intersection, the cardinality, or (join) the name of the joined dataset."""
    store = job_store(ctx)
    job = resolve_job(store, args.get("name"))
    if ctx.party not in job.spec.receivers:
        raise refuse(ctx, job, f"party {ctx.party} is not a receiver of its result; only its receivers may fetch it")
    job = ensure_run(ctx, store, job)
    if job.state is not JobState.DONE:
        waiting = []
        if job.missing_inputs:
            owners = {i.name: i.owner for i in job.spec.inputs}
            waiting.append("inputs from " + ", ".join(owners[n] for n in job.missing_inputs))
        if job.missing_approvals:
            waiting.append("approval from " + ", ".join(job.missing_approvals))
        why = f"it is {job.state.value}" + (f", waiting for {' and '.join(waiting)}" if waiting else "")
        if job.error:
            why += f" ({job.error})"
        raise refuse(ctx, job, f"has no result yet: {why}")
    values, extra = unpack_values(store.fetch_result(job.job_id, ctx.party))
    return ServiceResult(info={"name": job.spec.params.get("name"), "job_id": job.job_id, **extra}, values=values)


# -- the PSI runner --------------------------------------------------------------------------------------------


def strictest_policy(policies: list[DataPolicy], hidden: list[str]) -> DataPolicy:
    """The policy no input owner would object to: the largest group size, every hidden column, no rows."""
    return DataPolicy(
        min_group_size=max(p.min_group_size for p in policies),
        hidden_columns=tuple(dict.fromkeys(hidden)),
        allow_rows=False,
        small_group="refuse" if any(p.small_group == "refuse" for p in policies) else "suppress",
        code_access=(),
        differencing_guard=True,
    )


@register_runner("psi")
def _run_psi(ctx: ServiceContext, store: JobStore, job: Job) -> bytes:
    params = job.spec.params
    mode = str(params["mode"])
    if params.get("cluster"):
        return _run_on_cluster(ctx, store, job, mode)
    key, cached = _cache(ctx, job.job_id)
    _keep_freed_memory(ctx)
    psi_inputs: list[PsiInput] = []
    policies: list[DataPolicy] = []
    hidden = ["item"]
    for inp in job.spec.inputs:
        hit = cached.get(inp.name)
        blob: bytes | None = None
        if hit is None or hit[0] != job.submitted[inp.name] or mode == "join":
            blob = store.input_data(job.job_id, inp.name)  # checked against its digest; TamperedData if modified
        if hit is not None and hit[0] == job.submitted[inp.name]:
            hashed = hit[1]
        else:
            assert blob is not None
            values, extra = unpack_values(blob)
            hashed = PsiInput(inp.name, key, max_items=params.get("max_items"))
            hashed.add_chunk(_decode_items(values["items"], str(extra["items_format"])), values.get("values"))
        psi_inputs.append(hashed)
        if mode == "join":
            assert blob is not None
            _, extra = unpack_values(blob)
            pol = DataPolicy.from_dict(extra["policy"]) if extra.get("policy") else DataPolicy()
            policies.append(pol)
            hidden += [f"{inp.name}.{c}" for c in pol.hidden_columns]
    ctx.progress(job=job.job_id, state="intersecting")  # no sizes: the caller may not be a receiver
    started = time.perf_counter()
    res = run_psi(psi_inputs, cast("PsiMode", mode))
    psi_s = round(time.perf_counter() - started, 4)
    common = {"mode": mode, "cardinality": res.cardinality, "psi_s": psi_s}
    if mode == "cardinality":
        return pack_values({}, **common)
    if mode == "intersection":
        assert res.items is not None
        items: Any = res.items.reset_index(drop=True)
        try:
            return pack_values({"items": items}, **common)
        except EncodingError:  # mixed int/str/bytes: Arrow cannot hold them in one column, msgpack can
            return pack_values({"items": items.tolist()}, **common)
    assert res.frame is not None
    dataset = str(params["dataset"])
    policy = strictest_policy(policies, [h for h in hidden if h in res.frame.columns])
    store_job_dataset(ctx, job, dataset, res.frame, policy)
    return pack_values({}, **common, dataset=dataset, rows=len(res.frame), policy=policy.to_dict())


def _run_on_cluster(ctx: ServiceContext, store: JobStore, job: Job, mode: str) -> bytes:
    """Issue 18: the approved job's sealed inputs, intersected sharded on the cluster by the head (broker)."""
    import pyarrow as pa

    streams = []
    for inp in job.spec.inputs:
        values, extra = unpack_values(store.input_data(job.job_id, inp.name))  # checked against its digest
        items = _decode_items(values["items"], str(extra["items_format"]))
        series = items.to_pandas() if isinstance(items, pa.ChunkedArray) else pd.Series(items)
        try:
            table = pa.Table.from_pandas(pd.DataFrame({"item": series.reset_index(drop=True)}), preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            msg = f"input {inp.name!r}: a PSI on the cluster takes items of one type (str or int), not mixed"
            raise NotAvailableYet(msg) from None
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        streams.append(sink.getvalue().to_pybytes())
    ctx.progress(job=job.job_id, state="intersecting on the cluster")
    started = time.perf_counter()
    out = json.loads(ctx.cluster_psi(mode, streams))
    common = {"mode": mode, "cardinality": int(out["cardinality"]), "psi_s": round(time.perf_counter() - started, 4)}
    common["cluster"] = {"workers": out.get("workers", [])}
    if mode == "cardinality":
        return pack_values({}, **common)
    return pack_values({"items": pd.Series(out.get("items", []), name="item")}, **common)


@register_cleanup
def _drop_cache(ctx: ServiceContext, job_id: str) -> None:
    """A job that ended or was cancelled: forget its hashed inputs in this worker."""
    ctx.state.get(_CACHE, {}).pop(job_id, None)


register_result_view("psi", psi_result)
