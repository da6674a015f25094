"""Values the frame evaluator passes between nodes, and their provenance (which protected rows each came from)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

IntArray = npt.NDArray[np.int64]

_LPOS = "\x00mn_lpos"
_RPOS = "\x00mn_rpos"
_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "truediv": operator.truediv,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
    "pow": operator.pow,
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "and": operator.and_,
    "or": operator.or_,
    "xor": operator.xor,
}


# ---------------------------------------------------------------------------
# Provenance


@dataclass(slots=True)
class _Origin:
    """The node that indexed a value anew, and where its positions come from.

    For ``rows``: per protected dataset, the source row of each position (one array per
    occurrence of the dataset; ``None`` = the identity; -1 = no row, from an outer join).
    For ``groups``/``summary``: per protected dataset, the (position, source row)
    membership pairs, deduplicated.
    """

    kind: Literal["rows", "groups", "summary"]
    n: int
    rows: dict[str, list[IntArray | None]] = field(default_factory=dict)
    members: dict[str, tuple[IntArray, IntArray]] = field(default_factory=dict)
    sizes: dict[str, IntArray] = field(default_factory=dict)
    dup: dict[str, bool] = field(default_factory=dict)
    keys: pd.Index | None = None


Cells = dict[str, IntArray]  # dataset -> contributor count per origin position
_Merged = tuple[pd.DataFrame, "IntArray | None", "IntArray | None"]  # a merge and each side's rows behind it


@dataclass(slots=True)
class _FrameV:
    df: pd.DataFrame
    origin: _Origin
    cells: dict[str, Cells] = field(default_factory=dict)


@dataclass(slots=True)
class _SeriesV:
    s: pd.Series
    origin: _Origin
    cells: Cells | None = None
    entry_cells: dict[str, Cells] | None = None  # frame-level reductions: contributors per entry (column)


@dataclass(slots=True)
class _ScalarV:
    value: Any
    counts: dict[str, int]
    members: dict[str, tuple[IntArray, IntArray]]
    dup: dict[str, bool]


_Value = _FrameV | _SeriesV | _ScalarV


def _positions(index: pd.Index) -> IntArray:
    return np.asarray(index.to_numpy(), dtype=np.int64)


def _compose(arr: IntArray | None, pos: IntArray) -> IntArray:
    """``arr[pos]``, with -1 wherever ``pos`` is -1 (no row)."""
    if arr is None:
        return pos
    if _identity(pos, len(arr)):  # e.g. a group-by straight after a merge: every row, in order
        return arr
    if not len(arr):
        return np.full(len(pos), -1, dtype=np.int64)
    if len(pos) and int(pos.min()) >= 0:  # no missing rows: one gather
        return arr[pos]
    return np.where(pos >= 0, arr[np.maximum(pos, 0)], -1)


_BLOCK = 1 << 16
_STEPS = np.arange(_BLOCK, dtype=np.int64)


def _identity(pos: IntArray, n: int) -> bool:
    """Whether ``pos`` is 0, 1, ..., n-1 (checked in full only when its length and ends say it may be).

    Compared block by block against one small ramp: no array as long as ``pos`` is made (fresh pages are
    dear on the VMs this runs on).
    """
    if len(pos) != n:
        return False
    if n == 0:
        return True
    if pos[0] != 0 or pos[-1] != n - 1:
        return False
    for start in range(0, n, _BLOCK):
        block = pos[start : start + _BLOCK]
        if not np.array_equal(block - start, _STEPS[: len(block)]):
            return False
    return True


#: Largest (groups x source rows) domain deduplicated with a bitmap (bytes of memory) rather than a hash.
_BITMAP_MAX = 1 << 26


def _dedupe(g: IntArray, s: IntArray, n_src: int) -> tuple[IntArray, IntArray]:
    """The distinct (group, source row) pairs (groups are >= 0); by source row, then group, where few groups.

    That order is the differencing guard's, so its record needs no sort then.
    """
    if not len(g):
        return g, s
    n_groups = np.int64(int(g.max()) + 1)
    domain = int(n_groups) * max(n_src, 1)
    if domain <= _BITMAP_MAX:  # few groups: mark each pair in a bitmap, O(n + domain), no hashing
        seen = np.zeros(domain, dtype=bool)
        buf = np.empty(min(len(g), _BLOCK), dtype=np.int64)  # one cache-sized key buffer, reused per block
        for start in range(0, len(g), _BLOCK):
            gb, sb = g[start : start + _BLOCK], s[start : start + _BLOCK]
            key = buf[: len(gb)]
            np.multiply(sb, n_groups, out=key)  # source row major: the marks come out in the guard's order
            key += gb
            seen[key] = True
        keys = np.flatnonzero(seen).astype(np.int64, copy=False)
        return keys % n_groups, keys // n_groups
    width = np.int64(max(n_src, 1))
    keys = g * width
    keys += s
    keys = np.asarray(pd.unique(keys), dtype=np.int64)  # hash-based: O(n), unlike np.unique
    return keys // width, keys % width


def _sorted_repeats(valid: IntArray) -> bool | None:
    """Whether neighbours repeat in ``valid``; None if it is out of order with no repeated neighbour seen.

    Block by block (one element of overlap), so no temporary as long as the input is made.
    """
    for start in range(0, len(valid) - 1, _BLOCK):
        block = valid[start : start + _BLOCK + 1]
        if not bool(np.all(block[1:] > block[:-1])):  # the common case, increasing, costs one comparison
            return True if bool(np.any(block[1:] == block[:-1])) else None  # a repeat, whatever the order
    return False


def _has_repeats(src: IntArray) -> bool:
    """Whether a source row (>= 0) occurs more than once.

    Counted by pigeonhole first (more rows than distinct values up to the largest: a repeat, without a pass
    beyond ``min``/``max``); a sorted ``src`` (a merge keeps the left order) is checked by comparing neighbours,
    without a count array as long as the source.
    """
    if len(src) < 2:
        return False
    lo, hi = int(src.min()), int(src.max())
    if hi < 0:
        return False
    valid = src if lo >= 0 else src[src >= 0]
    if len(valid) > hi + 1:
        return True
    if len(valid) < 2:
        return False
    in_order = _sorted_repeats(valid)
    if in_order is not None:
        return in_order
    return int(np.bincount(valid).max()) > 1


def _merge_by_columns(left: pd.DataFrame, right: pd.DataFrame, kwargs: Mapping[str, Any]) -> _Merged:
    """The merge with each side's row positions carried through it as two extra columns (the plain way)."""
    ldf = left.assign(**{_LPOS: np.arange(len(left), dtype=np.int64)})
    rdf = right.assign(**{_RPOS: np.arange(len(right), dtype=np.int64)})
    out = ldf.merge(rdf, **kwargs)
    lrow = np.asarray(out.pop(_LPOS).fillna(-1).to_numpy(), dtype=np.int64)
    rrow = np.asarray(out.pop(_RPOS).fillna(-1).to_numpy(), dtype=np.int64)
    return out, lrow, rrow


