"""The client side of the DataFrame proxy: typed op nodes and lazy wrappers.

Nodes are immutable, typed and know their :class:`~mesatee_notebook.wire.plan.Schema`
when they are built (the same rules the enclave applies), so a wrong column or a
type error surfaces at once. Users hold thin wrappers (``SecureDataFrame``,
``SecureSeries``, ``SecureScalar``, ``SecureGroupBy``); every method returns a
new wrapper around a new node. Nothing runs until ``collect()`` (or ``len``,
``float``, ``int``), which sends the plan as JSON to a :class:`FrameBackend`.
``bool()`` and iteration raise, so nothing is evaluated by accident.
"""

from __future__ import annotations

import builtins
import html
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, Protocol, TypeAlias, cast, runtime_checkable

import numpy as np
import pandas as pd

from mesatee_notebook.errors import FrameNotSupported, FrameUsageError
from mesatee_notebook.remote._public import public_methods
from mesatee_notebook.wire.plan import (
    AGG_FUNCS,
    OPS,
    Lit,
    PlanNode,
    Ref,
    Schema,
    SourceInfo,
    dtype_kind,
    encode_literal,
    infer_node,
    plain_literal,
    plan_to_obj,
    source_columns,
)

__all__ = [
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


@runtime_checkable
class FrameBackend(Protocol):
    """Evaluates plans in the enclave; the session provides it."""

    def collect(self, plan_json: str, **options: Any) -> tuple[Any, Any]:
        """Evaluate a plan; return ``(value, receipt)``. The value is a DataFrame, Series or scalar.

        ``options`` (only when the caller gives them): ``epsilon``/``delta`` for DP-mode datasets.
        A DP release comes back as a :class:`DPResult`.
        """
        ...


# ---------------------------------------------------------------------------
# Differentially private releases


def _fmt_eps(x: Any) -> str:
    return "∞" if x is None or x == float("inf") else f"{float(x):.4g}"


@dataclass(frozen=True, slots=True)
class PrivacyBudget:
    """What this party has spent of one DP dataset's budget, and what is left (from a signed receipt)."""

    dataset: str
    epsilon_spent: float
    epsilon_total: float
    epsilon_remaining: float
    delta_spent: float
    delta_total: float
    delta_remaining: float
    queries: int
    all_analysts: Mapping[str, Any] | None = None
    owner_exempt: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyBudget:
        """Build from the ``privacy_budget`` record of a receipt's info."""
        return cls(
            str(data["dataset"]), float(data["epsilon_spent"]), float(data["epsilon_total"]),
            float(data["epsilon_remaining"]), float(data["delta_spent"]), float(data["delta_total"]),
            float(data["delta_remaining"]), int(data["queries"]), data.get("all_analysts"),
            bool(data.get("owner_exempt", False)),
        )  # fmt: skip

    def __repr__(self) -> str:
        line = (
            f"<PrivacyBudget {self.dataset!r}: epsilon spent {_fmt_eps(self.epsilon_spent)} of "
            f"{_fmt_eps(self.epsilon_total)}, {_fmt_eps(self.epsilon_remaining)} left; delta spent "
            f"{self.delta_spent:.3g} of {self.delta_total:.3g}; {self.queries} queries"
        )
        if self.all_analysts:
            line += (
                f"; all analysts: epsilon {_fmt_eps(self.all_analysts.get('epsilon_spent'))} of "
                f"{_fmt_eps(self.all_analysts.get('epsilon_total'))}"
            )
        return line + (" (you own it: your own queries are exact and free)" if self.owner_exempt else "") + ">"

    def _repr_html_(self) -> str:
        return budget_meter_html(self)


def budget_meter_html(budget: PrivacyBudget) -> str:
    """A small spent/remaining meter for one dataset (used by DP results and the party view)."""
    esc = html.escape
    total = budget.epsilon_total
    frac = 0.0 if total <= 0 else min(max(budget.epsilon_spent / total, 0.0), 1.0)
    color = "#2e7d32" if frac < 0.7 else "#f9a825" if frac < 0.9 else "#c62828"
    cap = ""
    if budget.all_analysts:
        cap = (
            f"<div>all analysts: epsilon {_fmt_eps(budget.all_analysts.get('epsilon_spent'))} of the owner's cap "
            f"{_fmt_eps(budget.all_analysts.get('epsilon_total'))}</div>"
        )
    return (
        f"<div class='mesatee-budget'><b>privacy budget</b> <code>{esc(budget.dataset)}</code>: epsilon "
        f"{_fmt_eps(budget.epsilon_spent)} spent, <b>{_fmt_eps(budget.epsilon_remaining)} left</b> of "
        f"{_fmt_eps(total)} (delta {budget.delta_spent:.3g} of {budget.delta_total:.3g}; {budget.queries} queries)"
        f"<div style='width:240px;height:10px;border:1px solid #999;background:#eee'>"
        f"<div style='width:{frac * 100:.1f}%;height:100%;background:{color}'></div></div>{cap}</div>"
    )


def budget_meters_html(budgets: Sequence[PrivacyBudget]) -> str:
    """One meter per DP dataset (for a party view such as the attestation card's)."""
    if not budgets:
        return "<div class='mesatee-budgets'><i>no DP-mode datasets</i></div>"
    return "<div class='mesatee-budgets'>" + "".join(budget_meter_html(b) for b in budgets) + "</div>"


class DPResult:
    """A differentially private release: the noisy ``value``, its 95% ``accuracy``, how it was made.

    ``value`` is a DataFrame, Series or number; ``accuracy`` has the same shape: with 95%
    probability the released value is within ``accuracy`` of the true (clamped) statistic
    (for quantiles the accuracy is a rank error in rows, see ``mechanisms``). ``meta`` is the
    signed record from the receipt: dataset, epsilon/delta spent, mechanisms, the budget left.
    Post-processing the value locally is free: it costs no budget.
    """

    __slots__ = ("accuracy", "meta", "receipt", "value")

    def __init__(self, value: Any, accuracy: Any, meta: Mapping[str, Any], receipt: Any = None) -> None:
        self.value = value
        self.accuracy = accuracy
        self.meta = dict(meta)
        self.receipt = receipt

    @property
    def epsilon(self) -> float:
        """Epsilon this release spent."""
        return float(self.meta["epsilon"])

    @property
    def delta(self) -> float:
        """Delta this release spent (partition selection only)."""
        return float(self.meta["delta"])

    @property
    def mechanisms(self) -> dict[str, Any]:
        """Per released column: mechanism, epsilon, delta, scale, clamping bounds, accuracy unit."""
        return dict(self.meta.get("columns") or {})

    @property
    def budget(self) -> PrivacyBudget:
        """The budget left after this release."""
        return PrivacyBudget.from_dict(self.meta["budget"])

    def interval(self) -> tuple[Any, Any]:
        """``(value - accuracy, value + accuracy)``: a 95% interval for each value-unit statistic."""
        return self.value - self.accuracy, self.value + self.accuracy

    def to_pandas(self) -> Any:
        """Return the noisy value."""
        return self.value

    def __float__(self) -> float:
        return float(self.value)

    def __int__(self) -> int:
        return round(float(self.value))

    def __repr__(self) -> str:
        head = f"<DPResult: epsilon {_fmt_eps(self.epsilon)}, delta {self.delta:.3g} on {self.meta.get('dataset')!r}>"
        if isinstance(self.value, (pd.DataFrame, pd.Series)):
            body = f"{self.value!r}\n95% accuracy (±):\n{self.accuracy!r}"
        else:
            body = f"{self.value!r} ± {self.accuracy:.4g} (95%)"
        return f"{head}\n{body}\n{self.budget!r}"

    def _repr_html_(self) -> str:
        esc = html.escape
        if isinstance(self.value, (pd.DataFrame, pd.Series)):
            table = self.value.to_frame().to_html() if isinstance(self.value, pd.Series) else self.value.to_html()
            acc = self.accuracy
            acc_table = acc.to_frame().to_html() if isinstance(acc, pd.Series) else acc.to_html()
            body = f"{table}<details><summary>95% accuracy (±)</summary>{acc_table}</details>"
        else:
            body = f"<div><code>{esc(repr(self.value))}</code> ± {float(self.accuracy):.4g} (95%)</div>"
        mech = "".join(
            f"<li><code>{esc(str(col))}</code>: {esc(str(m.get('mechanism')))}, epsilon {_fmt_eps(m.get('epsilon'))}"
            f"{', accuracy in ranks (rows)' if m.get('accuracy_unit') == 'rank' else ''}</li>"
            for col, m in self.mechanisms.items()
        )
        sel = self.meta.get("selection")
        if sel:
            mech += (
                f"<li>group keys: {esc(str(sel.get('mechanism')))}, epsilon {_fmt_eps(sel.get('epsilon'))}, "
                f"delta {float(sel.get('delta', 0)):.3g}, threshold {esc(str(sel.get('threshold')))}</li>"
            )
        return (
            f"<div class='mesatee-dp'><b>DP release</b> <i>(noisy; epsilon {_fmt_eps(self.epsilon)}, delta "
            f"{self.delta:.3g})</i>{body}<ul>{mech}</ul>{budget_meter_html(self.budget)}</div>"
        )


# ---------------------------------------------------------------------------
# Nodes


def _schema_of(target: Any) -> Schema:
    schema: Schema = target.schema
    return schema


class Node:
    """Base of the typed op nodes; field names match the plan op's arguments."""

    __slots__ = ()
    op: ClassVar[str]
    schema: Schema

    def __post_init__(self) -> None:
        source: SourceInfo | None = getattr(self, "info", None)

        def source_of(name: str) -> SourceInfo:
            assert source is not None and source.name == name
            return source

        object.__setattr__(self, "schema", infer_node(self.op, self.plan_args(), _schema_of, self, source_of=source_of))

    def plan_args(self) -> dict[str, Any]:
        """Return the node's arguments in plan form, child nodes wrapped in :class:`Ref`."""
        out: dict[str, Any] = {}
        for name, kind in OPS[self.op].items():
            value = getattr(self, name)
            if kind == "node":
                value = Ref(value)
            elif kind == "operand":
                value = Ref(value) if isinstance(value, Node) else value
            elif kind == "assigns":
                value = tuple((n, Ref(v) if isinstance(v, Node) else v) for n, v in value)
            out[name] = value
        return out

    def children(self) -> list[Node]:
        """Return the nodes this node reads."""
        return [r.target for r in _refs(self.plan_args())]


def _refs(args: Mapping[str, Any]) -> list[Ref]:
    out: list[Ref] = []
    for value in args.values():
        if isinstance(value, Ref):
            out.append(value)
        elif isinstance(value, tuple):
            out.extend(v[1] for v in value if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], Ref))
    return out


