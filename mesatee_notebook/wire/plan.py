"""The DataFrame query plan: format, structural validation and schema rules (pure).

A plan is a DAG of op nodes sent as versioned JSON, never pickle::

    {"version": 1,
     "root": "n3",
     "nodes": {
       "n0": {"op": "source", "args": {"name": "patients"}},
       "n1": {"op": "column", "args": {"input": "n0", "name": "age"}},
       "n2": {"op": "binary", "args": {"op": "gt", "left": {"ref": "n1"}, "right": {"lit": 40}}},
       "n3": {"op": "filter", "args": {"input": "n0", "predicate": "n2"}}}}

Every op and the exact set and kind of its arguments are in :data:`OPS`; there
are no optional arguments, so a plan states everything it asks for. A node
argument is a node id string. An *operand* is ``{"ref": id}`` or
``{"lit": literal}``. A literal is JSON ``null``, a bool, an int in the int64
range, a finite float, a string, ``{"$float": "nan"|"inf"|"-inf"}`` or
``{"$ts": "<ISO 8601>"}`` (a timestamp).

:func:`plan_from_json` checks the structure (known ops, argument kinds, node
references, no cycles, every node reachable from the root, size limits) and
raises :class:`~mesatee_notebook.errors.MalformedFrame`. :func:`infer_plan`
then checks the plan against the datasets' schemas (columns exist, types fit,
hidden columns are not referenced) and returns each node's :class:`Schema`.
The client uses the same rules through :func:`infer_node`, so a mistake
surfaces when the expression is built, with the message the enclave would give.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, NoReturn

from mesatee_notebook.errors import FrameTooLarge, MalformedFrame, NotFound, PolicyViolation, VersionMismatch

__all__ = [
    "AGG_FUNCS",
    "BINARY_OPS",
    "DISTINCT_FUNCS",
    "FRAME_REDUCE_FUNCS",
    "DTYPES",
    "MAX_NODES",
    "MAX_PLAN_BYTES",
    "MAP_FUNCS",
    "OPS",
    "ROW_REVEALING_FUNCS",
    "ROW_REVEALING_OPS",
    "WINDOW_FUNCS",
    "PLAN_VERSION",
    "QUANTILE_FUNCS",
    "REDUCE_FUNCS",
    "Lit",
    "Plan",
    "PlanNode",
    "Ref",
    "Schema",
    "SourceInfo",
    "dtype_kind",
    "infer_node",
    "infer_plan",
    "plain_literal",
    "plan_from_json",
    "plan_to_json",
    "source_columns",
]

PLAN_VERSION = 1
MAX_PLAN_BYTES = 4 << 20
MAX_NODES = 10_000
MAX_LITERALS = 100_000
MAX_STR = 1 << 16
_I64 = 1 << 63

ArgKind = Literal[
    "node",
    "operand",
    "str",
    "strs",
    "int",
    "bool",
    "bools",
    "literal",
    "literals",
    "dtype_spec",
    "rename_map",
    "aggs",
    "assigns",
    "suffixes",
]

BINARY_OPS = frozenset(
    {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor"}
)
_ARITH = frozenset({"add", "sub", "mul", "truediv", "floordiv", "mod", "pow"})
_COMPARE = frozenset({"eq", "ne", "lt", "le", "gt", "ge"})
_LOGIC = frozenset({"and", "or", "xor"})
UNARY_OPS = frozenset({"neg", "invert", "abs"})
#: ``p1`` .. ``p99`` are percentiles (``p50`` is the median); ``var`` and ``std`` have ddof=1 in the
#: threshold mode and ddof=0 in the DP mode (see docs/privacy.md).
QUANTILE_FUNCS = frozenset(f"p{i}" for i in range(1, 100))
AGG_FUNCS = (
    frozenset(
        {
            "size", "count", "sum", "mean", "min", "max", "std", "var", "median", "nunique",
            "prod", "sem", "skew", "any", "all", "first", "last",
        }
    )
    | QUANTILE_FUNCS
)  # fmt: skip
#: Reductions of a series only; ``idxmax``/``idxmin`` return a row's label, so they are row-revealing.
REDUCE_FUNCS = (AGG_FUNCS - {"size", "first", "last"}) | {"idxmax", "idxmin"}
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
    "ffill": 0, "bfill": 0, "duplicated": 1,
}  # fmt: skip
#: ``distinct``: the distinct values (``unique``) or the most common ones (``mode``): record values.
DISTINCT_FUNCS = frozenset({"unique", "mode"})
#: Frame-level reductions (``frame_reduce`` op): one value per column.
FRAME_REDUCE_FUNCS = frozenset(
    {"sum", "mean", "min", "max", "count", "std", "var", "median", "prod", "sem", "skew", "nunique", "any", "all"}
)
DTYPES = frozenset(
    {
        "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float32", "float64", "bool", "str", "string", "category",
        "datetime64[s]", "datetime64[ms]", "datetime64[us]", "datetime64[ns]",
        "Int64", "Float64", "boolean",
    }
)  # fmt: skip
_ENUMS: dict[tuple[str, str], frozenset[str]] = {
    ("binary", "op"): BINARY_OPS,
    ("unary", "op"): UNARY_OPS,
    ("merge", "how"): frozenset({"inner", "left", "right", "outer"}),
    ("drop_duplicates", "keep"): frozenset({"first", "last", "none"}),
    ("reduce", "func"): REDUCE_FUNCS,
    ("corr", "method"): frozenset({"pearson", "spearman", "cov"}),
    ("map", "func"): frozenset(MAP_FUNCS),
    ("window", "func"): frozenset(WINDOW_FUNCS),
    ("distinct", "func"): DISTINCT_FUNCS,
    ("frame_reduce", "func"): FRAME_REDUCE_FUNCS,
    ("slice", "kind"): frozenset({"iloc", "loc"}),
    ("top", "keep"): frozenset({"first", "last", "all"}),
}

#: Every op of plan version 1, with the exact kind of each argument.
OPS: dict[str, dict[str, ArgKind]] = {
    "source": {"name": "str"},
    "select": {"input": "node", "columns": "strs"},
    "column": {"input": "node", "name": "str"},
    "filter": {"input": "node", "predicate": "node"},
    "assign": {"input": "node", "columns": "assigns"},
    "rename": {"input": "node", "columns": "rename_map"},
    "fillna": {"input": "node", "value": "literal"},
    "astype": {"input": "node", "dtype": "dtype_spec"},
    "sort_values": {"input": "node", "by": "strs", "ascending": "bools"},
    "head": {"input": "node", "n": "int"},
    "tail": {"input": "node", "n": "int"},
    "drop_duplicates": {"input": "node", "subset": "strs", "keep": "str"},
    "merge": {
        "left": "node", "right": "node", "how": "str",
        "left_on": "strs", "right_on": "strs", "suffixes": "suffixes",
    },
    "groupby_agg": {
        "input": "node", "by": "strs", "aggs": "aggs",
        "as_index": "bool", "dropna": "bool", "sort": "bool",
    },
    "value_counts": {
        "input": "node", "subset": "strs", "normalize": "bool",
        "sort": "bool", "ascending": "bool", "dropna": "bool",
    },
    "describe": {"input": "node", "columns": "strs"},
    "binary": {"op": "str", "left": "operand", "right": "operand"},
    "unary": {"op": "str", "input": "node"},
    "isin": {"input": "node", "values": "literals"},
    "reduce": {"input": "node", "func": "str"},
    "corr": {"left": "node", "right": "node", "method": "str"},
    "count_rows": {"input": "node"},
    # issue 16: pandas as users know it
    "map": {"input": "node", "func": "str", "args": "literals"},
    "window": {"input": "node", "func": "str", "args": "literals"},
    "where": {"input": "node", "cond": "node", "other": "operand", "keep": "bool"},
    "distinct": {"input": "node", "func": "str"},
    "set_name": {"input": "node", "name": "str"},
    "to_frame": {"input": "node", "name": "str"},
    "slice": {"input": "node", "kind": "str", "bounds": "literals"},
    "sample": {"input": "node", "n": "literal", "frac": "literal", "seed": "int"},
    "reset_index": {"input": "node"},
    "concat": {"left": "node", "right": "node"},
    "frame_reduce": {"input": "node", "func": "str"},
    "top": {"input": "node", "n": "int", "columns": "strs", "largest": "bool", "keep": "str"},
    "melt": {"input": "node", "id_vars": "strs", "value_vars": "strs", "var_name": "str", "value_name": "str"},
}  # fmt: skip

#: Ops whose result reveals single records (or where they are) whatever follows them: refused for
#: analysts of a dataset whose owner does not allow rows, and never evaluated in the DP mode.
ROW_REVEALING_OPS = frozenset({"window", "distinct"})
ROW_REVEALING_FUNCS = frozenset({"idxmax", "idxmin"})


# ---------------------------------------------------------------------------
# In-memory plan


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to another node: a plan node id, or a client node object."""

    target: Any


