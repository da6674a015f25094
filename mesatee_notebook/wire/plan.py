"""The DataFrame query plan: its JSON format, structural validation and typing (pure).

A plan is a DAG of op nodes sent as versioned JSON, never pickle::

    {"version": 1,
     "root": "n3",
     "nodes": {
       "n0": {"op": "source", "args": {"name": "patients"}},
       "n1": {"op": "column", "args": {"input": "n0", "name": "age"}},
       "n2": {"op": "binary", "args": {"op": "gt", "left": {"ref": "n1"}, "right": {"lit": 40}}},
       "n3": {"op": "filter", "args": {"input": "n0", "predicate": "n2"}}}}

The ops and the exact set and kind of their arguments are the node classes of
:mod:`mesatee_notebook.wire.ops` (:data:`OPS` lists them); there are no optional
arguments, so a plan states everything it asks for. A node argument is a node id
string. An *operand* is ``{"ref": id}`` or ``{"lit": literal}``. A literal is JSON
``null``, a bool, an int in the int64 range, a finite float, a string,
``{"$float": "nan"|"inf"|"-inf"}`` or ``{"$ts": "<ISO 8601>"}`` (a timestamp).

:func:`plan_from_json` checks the structure (known ops, argument kinds, node
references, no cycles, every node reachable from the root, size limits) and
raises :class:`~mesatee_notebook.errors.MalformedFrame`; it returns the typed
nodes, whose references are node ids. :func:`infer_plan` then runs each node's
schema rule (``Op.infer``) against the datasets' schemas (columns exist, types
fit, hidden columns are not referenced). The client runs the same rules when it
builds an expression, so a mistake surfaces at once, with the enclave's message.

Why this module is over ~500 lines: the version-1 plan JSON codec, one decoder per argument kind; just over.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from mesatee_notebook.errors import FrameTooLarge, MalformedFrame, NotFound, VersionMismatch
from mesatee_notebook.wire.ops import OP_CLASSES, OPS, ArgKind, InferCtx, Op
from mesatee_notebook.wire.schema import (
    AGG_FUNCS,
    BINARY_OPS,
    DISTINCT_FUNCS,
    DTYPES,
    FRAME_REDUCE_FUNCS,
    MAP_FUNCS,
    QUANTILE_FUNCS,
    REDUCE_FUNCS,
    ROW_REVEALING_FUNCS,
    ROW_REVEALING_OPS,
    WINDOW_FUNCS,
    Lit,
    Schema,
    SourceInfo,
    check_name,
    dtype_kind,
    source_columns,
)

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
    "Op",
    "Plan",
    "PlanNode",
    "Schema",
    "SourceInfo",
    "dtype_kind",
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

#: A plan node is a typed op node (kept under its old name for callers).
PlanNode = Op

#: The closed sets of values string arguments may take, by (op, argument).
_ENUMS: dict[tuple[str, str], frozenset[str]] = {
    (name, s.wire): s.enum for name, cls in OP_CLASSES.items() for s in cls.SPECS if s.enum is not None
}


@dataclass(frozen=True, slots=True, eq=False)
class Plan:
    """A validated plan: typed nodes by id (their references are ids), the root id and the version.

    Two plans are equal when they have the same root, version and node ids, and each id names a
    node of the same op with equal arguments (nodes compare by identity, plans by content).
    """

    root: str
    nodes: Mapping[str, Op]
    version: int = PLAN_VERSION

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return (
            (self.root, self.version) == (other.root, other.version)
            and self.nodes.keys() == other.nodes.keys()
            and all(_content(n) == _content(other.nodes[k]) for k, n in self.nodes.items())
        )

    __hash__ = None  # type: ignore[assignment]

    def order(self) -> list[str]:
        """Node ids with every node after the nodes it references."""
        return _topo_order(self.root, self.nodes)


def _content(node: Op) -> tuple[Any, ...]:
    return (type(node), *(getattr(node, s.field) for s in node.SPECS))


def _topo_order(root: str, nodes: Mapping[str, Op]) -> list[str]:
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
        for child in nodes[nid].refs():
            if state.get(child) == 1:
                msg = f"plan has a cycle through node {child!r}"
                raise MalformedFrame(msg)
            if state.get(child) != 2:
                stack.append((child, False))
    return order


# ---------------------------------------------------------------------------
# Literals


def _encode_float(value: float) -> Any:
    if math.isnan(value):
        return {"$float": "nan"}
    if math.isinf(value):
        return {"$float": "inf" if value > 0 else "-inf"}
    return value


def encode_literal(value: Any) -> Any:
    """Encode a scalar for the plan; anything but a plain scalar raises ``MalformedFrame``."""
    if isinstance(value, str) and len(value) > MAX_STR:
        msg = "string literal too long"
        raise MalformedFrame(msg)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if not -_I64 <= value < _I64:
            msg = f"integer literal {value} outside the int64 range"
            raise MalformedFrame(msg)
        return value
    if isinstance(value, float):
        return _encode_float(value)
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
# Argument codecs, one decoder per argument kind


def _is_strs(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _check_dtype(value: str) -> str:
    if value not in DTYPES:
        msg = f"dtype {value!r} is not supported; use one of {', '.join(sorted(DTYPES))}"
        raise MalformedFrame(msg)
    return value


@dataclass(frozen=True, slots=True)
class _Arg:
    """The argument being decoded: where it is (for messages), its enum, the plan's node ids."""

    where: str
    enum: frozenset[str] | None
    ids: Mapping[str, Any]

    def bad(self, expected: str) -> NoReturn:
        msg = f"plan argument {self.where} must be {expected}"
        raise MalformedFrame(msg)

    def ref(self, value: Any) -> str:
        if not isinstance(value, str) or value not in self.ids:
            msg = f"plan argument {self.where} references unknown node {value!r}"
            raise MalformedFrame(msg)
        return value


