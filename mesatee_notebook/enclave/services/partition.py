"""``partition.split``: a partitioned upload's decode, checks, split, encode and digests, in a sandboxed worker.

The cluster head (``enclave/cluster/datasets.py``) hands the upload's payload (its memfd, as for ``dataset.upload``)
to a worker of its own pool; this service decodes it, checks it exactly as ``dataset.upload`` does
(:func:`~.datasets.upload_policy`), and returns what the head needs without decoding a byte of tenant data itself:
the whole frame's SHA-256 (of the same encoding ``dataset.upload`` digests), the columns and dtypes, the row count,
the zero-row schema frame's Arrow bytes, and the N partitions' Arrow streams back to back in one value with each
one's offset, rows, size and SHA-256 in ``info``. The head only places those bytes.

``partition.join`` is the way back, for a code cell's read of a partitioned dataset: the partitions' gathered
bytes in, one Arrow stream of the whole frame out (the same bytes the head used to build itself).
``partition.frames`` evaluates a plan over partitioned datasets that does not decompose (``value_counts``, joins,
DP, ...) on their gathered partitions, with the stock evaluator and its release rules, here rather than in the
head's supervisor.

All three are internal: the supervisor refuses them from the wire (:data:`~mesatee_notebook.enclave.services.INTERNAL`).
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Iterator, Mapping
from typing import Any, Final

import pandas as pd

from mesatee_notebook.enclave.cluster.partitions import encode_partitions
from mesatee_notebook.enclave.services import ServiceContext, ServiceResult, service
from mesatee_notebook.enclave.services.datasets import upload_policy
from mesatee_notebook.errors import EncodingError
from mesatee_notebook.wire.codecs import encode_value

__all__ = ["GATHERED", "JOIN", "SLACK_BYTES", "SPLIT", "max_output"]

SPLIT: Final = "partition.split"
JOIN: Final = "partition.join"
GATHERED: Final = "partition.frames"
#: The partitions may exceed the upload by this much plus the upload's own size (per-partition schemas, and a
#: client's leaner encoding); more means a compressed or otherwise inflated stream, refused before it is sent on.
SLACK_BYTES: Final = 64 << 20


def max_output(upload_bytes: int) -> int:
    """The most partition bytes the head accepts for an upload of ``upload_bytes`` (twice it, plus slack)."""
    return 2 * max(0, upload_bytes) + SLACK_BYTES


def _whole_digest(df: pd.DataFrame) -> str:
    """SHA-256 of the frame's encoding: the digest ``dataset.upload`` seals (its parts hashed back to back)."""
    h = hashlib.sha256()
    for part in encode_value(df).parts:
        h.update(part)
    return h.hexdigest()


@service(SPLIT)
def split(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Split ``inputs['data']`` into ``args['partitions']`` row partitions (see the module docstring)."""
    df = inputs.get("data")
    if not isinstance(df, pd.DataFrame):
        msg = "cluster.upload needs a pandas DataFrame as input 'data'"
        raise EncodingError(msg)
    n = int(args["partitions"])
    limit = int(args.get("max_output", 0))
    df = df.reset_index(drop=True)
    policy = upload_policy(args, df)
    whole = _whole_digest(df)
    encoded = encode_partitions(df, n)
    total = sum(len(p.data) for p in encoded)
    if limit and total > limit:
        msg = (
            f"the upload's partitions take {total} bytes, more than twice the {int(args.get('upload_bytes', 0))} "
            "bytes uploaded: send the frame as an uncompressed Arrow stream"
        )
        raise EncodingError(msg)
    # One value, the partitions back to back, filled as each partition's own bytes are dropped (about 1x memory).
    out = mmap.mmap(-1, max(1, total), flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20))
    records, pos = [], 0
    for i in range(len(encoded)):
        part = encoded[i]
        size = len(part.data)
        out[pos : pos + size] = part.data
        records.append({"offset": part.offset, "rows": part.rows, "size": size, "sha256": part.sha256})
        encoded[i] = part.without_data()
        pos += size
    info = {
        "sha256": whole,
        "rows": len(df),
        "columns": [[str(c), str(t)] for c, t in df.dtypes.items()],
        "policy": policy.to_dict(),
        "partitions": records,
    }
    schema = b"".join(encode_value(df.iloc[:0]).parts)
    return ServiceResult(info=info, values={"partitions": memoryview(out)[:total], "schema": schema})


@service(JOIN)
def join(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """The partitions ``p0`` ... (decoded here, in the sandbox) as one frame's Arrow stream, rows in order."""
    n = int(args["parts"])
    frames = [inputs.get(f"p{i}") for i in range(n)]
    if n < 1 or not all(isinstance(f, pd.DataFrame) for f in frames):
        msg = "partition.join needs the partitions as DataFrames p0 ... p(n-1)"
        raise EncodingError(msg)
    df = pd.concat(frames, ignore_index=True)
    del frames
    return ServiceResult(values={"data": b"".join(encode_value(df).parts)})


class _GatheredDatasets(Mapping[str, tuple[pd.DataFrame, Any, str]]):
    """The evaluator's registry for one gathered plan: partitioned datasets from the inputs, others sealed."""

    def __init__(self, ctx: ServiceContext, frames: dict[str, pd.DataFrame]) -> None:
        from mesatee_notebook.enclave.services.frames import SealedDatasets

        self.ctx = ctx
        self.frames = frames
        self.sealed = SealedDatasets()
        self.sealed.ctx = ctx

    def __getitem__(self, name: str) -> tuple[pd.DataFrame, Any, str]:
        from mesatee_notebook.enclave.services.datasets import load_meta
        from mesatee_notebook.errors import NotFound
        from mesatee_notebook.wire.datapolicy import DataPolicy

        if name not in self.frames:
            return self.sealed[name]
        try:
            meta = load_meta(self.ctx, name)
        except (NotFound, ValueError) as exc:
            raise KeyError(name) from exc
        return self.frames[name], DataPolicy.from_dict(meta["policy"]), str(meta["owner"])

    def __iter__(self) -> Iterator[str]:
        return iter(self.sealed)

    def __len__(self) -> int:
        return len(self.sealed)


@service(GATHERED)
def gathered(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """``frame.collect`` of a plan over partitioned datasets that does not decompose, on their gathered partitions.

    ``args['partitioned']`` names, per dataset, the inputs that hold its partitions in row order. The stock evaluator
    and every release rule run here, in the sandbox, as in the frame service; the guard's history and the DP ledger
    are the sealed ones the head and the frame service use (a fresh evaluator per call re-reads them).
    """
    from mesatee_notebook.enclave.frames import FrameEvaluator
    from mesatee_notebook.enclave.services.frames import (
        SealedGuardStore,
        SealedLedgerStore,
        collect_result,
        new_call,
        release_audit,
    )

    frames: dict[str, pd.DataFrame] = {}
    for name, keys in dict(args.get("partitioned") or {}).items():
        parts = [inputs.get(str(k)) for k in keys]
        if not parts or not all(isinstance(p, pd.DataFrame) for p in parts):
            msg = f"the gathered partitions of {name!r} are not all DataFrames"
            raise EncodingError(msg)
        frames[str(name)] = pd.concat(parts, ignore_index=True)
    sink: dict[str, Any] = {"ctx": ctx}
    ev = FrameEvaluator(
        _GatheredDatasets(ctx, frames),
        release_audit(sink),
        guard_store=SealedGuardStore(sink),
        ledger_store=SealedLedgerStore(sink),
    )
    new_call(sink)
    return collect_result(ev, ctx, args)
