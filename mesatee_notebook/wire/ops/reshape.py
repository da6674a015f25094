"""Ops added for issue 16's second round: sorting by the row labels, windows per group, correlation matrices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesatee_notebook.wire.ops._base import InferCtx, Op, arg, op
from mesatee_notebook.wire.ops.values import window_schema
from mesatee_notebook.wire.schema import (
    Schema,
    dtype_kind,
    fail,
    need,
    ref_col,
)

#: Window functions that exist per group (``groupby().cumsum()`` ...): the ``window`` functions pandas'
#: GroupBy has, with the same arguments.
GROUP_WINDOW_FUNCS = frozenset(
    {"cumsum", "cumprod", "cummax", "cummin", "shift", "diff", "rank", "ffill", "bfill", "pct_change"}
)


@op("sort_index")
@dataclass(frozen=True, slots=True, eq=False)
class SortIndex(Op):
    """Rows back in the order of their labels (for remote rows: their storage positions)."""

    input: Any = field(metadata=arg("node"))
    ascending: bool = field(metadata=arg("bool"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame", "series"), "sort_index")
        if inp.level != "rows":
            fail("sort_index() of an aggregate is not supported; aggregates are sorted by key already (sort=True)")
        return inp


@op("group_window")
@dataclass(frozen=True, slots=True, eq=False)
class GroupWindow(Op):
    """A window function of ``column`` within each group (``groupby(by)[column].cumsum()`` ...): row-revealing."""

    input: Any = field(metadata=arg("node"))
    by: tuple[str, ...] = field(metadata=arg("strs"))
    column: str = field(metadata=arg("str"))
    func: str = field(metadata=arg("str", enum=GROUP_WINDOW_FUNCS))
    args_: tuple[Any, ...] = field(metadata=arg("literals", wire="args"))
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
        if self.column in self.by:
            fail(f"groupby().{self.func}() of the group key {self.column!r}")
        dt = ref_col(inp, self.column, self.func)
        series = Schema(
            "series", ((self.column, dt),), "rows", inp.origin, inp.datasets, frozenset(), inp.hidden_join, inp.index
        )
        return window_schema(self.func, tuple(self.args_), series)

    def label(self) -> str:
        return f"groupby({list(self.by)})[{self.column!r}].{self.func}()"


@op("corr_matrix")
@dataclass(frozen=True, slots=True, eq=False)
class CorrMatrix(Op):
    """Pairwise correlation (or covariance) of a frame's columns: a square frame indexed by column name."""

    input: Any = field(metadata=arg("node"))
    method: str = field(metadata=arg("str", enum=frozenset({"pearson", "spearman", "cov"})))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        what = "cov" if self.method == "cov" else "corr"
        need(inp, ("frame",), what)
        if inp.level != "rows":
            fail(f"{what}() of an aggregate is not supported; collect it and compute it locally")
        if not inp.columns:
            fail(f"{what}() needs at least one column")
        for c, d in inp.columns:
            if c in inp.hidden:
                ref_col(inp, str(c), what)
            if dtype_kind(d) not in ("int", "float", "bool"):
                fail(f"{what}() needs numeric columns; {c!r} is {d} (pass numeric_only=True)")
        cols = tuple((c, "float64") for c, _ in inp.columns)
        return Schema("frame", cols, "summary", ctx.token, inp.datasets, frozenset(), inp.hidden_join, inp.names)


@op("mode_frame")
@dataclass(frozen=True, slots=True, eq=False)
class ModeFrame(Op):
    """``DataFrame.mode()``: the most common value(s) of each column, padded with missing values (row-revealing)."""

    input: Any = field(metadata=arg("node"))
    dropna: bool = field(metadata=arg("bool"))

    def infer(self, ctx: InferCtx) -> Schema:
        inp = ctx.schema_of(self.input)
        need(inp, ("frame",), "mode")
        if inp.level != "rows":
            fail("mode() of an aggregate is not supported; collect the aggregate and apply it locally")
        for c, _ in inp.columns:
            if c in inp.hidden:
                ref_col(inp, str(c), "mode")
        return Schema("frame", inp.columns, "rows", ctx.token, inp.datasets, frozenset(), inp.hidden_join)
