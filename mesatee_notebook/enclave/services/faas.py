"""Functions as a service (issue 17): registered Python and WebAssembly functions, run as approved tasks.

- ``function.register`` seals a function (``svc/faas/fn/<digest>``) and returns its digest: the SHA-256 of the
  canonical JSON ``{name, lang, entry, inputs, outputs, description, code_sha256}``. Registered functions are
  public to every party of the kernel (``function.get`` returns the source or the WASM bytes and the digest), so
  anyone asked to approve one can read exactly what it does.
- ``job.create_task`` makes a job of kind ``faas.task`` on the one jobs state machine (:mod:`~mesatee_notebook.enclave.
  jobs`): each input names a dataset, whose owner becomes that input's owner. The spec digest an owner approves
  covers the function digest, the args, the receivers, the limits and the input datasets. Owners approve with
  ``job.submit_dataset`` (:mod:`~mesatee_notebook.enclave.services.jobs`: binds the dataset's current digest, then
  approves through the one approve/submit helper every kind of job uses) or reject with ``job.cancel``.
- The runner (:func:`run_task`) never runs the function here: it packs the function and its bound inputs and asks
  the supervisor (``ctx.run_function``), which runs it in a fresh sandboxed executor
  (:mod:`~mesatee_notebook.enclave.faas_exec`). Results are the job's sealed result (only receivers fetch it), or
  with ``output_dataset`` a new dataset only the receivers can read or query.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any, Final

import pandas as pd

from mesatee_notebook.attestation.audit_verify import ALL_PARTIES
from mesatee_notebook.attestation.measurement import canonical_json
from mesatee_notebook.enclave.faas_runtime import MAX_LIMITS
from mesatee_notebook.enclave.jobs import Job, JobStore
from mesatee_notebook.enclave.services import ServiceContext, ServiceResult, service
from mesatee_notebook.enclave.services.datasets import load_dataset, load_meta
from mesatee_notebook.enclave.services.jobs import (
    job_info,
    new_job_id,
    party_ids,
    register_runner,
    store_job_dataset,
)
from mesatee_notebook.enclave.services.jobstore import job_store, pack_values, unpack_values
from mesatee_notebook.errors import EncodingError, NotFound, PolicyViolation
from mesatee_notebook.wire.datapolicy import DataPolicy

__all__ = ["KIND", "function_digest", "run_task"]

KIND: Final = "faas.task"
_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,99}$")
_IDENT: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_DIGEST: Final = re.compile(r"^[0-9a-f]{64}$")
_LANGS: Final = ("python", "wasm")
_MAX_CODE: Final = 64 << 20
_WASM_MAGIC: Final = b"\x00asm"
_MAX_TASK_KEYS: Final = 16


def _fn_key(digest: str) -> str:
    return f"faas/fn/{digest}"


def function_digest(meta: dict[str, Any], code: bytes) -> str:
    """The digest a function is known and approved by (covers its code and its declared interface)."""
    body = {k: meta[k] for k in ("name", "lang", "entry", "inputs", "outputs", "description")}
    if meta.get("raw_inputs"):
        body["raw_inputs"] = meta["raw_inputs"]
    body["code_sha256"] = hashlib.sha256(code).hexdigest()
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _idents(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and _IDENT.match(v) for v in value):
        msg = f"{what} must be a list of Python identifiers"
        raise EncodingError(msg)
    if len(set(value)) != len(value):
        msg = f"{what} has a name twice"
        raise EncodingError(msg)
    return list(value)


def _code_bytes(lang: str, code: object) -> bytes:
    if lang == "python":
        if not isinstance(code, str):
            msg = "a Python function is registered with python=<source text>"
            raise EncodingError(msg)
        try:
            compile(code, "<function>", "exec")
        except SyntaxError as exc:
            msg = f"the Python source does not compile: {exc.msg} (line {exc.lineno})"
            raise EncodingError(msg) from None
        return code.encode()
    if not isinstance(code, (bytes, bytearray, memoryview)):
        msg = "a WebAssembly function is registered with wasm=<module bytes>"
        raise EncodingError(msg)
    raw = bytes(code)
    if raw[:4] != _WASM_MAGIC:
        msg = "the WebAssembly module is malformed: it does not start with the \\0asm magic (compile WAT first)"
        raise EncodingError(msg)
    import wasmtime

    try:
        wasmtime.Module.validate(wasmtime.Engine(), raw)
    except wasmtime.WasmtimeError as exc:
        msg = f"the WebAssembly module is malformed: {str(exc).strip().splitlines()[-1]}"
        raise EncodingError(msg) from None
    return raw


def _load_function(ctx: ServiceContext, digest: object) -> tuple[dict[str, Any], bytes]:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        msg = "name the function by its digest (64 hex characters, from functions.register or functions.list)"
        raise EncodingError(msg)
    try:
        blob = ctx.seal_get(_fn_key(digest))
    except NotFound:
        msg = f"no registered function with digest {digest[:16]}..."
        raise NotFound(msg, function=digest) from None
    values, meta = unpack_values(blob)
    code = bytes(values["code"])
    if function_digest(meta, code) != digest:
        msg = f"the sealed function {digest[:16]}... does not match its digest"
        raise PolicyViolation(msg, function=digest)
    return meta, code


def _public(meta: dict[str, Any], digest: str) -> dict[str, Any]:
    return {**{k: v for k, v in meta.items() if k != "parts"}, "digest": digest}


_BUILTINS_DONE: Final = "faas.builtins"
ENCLAVE: Final = "enclave"


def _ensure_builtins(ctx: ServiceContext) -> None:
    """Register the built-in functions (once per service worker; sealed, so idempotent across restarts)."""
    if ctx.state.get(_BUILTINS_DONE):
        return
    from mesatee_notebook.enclave.faas_builtins import BUILTINS

    ctx.state[_BUILTINS_DONE] = True
    for name, spec in BUILTINS.items():
        args = {"name": name, "lang": "python", **{k: v for k, v in spec.items() if k != "code"}}
        _register(ctx, args, {"code": spec["code"]}, registrant=ENCLAVE)


@service("function.register")
def register(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Seal a function ``{name, lang, entry, inputs, outputs, description}`` (code as input ``code``)."""
    _ensure_builtins(ctx)
    return _register(ctx, args, inputs, registrant=ctx.party)