Operand: TypeAlias = "Node | Lit"


@dataclass(frozen=True, slots=True, eq=False)
class Source(Node):
    """A stored dataset."""

    op: ClassVar[str] = "source"
    name: str
    info: SourceInfo = field(repr=False)
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Select(Node):
    """Column subset of a frame."""

    op: ClassVar[str] = "select"
    input: Node
    columns: tuple[str, ...]
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Column(Node):
    """One column of a frame, as a series."""

    op: ClassVar[str] = "column"
    input: Node
    name: str
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Filter(Node):
    """Rows where a boolean series is true."""

    op: ClassVar[str] = "filter"
    input: Node
    predicate: Node
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Assign(Node):
    """New or replaced columns."""

    op: ClassVar[str] = "assign"
    input: Node
    columns: tuple[tuple[str, Operand], ...]
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Rename(Node):
    """Renamed columns."""

    op: ClassVar[str] = "rename"
    input: Node
    columns: Mapping[str, str]
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class FillNA(Node):
    """Missing values replaced by a scalar."""

    op: ClassVar[str] = "fillna"
    input: Node
    value: Any
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class AsType(Node):
    """A dtype cast (one dtype, or column: dtype)."""

    op: ClassVar[str] = "astype"
    input: Node
    dtype: str | Mapping[str, str]
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class SortValues(Node):
    """Rows sorted by columns."""

    op: ClassVar[str] = "sort_values"
    input: Node
    by: tuple[str, ...]
    ascending: tuple[bool, ...]
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Head(Node):
    """The first n rows."""

    op: ClassVar[str] = "head"
    input: Node
    n: int
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Tail(Node):
    """The last n rows."""

    op: ClassVar[str] = "tail"
    input: Node
    n: int
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class DropDuplicates(Node):
    """Rows with duplicate values in ``subset`` removed."""

    op: ClassVar[str] = "drop_duplicates"
    input: Node
    subset: tuple[str, ...]
    keep: str
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Merge(Node):
    """A database-style join of two frames."""

    op: ClassVar[str] = "merge"
    left: Node
    right: Node
    how: str
    left_on: tuple[str, ...]
    right_on: tuple[str, ...]
    suffixes: tuple[str, str]
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class GroupByAgg(Node):
    """Grouped aggregation: one row per group, one column per (output, column, func)."""

    op: ClassVar[str] = "groupby_agg"
    input: Node
    by: tuple[str, ...]
    aggs: tuple[tuple[str, str, str], ...]
    as_index: bool
    dropna: bool
    sort: bool
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class ValueCounts(Node):
    """Counts of distinct values (rows) of a series or of a frame's subset."""

    op: ClassVar[str] = "value_counts"
    input: Node
    subset: tuple[str, ...]
    normalize: bool
    sort: bool
    ascending: bool
    dropna: bool
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Describe(Node):
    """Summary statistics of numeric columns."""

    op: ClassVar[str] = "describe"
    input: Node
    columns: tuple[str, ...]
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Binary(Node):
    """An elementwise arithmetic, comparison or logical op."""

    op: ClassVar[str] = "binary"
    bop: str
    left: Operand
    right: Operand
    schema: Schema = field(init=False, repr=False)

    def plan_args(self) -> dict[str, Any]:
        """Return the plan arguments (the ``op`` argument is stored as ``bop``)."""
        return {
            "op": self.bop,
            "left": Ref(self.left) if isinstance(self.left, Node) else self.left,
            "right": Ref(self.right) if isinstance(self.right, Node) else self.right,
        }


@dataclass(frozen=True, slots=True, eq=False)
class Unary(Node):
    """Negation, logical not or absolute value."""

    op: ClassVar[str] = "unary"
    uop: str
    input: Node
    schema: Schema = field(init=False, repr=False)

    def plan_args(self) -> dict[str, Any]:
        """Return the plan arguments (the ``op`` argument is stored as ``uop``)."""
        return {"op": self.uop, "input": Ref(self.input)}