@dataclass(frozen=True, slots=True)
class Lit:
    """A literal operand (a scalar value, not a node)."""

    value: Any


@dataclass(frozen=True, slots=True)
class PlanNode:
    """One op of a plan with its decoded arguments (refs are :class:`Ref`)."""

    op: str
    args: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated plan: nodes by id, the root id and the format version."""

    root: str
    nodes: Mapping[str, PlanNode]
    version: int = PLAN_VERSION

    def order(self) -> list[str]:
        """Node ids with every node after the nodes it references."""
        return _topo_order(self.root, self.nodes)


def node_refs(node: PlanNode) -> list[Any]:
    """Return the targets a node references, in argument order."""
    out: list[Any] = []
    for name, kind in OPS[node.op].items():
        value = node.args[name]
        if kind in ("node", "operand") and isinstance(value, Ref):
            out.append(value.target)
        elif kind == "assigns":
            out.extend(v.target for _, v in value if isinstance(v, Ref))
    return out


def _topo_order(root: str, nodes: Mapping[str, PlanNode]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[tuple[str, bool]] = [(root, False)]
    while stack:
        nid, expanded = stack.pop()
        if expanded:
            state[nid] = 2
            order.append(nid)
            continue
        if state.get(nid) == 2:
            continue
        if nid not in nodes:
            msg = f"plan references unknown node {nid!r}"
            raise MalformedFrame(msg)
        state[nid] = 1
        stack.append((nid, True))
        for child in node_refs(nodes[nid]):
            if state.get(child) == 1:
                msg = f"plan has a cycle through node {child!r}"
                raise MalformedFrame(msg)
            if state.get(child) != 2:
                stack.append((child, False))
    return order


# ---------------------------------------------------------------------------
# Literals


def encode_literal(value: Any) -> Any:
    """Encode a scalar for the plan; anything but a plain scalar raises ``MalformedFrame``."""
    if value is None or isinstance(value, (bool, str)):
        if isinstance(value, str) and len(value) > MAX_STR:
            msg = "string literal too long"
            raise MalformedFrame(msg)
        return value
    if isinstance(value, int):
        if not -_I64 <= value < _I64:
            msg = f"integer literal {value} outside the int64 range"
            raise MalformedFrame(msg)
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return {"$float": "nan"}
        if math.isinf(value):
            return {"$float": "inf" if value > 0 else "-inf"}
        return value
    if isinstance(value, datetime):
        return {"$ts": value.isoformat()}
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and type(value).__module__ == "numpy":
        return encode_literal(item())
    msg = f"cannot use a {type(value).__name__} as a literal; use None, bool, int, float, str or a timestamp"
    raise MalformedFrame(msg)


def plain_literal(value: Any) -> Any:
    """Return ``value`` as the plain Python scalar the plan carries (numpy scalars unwrapped).

    ``np.int64(1)``, ``np.float32(0.5)``, ``np.bool_(True)`` and ``np.datetime64`` become
    ``int``, ``float``, ``bool`` and ``pandas.Timestamp``; anything else is returned as it is
    (and :func:`encode_literal` decides whether it is a literal at all).
    """
    if type(value).__module__ != "numpy":
        return value
    import numpy as np

    if isinstance(value, np.datetime64):
        import pandas as pd

        return None if np.isnat(value) else pd.Timestamp(value)
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def decode_literal(obj: Any) -> Any:
    """Decode a literal written by :func:`encode_literal`."""
    if isinstance(obj, dict):
        if set(obj) == {"$float"} and obj["$float"] in ("nan", "inf", "-inf"):
            return float(obj["$float"])
        if set(obj) == {"$ts"} and isinstance(obj["$ts"], str):
            import pandas as pd

            try:
                return pd.Timestamp(obj["$ts"])
            except ValueError as exc:
                msg = "bad timestamp literal"
                raise MalformedFrame(msg) from exc
        msg = "unknown tagged literal"
        raise MalformedFrame(msg)
    if isinstance(obj, (list, tuple)):
        msg = "a literal must be a scalar, not a list"
        raise MalformedFrame(msg)
    return encode_literal(obj) if obj is None or isinstance(obj, (bool, int, str)) else _finite(obj)


def _finite(obj: Any) -> float:
    if isinstance(obj, float) and math.isfinite(obj):
        return obj
    msg = f"bad literal {obj!r}"
    raise MalformedFrame(msg)


# ---------------------------------------------------------------------------
# JSON encode / decode with structural validation


def _is_strs(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) > 1024 or value.startswith("\x00"):
        msg = f"{what} must be a string name (at most 1024 characters, not starting with NUL)"
        raise MalformedFrame(msg)
    return value


def _decode_arg(op: str, name: str, kind: ArgKind, raw: Any, ids: Mapping[str, Any]) -> Any:
    where = f"{op}.{name}"

    def bad(expected: str) -> NoReturn:
        msg = f"plan argument {where} must be {expected}"
        raise MalformedFrame(msg)

    def ref(value: Any) -> Ref:
        if not isinstance(value, str) or value not in ids:
            msg = f"plan argument {where} references unknown node {value!r}"
            raise MalformedFrame(msg)
        return Ref(value)

    if kind == "node":
        return ref(raw)
    if kind == "operand":
        if isinstance(raw, dict) and set(raw) == {"ref"}:
            return ref(raw["ref"])
        if isinstance(raw, dict) and set(raw) == {"lit"}:
            return Lit(decode_literal(raw["lit"]))
        bad('{"ref": id} or {"lit": literal}')
    if kind == "str":
        if not isinstance(raw, str):
            bad("a string")
        enum = _ENUMS.get((op, name))
        if enum is not None and raw not in enum:
            msg = f"plan argument {where} must be one of {sorted(enum)}, not {raw!r}"
            raise MalformedFrame(msg)
        return _check_name(raw, where)
    if kind == "strs":
        if not _is_strs(raw):
            bad("a list of strings")
        return tuple(_check_name(v, where) for v in raw)
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < _I64:
            bad("a non-negative int64")
        return raw
    if kind == "bool":
        if not isinstance(raw, bool):
            bad("a bool")
        return raw
    if kind == "bools":
        if not isinstance(raw, list) or not all(isinstance(v, bool) for v in raw):
            bad("a list of bools")
        return tuple(raw)
    if kind == "literal":
        return decode_literal(raw)
    if kind == "literals":
        if not isinstance(raw, list) or len(raw) > MAX_LITERALS:
            bad(f"a list of at most {MAX_LITERALS} literals")
        return tuple(decode_literal(v) for v in raw)
    if kind == "dtype_spec":
        if isinstance(raw, str):
            return _check_dtype(raw)
        if isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values()):
            return {_check_name(k, where): _check_dtype(v) for k, v in raw.items()}
        bad("a dtype name or an object of column: dtype")
    if kind == "rename_map":
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            bad("an object of old: new column names")
        return {_check_name(k, where): _check_name(v, where) for k, v in raw.items()}
    if kind == "suffixes":
        if not _is_strs(raw) or len(raw) != 2:
            bad("a list of two strings")
        return (raw[0], raw[1])
    if kind == "aggs":
        if not isinstance(raw, list) or not raw or not all(_is_strs(t) and len(t) == 3 for t in raw):
            bad("a non-empty list of [output, column, func] triples")
        for _, _, func in raw:
            if func not in AGG_FUNCS:
                msg = f"unknown aggregation {func!r}; known: {', '.join(sorted(AGG_FUNCS))}"
                raise MalformedFrame(msg)
        return tuple((_check_name(o, where), _check_name(c, where), f) for o, c, f in raw)
    if kind == "assigns":
        if not isinstance(raw, list) or not raw or not all(isinstance(t, list) and len(t) == 2 for t in raw):
            bad("a non-empty list of [name, operand] pairs")
        return tuple((_check_name(n, where), _decode_arg(op, name, "operand", v, ids)) for n, v in raw)
    raise AssertionError(kind)  # pragma: no cover - OPS and this function are kept in step


def _check_dtype(value: str) -> str:
    if value not in DTYPES:
        msg = f"dtype {value!r} is not supported; use one of {', '.join(sorted(DTYPES))}"
        raise MalformedFrame(msg)
    return value


def _encode_arg(kind: ArgKind, value: Any, node_id: Callable[[Any], str]) -> Any:
    if kind == "node":
        return node_id(value.target)
    if kind == "operand":
        return {"ref": node_id(value.target)} if isinstance(value, Ref) else {"lit": encode_literal(value.value)}
    if kind in ("strs", "bools", "suffixes"):
        return list(value)
    if kind == "literal":
        return encode_literal(value)
    if kind == "literals":
        return [encode_literal(v) for v in value]
    if kind in ("dtype_spec", "rename_map"):
        return dict(value) if isinstance(value, Mapping) else value
    if kind == "aggs":
        return [list(t) for t in value]
    if kind == "assigns":
        return [[n, _encode_arg("operand", v, node_id)] for n, v in value]
    return value


def _reject_constant(name: str) -> Any:
    msg = f"plan JSON must not contain {name}"
    raise MalformedFrame(msg)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            msg = f"duplicate key {key!r} in plan JSON"
            raise MalformedFrame(msg)
        out[key] = value
    return out


def plan_from_json(text: str | bytes) -> Plan:
    """Parse and structurally validate a plan; raises ``MalformedFrame`` (or ``VersionMismatch``)."""
    if len(text) > MAX_PLAN_BYTES:
        msg = f"plan is {len(text)} bytes, over the {MAX_PLAN_BYTES} byte limit"
        raise FrameTooLarge(msg)
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, MalformedFrame):
            raise
        msg = "plan is not valid JSON"
        raise MalformedFrame(msg) from exc
    return plan_from_obj(obj)


def plan_from_obj(obj: Any) -> Plan:
    """Validate a decoded JSON object as a plan."""
    if not isinstance(obj, dict) or set(obj) != {"version", "root", "nodes"}:
        msg = 'a plan is an object with exactly "version", "root" and "nodes"'
        raise MalformedFrame(msg)
    if obj["version"] != PLAN_VERSION or isinstance(obj["version"], bool):
        msg = f"plan version {obj['version']!r} is not supported by this side (speaks version {PLAN_VERSION})"
        raise VersionMismatch(msg)
    raw_nodes = obj["nodes"]
    if not isinstance(raw_nodes, dict) or not raw_nodes:
        msg = "plan nodes must be a non-empty object"
        raise MalformedFrame(msg)
    if len(raw_nodes) > MAX_NODES:
        msg = f"plan has {len(raw_nodes)} nodes, over the limit of {MAX_NODES}"
        raise FrameTooLarge(msg)
    nodes: dict[str, PlanNode] = {}
    for nid, raw in raw_nodes.items():
        if not isinstance(raw, dict) or set(raw) != {"op", "args"} or not isinstance(raw["args"], dict):
            msg = f'plan node {nid!r} must be an object with exactly "op" and "args"'
            raise MalformedFrame(msg)
        op = raw["op"]
        if not isinstance(op, str) or op not in OPS:
            msg = f"unknown plan op {op!r}"
            raise MalformedFrame(msg)
        spec = OPS[op]
        if set(raw["args"]) != set(spec):
            msg = f"op {op!r} takes exactly the arguments {sorted(spec)}, got {sorted(raw['args'])}"
            raise MalformedFrame(msg)
        args = {name: _decode_arg(op, name, kind, raw["args"][name], raw_nodes) for name, kind in spec.items()}
        nodes[nid] = PlanNode(op, args)
    root = obj["root"]
    if not isinstance(root, str) or root not in nodes:
        msg = "plan root must be the id of one of its nodes"
        raise MalformedFrame(msg)
    plan = Plan(root, nodes)
    reachable = plan.order()
    if len(reachable) != len(nodes):
        msg = "plan has nodes the root does not use"
        raise MalformedFrame(msg)
    return plan


def plan_to_obj(
    root: Any, nodes: Mapping[Any, PlanNode], node_id: Callable[[Any], str] | None = None
) -> dict[str, Any]:
    """Encode a plan as a JSON-ready object; ``node_id`` maps ref targets to ids."""
    to_id = node_id if node_id is not None else str
    out: dict[str, Any] = {}
    for key, node in nodes.items():
        spec = OPS.get(node.op)
        if spec is None or set(node.args) != set(spec):
            msg = f"cannot encode op {node.op!r} with arguments {sorted(node.args)}"
            raise MalformedFrame(msg)
        out[to_id(key)] = {"op": node.op, "args": {n: _encode_arg(k, node.args[n], to_id) for n, k in spec.items()}}
    return {"version": PLAN_VERSION, "root": to_id(root), "nodes": out}


def plan_to_json(plan: Plan) -> str:
    """Encode a plan as canonical JSON (sorted keys, no whitespace, ASCII)."""
    text = json.dumps(plan_to_obj(plan.root, plan.nodes), sort_keys=True, separators=(",", ":"), allow_nan=False)
    plan_from_json(text)  # never emit what the other side would refuse
    return text


# ---------------------------------------------------------------------------
# Schemas and typing rules

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
    out = tuple((_check_name(name, "a column name"), str(dtype)) for name, dtype in dtypes)
    if len({n for n, _ in out}) != len(out):
        msg = "column names must be unique"
        raise MalformedFrame(msg)
    return out


def dtype_kind(dtype: str) -> str:
    """Coarse kind of a dtype: int, float, bool, str, datetime, category or other."""
    d = dtype.lower()
    if d in ("bool", "boolean"):
        return "bool"
    if d.startswith(("int", "uint")):
        return "int"
    if d.startswith("float"):
        return "float"
    if d in ("str", "object") or d.startswith("string"):
        return "str"
    if d.startswith("datetime64"):
        return "datetime"
    if d == "category":
        return "category"
    return "other"


def _lit_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, datetime):
        return "datetime"
    return "other"


_LIT_DTYPE = {"int": "int64", "float": "float64", "bool": "bool", "str": "str", "datetime": "datetime64[us]"}
_NUMERIC = frozenset({"int", "float"})


def _fail(msg: str) -> NoReturn:
    raise MalformedFrame(msg)


def _need(schema: Schema, kinds: Iterable[Kind], op: str, what: str = "input") -> None:
    kinds = tuple(kinds)
    if schema.kind not in kinds:
        _fail(f"{op}() {what} must be a {' or '.join(kinds)}, not a {schema.kind}")
    if schema.level == "summary" and op not in ("select", "column"):
        _fail(f"{op}() cannot be applied to a describe() result; select a column of it and collect()")


def _ref_col(schema: Schema, name: str, op: str, *, key: bool = False) -> str:
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


def _literal_fits(value: Any, dtype: str) -> bool:
    lk, ck = _lit_kind(value), dtype_kind(dtype)
    if lk == "null" or ck == "other":
        return False
    if ck in _NUMERIC:
        return lk in _NUMERIC
    if ck == "category":
        return lk in ("str", "int", "float")
    return lk == ck


def _arith_dtype(op: str, a: str, b: str) -> str:
    ka, kb = dtype_kind(a), dtype_kind(b)
    if op == "add" and ka == kb == "str":
        return "str"
    if ka == kb == "bool":
        _fail(f"{op}: arithmetic between two booleans is ambiguous; use & | ^ or astype('int64') first")
    if ka not in ("int", "float", "bool") or kb not in ("int", "float", "bool"):
        _fail(f"{op}: arithmetic needs numeric operands, got {a} and {b}")
    if op == "truediv" or "float" in (ka, kb):
        return "float64"
    return "int64"


def _compare_ok(op: str, a: str, b: str) -> bool:
    ka, kb = dtype_kind(a), dtype_kind(b)
    if ka in _NUMERIC and kb in _NUMERIC:
        return True
    if ka == kb and ka in ("str", "bool", "datetime"):
        return ka != "bool" or op in ("eq", "ne")
    if {ka, kb} == {"datetime", "str"}:
        return True  # a timestamp string literal
    if "category" in (ka, kb):
        return op in ("eq", "ne")
    return False


def _operand(value: Any, schema_of: Callable[[Any], Schema]) -> tuple[Schema | None, str]:
    if isinstance(value, Ref):
        s = schema_of(value.target)
        return s, s.columns[0][1] if s.kind == "series" else ""
    lk = _lit_kind(value.value)
    if lk not in _LIT_DTYPE:
        _fail(f"literal {value.value!r} cannot be used in an expression")
    return None, _LIT_DTYPE[lk]


def _same_origin(a: Schema, b: Schema, op: str) -> None:
    if a.origin != b.origin:
        msg = (
            f"{op}(): the operands come from different frames (e.g. one is aggregated or merged and the other "
            "is not); build both from the same frame"
        )
        _fail(msg)


def _merge_columns(
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
        _fail(f"merge() would produce duplicate column names {names}; choose other suffixes")
    return out, hidden


def _agg_dtype(func: str, dtype: str, col: str) -> str:
    kind = dtype_kind(dtype)
    if func in ("size", "count", "nunique"):
        return "int64"
    if func in ("any", "all"):
        if kind not in ("int", "float", "bool"):
            _fail(f"{func} of column {col!r} needs a boolean or numeric column, not {dtype}")
        return "bool"
    if func in ("idxmax", "idxmin"):
        if kind not in ("int", "float", "bool", "datetime"):
            _fail(f"{func} of column {col!r} needs a numeric or datetime column, not {dtype}")
        return "int64"
    if func in ("mean", "std", "var", "median", "sem", "skew") or func in QUANTILE_FUNCS:
        if kind not in ("int", "float", "bool"):
            _fail(f"{func} of column {col!r} needs a numeric column, not {dtype}")
        return "float64"
    if func in ("sum", "prod"):
        if kind not in ("int", "float", "bool"):
            _fail(f"{func} of column {col!r} needs a numeric column, not {dtype}")
        return "float64" if kind == "float" else "int64"
    if kind in ("category", "other"):
        _fail(f"{func} of column {col!r} is not supported for dtype {dtype}")
    return dtype  # min, max


def infer_node(
    op: str,
    args: Mapping[str, Any],
    schema_of: Callable[[Any], Schema],
    token: Hashable,
    *,
    source_of: Callable[[str], SourceInfo],
) -> Schema:
    """Type one node from its arguments and its inputs' schemas.

    ``token`` identifies this node (it becomes the origin of the values it
    indexes anew); ``source_of`` resolves a dataset name. Raises
    ``MalformedFrame`` for a type error, ``NotFound`` for an unknown column or
    dataset and ``PolicyViolation`` for a reference to a hidden column.
    """
    if op == "source":
        info = source_of(args["name"])
        return Schema(
            "frame", tuple(info.columns), "rows", ("source", info.name), frozenset({info.name}), frozenset(info.hidden)
        )
    if op in ("binary",):
        ls, ldt = _operand(args["left"], schema_of)
        rs, rdt = _operand(args["right"], schema_of)
        base = ls or rs
        if base is None:
            _fail("binary(): at least one operand must be a column expression")
        for s in (ls, rs):
            if s is not None:
                _need(s, ("series",), args["op"], "operand")
        if ls is not None and rs is not None:
            _same_origin(ls, rs, args["op"])
        bop = args["op"]
        if bop in _ARITH:
            dtype = _arith_dtype(bop, ldt, rdt)
        elif bop in _COMPARE:
            if not _compare_ok(bop, ldt, rdt):
                _fail(f"cannot compare {ldt} with {rdt} ({bop})")
            dtype = "bool"
        else:
            if dtype_kind(ldt) != "bool" or dtype_kind(rdt) != "bool":
                _fail(f"{bop}: & | ^ need boolean operands, got {ldt} and {rdt}; wrap comparisons in ()")
            dtype = "bool"
        lname = ls.columns[0][0] if ls is not None else None
        rname = rs.columns[0][0] if rs is not None else None
        name = lname if rs is None else rname if ls is None else (lname if lname == rname else None)
        hj = any(s.hidden_join for s in (ls, rs) if s is not None)
        return Schema("series", ((name, dtype),), base.level, base.origin, base.datasets, frozenset(), hj, base.index)

    inp: Schema | None = schema_of(args["input"].target) if "input" in args else None
    if op == "unary":
        assert inp is not None
        _need(inp, ("series",), "unary")
        dt = inp.columns[0][1]
        kind = dtype_kind(dt)
        if args["op"] == "invert" and kind != "bool":
            _fail(f"~ needs a boolean series, not {dt}")
        if args["op"] in ("neg", "abs") and kind not in _NUMERIC:
            _fail(f"{args['op']} needs a numeric series, not {dt}")
        return inp
    if op == "column":
        assert inp is not None
        _need(inp, ("frame",), "column")
        dt = _ref_col(inp, args["name"], "column")
        return Schema(
            "series",
            ((args["name"], dt),),
            inp.level,
            inp.origin,
            inp.datasets,
            frozenset(),
            inp.hidden_join,
            inp.index,
        )
    if op == "select":
        assert inp is not None
        _need(inp, ("frame",), "select")
        cols = args["columns"]
        if not cols or len(set(cols)) != len(cols):
            _fail("select() needs a non-empty list of distinct columns")
        out = tuple((c, _ref_col(inp, c, "select")) for c in cols)
        return _replace(inp, columns=out, hidden=frozenset())
    if op == "filter":
        assert inp is not None
        _need(inp, ("frame", "series"), "filter")
        pred = schema_of(args["predicate"].target)
        _need(pred, ("series",), "filter", "predicate")
        if dtype_kind(pred.columns[0][1]) != "bool":
            _fail(f"filter() needs a boolean predicate, not {pred.columns[0][1]}")
        _same_origin(inp, pred, "filter")
        return _replace(inp, hidden_join=inp.hidden_join or pred.hidden_join)
    if op == "assign":
        assert inp is not None
        _need(inp, ("frame",), "assign")
        cols = list(inp.columns)
        names = [n for n, _ in args["columns"]]
        if len(set(names)) != len(names):
            _fail("assign() got the same column twice")
        hj = inp.hidden_join
        for name, value in args["columns"]:
            if name in inp.hidden:
                msg = f"assign() cannot overwrite hidden column {name!r}"
                raise PolicyViolation(msg, column=name)
            vs, vdt = _operand(value, schema_of)
            if vs is not None:
                _need(vs, ("series",), "assign", "value")
                _same_origin(inp, vs, "assign")
                hj = hj or vs.hidden_join
            elif value.value is None:
                _fail("assign() cannot assign None")
            names_now = [c for c, _ in cols]
            if name in names_now:
                cols[names_now.index(name)] = (name, vdt)
            else:
                cols.append((name, vdt))
        return _replace(inp, columns=tuple(cols), hidden_join=hj)
    if op == "rename":
        assert inp is not None
        _need(inp, ("frame",), "rename")
        mapping: Mapping[str, str] = args["columns"]
        for old in mapping:
            if old in inp.hidden:
                _ref_col(inp, old, "rename")
        cols = [((mapping.get(c, c) if c is not None else c), d) for c, d in inp.columns]
        names = [c for c, _ in cols]
        if len(set(names)) != len(names):
            _fail(f"rename() would produce duplicate column names {names}")
        return _replace(inp, columns=tuple(cols))
    if op == "fillna":
        assert inp is not None
        _need(inp, ("frame", "series"), "fillna")
        for c, d in inp.columns:
            if not _literal_fits(args["value"], d):
                _fail(f"fillna({args['value']!r}) does not fit column {c!r} of dtype {d}")
        return inp
    if op == "astype":
        assert inp is not None
        _need(inp, ("frame", "series"), "astype")
        spec = args["dtype"]
        if inp.kind == "series":
            if not isinstance(spec, str):
                _fail("astype() of a series takes one dtype")
            return _replace(inp, columns=((inp.columns[0][0], spec),))
        if isinstance(spec, str):
            return _replace(inp, columns=tuple((c, spec) for c, _ in inp.columns))
        for c in spec:
            _ref_col(inp, c, "astype")
        return _replace(inp, columns=tuple((c, spec.get(c, d) if c is not None else d) for c, d in inp.columns))
    if op == "sort_values":
        assert inp is not None
        _need(inp, ("frame", "series"), "sort_values")
        by, asc = args["by"], args["ascending"]
        if inp.kind == "series":
            if by or len(asc) != 1:
                _fail("sort_values() of a series takes no 'by' and one 'ascending'")
        else:
            if not by or len(asc) != len(by):
                _fail("sort_values() needs 'by' columns and one 'ascending' flag per column")
            for c in by:
                _ref_col(inp, c, "sort_values")
        return inp
    if op in ("head", "tail"):
        assert inp is not None
        _need(inp, ("frame", "series"), op)
        return inp
    if op == "drop_duplicates":
        assert inp is not None
        _need(inp, ("frame", "series"), "drop_duplicates")
        if args["keep"] not in ("first", "last", "none"):
            _fail("drop_duplicates() keep must be 'first', 'last' or 'none'")
        if inp.kind == "series":
            if args["subset"]:
                _fail("drop_duplicates() of a series takes no subset")
        else:
            if not args["subset"]:
                _fail("drop_duplicates() needs an explicit subset")
            for c in args["subset"]:
                _ref_col(inp, c, "drop_duplicates")
        return inp
    if op == "merge":
        left, right = schema_of(args["left"].target), schema_of(args["right"].target)
        _need(left, ("frame",), "merge", "left")
        _need(right, ("frame",), "merge", "right")
        if left.level != "rows" or right.level != "rows":
            _fail("merge() of an aggregated result is not supported yet; merge first, then aggregate")
        lo, ro = args["left_on"], args["right_on"]
        if not lo or len(lo) != len(ro):
            _fail("merge() needs the same, non-zero number of left and right keys")
        for lk, rk in zip(lo, ro, strict=True):
            lk_dt, rk_dt = _ref_col(left, lk, "merge", key=True), _ref_col(right, rk, "merge", key=True)
            kl, kr = dtype_kind(lk_dt), dtype_kind(rk_dt)
            if not (kl == kr or {kl, kr} <= _NUMERIC) or kl in ("other", "category"):
                _fail(f"merge() keys {lk!r} ({lk_dt}) and {rk!r} ({rk_dt}) have incompatible dtypes")
        cols, hidden = _merge_columns(left, right, lo, ro, how=args["how"], suffixes=args["suffixes"])
        hidden_key = any(k in left.hidden for k in lo) or any(k in right.hidden for k in ro)
        return Schema(
            "frame", tuple(cols), "rows", token, left.datasets | right.datasets, frozenset(hidden),
            left.hidden_join or right.hidden_join or hidden_key,
        )  # fmt: skip
    if op == "groupby_agg":
        assert inp is not None
        _need(inp, ("frame",), "groupby")
        by = args["by"]
        if not by or len(set(by)) != len(by):
            _fail("groupby() needs a non-empty list of distinct key columns")
        keys = tuple((k, _ref_col(inp, k, "groupby")) for k in by)
        outs: list[Column] = []
        for out, col, func in args["aggs"]:
            dt = _ref_col(inp, col, "agg")
            outs.append((out, _agg_dtype(func, dt, col)))
        names = [n for n, _ in outs] + ([] if args["as_index"] else list(by))
        if len(set(names)) != len(names):
            _fail(f"agg() output names collide: {names}")
        cols = tuple(outs) if args["as_index"] else keys + tuple(outs)
        index = tuple(by) if args["as_index"] else ()
        return Schema("frame", cols, "groups", token, inp.datasets, frozenset(), inp.hidden_join, index)
    if op == "value_counts":
        assert inp is not None
        _need(inp, ("frame", "series"), "value_counts")
        subset = args["subset"]
        if inp.kind == "frame":
            if not subset or len(set(subset)) != len(subset):
                _fail("value_counts() of a frame needs an explicit subset of distinct columns")
            for c in subset:
                _ref_col(inp, c, "value_counts")
            vc_index: tuple[str | None, ...] = tuple(subset)
        else:
            if subset:
                _fail("value_counts() of a series takes no subset")
            vc_index = (inp.columns[0][0],)
        vc_col: Column = ("proportion", "float64") if args["normalize"] else ("count", "int64")
        return Schema("series", (vc_col,), "groups", token, inp.datasets, frozenset(), inp.hidden_join, vc_index)
    if op == "describe":
        assert inp is not None
        _need(inp, ("frame", "series"), "describe")
        stats = ("count", "mean", "std", "min", "25%", "50%", "75%", "max")
        if inp.kind == "series":
            if args["columns"]:
                _fail("describe() of a series takes no columns")
            targets: list[tuple[str | None, str]] = list(inp.columns)
        else:
            if not args["columns"]:
                _fail("describe() needs at least one numeric column")
            targets = [(c, _ref_col(inp, c, "describe")) for c in args["columns"]]
        for c, d in targets:
            if dtype_kind(d) not in _NUMERIC:
                _fail(f"describe() supports numeric columns only; {c!r} is {d}")
        return Schema(
            inp.kind, tuple((c, "float64") for c, _ in targets), "summary", token, inp.datasets,
            frozenset(), inp.hidden_join, stats,
        )  # fmt: skip
    if op == "isin":
        assert inp is not None
        _need(inp, ("series",), "isin")
        return _replace(inp, columns=((inp.columns[0][0], "bool"),))
    if op == "reduce":
        assert inp is not None
        _need(inp, ("series",), args["func"])
        dt = _agg_dtype(args["func"], inp.columns[0][1], str(inp.columns[0][0]))
        return Schema("scalar", ((None, dt),), "scalar", token, inp.datasets, frozenset(), inp.hidden_join)
    if op == "corr":
        left, right = schema_of(args["left"].target), schema_of(args["right"].target)
        for s in (left, right):
            _need(s, ("series",), "corr")
            if dtype_kind(s.columns[0][1]) not in _NUMERIC:
                _fail(f"corr() needs numeric series, not {s.columns[0][1]}")
        _same_origin(left, right, "corr")
        hj = left.hidden_join or right.hidden_join
        return Schema("scalar", ((None, "float64"),), "scalar", token, left.datasets, frozenset(), hj)
    if op == "count_rows":
        assert inp is not None
        _need(inp, ("frame", "series"), "len")
        return Schema("scalar", ((None, "int64"),), "scalar", token, inp.datasets, frozenset(), inp.hidden_join)
    if inp is not None and op in _NEW_OPS:
        return _NEW_OPS[op](args, inp, schema_of, token)
    if op == "concat":
        return _infer_concat(args, schema_of, token)
    _fail(f"unknown plan op {op!r}")


# ---------------------------------------------------------------------------
# Typing rules of the issue 16 ops

_FREQ = frozenset({"D", "h", "min", "s", "ms", "us", "ns"})


def _series_dtype(inp: Schema, op: str) -> tuple[str | None, str, str]:
    _need(inp, ("series",), op)
    name, dt = inp.columns[0]
    return name, dt, dtype_kind(dt)


def _with_dtype(inp: Schema, dtype: str) -> Schema:
    return _replace(inp, columns=((inp.columns[0][0], dtype),))


def _pairs(values: Sequence[Any], op: str) -> tuple[list[Any], list[Any]]:
    if len(values) % 2:
        _fail(f"{op}() needs pairs of old and new values")
    return list(values[0::2]), list(values[1::2])


def _value_dtype(values: Sequence[Any], base: str | None, op: str) -> str:
    """The dtype pandas gives a column of ``base`` values (None: none kept) with ``values`` put in."""
    kinds = {_lit_kind(v) for v in values} - {"null"}
    if base is not None:
        kinds.add(dtype_kind(base))
    if not kinds:
        return "float64"
    if kinds <= {"int"}:
        return "int64" if base is None or dtype_kind(base) != "int" else base
    if kinds <= _NUMERIC:
        return "float64"
    if kinds == {"str"}:
        return "str"
    if kinds == {"bool"}:
        return "bool"
    if kinds == {"datetime"}:
        return base or "datetime64[us]"
    return "object"


def _infer_map(args: Mapping[str, Any], inp: Schema, schema_of: Callable[[Any], Schema], token: Hashable) -> Schema:
    func, vals = args["func"], tuple(args["args"])
    _, dt, kind = _series_dtype(inp, func)
    arity = MAP_FUNCS[func]
    if arity >= 0 and len(vals) != arity:
        _fail(f"{func}() takes {arity} argument(s), got {len(vals)}")
    if func in ("isna", "notna"):
        return _with_dtype(inp, "bool")
    if func.startswith("str_"):
        if kind != "str":
            _fail(f".str.{func[4:]}() needs a string series, not {dt}")
        if func in ("str_contains", "str_startswith", "str_endswith", "str_replace"):
            pats = vals[:1] if func != "str_replace" else vals
            if not all(isinstance(v, str) for v in pats):
                _fail(f".str.{func[4:]}() needs string patterns")
            if func == "str_contains" and not isinstance(vals[1], bool):
                _fail(".str.contains() case= must be a bool")
            return _with_dtype(inp, "bool" if func != "str_replace" else dt)
        if func == "str_len":
            return _with_dtype(inp, "int64")
        if func == "str_slice" and not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in vals):
            _fail(".str.slice() takes integer start, stop and step")
        return inp
    if func.startswith("dt_"):
        if kind != "datetime":
            _fail(f".dt.{func[3:]} needs a datetime series, not {dt}")
        if func in ("dt_floor", "dt_ceil", "dt_round"):
            freq = vals[0]
            if not isinstance(freq, str) or freq.lstrip("0123456789") not in _FREQ or freq[:1] == "0":
                _fail(f".dt.{func[3:]}() freq must be a fixed frequency such as 'D', 'h', '15min', 's'")
            return inp
        return _with_dtype(inp, "object" if func == "dt_date" else "int32")
    if func == "clip":
        if kind not in _NUMERIC:
            _fail(f"clip() needs a numeric series, not {dt}")
        if not all(_lit_kind(v) in ("null", "int", "float") for v in vals):
            _fail("clip() bounds must be numbers or None")
        return _with_dtype(inp, "float64" if any(isinstance(v, float) for v in vals) else dt)
    if func == "round":
        if kind not in _NUMERIC or not isinstance(vals[0], int) or isinstance(vals[0], bool):
            _fail("round() needs a numeric series and an integer number of decimals")
        return inp
    if func in ("map_dict", "replace"):
        old, new = _pairs(vals, func)
        if func == "map_dict":
            return _with_dtype(inp, _value_dtype(new, None, func) if len(new) else "float64")
        if kind in ("category", "other"):
            _fail(f"replace() is not supported for dtype {dt}")
        return _with_dtype(inp, _value_dtype(new, dt, func) if any(_literal_fits(o, dt) for o in old) else dt)
    if func == "cut":
        if kind not in _NUMERIC:
            _fail(f"cut() needs a numeric series, not {dt}")
        if not vals or not isinstance(vals[0], int) or isinstance(vals[0], bool) or len(vals) < vals[0] + 1:
            _fail("cut() arguments are [number of bin edges, edges..., labels...]")
        n = vals[0]
        edges, labels = vals[1 : 1 + n], vals[1 + n :]
        if n < 2 or not all(_lit_kind(e) in _NUMERIC for e in edges) or list(edges) != sorted(edges):
            _fail("cut() needs at least two increasing numeric bin edges")
        if labels and (len(labels) != n - 1 or not all(isinstance(x, str) for x in labels)):
            _fail("cut() labels must be one string per bin (or labels=False for bin numbers)")
        return _with_dtype(inp, "category" if labels else "int64")
    raise AssertionError(func)  # pragma: no cover - the enum keeps these in step


def _infer_window(args: Mapping[str, Any], inp: Schema, schema_of: Callable[[Any], Schema], token: Hashable) -> Schema:
    func, vals = args["func"], tuple(args["args"])
    _, dt, kind = _series_dtype(inp, func)
    if len(vals) != WINDOW_FUNCS[func]:
        _fail(f"{func}() takes {WINDOW_FUNCS[func]} argument(s), got {len(vals)}")
    if inp.level != "rows":
        _fail(f"{func}() of an aggregate is not supported; collect the aggregate and apply it locally")
    if func in ("shift", "diff") and (not isinstance(vals[0], int) or isinstance(vals[0], bool)):
        _fail(f"{func}() periods must be an integer")
    if func == "duplicated":
        if vals[0] not in ("first", "last", "none"):
            _fail("duplicated() keep must be 'first', 'last' or False")
        return _with_dtype(inp, "bool")
    if func == "rank":
        if vals[0] not in ("average", "min", "max", "first", "dense") or not isinstance(vals[1], bool):
            _fail("rank() method must be average, min, max, first or dense, and ascending a bool")
        return _with_dtype(inp, "float64")
    if func in ("ffill", "bfill"):
        return inp
    ok = kind in _NUMERIC or (kind == "bool" and func in ("cumsum", "cumprod", "shift"))
    if not ok and not (kind == "datetime" and func in ("cummax", "cummin", "shift", "diff")):
        _fail(f"{func}() needs a numeric series, not {dt}")
    if func == "shift":
        return _with_dtype(inp, "float64" if kind in ("int", "bool") and vals[0] != 0 else dt)
    if func == "diff":
        return _with_dtype(inp, "timedelta64[us]" if kind == "datetime" else "float64" if kind != "float" else dt)
    if kind == "bool":
        return _with_dtype(inp, "int64")
    return inp


def _infer_where(args: Mapping[str, Any], inp: Schema, schema_of: Callable[[Any], Schema], token: Hashable) -> Schema:
    name, dt, kind = _series_dtype(inp, "where")
    cond = schema_of(args["cond"].target)
    _need(cond, ("series",), "where", "cond")
    if dtype_kind(cond.columns[0][1]) != "bool":
        _fail(f"where()/mask() needs a boolean condition, not {cond.columns[0][1]}")
    _same_origin(inp, cond, "where")
    other = args["other"]
    hj = inp.hidden_join or cond.hidden_join
    if isinstance(other, Ref):
        os_ = schema_of(other.target)
        _need(os_, ("series",), "where", "other")
        _same_origin(inp, os_, "where")
        odt = os_.columns[0][1]
        out = dt if odt == dt else "float64" if {kind, dtype_kind(odt)} <= _NUMERIC else "object"
        return _replace(inp, columns=((name, out),), hidden_join=hj or os_.hidden_join)
    value = other.value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        out = "float64" if kind in ("int", "bool") else dt
    elif _literal_fits(value, dt):
        out = dt if not (kind == "int" and isinstance(value, float)) else "float64"
    else:
        out = "object"
    return _replace(inp, columns=((name, out),), hidden_join=hj)


def _infer_distinct(
    args: Mapping[str, Any], inp: Schema, schema_of: Callable[[Any], Schema], token: Hashable
) -> Schema:
    name, dt, _ = _series_dtype(inp, args["func"])
    if inp.level != "rows":
        _fail(f"{args['func']}() of an aggregate is not supported; collect the aggregate and apply it locally")
    return Schema("series", ((name, dt),), "rows", token, inp.datasets, frozenset(), inp.hidden_join)


def _infer_set_name(
    args: Mapping[str, Any], inp: Schema, schema_of: Callable[[Any], Schema], token: Hashable
) -> Schema:
    _, dt, _ = _series_dtype(inp, "rename")
    return _with_dtype(_replace(inp, columns=((args["name"], dt),)), dt)


def _infer_to_frame(
    args: Mapping[str, Any], inp: Schema, schema_of: Callable[[Any], Schema], token: Hashable
) -> Schema:
    _, dt, _ = _series_dtype(inp, "to_frame")
    return _replace(inp, kind="frame", columns=((args["name"], dt),))


def _infer_slice(args: Mapping[str, Any], inp: Schema, schema_of: Callable[[Any], Schema], token: Hashable) -> Schema:
    _need(inp, ("frame", "series"), args["kind"])
    bounds = tuple(args["bounds"])
    if len(bounds) != 3 or not all(b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in bounds):
        _fail(f"{args['kind']}[start:stop:step] takes integer (or empty) bounds")
    if bounds[2] == 0:
        _fail("slice step cannot be zero")
    if args["kind"] == "loc" and inp.level != "rows":
        _fail("loc[a:b] slices by row label; on an aggregate, collect it and slice locally")
    return inp


def _infer_sample(args: Mapping[str, Any], inp: Schema, schema_of: Callable[[Any], Schema], token: Hashable) -> Schema:
    _need(inp, ("frame", "series"), "sample")
    n, frac = args["n"], args["frac"]
    if (n is None) == (frac is None):
        _fail("sample() takes exactly one of n and frac")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        _fail("sample() n must be a non-negative integer")
    if frac is not None and (not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 <= frac <= 1):
        _fail("sample() frac must be within 0 .. 1 (sampling with replacement is not supported)")
    return inp


def _infer_reset_index(
    args: Mapping[str, Any], inp: Schema, schema_of: Callable[[Any], Schema], token: Hashable
) -> Schema:
    _need(inp, ("frame", "series"), "reset_index")
    if inp.level != "rows":
        _fail("reset_index() of an aggregate: use as_index=False in groupby(), or reset it locally after collect()")
    return _replace(inp, origin=token)


def _infer_frame_reduce(
    args: Mapping[str, Any], inp: Schema, schema_of: Callable[[Any], Schema], token: Hashable
) -> Schema:
    _need(inp, ("frame",), args["func"])
    func = args["func"]
    if not inp.columns:
        _fail(f"{func}() of a frame needs at least one column")
    dts = set()
    for c, d in inp.columns:
        if c in inp.hidden:
            _ref_col(inp, str(c), func)
        dts.add(_agg_dtype(func, d, str(c)))
    out = dts.pop() if len(dts) == 1 else "float64" if dts <= {"int64", "float64"} else "object"
    return Schema(
        "series", ((None, out),), "summary", token, inp.datasets, frozenset(), inp.hidden_join,
        tuple(inp.names),
    )  # fmt: skip


def _infer_concat(args: Mapping[str, Any], schema_of: Callable[[Any], Schema], token: Hashable) -> Schema:
    left, right = schema_of(args["left"].target), schema_of(args["right"].target)
    for s in (left, right):
        _need(s, ("frame",), "concat")
        if s.level != "rows":
            _fail("concat() of aggregates is not supported; concatenate the rows, then aggregate")
    if left.names != right.names:
        _fail(f"concat() needs frames with the same columns in the same order, not {left.names} and {right.names}")
    cols = []
    for (c, ld), (_, rd) in zip(left.columns, right.columns, strict=True):
        if ld == rd:
            cols.append((c, ld))
        elif {dtype_kind(ld), dtype_kind(rd)} <= _NUMERIC:
            cols.append((c, "float64"))
        else:
            cols.append((c, "object"))
    return Schema(
        "frame", tuple(cols), "rows", token, left.datasets | right.datasets, left.hidden | right.hidden,
        left.hidden_join or right.hidden_join,
    )  # fmt: skip


def _infer_top(args: Mapping[str, Any], inp: Schema, schema_of: Callable[[Any], Schema], token: Hashable) -> Schema:
    what = "nlargest" if args["largest"] else "nsmallest"
    _need(inp, ("frame", "series"), what)
    if inp.kind == "series":
        if args["columns"]:
            _fail(f"{what}() of a series takes no columns")
        targets = [inp.columns[0][1]]
    else:
        if not args["columns"]:
            _fail(f"{what}() of a frame needs columns")
        targets = [_ref_col(inp, c, what) for c in args["columns"]]
    if not all(dtype_kind(d) in ("int", "float", "datetime") for d in targets):
        _fail(f"{what}() needs numeric or datetime columns")
    return inp


def _infer_melt(args: Mapping[str, Any], inp: Schema, schema_of: Callable[[Any], Schema], token: Hashable) -> Schema:
    _need(inp, ("frame",), "melt")
    if inp.level != "rows":
        _fail("melt() of an aggregate is not supported; collect the aggregate and melt it locally")
    ids, values = list(args["id_vars"]), list(args["value_vars"])
    if not values or set(ids) & set(values):
        _fail("melt() needs value_vars, none of them also in id_vars")
    id_cols = [(c, _ref_col(inp, c, "melt")) for c in ids]
    dts = {_ref_col(inp, c, "melt") for c in values}
    kinds = {dtype_kind(d) for d in dts}
    value_dt = dts.pop() if len(dts) == 1 else "float64" if kinds <= _NUMERIC else "object"
    names = [*ids, args["var_name"], args["value_name"]]
    if len(set(names)) != len(names):
        _fail(f"melt() would produce duplicate column names {names}")
    cols = (*id_cols, (args["var_name"], "str"), (args["value_name"], value_dt))
    return Schema("frame", cols, "rows", token, inp.datasets, frozenset(), inp.hidden_join)


_NEW_OPS: dict[str, Callable[[Mapping[str, Any], Schema, Callable[[Any], Schema], Hashable], Schema]] = {
    "map": _infer_map,
    "window": _infer_window,
    "where": _infer_where,
    "distinct": _infer_distinct,
    "set_name": _infer_set_name,
    "to_frame": _infer_to_frame,
    "slice": _infer_slice,
    "sample": _infer_sample,
    "reset_index": _infer_reset_index,
    "frame_reduce": _infer_frame_reduce,
    "top": _infer_top,
    "melt": _infer_melt,
}


def _replace(schema: Schema, **changes: Any) -> Schema:
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


def infer_plan(plan: Plan, sources: Mapping[str, SourceInfo]) -> dict[str, Schema]:
    """Type every node of a plan against the datasets a party may see."""

    def source_of(name: str) -> SourceInfo:
        try:
            return sources[name]
        except KeyError:
            msg = f"no dataset named {name!r}"
            raise NotFound(msg) from None

    schemas: dict[str, Schema] = {}
    for nid in plan.order():
        node = plan.nodes[nid]
        schemas[nid] = infer_node(node.op, node.args, schemas.__getitem__, nid, source_of=source_of)
    return schemas