def _register(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any], *, registrant: str) -> ServiceResult:
    name = args.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        msg = f"invalid function name {name!r}: letters, digits and _.- (at most 100), starting with a letter"
        raise EncodingError(msg)
    lang = args.get("lang")
    if lang not in _LANGS:
        msg = "give python=<source> or wasm=<module bytes>"
        raise EncodingError(msg)
    entry = args.get("entry") or ("_start" if lang == "wasm" else "main")
    if not isinstance(entry, str) or not _IDENT.match(entry):
        msg = "entry must name a function (an identifier)"
        raise EncodingError(msg)
    description = args.get("description") or ""
    if not isinstance(description, str) or len(description) > 10_000:
        msg = "description must be text (at most 10,000 characters)"
        raise EncodingError(msg)
    code = _code_bytes(str(lang), inputs.get("code"))
    if len(code) > _MAX_CODE:
        msg = f"the function is over {_MAX_CODE >> 20} MiB"
        raise EncodingError(msg)
    meta: dict[str, Any] = {
        "name": name,
        "lang": lang,
        "entry": entry,
        "inputs": _idents(args.get("inputs"), "inputs"),
        "outputs": _idents(args.get("outputs"), "outputs"),
        "description": description,
    }
    raw = _idents(args.get("raw_inputs"), "raw_inputs")
    if raw:
        if lang != "wasm" or not set(raw) <= set(meta["inputs"]):
            msg = "raw_inputs names WebAssembly inputs to pass as one column's little-endian values"
            raise EncodingError(msg)
        meta["raw_inputs"] = raw
    digest = function_digest(meta, code)
    meta.update(
        {
            "registered_by": registrant,
            "registered": time.time(),
            "code_sha256": hashlib.sha256(code).hexdigest(),
            "size": len(code),
        }
    )
    try:
        old = ctx.seal_get(_fn_key(digest))
    except NotFound:
        old = None
    if old is None:
        ctx.seal_put(_fn_key(digest), pack_values({"code": code}, **meta))
        ctx.audit(
            "function",
            {"event": "register", "function": digest, "name": name, "lang": lang, "registered_by": registrant},
            concerns=[ALL_PARTIES],
        )
    else:
        meta = unpack_values(old)[1]
    return ServiceResult(info=_public(meta, digest))


