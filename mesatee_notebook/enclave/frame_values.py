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
    if arr is None:
        return pos
    out = arr[np.clip(pos, 0, None)] if len(arr) else np.full(len(pos), -1, dtype=np.int64)
    return np.where(pos >= 0, out, -1)


#: Largest (groups x source rows) domain deduplicated with a bitmap (bytes of memory) rather than a hash.
_BITMAP_MAX = 1 << 26


def _dedupe(g: IntArray, s: IntArray, n_src: int) -> tuple[IntArray, IntArray]:
    """The distinct (group, source row) pairs (groups are >= 0), in no particular order."""
    width = max(n_src, 1)
    keys = g * np.int64(width) + s
    domain = (int(g.max()) + 1) * width if len(g) else 0
    if 0 < domain <= _BITMAP_MAX:  # few groups: mark each pair in a bitmap, O(n + domain), no hashing
        seen = np.zeros(domain, dtype=bool)
        seen[keys] = True
        keys = np.flatnonzero(seen).astype(np.int64, copy=False)
    else:
        keys = np.asarray(pd.unique(keys), dtype=np.int64)  # hash-based: O(n), unlike np.unique
    return keys // width, keys % width


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
        for ds, arrays in origin.rows.items():
            gs, ss = [], []
            all_kept = bool(keep.all())
            for arr in arrays:
                src = _compose(arr, pos)
                if arr is None and all_kept:  # the common case: no copies
                    gs.append(codes)
                    ss.append(src)
                    continue
                ok = keep if arr is None else keep & (src >= 0)
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
        valid = src[src >= 0]
        origin.dup[ds] = bool(len(valid)) and int(np.bincount(valid, minlength=1).max()) > 1
    return origin


def _codes(ngroup: pd.Series) -> IntArray:
    arr = ngroup.to_numpy()
    if arr.dtype.kind == "f":
        return np.asarray(np.nan_to_num(arr, nan=-1.0), dtype=np.int64)
    return np.asarray(arr, dtype=np.int64)
