"""Evaluate a typed plan with pandas, node by node, tracking provenance.

:class:`_Run` has one ``visit_<OpClass>`` method per node class of :mod:`mesatee_notebook.wire.ops`;
a node without one is refused with ``FrameNotSupported`` (``tests/frames/test_catalog.py`` checks
that every op has its visitor).

Why this module is over ~500 lines: it is the one place every op's evaluation lives (one short
visitor per op of the catalog, with its provenance bookkeeping); splitting the class would scatter
what "how does the enclave run op X" answers in one file.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import pandas as pd

from mesatee_notebook.enclave.frame_funcs import _map_series, _window_series
from mesatee_notebook.enclave.frame_reshape import _ReshapeVisitors
from mesatee_notebook.enclave.frame_values import (
    _BINARY,
    Cells,
    IntArray,
    _codes,
    _counts,
    _FrameV,
    _group_codes,
    _membership,
    _merge_rows,
    _min_cells,
    _Origin,
    _positions,
    _range_positions,
    _row_isolated,
    _rows_origin,
    _ScalarV,
    _SeriesV,
    _side_positions,
    _Value,
)
from mesatee_notebook.errors import (
    FrameNotSupported,
)
from mesatee_notebook.wire.ops import (
    Assign,
    AsType,
    Binary,
    Column,
    Concat,
    Corr,
    CountRows,
    Describe,
    Distinct,
    DropDuplicates,
    FillNA,
    Filter,
    FrameReduce,
    GroupByAgg,
    GroupMap,
    Head,
    IsIn,
    Map,
    Melt,
    Merge,
    Reduce,
    Rename,
    ResetIndex,
    Sample,
    Select,
    SetName,
    Slice,
    SortValues,
    Source,
    Tail,
    ToFrame,
    Top,
    Unary,
    ValueCounts,
    Where,
    Window,
)
from mesatee_notebook.wire.plan import (
    QUANTILE_FUNCS,
    Lit,
    Plan,
    Schema,
)


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":
        return item()
    return value


class _Run(_ReshapeVisitors):
    """One evaluation: visits the plan's nodes in order and keeps their values (more visitors: the mixin)."""

    def __init__(
        self,
        plan: Plan,
        schemas: Mapping[str, Schema],
        frames: Mapping[str, pd.DataFrame],
        protected: set[str],
        *,
        isolate_rows: bool = False,
    ) -> None:
        self.plan = plan
        self.isolate_rows = isolate_rows  # the DP mode: a row an elementwise op cannot compute must not fail the query
        self.schemas = schemas
        self.frames = frames
        self.protected = protected
        self.n_src = {n: len(df) for n, df in frames.items()}
        self.values: dict[str, _Value] = {}
        self.origins: dict[Hashable, _Origin] = {}

    def evaluate(self) -> _Value:
        for nid in self.plan.order():
            node = self.plan.nodes[nid]
            visit: Callable[[str, Any], _Value] | None = getattr(self, f"visit_{type(node).__name__}", None)
            if visit is None:
                msg = f"op {node.op!r} ({type(node).__name__}) is not evaluated by this enclave"
                raise FrameNotSupported(msg)
            self.values[nid] = visit(nid, node)
        return self.values[self.plan.root]

    def _elementwise(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; with ``isolate_rows``, a failure is confined to the rows that cause it (``_row_isolated``)."""
        try:
            return fn(*args)
        except Exception:
            if not self.isolate_rows:
                raise
        data = [a for a in args if isinstance(a, (pd.Series, pd.DataFrame))]
        index = data[0].index
        for other in data[1:]:
            if not other.index.equals(index):
                index = index.union(other.index)  # what pandas' alignment of the operands gives
        if not index.is_unique:
            return fn(*args)  # not row by row: the error stands
        aligned = tuple(a.reindex(index) if isinstance(a, (pd.Series, pd.DataFrame)) else a for a in args)
        return _row_isolated(fn, aligned, index)

    def _get(self, ref: Any) -> _Value:
        return self.values[ref]

    def _frame(self, ref: Any) -> _FrameV:
        v = self._get(ref)
        assert isinstance(v, _FrameV)
        return v

    def _series(self, ref: Any) -> _SeriesV:
        v = self._get(ref)
        assert isinstance(v, _SeriesV)
        return v

    def _rows(self, v: _Value) -> _FrameV | _SeriesV:
        assert not isinstance(v, _ScalarV)
        return v

    def _like(self, v: _FrameV | _SeriesV, data: pd.DataFrame | pd.Series) -> _FrameV | _SeriesV:
        if isinstance(v, _FrameV):
            assert isinstance(data, pd.DataFrame)
            return _FrameV(data, v.origin, v.cells)
        assert isinstance(data, pd.Series)
        return _SeriesV(data, v.origin, v.cells)

    @staticmethod
    def _data(v: _FrameV | _SeriesV) -> pd.DataFrame | pd.Series:
        return v.df if isinstance(v, _FrameV) else v.s

    # -- sources and row ops --------------------------------------------

    def visit_Source(self, nid: str, node: Source) -> _Value:
        name = node.name
        df = self.frames[name]
        idx = df.index
        if not (isinstance(idx, pd.RangeIndex) and idx.start == 0 and idx.step == 1):
            df = df.reset_index(drop=True)
        token = self.schemas[nid].origin
        origin = self.origins.get(token)
        if origin is None:
            origin = _Origin("rows", len(df))
            if name in self.protected:
                origin.rows[name] = [None]
                origin.dup[name] = False
            self.origins[token] = origin
        return _FrameV(df, origin)

    def visit_Select(self, nid: str, node: Select) -> _Value:
        v = self._rows(self._get(node.input))
        assert isinstance(v, _FrameV)
        cols = list(node.columns)
        return _FrameV(v.df[cols], v.origin, {c: v.cells[c] for c in cols if c in v.cells})

    def visit_Column(self, nid: str, node: Column) -> _Value:
        v = self._frame(node.input)
        name = node.name
        return _SeriesV(v.df[name], v.origin, v.cells.get(name))

    def visit_Filter(self, nid: str, node: Filter) -> _Value:
        v = self._rows(self._get(node.input))
        pred = self._series(node.predicate)
        data = self._data(v)
        mask = pred.s
        if not mask.index.equals(data.index):
            mask = mask.reindex(data.index)
        if mask.dtype != bool:
            mask = mask.fillna(False).astype(bool)
        return self._like(v, data[mask])

    def visit_Assign(self, nid: str, node: Assign) -> _Value:
        v = self._frame(node.input)
        cols: dict[str, Any] = {}
        cells = dict(v.cells)
        for name, operand in node.columns:
            if not isinstance(operand, Lit):
                sv = self._series(operand)
                # align explicitly: pandas would adopt the series' index when the frame is empty
                cols[name] = sv.s if sv.s.index.equals(v.df.index) else sv.s.reindex(v.df.index)
                if sv.cells is not None:
                    cells[name] = sv.cells
                else:
                    cells.pop(name, None)
            else:
                cols[name] = operand.value
                cells.pop(name, None)
        return _FrameV(v.df.assign(**cols), v.origin, cells)

    def visit_Rename(self, nid: str, node: Rename) -> _Value:
        v = self._frame(node.input)
        mapping: Mapping[str, str] = node.columns
        cells = {mapping.get(c, c): x for c, x in v.cells.items()}
        return _FrameV(v.df.rename(columns=dict(mapping)), v.origin, cells)

    def visit_FillNA(self, nid: str, node: FillNA) -> _Value:
        v = self._rows(self._get(node.input))
        return self._like(v, self._elementwise(lambda d: d.fillna(node.value), self._data(v)))

    def visit_AsType(self, nid: str, node: AsType) -> _Value:
        v = self._rows(self._get(node.input))
        spec: Any = node.dtype
        data: Any = self._data(v)
        dtype = spec if isinstance(spec, str) else dict(spec)
        return self._like(v, self._elementwise(lambda d: d.astype(dtype), data))

    def visit_SortValues(self, nid: str, node: SortValues) -> _Value:
        v = self._rows(self._get(node.input))
        asc = list(node.ascending)
        if isinstance(v, _FrameV):
            return self._like(v, v.df.sort_values(list(node.by), ascending=asc))
        return self._like(v, v.s.sort_values(ascending=asc[0]))

    def visit_Head(self, nid: str, node: Head) -> _Value:
        v = self._rows(self._get(node.input))
        return self._like(v, self._data(v).head(node.n))

    def visit_Tail(self, nid: str, node: Tail) -> _Value:
        v = self._rows(self._get(node.input))
        return self._like(v, self._data(v).tail(node.n))

    def visit_DropDuplicates(self, nid: str, node: DropDuplicates) -> _Value:
        v = self._rows(self._get(node.input))
        keep = cast('Literal["first", "last", False]', False if node.keep == "none" else node.keep)
        if isinstance(v, _FrameV):
            return self._like(v, v.df.drop_duplicates(subset=list(node.subset), keep=keep))
        return self._like(v, v.s.drop_duplicates(keep=keep))

    # -- merge ----------------------------------------------------------

    def visit_Merge(self, nid: str, node: Merge) -> _Value:
        a = node
        left, right = self._frame(a.left), self._frame(a.right)
        kwargs: dict[str, Any] = {
            "how": a.how,
            "left_on": list(a.left_on),
            "right_on": list(a.right_on),
            "suffixes": a.suffixes,
        }
        track = bool(left.origin.rows or right.origin.rows)
        if not track:
            out = left.df.merge(right.df, **kwargs)
            return _FrameV(out.reset_index(drop=True), _Origin("rows", len(out)))
        out, lrows, rrows = _merge_rows(left.df, right.df, kwargs)
        lpos = _side_positions(left.df.index, lrows)
        rpos = _side_positions(right.df.index, rrows)
        out = out.reset_index(drop=True)
        return _FrameV(out, _rows_origin(len(out), ((left.origin, lpos), (right.origin, rpos))))

    # -- aggregates -----------------------------------------------------

    def _group_cells(self, v: _FrameV, codes: IntArray, sizes: Cells, col: str, func: str) -> Cells:
        """Distinct protected rows behind each group's value of ``col`` (non-missing; both outcomes for booleans)."""
        series = v.df[col]
        boolean = func in ("sum", "mean") and series.dtype.kind == "b"
        present = _present(series)
        if present is None and not boolean:
            return sizes
        pos = _range_positions(v.df.index)
        notna = np.ones(len(series), dtype=bool) if present is None else present
        n_groups = len(next(iter(sizes.values())))
        if boolean:
            truth = series.to_numpy(dtype=bool, na_value=False)
            t = _counts(_membership(v.origin, pos, codes, notna & truth, self.n_src), n_groups)
            f = _counts(_membership(v.origin, pos, codes, notna & ~truth, self.n_src), n_groups)
            return {ds: np.minimum(t[ds], f[ds]) for ds in t}
        return _counts(_membership(v.origin, pos, codes, notna, self.n_src), n_groups)

    def visit_GroupByAgg(self, nid: str, node: GroupByAgg) -> _Value:
        a = node
        v = self._frame(a.input)
        by = list(a.by)
        gb = v.df.groupby(by, sort=a.sort, dropna=a.dropna)
        res = gb.agg(**{out: (col, _pandas_func(func)) for out, col, func in a.aggs})
        n_groups = len(res)
        origin = _Origin("groups", n_groups, keys=None if not a.as_index else res.index)
        cells: dict[str, Cells] = {}
        if v.origin.rows or v.origin.members:
            codes = _group_codes(gb)
            origin.members = _membership(v.origin, _range_positions(v.df.index), codes, None, self.n_src)
            origin.sizes = _group_sizes(origin.members, codes, res, a.aggs)
            origin.dup = dict(v.origin.dup)
            for out, col, func in a.aggs:
                if func != "size":
                    cells[out] = self._group_cells(v, codes, origin.sizes, col, func)
        res = res.reset_index() if not a.as_index else res.set_axis(pd.RangeIndex(n_groups), axis=0)
        return _FrameV(res, origin, cells)

    def visit_ValueCounts(self, nid: str, node: ValueCounts) -> _Value:
        a = node
        v = self._rows(self._get(a.input))
        flags: dict[str, Any] = {
            "normalize": a.normalize,
            "sort": a.sort,
            "ascending": a.ascending,
            "dropna": a.dropna,
        }
        if isinstance(v, _FrameV):
            subset = list(a.subset)
            key: Any = subset[0] if len(subset) == 1 else subset  # one column: a flat index, as value_counts("a")
            vc = v.df.value_counts(key, **flags)
            grouper: Any = v.df.groupby(key, sort=False, dropna=a.dropna)
        else:
            vc = v.s.value_counts(**flags)
            grouper = v.s.groupby(v.s, sort=False, dropna=a.dropna)
        origin = _Origin("groups", len(vc), keys=vc.index)
        if v.origin.rows or v.origin.members:
            first = _codes(grouper.ngroup())
            perm = np.asarray(vc.index.get_indexer(grouper.size().index), dtype=np.int64)
            codes = np.where(first >= 0, perm[np.clip(first, 0, None)] if len(perm) else -1, -1)
            origin.members = _membership(v.origin, _positions(self._data(v).index), codes, None, self.n_src)
            origin.sizes = _counts(origin.members, len(vc))
            origin.dup = dict(v.origin.dup)
        return _SeriesV(vc.set_axis(pd.RangeIndex(len(vc)), axis=0), origin)

    def visit_Describe(self, nid: str, node: Describe) -> _Value:
        v = self._rows(self._get(node.input))
        data = self._data(v)
        pos = _positions(data.index)
        origin = _Origin("summary", 1)
        zeros = np.zeros(len(pos), dtype=np.int64)
        if v.origin.rows or v.origin.members:
            origin.members = _membership(v.origin, pos, zeros, None, self.n_src)
            origin.dup = dict(v.origin.dup)

        def column_cells(s: pd.Series) -> Cells:
            return _counts(_membership(v.origin, pos, zeros, s.notna().to_numpy(), self.n_src), 1)

        if isinstance(v, _FrameV):
            cols = list(node.columns)
            res = v.df[cols].describe()
            cells = {c: column_cells(v.df[c]) for c in cols} if origin.members else {}
            return _FrameV(res, origin, cells)
        return _SeriesV(v.s.describe(), origin, column_cells(v.s) if origin.members else None)

    def _scalar(
        self, value: Any, v: _SeriesV | _FrameV, mask: npt.NDArray[np.bool_] | None, index: pd.Index | None = None
    ) -> _ScalarV:
        pos = _positions(self._data(v).index if index is None else index)
        zeros = np.zeros(len(pos), dtype=np.int64)
        members = _membership(v.origin, pos, zeros, None, self.n_src)
        counted = members if mask is None else _membership(v.origin, pos, zeros, mask, self.n_src)
        counts = {ds: len(np.unique(s)) if v.origin.dup.get(ds) else len(s) for ds, (_, s) in counted.items()}
        return _ScalarV(value, counts, members, dict(v.origin.dup))

    def visit_Reduce(self, nid: str, node: Reduce) -> _Value:
        v = self._series(node.input)
        func = node.func
        value = v.s.quantile(int(func[1:]) / 100) if func in QUANTILE_FUNCS else getattr(v.s, func)()
        if not (v.origin.rows or v.origin.members):
            return _ScalarV(value, {}, {}, {})
        notna = v.s.notna().to_numpy()
        if func in ("sum", "mean") and v.s.dtype.kind == "b":
            truth = v.s.to_numpy(dtype=bool, na_value=False)
            t = self._scalar(value, v, notna & truth)
            f = self._scalar(value, v, notna & ~truth)
            return _ScalarV(value, {ds: min(t.counts[ds], f.counts[ds]) for ds in t.counts}, t.members, t.dup)
        return self._scalar(value, v, notna)

    def visit_Corr(self, nid: str, node: Corr) -> _Value:
        left, right = self._series(node.left), self._series(node.right)
        method = node.method
        value = left.s.cov(right.s) if method == "cov" else left.s.corr(right.s, method=cast("Any", method))
        if not (left.origin.rows or left.origin.members):
            return _ScalarV(value, {}, {}, {})
        a, b = left.s.align(right.s, join="inner")
        return self._scalar(value, left, (a.notna() & b.notna()).to_numpy(), a.index)

    def visit_CountRows(self, nid: str, node: CountRows) -> _Value:
        v = self._rows(self._get(node.input))
        value = len(self._data(v))
        if not (v.origin.rows or v.origin.members):
            return _ScalarV(value, {}, {}, {})
        return self._scalar(value, v, None)

    # -- expressions ----------------------------------------------------

    def visit_Binary(self, nid: str, node: Binary) -> _Value:
        a = node
        fn = _BINARY[a.bop]
        operands: list[Any] = []
        cells: Cells | None = None
        origin: _Origin | None = None
        for operand in (a.left, a.right):
            if isinstance(operand, Lit):
                operands.append(operand.value)
            else:
                sv = self._series(operand)
                operands.append(sv.s)
                cells = _min_cells(cells, sv.cells)
                origin = sv.origin
        assert origin is not None
        return _SeriesV(self._elementwise(fn, operands[0], operands[1]), origin, cells)

    def visit_Unary(self, nid: str, node: Unary) -> _Value:
        v = self._series(node.input)
        op = node.uop
        out = self._elementwise(lambda s: -s if op == "neg" else ~s if op == "invert" else s.abs(), v.s)
        return _SeriesV(out, v.origin, v.cells)

    def visit_IsIn(self, nid: str, node: IsIn) -> _Value:
        v = self._series(node.input)
        return _SeriesV(self._elementwise(lambda s: s.isin(list(node.values)), v.s), v.origin, v.cells)

    # -- issue 16: pandas as users know it ------------------------------

    def visit_Map(self, nid: str, node: Map) -> _Value:
        v = self._series(node.input)
        out = self._elementwise(lambda s: _map_series(s, node.func, tuple(node.args_)), v.s)
        return _SeriesV(out, v.origin, v.cells)

    def visit_Window(self, nid: str, node: Window) -> _Value:
        v = self._series(node.input)
        return _SeriesV(_window_series(v.s, node.func, tuple(node.args_)), v.origin, v.cells)

    def visit_GroupMap(self, nid: str, node: GroupMap) -> _Value:
        v = self._frame(node.input)
        gb = v.df.groupby(list(node.by), sort=False, dropna=node.dropna)
        if node.func.startswith("cumcount"):
            out = gb.cumcount(ascending=node.func == "cumcount")
        else:
            out = gb[node.column].transform(_pandas_func(node.func))
        return _SeriesV(out, v.origin)

    def visit_Where(self, nid: str, node: Where) -> _Value:
        a = node
        v, cond = self._series(a.input), self._series(a.cond)
        cells = _min_cells(v.cells, cond.cells)
        other: Any
        if isinstance(a.other, Lit):
            other = np.nan if a.other.value is None else a.other.value
        else:
            ov = self._series(a.other)
            other, cells = ov.s, _min_cells(cells, ov.cells)
        mask = cond.s if cond.s.index.equals(v.s.index) else cond.s.reindex(v.s.index)
        out = self._elementwise(lambda s, m, o: s.where(m, o) if a.keep else s.mask(m, o), v.s, mask, other)
        return _SeriesV(out, v.origin, cells)

    def visit_Distinct(self, nid: str, node: Distinct) -> _Value:
        v = self._series(node.input)
        first = v.s.drop_duplicates()
        if node.func == "unique":
            return _SeriesV(first, v.origin)
        mode = v.s.mode()
        at = pd.Index(first.to_numpy()).get_indexer(mode.to_numpy())
        pos = _positions(first.index)[at]
        return _SeriesV(mode, _rows_origin(len(mode), ((v.origin, pos),)))

    def visit_SetName(self, nid: str, node: SetName) -> _Value:
        v = self._series(node.input)
        return _SeriesV(v.s.rename(node.name), v.origin, v.cells)

    def visit_ToFrame(self, nid: str, node: ToFrame) -> _Value:
        v = self._series(node.input)
        name = node.name
        return _FrameV(v.s.to_frame(name), v.origin, {name: v.cells} if v.cells is not None else {})

    def visit_Slice(self, nid: str, node: Slice) -> _Value:
        v = self._rows(self._get(node.input))
        start, stop, step = node.bounds
        data = self._data(v)
        out = data.iloc[start:stop:step] if node.kind == "iloc" else data.loc[start:stop:step]
        return self._like(v, out)

    def visit_Sample(self, nid: str, node: Sample) -> _Value:
        v = self._rows(self._get(node.input))
        a = node
        return self._like(v, self._data(v).sample(n=a.n, frac=a.frac, random_state=a.seed))

    def visit_ResetIndex(self, nid: str, node: ResetIndex) -> _Value:
        v = self._rows(self._get(node.input))
        data = self._data(v)
        origin = _rows_origin(len(data), ((v.origin, _positions(data.index)),))
        out = data.reset_index(drop=True)
        return _FrameV(out, origin) if isinstance(out, pd.DataFrame) else _SeriesV(out, origin)

    def visit_Concat(self, nid: str, node: Concat) -> _Value:
        left, right = self._frame(node.left), self._frame(node.right)
        nl, nr = len(left.df), len(right.df)
        lpos = np.concatenate([_positions(left.df.index), np.full(nr, -1, dtype=np.int64)])
        rpos = np.concatenate([np.full(nl, -1, dtype=np.int64), _positions(right.df.index)])
        out = pd.concat([left.df, right.df], ignore_index=True)
        return _FrameV(out, _rows_origin(len(out), ((left.origin, lpos), (right.origin, rpos))))

    def visit_Top(self, nid: str, node: Top) -> _Value:
        v = self._rows(self._get(node.input))
        a = node
        fn = "nlargest" if a.largest else "nsmallest"
        if isinstance(v, _FrameV):
            return self._like(v, getattr(v.df, fn)(a.n, list(a.columns), keep=a.keep))
        return self._like(v, getattr(v.s, fn)(a.n, keep=a.keep))

    def visit_Melt(self, nid: str, node: Melt) -> _Value:
        v = self._frame(node.input)
        a = node
        out = v.df.melt(
            id_vars=list(a.id_vars), value_vars=list(a.value_vars), var_name=a.var_name,
            value_name=a.value_name,
        )  # fmt: skip
        pos = np.tile(_positions(v.df.index), len(a.value_vars))  # row i of the result comes from this row
        return _FrameV(out, _rows_origin(len(out), ((v.origin, pos),)))

    def visit_FrameReduce(self, nid: str, node: FrameReduce) -> _Value:
        v = self._frame(node.input)
        func = node.func
        value = v.df.quantile(int(func[1:]) / 100) if func in QUANTILE_FUNCS else getattr(v.df, func)()
        pos = _positions(v.df.index)
        origin = _Origin("summary", 1)
        if not (v.origin.rows or v.origin.members):
            return _SeriesV(value, origin, entry_cells={})
        zeros = np.zeros(len(pos), dtype=np.int64)
        origin.members = _membership(v.origin, pos, zeros, None, self.n_src)
        origin.dup = dict(v.origin.dup)
        entries: dict[str, Cells] = {}
        for c in v.df.columns:
            col = v.df[c]
            notna = col.notna().to_numpy()
            if func in ("sum", "mean") and col.dtype.kind == "b":
                truth = col.to_numpy(dtype=bool, na_value=False)
                t = _counts(_membership(v.origin, pos, zeros, notna & truth, self.n_src), 1)
                f = _counts(_membership(v.origin, pos, zeros, notna & ~truth, self.n_src), 1)
                entries[str(c)] = {ds: np.minimum(t[ds], f[ds]) for ds in t}
            else:
                entries[str(c)] = _counts(_membership(v.origin, pos, zeros, notna, self.n_src), 1)
        return _SeriesV(value, origin, entry_cells=entries)


def _present(series: pd.Series) -> npt.NDArray[np.bool_] | None:
    """Which values are present (not missing); None when all are (no pass at all for numpy ints and bools)."""
    if isinstance(series.dtype, np.dtype) and series.dtype.kind in "iub":
        return None
    notna = series.notna().to_numpy()
    return None if bool(notna.all()) else notna


def _group_sizes(
    members: Mapping[str, tuple[IntArray, IntArray]], codes: IntArray, res: pd.DataFrame, aggs: Any
) -> Cells:
    """Distinct source rows per group and dataset: the group-by's own ``size`` where every row counts once.

    A dataset whose pairs are the group codes themselves (no row dropped, none repeated) has exactly the
    group sizes; pandas computed them for a ``size`` aggregation already. Others: one ``bincount``.
    """
    n_groups = len(res)
    size_col = next((out for out, _, func in aggs if func == "size"), None)
    sizes: Cells = {}
    for ds, (g, _) in members.items():
        if g is codes and size_col is not None:
            sizes[ds] = np.asarray(res[size_col].to_numpy(), dtype=np.int64)
        else:
            sizes[ds] = np.bincount(g, minlength=n_groups).astype(np.int64)
    return sizes


def _pandas_func(func: str) -> Any:
    if func in QUANTILE_FUNCS:
        q = int(func[1:]) / 100
        return lambda s: s.quantile(q)
    return func
