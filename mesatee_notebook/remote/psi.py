"""Client side of private set intersection: ``Session.psi`` (generic jobs are in ``remote/jobs.py``).

Every call goes over the session's attested channel as the session's proven party and comes back with a verified
receipt. Items travel without loss of type (ints, str and bytes never turn into each other); the enclave
canonicalises them (NFC for strings, int128 for ints, see ``docs/psi.md``):

- integer numpy arrays and Series go as ``.npy`` (zero-copy on both sides);
- strings and bytes go as one Arrow IPC stream (``large_string``/``large_binary``), hashed in the enclave straight
  off the Arrow buffers, never as Python objects;
- ints beyond 64 bits go as their decimal text, marked as ints; a list that mixes types goes as msgpack.

A big input is one payload: the channel streams it in 8 MiB frames and hashes it while it moves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mesatee_notebook.errors import EncodingError, PolicyViolation
from mesatee_notebook.remote._public import public_methods
from mesatee_notebook.remote.jobs import JobStatus

if TYPE_CHECKING:
    import pandas as pd

    from mesatee_notebook.attestation.receipts import Receipt
    from mesatee_notebook.remote.frame import SecureDataFrame
    from mesatee_notebook.remote.session import Session
    from mesatee_notebook.wire.datapolicy import DataPolicy
    from mesatee_notebook.wire.stream import Progress

__all__ = ["PsiClient", "PsiResult", "prepare_items"]

_I64 = (-(1 << 63), (1 << 63) - 1)
_U64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class PsiResult:
    """What a receiver gets: the cardinality, the common items (intersection mode), or the joined dataset's name."""

    name: str
    mode: str
    cardinality: int
    items: pd.Series | None
    dataset: str | None
    receipt: Receipt = field(repr=False)
    info: dict[str, Any] = field(repr=False)

    def __len__(self) -> int:
        return self.cardinality


def _refuse(what: str, way_out: str) -> EncodingError:
    return EncodingError(f"PSI items cannot include {what}. {way_out}")


def _arrow_payload(arr: Any) -> bytes:
    import pyarrow as pa

    table = pa.table({"item": arr})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return bytes(sink.getvalue())


def _from_list(values: Sequence[Any]) -> tuple[Any, str]:
    import pyarrow as pa

    kinds = set(map(type, values))
    if not values or kinds == {int}:
        lo, hi = (min(values), max(values)) if values else (0, 0)
        if _I64[0] <= lo and hi <= _I64[1]:
            return np.array(values, dtype=np.int64), "npy"
        if lo >= 0 and hi <= _U64_MAX:
            return np.array(values, dtype=np.uint64), "npy"
        return _arrow_payload(pa.array([str(v) for v in values], type=pa.large_string())), "int-decimal"
    if kinds == {str}:
        return _arrow_payload(pa.array(values, type=pa.large_string())), "arrow"
    if kinds <= {bytes, bytearray}:
        return _arrow_payload(pa.array([bytes(v) for v in values], type=pa.large_binary())), "arrow"
    for i, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)):
            msg = f"a bool (position {i})"
            raise _refuse(msg, "Use ints 0/1 or strings if you mean them as items.")
        if not isinstance(v, (int, np.integer, str, bytes, bytearray)):
            msg = f"a {type(v).__name__} (position {i})"
            raise _refuse(msg, "Convert it to int, str or bytes explicitly.")
    mixed = [int(v) if isinstance(v, np.integer) else bytes(v) if isinstance(v, bytearray) else v for v in values]
    if any(isinstance(v, int) and not _I64[0] <= v <= _U64_MAX for v in mixed):
        msg = "ints beyond 64 bits mixed with other types"
        raise _refuse(msg, "Send them in a list of ints only.")
    return mixed, "msgpack"


def _from_series(items: Any) -> tuple[Any, str]:
    import pandas as pd
    import pyarrow as pa

    dtype = items.dtype
    if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_float_dtype(dtype):
        msg = f"a Series of dtype {dtype}"
        raise _refuse(msg, "Cast it to int or str first.")
    if isinstance(dtype, np.dtype) and dtype.kind in "iu":
        return np.ascontiguousarray(items.to_numpy()), "npy"
    if isinstance(dtype, np.dtype) and dtype.kind == "O":
        return _from_list(items.tolist())
    try:
        return _arrow_payload(pa.array(items)), "arrow"
    except (pa.ArrowException, TypeError, ValueError):
        return _from_list(items.tolist())


def _from_ndarray(items: np.ndarray) -> tuple[Any, str]:
    import pyarrow as pa

    if items.ndim != 1:
        msg = f"a {items.ndim}-d array"
        raise _refuse(msg, "Pass a 1-d array (one item per element).")
    if items.dtype.kind in "iu":
        return np.ascontiguousarray(items), "npy"
    if items.dtype.kind in "US":
        return _arrow_payload(pa.array(items)), "arrow"
    if items.dtype.kind == "O":
        return _from_list(items.tolist())
    msg = f"a numpy array of dtype {items.dtype}"
    raise _refuse(msg, "Cast it to int or str first.")


def prepare_items(items: Any) -> tuple[Any, str]:
    """Turn a set of items into (payload, format) for ``psi.submit``; types are kept exactly."""
    import pandas as pd
    import pyarrow as pa

    if isinstance(items, (str, bytes, bytearray, memoryview)):
        msg = f"a single {type(items).__name__}"
        raise _refuse(msg, "Pass a list (or array) of items, e.g. [value].")
    if isinstance(items, (pa.Array, pa.ChunkedArray)):
        return _arrow_payload(items), "arrow"
    if isinstance(items, (pd.Series, pd.Index)):
        return _from_series(items)
    if isinstance(items, np.ndarray):
        return _from_ndarray(items)
    if isinstance(items, Iterable) and not isinstance(items, Mapping):
        return _from_list(list(items))
    raise _refuse(type(items).__name__, "Pass a list, numpy array, pandas Series or Arrow array.")