def _pandas_merge_op() -> Any:
    """The merge operation class of pandas (``pd.merge`` runs one), or None where this pandas has none by that name."""
    try:
        from pandas.core.reshape.merge import _MergeOperation  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _MergeOperation


def _merge_rows(left: pd.DataFrame, right: pd.DataFrame, kwargs: Mapping[str, Any]) -> _Merged:
    """``left.merge(right, **kwargs)`` and, per side, the row of that side behind each result row (-1: none).

    A side's rows are None when the result takes every row of it in order. They are the join indexers pandas
    computes for the merge anyway (``_MergeOperation._get_join_info``, read as it returns), so no position
    columns go through the join; where that pandas internal is not there, the rows go through as columns.
    """
    merge_op = _pandas_merge_op()
    if merge_op is None:
        return _merge_by_columns(left, right, kwargs)
    try:
        # pd.merge's own defaults, spelled out: _MergeOperation's differ (it sorts by default)
        op = merge_op(left, right, **{"sort": False, "indicator": False, "validate": None, **kwargs})
        join_info = op._get_join_info
    except (AttributeError, TypeError):
        return _merge_by_columns(left, right, kwargs)
    seen: list[tuple[Any, Any, Any]] = []

    def spy() -> Any:
        info = join_info()
        seen.append(info)
        return info

    op._get_join_info = spy
    out = op.get_result()
    if len(seen) != 1:
        return _merge_by_columns(left, right, kwargs)
    _, lrow, rrow = seen[0]
    sides = ((lrow, len(left)), (rrow, len(right)))
    if any((len(out) != n) if rows is None else (len(rows) != len(out)) for rows, n in sides):
        return _merge_by_columns(left, right, kwargs)  # not the indexers this module knows: the plain way
    return (
        out,
        None if lrow is None else np.asarray(lrow, dtype=np.int64),
        None if rrow is None else np.asarray(rrow, dtype=np.int64),
    )