def _dec_node(a: _Arg, raw: Any) -> Any:
    return a.ref(raw)


def _dec_operand(a: _Arg, raw: Any) -> Any:
    if isinstance(raw, dict) and set(raw) == {"ref"}:
        return a.ref(raw["ref"])
    if isinstance(raw, dict) and set(raw) == {"lit"}:
        return Lit(decode_literal(raw["lit"]))
    a.bad('{"ref": id} or {"lit": literal}')


def _dec_str(a: _Arg, raw: Any) -> Any:
    if not isinstance(raw, str):
        a.bad("a string")
    if a.enum is not None and raw not in a.enum:
        msg = f"plan argument {a.where} must be one of {sorted(a.enum)}, not {raw!r}"
        raise MalformedFrame(msg)
    return check_name(raw, a.where)


def _dec_strs(a: _Arg, raw: Any) -> Any:
    if not _is_strs(raw):
        a.bad("a list of strings")
    return tuple(check_name(v, a.where) for v in raw)


def _dec_int(a: _Arg, raw: Any) -> Any:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < _I64:
        a.bad("a non-negative int64")
    return raw


def _dec_bool(a: _Arg, raw: Any) -> Any:
    if not isinstance(raw, bool):
        a.bad("a bool")
    return raw


def _dec_bools(a: _Arg, raw: Any) -> Any:
    if not isinstance(raw, list) or not all(isinstance(v, bool) for v in raw):
        a.bad("a list of bools")
    return tuple(raw)


def _dec_literal(a: _Arg, raw: Any) -> Any:
    return decode_literal(raw)


def _dec_literals(a: _Arg, raw: Any) -> Any:
    if not isinstance(raw, list) or len(raw) > MAX_LITERALS:
        a.bad(f"a list of at most {MAX_LITERALS} literals")
    return tuple(decode_literal(v) for v in raw)


def _dec_dtype_spec(a: _Arg, raw: Any) -> Any:
    if isinstance(raw, str):
        return _check_dtype(raw)
    if isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values()):
        return {check_name(k, a.where): _check_dtype(v) for k, v in raw.items()}
    a.bad("a dtype name or an object of column: dtype")


def _dec_rename_map(a: _Arg, raw: Any) -> Any:
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        a.bad("an object of old: new column names")
    return {check_name(k, a.where): check_name(v, a.where) for k, v in raw.items()}


def _dec_suffixes(a: _Arg, raw: Any) -> Any:
    if not _is_strs(raw) or len(raw) != 2:
        a.bad("a list of two strings")
    return (raw[0], raw[1])


def _dec_aggs(a: _Arg, raw: Any) -> Any:
    if not isinstance(raw, list) or not raw or not all(_is_strs(t) and len(t) == 3 for t in raw):
        a.bad("a non-empty list of [output, column, func] triples")
    for _, _, func in raw:
        if func not in AGG_FUNCS:
            msg = f"unknown aggregation {func!r}; known: {', '.join(sorted(AGG_FUNCS))}"
            raise MalformedFrame(msg)
    return tuple((check_name(o, a.where), check_name(c, a.where), f) for o, c, f in raw)


