"""``SecureSeries``: a lazy remote column or column expression, with its ``.str``/``.dt`` accessors and indexers."""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mesatee_notebook.errors import FrameNotSupported, FrameUsageError
from mesatee_notebook.remote._public import public_methods
from mesatee_notebook.remote.frame_base import (
    SecureArray,
    SecureScalar,
    _Lazy,
    _lit_or_node,
    _literals,
    _method_form,
    _need_drop,
    _no_options,
    _operator,
    _quantile_func,
    _reduction,
    _Rows,
    _sample,
    _window_fn,
)
from mesatee_notebook.remote.frame_more import _SeriesMore
from mesatee_notebook.remote.frame_refusals import NOT_SUPPORTED
from mesatee_notebook.wire.ops import (
    AsType,
    Binary,
    Corr,
    Describe,
    Distinct,
    DropDuplicates,
    Filter,
    IsIn,
    Map,
    Reduce,
    ResetIndex,
    SetName,
    SortValues,
    ToFrame,
    Top,
    Unary,
    ValueCounts,
    Where,
    Window,
)
from mesatee_notebook.wire.plan import (
    REDUCE_FUNCS,
    encode_literal,
    plain_literal,
)

if TYPE_CHECKING:
    from mesatee_notebook.remote.frame import (
        SecureDataFrame,
    )
    from mesatee_notebook.remote.frame_accessors import _DtMethods, _Indexer, _StrMethods


