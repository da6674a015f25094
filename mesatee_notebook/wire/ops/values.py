"""Ops on the values of a series: arithmetic and comparisons, elementwise functions, windows, where."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesatee_notebook.wire.ops._base import InferCtx, Op, arg, op
from mesatee_notebook.wire.schema import (
    AGG_FUNCS,
    ARITH_OPS,
    BINARY_OPS,
    COMPARE_OPS,
    DISTINCT_FUNCS,
    FREQS,
    MAP_FUNCS,
    MOVING_FUNCS,
    NUMERIC,
    UNARY_OPS,
    WINDOW_FUNCS,
    Lit,
    Schema,
    agg_dtype,
    arith_dtype,
    compare_ok,
    dtype_kind,
    fail,
    lit_kind,
    literal_fits,
    need,
    operand_dtype,
    pairs,
    ref_col,
    replace_schema,
    same_origin,
    series_dtype,
    value_dtype,
    with_dtype,
)


def _binary_dtype(bop: str, ldt: str, rdt: str) -> str:
    if bop in ARITH_OPS:
        return arith_dtype(bop, ldt, rdt)
    if bop in COMPARE_OPS:
        if not compare_ok(bop, ldt, rdt):
            fail(f"cannot compare {ldt} with {rdt} ({bop})")
        return "bool"
    if dtype_kind(ldt) != "bool" or dtype_kind(rdt) != "bool":
        fail(f"{bop}: & | ^ need boolean operands, got {ldt} and {rdt}; wrap comparisons in ()")
    return "bool"


@op("binary")
@dataclass(frozen=True, slots=True, eq=False)
class Binary(Op):
    """An elementwise arithmetic, comparison or logical op (``bop``; ``op`` in the plan)."""

    bop: str = field(metadata=arg("str", wire="op", enum=BINARY_OPS))
    left: Any = field(metadata=arg("operand"))
    right: Any = field(metadata=arg("operand"))

    def infer(self, ctx: InferCtx) -> Schema:
        ls, ldt = operand_dtype(self.left, ctx.schema_of)
        rs, rdt = operand_dtype(self.right, ctx.schema_of)
        base = ls or rs
        if base is None:
            fail("binary(): at least one operand must be a column expression")
        for s in (ls, rs):
            if s is not None:
                need(s, ("series",), self.bop, "operand")
        if ls is not None and rs is not None:
            same_origin(ls, rs, self.bop)
        dtype = _binary_dtype(self.bop, ldt, rdt)
        lname = ls.columns[0][0] if ls is not None else None
        rname = rs.columns[0][0] if rs is not None else None
        name = lname if rs is None else rname if ls is None else (lname if lname == rname else None)
        hj = any(s.hidden_join for s in (ls, rs) if s is not None)
        return Schema("series", ((name, dtype),), base.level, base.origin, base.datasets, frozenset(), hj, base.index)

    def label(self) -> str:
        return f"binary({self.bop})"


@op("unary")
@dataclass(frozen=True, slots=True, eq=False)
class Unary(Op):
    """Negation, logical not or absolute value (``uop``; ``op`` in the plan)."""

    uop: str = field(metadata=arg("str", wire="op", enum=UNARY_OPS))
    input: Any = field(metadata=arg("node"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("series",), "unary")
        dt = inp.columns[0][1]
        kind = dtype_kind(dt)
        if self.uop == "invert" and kind != "bool":
            fail(f"~ needs a boolean series, not {dt}")
        if self.uop in ("neg", "abs") and kind not in NUMERIC:
            fail(f"{self.uop} needs a numeric series, not {dt}")
        return inp


@op("isin")
@dataclass(frozen=True, slots=True, eq=False)
class IsIn(Op):
    """Whether each value is in a list of literals."""

    input: Any = field(metadata=arg("node"))
    values: tuple[Any, ...] = field(metadata=arg("literals"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("series",), "isin")
        return replace_schema(inp, columns=((inp.columns[0][0], "bool"),))


# -- the ``map`` op: one schema rule per family of functions ------------------------------------


def _map_str(func: str, vals: tuple[Any, ...], inp: Schema, dt: str, kind: str) -> Schema:
    if kind != "str":
        fail(f".str.{func[4:]}() needs a string series, not {dt}")
    if func in ("str_contains", "str_startswith", "str_endswith", "str_replace"):
        pats = vals[:1] if func != "str_replace" else vals
        if not all(isinstance(v, str) for v in pats):
            fail(f".str.{func[4:]}() needs string patterns")
        if func == "str_contains" and not isinstance(vals[1], bool):
            fail(".str.contains() case= must be a bool")
        return with_dtype(inp, "bool" if func != "str_replace" else dt)
    if func == "str_len":
        return with_dtype(inp, "int64")
    if func == "str_slice" and not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in vals):
        fail(".str.slice() takes integer start, stop and step")
    return inp


def _map_dt(func: str, vals: tuple[Any, ...], inp: Schema, dt: str, kind: str) -> Schema:
    if kind != "datetime":
        fail(f".dt.{func[3:]} needs a datetime series, not {dt}")
    if func in ("dt_floor", "dt_ceil", "dt_round"):
        freq = vals[0]
        if not isinstance(freq, str) or freq.lstrip("0123456789") not in FREQS or freq[:1] == "0":
            fail(f".dt.{func[3:]}() freq must be a fixed frequency such as 'D', 'h', '15min', 's'")
        return inp
    return with_dtype(inp, "object" if func == "dt_date" else "int32")


def _map_isna(func: str, vals: tuple[Any, ...], inp: Schema, dt: str, kind: str) -> Schema:
    return with_dtype(inp, "bool")


def _map_clip(func: str, vals: tuple[Any, ...], inp: Schema, dt: str, kind: str) -> Schema:
    if kind not in NUMERIC:
        fail(f"clip() needs a numeric series, not {dt}")
    if not all(lit_kind(v) in ("null", "int", "float") for v in vals):
        fail("clip() bounds must be numbers or None")
    return with_dtype(inp, "float64" if any(isinstance(v, float) for v in vals) else dt)


def _map_round(func: str, vals: tuple[Any, ...], inp: Schema, dt: str, kind: str) -> Schema:
    if kind not in NUMERIC or not isinstance(vals[0], int) or isinstance(vals[0], bool):
        fail("round() needs a numeric series and an integer number of decimals")
    return inp


def _map_dict(func: str, vals: tuple[Any, ...], inp: Schema, dt: str, kind: str) -> Schema:
    old, new = pairs(vals, func)
    if func == "map_dict":
        return with_dtype(inp, value_dtype(new, None, func) if len(new) else "float64")
    if kind in ("category", "other"):
        fail(f"replace() is not supported for dtype {dt}")
    kept = [n for o, n in zip(old, new, strict=True) if literal_fits(o, dt)]  # an old that cannot occur: no change
    return with_dtype(inp, value_dtype(kept, dt, func) if kept else dt)


def _map_cut(func: str, vals: tuple[Any, ...], inp: Schema, dt: str, kind: str) -> Schema:
    if kind not in NUMERIC:
        fail(f"cut() needs a numeric series, not {dt}")
    if not vals or not isinstance(vals[0], int) or isinstance(vals[0], bool) or len(vals) < vals[0] + 1:
        fail("cut() arguments are [number of bin edges, edges..., labels...]")
    n = vals[0]
    edges, labels = vals[1 : 1 + n], vals[1 + n :]
    if n < 2 or not all(lit_kind(e) in NUMERIC for e in edges) or list(edges) != sorted(edges):
        fail("cut() needs at least two increasing numeric bin edges")
    if labels and (len(labels) != n - 1 or not all(isinstance(x, str) for x in labels)):
        fail("cut() labels must be one string per bin (or labels=False for bin numbers)")
    return with_dtype(inp, "category" if labels else "int64")


_MapRule = Callable[[str, tuple[Any, ...], Schema, str, str], Schema]
_MAP_RULES: dict[str, _MapRule] = {
    "isna": _map_isna, "notna": _map_isna, "clip": _map_clip, "round": _map_round,
    "map_dict": _map_dict, "replace": _map_dict, "cut": _map_cut,
}  # fmt: skip


@op("map")
@dataclass(frozen=True, slots=True, eq=False)
class Map(Op):
    """An elementwise function of a series (isna, .str.*, .dt.*, clip, round, map/replace with a dict, cut)."""

    input: Any = field(metadata=arg("node"))
    func: str = field(metadata=arg("str", enum=frozenset(MAP_FUNCS)))
    args_: tuple[Any, ...] = field(metadata=arg("literals", wire="args"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        func, vals = self.func, tuple(self.args_)
        _, dt, kind = series_dtype(inp, func)
        arity = MAP_FUNCS[func]
        if arity >= 0 and len(vals) != arity:
            fail(f"{func}() takes {arity} argument(s), got {len(vals)}")
        rule = _MAP_RULES.get(func) or (_map_str if func.startswith("str_") else _map_dt)
        return rule(func, vals, inp, dt, kind)


def _window_numeric(func: str, periods: Any, inp: Schema, dt: str, kind: str) -> Schema:
    if func == "shift" and kind not in NUMERIC and kind not in ("bool", "datetime"):
        return inp  # strings, categories: moved as they are (missing at the ends)
    ok = kind in NUMERIC or (kind == "bool" and func in ("cumsum", "cumprod", "shift"))
    if not ok and not (kind == "datetime" and func in ("cummax", "cummin", "shift", "diff")):
        fail(f"{func}() needs a numeric series, not {dt}")
    if func == "shift":
        return with_dtype(inp, "float64" if kind in ("int", "bool") and periods != 0 else dt)
    if func == "diff":
        return with_dtype(inp, "timedelta64[us]" if kind == "datetime" else "float64" if kind != "float" else dt)
    return with_dtype(inp, "int64") if kind == "bool" else inp


@op("window")
@dataclass(frozen=True, slots=True, eq=False)
class Window(Op):
    """A function that mixes values across rows (cumsum, shift, diff, rank, ffill, duplicated ...)."""

    input: Any = field(metadata=arg("node"))
    func: str = field(metadata=arg("str", enum=frozenset(WINDOW_FUNCS)))
    args_: tuple[Any, ...] = field(metadata=arg("literals", wire="args"))

    def infer(self, ctx: InferCtx) -> Schema:
        return window_schema(self.func, tuple(self.args_), ctx.schema_of(self.input))


def window_schema(func: str, vals: tuple[Any, ...], inp: Schema) -> Schema:
    """The schema rule of a window function ``func(*vals)`` of the series ``inp`` (also per group)."""
    _, dt, kind = series_dtype(inp, func)
    if len(vals) != WINDOW_FUNCS[func]:
        fail(f"{func}() takes {WINDOW_FUNCS[func]} argument(s), got {len(vals)}")
    if inp.level != "rows":
        fail(f"{func}() of an aggregate is not supported; collect the aggregate and apply it locally")
    if func in ("shift", "diff") and (not isinstance(vals[0], int) or isinstance(vals[0], bool)):
        fail(f"{func}() periods must be an integer")
    if func == "duplicated":
        if vals[0] not in ("first", "last", "none"):
            fail("duplicated() keep must be 'first', 'last' or False")
        return with_dtype(inp, "bool")
    if func == "rank":
        if vals[0] not in ("average", "min", "max", "first", "dense") or not isinstance(vals[1], bool):
            fail("rank() method must be average, min, max, first or dense, and ascending a bool")
        return with_dtype(inp, "float64")
    if func in ("ffill", "bfill"):
        return inp
    if func in ("pct_change", "interpolate", "rolling", "expanding"):
        return _window_float(func, vals, inp, dt, kind)
    return _window_numeric(func, vals[0] if vals else None, inp, dt, kind)


def _int_arg(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _window_float(func: str, vals: tuple[Any, ...], inp: Schema, dt: str, kind: str) -> Schema:
    """pct_change, interpolate, rolling(...).agg and expanding(...).agg: numeric in, float64 out."""
    if kind not in ("int", "float"):
        fail(f"{func}() needs a numeric series, not {dt}")
    if func == "pct_change" and not _int_arg(vals[0], -(2**62)):
        fail("pct_change() periods must be an integer")
    if func == "interpolate":
        return inp if kind == "float" else with_dtype(inp, dt)
    if func in ("rolling", "expanding"):
        agg, rest = vals[0], vals[1:]
        if agg not in MOVING_FUNCS:
            fail(f"{func}() aggregates with one of {', '.join(sorted(MOVING_FUNCS))}, not {agg!r}")
        if func == "rolling" and not _int_arg(rest[0], 1):
            fail("rolling() window must be an integer number of rows >= 1 (time-based windows are not supported)")
        if not (rest[-1] is None or _int_arg(rest[-1], 0)):
            fail(f"{func}() min_periods must be an integer >= 0 or None")
    return with_dtype(inp, "float64")


#: ``group_map`` functions: a row's number within its group, or its group's aggregate (``transform``).
GROUP_MAP_FUNCS = frozenset({"cumcount", "cumcount_desc"} | (AGG_FUNCS - {"size"}))


@op("group_map")
@dataclass(frozen=True, slots=True, eq=False)
class GroupMap(Op):
    """A value per row computed from the row's group: ``cumcount`` or ``transform(func)`` of ``column``.

    Each output row depends on the other rows of its group, so, like a window, it is row-revealing.
    """

    input: Any = field(metadata=arg("node"))
    by: tuple[str, ...] = field(metadata=arg("strs"))
    column: str = field(metadata=arg("str"))
    func: str = field(metadata=arg("str", enum=GROUP_MAP_FUNCS))
    dropna: bool = field(metadata=arg("bool"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame",), "groupby")
        if inp.level != "rows":
            fail(f"groupby().{self.func}() of an aggregate is not supported; collect it and group it locally")
        if not self.by or len(set(self.by)) != len(self.by):
            fail("groupby() needs a non-empty list of distinct key columns")
        for k in self.by:
            ref_col(inp, k, "groupby")
        if self.func.startswith("cumcount"):
            if self.column:
                fail("cumcount() takes no column")
            return Schema("series", ((None, "int64"),), "rows", inp.origin, inp.datasets, frozenset(), inp.hidden_join)
        if self.column in self.by:
            fail(f"transform() of the group key {self.column!r}")
        dt = agg_dtype(self.func, ref_col(inp, self.column, "transform"), self.column)
        return Schema("series", ((self.column, dt),), "rows", inp.origin, inp.datasets, frozenset(), inp.hidden_join)

    def label(self) -> str:
        return f"groupby({list(self.by)}).{self.func}({self.column})"


@op("where")
@dataclass(frozen=True, slots=True, eq=False)
class Where(Op):
    """``where`` (keep values where ``cond``) or ``mask`` (replace them there)."""

    input: Any = field(metadata=arg("node"))
    cond: Any = field(metadata=arg("node"))
    other: Any = field(metadata=arg("operand"))
    keep: bool = field(metadata=arg("bool"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        name, dt, kind = series_dtype(inp, "where")
        cond = ctx.schema_of(self.cond)
        need(cond, ("series",), "where", "cond")
        if dtype_kind(cond.columns[0][1]) != "bool":
            fail(f"where()/mask() needs a boolean condition, not {cond.columns[0][1]}")
        same_origin(inp, cond, "where")
        other = self.other
        hj = inp.hidden_join or cond.hidden_join
        if not isinstance(other, Lit):
            os_ = ctx.schema_of(other)
            need(os_, ("series",), "where", "other")
            same_origin(inp, os_, "where")
            odt = os_.columns[0][1]
            out = dt if odt == dt else "float64" if {kind, dtype_kind(odt)} <= NUMERIC else "object"
            return replace_schema(inp, columns=((name, out),), hidden_join=hj or os_.hidden_join)
        value = other.value
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out = "float64" if kind in ("int", "bool") else dt
        elif literal_fits(value, dt):
            out = dt if not (kind == "int" and isinstance(value, float)) else "float64"
        else:
            out = "object"
        return replace_schema(inp, columns=((name, out),), hidden_join=hj)


@op("distinct")
@dataclass(frozen=True, slots=True, eq=False)
class Distinct(Op):
    """The distinct values (``unique``) or the most common ones (``mode``)."""

    input: Any = field(metadata=arg("node"))
    func: str = field(metadata=arg("str", enum=DISTINCT_FUNCS))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        name, dt, _ = series_dtype(inp, self.func)
        if inp.level != "rows":
            fail(f"{self.func}() of an aggregate is not supported; collect the aggregate and apply it locally")
        return Schema("series", ((name, dt),), "rows", ctx.token, inp.datasets, frozenset(), inp.hidden_join)
