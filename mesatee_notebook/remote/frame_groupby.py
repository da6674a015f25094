"""``SecureGroupBy``: a pending groupby of a remote frame; aggregating it gives a lazy frame or series."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from mesatee_notebook.errors import FrameNotSupported, FrameUsageError
from mesatee_notebook.remote._public import public_methods
from mesatee_notebook.remote.frame_base import (
    FrameBackend,
    _as_strs,
    _group_agg,
    _literals,
    _quantile_func,
)
from mesatee_notebook.remote.frame_refusals import _CALLABLE_HINT
from mesatee_notebook.remote.frame_series import SecureSeries
from mesatee_notebook.wire.ops import GROUP_MAP_FUNCS, GroupByAgg, GroupMap, GroupWindow
from mesatee_notebook.wire.plan import AGG_FUNCS, dtype_kind

if TYPE_CHECKING:
    from mesatee_notebook.remote.frame import (
        SecureDataFrame,
    )


@dataclass(frozen=True, slots=True)
class _GroupSpec:
    frame: SecureDataFrame
    by: tuple[str, ...]
    as_index: bool
    dropna: bool
    sort: bool
    selection: str | tuple[str, ...] | None


AggSpec: TypeAlias = "str | Sequence[str] | Mapping[str, str] | None"

#: GroupBy calls that are not evaluated in the enclave, and why (a clear error, not an AttributeError).
GROUPBY_NOT_SUPPORTED: dict[str, str] = {
    "apply": f"groupby().apply() takes a function; {_CALLABLE_HINT}",
    "filter": (
        f"groupby().filter() takes a function; {_CALLABLE_HINT}. To keep the groups of a given size, aggregate "
        "size() and merge or filter on the keys"
    ),
    "pipe": f"groupby().pipe() takes a function; {_CALLABLE_HINT}",
    "ohlc": "ohlc() is not available; use agg(open=(c, 'first'), high=(c, 'max'), low=(c, 'min'), close=(c, 'last'))",
    **dict.fromkeys(
        ("rolling", "expanding", "ewm", "resample"), "moving windows per group are not available in the enclave"
    ),
    **dict.fromkeys(("corr", "cov"), "per-group corr()/cov() are not available yet; use series.corr() per group"),
    **dict.fromkeys(("plot", "hist", "boxplot"), "plotting needs the data; collect() an aggregate and plot it locally"),
}
_DESCRIBE = (
    ("count", "count"), ("mean", "mean"), ("std", "std"), ("min", "min"),
    ("25%", "p25"), ("50%", "median"), ("75%", "p75"), ("max", "max"),
)  # fmt: skip
_SEP = "\x1f"  # joins a column and a statistic in describe()'s plan outputs (not in ordinary names)


@public_methods
class SecureGroupBy:
    """A pending groupby; aggregate it to get a lazy frame (or series)."""

    __slots__ = ("_ctx", "_node")
    _node: _GroupSpec
    _ctx: FrameBackend | None

    def __init__(self, node: _GroupSpec, ctx: FrameBackend | None) -> None:
        self._node = node
        self._ctx = ctx

    def __repr__(self) -> str:
        g = self._node
        sel = "" if g.selection is None else f"[{g.selection!r}]"
        return f"<SecureGroupBy: lazy groupby({list(g.by)}){sel} over {g.frame.explain()}>"

    def __bool__(self) -> bool:
        msg = "a remote groupby has no truth value; aggregate it and .collect()"
        raise FrameUsageError(msg)

    def __iter__(self) -> Iterator[Any]:
        msg = "iterating over remote groups would release rows; aggregate with .agg(...) instead"
        raise FrameUsageError(msg)

    def __getitem__(self, key: str | Sequence[str]) -> SecureGroupBy:
        g = self._node
        sel: str | tuple[str, ...] = key if isinstance(key, str) else _as_strs(key, "selection")
        return SecureGroupBy(_GroupSpec(g.frame, g.by, g.as_index, g.dropna, g.sort, sel), self._ctx)

    def __getattr__(self, name: str) -> SecureGroupBy:
        if not name.startswith("_") and name in self._node.frame.schema.names and name not in self._node.by:
            return self[name]
        if name in GROUPBY_NOT_SUPPORTED:
            raise FrameNotSupported(GROUPBY_NOT_SUPPORTED[name])
        msg = f"'SecureGroupBy' has no attribute or column {name!r}"
        raise AttributeError(msg)

    def _targets(self) -> list[str]:
        g = self._node
        if g.selection is None:
            return [c for c in g.frame._visible() if c not in g.by]
        return [g.selection] if isinstance(g.selection, str) else list(g.selection)

    def _aggs(self, func: AggSpec, named: Mapping[str, tuple[str, str]]) -> list[tuple[str, str, str]]:
        """The (output, column, func) triples of an ``agg`` call."""
        g = self._node
        if named:
            if func is not None:
                msg = "agg() takes either a func/dict or named aggregations, not both"
                raise FrameUsageError(msg)
            for out, spec in named.items():
                if not isinstance(spec, tuple) or len(spec) != 2:
                    msg = f"named aggregation {out}= must be a (column, func) pair"
                    raise FrameUsageError(msg)
            return [(out, str(spec[0]), str(spec[1])) for out, spec in named.items()]
        if isinstance(func, Mapping):
            if not all(isinstance(f, str) for f in func.values()):
                msg = "agg({column: [funcs]}) would make MultiIndex columns; use named aggregations instead"
                raise FrameUsageError(msg)
            return [(col, col, f) for col, f in func.items()]
        if isinstance(func, str):
            return [(c, c, func) for c in self._targets()]
        if func is None:
            return []
        funcs = _as_strs(func, "funcs")
        if not isinstance(g.selection, str):
            msg = "agg([funcs]) is supported on one selected column, e.g. gb['x'].agg(['mean', 'max'])"
            raise FrameUsageError(msg)
        return [(f, g.selection, f) for f in funcs]

    def agg(self, func: AggSpec = None, /, **named: tuple[str, str]) -> Any:
        """Aggregate: named ``out=(column, func)``, a dict ``{column: func}``, a func name or a list of them."""
        g = self._node
        aggs = self._aggs(func, named)
        series_out = not named and isinstance(func, str) and isinstance(g.selection, str)
        if not aggs:
            msg = "agg() needs at least one aggregation"
            raise FrameUsageError(msg)
        for _, _, f in aggs:
            if f not in AGG_FUNCS:
                msg = f"unknown aggregation {f!r}; supported: {', '.join(sorted(AGG_FUNCS))}"
                raise FrameUsageError(msg)
        node = GroupByAgg(g.frame._node, g.by, tuple(aggs), g.as_index, g.dropna, g.sort)
        frame = type(g.frame)(node, self._ctx)
        if series_out and g.as_index:
            return frame[aggs[0][0]]
        return frame

    def size(self) -> Any:
        """Rows per group: a series named ``size`` (a frame with ``as_index=False``)."""
        g = self._node
        frame = type(g.frame)(
            GroupByAgg(g.frame._node, g.by, (("size", g.by[0], "size"),), g.as_index, g.dropna, g.sort), self._ctx
        )
        return frame["size"] if g.as_index else frame

    count = _group_agg("count", "Non-missing values per group and column.")
    sum = _group_agg("sum", "Sum per group.")
    mean = _group_agg("mean", "Mean per group.")
    min = _group_agg("min", "Minimum per group.")
    max = _group_agg("max", "Maximum per group.")
    std = _group_agg("std", "Compute the standard deviation per group.")
    median = _group_agg("median", "Median per group.")
    var = _group_agg("var", "Variance per group.")

    def quantile(self, q: float = 0.5) -> Any:
        """Quantile ``q`` per group (whole percent, 0.01 .. 0.99)."""
        return self.agg(_quantile_func(q))

    nunique = _group_agg("nunique", "Distinct values per group.")
    first = _group_agg("first", "First non-missing value per group (a record's value: needs allow_rows).")
    last = _group_agg("last", "Last non-missing value per group (a record's value: needs allow_rows).")
    prod = _group_agg("prod", "Product per group.")
    sem = _group_agg("sem", "Standard error of the mean per group.")
    skew = _group_agg("skew", "Skewness per group.")
    any = _group_agg("any", "Whether any value is true, per group (record values: need allow_rows).")
    idxmax = _group_agg("idxmax", "Row label of each group's maximum (where a record is: needs allow_rows).")
    idxmin = _group_agg("idxmin", "Row label of each group's minimum (needs allow_rows).")
    all = _group_agg("all", "Whether every value is true, per group (record values: need allow_rows).")

    @property
    def ngroups(self) -> int:
        """Number of groups (a policy-checked count of the released groups)."""
        return len(self.size())

    aggregate = agg

    # -- issue 16: per-row group functions, group value counts, describe, unique -------------------

    def _group_map(self, column: str, func: str) -> SecureSeries:
        g = self._node
        return SecureSeries(GroupMap(g.frame._node, g.by, column, func, g.dropna), self._ctx)

    def _selected(self, out: SecureDataFrame) -> Any:
        sel = self._node.selection
        if sel is None:
            return out
        return out[sel] if isinstance(sel, str) else out[list(sel)]

    def cumcount(self, ascending: bool = True) -> SecureSeries:
        """Number of each row within its group, from 0 (row-revealing: needs allow_rows)."""
        return self._group_map("", "cumcount" if ascending else "cumcount_desc")

    def head(self, n: int = 5) -> Any:
        """The first ``n`` rows of each group, in their order (row-level: needs allow_rows)."""
        return self._first(n, "cumcount", "head")

    def tail(self, n: int = 5) -> Any:
        """The last ``n`` rows of each group, in their order (row-level)."""
        return self._first(n, "cumcount_desc", "tail")

    def _first(self, n: int, func: str, what: str) -> Any:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            msg = f"groupby().{what}(n) takes an integer n >= 0"
            raise FrameUsageError(msg)
        frame = self._node.frame
        return self._selected(frame[self._group_map("", func) < n])

    def transform(self, func: Any) -> Any:
        """Each row's group aggregate, by name (``transform("mean")``); row-revealing: needs allow_rows."""
        if callable(func) or not isinstance(func, str):
            msg = f"groupby().transform() with a function: {_CALLABLE_HINT}; pass an aggregation name instead"
            raise FrameNotSupported(msg)
        if func not in GROUP_MAP_FUNCS or func.startswith("cumcount"):
            msg = (
                f"transform({func!r}): use one of {', '.join(sorted(GROUP_MAP_FUNCS - {'cumcount', 'cumcount_desc'}))}"
            )
            raise FrameUsageError(msg)
        g = self._node
        if isinstance(g.selection, str):
            return self._group_map(g.selection, func)
        targets = self._targets()
        return g.frame[targets].assign(**{c: self._group_map(c, func) for c in targets})

    def value_counts(
        self, normalize: bool = False, sort: bool = True, ascending: bool = False, dropna: bool = True
    ) -> SecureSeries:
        """Count each value (or combination of the other columns' values) within each group, like ``size()``."""
        g = self._node
        cols = self._targets()
        if not cols:
            msg = "groupby().value_counts() needs a column besides the keys"
            raise FrameUsageError(msg)
        if dropna != g.dropna:
            msg = "groupby().value_counts(dropna=...) must match groupby(dropna=...) here"
            raise FrameUsageError(msg)
        node = GroupByAgg(g.frame._node, (*g.by, *cols), (("count", cols[0], "size"),), True, g.dropna, True)
        levels = list(range(len(g.by)))

        def post(value: Any) -> Any:  # pandas' order and shape, computed locally from the released counts
            out = value.rename("count")
            if normalize:
                sizes = out.groupby(level=levels, sort=False, dropna=g.dropna).transform("sum")
                out = (out / sizes).rename("proportion")
            if sort:  # by count within each group; equal counts stay in value order (see docs/dataframe.md)
                out = out.sort_values(ascending=ascending, kind="stable")
                if g.sort:
                    names = out.index.names
                    out.index.names = range(len(names))
                    out = out.sort_index(level=levels, sort_remaining=False, kind="stable")
                    out.index.names = names
            return out

        return SecureSeries(type(g.frame)(node, self._ctx)["count"]._node, self._ctx, post)

    def describe(self) -> Any:
        """Count, mean, std, min, quartiles and max of each numeric column per group (record values)."""
        g = self._node
        targets = [c for c in self._targets() if dtype_kind(g.frame.schema.dtype(c)) in ("int", "float")]
        if not targets:
            msg = "groupby().describe() needs a numeric column"
            raise FrameUsageError(msg)
        aggs = tuple((f"{c}{_SEP}{stat}", c, f) for c in targets for stat, f in _DESCRIBE)
        node = GroupByAgg(g.frame._node, g.by, aggs, True, g.dropna, g.sort)
        flat = isinstance(g.selection, str)

        def post(value: Any) -> Any:
            import pandas as pd

            value = value.astype("float64")
            pairs = [tuple(str(c).split(_SEP, 1)) for c in value.columns]
            value.columns = pd.Index([p[1] for p in pairs]) if flat else pd.MultiIndex.from_tuples(pairs)
            return value

        return type(g.frame)(node, self._ctx, post)

    def unique(self) -> Any:
        """The distinct values of the selected column per group, in order of appearance (row-level)."""
        g = self._node
        if not isinstance(g.selection, str):
            msg = "groupby().unique() is supported on one selected column, e.g. gb['x'].unique()"
            raise FrameUsageError(msg)
        col, keys = g.selection, list(g.by)
        rows = g.frame[[*keys, col]].drop_duplicates(subset=[*keys, col])

        def post(value: Any) -> Any:
            return value.groupby(keys, sort=g.sort, dropna=g.dropna)[col].unique()

        return type(g.frame)(rows._node, self._ctx, post)

    # -- issue 16, second round: windows within groups, get_group, nth ---------------------------

    def _window(self, func: str, *args: Any) -> Any:
        g = self._node
        vals = _literals(args, func)

        def one(col: str) -> SecureSeries:
            return SecureSeries(GroupWindow(g.frame._node, g.by, col, func, vals, g.dropna), self._ctx)

        if isinstance(g.selection, str):
            return one(g.selection)
        targets = self._targets()
        return g.frame[targets].assign(**{c: one(c) for c in targets})

    def cumsum(self) -> Any:
        """Cumulative sum within each group (row-revealing: needs allow_rows)."""
        return self._window("cumsum")

    def cumprod(self) -> Any:
        """Cumulative product within each group (row-revealing)."""
        return self._window("cumprod")

    def cummax(self) -> Any:
        """Cumulative maximum within each group (row-revealing)."""
        return self._window("cummax")

    def cummin(self) -> Any:
        """Cumulative minimum within each group (row-revealing)."""
        return self._window("cummin")

    def ffill(self) -> Any:
        """Missing values filled from the previous row of the group (row-revealing)."""
        return self._window("ffill")

    def bfill(self) -> Any:
        """Missing values filled from the next row of the group (row-revealing)."""
        return self._window("bfill")

    def shift(self, periods: int = 1) -> Any:
        """Values moved by ``periods`` rows within each group (row-revealing)."""
        return self._window("shift", _int(periods, "shift", "periods"))

    def diff(self, periods: int = 1) -> Any:
        """Difference with the row ``periods`` before in the group (row-revealing)."""
        return self._window("diff", _int(periods, "diff", "periods"))

    def pct_change(self, periods: int = 1) -> Any:
        """Relative change within each group (row-revealing)."""
        return self._window("pct_change", _int(periods, "pct_change", "periods"))

    def rank(self, method: str = "average", ascending: bool = True) -> Any:
        """Rank within each group (row-revealing)."""
        return self._window("rank", str(method), bool(ascending))

    def get_group(self, name: Any) -> Any:
        """The rows of one group (row-level: needs allow_rows); ``name`` is a tuple for several keys."""
        g = self._node
        keys = name if isinstance(name, tuple) else (name,)
        if len(keys) != len(g.by):
            msg = f"get_group() needs one value per key {list(g.by)} (a tuple for several keys)"
            raise FrameUsageError(msg)
        frame = g.frame
        mask: Any = None
        for col, value in zip(g.by, _literals(keys, "get_group"), strict=True):
            hit = frame[col].isna() if value is None else frame[col] == value
            mask = hit if mask is None else mask & hit
        return self._selected(frame[mask])

    def nth(self, n: int | Sequence[int]) -> Any:
        """The ``n``-th row(s) of each group (negative: from the end), in the rows' order (row-level)."""
        picks = [n] if not isinstance(n, (list, tuple)) else list(n)
        if not picks:
            msg = "nth() needs at least one position"
            raise FrameUsageError(msg)
        mask: Any = None
        for i in picks:
            k = _int(i, "nth", "n")
            hit = self._group_map("", "cumcount") == k if k >= 0 else self._group_map("", "cumcount_desc") == -k - 1
            mask = hit if mask is None else mask | hit
        return self._selected(self._node.frame[mask])


def _int(value: Any, what: str, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"groupby().{what}() {arg} must be an integer (slices are not supported)"
        raise FrameUsageError(msg)
    return value
