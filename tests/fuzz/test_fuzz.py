"""Fuzzing in CI: a short atheris run per target, and mutated frames against a real kernel.

The long run (>= 100,000 inputs per target) is ``bench/fuzz_long.py``; its figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import os
import random
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

import mesatee_notebook as mn
from mesatee_notebook.errors import MesateeError, error_from_wire
from mesatee_notebook.wire.framing import Limits, pack_header
from mesatee_notebook.wire.messages import PROTOCOL_VERSION
from mesatee_notebook.wire.stream import recv_message
from tests.conftest import KernelProc
from tests.fuzz import targets

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_short_atheris_run_finds_no_untyped_exception(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.run",
            name,
            "-max_total_time=3",
            "-runs=200000",
            f"-artifact_prefix={tmp_path}/",
            "-seed=1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Uncaught Python exception" not in out, out[-4000:]
    runs = re.search(r"Done (\d+) runs", out)
    assert runs is not None and int(runs.group(1)) > 1000, out[-2000:]
    assert not list(tmp_path.glob("crash-*"))


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_seeds_are_accepted(name: str) -> None:
    """The seeds are valid inputs, so the fuzzer starts from the interesting side of every check."""
    for seed in targets.seeds(name):
        if name == "codecs" and seed[0] == 5:  # the pickle seed must be refused (typed), not decoded
            with pytest.raises(MesateeError):
                targets.codecs(seed)
            continue
        if name == "message":  # a message seed exercises several checks; some of them refuse it (typed)
            targets.run_one(targets.message, seed)
        else:
            targets.TARGETS[name](seed)


# -- the network: mutated frames against a real kernel -------------------------------------------------------------


def _frame(header: dict[str, object], payloads: list[bytes] | None = None) -> bytes:
    payloads = payloads or []
    return pack_header(header, [len(p) for p in payloads]) + b"".join(payloads)


def _valid_frames() -> list[bytes]:
    return [
        _frame({"t": "ping", "id": 2}, []),
        _frame({"t": "session.open", "id": 3, "name": "fz"}, []),
        _frame({"t": "whoami", "id": 4}, []),
        _frame(
            {
                "t": "execute",
                "id": 5,
                "session": "x",
                "token": "y",
                "nonce": "n" * 32,
                "code": "1",
                "inputs": [{"name": "a", "kind": "npy"}],
                "outputs": [],
            },
            [b"\x93NUMPY"],
        ),
        _frame(
            {
                "t": "call",
                "id": 6,
                "service": "dataset.list",
                "nonce": "m" * 32,
                "args": {},
                "inputs": [{"name": "x", "kind": "msgpack"}],
            },
            [msgpack.packb({"a": 1})],
        ),
        _frame({"t": "interrupt", "id": 7, "session": "x", "token": "y"}, []),
        _frame({"t": "call.cancel", "id": 8, "nonce": "q" * 32}, []),
        _frame({"t": "audit", "id": 9}, []),
    ]


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data)) if data else 0
        if op == 0 and data:
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[pos] = rng.choice([0, 0xFF, 0x7F, 0x80, 0xC0, 0xC1, 0x90, 0x80 | rng.randrange(16)])
        elif op == 2:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and len(data) > 1:
            del data[pos : pos + rng.randint(1, 8)]
        else:
            data = data[: rng.randrange(len(data) + 1)]
    return bytes(data)


def _tls(kernel: KernelProc) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx.wrap_socket(socket.create_connection((kernel.host, kernel.port), timeout=10))


@pytest.mark.slow
def test_mutated_frames_against_a_real_kernel(kernel: KernelProc) -> None:
    """200 mutated frames, each after a valid hello: every reply is a typed error or a valid answer, nothing is
    logged as a traceback, and an honest client is served afterwards."""
    rng = random.Random(11)
    frames = _valid_frames()
    typed = closed = answered = waiting = 0
    for i in range(200):
        sock = _tls(kernel)
        try:
            sock.sendall(pack_header({"t": "hello", "id": 1, "versions": [PROTOCOL_VERSION], "client": "fz"}, []))
            assert recv_message(sock, Limits()).type == "hello.ok"
            sock.settimeout(0.5)  # a mutated length the frame does not fill: the kernel waits for the rest
            sock.sendall(_mutate(rng, frames[i % len(frames)]))
            if i % 4 == 0:  # sometimes the peer hangs up right after the frame (often mid-frame)
                closed += 1
                continue
            try:
                reply = recv_message(sock, Limits())
            except TimeoutError:
                waiting += 1
                continue
            except (EOFError, mn.KernelConnectionError, ssl.SSLError, OSError):
                closed += 1
                continue
            if reply.type == "error":
                err = error_from_wire(reply.header)
                assert type(err) is not MesateeError or "internal error" not in err.message, err.message
                typed += 1
            else:
                answered += 1
        finally:
            sock.close()
    # most mutations are caught by a typed check, not by dropping the connection
    assert typed > 40, (typed, answered, closed, waiting)
    log = (kernel.data_dir / "serve.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "internal error" not in log
    s = mn.connect(kernel.url, policy=kernel.policy())
    try:
        assert s.run("6 * 7").value == 42
    finally:
        s.close()
