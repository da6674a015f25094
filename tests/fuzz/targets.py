"""Fuzz targets: each takes raw bytes and may raise only a typed error from the one error tree.

A target that raises anything else (``KeyError``, ``TypeError``, ``IndexError``, ...) has found a bug: bad input
must become a :class:`~mesatee_notebook.errors.MesateeError` with a message a person understands.
The same functions back the atheris runs (``tests/fuzz/run.py``) and their seed corpora (:func:`seeds`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pandas as pd

from mesatee_notebook.errors import MesateeError, error_from_wire
from mesatee_notebook.wire.codecs import decode_value, encode_value
from mesatee_notebook.wire.datapolicy import DataPolicy
from mesatee_notebook.wire.framing import Limits, pack_header, unpack_header, unpack_prefix
from mesatee_notebook.wire.messages import PROTOCOL_VERSION, negotiate, require
from mesatee_notebook.wire.plan import SourceInfo, infer_plan, plan_from_json, plan_to_json
from mesatee_notebook.wire.stream import recv_message

__all__ = ["TARGETS", "seeds"]

#: Small limits, so a fuzzed length prefix cannot make the harness allocate gigabytes.
_LIMITS = Limits(max_header=64 << 10, max_payload=1 << 20, max_payloads=64)
_KINDS = ("arrow.frame", "arrow.series", "npy", "bytes", "msgpack", "pickle")
_SOURCES = {
    "t": SourceInfo(
        "t",
        (("g", "str"), ("v", "int64"), ("x", "float64"), ("d", "datetime64[ns]"), ("ssn", "str")),
        frozenset({"ssn"}),
    ),
    "u": SourceInfo("u", (("g", "str"), ("w", "int64")), frozenset()),
}


class _BytesSocket:
    """The part of a socket ``recv_message`` uses, reading from bytes (EOF at the end)."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def recv_into(self, view: Any, n: int = 0) -> int:
        chunk = self._buf.read(n or len(view))
        view[: len(chunk)] = chunk
        return len(chunk)

    def gettimeout(self) -> float | None:
        return None

    def settimeout(self, value: float | None) -> None:
        del value


def frame(data: bytes) -> None:
    """The frame decoder: prefix, header and payloads from a byte stream, then a round trip."""
    sock = _BytesSocket(data)
    while True:
        try:
            msg = recv_message(sock, _LIMITS, digests=True)  # type: ignore[arg-type]
        except EOFError:
            return
        again = pack_header(msg.header, [len(p) for p in msg.payloads])
        header_len, total = unpack_prefix(again[:16], _LIMITS)
        assert unpack_header(again[16:], total, _LIMITS) == msg.header, "header did not round-trip"
        assert header_len == len(again) - 16


def message(data: bytes) -> None:
    """The message schema: a msgpack header through the checks the kernel applies to requests."""
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return
    if not isinstance(header, dict):
        return
    negotiate_input = header.get("versions")
    try:
        negotiate(negotiate_input, client_version=str(header.get("client", "?")), server_version="0")
    except MesateeError:
        pass
    for key, kind in (("t", str), ("code", str), ("public_key", bytes), ("nonce", str), ("args", dict)):
        try:
            require(header, key, kind)
        except MesateeError:
            pass
    err = error_from_wire(header)
    assert isinstance(err, MesateeError)
    policy = header.get("policy", header)
    if isinstance(policy, dict):
        got = DataPolicy.from_dict(policy)
        assert DataPolicy.from_dict(got.to_dict()) == got, "DataPolicy did not round-trip"


def plan(data: bytes) -> None:
    """The plan decoder: JSON → validated plan → types against two datasets; a valid plan round-trips."""
    p = plan_from_json(data)
    assert plan_from_json(plan_to_json(p)) == p, "plan did not round-trip"
    infer_plan(p, _SOURCES)


