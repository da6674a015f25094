"""Ops that keep rows as rows: sources, column selection, filters, sorting, slicing, joins, reshaping.

Why this module is over ~500 lines: one frozen class per row-level plan op (the catalog reads best as one list per
family); just over.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mesatee_notebook.errors import PolicyViolation
from mesatee_notebook.wire.ops._base import InferCtx, Op, arg, op
from mesatee_notebook.wire.schema import (
    NUMERIC,
    Lit,
    Schema,
    SourceInfo,
    dtype_kind,
    fail,
    literal_fits,
    merge_columns,
    need,
    operand_dtype,
    ref_col,
    replace_schema,
    same_origin,
    series_dtype,
    with_dtype,
)
from mesatee_notebook.wire.schema import (
    Column as ColumnType,
)

_KEEP = frozenset({"first", "last", "none"})


@op("source")
@dataclass(frozen=True, slots=True, eq=False)
class Source(Op):
    """A stored dataset (``info``, its schema, is known on the client only)."""

    name: str = field(metadata=arg("str"))
    info: SourceInfo | None = field(default=None, repr=False)

    def infer(self, ctx: InferCtx) -> Schema:
        info = ctx.source_of(self.name)
        return Schema(
            "frame", tuple(info.columns), "rows", ("source", info.name), frozenset({info.name}), frozenset(info.hidden)
        )

    def label(self) -> str:
        return f"source({self.name!r})"


@op("select")
@dataclass(frozen=True, slots=True, eq=False)
class Select(Op):
    """Column subset of a frame."""

    input: Any = field(metadata=arg("node"))
    columns: tuple[str, ...] = field(metadata=arg("strs"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame",), "select")
        cols = self.columns
        if not cols or len(set(cols)) != len(cols):
            fail("select() needs a non-empty list of distinct columns")
        out = tuple((c, ref_col(inp, c, "select")) for c in cols)
        return replace_schema(inp, columns=out, hidden=frozenset())

    def label(self) -> str:
        return f"select({list(self.columns)})"


@op("column")
@dataclass(frozen=True, slots=True, eq=False)
class Column(Op):
    """One column of a frame, as a series."""

    input: Any = field(metadata=arg("node"))
    name: str = field(metadata=arg("str"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame",), "column")
        dt = ref_col(inp, self.name, "column")
        return Schema(
            "series", ((self.name, dt),), inp.level, inp.origin, inp.datasets, frozenset(), inp.hidden_join, inp.index
        )

    def label(self) -> str:
        return f"[{self.name!r}]"


@op("filter")
@dataclass(frozen=True, slots=True, eq=False)
class Filter(Op):
    """Rows where a boolean series is true."""

    input: Any = field(metadata=arg("node"))
    predicate: Any = field(metadata=arg("node"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame", "series"), "filter")
        pred = ctx.schema_of(self.predicate)
        need(pred, ("series",), "filter", "predicate")
        if dtype_kind(pred.columns[0][1]) != "bool":
            fail(f"filter() needs a boolean predicate, not {pred.columns[0][1]}")
        same_origin(inp, pred, "filter")
        return replace_schema(inp, hidden_join=inp.hidden_join or pred.hidden_join)


@op("assign")
@dataclass(frozen=True, slots=True, eq=False)
class Assign(Op):
    """New or replaced columns (each a series of the same frame or a literal)."""

    input: Any = field(metadata=arg("node"))
    columns: tuple[tuple[str, Any], ...] = field(metadata=arg("assigns"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame",), "assign")
        cols = list(inp.columns)
        names = [n for n, _ in self.columns]
        if len(set(names)) != len(names):
            fail("assign() got the same column twice")
        hj = inp.hidden_join
        for name, value in self.columns:
            if name in inp.hidden:
                msg = f"assign() cannot overwrite hidden column {name!r}"
                raise PolicyViolation(msg, column=name)
            vs, vdt = operand_dtype(value, ctx.schema_of)
            if vs is not None:
                need(vs, ("series",), "assign", "value")
                same_origin(inp, vs, "assign")
                hj = hj or vs.hidden_join
            elif isinstance(value, Lit) and value.value is None:
                fail("assign() cannot assign None")
            names_now = [c for c, _ in cols]
            if name in names_now:
                cols[names_now.index(name)] = (name, vdt)
            else:
                cols.append((name, vdt))
        return replace_schema(inp, columns=tuple(cols), hidden_join=hj)

    def label(self) -> str:
        return f"assign({', '.join(n for n, _ in self.columns)})"


@op("rename")
@dataclass(frozen=True, slots=True, eq=False)
class Rename(Op):
    """Renamed columns."""

    input: Any = field(metadata=arg("node"))
    columns: Mapping[str, str] = field(metadata=arg("rename_map"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame",), "rename")
        mapping = self.columns
        for old in mapping:
            if old in inp.hidden:
                ref_col(inp, old, "rename")
        cols = [((mapping.get(c, c) if c is not None else c), d) for c, d in inp.columns]
        names = [c for c, _ in cols]
        if len(set(names)) != len(names):
            fail(f"rename() would produce duplicate column names {names}")
        return replace_schema(inp, columns=tuple(cols))

    def label(self) -> str:
        return f"rename({dict(self.columns)})"


@op("fillna")
@dataclass(frozen=True, slots=True, eq=False)
class FillNA(Op):
    """Missing values replaced by a scalar."""

    input: Any = field(metadata=arg("node"))
    value: Any = field(metadata=arg("literal"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame", "series"), "fillna")
        for c, d in inp.columns:
            if not literal_fits(self.value, d):
                fail(f"fillna({self.value!r}) does not fit column {c!r} of dtype {d}")
        return inp


@op("astype")
@dataclass(frozen=True, slots=True, eq=False)
class AsType(Op):
    """A dtype cast (one dtype, or column: dtype)."""

    input: Any = field(metadata=arg("node"))
    dtype: str | Mapping[str, str] = field(metadata=arg("dtype_spec"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame", "series"), "astype")
        spec = self.dtype
        if inp.kind == "series":
            if not isinstance(spec, str):
                fail("astype() of a series takes one dtype")
            return replace_schema(inp, columns=((inp.columns[0][0], spec),))
        if isinstance(spec, str):
            return replace_schema(inp, columns=tuple((c, spec) for c, _ in inp.columns))
        for c in spec:
            ref_col(inp, c, "astype")
        return replace_schema(inp, columns=tuple((c, spec.get(c, d) if c is not None else d) for c, d in inp.columns))


@op("sort_values")
@dataclass(frozen=True, slots=True, eq=False)
class SortValues(Op):
    """Rows sorted by columns."""

    input: Any = field(metadata=arg("node"))
    by: tuple[str, ...] = field(metadata=arg("strs"))
    ascending: tuple[bool, ...] = field(metadata=arg("bools"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame", "series"), "sort_values")
        by, asc = self.by, self.ascending
        if inp.kind == "series":
            if by or len(asc) != 1:
                fail("sort_values() of a series takes no 'by' and one 'ascending'")
        else:
            if not by or len(asc) != len(by):
                fail("sort_values() needs 'by' columns and one 'ascending' flag per column")
            for c in by:
                ref_col(inp, c, "sort_values")
        return inp

    def label(self) -> str:
        return f"sort_values({list(self.by)})"


@op("head")
@dataclass(frozen=True, slots=True, eq=False)
class Head(Op):
    """The first n rows."""

    input: Any = field(metadata=arg("node"))
    n: int = field(metadata=arg("int"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame", "series"), self.op)
        return inp

    def label(self) -> str:
        return f"{self.op}({self.n})"


@op("tail")
@dataclass(frozen=True, slots=True, eq=False)
class Tail(Op):
    """The last n rows."""

    input: Any = field(metadata=arg("node"))
    n: int = field(metadata=arg("int"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame", "series"), self.op)
        return inp

    def label(self) -> str:
        return f"{self.op}({self.n})"


@op("drop_duplicates")
@dataclass(frozen=True, slots=True, eq=False)
class DropDuplicates(Op):
    """Rows with duplicate values in ``subset`` removed."""

    input: Any = field(metadata=arg("node"))
    subset: tuple[str, ...] = field(metadata=arg("strs"))
    keep: str = field(metadata=arg("str", enum=_KEEP))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame", "series"), "drop_duplicates")
        if self.keep not in _KEEP:
            fail("drop_duplicates() keep must be 'first', 'last' or 'none'")
        if inp.kind == "series":
            if self.subset:
                fail("drop_duplicates() of a series takes no subset")
        else:
            if not self.subset:
                fail("drop_duplicates() needs an explicit subset")
            for c in self.subset:
                ref_col(inp, c, "drop_duplicates")
        return inp


@op("merge")
@dataclass(frozen=True, slots=True, eq=False)
class Merge(Op):
    """A database-style join of two frames."""

    left: Any = field(metadata=arg("node"))
    right: Any = field(metadata=arg("node"))
    how: str = field(metadata=arg("str", enum=frozenset({"inner", "left", "right", "outer"})))
    left_on: tuple[str, ...] = field(metadata=arg("strs"))
    right_on: tuple[str, ...] = field(metadata=arg("strs"))
    suffixes: tuple[str, str] = field(metadata=arg("suffixes"))

    def infer(self, ctx: InferCtx) -> Schema:
        left, right = ctx.schema_of(self.left), ctx.schema_of(self.right)
        need(left, ("frame",), "merge", "left")
        need(right, ("frame",), "merge", "right")
        if left.level != "rows" or right.level != "rows":
            fail("merge() of an aggregated result is not supported yet; merge first, then aggregate")
        lo, ro = self.left_on, self.right_on
        if not lo or len(lo) != len(ro):
            fail("merge() needs the same, non-zero number of left and right keys")
        for lk, rk in zip(lo, ro, strict=True):
            lk_dt, rk_dt = ref_col(left, lk, "merge", key=True), ref_col(right, rk, "merge", key=True)
            kl, kr = dtype_kind(lk_dt), dtype_kind(rk_dt)
            if not (kl == kr or {kl, kr} <= NUMERIC) or kl in ("other", "category"):
                fail(f"merge() keys {lk!r} ({lk_dt}) and {rk!r} ({rk_dt}) have incompatible dtypes")
        cols, hidden = merge_columns(left, right, lo, ro, how=self.how, suffixes=self.suffixes)
        hidden_key = any(k in left.hidden for k in lo) or any(k in right.hidden for k in ro)
        return Schema(
            "frame", tuple(cols), "rows", ctx.token, left.datasets | right.datasets, frozenset(hidden),
            left.hidden_join or right.hidden_join or hidden_key,
        )  # fmt: skip

    def label(self) -> str:
        right = self.right
        while not isinstance(right, Source) and isinstance(right, Op) and right.refs():
            right = right.refs()[0]
        return f"merge({right.label() if isinstance(right, Op) else right}, how={self.how!r}, on={list(self.left_on)})"


@op("set_name")
@dataclass(frozen=True, slots=True, eq=False)
class SetName(Op):
    """A series renamed."""

    input: Any = field(metadata=arg("node"))
    name: str = field(metadata=arg("str"))

    def infer(self, ctx: InferCtx) -> Schema:
        _, dt, _ = series_dtype(ctx.schema_of(self.input), "rename")
        return with_dtype(replace_schema(ctx.schema_of(self.input), columns=((self.name, dt),)), dt)


@op("to_frame")
@dataclass(frozen=True, slots=True, eq=False)
class ToFrame(Op):
    """A series as a one-column frame."""

    input: Any = field(metadata=arg("node"))
    name: str = field(metadata=arg("str"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        _, dt, _ = series_dtype(inp, "to_frame")
        return replace_schema(inp, kind="frame", columns=((self.name, dt),))


@op("slice")
@dataclass(frozen=True, slots=True, eq=False)
class Slice(Op):
    """Rows by position (``iloc``) or label (``loc``) slice."""

    input: Any = field(metadata=arg("node"))
    kind: str = field(metadata=arg("str", enum=frozenset({"iloc", "loc"})))
    bounds: tuple[Any, ...] = field(metadata=arg("literals"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame", "series"), self.kind)
        bounds = tuple(self.bounds)
        if len(bounds) != 3 or not all(b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in bounds):
            fail(f"{self.kind}[start:stop:step] takes integer (or empty) bounds")
        if bounds[2] == 0:
            fail("slice step cannot be zero")
        if self.kind == "loc" and inp.level != "rows":
            fail("loc[a:b] slices by row label; on an aggregate, collect it and slice locally")
        return inp


@op("sample")
@dataclass(frozen=True, slots=True, eq=False)
class Sample(Op):
    """A seeded random sample of rows (without replacement)."""

    input: Any = field(metadata=arg("node"))
    n: Any = field(metadata=arg("literal"))
    frac: Any = field(metadata=arg("literal"))
    seed: int = field(metadata=arg("int"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame", "series"), "sample")
        n, frac = self.n, self.frac
        if (n is None) == (frac is None):
            fail("sample() takes exactly one of n and frac")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            fail("sample() n must be a non-negative integer")
        if frac is not None and (not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 <= frac <= 1):
            fail("sample() frac must be within 0 .. 1 (sampling with replacement is not supported)")
        return inp


@op("reset_index")
@dataclass(frozen=True, slots=True, eq=False)
class ResetIndex(Op):
    """Rows renumbered 0..n-1."""

    input: Any = field(metadata=arg("node"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame", "series"), "reset_index")
        if inp.level != "rows":
            fail("reset_index() of an aggregate: use as_index=False in groupby(), or reset it locally after collect()")
        return replace_schema(inp, origin=ctx.token)


@op("concat")
@dataclass(frozen=True, slots=True, eq=False)
class Concat(Op):
    """The rows of one frame, then the rows of another (same columns)."""

    left: Any = field(metadata=arg("node"))
    right: Any = field(metadata=arg("node"))

    def infer(self, ctx: InferCtx) -> Schema:
        left, right = ctx.schema_of(self.left), ctx.schema_of(self.right)
        for s in (left, right):
            need(s, ("frame",), "concat")
            if s.level != "rows":
                fail("concat() of aggregates is not supported; concatenate the rows, then aggregate")
        if left.names != right.names:
            fail(f"concat() needs frames with the same columns in the same order, not {left.names} and {right.names}")
        cols = []
        for (c, ld), (_, rd) in zip(left.columns, right.columns, strict=True):
            if ld == rd:
                cols.append((c, ld))
            elif {dtype_kind(ld), dtype_kind(rd)} <= NUMERIC:
                cols.append((c, "float64"))
            else:
                cols.append((c, "object"))
        return Schema(
            "frame", tuple(cols), "rows", ctx.token, left.datasets | right.datasets, left.hidden | right.hidden,
            left.hidden_join or right.hidden_join,
        )  # fmt: skip


@op("top")
@dataclass(frozen=True, slots=True, eq=False)
class Top(Op):
    """``nlargest``/``nsmallest``: the n rows with the largest or smallest values."""

    input: Any = field(metadata=arg("node"))
    n: int = field(metadata=arg("int"))
    columns: tuple[str, ...] = field(metadata=arg("strs"))
    largest: bool = field(metadata=arg("bool"))
    keep: str = field(metadata=arg("str", enum=frozenset({"first", "last", "all"})))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        what = "nlargest" if self.largest else "nsmallest"
        need(inp, ("frame", "series"), what)
        if inp.kind == "series":
            if self.columns:
                fail(f"{what}() of a series takes no columns")
            targets = [inp.columns[0][1]]
        else:
            if not self.columns:
                fail(f"{what}() of a frame needs columns")
            targets = [ref_col(inp, c, what) for c in self.columns]
        if not all(dtype_kind(d) in ("int", "float", "datetime") for d in targets):
            fail(f"{what}() needs numeric or datetime columns")
        return inp


@op("melt")
@dataclass(frozen=True, slots=True, eq=False)
class Melt(Op):
    """Wide to long: one row per (input row, value column)."""

    input: Any = field(metadata=arg("node"))
    id_vars: tuple[str, ...] = field(metadata=arg("strs"))
    value_vars: tuple[str, ...] = field(metadata=arg("strs"))
    var_name: str = field(metadata=arg("str"))
    value_name: str = field(metadata=arg("str"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame",), "melt")
        if inp.level != "rows":
            fail("melt() of an aggregate is not supported; collect the aggregate and melt it locally")
        ids, values = list(self.id_vars), list(self.value_vars)
        if not values or set(ids) & set(values):
            fail("melt() needs value_vars, none of them also in id_vars")
        id_cols: list[ColumnType] = [(c, ref_col(inp, c, "melt")) for c in ids]
        dts = {ref_col(inp, c, "melt") for c in values}
        kinds = {dtype_kind(d) for d in dts}
        value_dt = dts.pop() if len(dts) == 1 else "float64" if kinds <= NUMERIC else "object"
        names = [*ids, self.var_name, self.value_name]
        if len(set(names)) != len(names):
            fail(f"melt() would produce duplicate column names {names}")
        cols = (*id_cols, (self.var_name, "str"), (self.value_name, value_dt))
        return Schema("frame", cols, "rows", ctx.token, inp.datasets, frozenset(), inp.hidden_join)
