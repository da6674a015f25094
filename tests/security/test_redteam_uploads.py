"""Red team, session 6: a hostile data owner's crafted Arrow uploads, on a real kernel over TLS.

The upload bytes are written with pyarrow directly (not by the client's encoder), so they hold what the client
would never send: union and run-end encoded columns, a ``pandas`` schema metadata that lies, nested structs,
an extension type nobody registered. Each is refused with a typed error or stored; an analyst's query over a
stored one fails with a typed error that quotes no data; no traceback reaches the kernel's log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pytest

import mesatee_notebook as mn
import mesatee_notebook.remote.session as remote_session
from mesatee_notebook.errors import MalformedFrame, NotFound
from mesatee_notebook.wire.codecs import Encoded
from tests.conftest import KernelProc


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def _lying_metadata() -> pa.Table:
    meta = {"index_columns": ["nowhere"], "column_indexes": [], "columns": [], "pandas_version": "2.0"}
    return pa.table({"a": range(20)}).replace_schema_metadata({b"pandas": json.dumps(meta).encode()})


class _Unregistered(pa.ExtensionType):
    def __init__(self) -> None:
        super().__init__(pa.int64(), "rt.unregistered")

    def __arrow_ext_serialize__(self) -> bytes:
        return b"\xff" * 64

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type: Any, serialized: bytes) -> _Unregistered:
        return cls()


def _uploader(monkeypatch: pytest.MonkeyPatch, owner: mn.Session) -> Any:
    raw: dict[bytes, bytes] = {}
    real = remote_session.encode_value

    def encode(value: Any, **kw: Any) -> Encoded:
        if isinstance(value, bytes) and value in raw:
            return Encoded("arrow.frame", [raw[value]])
        return real(value, **kw)

    monkeypatch.setattr(remote_session, "encode_value", encode)

    def upload(name: str, table: pa.Table) -> None:
        key = f"crafted:{name}".encode()
        raw[key] = _ipc(table)
        args = {"name": name, "policy": {"min_group_size": 3}, "replace": True}
        owner.call("dataset.upload", args, {"data": key})

    return upload


def test_crafted_arrow_uploads_get_typed_errors(
    kernel: KernelProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = cast("mn.Policy", kernel.policy())
    with (
        mn.connect(kernel.url, policy=policy, identity=tmp_path / "owner") as owner,
        mn.connect(kernel.url, policy=policy, identity=tmp_path / "analyst") as analyst,
    ):
        upload = _uploader(monkeypatch, owner)
        union = pa.UnionArray.from_sparse(
            pa.array(np.zeros(20, dtype=np.int8)), [pa.array(range(20)), pa.array([str(i) for i in range(20)])]
        )
        ree = pa.RunEndEncodedArray.from_arrays(pa.array([20], type=pa.int32()), pa.array([5]))
        for name, table in (("rt_union", pa.table({"u": union})), ("rt_ree", pa.table({"r": ree})),
                            ("rt_meta", _lying_metadata())):  # fmt: skip
            with pytest.raises(MalformedFrame, match="cannot be read as a DataFrame"):
                upload(name, table)
        secret = [{"a": 123_457 + i, "b": {"c": f"secret-{i}"}} for i in range(20)]
        upload("rt_struct", pa.table({"s": pa.array(secret), "g": ["x"] * 20}))
        ext = pa.ExtensionArray.from_storage(_Unregistered(), pa.array(range(20)))
        upload("rt_ext", pa.table({"e": ext, "g": ["x"] * 20}))
        struct = analyst.dataframe("rt_struct")
        with pytest.raises(mn.RemoteExecutionError, match="details withheld") as info:
            struct.groupby("s").agg(n=("g", "size")).collect()
        assert "secret" not in str(info.value) and "123457" not in str(info.value)
        ext_frame = analyst.dataframe("rt_ext")
        assert len(ext_frame) == 20
        assert owner.run("6 * 7").value == 42
    assert "Traceback" not in (kernel.data_dir / "serve.log").read_text(errors="replace")


def test_an_upload_refuses_column_names_no_query_can_name(
    kernel: KernelProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = cast("mn.Policy", kernel.policy())
    with mn.connect(kernel.url, policy=policy, identity=tmp_path / "owner") as owner:
        upload = _uploader(monkeypatch, owner)
        bad = [
            pa.table({"": range(20), "ok": range(20)}),
            pa.table({"\x00x": range(20)}),
            pa.table({"x" * 1025: range(20)}),
            pa.Table.from_arrays([pa.array(range(20)), pa.array(range(20))], names=["a", "a"]),
        ]
        for i, table in enumerate(bad):
            with pytest.raises(MalformedFrame):
                upload(f"rt_badnames{i}", table)
            with pytest.raises(NotFound):  # refused whole: nothing was stored
                owner.dataframe(f"rt_badnames{i}")
        assert owner.run("1 + 1").value == 2
