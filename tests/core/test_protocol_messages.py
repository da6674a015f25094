"""The typed messages of wire/protocol.py: every one survives the framing both ways; bad fields are typed errors."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesatee_notebook.errors import MalformedFrame, ProtocolError
from mesatee_notebook.wire import protocol as p
from mesatee_notebook.wire.framing import PREFIX as FRAME_PREFIX
from mesatee_notebook.wire.framing import Limits, pack_header, unpack_header, unpack_prefix
from mesatee_notebook.wire.messages import REQUEST_TYPES

texts = st.text(max_size=40)
idents = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
nonces = st.text(alphabet="0123456789abcdef", min_size=16, max_size=128)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | texts,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(texts, kids, max_size=3),
    max_leaves=8,
)
json_maps = st.dictionaries(texts, json_values, max_size=4)
timeouts = st.none() | st.floats(min_value=0.001, max_value=1e6, allow_nan=False)
specs = st.builds(p.ValueSpec, idents, st.sampled_from(["npy", "bytes", "arrow.frame", "json"]), json_maps)
wire_specs = st.lists(
    st.fixed_dictionaries({"name": idents, "kind": texts, "meta": json_maps, "inline": st.integers(0, 9)}), max_size=3
).map(tuple)

MESSAGES: dict[type[p.ProtocolMessage], st.SearchStrategy[Any]] = {
    p.Hello: st.builds(
        p.Hello,
        st.lists(st.integers(0, 99), max_size=3).map(tuple),
        texts,
        st.none() | st.binary(min_size=16, max_size=32),
        st.none() | st.fixed_dictionaries({"blob": st.binary(max_size=8), "secret": st.binary(max_size=8)}),
    ),
    p.Auth: st.builds(p.Auth, st.binary(min_size=32, max_size=32), st.binary(min_size=64, max_size=64)),
    p.Whoami: st.just(p.Whoami()),
    p.AuditRequest: st.just(p.AuditRequest()),
    p.Ping: st.just(p.Ping()),
    p.SessionList: st.just(p.SessionList()),
    p.Migration: st.just(p.Migration("status"))
    | st.builds(p.Migration, st.just("approve"), json_maps, st.binary(max_size=32), st.binary(max_size=64)),
    p.SessionOpen: st.builds(p.SessionOpen, st.text(min_size=1, max_size=128)),
    p.SessionClose: st.builds(p.SessionClose, texts, texts),
    p.SessionRestart: st.builds(p.SessionRestart, texts, texts),
    p.Interrupt: st.builds(p.Interrupt, texts, texts),
    p.Execute: st.builds(
        p.Execute,
        texts,
        texts,
        nonces,
        st.text(max_size=200),
        st.lists(specs, max_size=3).map(tuple),
        st.lists(idents, max_size=3).map(tuple),
        timeouts,
        st.booleans(),
    ),
    p.Call: st.builds(
        p.Call, texts, nonces, json_maps, st.lists(specs, max_size=3).map(tuple), timeouts, st.booleans()
    ),
    p.CallCancel: st.builds(p.CallCancel, nonces),
    p.RunCell: st.builds(p.RunCell, texts, wire_specs, st.lists(idents, max_size=3).map(tuple), st.booleans()),
    p.RunService: st.builds(p.RunService, texts, texts, json_maps, wire_specs, st.booleans(), st.booleans()),
    p.Shutdown: st.just(p.Shutdown()),
    p.SealGet: st.builds(p.SealGet, texts),
    p.SealPut: st.builds(p.SealPut, texts),
    p.SealList: st.builds(p.SealList, texts),
    p.SealDelete: st.builds(p.SealDelete, texts),
    p.DataGet: st.builds(p.DataGet, texts),
    p.ClusterPsi: st.builds(p.ClusterPsi, texts),
    p.AuditAppend: st.builds(p.AuditAppend, texts, json_maps, st.lists(texts, max_size=3).map(tuple)),
    p.FaasRun: st.builds(p.FaasRun, timeouts),
    p.KeyCall: st.builds(p.KeyCall, st.sampled_from(["sign", "verify", "encrypt", "decrypt", "info"])),
    p.Ready: st.builds(p.Ready, st.none() | st.integers(1, 2**22)),
    p.Stream: st.builds(p.Stream, st.sampled_from(["stdout", "stderr"]), texts),
    p.LogLine: st.builds(p.LogLine, texts),
    p.ProgressUpdate: st.builds(p.ProgressUpdate, json_maps),
    p.ResultChunk: st.builds(p.ResultChunk, texts, st.integers(0, 2**40), st.integers(0, 2**40)),
    p.Result: st.builds(p.Result, wire_specs, st.none() | json_maps, st.none() | texts),
    p.ExecutorError: st.builds(p.ExecutorError, texts, texts, json_maps),
}


def _payload_count(m: p.ProtocolMessage) -> int:
    return len(m.inputs) if isinstance(m, (p.Execute, p.Call)) else 0


def _through_the_framing(m: p.ProtocolMessage) -> p.ProtocolMessage:
    """Pack the message as a frame, parse it back with the receiving side's checks, rebuild the class."""
    n = _payload_count(m)
    frame = pack_header(m.to_header(), [1] * n)
    header_len, total = unpack_prefix(frame[: FRAME_PREFIX.size], Limits())
    header = unpack_header(frame[FRAME_PREFIX.size : FRAME_PREFIX.size + header_len], total, Limits())
    assert header["t"] == type(m).T
    return type(m).from_header(header, n)


