"""The DataFrame op vocabulary and the schema rules every op's type check is built from (pure).

A :class:`Schema` is what is known about a node's value without evaluating it: kind, columns and
dtypes, what a row stands for (``level``), the node that made its index (``origin``), the datasets
it reads and the columns their owners hide. The helpers here are shared by the op classes in
:mod:`mesatee_notebook.wire.ops`; each raises ``MalformedFrame`` for a type error, ``NotFound`` for an
unknown column and ``PolicyViolation`` for a reference to a hidden column.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, NoReturn

from mesatee_notebook.errors import MalformedFrame, NotFound, PolicyViolation

BINARY_OPS = frozenset(
    {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor"}
)
ARITH_OPS = frozenset({"add", "sub", "mul", "truediv", "floordiv", "mod", "pow"})
COMPARE_OPS = frozenset({"eq", "ne", "lt", "le", "gt", "ge"})
LOGIC_OPS = frozenset({"and", "or", "xor"})
UNARY_OPS = frozenset({"neg", "invert", "abs"})
#: ``p1`` .. ``p99`` are percentiles (``p50`` is the median); ``var`` and ``std`` have ddof=1 in the
#: threshold mode and ddof=0 in the DP mode (see docs/privacy.md).
QUANTILE_FUNCS = frozenset(f"p{i}" for i in range(1, 100))
AGG_FUNCS = (
    frozenset(
        {
            "size", "count", "sum", "mean", "min", "max", "std", "var", "median", "nunique",
            "prod", "sem", "skew", "any", "all", "first", "last", "idxmax", "idxmin",
        }
    )
    | QUANTILE_FUNCS
)  # fmt: skip
#: Reductions of a series only; ``idxmax``/``idxmin`` return a row's label, so they are row-revealing
#: (also as a groupby aggregation); ``kurt`` is a series and frame reduction only.
REDUCE_FUNCS = (AGG_FUNCS - {"size", "first", "last"}) | {"kurt"}
#: Elementwise functions of a series (``map`` op): name -> number of literal arguments (-1: any).
MAP_FUNCS: dict[str, int] = {
    "isna": 0, "notna": 0,
    "str_lower": 0, "str_upper": 0, "str_len": 0, "str_strip": 0, "str_lstrip": 0, "str_rstrip": 0,
    "str_contains": 2, "str_startswith": 1, "str_endswith": 1, "str_replace": 2, "str_slice": 3,
    "dt_year": 0, "dt_month": 0, "dt_day": 0, "dt_hour": 0, "dt_minute": 0, "dt_second": 0,
    "dt_dayofweek": 0, "dt_quarter": 0, "dt_dayofyear": 0, "dt_date": 0, "dt_floor": 1, "dt_ceil": 1,
    "dt_round": 1,
    "clip": 2, "round": 1, "map_dict": -1, "replace": -1, "cut": -1,
}  # fmt: skip
#: Functions that mix values across rows (``window`` op): each output row depends on other rows,
#: so the per-group row counts of the threshold mode do not bound what they reveal. Row-revealing.
WINDOW_FUNCS: dict[str, int] = {
    "cumsum": 0, "cumprod": 0, "cummax": 0, "cummin": 0, "shift": 1, "diff": 1, "rank": 2,
    "ffill": 0, "bfill": 0, "duplicated": 1, "pct_change": 1, "interpolate": 0,
    "rolling": 3, "expanding": 2,
}  # fmt: skip
#: What ``rolling(window, min_periods)`` and ``expanding(min_periods)`` aggregate (``window`` op args[0]).
MOVING_FUNCS = frozenset({"sum", "mean", "min", "max", "std", "var", "median", "count"})
#: ``distinct``: the distinct values (``unique``) or the most common ones (``mode``): record values.
DISTINCT_FUNCS = frozenset({"unique", "mode"})
#: Frame-level reductions (``frame_reduce`` op): one value per column.
FRAME_REDUCE_FUNCS = frozenset(
    {"sum", "mean", "min", "max", "count", "std", "var", "median", "prod", "sem", "skew", "nunique", "any", "all",
     "kurt", "idxmax", "idxmin"}
    | QUANTILE_FUNCS
)  # fmt: skip
DTYPES = frozenset(
    {
        "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float32", "float64", "bool", "str", "string", "category",
        "datetime64[s]", "datetime64[ms]", "datetime64[us]", "datetime64[ns]",
        "Int64", "Float64", "boolean",
    }
)  # fmt: skip
#: Ops whose result reveals single records (or where they are) whatever follows them: refused for
#: analysts of a dataset whose owner does not allow rows, and never evaluated in the DP mode.
ROW_REVEALING_OPS = frozenset({"window", "distinct", "group_window", "mode_frame"})
ROW_REVEALING_FUNCS = frozenset({"idxmax", "idxmin"})


@dataclass(frozen=True, slots=True)
class Lit:
    """A literal operand (a scalar value, not a node)."""

    value: Any


def check_name(value: Any, what: str) -> str:
    """Return ``value`` if it is a column/argument name the plan accepts; else raise ``MalformedFrame``."""
    if not isinstance(value, str) or len(value) > 1024 or value.startswith("\x00"):
        msg = f"{what} must be a string name (at most 1024 characters, not starting with NUL)"
        raise MalformedFrame(msg)
    return value


Kind = Literal["frame", "series", "scalar"]
Level = Literal["rows", "groups", "summary", "scalar"]
Column = tuple[str | None, str]


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What a party may know about a stored dataset: column names, dtypes, hidden columns."""

    name: str
    columns: tuple[tuple[str, str], ...]
    hidden: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Schema:
    """The type of a node's value, known without evaluating it.

    ``level`` says what a row of the value stands for: one record (``rows``),
    a group of records (``groups``), a summary statistic, or a scalar.
    ``origin`` identifies the node that made the value's index; two values can
    be combined only if their origins are the same. ``hidden`` are columns that
    must not be referenced or released; ``hidden_join`` is set once rows were
    matched on a hidden column.
    """

    kind: Kind
    columns: tuple[Column, ...]
    level: Level
    origin: Hashable
    datasets: frozenset[str] = frozenset()
    hidden: frozenset[str] = frozenset()
    hidden_join: bool = False
    index: tuple[str | None, ...] = field(default=())

    @property
    def names(self) -> tuple[str | None, ...]:
        """Column names in order (a series has one, possibly ``None``)."""
        return tuple(c for c, _ in self.columns)

    def dtype(self, name: str) -> str:
        """Return the dtype of a column."""
        for col, dt in self.columns:
            if col == name:
                return dt
        msg = f"no column {name!r}"
        raise NotFound(msg)


