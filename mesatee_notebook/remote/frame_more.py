"""More of pandas on remote frames and series (issue 16, second round), as mixins of the two wrappers.

Frame-level windows, ``where``/``replace``, ``duplicated``, ``sort_index``, ``idxmax``, ``quantile``, ``corr``/
``cov`` matrices, ``pivot_table`` and ``info`` for :class:`SecureDataFrame`; ``rolling``/``expanding``,
``pct_change``, ``interpolate``, ``sort_index``, ``kurt`` and ``groupby`` for :class:`SecureSeries`. Each builds
op nodes of the shared catalog; nothing here evaluates, except ``info()`` (two policy-checked queries, like
``len()``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from mesatee_notebook.errors import FrameNotSupported, FrameUsageError
from mesatee_notebook.remote._public import public_methods
from mesatee_notebook.remote.frame_base import (
    _as_strs,
    _frame_reduction,
    _quantile_func,
    _reduction,
)
from mesatee_notebook.remote.frame_refusals import _CALLABLE_HINT
from mesatee_notebook.wire.ops import CorrMatrix, FrameReduce, GroupByAgg, GroupMap, ModeFrame, Op, SortIndex
from mesatee_notebook.wire.schema import MOVING_FUNCS, Schema, dtype_kind

if TYPE_CHECKING:
    from mesatee_notebook.remote.frame import SecureDataFrame
    from mesatee_notebook.remote.frame_groupby import SecureGroupBy
    from mesatee_notebook.remote.frame_series import SecureSeries

_NUMERIC = ("int", "float")


class _SeriesLike(Protocol):
    """What the series mixin uses of :class:`SecureSeries` (its self type)."""

    _node: Op
    _ctx: Any

    @property
    def schema(self) -> Schema: ...
    @property
    def name(self) -> str | None: ...
    def _window(self, func: str, *args: Any) -> SecureSeries: ...
    def _reduce(self, func: str) -> Any: ...
    def to_frame(self, name: str | None = None) -> SecureDataFrame: ...
    def explain(self) -> str: ...


class _FrameLike(Protocol):
    """What the frame mixin uses of :class:`SecureDataFrame` (its self type)."""

    _node: Op
    _ctx: Any

    @property
    def schema(self) -> Schema: ...
    def _visible(self) -> list[str]: ...
    def _each_column(self, fn: Any) -> SecureDataFrame: ...
    def _each_name(self, fn: Any) -> SecureDataFrame: ...
    def _frame_reduce(self, func: str, numeric_only: bool) -> SecureSeries: ...
    def __getitem__(self, key: Any) -> Any: ...
    def __len__(self) -> int: ...
    def count(self) -> Any: ...


def _moving_fn(func: str) -> Any:
    def method(self: _Moving) -> SecureSeries:
        return self._agg(func)

    method.__name__ = method.__qualname__ = func
    method.__doc__ = f"The {func} over each window (row-revealing: needs allow_rows)."
    return method


class _Moving:
    """``series.rolling(n)`` / ``series.expanding()``: aggregate each window by name."""

    __slots__ = ("_args", "_kind", "_s")

    def __init__(self, series: _SeriesLike, kind: str, args: tuple[Any, ...]) -> None:
        self._s = series
        self._kind = kind
        self._args = args

    def __repr__(self) -> str:
        return f"<{self._kind}{self._args} of {self._s.explain()}: aggregate it, e.g. .mean()>"

    def _agg(self, func: str) -> SecureSeries:
        return self._s._window(self._kind, func, *self._args)

    sum = _moving_fn("sum")
    mean = _moving_fn("mean")
    min = _moving_fn("min")
    max = _moving_fn("max")
    std = _moving_fn("std")
    var = _moving_fn("var")
    median = _moving_fn("median")
    count = _moving_fn("count")

    def agg(self, func: str) -> SecureSeries:
        """One aggregation by name (``agg("mean")`` is ``mean()``)."""
        if callable(func):
            msg = f"{self._kind}().agg() with a function: {_CALLABLE_HINT}"
            raise FrameNotSupported(msg)
        if func not in MOVING_FUNCS:
            msg = f"{self._kind}().agg() takes one of {', '.join(sorted(MOVING_FUNCS))}"
            raise FrameUsageError(msg)
        return self._agg(func)

    aggregate = agg

    def apply(self, func: Any, *args: Any, **kwargs: Any) -> SecureSeries:
        """Refused: it takes a function."""
        msg = f"{self._kind}().apply() takes a function; {_CALLABLE_HINT}"
        raise FrameNotSupported(msg)


def _periods(periods: Any, what: str) -> int:
    if isinstance(periods, bool) or not isinstance(periods, (int, np.integer)):
        msg = f"{what}() periods must be an integer"
        raise FrameUsageError(msg)
    return int(periods)


@public_methods
class _SeriesMore:
    """The second round of series calls (a mixin of :class:`SecureSeries`)."""

    __slots__ = ()

    def pct_change(self: _SeriesLike, periods: int = 1, fill_method: None = None) -> SecureSeries:
        """Relative change from the value ``periods`` rows before (row-revealing: needs allow_rows)."""
        if fill_method is not None:
            msg = "pct_change(fill_method=...) is deprecated in pandas and not supported; ffill() first"
            raise FrameUsageError(msg)
        return self._window("pct_change", _periods(periods, "pct_change"))

    def interpolate(self: _SeriesLike, method: str = "linear") -> SecureSeries:
        """Missing values filled linearly from their neighbours (row-revealing)."""
        if method != "linear":
            msg = "interpolate() supports method='linear' only"
            raise FrameUsageError(msg)
        return self._window("interpolate")

    def rolling(
        self: _SeriesLike,
        window: int,
        min_periods: int | None = None,
        center: bool = False,
        win_type: None = None,
        on: None = None,
        closed: None = None,
    ) -> _Moving:
        """Moving windows of ``window`` rows; aggregate them (``.mean()``, ``.sum()`` ...): row-revealing."""
        if center or win_type is not None or on is not None or closed is not None:
            msg = "rolling() supports window=, min_periods= only (no center, win_type, on or closed)"
            raise FrameUsageError(msg)
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
            msg = "rolling() window must be a number of rows (time-based windows are not supported)"
            raise FrameUsageError(msg)
        return _Moving(self, "rolling", (int(window), None if min_periods is None else int(min_periods)))

    def expanding(self: _SeriesLike, min_periods: int = 1) -> _Moving:
        """Growing windows from the first row; aggregate them (``.sum()`` ...): row-revealing."""
        return _Moving(self, "expanding", (int(min_periods),))

    def sort_index(self: _SeriesLike, ascending: bool = True) -> SecureSeries:
        """Values back in the order of their labels (for remote rows: storage order); row-level."""
        from mesatee_notebook.remote.frame_series import SecureSeries

        return SecureSeries(SortIndex(self._node, bool(ascending)), self._ctx)

    kurt = _reduction("kurt", "Excess kurtosis (Fisher's definition, as pandas).")

    kurtosis = kurt

    def groupby(
        self: _SeriesLike,
        by: SecureSeries | Sequence[SecureSeries],
        sort: bool = True,
        dropna: bool = True,
        observed: bool = True,
    ) -> SecureGroupBy:
        """Group this series by other series of the same frame (``s.groupby(frame.key).mean()``)."""
        from mesatee_notebook.remote.frame_series import SecureSeries

        keys: list[Any] = list(by) if isinstance(by, (list, tuple)) else [by]
        if not keys or not all(isinstance(k, SecureSeries) for k in keys):
            msg = (
                "groupby() of a remote series takes remote series of the same frame as keys; "
                "or group the frame: frame.groupby('key')['column']"
            )
            raise FrameUsageError(msg)
        names = [k.name for k in keys]
        if not isinstance(self.name, str) or not all(isinstance(n, str) for n in names):
            msg = "groupby() of a remote series needs named series; name them with rename('...')"
            raise FrameUsageError(msg)
        if len({self.name, *names}) != len(names) + 1:
            msg = "groupby(): the series and its keys need distinct names; rename('...') one of them"
            raise FrameUsageError(msg)
        frame = self.to_frame(self.name).assign(**{str(n): k for n, k in zip(names, keys, strict=True)})
        return frame.groupby([str(n) for n in names], sort=sort, dropna=dropna, observed=observed)[self.name]


def _frame(node: Op, ctx: Any, post: Any = None) -> SecureDataFrame:
    from mesatee_notebook.remote.frame import SecureDataFrame

    return SecureDataFrame(node, ctx, post)


def _matrix(frame: _FrameLike, method: str, numeric_only: bool) -> SecureDataFrame:
    kinds = ("int", "float", "bool")
    cols = [str(c) for c, _ in frame.schema.columns if c is not None and c not in frame.schema.hidden]
    if numeric_only:
        cols = [c for c in cols if dtype_kind(frame.schema.dtype(c)) in kinds]
    return _frame(CorrMatrix(frame[cols]._node, method), frame._ctx)


def _where_cond(frame: _FrameLike, cond: Any, col: str, axis: Any) -> Any:
    from mesatee_notebook.remote.frame import SecureDataFrame
    from mesatee_notebook.remote.frame_series import SecureSeries

    if isinstance(cond, SecureDataFrame):
        if col not in cond.schema.names:
            msg = f"where()/mask(): the condition frame has no column {col!r}"
            raise FrameUsageError(msg)
        return cond[col]
    if isinstance(cond, SecureSeries) and axis in (0, "index"):
        return cond
    msg = (
        "where()/mask() of a remote frame take a boolean remote frame with the same columns, or a boolean remote "
        "series with axis=0 (one condition per row)"
    )
    raise FrameUsageError(msg)


@public_methods
class _FrameMore:
    """The second round of frame calls (a mixin of :class:`SecureDataFrame`)."""

    __slots__ = ()

    def _each_name(self: _FrameLike, fn: Any) -> SecureDataFrame:
        cols = self._visible()
        out: SecureDataFrame = self[cols].assign(**{c: fn(c) for c in cols})
        return out

    def sort_index(self: _FrameLike, ascending: bool = True) -> SecureDataFrame:
        """Rows back in the order of their labels (for remote rows: storage order); row-level."""
        return _frame(SortIndex(self._node, bool(ascending)), self._ctx)

    def duplicated(
        self: _FrameLike, subset: str | Sequence[str] | None = None, keep: str | bool = "first"
    ) -> SecureSeries:
        """Whether each row repeats an earlier (``keep='first'``), a later (``'last'``) or any other row (False)."""
        from mesatee_notebook.remote.frame_series import SecureSeries

        cols = _as_strs(subset, "subset") or tuple(self._visible())
        if keep not in ("first", "last", False):
            msg = "duplicated() keep must be 'first', 'last' or False"
            raise FrameUsageError(msg)
        before = SecureSeries(GroupMap(self._node, cols, "", "cumcount", False), self._ctx) > 0
        after = SecureSeries(GroupMap(self._node, cols, "", "cumcount_desc", False), self._ctx) > 0
        out: SecureSeries = before if keep == "first" else after if keep == "last" else before | after
        return out

    def cumsum(self: _FrameLike) -> SecureDataFrame:
        """Cumulative sums of each column (row-revealing: needs allow_rows)."""
        return self._each_column(lambda s: s.cumsum())

    def cumprod(self: _FrameLike) -> SecureDataFrame:
        """Cumulative products of each column (row-revealing)."""
        return self._each_column(lambda s: s.cumprod())

    def cummax(self: _FrameLike) -> SecureDataFrame:
        """Cumulative maximums of each column (row-revealing)."""
        return self._each_column(lambda s: s.cummax())

    def cummin(self: _FrameLike) -> SecureDataFrame:
        """Cumulative minimums of each column (row-revealing)."""
        return self._each_column(lambda s: s.cummin())

    def shift(self: _FrameLike, periods: int = 1) -> SecureDataFrame:
        """Every column moved by ``periods`` rows (row-revealing)."""
        p = _periods(periods, "shift")
        return self._each_column(lambda s: s.shift(p))

    def diff(self: _FrameLike, periods: int = 1) -> SecureDataFrame:
        """Differences with the row ``periods`` before, per column (row-revealing)."""
        p = _periods(periods, "diff")
        return self._each_column(lambda s: s.diff(p))

    def pct_change(self: _FrameLike, periods: int = 1) -> SecureDataFrame:
        """Relative changes per column (row-revealing)."""
        p = _periods(periods, "pct_change")
        return self._each_column(lambda s: s.pct_change(p))

    def rank(self: _FrameLike, method: str = "average", ascending: bool = True) -> SecureDataFrame:
        """Ranks within each column (row-revealing)."""
        return self._each_column(lambda s: s.rank(method=method, ascending=ascending))

    def ffill(self: _FrameLike) -> SecureDataFrame:
        """Missing values filled from the previous row, per column (row-revealing)."""
        return self._each_column(lambda s: s.ffill())

    def bfill(self: _FrameLike) -> SecureDataFrame:
        """Missing values filled from the next row, per column (row-revealing)."""
        return self._each_column(lambda s: s.bfill())

    def interpolate(self: _FrameLike, method: str = "linear") -> SecureDataFrame:
        """Missing values filled linearly, per column (row-revealing)."""
        return self._each_column(lambda s: s.interpolate(method))

    def replace(self: _FrameLike, to_replace: Any = None, value: Any = None) -> SecureDataFrame:
        """Values replaced in every column, as ``Series.replace`` (old, new), lists, or a dict."""
        return self._each_column(lambda s: s.replace(to_replace, value))

    def where(self: _FrameLike, cond: Any, other: Any = np.nan, axis: Any = None) -> SecureDataFrame:
        """Keep values where ``cond`` (a boolean frame, or a boolean series with axis=0) holds; ``other`` elsewhere."""
        return self._each_name(lambda c: self[c].where(_where_cond(self, cond, c, axis), other))

    def mask(self: _FrameLike, cond: Any, other: Any = np.nan, axis: Any = None) -> SecureDataFrame:
        """Replace values by ``other`` where ``cond`` holds."""
        return self._each_name(lambda c: self[c].mask(_where_cond(self, cond, c, axis), other))

    def mode(self: _FrameLike, numeric_only: bool = False, dropna: bool = True) -> SecureDataFrame:
        """The most common value(s) of each visible column, padded with missing values (row-revealing)."""
        kinds = ("int", "float", "bool")
        cols = [c for c in self._visible() if not numeric_only or dtype_kind(self.schema.dtype(c)) in kinds]
        return _frame(ModeFrame(self[cols]._node, bool(dropna)), self._ctx)

    idxmax = _frame_reduction("idxmax", "Row label of each column's maximum (where a record is: needs allow_rows).")
    idxmin = _frame_reduction("idxmin", "Row label of each column's minimum (needs allow_rows).")
    kurt = _frame_reduction("kurt", "Excess kurtosis of each column.")

    kurtosis = kurt

    def quantile(self: _FrameLike, q: float = 0.5, numeric_only: bool = False) -> SecureSeries:
        """Quantile ``q`` (whole percent) of each column, a series named ``q`` (record values: needs allow_rows)."""
        from mesatee_notebook.remote.frame_series import SecureSeries

        if not isinstance(q, (int, float, np.floating)) or isinstance(q, bool):
            msg = "quantile() of a remote frame takes one q (a float); call it once per quantile"
            raise FrameUsageError(msg)
        target = self[[c for c, d in self.schema.columns if dtype_kind(d) in _NUMERIC]] if numeric_only else self
        if not numeric_only and self.schema.hidden:
            target = self[self._visible()]
        node = FrameReduce(target._node, _quantile_func(q))
        name = float(q)
        return SecureSeries(node, self._ctx, lambda v: v.rename(name))

    def corr(self: _FrameLike, method: str = "pearson", numeric_only: bool = False) -> SecureDataFrame:
        """Pairwise correlations of the visible columns (``pearson`` or ``spearman``): an aggregate."""
        if method not in ("pearson", "spearman"):
            msg = "corr() of a remote frame supports method='pearson' or 'spearman'"
            raise FrameUsageError(msg)
        return _matrix(self, method, numeric_only)

    def cov(self: _FrameLike, numeric_only: bool = False) -> SecureDataFrame:
        """Pairwise covariances of the visible columns (ddof=1): an aggregate."""
        return _matrix(self, "cov", numeric_only)

    def pivot_table(
        self: _FrameLike,
        values: str | Sequence[str] | None = None,
        index: str | Sequence[str] | None = None,
        columns: str | Sequence[str] | None = None,
        aggfunc: str | Mapping[str, str] = "mean",
        fill_value: Any = None,
        margins: bool = False,
        dropna: bool = True,
        observed: bool = True,
        sort: bool = True,
    ) -> SecureDataFrame:
        """``pd.pivot_table``: a grouped aggregate (released under the group rules, noisy in the DP mode), unstacked.

        The aggregation runs in the enclave as ``groupby(index + columns).agg(...)``; the unstacking
        into a table is done locally on the released groups (suppressed groups are missing cells).
        """
        from mesatee_notebook.remote.frame_pivot import pivot_aggs, pivot_post

        if margins:
            msg = "pivot_table(margins=True) is not available yet; aggregate the totals with a second groupby()"
            raise FrameUsageError(msg)
        if observed is not True:
            msg = "pivot_table(observed=False) is not available yet (see groupby(observed=))"
            raise FrameUsageError(msg)
        idx, cols = _as_strs(index, "index"), _as_strs(columns, "columns")
        if not idx:
            msg = "pivot_table() of a remote frame needs index= (one or more key columns)"
            raise FrameUsageError(msg)
        keys = (*idx, *cols)
        aggs, multi = pivot_aggs(self, values, keys, aggfunc)
        node = GroupByAgg(self._node, keys, aggs, True, bool(dropna), bool(sort))
        return _frame(node, self._ctx, pivot_post(len(idx), len(keys), multi, fill_value, dropna, sort))

    def info(self: _FrameLike, show_counts: bool | None = None, buf: Any = None) -> None:
        """Print the schema and, unless ``show_counts=False``, the policy-checked row and non-null counts."""
        from mesatee_notebook.remote.frame_pivot import info_text

        counts: pd.Series | None = None
        rows: int | None = None
        if show_counts is not False:
            counts = self.count().collect()  # first: refused in the DP mode before len() spends any budget
            rows = len(self)
        out = buf if buf is not None else sys.stdout
        out.write(info_text(self, rows, counts))


__all__ = ["_FrameMore", "_Moving", "_SeriesMore"]