@service("function.get")
def get(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """A registered function: its interface, its digest and its code (source text or WASM bytes)."""
    _ensure_builtins(ctx)
    digest = str(args.get("function", ""))
    meta, code = _load_function(ctx, digest)
    value: Any = code.decode() if meta["lang"] == "python" else code
    return ServiceResult(info=_public(meta, digest), values={"code": value})


@service("function.list")
def listing(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Every registered function (interface and digest, no code), the built-ins (``registered_by: enclave``) too."""
    _ensure_builtins(ctx)
    out = []
    for key in ctx.seal_list("faas/fn/"):
        digest = key.rsplit("/", 1)[-1]
        try:
            meta, _ = _load_function(ctx, digest)
        except (NotFound, PolicyViolation):
            continue
        out.append(_public(meta, digest))
    return ServiceResult(info={"functions": sorted(out, key=lambda f: (f["name"], f["registered"]))})


# -- tasks -----------------------------------------------------------------------------------------------------


def _limits(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        msg = f"limits must be a dict with keys among {', '.join(MAX_LIMITS)}"
        raise EncodingError(msg)
    for key, v in value.items():
        if key not in MAX_LIMITS or isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            msg = f"limit {key!r}: keys are {', '.join(MAX_LIMITS)}, each a positive number"
            raise EncodingError(msg)
    return dict(value)


# Named job.*: with the service-worker pools (issue 11) job.*/psi.* run in the one jobs worker, the job store's
# single writer; a task is a job.
@service("job.create_task")
def task_create(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """``{name, function: digest, inputs: {arg: dataset}, args, receivers, limits?, output_dataset?}``."""
    store = job_store(ctx)
    name = str(args.get("name", ""))
    job_id = new_job_id(store, name, "a task or job")
    digest = str(args.get("function", ""))
    meta, _ = _load_function(ctx, digest)
    bound = args.get("inputs") or {}
    if not isinstance(bound, dict) or not all(isinstance(v, str) for v in bound.values()):
        msg = "inputs must map each of the function's inputs to a dataset name"
        raise EncodingError(msg)
    if sorted(bound) != sorted(meta["inputs"]):
        msg = f"function {meta['name']!r} takes the inputs {meta['inputs']}; the task binds {sorted(bound)}"
        raise EncodingError(msg)
    owners: dict[str, str] = {}
    for arg, dataset in bound.items():
        dmeta = load_meta(ctx, dataset)
        if dmeta.get("readers") is not None or not isinstance(dmeta.get("owner"), str):
            msg = f"dataset {dataset!r} is a job's result; only datasets a party uploaded can be task inputs"
            raise PolicyViolation(msg, dataset=dataset)
        owners[str(arg)] = str(dmeta["owner"])
    fargs = args.get("args") or {}
    if not isinstance(fargs, dict) or not all(isinstance(k, str) and _IDENT.match(k) for k in fargs):
        msg = "args must be a dict keyed by identifiers"
        raise EncodingError(msg)
    clash = sorted(set(fargs) & set(bound))
    if clash:
        msg = f"{clash} are both inputs and args"
        raise EncodingError(msg)
    receivers = party_ids(args.get("receivers") or [ctx.party], "receivers")
    output = args.get("output_dataset")
    if output is not None:
        try:
            load_meta(ctx, str(output))
        except NotFound:
            pass
        else:
            msg = f"a dataset named {output!r} already exists; choose another output_dataset"
            raise PolicyViolation(msg, dataset=output)
    params: dict[str, Any] = {
        "name": name,
        "function": digest,
        "function_name": meta["name"],
        "lang": meta["lang"],
        "args": dict(fargs),
        "limits": _limits(args.get("limits")),
        "datasets": {arg: {"dataset": ds} for arg, ds in bound.items()},
        "output_dataset": output,
    }
    keys = _task_keys(args.get("keys"), meta)
    if keys:  # in the spec digest: every data owner approves which keys the function may use
        params["keys"] = keys
    tr = store.create(
        creator=ctx.party, kind=KIND, inputs=owners, receivers=list(receivers), params=params, job_id=job_id
    )
    return ServiceResult(info=job_info(tr.job, ctx.party))


def _task_keys(value: object, meta: dict[str, Any]) -> list[str]:
    """The KeyStore keys a task's function may use (as the task's creator), sorted; Python functions only."""
    if value is None or value == []:
        return []
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        msg = "keys must be a list of key names"
        raise EncodingError(msg)
    if any(not _NAME.match(k) for k in value) or len(value) > _MAX_TASK_KEYS:
        msg = f"keys must be at most {_MAX_TASK_KEYS} key names (letters, digits and _.-)"
        raise EncodingError(msg)
    if meta["lang"] != "python":
        msg = "only Python functions can use keys (mesatee.keys); a WebAssembly module has no such import"
        raise EncodingError(msg)
    return sorted(set(value))


def _bound_frames(ctx: ServiceContext, store: JobStore, job: Job) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Each input's dataset (hidden columns dropped), checked against the digest its owner bound."""
    frames: dict[str, pd.DataFrame] = {}
    digests: dict[str, str] = {}
    refs = job.spec.params.get("datasets") or {}
    for inp in job.spec.inputs:
        _, extra = unpack_values(store.input_data(job.job_id, inp.name))
        name = str(extra.get("dataset"))
        if name != str((refs.get(inp.name) or {}).get("dataset")):
            msg = f"input {inp.name!r} is dataset {name!r}, not the one the task names"
            raise PolicyViolation(msg, dataset=name)
        meta = load_meta(ctx, name)
        if meta.get("sha256") != extra.get("sha256") or meta.get("owner") != inp.owner:
            msg = f"dataset {name!r} changed after its owner approved the task; the owner must approve a new task"
            raise PolicyViolation(msg, dataset=name)
        frame, policy, _ = load_dataset(ctx, name)
        hidden = [c for c in policy.hidden_columns if c in frame.columns]
        frames[inp.name] = frame.drop(columns=hidden) if hidden else frame
        digests[inp.name] = str(meta["sha256"])
    return frames, digests


@register_runner(KIND)
def run_task(ctx: ServiceContext, store: JobStore, job: Job) -> bytes:
    """Run an approved task's function in a fresh sandboxed executor; seal what the receivers get."""
    params = job.spec.params
    digest = str(params["function"])
    meta, code = _load_function(ctx, digest)
    frames, digests = _bound_frames(ctx, store, job)
    fn = {k: meta[k] for k in ("name", "lang", "entry", "inputs", "outputs")}
    fn["raw_inputs"] = list(meta.get("raw_inputs") or [])
    code_value: Any = code.decode() if meta["lang"] == "python" else code
    keys = [str(k) for k in params.get("keys") or []]
    blob = pack_values(
        {"__code__": code_value, **frames},
        function=fn,
        args=dict(params.get("args") or {}),
        limits=dict(params.get("limits") or {}),
        keys=keys,
    )
    t0 = time.perf_counter()
    out = ctx.run_function(
        blob,
        timeout=float((params.get("limits") or {}).get("seconds", 300)) + 60,
        keys=keys,
        act_as=job.spec.creator,
        task=job.job_id,
        parties=sorted(job.spec.parties),
    )
    seconds = round(time.perf_counter() - t0, 4)
    values, info = unpack_values(out)
    common = {
        "function": digest,
        "function_name": meta["name"],
        "inputs": digests,
        "approvals": sorted(job.approvals),
        "fuel": info.get("fuel"),
        "run_seconds": seconds,
    }
    if keys:
        common["keys"] = keys
    ctx.audit(
        "job",
        {
            "service": KIND,
            "job_id": job.job_id,
            "function": digest,
            "inputs": digests,
            "fuel": info.get("fuel"),
            "receivers": list(job.spec.receivers),
        },
        concerns=sorted(job.spec.parties),
    )
    output = params.get("output_dataset")
    if output:
        frame = next(iter(values.values())) if len(values) == 1 else None
        if not isinstance(frame, pd.DataFrame):
            msg = "output_dataset needs a function that returns one DataFrame"
            raise PolicyViolation(msg)
        store_job_dataset(ctx, job, str(output), frame, DataPolicy())
        return pack_values({}, **common, dataset=str(output), rows=len(frame))
    return pack_values(values, **common)