def source_columns(dtypes: Iterable[tuple[Any, Any]]) -> tuple[tuple[str, str], ...]:
    """Turn ``df.dtypes.items()`` into schema columns; column names must be unique strings."""
    out = tuple((check_name(name, "a column name"), str(dtype)) for name, dtype in dtypes)
    if len({n for n, _ in out}) != len(out):
        msg = "column names must be unique"
        raise MalformedFrame(msg)
    return out


_KIND_PREFIXES = (
    (("int", "uint"), "int"), (("float",), "float"), (("string",), "str"), (("datetime64",), "datetime"),
)  # fmt: skip
_KIND_NAMES = {"bool": "bool", "boolean": "bool", "str": "str", "object": "str", "category": "category"}


def dtype_kind(dtype: str) -> str:
    """Coarse kind of a dtype: int, float, bool, str, datetime, category or other."""
    d = dtype.lower()
    if d in _KIND_NAMES:
        return _KIND_NAMES[d]
    for prefixes, kind in _KIND_PREFIXES:
        if d.startswith(prefixes):
            return kind
    return "other"


def lit_kind(value: Any) -> str:
    """Kind of a literal: null, bool, int, float, str, datetime or other."""
    if value is None:
        return "null"
    for types, kind in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (datetime, "datetime")):
        if isinstance(value, types):
            return kind
    return "other"


LIT_DTYPE = {"int": "int64", "float": "float64", "bool": "bool", "str": "str", "datetime": "datetime64[us]"}
NUMERIC = frozenset({"int", "float"})


def fail(msg: str) -> NoReturn:
    """Raise ``MalformedFrame`` (a type error in a plan)."""
    raise MalformedFrame(msg)


def need(schema: Schema, kinds: Iterable[Kind], op: str, what: str = "input") -> None:
    """Check a node's input is one of ``kinds`` (and not a describe() result)."""
    kinds = tuple(kinds)
    if schema.kind not in kinds:
        fail(f"{op}() {what} must be a {' or '.join(kinds)}, not a {schema.kind}")
    if schema.level == "summary" and op not in ("select", "column"):
        fail(f"{op}() cannot be applied to a describe() result; select a column of it and collect()")