def codecs(data: bytes) -> None:
    """Every value codec on fuzzed payloads (first byte picks the kind); what decodes re-encodes."""
    if not data:
        return
    kind = _KINDS[data[0] % len(_KINDS)]
    value = decode_value(kind, bytearray(data[1:]), meta={"name": "s"})
    if kind in ("npy", "bytes", "msgpack"):
        enc = encode_value(value)
        again = decode_value(enc.kind, b"".join(bytes(memoryview(p).cast("B")) for p in enc.parts))
        if kind == "npy":
            assert again.dtype == value.dtype and again.shape == value.shape, "npy did not round-trip"
            assert np.ascontiguousarray(again).tobytes() == np.ascontiguousarray(value).tobytes()
        elif kind == "bytes":
            assert again == value


TARGETS: dict[str, Callable[[bytes], None]] = {"frame": frame, "message": message, "plan": plan, "codecs": codecs}


def run_one(target: Callable[[bytes], None], data: bytes) -> None:
    """Run a target; typed errors are the expected outcome for bad input, anything else propagates."""
    try:
        target(data)
    except MesateeError:
        pass


# -- seed corpora ----------------------------------------------------------------------------------------------


def _plans() -> list[bytes]:
    src = {"op": "source", "args": {"name": "t"}}
    col = {"op": "column", "args": {"input": "s", "name": "v"}}
    plans = [
        {"s": src, "root": {"op": "count_rows", "args": {"input": "s"}}},
        {
            "s": src,
            "root": {
                "op": "groupby_agg",
                "args": {
                    "input": "s",
                    "by": ["g"],
                    "aggs": [["n", "v", "sum"]],
                    "as_index": True,
                    "dropna": True,
                    "sort": True,
                },
            },
        },
        {
            "s": src,
            "c": col,
            "k": {"op": "binary", "args": {"op": "gt", "left": {"ref": "c"}, "right": {"lit": 3}}},
            "f": {"op": "filter", "args": {"input": "s", "predicate": "k"}},
            "root": {"op": "describe", "args": {"input": "f", "columns": ["v", "x"]}},
        },
        {
            "s": src,
            "u": {"op": "source", "args": {"name": "u"}},
            "m": {
                "op": "merge",
                "args": {
                    "left": "s",
                    "right": "u",
                    "how": "inner",
                    "left_on": ["g"],
                    "right_on": ["g"],
                    "suffixes": ["_l", "_r"],
                },
            },
            "w": {"op": "column", "args": {"input": "m", "name": "w"}},
            "root": {"op": "reduce", "args": {"input": "w", "func": "mean"}},
        },
    ]
    return [json.dumps({"version": 1, "root": "root", "nodes": n}).encode() for n in plans]


def seeds(name: str) -> list[bytes]:
    """Valid inputs for a target, for atheris to mutate from."""
    if name == "frame":
        return [
            pack_header({"t": "hello", "id": 1, "versions": [PROTOCOL_VERSION], "client": "fuzz"}, []),
            pack_header({"t": "execute", "id": 2, "code": "x + 1", "inputs": [{"name": "x"}]}, [3]) + b"abc",
            pack_header({"t": "ping", "id": 3}, []) + pack_header({"t": "call", "id": 4}, [1, 2]) + b"xyz",
        ]
    if name == "message":
        return [
            msgpack.packb({"t": "hello", "versions": [1], "client": "0.1"}),
            msgpack.packb({"code": "policy", "message": "no", "details": {"dataset": "d"}}),
            msgpack.packb({"policy": DataPolicy(min_group_size=5, hidden_columns=("ssn",)).to_dict()}),
            msgpack.packb({"t": "auth", "public_key": b"\x00" * 32, "signature": b"\x01" * 64, "args": {}}),
        ]
    if name == "plan":
        return _plans()
    if name == "codecs":
        values: list[Any] = [
            pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", None], "c": [0.5, np.nan, 2.0]}),
            pd.Series([1.5, 2.5], name="s"),
            np.arange(12, dtype=np.int32).reshape(3, 4),
            b"raw bytes",
            {"k": [1, 2.5, "s", None, True]},
        ]
        out = []
        for v in values:
            enc = encode_value(v)
            body = b"".join(bytes(memoryview(p).cast("B")) for p in enc.parts)
            out.append(bytes([_KINDS.index(enc.kind)]) + body)
        out.append(bytes([_KINDS.index("pickle")]) + b"\x80\x04K\x01.")
        return out
    msg = f"no fuzz target {name!r} (known: {', '.join(TARGETS)})"
    raise KeyError(msg)
