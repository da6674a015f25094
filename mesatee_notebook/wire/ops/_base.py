"""The base of the typed op nodes: argument kinds, the catalog registry, schema inference context."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, cast

from mesatee_notebook.errors import MalformedFrame
from mesatee_notebook.wire.schema import Lit, Schema, SourceInfo

__all__ = ["ArgKind", "InferCtx", "OP_CLASSES", "Op", "arg", "op"]

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


@dataclass(frozen=True, slots=True)
class ArgSpec:
    """One argument of an op: its field on the node class, its name in the plan JSON, its kind."""

    field: str
    wire: str
    kind: ArgKind
    enum: frozenset[str] | None = None


def arg(kind: ArgKind, *, wire: str | None = None, enum: frozenset[str] | None = None) -> dict[str, Any]:
    """The field metadata that makes a node field a plan argument: ``field(metadata=arg("node"))``.

    ``wire`` is its JSON name if not the field name; ``enum`` the closed set of values a string takes.
    """
    return {"kind": kind, "wire": wire, "enum": enum}


@dataclass(frozen=True, slots=True)
class InferCtx:
    """What a node's schema rule may look up: its inputs' schemas, a dataset's schema, its own token.

    ``token`` identifies the node (it becomes the origin of the values it indexes anew): the node
    object on the client, the node id in the enclave.
    """

    schema_of: Callable[[Any], Schema]
    source_of: Callable[[str], SourceInfo]
    token: Hashable


#: Every op of the plan format, by its JSON name: the one catalog both sides use.
OP_CLASSES: dict[str, type[Op]] = {}

_O = TypeVar("_O", bound="type[Op]")


def op(name: str) -> Callable[[_O], _O]:
    """Register a node class under its plan op ``name`` (its ``arg`` fields become the op's arguments)."""

    def register(cls: _O) -> _O:
        if name in OP_CLASSES:
            msg = f"op {name!r} is registered twice"
            raise AssertionError(msg)
        specs = tuple(
            ArgSpec(f.name, f.metadata["wire"] or f.name, f.metadata["kind"], f.metadata["enum"])
            for f in dataclasses.fields(cast("Any", cls))
            if "kind" in f.metadata
        )
        cls.op = name
        cls.SPECS = specs
        OP_CLASSES[name] = cls
        return cls

    return register


def _schema_attr(target: Any) -> Schema:
    schema: Schema = target.schema
    return schema


class Op:
    """A typed op node. Subclasses are frozen dataclasses registered with :func:`op`.

    A child reference is the child itself: a node object in a client graph, a node id in a decoded
    plan; an operand is such a reference or a :class:`~mesatee_notebook.wire.schema.Lit`.
    """

    __slots__ = ("_schema",)
    _schema: Schema
    op: ClassVar[str]
    SPECS: ClassVar[tuple[ArgSpec, ...]]

    def infer(self, ctx: InferCtx) -> Schema:
        """Type this node from its arguments and its inputs' schemas (raises for a type error)."""
        raise NotImplementedError

    def label(self) -> str:
        """A short description of the node for ``explain()``."""
        return self.op

    @property
    def args(self) -> dict[str, Any]:
        """The node's arguments by their plan JSON names."""
        return {s.wire: getattr(self, s.field) for s in self.SPECS}

    def refs(self) -> list[Any]:
        """The nodes this node reads, in argument order."""
        out: list[Any] = []
        for s in self.SPECS:
            value = getattr(self, s.field)
            if s.kind == "node" or (s.kind == "operand" and not isinstance(value, Lit)):
                out.append(value)
            elif s.kind == "assigns":
                out.extend(v for _, v in value if not isinstance(v, Lit))
        return out

    def _source_info(self, name: str) -> SourceInfo:
        info: SourceInfo | None = getattr(self, "info", None)
        if info is None or info.name != name:
            msg = f"dataset {name!r} is not known to this graph"
            raise MalformedFrame(msg)
        return info

    @property
    def schema(self) -> Schema:
        """The schema of a node in a client graph (children are node objects), computed once."""
        try:
            cached: Schema = self._schema
        except AttributeError:
            cached = self.infer(InferCtx(_schema_attr, self._source_info, self))
            object.__setattr__(self, "_schema", cached)
        return cached