def _side_positions(index: pd.Index, rows: IntArray | None) -> IntArray | None:
    """The positions (in its origin) of a merge side's row behind each result row: ``rows`` through ``index``.

    None: the result takes the side's origin positions 0, 1, ... in order (no array is made).
    """
    at = _range_positions(index)
    if rows is None:
        return at
    if at is None:
        return rows
    return _compose(at, rows)


def _range_positions(index: pd.Index) -> IntArray | None:
    """The positions ``index`` holds; None for 0, 1, ..., n-1 (a ``RangeIndex`` from 0): no array is made."""
    if isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1:
        return None
    return _positions(index)


def _every_row(codes: IntArray, mask: npt.NDArray[np.bool_] | None) -> npt.NDArray[np.bool_] | None:
    """The rows that count (in a group and kept by ``mask``); None when every row does."""
    if mask is None:
        if not len(codes) or int(codes.min()) >= 0:  # a reduction: no temporary
            return None
        return codes >= 0
    keep = (codes >= 0) & mask
    return None if bool(keep.all()) else keep


def _source_rows(arr: IntArray | None, pos: IntArray | None, n: int) -> IntArray:
    """The source row of each of the ``n`` rows at ``pos`` (None: 0 .. n-1) of an origin array (None: identity)."""
    if pos is not None:
        return _compose(arr, pos)
    if arr is None:
        return np.arange(n, dtype=np.int64)
    return arr if len(arr) == n else arr[:n]


def _membership(
    origin: _Origin,
    pos: IntArray | None,
    codes: IntArray,
    mask: npt.NDArray[np.bool_] | None,
    n_src: Mapping[str, int],
) -> dict[str, tuple[IntArray, IntArray]]:
    """Map each protected dataset's rows to the groups ``codes`` puts the value's rows in.

    ``pos`` are the value's positions in ``origin`` (None: 0, 1, ..., len(codes) - 1); ``codes[i]`` is the
    group of row i (-1: none); ``mask`` keeps only some rows. Returns deduplicated (group, source row) pairs;
    when every row counts once, the group array is ``codes`` itself (callers may rely on that identity).
    """
    keep = _every_row(codes, mask)
    out: dict[str, tuple[IntArray, IntArray]] = {}
    if origin.kind == "rows":
        for ds, arrays in origin.rows.items():
            gs, ss = [], []
            for arr in arrays:
                src = _source_rows(arr, pos, len(codes))
                ok = keep
                if arr is not None and len(src) and int(src.min()) < 0:  # rows an outer join did not match
                    ok = src >= 0 if ok is None else ok & (src >= 0)
                if ok is None:  # the common case: every row counts, no copies
                    gs.append(codes)
                    ss.append(src)
                else:
                    gs.append(codes[ok])
                    ss.append(src[ok])
            g, s = (gs[0], ss[0]) if len(gs) == 1 else (np.concatenate(gs), np.concatenate(ss))
            out[ds] = _dedupe(g, s, n_src[ds]) if origin.dup.get(ds) or len(arrays) > 1 else (g, s)
        return out
    remap = np.full(origin.n, -1, dtype=np.int64)
    at = np.arange(len(codes), dtype=np.int64) if pos is None else pos
    if keep is None:
        remap[at] = codes
    else:
        remap[at[keep]] = codes[keep]
    for ds, (mpos, msrc) in origin.members.items():
        g = remap[mpos]
        ok = g >= 0
        g, s = g[ok], msrc[ok]
        out[ds] = _dedupe(g, s, n_src[ds])
    return out


def _renumber(
    members: Mapping[str, tuple[IntArray, IntArray]], pos: IntArray, n: int
) -> dict[str, tuple[IntArray, IntArray]]:
    """The (group, source row) pairs of the groups kept at ``pos`` (of ``n``), numbered 0, 1, ... in that order.

    When every group is kept in order (nothing suppressed, no reordering), the pairs are returned as they are.
    """
    if _identity(pos, n):
        return dict(members)
    remap = np.full(n, -1, dtype=np.int64)
    remap[pos] = np.arange(len(pos))
    out = {}
    for ds, (g, s) in members.items():
        ng = remap[g]
        ok = ng >= 0
        out[ds] = (ng[ok], s[ok])
    return out


def _counts(members: Mapping[str, tuple[IntArray, IntArray]], n_groups: int) -> Cells:
    return {ds: np.bincount(g, minlength=n_groups).astype(np.int64) for ds, (g, _) in members.items()}


