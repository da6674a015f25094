"""The lazy-value machinery of the DataFrame proxy: plans from node graphs, evaluation traps, shared helpers.

``len()``, ``float()`` and ``int()`` are explicit evaluations (each sends one policy-checked query and
returns its released value); ``bool()``, iteration and ``np.asarray`` raise ``FrameUsageError``, because
Python calls them implicitly (``if``, ``and``/``or``, ``for``), where a remote query would be a surprise.

Why this module is over ~500 lines: the lazy base that SecureDataFrame and SecureSeries share (plan building,
release, display); just over, split would cut one class.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NoReturn, Protocol, TypeAlias, TypeVar, runtime_checkable

import numpy as np
import pandas as pd

from mesatee_notebook.errors import FrameUsageError
from mesatee_notebook.remote._public import public_methods
from mesatee_notebook.remote.frame_dp import (
    DPResult,
    PrivacyBudget,
)
from mesatee_notebook.wire.ops import (
    CountRows,
    FillNA,
    Head,
    Op,
    Sample,
    Tail,
)
from mesatee_notebook.wire.plan import (
    Lit,
    Schema,
    encode_literal,
    plain_literal,
    plan_to_obj,
)


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
# Nodes


Node = Op
Operand: TypeAlias = "Op | Lit"


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
        stack.extend((c, False) for c in reversed(node.refs()) if id(c) not in seen)
    return order


def plan_json(root: Node) -> str:
    """Serialise the graph under ``root`` as canonical plan JSON (shared nodes once)."""
    order = _postorder(root)
    ids = {id(n): f"n{i}" for i, n in enumerate(order)}
    obj = plan_to_obj(root, {n: n for n in order}, lambda n: ids[id(n)])
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _chain(node: Node) -> list[Node]:
    """Return the main-input chain from the source up to ``node``."""
    chain = [node]
    while True:
        refs = chain[-1].refs()
        if not refs or not isinstance(refs[0], Op):
            break
        chain.append(refs[0])
    return chain[::-1]


# ---------------------------------------------------------------------------
# Wrappers


def _lit_or_node(value: Any) -> Operand:
    if isinstance(value, _Lazy) and value._what == "series":  # a SecureSeries
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

    __slots__ = ("_ctx", "_node", "_post")
    _what: ClassVar[str] = "value"
    _node: Node
    _ctx: FrameBackend | None
    #: Local post-processing of the released value (order or shape only, e.g. groupby value_counts'
    #: order within groups); values derived from this one do not inherit it.
    _post: Callable[[Any], Any] | None

    def __init__(self, node: Node, ctx: FrameBackend | None, post: Callable[[Any], Any] | None = None) -> None:
        _ = node.schema  # type the expression now: a mistake surfaces where it is made
        self._node = node
        self._ctx = ctx
        self._post = post

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
        value = _restore_missing(value, self.schema)
        if self._post is not None and not isinstance(value, DPResult):  # a DP release keeps its own shape
            value = self._post(value)
        elif isinstance(value, DPResult) and getattr(self._post, "dp_shape", False):  # a reshape: post-processing
            assert self._post is not None
            value = DPResult(self._post(value.value), self._post(value.accuracy), value.meta, value.receipt)
        return value, receipt

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
        return " → ".join(n.label() for n in _chain(self._node))

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


class SecureArray(_Lazy):
    """A lazy array of values (``unique()``): collects to what pandas' ``unique`` returns."""

    __slots__ = ()
    _what = "array"

    def collect_with_receipt(self, *, epsilon: float | None = None, delta: float | None = None) -> tuple[Any, Any]:
        """Evaluate in the enclave; return ``(values, receipt)``."""
        value, receipt = super().collect_with_receipt(epsilon=epsilon, delta=delta)
        return (value.unique() if isinstance(value, pd.Series) else value), receipt


# ---------------------------------------------------------------------------
# Catalog entries: the shape-alike pandas methods, each one line in its class


_Fn = TypeVar("_Fn", bound=Callable[..., object])
_OP_SYMBOLS = {
    "add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%", "pow": "**",
    "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "and": "&", "or": "|", "xor": "^",
}  # fmt: skip


def _op_doc(op: str, *, reflected: bool) -> str:
    sym = _OP_SYMBOLS[op]
    return f"``other {sym} self``." if reflected else f"``self {sym} other``."


def _entry(fn: _Fn, name: str, doc: str) -> _Fn:
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


def _operator(op: str, *, reflected: bool = False) -> Callable[[Any, Any], Any]:
    """A Python operator of a series (``__add__``, ``__radd__`` ...): a ``binary`` node."""

    def method(self: Any, other: Any) -> Any:
        return self._bin(op, other, reflected=reflected)

    sym = _OP_SYMBOLS[op]
    return _entry(
        method,
        f"__{'r' if reflected else ''}{op}__",
        f"``{'other ' + sym + ' self' if reflected else 'self ' + sym + ' other'}``.",
    )


def _method_form(name: str, op: str, *, reflected: bool = False) -> Callable[..., Any]:
    """A pandas method form of an operator (``add``, ``radd``, ``eq`` ...); no axis/level/fill_value."""

    def method(self: Any, other: Any, **kwargs: Any) -> Any:
        return self._method(op, other, kwargs, reflected=reflected)

    return _entry(method, name, _op_doc(op, reflected=reflected))


def _reduction(func: str, doc: str) -> Callable[[Any], SecureScalar]:
    """A reduction of a series to a :class:`SecureScalar` (a ``reduce`` node)."""

    def method(self: Any) -> SecureScalar:
        out: SecureScalar = self._reduce(func)
        return out

    return _entry(method, func, doc)


def _window_fn(func: str, doc: str) -> Callable[[Any], Any]:
    """A window function of a series without arguments (a ``window`` node: row-revealing)."""

    def method(self: Any) -> Any:
        return self._window(func)

    return _entry(method, func, doc)


def _frame_reduction(func: str, doc: str, *, numeric_only: bool = True) -> Callable[..., Any]:
    """A frame-level reduction (a ``frame_reduce`` node); ``numeric_only=`` where pandas takes it."""

    def with_option(self: Any, numeric_only: bool = False) -> Any:
        return self._frame_reduce(func, numeric_only)

    def without(self: Any) -> Any:
        return self._frame_reduce(func, False)

    return _entry(with_option if numeric_only else without, func, doc)


def _group_agg(func: str, doc: str) -> Callable[[Any], Any]:
    """A groupby aggregation by name (``gb.sum()`` is ``gb.agg("sum")``)."""

    def method(self: Any) -> Any:
        return self.agg(func)

    return _entry(method, func, doc)


def _str_fn(name: str, doc: str) -> Callable[[Any], Any]:
    """A ``.str`` function without arguments (a ``map`` node ``str_<name>``)."""

    def method(self: Any) -> Any:
        return self._s._map(f"str_{name}")

    return _entry(method, name, doc)
