"""Ops that aggregate: grouped aggregation, value counts, describe, reductions, correlation, row counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesatee_notebook.wire.ops._base import InferCtx, Op, arg, op
from mesatee_notebook.wire.schema import (
    FRAME_REDUCE_FUNCS,
    NUMERIC,
    REDUCE_FUNCS,
    Column,
    Schema,
    agg_dtype,
    dtype_kind,
    fail,
    need,
    ref_col,
    same_origin,
)

DESCRIBE_STATS = ("count", "mean", "std", "min", "25%", "50%", "75%", "max")


@op("groupby_agg")
@dataclass(frozen=True, slots=True, eq=False)
class GroupByAgg(Op):
    """Grouped aggregation: one row per group, one column per (output, column, func)."""

    input: Any = field(metadata=arg("node"))
    by: tuple[str, ...] = field(metadata=arg("strs"))
    aggs: tuple[tuple[str, str, str], ...] = field(metadata=arg("aggs"))
    as_index: bool = field(metadata=arg("bool"))
    dropna: bool = field(metadata=arg("bool"))
    sort: bool = field(metadata=arg("bool"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame",), "groupby")
        by = self.by
        if not by or len(set(by)) != len(by):
            fail("groupby() needs a non-empty list of distinct key columns")
        keys = tuple((k, ref_col(inp, k, "groupby")) for k in by)
        outs: list[Column] = []
        for out, col, func in self.aggs:
            dt = ref_col(inp, col, "agg")
            outs.append((out, agg_dtype(func, dt, col)))
        names = [n for n, _ in outs] + ([] if self.as_index else list(by))
        if len(set(names)) != len(names):
            fail(f"agg() output names collide: {names}")
        cols = tuple(outs) if self.as_index else keys + tuple(outs)
        index = tuple(by) if self.as_index else ()
        return Schema("frame", cols, "groups", ctx.token, inp.datasets, frozenset(), inp.hidden_join, index)

    def label(self) -> str:
        return f"groupby({list(self.by)}).agg({', '.join(f'{o}={f}({c})' for o, c, f in self.aggs)})"


@op("value_counts")
@dataclass(frozen=True, slots=True, eq=False)
class ValueCounts(Op):
    """Counts of distinct values (rows) of a series or of a frame's subset."""

    input: Any = field(metadata=arg("node"))
    subset: tuple[str, ...] = field(metadata=arg("strs"))
    normalize: bool = field(metadata=arg("bool"))
    sort: bool = field(metadata=arg("bool"))
    ascending: bool = field(metadata=arg("bool"))
    dropna: bool = field(metadata=arg("bool"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame", "series"), "value_counts")
        subset = self.subset
        if inp.kind == "frame":
            if not subset or len(set(subset)) != len(subset):
                fail("value_counts() of a frame needs an explicit subset of distinct columns")
            for c in subset:
                ref_col(inp, c, "value_counts")
            index: tuple[str | None, ...] = tuple(subset)
        else:
            if subset:
                fail("value_counts() of a series takes no subset")
            index = (inp.columns[0][0],)
        col: Column = ("proportion", "float64") if self.normalize else ("count", "int64")
        return Schema("series", (col,), "groups", ctx.token, inp.datasets, frozenset(), inp.hidden_join, index)


@op("describe")
@dataclass(frozen=True, slots=True, eq=False)
class Describe(Op):
    """Summary statistics of numeric columns."""

    input: Any = field(metadata=arg("node"))
    columns: tuple[str, ...] = field(metadata=arg("strs"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame", "series"), "describe")
        if inp.kind == "series":
            if self.columns:
                fail("describe() of a series takes no columns")
            targets: list[Column] = list(inp.columns)
        else:
            if not self.columns:
                fail("describe() needs at least one numeric column")
            targets = [(c, ref_col(inp, c, "describe")) for c in self.columns]
        for c, d in targets:
            if dtype_kind(d) not in NUMERIC:
                fail(f"describe() supports numeric columns only; {c!r} is {d}")
        return Schema(
            inp.kind, tuple((c, "float64") for c, _ in targets), "summary", ctx.token, inp.datasets,
            frozenset(), inp.hidden_join, DESCRIBE_STATS,
        )  # fmt: skip


@op("reduce")
@dataclass(frozen=True, slots=True, eq=False)
class Reduce(Op):
    """A scalar reduction of a series."""

    input: Any = field(metadata=arg("node"))
    func: str = field(metadata=arg("str", enum=REDUCE_FUNCS))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("series",), self.func)
        dt = agg_dtype(self.func, inp.columns[0][1], str(inp.columns[0][0]))
        return Schema("scalar", ((None, dt),), "scalar", ctx.token, inp.datasets, frozenset(), inp.hidden_join)

    def label(self) -> str:
        return f"{self.func}()"


@op("corr")
@dataclass(frozen=True, slots=True, eq=False)
class Corr(Op):
    """Correlation (or covariance) of two series."""

    left: Any = field(metadata=arg("node"))
    right: Any = field(metadata=arg("node"))
    method: str = field(metadata=arg("str", enum=frozenset({"pearson", "spearman", "cov"})))

    def infer(self, ctx: InferCtx) -> Schema:
        left, right = ctx.schema_of(self.left), ctx.schema_of(self.right)
        for s in (left, right):
            need(s, ("series",), "corr")
            if dtype_kind(s.columns[0][1]) not in NUMERIC:
                fail(f"corr() needs numeric series, not {s.columns[0][1]}")
        same_origin(left, right, "corr")
        hj = left.hidden_join or right.hidden_join
        return Schema("scalar", ((None, "float64"),), "scalar", ctx.token, left.datasets, frozenset(), hj)


@op("count_rows")
@dataclass(frozen=True, slots=True, eq=False)
class CountRows(Op):
    """The number of rows (``len``)."""

    input: Any = field(metadata=arg("node"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame", "series"), "len")
        return Schema("scalar", ((None, "int64"),), "scalar", ctx.token, inp.datasets, frozenset(), inp.hidden_join)


@op("frame_reduce")
@dataclass(frozen=True, slots=True, eq=False)
class FrameReduce(Op):
    """A reduction of every column of a frame: a series indexed by column name."""

    input: Any = field(metadata=arg("node"))
    func: str = field(metadata=arg("str", enum=FRAME_REDUCE_FUNCS))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        func = self.func
        need(inp, ("frame",), func)
        if not inp.columns:
            fail(f"{func}() of a frame needs at least one column")
        dts = set()
        for c, d in inp.columns:
            if c in inp.hidden:
                ref_col(inp, str(c), func)
            dts.add(agg_dtype(func, d, str(c)))
        out = dts.pop() if len(dts) == 1 else "float64" if dts <= {"int64", "float64"} else "object"
        return Schema(
            "series", ((None, out),), "summary", ctx.token, inp.datasets, frozenset(), inp.hidden_join,
            tuple(inp.names),
        )  # fmt: skip
