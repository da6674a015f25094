"""The client side of the DataFrame proxy: ``SecureDataFrame`` and the public names of the proxy.

The nodes are the typed op classes of :mod:`mesatee_notebook.wire.ops`, the same the enclave
evaluates; each knows its :class:`~mesatee_notebook.wire.plan.Schema` when it is built, so a wrong
column or a type error surfaces at once. Users hold thin wrappers (``SecureDataFrame`` here,
``SecureSeries`` in :mod:`.frame_series`, ``SecureGroupBy`` in :mod:`.frame_groupby`, ``SecureScalar``
in :mod:`.frame_base`); every method returns a new wrapper around a new node. Nothing runs until
``collect()``, which sends the plan as JSON to a :class:`FrameBackend`. ``len()``, ``float()`` and
``int()`` are explicit evaluations (one policy-checked query each); ``bool()`` and iteration raise,
so nothing is evaluated by accident.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from mesatee_notebook.errors import FrameNotSupported, FrameUsageError
from mesatee_notebook.remote._public import public_methods
from mesatee_notebook.remote.frame_accessors import _Indexer
from mesatee_notebook.remote.frame_base import (
    FrameBackend,
    Node,
    Operand,
    SecureArray,
    SecureScalar,
    _as_strs,
    _asc,
    _frame_reduction,
    _lit_or_node,
    _need_drop,
    _Rows,
    _sample,
    plan_json,
)
from mesatee_notebook.remote.frame_dp import (
    DPResult,
    PrivacyBudget,
    budget_meters_html,
)
from mesatee_notebook.remote.frame_expr import parse_expr
from mesatee_notebook.remote.frame_groupby import (
    SecureGroupBy,
    _GroupSpec,
)
from mesatee_notebook.remote.frame_more import _FrameMore
from mesatee_notebook.remote.frame_refusals import NOT_SUPPORTED
from mesatee_notebook.remote.frame_series import SecureSeries
from mesatee_notebook.wire.ops import (
    Assign,
    AsType,
    Column,
    Concat,
    Describe,
    DropDuplicates,
    Filter,
    FrameReduce,
    GroupByAgg,
    Melt,
    Merge,
    Rename,
    ResetIndex,
    Select,
    SortValues,
    Source,
    Top,
    ValueCounts,
)
from mesatee_notebook.wire.plan import (
    FRAME_REDUCE_FUNCS,
    SourceInfo,
    dtype_kind,
    source_columns,
)

__all__ = [
    "Column",
    "Select",
    "Source",
    "NOT_SUPPORTED",
    "DPResult",
    "SecureArray",
    "concat",
    "cut",
    "FrameBackend",
    "FrameUsageError",
    "Node",
    "SecureDataFrame",
    "SecureGroupBy",
    "SecureScalar",
    "SecureSeries",
    "PrivacyBudget",
    "budget_meters_html",
    "plan_json",
]


def concat(frames: Sequence[SecureDataFrame], *, ignore_index: bool = False) -> SecureDataFrame:
    """``pd.concat`` of remote frames with the same columns (rows stacked in the enclave).

    ``ignore_index=True`` is required: remote rows are labelled by storage position, so the
    labels pandas would keep are not meaningful (and would repeat).
    """
    items = list(frames)
    if not items or not all(isinstance(f, SecureDataFrame) for f in items):
        msg = "concat() takes a non-empty list of remote frames (upload local data first)"
        raise FrameUsageError(msg)
    if not ignore_index:
        msg = (
            "concat() of remote frames needs ignore_index=True: remote rows are labelled by storage position, "
            "so the labels pandas would keep are not meaningful"
        )
        raise FrameUsageError(msg)
    node = items[0]._node
    for f in items[1:]:
        node = Concat(node, f._node)
    return SecureDataFrame(node, items[0]._ctx)


def cut(x: SecureSeries, bins: Sequence[float], labels: Sequence[str] | bool | None = None) -> SecureSeries:
    """``pd.cut`` of a remote series into explicit bins (``labels``: one string per bin, or False for numbers)."""
    if not isinstance(x, SecureSeries):
        msg = "cut() takes a remote series"
        raise FrameUsageError(msg)
    if isinstance(bins, int) or labels is None or labels is True:
        msg = (
            "cut() of a remote series needs explicit bin edges and labels= (strings, or False for bin numbers); "
            "bins=int would derive edges from the data's min and max, and interval labels cannot be sent"
        )
        raise FrameUsageError(msg)
    edges = list(bins)
    names = [] if labels is False else list(labels)
    return x._map("cut", len(edges), *edges, *names)


@public_methods
class SecureDataFrame(_FrameMore, _Rows):
    """A lazy, pandas-like DataFrame whose data stays in the enclave (more methods: ``frame_more._FrameMore``)."""

    __slots__ = ()
    _what = "DataFrame"

    @classmethod
    def from_source(
        cls,
        name: str,
        columns: Mapping[str, str] | Sequence[tuple[str, str]],
        ctx: FrameBackend | None,
        hidden: Sequence[str] = (),
    ) -> SecureDataFrame:
        """Build a frame over a stored dataset from its public schema (column: dtype) and hidden columns."""
        items = columns.items() if isinstance(columns, Mapping) else columns
        info = SourceInfo(name, source_columns(items), frozenset(hidden))
        return cls(Source(name, info), ctx)

    @classmethod
    def from_dataset_info(cls, info: Mapping[str, Any], ctx: FrameBackend | None) -> SecureDataFrame:
        """Build a frame from the enclave's ``dataset_info`` record (``name``, ``columns``, ``hidden``)."""
        return cls.from_source(
            str(info["name"]), [(str(c), str(d)) for c, d in info["columns"]], ctx, tuple(info.get("hidden", ()))
        )

    @property
    def columns(self) -> pd.Index:
        """Column names (public schema; no round trip)."""
        return pd.Index([c for c, _ in self.schema.columns], dtype=object)

    @property
    def dtypes(self) -> pd.Series:
        """Predicted dtype name of each column."""
        return pd.Series({c: d for c, d in self.schema.columns}, dtype=object)

    def _visible(self) -> list[str]:
        return [c for c, _ in self.schema.columns if c is not None and c not in self.schema.hidden]

    def __contains__(self, key: object) -> bool:
        return key in self.schema.names

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | {c for c in self._visible() if c.isidentifier()})

    def __getattr__(self, name: str) -> SecureSeries:
        if not name.startswith("_") and name in self.schema.names:
            return SecureSeries(Column(self._node, name), self._ctx)
        if name in NOT_SUPPORTED:
            raise FrameNotSupported(NOT_SUPPORTED[name])
        msg = f"{type(self).__name__!r} has no attribute or column {name!r}"
        raise AttributeError(msg)

    def __getitem__(self, key: str | Sequence[str] | SecureSeries) -> Any:
        if isinstance(key, str):
            return SecureSeries(Column(self._node, key), self._ctx)
        if isinstance(key, SecureSeries):
            return SecureDataFrame(Filter(self._node, key._node), self._ctx)
        if isinstance(key, (list, tuple, pd.Index)):
            return SecureDataFrame(Select(self._node, _as_strs(list(key), "columns")), self._ctx)
        msg = "index a remote frame with a column name, a list of names or a boolean remote series"
        raise FrameUsageError(msg)

    def assign(self, **columns: Any) -> SecureDataFrame:
        """Add or replace columns: remote series, scalars, or callables of this frame."""
        pairs: list[tuple[str, Operand]] = []
        for name, value in columns.items():
            v = value(self) if callable(value) else value
            pairs.append((name, _lit_or_node(v)))
        return SecureDataFrame(Assign(self._node, tuple(pairs)), self._ctx)

    def rename(self, columns: Mapping[str, str]) -> SecureDataFrame:
        """Columns renamed (old: new); unknown old names are ignored, as in pandas."""
        return SecureDataFrame(Rename(self._node, dict(columns)), self._ctx)

    def astype(self, dtype: str | Mapping[str, str]) -> SecureDataFrame:
        """Cast every column (one dtype) or some (column: dtype)."""
        return SecureDataFrame(AsType(self._node, dtype if isinstance(dtype, str) else dict(dtype)), self._ctx)

    def sort_values(self, by: str | Sequence[str], ascending: bool | Sequence[bool] = True) -> SecureDataFrame:
        """Rows sorted by columns (row-level)."""
        keys = _as_strs(by, "by")
        return SecureDataFrame(SortValues(self._node, keys, _asc(ascending, len(keys))), self._ctx)

    def drop_duplicates(self, subset: str | Sequence[str] | None = None, keep: str | bool = "first") -> SecureDataFrame:
        """Rows without duplicates in ``subset`` (default: the visible columns)."""
        cols = _as_strs(subset, "subset") or tuple(self._visible())
        return SecureDataFrame(DropDuplicates(self._node, cols, "none" if keep is False else str(keep)), self._ctx)

    def merge(
        self,
        right: SecureDataFrame,
        how: str = "inner",
        *,
        on: str | Sequence[str] | None = None,
        left_on: str | Sequence[str] | None = None,
        right_on: str | Sequence[str] | None = None,
        suffixes: tuple[str, str] = ("_x", "_y"),
    ) -> SecureDataFrame:
        """Join in the enclave; joined rows are released only under both owners' policies."""
        if not isinstance(right, SecureDataFrame):
            msg = "merge() needs another remote frame; upload local data first"
            raise FrameUsageError(msg)
        if on is not None:
            lo = ro = _as_strs(on, "on")
        elif left_on is not None or right_on is not None:
            lo, ro = _as_strs(left_on, "left_on"), _as_strs(right_on, "right_on")
        else:
            rnames = set(right.schema.names)
            lo = ro = tuple(c for c in self.schema.names if c is not None and c in rnames)
        return SecureDataFrame(Merge(self._node, right._node, how, lo, ro, (suffixes[0], suffixes[1])), self._ctx)

    def groupby(
        self,
        by: str | Sequence[str],
        as_index: bool = True,
        dropna: bool = True,
        sort: bool = True,
        observed: bool = True,
    ) -> SecureGroupBy:
        """Group rows by key columns; aggregate with ``.agg(...)`` or a shorthand such as ``.mean()``.

        ``observed=True`` (pandas' default): only the category combinations present in the data.
        """
        if observed is not True:
            msg = (
                "groupby(observed=False) is not available yet: unobserved categories would be empty groups, "
                "which the release rules would suppress anyway; use observed=True"
            )
            raise FrameUsageError(msg)
        return SecureGroupBy(_GroupSpec(self, _as_strs(by, "by"), as_index, dropna, sort, None), self._ctx)

    def value_counts(
        self,
        subset: str | Sequence[str] | None = None,
        normalize: bool = False,
        sort: bool = True,
        ascending: bool = False,
        dropna: bool = True,
    ) -> SecureSeries:
        """Count distinct rows of ``subset`` (default: the visible columns)."""
        cols = _as_strs(subset, "subset") or tuple(self._visible())
        return SecureSeries(ValueCounts(self._node, cols, normalize, sort, ascending, dropna), self._ctx)

    def describe(self) -> SecureDataFrame:
        """count, mean, std, min, quartiles and max of the visible numeric columns."""
        cols = tuple(
            c for c, d in self.schema.columns if c is not None and c not in self.schema.hidden
            and dtype_kind(d) in ("int", "float")
        )  # fmt: skip
        return SecureDataFrame(Describe(self._node, cols), self._ctx)

    # -- issue 16: pandas as users know it --------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)``; the row count is policy-checked."""
        return (len(self), len(self.schema.columns))

    @property
    def size(self) -> int:
        """Rows times columns (policy-checked count)."""
        return len(self) * len(self.schema.columns)

    @property
    def empty(self) -> bool:
        """Whether there are no rows or no columns (policy-checked count)."""
        return not self.schema.columns or len(self) == 0

    @property
    def loc(self) -> _Indexer:
        """``frame.loc[mask]``, ``frame.loc[mask, cols]``, ``frame.loc[:, cols]``, ``frame.loc[a:b]``."""
        return _Indexer(self, "loc")

    @property
    def iloc(self) -> _Indexer:
        """``frame.iloc[a:b]``, ``frame.iloc[:, [0, 2]]`` (row slices are row-level)."""
        return _Indexer(self, "iloc")

    def drop(
        self, labels: Any = None, *, axis: int | str = 0, columns: Any = None, index: Any = None
    ) -> SecureDataFrame:
        """Columns removed (``drop(columns=[...])`` or ``drop([...], axis=1)``); dropping rows by label is refused."""
        if index is not None or (labels is not None and axis in (0, "index")):
            msg = "drop() of rows by label would single out records; filter with a boolean series instead"
            raise FrameUsageError(msg)
        names = _as_strs(columns if columns is not None else labels, "columns")
        missing = [c for c in names if c not in self.schema.names]
        if missing:
            msg = f"drop(): no column(s) {missing}"
            raise FrameUsageError(msg)
        out: SecureDataFrame = self[[c for c in self.schema.names if c is not None and c not in names]]
        return out

    def dropna(self, subset: str | Sequence[str] | None = None, how: str = "any") -> SecureDataFrame:
        """Rows with missing values in ``subset`` (default: every column) removed."""
        cols = _as_strs(subset, "subset") or tuple(c for c in self.schema.names if c is not None)
        hidden = [c for c in cols if c in self.schema.hidden]
        if hidden:
            msg = f"dropna() would look at hidden column(s) {hidden}; give subset= with visible columns"
            raise FrameUsageError(msg)
        if how not in ("any", "all"):
            msg = "dropna() how must be 'any' or 'all'"
            raise FrameUsageError(msg)
        present = [self[c].notna() for c in cols]
        keep = present[0]
        for p in present[1:]:
            keep = keep & p if how == "any" else keep | p
        out: SecureDataFrame = self[keep]
        return out

    def query(self, expr: str) -> SecureDataFrame:
        """Rows where a pandas expression string holds (a safe subset: columns, literals, operators)."""
        out: SecureDataFrame = self[parse_expr(self, expr, "query")]
        return out

    def eval(self, expr: str) -> Any:
        """A column expression string; ``'name = expr'`` returns the frame with that column assigned."""
        target, sep, rest = expr.partition("=")
        if sep and rest[:1] != "=" and target[-1:] not in "<>!=" and target.strip().isidentifier():
            return self.assign(**{target.strip(): parse_expr(self, rest, "eval")})
        return parse_expr(self, expr, "eval")

    def reset_index(self, drop: bool = False) -> SecureDataFrame:
        """A grouped result with its keys as columns, or rows renumbered 0..n-1 (``drop=True``)."""
        node = self._node
        if isinstance(node, GroupByAgg) and node.as_index and not drop:
            return SecureDataFrame(GroupByAgg(node.input, node.by, node.aggs, False, node.dropna, node.sort), self._ctx)
        _need_drop(drop)
        return SecureDataFrame(ResetIndex(self._node), self._ctx)

    def select_dtypes(self, include: Any = None, exclude: Any = None) -> SecureDataFrame:
        """Columns whose dtype kind is included ('number', 'bool', 'datetime', 'object'/'string', 'category')."""

        def kinds(spec: Any) -> set[str]:
            out: set[str] = set()
            for item in [spec] if isinstance(spec, str) or not isinstance(spec, Sequence) else spec:
                name = item if isinstance(item, str) else getattr(item, "__name__", str(item))
                if name in ("number", "numeric"):
                    out |= {"int", "float"}
                elif name in ("object", "string", "str", "O"):
                    out.add("str")
                elif name.startswith("datetime"):
                    out.add("datetime")
                else:
                    out.add(dtype_kind(name))
            return out

        inc = kinds(include) if include is not None else None
        exc = kinds(exclude) if exclude is not None else set()
        cols = [
            c for c, d in self.schema.columns
            if c is not None and (inc is None or dtype_kind(d) in inc) and dtype_kind(d) not in exc
        ]  # fmt: skip
        out: SecureDataFrame = self[cols]
        return out

    def sample(
        self, n: int | None = None, frac: float | None = None, random_state: int | None = None
    ) -> SecureDataFrame:
        """A random sample of rows without replacement (row-level)."""
        return SecureDataFrame(_sample(self._node, n, frac, random_state), self._ctx)

    def nlargest(self, n: int, columns: str | Sequence[str], keep: str = "first") -> SecureDataFrame:
        """The ``n`` rows with the largest values of ``columns`` (row-level)."""
        return SecureDataFrame(Top(self._node, int(n), _as_strs(columns, "columns"), True, keep), self._ctx)

    def nsmallest(self, n: int, columns: str | Sequence[str], keep: str = "first") -> SecureDataFrame:
        """The ``n`` rows with the smallest values of ``columns`` (row-level)."""
        return SecureDataFrame(Top(self._node, int(n), _as_strs(columns, "columns"), False, keep), self._ctx)

    def melt(
        self,
        id_vars: str | Sequence[str] | None = None,
        value_vars: str | Sequence[str] | None = None,
        var_name: str | None = None,
        value_name: str = "value",
    ) -> SecureDataFrame:
        """Wide to long, as ``pd.melt`` (row-level); ``value_vars`` default: the other visible columns."""
        ids = _as_strs(id_vars, "id_vars")
        values = _as_strs(value_vars, "value_vars") or tuple(c for c in self._visible() if c not in ids)
        node = Melt(self._node, ids, values, "variable" if var_name is None else str(var_name), str(value_name))
        return SecureDataFrame(node, self._ctx)

    def _frame_reduce(self, func: str, numeric_only: bool) -> SecureSeries:
        target: SecureDataFrame = self
        if numeric_only:
            target = self[
                [c for c, d in self.schema.columns if c is not None and dtype_kind(d) in ("int", "float", "bool")]
            ]
        elif self.schema.hidden:
            target = self[self._visible()]
        return SecureSeries(FrameReduce(target._node, func), self._ctx)

    sum = _frame_reduction("sum", "Column sums (one value per column).")
    mean = _frame_reduction("mean", "Column means.")
    min = _frame_reduction("min", "Column minimums (record values: need allow_rows in the threshold mode).")
    max = _frame_reduction("max", "Column maximums (record values).")
    count = _frame_reduction("count", "Non-missing values per column.", numeric_only=False)
    std = _frame_reduction("std", "Column standard deviations.")
    var = _frame_reduction("var", "Column variances.")
    median = _frame_reduction("median", "Column medians (record values).")
    prod = _frame_reduction("prod", "Column products.")
    sem = _frame_reduction("sem", "Standard errors of the column means.")
    skew = _frame_reduction("skew", "Column skewness.")
    nunique = _frame_reduction("nunique", "Distinct values per column.", numeric_only=False)
    any = _frame_reduction("any", "Whether any value of each column is true (record values).", numeric_only=False)
    all = _frame_reduction("all", "Whether every value of each column is true (record values).", numeric_only=False)

    # -- issue 16: frame-level elementwise functions, agg by name, copy --------------------------

    def _each_column(self, fn: Any) -> SecureDataFrame:
        cols = self._visible()
        out: SecureDataFrame = self[cols].assign(**{c: fn(self[c]) for c in cols})
        return out

    def isna(self) -> SecureDataFrame:
        """Whether each value is missing."""
        return self._each_column(lambda s: s.isna())

    isnull = isna

    def notna(self) -> SecureDataFrame:
        """Whether each value is present."""
        return self._each_column(lambda s: s.notna())

    notnull = notna

    def abs(self) -> SecureDataFrame:
        """Absolute values (numeric columns only, as pandas)."""
        return self._each_column(abs)

    def round(self, decimals: int = 0) -> SecureDataFrame:
        """Values rounded to ``decimals`` places (numeric columns)."""
        return self._each_column(lambda s: s.round(decimals))

    def clip(self, lower: Any = None, upper: Any = None) -> SecureDataFrame:
        """Values limited to ``lower`` .. ``upper`` (numeric columns)."""
        return self._each_column(lambda s: s.clip(lower, upper))

    def agg(self, func: str) -> SecureSeries:
        """A reduction of every column by name (``agg("sum")`` is ``sum()``); lists and functions are refused."""
        if callable(func) or not isinstance(func, str) or func not in FRAME_REDUCE_FUNCS:
            msg = f"agg() of a frame takes one reduction name: {', '.join(sorted(FRAME_REDUCE_FUNCS))}"
            raise FrameUsageError(msg)
        return self._frame_reduce(func, False)

    aggregate = agg

    def copy(self, deep: bool = True) -> SecureDataFrame:
        """The frame itself: remote values are immutable, so a copy is the same value."""
        return self
