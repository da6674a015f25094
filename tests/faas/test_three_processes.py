"""Issue 17's party tests with three parties, each its own OS process (``tests/faas/party_proc.py``).

A (developer and receiver) registers and creates; B and C own the input datasets and approve. Each process holds
only its own identity directory and its own attested TLS connection; the test process only relays commands.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.conftest import KernelProc
from tests.faas.conftest import unique

ROOT = Path(__file__).resolve().parents[2]
STATS = """
import pandas as pd

def main(left, right, scale=1):
    both = pd.concat([left, right], ignore_index=True)
    return {"rows": len(both), "mean_y": float(both["y"].mean()) * scale}
"""
SIGNED = """
import pandas as pd

def main(left, right, key):
    total = int(pd.concat([left, right])["y"].sum())
    message = f"sum(y)={total}".encode()
    return {"message": message, "signature": mesatee.keys.sign(key, message)}
"""


class Party:
    """A client process for one party, driven by one JSON command per line."""

    def __init__(self, kernel: KernelProc, identity: Path) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.faas.party_proc",
                kernel.url,
                kernel.fingerprint,
                kernel.measurement,
                str(identity),
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.party_id = str(self._read()["ready"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            msg = f"party process exited with {self.proc.wait()}"
            raise RuntimeError(msg)
        return dict(json.loads(line))

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        """Send one command; the reply is ``{"ok": value}`` or ``{"error": class, "code": ..., "message": ...}``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def ok(self, op: str, **kw: Any) -> Any:
        reply = self.call(op, **kw)
        assert "ok" in reply, reply
        return reply["ok"]

    def refused(self, op: str, **kw: Any) -> dict[str, Any]:
        reply = self.call(op, **kw)
        assert reply.get("error") == "PolicyViolation", reply
        return reply

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Three:
    def __init__(self, kernel: KernelProc, root: Path) -> None:
        self.a, self.b, self.c = (Party(kernel, root / n) for n in ("a", "b", "c"))
        self.ds_b = self.b.ok("upload", name=unique("pb").replace("-", "_"), seed=1, rows=120)
        self.ds_c = self.c.ok("upload", name=unique("pc").replace("-", "_"), seed=2, rows=80)
        self.stats = self.a.ok("register", name=unique("stats3"), source=STATS, inputs=["left", "right"])

    def create(self, name: str, **kw: Any) -> dict[str, Any]:
        kw.setdefault("function", self.stats)
        kw.setdefault("receivers", [self.a.party_id])
        return dict(self.a.ok("create", name=name, inputs={"left": self.ds_b, "right": self.ds_c}, **kw))


@pytest.fixture(scope="module")
def three(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Three]:
    t = Three(kernel, tmp_path_factory.mktemp("three"))
    yield t
    for p in (t.a, t.b, t.c):
        p.close()


def test_registered_by_one_approved_by_two_result_only_to_the_receiver(three: Three) -> None:
    t = three
    name = unique("t3")
    st = t.create(name, args={"scale": 3})
    assert st["state"] == "created"
    assert st["missing_approvals"] == sorted([t.b.party_id, t.c.party_id])
    seen = t.b.ok("status", name=name)  # B checks what it approves: the function digest and the args
    assert seen["params"]["function"] == t.stats and seen["params"]["args"] == {"scale": 3}
    assert t.b.ok("approve", name=name, spec_digest=seen["spec_digest"])["state"] == "waiting_for_inputs"
    done = t.c.ok("approve", name=name)
    assert done["state"] == "done", done["error"]
    res = t.a.ok("result", name=name)
    assert res["value"]["rows"] == 200 and res["function"] == t.stats
    assert res["approvals"] == sorted([t.b.party_id, t.c.party_id])
    for owner in (t.b, t.c):  # the owners approved; they are not receivers
        assert "receiver" in owner.refused("result", name=name)["message"]


def test_refused_without_every_approval(three: Three) -> None:
    t = three
    name = unique("t3")
    t.create(name)
    t.b.ok("approve", name=name)
    refusal = t.a.refused("result", name=name)  # C has not approved: nothing ran
    assert "no result" in refusal["message"] and "waiting_for_inputs" in refusal["message"]
    assert t.a.ok("status", name=name)["missing_approvals"] == [t.c.party_id]


def test_refused_when_the_approval_was_for_other_args(three: Three) -> None:
    t = three
    one, two = unique("t3"), unique("t3")
    first = t.create(one, args={"scale": 1})
    t.create(two, args={"scale": 2})
    # B checked task one (scale=1) and presents that digest for task two (scale=2): refused, nothing recorded
    refusal = t.b.refused("approve", name=two, spec_digest=first["spec_digest"])
    assert "digest" in refusal["message"]
    assert t.b.party_id in t.a.ok("status", name=two)["missing_approvals"]


def test_refused_when_the_approval_was_for_another_function(three: Three) -> None:
    t = three
    other = t.a.ok("register", name=unique("stats3b"), source=STATS + "\n# v2\n", inputs=["left", "right"])
    one, two = unique("t3"), unique("t3")
    first = t.create(one, args={"scale": 1})
    t.create(two, args={"scale": 1}, function=other)
    assert "digest" in t.c.refused("approve", name=two, spec_digest=first["spec_digest"])["message"]


def test_a_function_signs_with_the_creators_key_named_in_the_task(three: Three) -> None:
    t = three
    key = unique("k3")
    pem = t.a.ok("key.create", name=key)
    fn = t.a.ok("register", name=unique("signed"), source=SIGNED, inputs=["left", "right"])
    name = unique("t3k")
    st = t.create(name, function=fn, args={"key": key}, keys=[key])
    assert t.b.ok("status", name=name)["params"]["keys"] == [key]  # the owners see, and approve, the key list
    t.b.ok("approve", name=name)
    done = t.c.ok("approve", name=name)
    assert done["state"] == "done", done["error"]
    value = t.a.ok("result", name=name)["value"]
    message, sig = (base64.b64decode(value[k]["b64"]) for k in ("message", "signature"))
    pub = serialization.load_pem_public_key(str(pem).encode())
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    pub.verify(sig, message)  # raises if the enclave's signature does not verify outside
    assert message.startswith(b"sum(y)=") and st["state"] == "created"
