"""Dataset services: upload a table under its owner's policy, describe it, list, delete."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pandas as pd

from mesatee_notebook.enclave.dataset_cache import DatasetCache, frame_bytes
from mesatee_notebook.enclave.datasets import data_name, meta_name, validate_dataset_name
from mesatee_notebook.enclave.services import ServiceContext, ServiceResult, service
from mesatee_notebook.errors import EncodingError, MalformedFrame, NotFound, PolicyViolation
from mesatee_notebook.wire.codecs import decode_value, encode_value
from mesatee_notebook.wire.datapolicy import DataPolicy

__all__ = ["load_dataset", "load_meta", "public_info", "upload_policy"]


def load_meta(ctx: ServiceContext, name: str) -> dict[str, Any]:
    """A dataset's metadata; NotFound names the dataset."""
    try:
        raw = ctx.seal_get(meta_name(name, prefix=""))
    except NotFound:
        msg = f"no dataset named {name!r} in this kernel"
        raise NotFound(msg, dataset=name) from None
    meta = json.loads(raw)
    assert isinstance(meta, dict)
    return meta


def load_dataset(
    ctx: ServiceContext, name: str, meta: dict[str, Any] | None = None
) -> tuple[pd.DataFrame, DataPolicy, str]:
    """(frame, policy, owner), cached in the worker per (party, dataset) by the data's digest; ``meta``: if read."""
    meta = load_meta(ctx, name) if meta is None else meta
    readers = meta.get("readers")  # set on datasets a job made (PSI join): only its receivers may query them
    if readers is not None and ctx.party not in readers:
        msg = f"dataset {name!r} was made by a job and only that job's receivers may query it"
        raise PolicyViolation(msg, dataset=name)
    cache = DatasetCache.of(ctx.state)  # per (party, dataset): another party's use warms nothing for the caller
    df = cache.get(ctx.party, name, meta["sha256"])
    if df is None:
        raw = ctx.seal_get(data_name(name, prefix=""))
        if hashlib.sha256(raw).hexdigest() != meta["sha256"]:
            msg = f"dataset {name!r}: its data does not match the digest in its metadata"
            raise PolicyViolation(msg)
        # the same zero-copy decode as the upload's input, so a restart gives the evaluator the same frame
        df = decode_value("arrow.frame", raw)
        cache.put(ctx.party, name, meta["sha256"], df, frame_bytes(df, len(raw)))
    return df, DataPolicy.from_dict(meta["policy"]), str(meta["owner"])


def public_info(meta: dict[str, Any], party: str) -> dict[str, Any]:
    """What any party may know: the schema, row count, owner and policy (hidden columns named, not shown)."""
    policy = meta["policy"]
    return {
        "name": meta["name"],
        "owner": meta["owner"],
        "columns": meta["columns"],
        "hidden": [] if party == meta["owner"] else list(policy.get("hidden_columns", [])),
        "policy": policy,
        "rows": meta["rows"],
        "sha256": meta["sha256"],
    }


def upload_policy(args: dict[str, Any], df: pd.DataFrame) -> DataPolicy:
    """The upload's ``args['policy']``, checked against the frame (a DP policy may name only columns it has).

    The frame's column names must be names a plan can say (a non-empty string of at most 1024 characters, not
    starting with NUL, each once): otherwise the dataset could be stored but never opened (red team, session 6).
    """
    from mesatee_notebook.wire.schema import check_name

    for c in df.columns:
        if check_name(c, f"column name {str(c)[:40]!r}") == "":
            msg = "a column name must not be empty: name every column before uploading"
            raise MalformedFrame(msg)
    if df.columns.has_duplicates:
        dup = sorted({str(c) for c in df.columns[df.columns.duplicated()]})[:5]
        msg = f"column names must be unique; repeated: {dup}"
        raise MalformedFrame(msg)
    policy = DataPolicy.from_dict(dict(args.get("policy") or {}))
    if policy.privacy is not None:
        named = [policy.privacy.unit] if policy.privacy.unit is not None else []
        missing = sorted({c for c in (*named, *policy.privacy.bounds) if c not in df.columns})
        if missing:
            msg = f"the DP policy names column(s) {missing} that the DataFrame does not have"
            raise EncodingError(msg)
    return policy