def test_every_message_class_has_a_strategy_and_a_unique_tag_per_direction() -> None:
    every = {c for c in vars(p).values() if isinstance(c, type) and issubclass(c, p.ProtocolMessage) and c.T}
    assert every == set(MESSAGES)
    assert len(p.REQUESTS) == len(set(p.REQUESTS.values()))
    assert frozenset(p.REQUESTS) == REQUEST_TYPES  # the old name, derived from the classes


@pytest.mark.parametrize("cls", list(MESSAGES), ids=lambda c: c.__name__)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip(cls: type[p.ProtocolMessage], data: st.DataObject) -> None:
    m = data.draw(MESSAGES[cls])
    back = _through_the_framing(m)
    assert back == m
    assert {f.name for f in fields(back)} == {f.name for f in fields(m)}


@pytest.mark.parametrize(
    ("header", "payloads", "needle"),
    [
        ({"t": "hello", "versions": "1"}, 0, "list of integer protocol versions"),
        ({"t": "hello", "versions": [True]}, 0, "list of integer protocol versions"),
        ({"t": "auth", "public_key": "k", "signature": b"s"}, 0, "'public_key' of type bytes"),
        ({"t": "session.open", "name": "x" * 129}, 0, "at most 128 characters"),
        ({"t": "execute", "nonce": "short", "code": "1"}, 0, "fresh random nonce"),
        ({"t": "execute", "nonce": "n" * 16}, 0, "'code' of type str"),
        ({"t": "execute", "nonce": "n" * 16, "code": "1", "outputs": ["not an id"]}, 0, "Python identifiers"),
        ({"t": "execute", "nonce": "n" * 16, "code": "1", "inputs": [{"name": "x"}]}, 0, "exactly one payload"),
        ({"t": "execute", "nonce": "n" * 16, "code": "1", "inputs": [{"name": "1x"}]}, 1, "Python identifier"),
        ({"t": "call", "nonce": "n" * 16, "service": "s", "args": [1]}, 0, "service arguments must be a map"),
        ({"t": "call", "nonce": "n" * 16}, 0, "'service' of type str"),
        ({"t": "call.cancel"}, 0, "'nonce' of type str"),
        ({"t": "migration", "op": "drop"}, 0, "op 'status' or 'approve'"),
        ({"t": "migration", "op": "approve", "signature": b""}, 0, "'public_key' of type bytes"),
    ],
)
def test_bad_fields_are_refused_once_with_a_sentence(header: dict[str, Any], payloads: int, needle: str) -> None:
    with pytest.raises(MalformedFrame, match=needle.replace("(", r"\(").replace(")", r"\)")):
        p.parse_request(header, payloads)


def test_an_unknown_request_is_a_protocol_error_naming_it() -> None:
    with pytest.raises(ProtocolError, match="format_disk"):
        p.parse_request({"t": "format_disk"}, 0)
    assert p.parse_executor_message({"t": "format_disk"}) is None


def test_session_requests_keep_a_wrong_token_for_the_kernel_to_refuse() -> None:
    m = p.parse_request({"t": "session.close", "session": 7, "token": 5}, 0)
    assert m == p.SessionClose("7", "")  # the kernel then answers NotFound / "wrong token", as before
