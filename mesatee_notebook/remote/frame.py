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

import html
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, Protocol, TypeAlias, runtime_checkable

import pandas as pd

from mesatee_notebook.errors import FrameUsageError
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
    plan_to_obj,
    source_columns,
)

__all__ = [
    "DPResult",
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
    encode_literal(value)
    return Lit(value)


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
        if options:
            return self._ctx.collect(self.plan_json(), **options)
        return self._ctx.collect(self.plan_json())

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
    def name(self) -> str | None:
        """The series name."""
        return self.schema.columns[0][0]

    @property
    def dtype(self) -> str:
        """The (predicted) dtype name."""
        return self.schema.columns[0][1]

    def _bin(self, op: str, other: Any, *, reflected: bool = False) -> SecureSeries:
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
        vals = tuple(values)
        for v in vals:
            encode_literal(v)
        return SecureSeries(IsIn(self._node, vals), self._ctx)

    def astype(self, dtype: str) -> SecureSeries:
        """Cast to ``dtype`` (one of the supported names)."""
        return SecureSeries(AsType(self._node, str(dtype)), self._ctx)

    def sort_values(self, ascending: bool = True) -> SecureSeries:
        """Values sorted (row-level)."""
        return SecureSeries(SortValues(self._node, (), (bool(ascending),)), self._ctx)

    def drop_duplicates(self, keep: str | bool = "first") -> SecureSeries:
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

    def _reduce(self, func: str) -> SecureScalar:
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

    def corr(self, other: SecureSeries, method: str = "pearson") -> SecureScalar:
        """Correlation with another series of the same frame."""
        if not isinstance(other, SecureSeries):
            msg = "corr() needs another remote series"
            raise FrameUsageError(msg)
        return SecureScalar(Corr(self._node, other._node, method), self._ctx)


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
        self, by: str | Sequence[str], as_index: bool = True, dropna: bool = True, sort: bool = True
    ) -> SecureGroupBy:
        """Group rows by key columns; aggregate with ``.agg(...)`` or a shorthand such as ``.mean()``."""
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