def ref_col(schema: Schema, name: str, op: str, *, key: bool = False) -> str:
    """Check a reference to a column: it must exist and, unless ``key``, not be hidden."""
    if name in schema.hidden and not key:
        ds = ", ".join(sorted(schema.datasets))
        msg = (
            f"{op}() refers to column {name!r}, which the owner of {ds} hides; "
            "a hidden column can only be used as a merge key"
        )
        raise PolicyViolation(msg, column=name)
    for col, dtype in schema.columns:
        if col == name:
            return dtype
    cols = ", ".join(repr(c) for c in schema.names if c not in schema.hidden)
    msg = f"{op}(): no column {name!r} (columns: {cols})"
    raise NotFound(msg)


def literal_fits(value: Any, dtype: str) -> bool:
    """Whether a literal can be stored in a column of ``dtype``."""
    lk, ck = lit_kind(value), dtype_kind(dtype)
    if lk == "null" or ck == "other":
        return False
    if ck in NUMERIC:
        return lk in NUMERIC
    if ck == "category":
        return lk in ("str", "int", "float")
    return lk == ck


def arith_dtype(op: str, a: str, b: str) -> str:
    """The dtype of an arithmetic op between ``a`` and ``b`` (raises if they do not combine)."""
    ka, kb = dtype_kind(a), dtype_kind(b)
    if op == "add" and ka == kb == "str":
        return "str"
    if ka == kb == "bool":
        fail(f"{op}: arithmetic between two booleans is ambiguous; use & | ^ or astype('int64') first")
    if ka not in ("int", "float", "bool") or kb not in ("int", "float", "bool"):
        fail(f"{op}: arithmetic needs numeric operands, got {a} and {b}")
    if op == "truediv" or "float" in (ka, kb):
        return "float64"
    return "int64"


def compare_ok(op: str, a: str, b: str) -> bool:
    """Whether values of dtypes ``a`` and ``b`` can be compared with ``op``."""
    ka, kb = dtype_kind(a), dtype_kind(b)
    if ka in NUMERIC and kb in NUMERIC:
        return True
    if ka == kb and ka in ("str", "bool", "datetime"):
        return ka != "bool" or op in ("eq", "ne")
    if {ka, kb} == {"datetime", "str"}:
        return True  # a timestamp string literal
    if "category" in (ka, kb):
        return op in ("eq", "ne")
    return False


def operand_dtype(value: Any, schema_of: Callable[[Any], Schema]) -> tuple[Schema | None, str]:
    """Return an operand's schema (None for a literal) and its dtype."""
    if not isinstance(value, Lit):
        s = schema_of(value)
        return s, s.columns[0][1] if s.kind == "series" else ""
    lk = lit_kind(value.value)
    if lk not in LIT_DTYPE:
        fail(f"literal {value.value!r} cannot be used in an expression")
    return None, LIT_DTYPE[lk]


def same_origin(a: Schema, b: Schema, op: str) -> None:
    """Check that two operands share an index (come from the same frame)."""
    if a.origin != b.origin:
        msg = (
            f"{op}(): the operands come from different frames (e.g. one is aggregated or merged and the other "
            "is not); build both from the same frame"
        )
        fail(msg)


def merge_columns(
    left: Schema, right: Schema, left_on: Sequence[str], right_on: Sequence[str], *, how: str, suffixes: tuple[str, str]
) -> tuple[list[Column], set[str]]:
    """Output columns of a pandas merge and the ones that carry hidden values."""
    same = {lk for lk, rk in zip(left_on, right_on, strict=True) if lk == rk}
    partner_hidden_l = {lk for lk, rk in zip(left_on, right_on, strict=True) if rk in right.hidden}
    partner_hidden_r = {rk for lk, rk in zip(left_on, right_on, strict=True) if lk in left.hidden}
    lcols = [(c, d) for c, d in left.columns if c is not None]
    rcols = [(c, d) for c, d in right.columns if c is not None and c not in same]
    overlap = {c for c, _ in lcols} & {c for c, _ in rcols}
    nullable_left = how in ("right", "outer")
    nullable_right = how in ("left", "outer")

    def widen(dtype: str, nullable: bool) -> str:
        if not nullable:
            return dtype
        kind = dtype_kind(dtype)
        return "float64" if kind == "int" and dtype[0] != "I" else "object" if dtype == "bool" else dtype

    out: list[Column] = []
    hidden: set[str] = set()
    for c, d in lcols:
        name = c + suffixes[0] if c in overlap else c
        keep = c in same and how == "outer"
        out.append((name, d if c in same else widen(d, nullable_left and not keep)))
        if c in left.hidden or c in partner_hidden_l or (c in same and c in right.hidden):
            hidden.add(name)
    for c, d in rcols:
        name = c + suffixes[1] if c in overlap else c
        out.append((name, widen(d, nullable_right)))
        if c in right.hidden or c in partner_hidden_r:
            hidden.add(name)
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        fail(f"merge() would produce duplicate column names {names}; choose other suffixes")
    return out, hidden