@dataclass(frozen=True, slots=True, eq=False)
class IsIn(Node):
    """Whether each value is in a list of literals."""

    op: ClassVar[str] = "isin"
    input: Node
    values: tuple[Any, ...]
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Reduce(Node):
    """A scalar reduction of a series."""

    op: ClassVar[str] = "reduce"
    input: Node
    func: str
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Corr(Node):
    """Correlation of two series."""

    op: ClassVar[str] = "corr"
    left: Node
    right: Node
    method: str
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class CountRows(Node):
    """The number of rows (``len``)."""

    op: ClassVar[str] = "count_rows"
    input: Node
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Map(Node):
    """An elementwise function of a series (isna, .str.*, .dt.*, clip, round, map/replace with a dict, cut)."""

    op: ClassVar[str] = "map"
    input: Node
    func: str
    args: tuple[Any, ...]
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Window(Node):
    """A function that mixes values across rows (cumsum, shift, diff, rank, ffill, duplicated ...)."""

    op: ClassVar[str] = "window"
    input: Node
    func: str
    args: tuple[Any, ...]
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Where(Node):
    """``where`` (keep values where ``cond``) or ``mask`` (replace them there)."""

    op: ClassVar[str] = "where"
    input: Node
    cond: Node
    other: Operand
    keep: bool
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Distinct(Node):
    """The distinct values (``unique``) or the most common ones (``mode``)."""

    op: ClassVar[str] = "distinct"
    input: Node
    func: str
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class SetName(Node):
    """A series renamed."""

    op: ClassVar[str] = "set_name"
    input: Node
    name: str
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class ToFrame(Node):
    """A series as a one-column frame."""

    op: ClassVar[str] = "to_frame"
    input: Node
    name: str
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Slice(Node):
    """Rows by position (``iloc``) or label (``loc``) slice."""

    op: ClassVar[str] = "slice"
    input: Node
    kind: str
    bounds: tuple[Any, ...]
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Sample(Node):
    """A seeded random sample of rows (without replacement)."""

    op: ClassVar[str] = "sample"
    input: Node
    n: Any
    frac: Any
    seed: int
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class ResetIndex(Node):
    """Rows renumbered 0..n-1."""

    op: ClassVar[str] = "reset_index"
    input: Node
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Concat(Node):
    """The rows of one frame, then the rows of another (same columns)."""

    op: ClassVar[str] = "concat"
    left: Node
    right: Node
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class FrameReduce(Node):
    """A reduction of every column of a frame: a series indexed by column name."""

    op: ClassVar[str] = "frame_reduce"
    input: Node
    func: str
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Top(Node):
    """``nlargest``/``nsmallest``: the n rows with the largest or smallest values."""

    op: ClassVar[str] = "top"
    input: Node
    n: int
    columns: tuple[str, ...]
    largest: bool
    keep: str
    schema: Schema = field(init=False, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class Melt(Node):
    """Wide to long: one row per (input row, value column)."""

    op: ClassVar[str] = "melt"
    input: Node
    id_vars: tuple[str, ...]
    value_vars: tuple[str, ...]
    var_name: str
    value_name: str
    schema: Schema = field(init=False, repr=False)


def _postorder(root: Node) -> list[Node]:
    order: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in reversed(node.children()) if id(c) not in seen)
    return order


def plan_json(root: Node) -> str:
    """Serialise the graph under ``root`` as canonical plan JSON (shared nodes once)."""
    order = _postorder(root)
    ids = {id(n): f"n{i}" for i, n in enumerate(order)}
    nodes = {n: PlanNode(n.op, n.plan_args()) for n in order}
    obj = plan_to_obj(root, nodes, lambda n: ids[id(n)])
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _label(node: Node) -> str:
    if isinstance(node, Source):
        return f"source({node.name!r})"
    if isinstance(node, Select):
        return f"select({list(node.columns)})"
    if isinstance(node, Column):
        return f"[{node.name!r}]"
    if isinstance(node, Assign):
        return f"assign({', '.join(n for n, _ in node.columns)})"
    if isinstance(node, Rename):
        return f"rename({dict(node.columns)})"
    if isinstance(node, GroupByAgg):
        return f"groupby({list(node.by)}).agg({', '.join(f'{o}={f}({c})' for o, c, f in node.aggs)})"
    if isinstance(node, Merge):
        return f"merge({_label(_chain(node.right)[0])}, how={node.how!r}, on={list(node.left_on)})"
    if isinstance(node, (Head, Tail)):
        return f"{node.op}({node.n})"
    if isinstance(node, SortValues):
        return f"sort_values({list(node.by)})"
    if isinstance(node, Binary):
        return f"binary({node.bop})"
    if isinstance(node, Reduce):
        return f"{node.func}()"
    return node.op


def _chain(node: Node) -> list[Node]:
    """Return the main-input chain from the source up to ``node``."""
    chain = [node]
    while True:
        cur = chain[-1]
        nxt = getattr(cur, "input", None) or getattr(cur, "left", None)
        if not isinstance(nxt, Node):
            break
        chain.append(nxt)
    return chain[::-1]


# ---------------------------------------------------------------------------
# Wrappers


def _lit_or_node(value: Any) -> Operand:
    if isinstance(value, SecureSeries):
        return value._node
    if isinstance(value, (_Lazy, pd.Series, pd.DataFrame)):
        msg = f"cannot combine a {type(value).__name__} with a remote series; upload it or use a scalar"
        raise FrameUsageError(msg)
    value = plain_literal(value)
    encode_literal(value)
    return Lit(value)


def _restore_missing(value: Any, schema: Schema) -> Any:
    """Give back pandas' NaN in object columns that Arrow carried as nulls (they decode as ``None``).

    A bool column widened by an unmatched merge row is ``object`` holding ``True``/``False``/``NaN``
    in pandas; Arrow sends it as a nullable bool, which decodes with ``None``.
    """
    if isinstance(value, pd.DataFrame):
        objs = [c for c, d in schema.columns if d == "object" and c in value.columns and value[c].dtype == object]
        if objs:
            value = value.copy()
            for c in objs:
                value[c] = value[c].where(value[c].notna(), np.nan)
    elif isinstance(value, pd.Series) and schema.kind == "series" and schema.columns[0][1] == "object" == value.dtype:
        value = value.where(value.notna(), np.nan)
    return value


