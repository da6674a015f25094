"""The DataFrame op catalog: one typed node class per plan op, shared by the client and the enclave.

Each op is a frozen dataclass registered with :func:`~mesatee_notebook.wire.ops._base.op`. Its
``arg`` fields are the op's plan arguments (their kinds drive the JSON codec in
:mod:`mesatee_notebook.wire.plan`), and its ``infer`` method is its schema rule, which the client runs
when an expression is built and the enclave runs on a received plan. The enclave evaluates the same
nodes with a ``visit_<ClassName>`` method (:mod:`mesatee_notebook.enclave.frame_eval`).

A new op: a class in the family module it belongs to (``rows``, ``values``, ``aggregates`` or ``reshape``), its
``visit_`` method in the enclave, and a case in ``tests/frames/test_catalog.py``.
"""

from mesatee_notebook.wire.ops._base import OP_CLASSES, ArgKind, ArgSpec, InferCtx, Op, arg, op
from mesatee_notebook.wire.ops.aggregates import (
    DESCRIBE_STATS,
    Corr,
    CountRows,
    Describe,
    FrameReduce,
    GroupByAgg,
    Reduce,
    ValueCounts,
)
from mesatee_notebook.wire.ops.reshape import GROUP_WINDOW_FUNCS, CorrMatrix, GroupWindow, ModeFrame, SortIndex
from mesatee_notebook.wire.ops.rows import (
    Assign,
    AsType,
    Column,
    Concat,
    DropDuplicates,
    FillNA,
    Filter,
    Head,
    Melt,
    Merge,
    Rename,
    ResetIndex,
    Sample,
    Select,
    SetName,
    Slice,
    SortValues,
    Source,
    Tail,
    ToFrame,
    Top,
)
from mesatee_notebook.wire.ops.values import (
    GROUP_MAP_FUNCS,
    Binary,
    Distinct,
    GroupMap,
    IsIn,
    Map,
    Unary,
    Where,
    Window,
)

__all__ = [
    "DESCRIBE_STATS",
    "OPS",
    "OP_CLASSES",
    "ArgKind",
    "ArgSpec",
    "AsType",
    "Assign",
    "Binary",
    "Column",
    "Concat",
    "Corr",
    "CorrMatrix",
    "CountRows",
    "Describe",
    "Distinct",
    "DropDuplicates",
    "FillNA",
    "Filter",
    "FrameReduce",
    "GROUP_MAP_FUNCS",
    "GROUP_WINDOW_FUNCS",
    "GroupByAgg",
    "GroupMap",
    "GroupWindow",
    "Head",
    "InferCtx",
    "IsIn",
    "Map",
    "Melt",
    "Merge",
    "ModeFrame",
    "Op",
    "Reduce",
    "Rename",
    "ResetIndex",
    "Sample",
    "Select",
    "SetName",
    "Slice",
    "SortIndex",
    "SortValues",
    "Source",
    "Tail",
    "ToFrame",
    "Top",
    "Unary",
    "ValueCounts",
    "Where",
    "Window",
    "arg",
    "op",
]

#: Every op of plan version 1 with the exact kind of each argument (derived from the node classes).
OPS: dict[str, dict[str, ArgKind]] = {name: {s.wire: s.kind for s in cls.SPECS} for name, cls in OP_CLASSES.items()}