@public_methods
class SecureSeries(_SeriesMore, _Rows):
    """A lazy remote column or column expression (more methods: ``frame_more._SeriesMore``)."""

    __slots__ = ()
    _what = "series"

    @property
    def name(self) -> builtins.str | None:
        """The series name."""
        return self.schema.columns[0][0]

    @property
    def dtype(self) -> builtins.str:
        """The (predicted) dtype name."""
        return self.schema.columns[0][1]

    def _bin(self, op: builtins.str, other: Any, *, reflected: bool = False) -> SecureSeries:
        left, right = (_lit_or_node(other), self._node) if reflected else (self._node, _lit_or_node(other))
        return SecureSeries(Binary(op, left, right), self._ctx)

    __add__ = _operator("add")
    __radd__ = _operator("add", reflected=True)
    __sub__ = _operator("sub")
    __rsub__ = _operator("sub", reflected=True)
    __mul__ = _operator("mul")
    __rmul__ = _operator("mul", reflected=True)
    __truediv__ = _operator("truediv")
    __rtruediv__ = _operator("truediv", reflected=True)
    __floordiv__ = _operator("floordiv")
    __rfloordiv__ = _operator("floordiv", reflected=True)
    __mod__ = _operator("mod")
    __rmod__ = _operator("mod", reflected=True)
    __pow__ = _operator("pow")
    __rpow__ = _operator("pow", reflected=True)

    def __eq__(self, other: object) -> SecureSeries:  # type: ignore[override]
        return self._bin("eq", other)

    def __ne__(self, other: object) -> SecureSeries:  # type: ignore[override]
        return self._bin("ne", other)

    __lt__ = _operator("lt")
    __le__ = _operator("le")
    __gt__ = _operator("gt")
    __ge__ = _operator("ge")
    __and__ = _operator("and")
    __rand__ = _operator("and", reflected=True)
    __or__ = _operator("or")
    __ror__ = _operator("or", reflected=True)
    __xor__ = _operator("xor")
    __rxor__ = _operator("xor", reflected=True)

    def __neg__(self) -> SecureSeries:
        return SecureSeries(Unary("neg", self._node), self._ctx)

    def __invert__(self) -> SecureSeries:
        return SecureSeries(Unary("invert", self._node), self._ctx)

    def __abs__(self) -> SecureSeries:
        return SecureSeries(Unary("abs", self._node), self._ctx)

    __hash__ = None  # type: ignore[assignment]

    def __getattr__(self, name: builtins.str) -> Any:
        if name in NOT_SUPPORTED:
            raise FrameNotSupported(NOT_SUPPORTED[name])
        msg = f"'SecureSeries' has no attribute {name!r}"
        raise AttributeError(msg)

    def abs(self) -> SecureSeries:
        """Absolute values."""
        return abs(self)

    def __getitem__(self, key: SecureSeries) -> SecureSeries:
        if not isinstance(key, SecureSeries):
            msg = "a remote series can only be indexed by a boolean remote series"
            raise FrameUsageError(msg)
        return SecureSeries(Filter(self._node, key._node), self._ctx)

    def isin(self, values: Sequence[Any]) -> SecureSeries:
        """Whether each value is in ``values`` (literals)."""
        if isinstance(values, (str, _Lazy)):
            msg = "isin() takes a list of literal values"
            raise FrameUsageError(msg)
        vals = tuple(plain_literal(v) for v in values)
        for v in vals:
            encode_literal(v)
        return SecureSeries(IsIn(self._node, vals), self._ctx)

    def astype(self, dtype: builtins.str) -> SecureSeries:
        """Cast to ``dtype`` (one of the supported names)."""
        return SecureSeries(AsType(self._node, str(dtype)), self._ctx)

    def sort_values(self, ascending: bool = True) -> SecureSeries:
        """Values sorted (row-level)."""
        return SecureSeries(SortValues(self._node, (), (bool(ascending),)), self._ctx)

    def drop_duplicates(self, keep: builtins.str | bool = "first") -> SecureSeries:
        """Distinct values (row-level: one row per first occurrence)."""
        return SecureSeries(DropDuplicates(self._node, (), "none" if keep is False else str(keep)), self._ctx)

    def value_counts(
        self, normalize: bool = False, sort: bool = True, ascending: bool = False, dropna: bool = True
    ) -> SecureSeries:
        """Count each distinct value (an aggregate)."""
        return SecureSeries(ValueCounts(self._node, (), normalize, sort, ascending, dropna), self._ctx)

    def describe(self) -> SecureSeries:
        """Summary statistics."""
        return SecureSeries(Describe(self._node, ()), self._ctx)

    def _reduce(self, func: builtins.str) -> SecureScalar:
        return SecureScalar(Reduce(self._node, func), self._ctx)

    sum = _reduction("sum", "Sum (skipping missing values).")
    mean = _reduction("mean", "Mean (skipping missing values).")
    min = _reduction("min", "Minimum; note this is one record's value.")
    max = _reduction("max", "Maximum; note this is one record's value.")
    count = _reduction("count", "Count the non-missing values.")
    std = _reduction("std", "Sample standard deviation.")
    median = _reduction("median", "Median (in the threshold mode: refused for analysts, it is one record's value).")
    var = _reduction("var", "Variance (ddof=1; ddof=0 in the DP mode).")

    def quantile(self, q: float = 0.5) -> SecureScalar:
        """Quantile ``q`` in whole percent (0.01 .. 0.99); in the DP mode a noisy quantile."""
        return self._reduce(_quantile_func(q))

    nunique = _reduction("nunique", "Count the distinct non-missing values.")

    def corr(self, other: SecureSeries, method: builtins.str = "pearson") -> SecureScalar:
        """Correlation with another series of the same frame."""
        if not isinstance(other, SecureSeries):
            msg = "corr() needs another remote series"
            raise FrameUsageError(msg)
        return SecureScalar(Corr(self._node, other._node, method), self._ctx)

    # -- issue 16: method forms, elementwise functions, windows, policy-checked extras --

    def _method(
        self, op: builtins.str, other: Any, kwargs: Mapping[str, Any], *, reflected: bool = False
    ) -> SecureSeries:
        _no_options(op, kwargs, {"axis": (0, "index", None), "level": (None,), "fill_value": (None,)})
        return self._bin(op, other, reflected=reflected)

    add = _method_form("add", "add")
    radd = _method_form("radd", "add", reflected=True)
    sub = _method_form("sub", "sub")

    subtract = sub

    rsub = _method_form("rsub", "sub", reflected=True)
    mul = _method_form("mul", "mul")

    multiply = mul

    rmul = _method_form("rmul", "mul", reflected=True)
    truediv = _method_form("truediv", "truediv")

    div = divide = truediv

    rtruediv = _method_form("rtruediv", "truediv", reflected=True)

    rdiv = rtruediv

    floordiv = _method_form("floordiv", "floordiv")
    rfloordiv = _method_form("rfloordiv", "floordiv", reflected=True)
    mod = _method_form("mod", "mod")
    rmod = _method_form("rmod", "mod", reflected=True)
    pow = _method_form("pow", "pow")
    rpow = _method_form("rpow", "pow", reflected=True)
    eq = _method_form("eq", "eq")
    ne = _method_form("ne", "ne")
    lt = _method_form("lt", "lt")
    le = _method_form("le", "le")
    gt = _method_form("gt", "gt")
    ge = _method_form("ge", "ge")

    def between(self, left: Any, right: Any, inclusive: builtins.str = "both") -> SecureSeries:
        """Whether each value lies between ``left`` and ``right`` (``inclusive``: both, neither, left, right)."""
        if inclusive not in ("both", "neither", "left", "right"):
            msg = "between() inclusive must be 'both', 'neither', 'left' or 'right'"
            raise FrameUsageError(msg)
        lo = self._bin("ge" if inclusive in ("both", "left") else "gt", left)
        hi = self._bin("le" if inclusive in ("both", "right") else "lt", right)
        return lo._bin("and", hi)

    def _map(self, func: builtins.str, *args: Any) -> SecureSeries:
        return SecureSeries(Map(self._node, func, _literals(args, func)), self._ctx)

    def isna(self) -> SecureSeries:
        """Whether each value is missing."""
        return self._map("isna")

    isnull = isna

    def notna(self) -> SecureSeries:
        """Whether each value is present."""
        return self._map("notna")

    notnull = notna

    @property
    def str(self) -> _StrMethods:
        from mesatee_notebook.remote.frame_accessors import _StrMethods

        """Vectorised string functions (literal patterns; no regular expressions in the enclave)."""
        return _StrMethods(self)

    @property
    def dt(self) -> _DtMethods:
        from mesatee_notebook.remote.frame_accessors import _DtMethods

        """Datetime fields and rounding."""
        return _DtMethods(self)

    def clip(self, lower: Any = None, upper: Any = None) -> SecureSeries:
        """Values limited to ``lower`` .. ``upper`` (either may be None)."""
        return self._map("clip", lower, upper)

    def round(self, decimals: int = 0) -> SecureSeries:
        """Values rounded to ``decimals`` places (half to even, as pandas)."""
        return self._map("round", int(decimals))

    def map(self, arg: Any, na_action: None = None) -> SecureSeries:
        """Values mapped through a dict (unmapped values become missing, as in pandas)."""
        if callable(arg) or not isinstance(arg, Mapping):
            msg = (
                "map() in the enclave takes a dict of literal values; a function would run your code on the "
                "data, which needs a %%mesatee cell with code access granted by the owner"
            )
            raise FrameUsageError(msg)
        if na_action is not None:
            msg = "map() na_action is not supported"
            raise FrameUsageError(msg)
        return self._map("map_dict", *[x for kv in arg.items() for x in kv])

    def replace(self, to_replace: Any = None, value: Any = None) -> SecureSeries:
        """Values replaced: ``replace(old, new)``, ``replace([olds], new)``, ``replace([olds], [news])`` or a dict."""
        if isinstance(to_replace, Mapping):
            if value is not None:
                msg = "replace(dict) takes no value"
                raise FrameUsageError(msg)
            pairs = list(to_replace.items())
        elif isinstance(to_replace, (list, tuple)):
            news = list(value) if isinstance(value, (list, tuple)) else [value] * len(to_replace)
            if len(news) != len(to_replace):
                msg = "replace(list, list) needs lists of the same length"
                raise FrameUsageError(msg)
            pairs = list(zip(to_replace, news, strict=True))
        else:
            pairs = [(to_replace, value)]
        return self._map("replace", *[x for kv in pairs for x in kv])

    def where(self, cond: SecureSeries, other: Any = np.nan) -> SecureSeries:
        """Keep values where ``cond`` is true, ``other`` elsewhere."""
        return self._where(cond, other, keep=True)

    def mask(self, cond: SecureSeries, other: Any = np.nan) -> SecureSeries:
        """Replace values by ``other`` where ``cond`` is true."""
        return self._where(cond, other, keep=False)

    def _where(self, cond: Any, other: Any, *, keep: bool) -> SecureSeries:
        if not isinstance(cond, SecureSeries):
            msg = "where()/mask() need a boolean remote series of the same frame as the condition"
            raise FrameUsageError(msg)
        return SecureSeries(Where(self._node, cond._node, _lit_or_node(other), keep), self._ctx)

    def _window(self, func: builtins.str, *args: Any) -> SecureSeries:
        return SecureSeries(Window(self._node, func, _literals(args, func)), self._ctx)

    cumsum = _window_fn("cumsum", "Cumulative sum (row-revealing: needs allow_rows).")
    cumprod = _window_fn("cumprod", "Cumulative product (row-revealing).")
    cummax = _window_fn("cummax", "Cumulative maximum (row-revealing).")
    cummin = _window_fn("cummin", "Cumulative minimum (row-revealing).")

    def shift(self, periods: int = 1) -> SecureSeries:
        """Values moved by ``periods`` rows (row-revealing)."""
        return self._window("shift", int(periods))

    def diff(self, periods: int = 1) -> SecureSeries:
        """Difference with the value ``periods`` rows before (row-revealing)."""
        return self._window("diff", int(periods))

    def rank(self, method: builtins.str = "average", ascending: bool = True) -> SecureSeries:
        """Rank of each value (row-revealing)."""
        return self._window("rank", str(method), bool(ascending))

    ffill = _window_fn("ffill", "Missing values filled from the previous row (row-revealing).")
    bfill = _window_fn("bfill", "Missing values filled from the next row (row-revealing).")

    def duplicated(self, keep: builtins.str | bool = "first") -> SecureSeries:
        """Whether each value repeats an earlier (``keep='first'``) or later one (row-revealing)."""
        return self._window("duplicated", "none" if keep is False else str(keep))

    def unique(self) -> SecureArray:
        """The distinct values in order of appearance (row-revealing: needs allow_rows)."""
        return SecureArray(Distinct(self._node, "unique"), self._ctx)

    def mode(self) -> SecureSeries:
        """The most common value(s), sorted (record values: needs allow_rows)."""
        return SecureSeries(Distinct(self._node, "mode"), self._ctx)

    def nlargest(self, n: int = 5, keep: builtins.str = "first") -> SecureSeries:
        """The ``n`` largest values (row-level)."""
        return SecureSeries(Top(self._node, int(n), (), True, keep), self._ctx)

    def nsmallest(self, n: int = 5, keep: builtins.str = "first") -> SecureSeries:
        """The ``n`` smallest values (row-level)."""
        return SecureSeries(Top(self._node, int(n), (), False, keep), self._ctx)

    def to_frame(self, name: builtins.str | None = None) -> SecureDataFrame:
        """A one-column frame."""
        col = name if name is not None else self.name
        if not isinstance(col, str):
            msg = "to_frame() of an unnamed series needs name='...'"
            raise FrameUsageError(msg)
        from mesatee_notebook.remote.frame import SecureDataFrame

        return SecureDataFrame(ToFrame(self._node, col), self._ctx)

    def rename(self, index: builtins.str) -> SecureSeries:
        """The series under another name (a name only; relabelling rows is not supported)."""
        if not isinstance(index, str):
            msg = "rename() of a remote series takes a new name (a string)"
            raise FrameUsageError(msg)
        return SecureSeries(SetName(self._node, index), self._ctx)

    def reset_index(self, drop: bool = False) -> SecureSeries:
        """Rows renumbered 0..n-1 (``drop=True`` only: the old labels are storage positions)."""
        _need_drop(drop)
        return SecureSeries(ResetIndex(self._node), self._ctx)

    def sample(self, n: int | None = None, frac: float | None = None, random_state: int | None = None) -> SecureSeries:
        """A random sample of rows without replacement (row-level)."""
        return SecureSeries(_sample(self._node, n, frac, random_state), self._ctx)

    @property
    def iloc(self) -> _Indexer:
        """Rows by position: ``s.iloc[a:b]`` (row-level)."""
        from mesatee_notebook.remote.frame_accessors import _Indexer

        return _Indexer(self, "iloc")

    @property
    def loc(self) -> _Indexer:
        """Rows by boolean series or label slice: ``s.loc[mask]``, ``s.loc[a:b]``."""
        from mesatee_notebook.remote.frame_accessors import _Indexer

        return _Indexer(self, "loc")

    prod = _reduction("prod", "Product (skipping missing values).")

    product = prod

    sem = _reduction("sem", "Standard error of the mean.")
    skew = _reduction("skew", "Sample skewness.")
    any = _reduction("any", "Whether any value is true (in the threshold mode, a record's value: needs allow_rows).")
    all = _reduction("all", "Whether every value is true (a record's value: needs allow_rows).")
    idxmax = _reduction("idxmax", "Row label of the maximum (it says where a record is: needs allow_rows).")
    idxmin = _reduction("idxmin", "Row label of the minimum (needs allow_rows).")

    def cov(self, other: SecureSeries) -> SecureScalar:
        """Covariance with another series of the same frame."""
        if not isinstance(other, SecureSeries):
            msg = "cov() needs another remote series"
            raise FrameUsageError(msg)
        return SecureScalar(Corr(self._node, other._node, "cov"), self._ctx)

    @property
    def shape(self) -> tuple[int]:
        """``(len(self),)``: the length is a policy-checked count."""
        return (len(self),)

    @property
    def size(self) -> int:
        """Number of rows (policy-checked count)."""
        return len(self)

    @property
    def empty(self) -> bool:
        """Whether there are no rows (policy-checked count)."""
        return len(self) == 0

    def dropna(self) -> SecureSeries:
        """The non-missing values (row-level)."""
        return self[self.notna()]

    def agg(self, func: builtins.str) -> SecureScalar:
        """A reduction by name (``agg("mean")`` is ``mean()``); lists and functions are refused."""
        if callable(func) or not isinstance(func, builtins.str) or func not in REDUCE_FUNCS:
            msg = f"agg() of a series takes one reduction name: {', '.join(sorted(REDUCE_FUNCS))}"
            raise FrameUsageError(msg)
        return self._reduce(func)

    aggregate = agg

    def copy(self, deep: bool = True) -> SecureSeries:
        """The series itself: remote values are immutable, so a copy is the same value."""
        return self