@public_methods
class PsiClient:
    """Private set intersection among parties (``psi.*`` services)."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def create(
        self,
        name: str,
        parties: Sequence[str] | Mapping[str, str],
        *,
        mode: str = "intersection",
        receivers: Sequence[str] | None = None,
        dataset: str | None = None,
        max_items: int | None = None,
        approve: bool = True,
        cluster: bool = False,
    ) -> JobStatus:
        """Define PSI ``name`` among ``parties`` (ids, or ``{label: id}`` to name the join's columns).

        ``mode``: ``"intersection"``, ``"cardinality"`` or ``"join"``. ``receivers`` (default: this party) are
        the only ones who get the result. In join mode the joined rows become dataset ``dataset`` (default
        ``psi-<name>``) in the enclave. The creator approves at once if it is one of the parties. ``cluster=True``
        (a kernel served with ``--cluster``): the approved job intersects sharded on the cluster's workers.
        """
        args: dict[str, Any] = {
            "name": name,
            "parties": dict(parties) if isinstance(parties, Mapping) else list(parties),
            "mode": mode,
            "receivers": list(receivers) if receivers is not None else [],
            "approve": approve,
        }
        if dataset is not None:
            args["dataset"] = dataset
        if max_items is not None:
            args["max_items"] = int(max_items)
        if cluster:
            args["cluster"] = True
        return JobStatus.from_info(self._session.call("psi.create", args).info)

    def submit(
        self,
        name: str,
        items: Any = None,
        *,
        values: pd.DataFrame | None = None,
        dataset: str | None = None,
        column: str | None = None,
        value_columns: Sequence[str] | None = None,
        policy: DataPolicy | None = None,
        approve: bool = False,
        upload_progress: Progress | None = None,
    ) -> JobStatus:
        """Submit this party's set, or a column of an enclave dataset it owns.

        ``items``: a list, numpy array, pandas Series or Arrow array. Or ``dataset`` and ``column``: take the
        column of an enclave dataset this party owns (nothing is uploaded then).

        Join mode: ``values`` (a DataFrame row-aligned with ``items``) or ``value_columns`` of the dataset are the
        columns that join; ``policy`` (default: the dataset's, or ``DataPolicy()``) governs what may come out of
        them. ``approve=True`` approves the job in the next call.
        """
        args: dict[str, Any] = {"name": name}
        inputs: dict[str, Any] = {}
        if dataset is not None:
            if items is not None or column is None:
                msg = "pass either items, or dataset and column"
                raise EncodingError(msg)
            args["source"] = {"dataset": dataset, "column": column}
            if value_columns is not None:
                args["source"]["values"] = list(value_columns)
        else:
            if items is None:
                msg = "psi.submit needs items (or dataset= and column=)"
                raise EncodingError(msg)
            payload, fmt = prepare_items(items)
            args["items_format"] = fmt
            inputs["items"] = payload
            if values is not None:
                inputs["values"] = values
        if policy is not None:
            args["policy"] = policy.to_dict()
        res = self._session.call("psi.submit", args, inputs, upload_progress=upload_progress)
        status = JobStatus.from_info(res.info)
        if approve and self._session.party_id in status.missing_approvals:
            return self.approve(name, spec_digest=status.spec_digest)
        return status

    def approve(self, name: str, *, spec_digest: str | None = None) -> JobStatus:
        """Approve the PSI as it stands (parties, mode, receivers): fetch it, then approve that exact spec."""
        digest = spec_digest or self.status(name).spec_digest
        return JobStatus.from_info(self._session.call("psi.approve", {"name": name, "spec_digest": digest}).info)

    def status(self, name: str) -> JobStatus:
        """The PSI job's state, parties, and what it waits for."""
        return JobStatus.from_info(self._session.call("psi.status", {"name": name}).info)

    def parties(self, name: str) -> dict[str, Any]:
        """``{"owners": {label: id}, "receivers": [...], "creator": id}``."""
        return dict(self._session.call("psi.parties", {"name": name}).info)

    def cancel(self, name: str) -> JobStatus:
        """Cancel the PSI (creator or a party); its sealed inputs are deleted."""
        return JobStatus.from_info(self._session.call("job.cancel", {"job": name}).info)

    def result(self, name: str, *, progress: Callable[[dict[str, Any]], None] | None = None) -> PsiResult:
        """The result, for a receiver (with a verified receipt); anyone else gets ``PolicyViolation``."""
        res = self._session.call("psi.result", {"name": name}, progress=progress)
        info = res.info
        items = res.values.get("items")
        if isinstance(items, list):  # mixed types come as a list
            import pandas as pd

            items = pd.Series(items, dtype=object, name="item")
        return PsiResult(
            name=name,
            mode=str(info["mode"]),
            cardinality=int(info["cardinality"]),
            items=items,
            dataset=info.get("dataset"),
            receipt=res.receipt,
            info=dict(info),
        )

    def dataframe(self, name: str) -> SecureDataFrame:
        """Join mode: the joined rows as a SecureDataFrame (only policy-checked aggregates leave the enclave)."""
        result = self.result(name)
        if result.dataset is None:
            msg = f"PSI {name!r} is a {result.mode} job; only join jobs leave a dataset in the enclave"
            raise PolicyViolation(msg)
        return self._session.dataframe(result.dataset)
