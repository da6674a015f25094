"""The local halves of ``pivot_table`` (its aggregations, and the unstacking of the released groups) and ``info``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

from mesatee_notebook.errors import FrameNotSupported, FrameUsageError
from mesatee_notebook.remote.frame_base import _as_strs
from mesatee_notebook.remote.frame_refusals import _CALLABLE_HINT


def pivot_aggs(
    frame: Any, values: str | Sequence[str] | None, keys: tuple[str, ...], aggfunc: Any
) -> tuple[tuple[tuple[str, str, str], ...], bool]:
    """The ``(output, column, func)`` aggregations of a pivot table, and whether its columns keep the value level."""
    if callable(aggfunc):
        msg = f"pivot_table(aggfunc=<function>): {_CALLABLE_HINT}; pass an aggregation name instead"
        raise FrameNotSupported(msg)
    multi = not isinstance(values, str)  # pandas drops the value level only for one value column given by name
    if isinstance(aggfunc, Mapping):
        if not all(isinstance(f, str) for f in aggfunc.values()):
            msg = "pivot_table(aggfunc={column: [funcs]}) is not available; one aggregation name per column"
            raise FrameUsageError(msg)
        funcs = {str(c): str(f) for c, f in aggfunc.items()}
    elif isinstance(aggfunc, str):
        cols = _as_strs(values, "values") if values is not None else tuple(c for c in frame._visible() if c not in keys)
        funcs = dict.fromkeys(cols, aggfunc)
    else:
        msg = "pivot_table(aggfunc=[...]) is not available; use one aggregation name or a dict {column: name}"
        raise FrameUsageError(msg)
    clash = [c for c in funcs if c in keys]
    if clash or not funcs:
        msg = f"pivot_table() needs value columns that are not keys (got {clash or 'none'})"
        raise FrameUsageError(msg)
    return tuple((c, c, f) for c, f in funcs.items()), multi


def pivot_post(
    n_index: int, n_keys: int, multi: bool, fill_value: Any, dropna: bool, sort: bool
) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """Pandas' own reshaping of a grouped aggregate into a pivot table (pandas/core/reshape/pivot.py)."""

    def post(agged: pd.DataFrame) -> pd.DataFrame:
        if dropna and len(agged.columns):
            agged = agged.dropna(how="all")
        table: Any = agged
        if table.index.nlevels > 1 and n_keys > n_index:
            table = agged.unstack(list(range(n_index, n_keys)), fill_value=fill_value)
        if not dropna:
            for axis in (0, 1):
                labels = table.axes[axis]
                if isinstance(labels, pd.MultiIndex):
                    full = pd.MultiIndex.from_product(labels.levels, names=labels.names)
                    table = table.reindex(full, axis=axis, fill_value=fill_value)
        if sort:
            table = table.sort_index(axis=1)
        if fill_value is not None:
            table = table.fillna(fill_value)
        if not multi and table.columns.nlevels > 1:
            table.columns = table.columns.droplevel(0)
        if dropna:
            table = table.dropna(how="all", axis=1)
        out: pd.DataFrame = table
        return out

    post.dp_shape = True  # type: ignore[attr-defined]  # reshaping a DP release is post-processing: free
    return post


def info_text(frame: Any, rows: int | None, counts: pd.Series | None) -> str:
    """``DataFrame.info()``'s summary of a remote frame: dtypes from the schema, counts as released."""
    schema = frame.schema
    lines = [f"<class '{type(frame).__module__}.{type(frame).__name__}'> (lazy; the data stays in the enclave)"]
    if rows is not None:
        lines.append(f"{rows} entries (a policy-checked count)")
    lines.append(f"Data columns (total {len(schema.columns)} columns):")
    table = [("#", "Column", "Non-Null Count", "Dtype"), ("---", "------", "--------------", "-----")]
    for i, (c, d) in enumerate(schema.columns):
        if c in schema.hidden:
            count = "hidden"
        elif counts is None:
            count = ""
        elif c in counts.index and pd.notna(counts[str(c)]):
            count = f"{int(counts[str(c)])} non-null"
        else:
            count = "suppressed"
        table.append((str(i), str(c), count, d))
    widths = [max(len(r[k]) for r in table) for k in range(4)]
    lines.extend(" " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in table)
    kinds = Counter(d for _, d in schema.columns)
    lines.append("dtypes: " + ", ".join(f"{d}({n})" for d, n in sorted(kinds.items())))
    lines.append("memory usage: not measured (the data is in the enclave)")
    return "\n".join(lines) + "\n"