def _min_cells(a: Cells | None, b: Cells | None) -> Cells | None:
    if a is None or b is None:
        return a if b is None else b
    out: Cells = dict(a)
    for ds, counts in b.items():
        out[ds] = np.minimum(out[ds], counts) if ds in out else counts
    return out


def _rows_origin(n: int, sides: Any) -> _Origin:
    """A new row origin whose row i comes from position ``pos[i]`` (-1: none) of each side's origin.

    ``pos`` None: row i comes from position i (the side's arrays are kept as they are, an identity stays one).
    """
    origin = _Origin("rows", n)
    for side, pos in sides:
        for ds, arrays in side.rows.items():
            origin.rows.setdefault(ds, []).extend(_kept_rows(arr, pos, n) for arr in arrays)
    for ds, arrays in origin.rows.items():
        if len(arrays) > 1:
            origin.dup[ds] = True
            continue
        src = arrays[0]
        origin.dup[ds] = False if src is None else _has_repeats(src)
    return origin


def _kept_rows(arr: IntArray | None, pos: IntArray | None, n: int) -> IntArray | None:
    if pos is not None:
        return _compose(arr, pos)
    return arr if arr is None or len(arr) == n else arr[:n]


def _group_codes(gb: Any) -> IntArray:
    """Each row's group number in ``gb`` (-1: in none), exactly as ``_codes(gb.ngroup())`` numbers them.

    pandas' own codes where it keeps them (no categorical key: ``ngroup`` renumbers those): ``ngroup``
    would copy them into a new Series, and turn them into floats when rows with a missing key are dropped.
    """
    grouper = getattr(gb, "_grouper", None)
    groupings = getattr(grouper, "groupings", None)
    if groupings is not None and not any(getattr(p, "_passed_categorical", True) for p in groupings):
        ids = getattr(grouper, "ids", None)
        if isinstance(ids, np.ndarray) and ids.dtype.kind == "i" and len(ids) == len(gb.obj):
            return np.asarray(ids, dtype=np.int64)
    return _codes(gb.ngroup())


def _codes(ngroup: pd.Series) -> IntArray:
    arr = ngroup.to_numpy()
    if arr.dtype.kind == "f":
        return np.asarray(np.nan_to_num(arr, nan=-1.0), dtype=np.int64)
    return np.asarray(arr, dtype=np.int64)


# ---------------------------------------------------------------------------
# Row-isolated evaluation (the DP mode)


def _row_isolated(fn: Callable[..., Any], args: tuple[Any, ...], index: pd.Index) -> Any:
    """``fn(*args)`` (series/frames aligned on ``index``, or scalars), where a row it cannot compute gets a stand-in.

    The DP mode calls this when the vectorised call raised: whether a query fails must not depend on one
    record (``2 ** (salary - t)`` raises iff some salary < t: an exact bit per query, past the noise). The rows
    are bisected until each failing row is alone; each failing row's value is then missing where the result's
    dtype can say so, else 0 / False, so the result keeps the dtype the other rows give and depends on each row
    only through that row.
    """
    parts: list[Any] = []
    failed: list[int] = []
    stack = [(0, len(index))]
    while stack:
        lo, hi = stack.pop()
        if lo >= hi:
            continue
        try:
            parts.append(fn(*(a.iloc[lo:hi] if isinstance(a, (pd.Series, pd.DataFrame)) else a for a in args)))
        except Exception:  # any failure of this block of rows: bisect it
            if hi - lo == 1:
                failed.append(lo)
            else:
                mid = (lo + hi) // 2
                stack += [(mid, hi), (lo, mid)]
    if not parts:  # every row failed: the empty call says what the result is (a frame or series, its dtype)
        parts.append(fn(*(a.iloc[0:0] if isinstance(a, (pd.Series, pd.DataFrame)) else a for a in args)))
    out = pd.concat(parts) if len(parts) > 1 else parts[0]
    natural = out.dtypes if isinstance(out, pd.DataFrame) else out.dtype
    out = out.reindex(index)
    if failed:
        out = _stand_in(out, natural)
    return out


def _stand_in(out: Any, natural: Any) -> Any:
    """Fill the rows ``reindex`` left missing with a value of the natural dtype (numpy numbers and bools: 0/False)."""
    if isinstance(out, pd.DataFrame):
        out = out.copy()
        for i in range(out.shape[1]):
            out.isetitem(i, _stand_in(out.iloc[:, i], natural.iloc[i]))
        return out
    if isinstance(natural, np.dtype) and natural.kind in "iub":
        return out.fillna(natural.type(0)).astype(natural)
    return out
