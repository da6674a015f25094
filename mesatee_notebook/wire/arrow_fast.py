"""Fast paths of the Arrow frame codec (``wire/codecs.py``): same bytes on the wire, same frames out, less work.

- :func:`zero_copy_table`: the Arrow table of a frame of plain numpy int/float columns on the columns' own memory
  (no NaN scan), with the schema ``pa.Schema.from_pandas`` gives, remembered by layout;
- :func:`small_numeric_frame`: ``table.to_pandas()`` of a small null-free numeric table, built in one block.

A 1-row prediction frame of a few dozen columns cost milliseconds each way through the general paths (a pandas
Series and an Arrow array per column, the pandas metadata rebuilt); ``tests/core/test_codecs_fast.py`` checks that
both paths give what the general ones give.

**Caches are per party.** Whether a schema (or, in ``wire/codecs.py``, an npy header) is remembered is a timing
signal: a remembered schema saves about 3 ms, an npy header 10-100 us (measured in a loop of 2,000 calls; the
figures are in ``tests/security/test_redteam_caches.py``). A service worker and the cluster head serve many parties
in one process, so every such cache is kept per *scope* (:func:`room`): the ``scope`` a caller passes, else the
party whose call the process is serving (:func:`caller_scope`, set by the service dispatch and the cluster head's
admission). One party then learns from the timing only about its own earlier calls, and one that sends ever new
layouts evicts only its own.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = [
    "SMALL_FRAME",
    "Scoped",
    "caller_scope",
    "current_scope",
    "room",
    "scoped",
    "small_numeric_frame",
    "zero_copy_table",
]

_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("mesatee_codec_scope", default=None)
_SCOPES = 64  # scopes remembered per cache (then the least recently used goes): a bound on memory, not a policy
_SCOPES_LOCK = threading.Lock()  # the cluster head's threads share the caches: touch and evict under one lock

#: One cache kept per scope: scope -> that scope's own entries, least recently used scope first.
Scoped = collections.OrderedDict[str | None, Any]


@contextlib.contextmanager
def caller_scope(party: str | None) -> Iterator[None]:
    """Within the block, the codecs' caches are ``party``'s (a process serving several parties sets it per call)."""
    token = _CALLER.set(party)
    try:
        yield
    finally:
        _CALLER.reset(token)


def current_scope(scope: str | None = None) -> str | None:
    """``scope`` if given, else the party whose call this thread serves (:func:`caller_scope`), else None."""
    return scope if scope is not None else _CALLER.get()


def scoped(cache: Scoped, scope: str | None) -> Any:
    """``cache[scope]`` (marked as just used, so it is evicted last), or None if the scope has no entries yet."""
    with _SCOPES_LOCK:
        mine = cache.get(scope)
        if mine is not None:
            cache.move_to_end(scope)
        return mine


def room(cache: Scoped, scope: str | None, per_scope: int, size: Any = len) -> Any:
    """``cache[scope]`` to add to: emptied when ``size`` of it reaches ``per_scope``.

    A new scope in a cache of ``_SCOPES`` evicts the least recently used one only, so a party that makes ever new
    identities (a Sybil) costs the parties at work no cache miss (a Sybil gap session 7's red team left:
    ``tests/security/test_gaps_caches.py``); memory stays bounded by ``_SCOPES`` times ``per_scope``.
    """
    with _SCOPES_LOCK:
        mine = cache.get(scope)
        if mine is None:
            while len(cache) >= _SCOPES:
                cache.popitem(last=False)
            mine = cache[scope] = {}
        else:
            cache.move_to_end(scope)
        if size(mine) >= per_scope:
            mine.clear()
        return mine


SMALL_FRAME = 1 << 20
"""Tables up to this many bytes are small: copied once, written by Arrow in one buffer, decoded in one block."""


def zero_copy_table(df: Any, scope: str | None = None) -> Any:
    """The Arrow table of a frame of plain numpy int/float columns, sharing the columns' memory.

    ``pa.Table.from_pandas`` scans float columns for NaN (to mark them null), a full pass over
    the data on one core. For frames whose columns are all numpy int/uint/float, with unique
    string labels and a RangeIndex, the schema (with the same pandas metadata) comes from
    ``pa.Schema.from_pandas`` and each column becomes an Arrow array on its own buffer; NaN stays
    a NaN value instead of becoming null, which decodes to the same DataFrame. Anything else:
    ``None`` (the caller uses ``from_pandas``).
    """
    import pandas as pd
    import pyarrow as pa

    if not isinstance(df.index, pd.RangeIndex) or isinstance(df.columns, pd.MultiIndex) or df.shape[1] == 0:
        return None
    names, dtypes = df.columns.tolist(), df.dtypes.tolist()
    if not df.columns.is_unique or not all(type(c) is str for c in names):
        return None
    if not all(isinstance(t, np.dtype) and (t.kind in "iu" or t.str[1:] in ("f4", "f8")) for t in dtypes):
        return None
    if not all(t.byteorder in ("=", "|") for t in dtypes):
        return None
    schema = _frame_schema(df, names, dtypes, current_scope(scope))
    if schema.names != names:
        return None
    return pa.Table.from_arrays(_arrays(df, dtypes, schema), schema=schema)


_SCHEMAS: Scoped = collections.OrderedDict()  # scope -> layout key -> (schema, pandas metadata)


def _arrays(df: Any, dtypes: list[np.dtype[Any]], schema: Any) -> list[Any]:
    """Each column as an Arrow array on the frame's own memory; a small one-dtype frame: slices of one copy of it.

    (For a 1-row frame of 28 columns, a pandas Series and an Arrow array per column cost more than the call.)
    """
    import pyarrow as pa

    rows = df.shape[0]
    if len(set(dtypes)) == 1 and rows * df.shape[1] * dtypes[0].itemsize <= SMALL_FRAME:
        flat = pa.array(np.ascontiguousarray(df.to_numpy().T).reshape(-1), type=schema.field(0).type)
        return [flat.slice(i * rows, rows) for i in range(df.shape[1])]
    return [
        pa.array(col.to_numpy(), type=f.type, from_pandas=False) for (_, col), f in zip(df.items(), schema, strict=True)
    ]


def _frame_schema(df: Any, names: list[str], dtypes: list[np.dtype[Any]], scope: str | None) -> Any:
    """``pa.Schema.from_pandas(df)`` for a numeric RangeIndex frame, remembered by layout (it walks every column).

    The pandas metadata depends on the column labels and dtypes, the column index's dtype and name, the index's
    name, start, stop and step, and ``df.attrs``; frames with ``attrs`` are not remembered, and ``stop`` is set per
    frame, so the schema is the one ``from_pandas`` gives (``tests/core/test_codecs_fast.py`` checks it).
    """
    import json

    import pyarrow as pa

    idx, cols = df.index, df.columns
    simple = not df.attrs and all(n is None or isinstance(n, str) for n in (idx.name, cols.name))
    key = (tuple(names), tuple(t.str for t in dtypes), str(cols.dtype), cols.name, idx.name, idx.start, idx.step)
    hit = (scoped(_SCHEMAS, scope) or {}).get(key) if simple else None
    if hit is None:
        schema = pa.Schema.from_pandas(df, preserve_index=None)
        meta = json.loads(schema.metadata[b"pandas"])
        ranges = [c for c in meta.get("index_columns", []) if isinstance(c, dict) and c.get("kind") == "range"]
        if not simple or len(ranges) != 1:
            return schema
        hit = room(_SCHEMAS, scope, 256)[key] = (schema, meta)
    schema, meta = hit
    if meta["index_columns"][0]["stop"] == idx.stop:
        return schema
    meta = {**meta, "index_columns": [{**meta["index_columns"][0], "stop": idx.stop}]}
    return schema.with_metadata({**schema.metadata, b"pandas": json.dumps(meta).encode()})


_NUMERIC_PANDAS = frozenset(f"{k}{b}" for k in ("int", "uint") for b in (8, 16, 32, 64)) | {"float32", "float64"}


def small_numeric_frame(table: Any) -> Any:
    """``table.to_pandas()`` for a small table of null-free int/float columns with a RangeIndex, built directly.

    ``to_pandas`` rebuilds the pandas metadata (column index, index, one block per column), which for a 1-row
    frame of a few dozen columns costs milliseconds; this path makes the same frame (labels, dtypes, index,
    column index) in one block. Anything else (nulls, other types, other metadata, large tables): ``None``.
    """
    import pandas as pd

    layout = _simple_layout(table) if table.get_total_buffer_size() <= SMALL_FRAME else None
    if layout is None:
        return None
    (start, stop, step, index_name), columns_name = layout
    names = table.schema.names
    index = pd.RangeIndex(start, stop, step, name=index_name)
    if len(index) != table.num_rows:
        return None
    arrays = [col.to_numpy() for col in table.columns]
    columns = pd.Index(names, dtype="str", name=columns_name)
    if len({a.dtype for a in arrays}) > 1:
        return pd.DataFrame(dict(zip(names, arrays, strict=True)), index=index).set_axis(columns, axis=1)
    block = np.column_stack(arrays) if arrays[0].size else np.empty((len(index), len(names)), arrays[0].dtype)
    return pd.DataFrame(block, index=index, columns=columns, copy=False)


def _simple_layout(table: Any) -> tuple[tuple[int, int, int, str | None], str | None] | None:
    """((start, stop, step, index name), column index name) of a table :func:`small_numeric_frame` can build."""
    import json

    import pyarrow as pa

    names = table.schema.names
    raw = table.schema.metadata.get(b"pandas") if table.schema.metadata else None
    meta = json.loads(raw) if raw else None
    if not isinstance(meta, dict) or meta.get("attributes") not in (None, {}) or not names:
        return None
    ranges: Any = meta.get("index_columns")
    levels: Any = meta.get("column_indexes")
    cols = meta.get("columns")
    one = isinstance(ranges, list) and len(ranges) == 1 and isinstance(levels, list) and len(levels) == 1
    rng, level = (ranges[0], levels[0]) if one else (None, None)
    simple = (
        isinstance(rng, dict)
        and isinstance(level, dict)
        and rng.get("kind") == "range"
        and all(isinstance(rng.get(k), int) for k in ("start", "stop", "step"))
        and level.get("pandas_type") == "unicode"
        and all(n is None or isinstance(n, str) for n in (rng.get("name"), level.get("name")))
        and isinstance(cols, list)
        and [c.get("name") if isinstance(c, dict) else None for c in cols] == names
        and len(set(names)) == len(names)
        and all(c.get("pandas_type") in _NUMERIC_PANDAS for c in cols)
        and all(pa.types.is_integer(t) or pa.types.is_float32(t) or pa.types.is_float64(t) for t in table.schema.types)
        and not any(col.null_count for col in table.columns)
    )
    if not simple:
        return None
    assert isinstance(rng, dict) and isinstance(level, dict)
    return (rng["start"], rng["stop"], rng["step"], rng.get("name")), level.get("name")