_NUMBERS = ("int", "float", "bool")
#: func -> (the dtype kinds it accepts or None for any, what to say, the result dtype or None for "as input")
_AGG_RULES: dict[str, tuple[tuple[str, ...] | None, str, str | None]] = {
    **dict.fromkeys(("size", "count", "nunique"), (None, "", "int64")),
    **dict.fromkeys(("any", "all"), (_NUMBERS, "a boolean or numeric", "bool")),
    **dict.fromkeys(("idxmax", "idxmin"), ((*_NUMBERS, "datetime"), "a numeric or datetime", "int64")),
    **dict.fromkeys(
        ("mean", "std", "var", "median", "sem", "skew", "kurt", *QUANTILE_FUNCS), (_NUMBERS, "a numeric", "float64")
    ),
    **dict.fromkeys(("sum", "prod"), (_NUMBERS, "a numeric", None)),
}


def agg_dtype(func: str, dtype: str, col: str) -> str:
    """The dtype of an aggregation of a column (raises for a column the function does not take)."""
    kind = dtype_kind(dtype)
    kinds, what, out = _AGG_RULES.get(func, (None, "", None))
    if kinds is not None and kind not in kinds:
        fail(f"{func} of column {col!r} needs {what} column, not {dtype}")
    if out is not None:
        return out
    if func in ("sum", "prod"):
        return "float64" if kind == "float" else "int64"
    if kind in ("category", "other"):
        fail(f"{func} of column {col!r} is not supported for dtype {dtype}")
    return dtype  # min, max, first, last


FREQS = frozenset({"D", "h", "min", "s", "ms", "us", "ns"})


def series_dtype(inp: Schema, op: str) -> tuple[str | None, str, str]:
    """Check ``inp`` is a series; return its name, dtype and dtype kind."""
    need(inp, ("series",), op)
    name, dt = inp.columns[0]
    return name, dt, dtype_kind(dt)


def with_dtype(inp: Schema, dtype: str) -> Schema:
    """A series schema with its dtype replaced."""
    return replace_schema(inp, columns=((inp.columns[0][0], dtype),))


def pairs(values: Sequence[Any], op: str) -> tuple[list[Any], list[Any]]:
    """Split ``[old, new, old, new, ...]`` into the olds and the news."""
    if len(values) % 2:
        fail(f"{op}() needs pairs of old and new values")
    return list(values[0::2]), list(values[1::2])


def value_dtype(values: Sequence[Any], base: str | None, op: str) -> str:
    """The dtype pandas gives a column of ``base`` values (None: none kept) with ``values`` put in."""
    kinds = {lit_kind(v) for v in values} - {"null"}
    if base is not None:
        kinds.add(dtype_kind(base))
    if not kinds:
        return "float64"
    if kinds <= {"int"}:
        return "int64" if base is None or dtype_kind(base) != "int" else base
    if kinds <= NUMERIC:
        return "float64"
    if kinds == {"datetime"}:
        return base or "datetime64[us]"
    single = {frozenset({"str"}): "str", frozenset({"bool"}): "bool"}
    return single.get(frozenset(kinds), "object")


def replace_schema(schema: Schema, **changes: Any) -> Schema:
    """A copy of ``schema`` with ``changes``; hidden columns follow the columns kept."""
    fields: dict[str, Any] = {
        "kind": schema.kind,
        "columns": schema.columns,
        "level": schema.level,
        "origin": schema.origin,
        "datasets": schema.datasets,
        "hidden": schema.hidden,
        "hidden_join": schema.hidden_join,
        "index": schema.index,
    }
    fields.update(changes)
    if "columns" in changes and "hidden" not in changes:
        names = {c for c, _ in fields["columns"]}
        fields["hidden"] = frozenset(h for h in schema.hidden if h in names)
    return Schema(**fields)
