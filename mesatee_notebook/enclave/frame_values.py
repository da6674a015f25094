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
    """The distinct (group, source row) pairs (groups are >= 0), in no particular order."""
    width = np.int64(max(n_src, 1))
    domain = (int(g.max()) + 1) * int(width) if len(g) else 0
    if 0 < domain <= _BITMAP_MAX:  # few groups: mark each pair in a bitmap, O(n + domain), no hashing
        seen = np.zeros(domain, dtype=bool)
        for start in range(0, len(g), _BLOCK * 16):  # block by block: no temporary as long as the input
            block = g[start : start + _BLOCK * 16] * width
            block += s[start : start + _BLOCK * 16]
            seen[block] = True
        keys = np.flatnonzero(seen).astype(np.int64, copy=False)
    else:
        keys = g * width
        keys += s
        keys = np.asarray(pd.unique(keys), dtype=np.int64)  # hash-based: O(n), unlike np.unique
    return keys // width, keys % width


def _has_repeats(src: IntArray) -> bool:
    """Whether a source row (>= 0) occurs more than once.

    A sorted ``src`` (a merge keeps the left order) is checked by comparing neighbours, without a count array as
    long as the source.
    """
    valid = src if not len(src) or int(src.min()) >= 0 else src[src >= 0]
    if len(valid) < 2:
        return False
    if bool(np.all(valid[1:] >= valid[:-1])):
        return bool(np.any(valid[1:] == valid[:-1]))
    return int(np.bincount(valid).max()) > 1


def _membership(
    origin: _Origin, pos: IntArray, codes: IntArray, mask: npt.NDArray[np.bool_] | None, n_src: Mapping[str, int]
) -> dict[str, tuple[IntArray, IntArray]]:
    """Map each protected dataset's rows to the groups ``codes`` puts the value's rows in.

    ``pos`` are the value's positions in ``origin``; ``codes[i]`` is the group of row i
    (-1: none); ``mask`` keeps only some rows. Returns deduplicated (group, source row) pairs.
    """
    keep = codes >= 0 if mask is None else (codes >= 0) & mask
    out: dict[str, tuple[IntArray, IntArray]] = {}
    if origin.kind == "rows":
        all_kept = bool(keep.all())
        for ds, arrays in origin.rows.items():
            gs, ss = [], []
            for arr in arrays:
                src = _compose(arr, pos)
                ok = None if all_kept else keep
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
    remap[pos[keep]] = codes[keep]
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
    """A new row origin whose row i comes from position ``pos[i]`` (-1: none) of each side's origin."""
    origin = _Origin("rows", n)
    for side, pos in sides:
        for ds, arrays in side.rows.items():
            origin.rows.setdefault(ds, []).extend(_compose(arr, pos) for arr in arrays)
    for ds, arrays in origin.rows.items():
        if len(arrays) > 1:
            origin.dup[ds] = True
            continue
        src = arrays[0]
        assert src is not None
        origin.dup[ds] = _has_repeats(src)
    return origin


def _codes(ngroup: pd.Series) -> IntArray:
    arr = ngroup.to_numpy()
    if arr.dtype.kind == "f":
        return np.asarray(np.nan_to_num(arr, nan=-1.0), dtype=np.int64)
    return np.asarray(arr, dtype=np.int64)