@public_methods
class _Lazy:
    """Behaviour shared by every lazy remote value."""

    __slots__ = ("_ctx", "_node")
    _what: ClassVar[str] = "value"
    _node: Node
    _ctx: FrameBackend | None

    def __init__(self, node: Node, ctx: FrameBackend | None) -> None:
        self._node = node
        self._ctx = ctx

    @property
    def schema(self) -> Schema:
        """The value's schema (known without a round trip)."""
        return self._node.schema

    def plan_json(self) -> str:
        """Return the plan that ``collect()`` sends, as canonical JSON."""
        return plan_json(self._node)

    def collect_with_receipt(self, *, epsilon: float | None = None, delta: float | None = None) -> tuple[Any, Any]:
        """Evaluate in the enclave; return ``(value, receipt)``. Raises ``PolicyViolation`` if refused.

        ``epsilon``/``delta``: the budget this query spends on a DP-mode dataset (default: its policy's).
        """
        if self._ctx is None:
            msg = f"this {self._what} is not bound to a session; build it from a session's dataframe()"
            raise FrameUsageError(msg)
        options = {k: float(v) for k, v in (("epsilon", epsilon), ("delta", delta)) if v is not None}
        value, receipt = self._ctx.collect(self.plan_json(), **options)
        return _restore_missing(value, self.schema), receipt

    def collect(self, *, epsilon: float | None = None, delta: float | None = None) -> Any:
        """Evaluate in the enclave and return the released value (a :class:`DPResult` on a DP dataset)."""
        return self.collect_with_receipt(epsilon=epsilon, delta=delta)[0]

    def privacy_budget(self) -> PrivacyBudget:
        """Return this party's spent and remaining DP budget on the (one) DP dataset this value reads."""
        get = getattr(self._ctx, "privacy_budget", None)
        if get is None:
            msg = f"this {self._what} is not bound to a session; build it from a session's dataframe()"
            raise FrameUsageError(msg)
        found = []
        for name in sorted(self.schema.datasets):
            budget = get(name)
            if budget is not None:
                found.append(PrivacyBudget.from_dict(budget))
        if len(found) != 1:
            names = ", ".join(sorted(self.schema.datasets))
            msg = f"{'none' if not found else 'more than one'} of the datasets read here ({names}) is in DP mode"
            raise FrameUsageError(msg)
        return found[0]

    def _trap(self, what: str) -> FrameUsageError:
        msg = (
            f"{what} of a remote {self._what} would need its data; the expression is lazy and evaluated in the "
            "enclave only on .collect() (use len(...) for a policy-checked count)"
        )
        return FrameUsageError(msg)

    def __bool__(self) -> bool:
        what = "the truth value"
        raise self._trap(what)

    def __iter__(self) -> Iterator[Any]:
        what = "iterating"
        raise self._trap(what)

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        what = "converting to an array"
        raise self._trap(what)

    def __setitem__(self, key: Any, value: Any) -> None:
        msg = f"a remote {self._what} is immutable; use .assign(...) to get a new one"
        raise FrameUsageError(msg)

    def __len__(self) -> int:
        """Policy-checked row count, evaluated in the enclave."""
        value = _Lazy(CountRows(self._node), self._ctx).collect()
        return int(value)

    def __reduce__(self) -> NoReturn:
        msg = f"a remote {self._what} cannot be pickled; send its plan_json() instead"
        raise FrameUsageError(msg)

    def explain(self) -> str:
        """Return the op chain from the source to this value."""
        return " → ".join(_label(n) for n in _chain(self._node))

    def _schema_lines(self) -> list[tuple[str, str]]:
        return [("" if c is None else str(c), d) for c, d in self.schema.columns]

    def __repr__(self) -> str:
        s = self.schema
        lines = [f"<{type(self).__name__}: lazy, evaluated in the enclave on .collect()>", f"plan:  {self.explain()}"]
        lines.append(f"level: {_LEVELS[s.level]}")
        rows = self._schema_lines()
        width = max((len(n) for n, _ in rows), default=0)
        lines.append(f"columns ({len(rows)}):" if s.kind == "frame" else "dtype:")
        lines.extend(f"  {n.ljust(width)}  {d}{'  (hidden)' if n in s.hidden else ''}" for n, d in rows)
        if s.index:
            lines.append(f"index: {', '.join(str(i) for i in s.index)}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        s = self.schema
        esc = html.escape
        rows = "".join(
            f"<tr><td><code>{esc(n)}</code></td><td>{esc(d)}{' <i>(hidden)</i>' if n in s.hidden else ''}</td></tr>"
            for n, d in self._schema_lines()
        )
        index = f"<div>index: <code>{esc(', '.join(map(str, s.index)))}</code></div>" if s.index else ""
        return (
            f"<div class='mesatee-lazy'><b>{esc(type(self).__name__)}</b> <i>(lazy; evaluated in the enclave on "
            f".collect(), no data here)</i><div>plan: <code>{esc(self.explain())}</code></div>"
            f"<div>level: {esc(_LEVELS[s.level])}</div>{index}"
            f"<table><thead><tr><th>column</th><th>dtype</th></tr></thead><tbody>{rows}</tbody></table></div>"
        )


_LEVELS = {
    "rows": "rows (one row per record; released only if every owner allows rows)",
    "groups": "groups (aggregates; small groups are suppressed or refused)",
    "summary": "summary statistics",
    "scalar": "scalar",
}


@public_methods
class SecureScalar(_Lazy):
    """A lazy scalar (a reduction, a correlation)."""

    __slots__ = ()
    _what = "scalar"

    def __float__(self) -> float:
        return float(self.collect())

    def __int__(self) -> int:
        return int(self.collect())

    def __len__(self) -> int:
        what = "len()"
        raise self._trap(what)


def _quantile_func(q: float) -> str:
    pct = round(float(q) * 100)
    if q == 0.5:
        return "median"
    if not 1 <= pct <= 99 or abs(float(q) * 100 - pct) > 1e-9:
        msg = f"quantile({q!r}): q must be a whole percent within 0.01 .. 0.99"
        raise FrameUsageError(msg)
    return f"p{pct}"


def _as_strs(value: str | Sequence[str] | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not all(isinstance(v, str) for v in value):
        msg = f"{what} must be column names (strings)"
        raise FrameUsageError(msg)
    return tuple(value)


def _asc(ascending: bool | Sequence[bool], n: int) -> tuple[bool, ...]:
    if isinstance(ascending, bool):
        return (ascending,) * n
    return tuple(bool(a) for a in ascending)


@public_methods
class _Rows(_Lazy):
    """Operations frames and series share."""

    __slots__ = ()

    def _wrap(self, node: Node) -> Any:
        return type(self)(node, self._ctx)

    def head(self, n: int = 5) -> Any:
        """Take the first ``n`` rows (row-level: refused unless the owner allows rows)."""
        return self._wrap(Head(self._node, n))

    def tail(self, n: int = 5) -> Any:
        """Take the last ``n`` rows (row-level)."""
        return self._wrap(Tail(self._node, n))

    def fillna(self, value: Any) -> Any:
        """Missing values replaced by a scalar."""
        value = plain_literal(value)
        encode_literal(value)
        return self._wrap(FillNA(self._node, value))

    def to_pandas(self) -> Any:
        """Evaluate and return the pandas value (same as :meth:`collect`)."""
        return self.collect()


@public_methods
class SecureSeries(_Rows):
    """A lazy remote column or column expression."""

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

    def __add__(self, other: Any) -> SecureSeries:
        return self._bin("add", other)

    def __radd__(self, other: Any) -> SecureSeries:
        return self._bin("add", other, reflected=True)

    def __sub__(self, other: Any) -> SecureSeries:
        return self._bin("sub", other)

    def __rsub__(self, other: Any) -> SecureSeries:
        return self._bin("sub", other, reflected=True)

    def __mul__(self, other: Any) -> SecureSeries:
        return self._bin("mul", other)

    def __rmul__(self, other: Any) -> SecureSeries:
        return self._bin("mul", other, reflected=True)

    def __truediv__(self, other: Any) -> SecureSeries:
        return self._bin("truediv", other)

    def __rtruediv__(self, other: Any) -> SecureSeries:
        return self._bin("truediv", other, reflected=True)

    def __floordiv__(self, other: Any) -> SecureSeries:
        return self._bin("floordiv", other)

    def __rfloordiv__(self, other: Any) -> SecureSeries:
        return self._bin("floordiv", other, reflected=True)

    def __mod__(self, other: Any) -> SecureSeries:
        return self._bin("mod", other)

    def __rmod__(self, other: Any) -> SecureSeries:
        return self._bin("mod", other, reflected=True)

    def __pow__(self, other: Any) -> SecureSeries:
        return self._bin("pow", other)

    def __rpow__(self, other: Any) -> SecureSeries:
        return self._bin("pow", other, reflected=True)

    def __eq__(self, other: object) -> SecureSeries:  # type: ignore[override]
        return self._bin("eq", other)

    def __ne__(self, other: object) -> SecureSeries:  # type: ignore[override]
        return self._bin("ne", other)

    def __lt__(self, other: Any) -> SecureSeries:
        return self._bin("lt", other)

    def __le__(self, other: Any) -> SecureSeries:
        return self._bin("le", other)

    def __gt__(self, other: Any) -> SecureSeries:
        return self._bin("gt", other)

    def __ge__(self, other: Any) -> SecureSeries:
        return self._bin("ge", other)

    def __and__(self, other: Any) -> SecureSeries:
        return self._bin("and", other)

    def __rand__(self, other: Any) -> SecureSeries:
        return self._bin("and", other, reflected=True)

    def __or__(self, other: Any) -> SecureSeries:
        return self._bin("or", other)

    def __ror__(self, other: Any) -> SecureSeries:
        return self._bin("or", other, reflected=True)

    def __xor__(self, other: Any) -> SecureSeries:
        return self._bin("xor", other)

    def __rxor__(self, other: Any) -> SecureSeries:
        return self._bin("xor", other, reflected=True)

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

    def sum(self) -> SecureScalar:
        """Sum (skipping missing values)."""
        return self._reduce("sum")

    def mean(self) -> SecureScalar:
        """Mean (skipping missing values)."""
        return self._reduce("mean")

    def min(self) -> SecureScalar:
        """Minimum; note this is one record's value."""
        return self._reduce("min")

    def max(self) -> SecureScalar:
        """Maximum; note this is one record's value."""
        return self._reduce("max")

    def count(self) -> SecureScalar:
        """Count the non-missing values."""
        return self._reduce("count")

    def std(self) -> SecureScalar:
        """Sample standard deviation."""
        return self._reduce("std")

    def median(self) -> SecureScalar:
        """Median (in the threshold mode: refused for analysts, it is one record's value)."""
        return self._reduce("median")

    def var(self) -> SecureScalar:
        """Variance (ddof=1; ddof=0 in the DP mode)."""
        return self._reduce("var")

    def quantile(self, q: float = 0.5) -> SecureScalar:
        """Quantile ``q`` in whole percent (0.01 .. 0.99); in the DP mode a noisy quantile."""
        return self._reduce(_quantile_func(q))

    def nunique(self) -> SecureScalar:
        """Count the distinct non-missing values."""
        return self._reduce("nunique")

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

    def add(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``self + other``."""
        return self._method("add", other, kwargs)

    def radd(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``other + self``."""
        return self._method("add", other, kwargs, reflected=True)

    def sub(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``self - other``."""
        return self._method("sub", other, kwargs)

    subtract = sub

    def rsub(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``other - self``."""
        return self._method("sub", other, kwargs, reflected=True)

    def mul(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``self * other``."""
        return self._method("mul", other, kwargs)

    multiply = mul

    def rmul(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``other * self``."""
        return self._method("mul", other, kwargs, reflected=True)

    def truediv(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``self / other``."""
        return self._method("truediv", other, kwargs)

    div = divide = truediv

    def rtruediv(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``other / self``."""
        return self._method("truediv", other, kwargs, reflected=True)

    rdiv = rtruediv

    def floordiv(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``self // other``."""
        return self._method("floordiv", other, kwargs)

    def rfloordiv(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``other // self``."""
        return self._method("floordiv", other, kwargs, reflected=True)

    def mod(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``self % other``."""
        return self._method("mod", other, kwargs)

    def rmod(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``other % self``."""
        return self._method("mod", other, kwargs, reflected=True)

    def pow(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``self ** other``."""
        return self._method("pow", other, kwargs)

    def rpow(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``other ** self``."""
        return self._method("pow", other, kwargs, reflected=True)

    def eq(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``self == other``."""
        return self._method("eq", other, kwargs)

    def ne(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``self != other``."""
        return self._method("ne", other, kwargs)

    def lt(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``self < other``."""
        return self._method("lt", other, kwargs)

    def le(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``self <= other``."""
        return self._method("le", other, kwargs)

    def gt(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``self > other``."""
        return self._method("gt", other, kwargs)

    def ge(self, other: Any, **kwargs: Any) -> SecureSeries:
        """``self >= other``."""
        return self._method("ge", other, kwargs)

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
        """Vectorised string functions (literal patterns; no regular expressions in the enclave)."""
        return _StrMethods(self)

    @property
    def dt(self) -> _DtMethods:
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

    def cumsum(self) -> SecureSeries:
        """Cumulative sum (row-revealing: needs allow_rows)."""
        return self._window("cumsum")

    def cumprod(self) -> SecureSeries:
        """Cumulative product (row-revealing)."""
        return self._window("cumprod")

    def cummax(self) -> SecureSeries:
        """Cumulative maximum (row-revealing)."""
        return self._window("cummax")

    def cummin(self) -> SecureSeries:
        """Cumulative minimum (row-revealing)."""
        return self._window("cummin")

    def shift(self, periods: int = 1) -> SecureSeries:
        """Values moved by ``periods`` rows (row-revealing)."""
        return self._window("shift", int(periods))

    def diff(self, periods: int = 1) -> SecureSeries:
        """Difference with the value ``periods`` rows before (row-revealing)."""
        return self._window("diff", int(periods))

    def rank(self, method: builtins.str = "average", ascending: bool = True) -> SecureSeries:
        """Rank of each value (row-revealing)."""
        return self._window("rank", str(method), bool(ascending))

    def ffill(self) -> SecureSeries:
        """Missing values filled from the previous row (row-revealing)."""
        return self._window("ffill")

    def bfill(self) -> SecureSeries:
        """Missing values filled from the next row (row-revealing)."""
        return self._window("bfill")

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
        return _Indexer(self, "iloc")

    @property
    def loc(self) -> _Indexer:
        """Rows by boolean series or label slice: ``s.loc[mask]``, ``s.loc[a:b]``."""
        return _Indexer(self, "loc")

    def prod(self) -> SecureScalar:
        """Product (skipping missing values)."""
        return self._reduce("prod")

    product = prod

    def sem(self) -> SecureScalar:
        """Standard error of the mean."""
        return self._reduce("sem")

    def skew(self) -> SecureScalar:
        """Sample skewness."""
        return self._reduce("skew")

    def any(self) -> SecureScalar:
        """Whether any value is true (in the threshold mode, a record's value: needs allow_rows)."""
        return self._reduce("any")

    def all(self) -> SecureScalar:
        """Whether every value is true (a record's value: needs allow_rows)."""
        return self._reduce("all")

    def idxmax(self) -> SecureScalar:
        """Row label of the maximum (it says where a record is: needs allow_rows)."""
        return self._reduce("idxmax")

    def idxmin(self) -> SecureScalar:
        """Row label of the minimum (needs allow_rows)."""
        return self._reduce("idxmin")

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


# ---------------------------------------------------------------------------
# issue 16 helpers: accessors, indexers, expression strings


def _literals(values: Sequence[Any], what: str) -> tuple[Any, ...]:
    out = []
    for raw in values:
        if isinstance(raw, (_Lazy, pd.Series, pd.DataFrame)):
            msg = f"{what}() takes literal values here, not a {type(raw).__name__}"
            raise FrameUsageError(msg)
        value = plain_literal(raw)
        if isinstance(value, float) and np.isnan(value):  # NaN: missing, as pandas treats it here
            value = None
        encode_literal(value)
        out.append(value)
    return tuple(out)


def _no_options(what: str, kwargs: Mapping[str, Any], allowed: Mapping[str, tuple[Any, ...]]) -> None:
    for key, value in kwargs.items():
        if key not in allowed:
            msg = f"{what}() got an unexpected keyword argument {key!r}"
            raise FrameUsageError(msg)
        if value not in allowed[key]:
            msg = f"{what}({key}={value!r}) is not supported on a remote series"
            raise FrameUsageError(msg)


def _need_drop(drop: bool) -> None:
    if not drop:
        msg = (
            "reset_index() of remote rows supports drop=True only: the old labels are the rows' storage "
            "positions, which are not released as data"
        )
        raise FrameUsageError(msg)


def _sample(node: Node, n: int | None, frac: float | None, random_state: int | None) -> Node:
    if n is None and frac is None:
        n = 1
    if random_state is None:
        import secrets

        random_state = secrets.randbelow(2**32)
    if isinstance(random_state, bool) or not isinstance(random_state, int) or not 0 <= random_state < 2**32:
        msg = "sample() random_state must be an int seed in 0 .. 2**32-1 (or None)"
        raise FrameUsageError(msg)
    return Sample(node, n, None if frac is None else float(frac), random_state)


class _StrMethods:
    """``series.str``: string functions evaluated in the enclave (literal patterns only)."""

    __slots__ = ("_s",)

    def __init__(self, series: SecureSeries) -> None:
        self._s = series

    @staticmethod
    def _literal_pattern(pat: Any, regex: bool | None, what: str) -> None:
        import re

        if regex and isinstance(pat, str) and re.escape(pat) != pat:
            msg = (
                f".str.{what}() with a regular expression is not evaluated in the enclave (a pattern can take "
                "exponential time); pass regex=False for a literal match"
            )
            raise FrameUsageError(msg)

    def lower(self) -> SecureSeries:
        """Lower-cased strings."""
        return self._s._map("str_lower")

    def upper(self) -> SecureSeries:
        """Upper-cased strings."""
        return self._s._map("str_upper")

    def len(self) -> SecureSeries:
        """String lengths."""
        return self._s._map("str_len")

    def strip(self) -> SecureSeries:
        """Strings without leading and trailing whitespace."""
        return self._s._map("str_strip")

    def lstrip(self) -> SecureSeries:
        """Strings without leading whitespace."""
        return self._s._map("str_lstrip")

    def rstrip(self) -> SecureSeries:
        """Strings without trailing whitespace."""
        return self._s._map("str_rstrip")

    def contains(self, pat: str, case: bool = True, regex: bool = True) -> SecureSeries:
        """Whether each string contains ``pat`` (a literal; a regex only if it has no special characters)."""
        self._literal_pattern(pat, regex, "contains")
        return self._s._map("str_contains", pat, bool(case))

    def startswith(self, pat: str) -> SecureSeries:
        """Whether each string starts with ``pat``."""
        return self._s._map("str_startswith", pat)

    def endswith(self, pat: str) -> SecureSeries:
        """Whether each string ends with ``pat``."""
        return self._s._map("str_endswith", pat)

    def replace(self, pat: str, repl: str, regex: bool = False) -> SecureSeries:
        """Occurrences of ``pat`` replaced by ``repl`` (literal)."""
        self._literal_pattern(pat, regex, "replace")
        return self._s._map("str_replace", pat, repl)

    def slice(self, start: int | None = None, stop: int | None = None, step: int | None = None) -> SecureSeries:
        """Substrings by position."""
        return self._s._map("str_slice", start, stop, step)

    def __getitem__(self, key: builtins.slice) -> SecureSeries:
        if not isinstance(key, builtins.slice):
            msg = ".str[...] takes a slice, e.g. s.str[:3]"
            raise FrameUsageError(msg)
        return self.slice(key.start, key.stop, key.step)


class _DtMethods:
    """``series.dt``: datetime fields and rounding evaluated in the enclave."""

    __slots__ = ("_s",)

    def __init__(self, series: SecureSeries) -> None:
        self._s = series

    def _field(self, name: str) -> SecureSeries:
        return self._s._map(f"dt_{name}")

    year = property(lambda self: self._field("year"), doc="The year.")
    month = property(lambda self: self._field("month"), doc="The month (1-12).")
    day = property(lambda self: self._field("day"), doc="The day of the month.")
    hour = property(lambda self: self._field("hour"), doc="The hour.")
    minute = property(lambda self: self._field("minute"), doc="The minute.")
    second = property(lambda self: self._field("second"), doc="The second.")
    dayofweek = property(lambda self: self._field("dayofweek"), doc="Day of the week, Monday=0.")
    day_of_week = dayofweek
    weekday = dayofweek
    quarter = property(lambda self: self._field("quarter"), doc="The quarter.")
    dayofyear = property(lambda self: self._field("dayofyear"), doc="Day of the year.")
    day_of_year = dayofyear
    date = property(lambda self: self._field("date"), doc="The date part (datetime.date objects).")

    def floor(self, freq: str) -> SecureSeries:
        """Timestamps rounded down to a fixed frequency ('D', 'h', '15min' ...)."""
        return self._s._map("dt_floor", freq)

    def ceil(self, freq: str) -> SecureSeries:
        """Timestamps rounded up to a fixed frequency."""
        return self._s._map("dt_ceil", freq)

    def round(self, freq: str) -> SecureSeries:
        """Timestamps rounded to a fixed frequency."""
        return self._s._map("dt_round", freq)


class _Indexer:
    """``.loc``/``.iloc`` of a remote frame or series: boolean masks, slices, column lists."""

    __slots__ = ("_kind", "_of")

    def __init__(self, of: Any, kind: str) -> None:
        self._of = of
        self._kind = kind

    def __getitem__(self, key: Any) -> Any:
        of = self._of
        rows, cols = key if isinstance(key, tuple) and len(key) == 2 else (key, None)
        out = of
        if isinstance(rows, SecureSeries):
            if self._kind == "iloc":
                msg = "iloc[] takes positions; use loc[mask] (or frame[mask]) for a boolean series"
                raise FrameUsageError(msg)
            out = of[rows]
        elif isinstance(rows, slice):
            if rows != slice(None):
                bounds = _literals((rows.start, rows.stop, rows.step), self._kind)
                out = of._wrap(Slice(of._node, self._kind, bounds))
        else:
            msg = (
                f"{self._kind}[] of a remote value takes a boolean remote series or a slice (single rows by "
                "label or position would single out records)"
            )
            raise FrameUsageError(msg)
        if cols is None:
            return out
        if not isinstance(out, SecureDataFrame):
            msg = f"{self._kind}[rows, columns] needs a frame"
            raise FrameUsageError(msg)
        if isinstance(cols, slice) and cols == slice(None):
            return out
        try:
            return self._columns(out, cols)
        except (ValueError, IndexError, TypeError) as exc:
            msg = f"{self._kind}[rows, columns]: {cols!r} does not name columns of this frame ({exc})"
            raise FrameUsageError(msg) from None

    def _columns(self, out: SecureDataFrame, cols: Any) -> Any:
        names = list(out.columns)
        if self._kind == "iloc":
            if isinstance(cols, int):
                return out[names[cols]]
            picked = names[cols] if isinstance(cols, slice) else [names[i] for i in cols]
            return out[picked]
        if isinstance(cols, str):
            return out[cols]
        if isinstance(cols, slice):
            lo = 0 if cols.start is None else names.index(cols.start)
            hi = len(names) if cols.stop is None else names.index(cols.stop) + 1
            return out[names[lo:hi]]
        return out[list(cols)]


class SecureArray(_Lazy):
    """A lazy array of values (``unique()``): collects to what pandas' ``unique`` returns."""

    __slots__ = ()
    _what = "array"

    def collect_with_receipt(self, *, epsilon: float | None = None, delta: float | None = None) -> tuple[Any, Any]:
        """Evaluate in the enclave; return ``(values, receipt)``."""
        value, receipt = super().collect_with_receipt(epsilon=epsilon, delta=delta)
        return (value.unique() if isinstance(value, pd.Series) else value), receipt


_CALLABLE_HINT = (
    "it would run your code on the data: run it in a %%mesatee cell, which needs code access granted by the owner"
)
#: pandas calls that are not evaluated in the enclave, and why (a clear error, not an AttributeError).
NOT_SUPPORTED: dict[str, str] = {
    "apply": f"apply() takes a function; {_CALLABLE_HINT}",
    "applymap": f"applymap() takes a function; {_CALLABLE_HINT}",
    "pipe": f"pipe() takes a function; {_CALLABLE_HINT}",
    "transform": f"transform() takes a function; {_CALLABLE_HINT}",
    "iterrows": "iterrows() would release every row; collect() a policy-checked result instead",
    "itertuples": "itertuples() would release every row; collect() a policy-checked result instead",
    "to_numpy": "to_numpy() needs the data; collect() first (row-level results need allow_rows)",
    "values": "values needs the data; collect() first (row-level results need allow_rows)",
    "set_index": (
        "set_index() is not available yet: remote rows are labelled by storage position; group with "
        "groupby(...) (as_index=True) or set the index locally after collect()"
    ),
    "join": ("join() aligns on the index, which for remote rows is a storage position; use merge(on=...) instead"),
    "pivot_table": (
        "pivot_table() is not available yet; use groupby([index, columns]).agg(...) and unstack() the collected "
        "result locally"
    ),
    "pivot": "pivot() is not available yet; use groupby([index, columns]).agg(...) and unstack() locally",
    "corr": "frame-level corr() is not available yet; use frame[a].corr(frame[b]) for each pair",
    "cov": "frame-level cov() is not available yet; use frame[a].cov(frame[b]) for each pair",
    "to_csv": "to_csv() needs the data; collect() first",
    "to_parquet": "to_parquet() needs the data; collect() first",
}


def _parse_expr(frame: SecureDataFrame, text: str, what: str) -> Any:
    """Build a remote expression from a pandas ``query``/``eval`` string (a safe subset, no code runs)."""
    import ast

    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        msg = f"{what}(): cannot parse {text!r}: {exc.msg}"
        raise FrameUsageError(msg) from None
    arith = {
        ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul", ast.Div: "truediv", ast.FloorDiv: "floordiv",
        ast.Mod: "mod", ast.Pow: "pow", ast.BitAnd: "and", ast.BitOr: "or", ast.BitXor: "xor",
    }  # fmt: skip
    compare = {ast.Eq: "eq", ast.NotEq: "ne", ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge"}

    def bad(node: ast.AST) -> NoReturn:
        msg = (
            f"{what}(): {type(node).__name__} is not supported in {text!r}; use column names, literals, "
            "arithmetic, comparisons, in/not in [...], and/or/not, & | ~"
        )
        raise FrameUsageError(msg)

    def lit(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and not isinstance(node.value, (bytes, complex, type(...))):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return -cast("float", node.operand.value)
        bad(node)

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Name):
            if node.id not in frame.columns:
                msg = f"{what}(): no column {node.id!r} (columns: {', '.join(frame._visible())})"
                raise FrameUsageError(msg)
            return frame[node.id]
        if isinstance(node, ast.Constant):
            return lit(node)
        if isinstance(node, ast.BinOp) and type(node.op) in arith:
            return Binary(arith[type(node.op)], _operand_of(ev(node.left)), _operand_of(ev(node.right)))
        if isinstance(node, ast.BoolOp):
            values = [ev(v) for v in node.values]
            logic = "and" if isinstance(node.op, ast.And) else "or"
            out = values[0]
            for v in values[1:]:
                out = Binary(logic, _operand_of(out), _operand_of(v))
            return out
        if isinstance(node, ast.UnaryOp):
            inner = _as_series(frame, ev(node.operand), what)
            if isinstance(node.op, (ast.Not, ast.Invert)):
                return ~inner
            if isinstance(node.op, ast.USub):
                return -inner
            bad(node)
        if isinstance(node, ast.Compare):
            left = ev(node.left)
            out_c: Any = None
            part: Any
            for cop, right_node in zip(node.ops, node.comparators, strict=True):
                if isinstance(cop, (ast.In, ast.NotIn)):
                    if not isinstance(right_node, (ast.List, ast.Tuple, ast.Set)):
                        bad(right_node)
                    part = _as_series(frame, left, what).isin([lit(e) for e in right_node.elts])
                    part = ~part if isinstance(cop, ast.NotIn) else part
                    right = None
                elif type(cop) in compare:
                    right = ev(right_node)
                    part = Binary(compare[type(cop)], _operand_of(left), _operand_of(right))
                else:
                    bad(cop)
                out_c = part if out_c is None else Binary("and", _operand_of(out_c), _operand_of(part))
                left = right
            return out_c
        bad(node)

    return _as_series(frame, ev(tree.body), what)


def _operand_of(value: Any) -> Operand:
    if isinstance(value, Node):
        return value
    return _lit_or_node(value)


def _as_series(frame: SecureDataFrame, value: Any, what: str) -> SecureSeries:
    if isinstance(value, SecureSeries):
        return value
    if isinstance(value, Node):
        return SecureSeries(value, frame._ctx)
    msg = f"{what}(): the expression must involve a column"
    raise FrameUsageError(msg)


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
class SecureDataFrame(_Rows):
    """A lazy, pandas-like DataFrame whose data stays in the enclave."""

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
        out: SecureDataFrame = self[_parse_expr(self, expr, "query")]
        return out

    def eval(self, expr: str) -> Any:
        """A column expression string; ``'name = expr'`` returns the frame with that column assigned."""
        target, sep, rest = expr.partition("=")
        if sep and rest[:1] != "=" and target[-1:] not in "<>!=" and target.strip().isidentifier():
            return self.assign(**{target.strip(): _parse_expr(self, rest, "eval")})
        return _parse_expr(self, expr, "eval")

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

    def sum(self, numeric_only: bool = False) -> SecureSeries:
        """Column sums (one value per column)."""
        return self._frame_reduce("sum", numeric_only)

    def mean(self, numeric_only: bool = False) -> SecureSeries:
        """Column means."""
        return self._frame_reduce("mean", numeric_only)

    def min(self, numeric_only: bool = False) -> SecureSeries:
        """Column minimums (record values: need allow_rows in the threshold mode)."""
        return self._frame_reduce("min", numeric_only)

    def max(self, numeric_only: bool = False) -> SecureSeries:
        """Column maximums (record values)."""
        return self._frame_reduce("max", numeric_only)

    def count(self) -> SecureSeries:
        """Non-missing values per column."""
        return self._frame_reduce("count", False)

    def std(self, numeric_only: bool = False) -> SecureSeries:
        """Column standard deviations."""
        return self._frame_reduce("std", numeric_only)

    def var(self, numeric_only: bool = False) -> SecureSeries:
        """Column variances."""
        return self._frame_reduce("var", numeric_only)

    def median(self, numeric_only: bool = False) -> SecureSeries:
        """Column medians (record values)."""
        return self._frame_reduce("median", numeric_only)

    def prod(self, numeric_only: bool = False) -> SecureSeries:
        """Column products."""
        return self._frame_reduce("prod", numeric_only)

    def sem(self, numeric_only: bool = False) -> SecureSeries:
        """Standard errors of the column means."""
        return self._frame_reduce("sem", numeric_only)

    def skew(self, numeric_only: bool = False) -> SecureSeries:
        """Column skewness."""
        return self._frame_reduce("skew", numeric_only)

    def nunique(self) -> SecureSeries:
        """Distinct values per column."""
        return self._frame_reduce("nunique", False)

    def any(self) -> SecureSeries:
        """Whether any value of each column is true (record values)."""
        return self._frame_reduce("any", False)

    def all(self) -> SecureSeries:
        """Whether every value of each column is true (record values)."""
        return self._frame_reduce("all", False)


@dataclass(frozen=True, slots=True)
class _GroupSpec:
    frame: SecureDataFrame
    by: tuple[str, ...]
    as_index: bool
    dropna: bool
    sort: bool
    selection: str | tuple[str, ...] | None


AggSpec: TypeAlias = "str | Sequence[str] | Mapping[str, str] | None"


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
        msg = f"'SecureGroupBy' has no attribute or column {name!r}"
        raise AttributeError(msg)

    def _targets(self) -> list[str]:
        g = self._node
        if g.selection is None:
            return [c for c in g.frame._visible() if c not in g.by]
        return [g.selection] if isinstance(g.selection, str) else list(g.selection)

    def agg(self, func: AggSpec = None, /, **named: tuple[str, str]) -> Any:
        """Aggregate: named ``out=(column, func)``, a dict ``{column: func}``, a func name or a list of them."""
        g = self._node
        aggs: list[tuple[str, str, str]] = []
        series_out = False
        if named:
            if func is not None:
                msg = "agg() takes either a func/dict or named aggregations, not both"
                raise FrameUsageError(msg)
            for out, spec in named.items():
                if not isinstance(spec, tuple) or len(spec) != 2:
                    msg = f"named aggregation {out}= must be a (column, func) pair"
                    raise FrameUsageError(msg)
                aggs.append((out, str(spec[0]), str(spec[1])))
        elif isinstance(func, Mapping):
            for col, f in func.items():
                if not isinstance(f, str):
                    msg = "agg({column: [funcs]}) would make MultiIndex columns; use named aggregations instead"
                    raise FrameUsageError(msg)
                aggs.append((col, col, f))
        elif isinstance(func, str):
            aggs = [(c, c, func) for c in self._targets()]
            series_out = isinstance(g.selection, str)
        elif func is not None:
            funcs = _as_strs(func, "funcs")
            if not isinstance(g.selection, str):
                msg = "agg([funcs]) is supported on one selected column, e.g. gb['x'].agg(['mean', 'max'])"
                raise FrameUsageError(msg)
            aggs = [(f, g.selection, f) for f in funcs]
        if not aggs:
            msg = "agg() needs at least one aggregation"
            raise FrameUsageError(msg)
        for _, _, f in aggs:
            if f not in AGG_FUNCS:
                msg = f"unknown aggregation {f!r}; supported: {', '.join(sorted(AGG_FUNCS))}"
                raise FrameUsageError(msg)
        node = GroupByAgg(g.frame._node, g.by, tuple(aggs), g.as_index, g.dropna, g.sort)
        frame = SecureDataFrame(node, self._ctx)
        if series_out and g.as_index:
            return frame[aggs[0][0]]
        return frame

    def size(self) -> Any:
        """Rows per group: a series named ``size`` (a frame with ``as_index=False``)."""
        g = self._node
        frame = SecureDataFrame(
            GroupByAgg(g.frame._node, g.by, (("size", g.by[0], "size"),), g.as_index, g.dropna, g.sort), self._ctx
        )
        return frame["size"] if g.as_index else frame

    def count(self) -> Any:
        """Non-missing values per group and column."""
        return self.agg("count")

    def sum(self) -> Any:
        """Sum per group."""
        return self.agg("sum")

    def mean(self) -> Any:
        """Mean per group."""
        return self.agg("mean")

    def min(self) -> Any:
        """Minimum per group."""
        return self.agg("min")

    def max(self) -> Any:
        """Maximum per group."""
        return self.agg("max")

    def std(self) -> Any:
        """Compute the standard deviation per group."""
        return self.agg("std")

    def median(self) -> Any:
        """Median per group."""
        return self.agg("median")

    def var(self) -> Any:
        """Variance per group."""
        return self.agg("var")

    def quantile(self, q: float = 0.5) -> Any:
        """Quantile ``q`` per group (whole percent, 0.01 .. 0.99)."""
        return self.agg(_quantile_func(q))

    def nunique(self) -> Any:
        """Distinct values per group."""
        return self.agg("nunique")

    def first(self) -> Any:
        """First non-missing value per group (a record's value: needs allow_rows)."""
        return self.agg("first")

    def last(self) -> Any:
        """Last non-missing value per group (a record's value: needs allow_rows)."""
        return self.agg("last")

    def prod(self) -> Any:
        """Product per group."""
        return self.agg("prod")

    def sem(self) -> Any:
        """Standard error of the mean per group."""
        return self.agg("sem")

    def skew(self) -> Any:
        """Skewness per group."""
        return self.agg("skew")

    def any(self) -> Any:
        """Whether any value is true, per group (record values: need allow_rows)."""
        return self.agg("any")

    def all(self) -> Any:
        """Whether every value is true, per group (record values: need allow_rows)."""
        return self.agg("all")

    @property
    def ngroups(self) -> int:
        """Number of groups (a policy-checked count of the released groups)."""
        return len(self.size())
