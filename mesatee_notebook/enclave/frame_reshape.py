"""The enclave's visitors for the ops of :mod:`mesatee_notebook.wire.ops.reshape` (a mixin of ``frame_eval._Run``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from mesatee_notebook.enclave.frame_values import (
    Cells,
    _counts,
    _FrameV,
    _membership,
    _Origin,
    _positions,
    _rows_origin,
    _SeriesV,
    _Value,
)
from mesatee_notebook.wire.ops import CorrMatrix, GroupWindow, ModeFrame, SortIndex


def _group_window(gb: Any, func: str, args: tuple[Any, ...]) -> pd.Series:
    """One window function within each group of a selected column (pandas' own GroupBy method)."""
    if func == "rank":
        out: pd.Series = gb.rank(method=args[0], ascending=args[1])
    elif func in ("shift", "diff", "pct_change"):
        out = getattr(gb, func)(args[0])
    else:
        out = getattr(gb, func)()
    return out


class _ReshapeVisitors:
    """``visit_SortIndex``, ``visit_GroupWindow`` and ``visit_CorrMatrix``."""

    n_src: dict[str, int]

    if TYPE_CHECKING:

        def _get(self, ref: Any) -> _Value: ...
        def _frame(self, ref: Any) -> _FrameV: ...
        def _rows(self, v: _Value) -> _FrameV | _SeriesV: ...
        def _like(self, v: _FrameV | _SeriesV, data: pd.DataFrame | pd.Series) -> _FrameV | _SeriesV: ...
        @staticmethod
        def _data(v: _FrameV | _SeriesV) -> pd.DataFrame | pd.Series: ...

    def visit_SortIndex(self, nid: str, node: SortIndex) -> _Value:
        v = self._rows(self._get(node.input))
        return self._like(v, self._data(v).sort_index(ascending=node.ascending, kind="stable"))

    def visit_GroupWindow(self, nid: str, node: GroupWindow) -> _Value:
        v = self._frame(node.input)
        gb = v.df.groupby(list(node.by), sort=False, dropna=node.dropna)[node.column]
        return _SeriesV(_group_window(gb, node.func, tuple(node.args_)), v.origin)

    def visit_CorrMatrix(self, nid: str, node: CorrMatrix) -> _Value:
        """Row i of the matrix is a "group" of every row; entry (i, c) counts the rows where both i and c are present.

        So the group rules suppress (or refuse) exactly the entries computed from too few rows.
        """
        v = self._frame(node.input)
        df = v.df
        value = df.cov() if node.method == "cov" else df.corr(method=cast("Any", node.method))
        if not (v.origin.rows or v.origin.members):
            return _FrameV(value, _Origin("summary", 1))
        k = len(value.columns)
        origin = _Origin("groups", k, keys=value.index)
        pos = _positions(df.index)
        zeros = np.zeros(len(pos), dtype=np.int64)
        every = _membership(v.origin, pos, zeros, None, self.n_src)
        origin.members = {
            ds: (np.concatenate([g + i for i in range(k)]), np.tile(s, k)) for ds, (g, s) in every.items()
        }
        origin.sizes = _counts(origin.members, k)
        origin.dup = dict(v.origin.dup)
        present = [df[c].notna().to_numpy() for c in df.columns]
        cells: dict[str, Cells] = {}
        for j, c in enumerate(df.columns):
            pairs = [
                _counts(_membership(v.origin, pos, zeros, present[i] & present[j], self.n_src), 1) for i in range(k)
            ]
            cells[str(c)] = {ds: np.concatenate([p[ds] for p in pairs]) for ds in every}
        return _FrameV(value.set_axis(pd.RangeIndex(k), axis=0), origin, cells)

    def visit_ModeFrame(self, nid: str, node: ModeFrame) -> _Value:
        """Each cell is some record's value, a different one per column: the rows count as no source row."""
        v = self._frame(node.input)
        out = v.df.mode(dropna=node.dropna)
        return _FrameV(out, _rows_origin(len(out), ((v.origin, np.full(len(out), -1, dtype=np.int64)),)))