def _dec_assigns(a: _Arg, raw: Any) -> Any:
    if not isinstance(raw, list) or not raw or not all(isinstance(t, list) and len(t) == 2 for t in raw):
        a.bad("a non-empty list of [name, operand] pairs")
    return tuple((check_name(n, a.where), _dec_operand(a, v)) for n, v in raw)


_DECODERS: dict[ArgKind, Callable[[_Arg, Any], Any]] = {
    "node": _dec_node, "operand": _dec_operand, "str": _dec_str, "strs": _dec_strs, "int": _dec_int,
    "bool": _dec_bool, "bools": _dec_bools, "literal": _dec_literal, "literals": _dec_literals,
    "dtype_spec": _dec_dtype_spec, "rename_map": _dec_rename_map, "suffixes": _dec_suffixes,
    "aggs": _dec_aggs, "assigns": _dec_assigns,
}  # fmt: skip


def _enc_operand(value: Any, node_id: Callable[[Any], str]) -> Any:
    return {"lit": encode_literal(value.value)} if isinstance(value, Lit) else {"ref": node_id(value)}


_ENCODERS: dict[ArgKind, Callable[[Any, Callable[[Any], str]], Any]] = {
    "node": lambda v, node_id: node_id(v),
    "operand": _enc_operand,
    "strs": lambda v, _: list(v),
    "bools": lambda v, _: list(v),
    "suffixes": lambda v, _: list(v),
    "literal": lambda v, _: encode_literal(v),
    "literals": lambda v, _: [encode_literal(x) for x in v],
    "dtype_spec": lambda v, _: dict(v) if isinstance(v, Mapping) else v,
    "rename_map": lambda v, _: dict(v),
    "aggs": lambda v, _: [list(t) for t in v],
    "assigns": lambda v, node_id: [[n, _enc_operand(x, node_id)] for n, x in v],
}


def _decode_node(nid: str, raw: Any, ids: Mapping[str, Any]) -> Op:
    if not isinstance(raw, dict) or set(raw) != {"op", "args"} or not isinstance(raw["args"], dict):
        msg = f'plan node {nid!r} must be an object with exactly "op" and "args"'
        raise MalformedFrame(msg)
    name = raw["op"]
    cls = OP_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        msg = f"unknown plan op {name!r}"
        raise MalformedFrame(msg)
    if set(raw["args"]) != {s.wire for s in cls.SPECS}:
        msg = f"op {name!r} takes exactly the arguments {sorted(OPS[name])}, got {sorted(raw['args'])}"
        raise MalformedFrame(msg)
    fields = {s.field: _DECODERS[s.kind](_Arg(f"{name}.{s.wire}", s.enum, ids), raw["args"][s.wire]) for s in cls.SPECS}
    return cls(**fields)


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
    nodes = {nid: _decode_node(nid, raw, raw_nodes) for nid, raw in raw_nodes.items()}
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


def plan_to_obj(root: Any, nodes: Mapping[Any, Op], node_id: Callable[[Any], str] | None = None) -> dict[str, Any]:
    """Encode a plan as a JSON-ready object; ``node_id`` maps nodes (keys and references) to ids."""
    to_id = node_id if node_id is not None else str
    out: dict[str, Any] = {}
    for key, node in nodes.items():
        if OP_CLASSES.get(node.op) is not type(node):
            msg = f"cannot encode {type(node).__name__}: it is not an op of the plan format"
            raise MalformedFrame(msg)
        args = {}
        for s in node.SPECS:
            value = getattr(node, s.field)
            encode = _ENCODERS.get(s.kind)
            args[s.wire] = encode(value, to_id) if encode is not None else value
        out[to_id(key)] = {"op": node.op, "args": args}
    return {"version": PLAN_VERSION, "root": to_id(root), "nodes": out}


def plan_to_json(plan: Plan) -> str:
    """Encode a plan as canonical JSON (sorted keys, no whitespace, ASCII)."""
    text = json.dumps(plan_to_obj(plan.root, plan.nodes), sort_keys=True, separators=(",", ":"), allow_nan=False)
    plan_from_json(text)  # never emit what the other side would refuse
    return text


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
        schemas[nid] = plan.nodes[nid].infer(InferCtx(schemas.__getitem__, source_of, nid))
    return schemas