@service("dataset.upload")
def upload(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Store ``inputs['data']`` as dataset ``args['name']``, owned by the caller, under ``args['policy']``."""
    name = validate_dataset_name(str(args.get("name", "")))
    df = inputs.get("data")
    if not isinstance(df, pd.DataFrame):
        msg = "dataset.upload needs a pandas DataFrame as input 'data'"
        raise EncodingError(msg)
    policy = upload_policy(args, df)
    try:
        old = load_meta(ctx, name)
    except NotFound:
        old = None
    if old is not None:
        if old["owner"] != ctx.party:
            ctx.audit("refusal", {"dataset": name, "reason": "name owned by another party"}, concerns=[old["owner"]])
            msg = f"dataset {name!r} belongs to another party; choose another name"
            raise PolicyViolation(msg, dataset=name)
        if not args.get("replace"):
            msg = f"dataset {name!r} already exists; pass replace=True to overwrite it"
            raise PolicyViolation(msg, dataset=name)
    df = df.reset_index(drop=True)
    enc = encode_value(df)
    data = b"".join(enc.parts)  # one copy: the parts are buffers shared with the frame
    digest = hashlib.sha256(data).hexdigest()
    ctx.seal_put(data_name(name, prefix=""), data)
    meta = {
        "name": name,
        "owner": ctx.party,
        "policy": policy.to_dict(),
        "columns": [[str(c), str(t)] for c, t in df.dtypes.items()],
        "rows": len(df),
        "sha256": digest,
        "created": time.time(),
    }
    ctx.seal_put(meta_name(name, prefix=""), json.dumps(meta).encode())
    DatasetCache.of(ctx.state).drop(name)  # every party's frame of the data it replaces (a digest check refuses them)
    ctx.audit("upload", {"dataset": name, "rows": len(df), "sha256": digest})
    return ServiceResult(info=public_info(meta, ctx.party))


@service("dataset.info")
def info(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """The public description of one dataset."""
    meta = load_meta(ctx, str(args.get("name", "")))
    if not _readable(meta, ctx.party):
        raise NotFound(f"no dataset named {meta['name']!r} in this kernel", dataset=meta["name"])  # noqa: EM102
    return ServiceResult(info=public_info(meta, ctx.party))


def _readable(meta: dict[str, Any], party: str) -> bool:
    """Datasets a job made (``readers``: its receivers) are not even listed to anyone else."""
    readers = meta.get("readers")
    return readers is None or party in readers


@service("dataset.list")
def listing(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Names, owners and schemas of all datasets (schemas are public)."""
    names = sorted({n.split("/")[1] for n in ctx.seal_list("datasets") if n.endswith("/meta")})
    metas = [load_meta(ctx, n) for n in names]
    return ServiceResult(info={"datasets": [public_info(m, ctx.party) for m in metas if _readable(m, ctx.party)]})


@service("dataset.delete")
def delete(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Delete a dataset (owner only)."""
    name = str(args.get("name", ""))
    meta = load_meta(ctx, name)
    if meta["owner"] != ctx.party:
        ctx.audit("refusal", {"dataset": name, "reason": "delete by non-owner"}, concerns=[meta["owner"]])
        msg = f"only the owner may delete dataset {name!r}"
        raise PolicyViolation(msg, dataset=name)
    ctx.seal_delete(data_name(name, prefix=""))
    ctx.seal_delete(meta_name(name, prefix=""))
    DatasetCache.of(ctx.state).drop(name)
    ctx.audit("upload", {"dataset": name, "deleted": True})
    return ServiceResult(info={"deleted": name})
