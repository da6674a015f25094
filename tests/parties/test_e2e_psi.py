"""PSI end to end: three parties in separate client processes against one real kernel.

Each party is its own Python process (a small JSON-lines driver below) with its own identity directory; the
kernel is a real ``mesatee-enclave serve``. Covered: every refusal (non-receiver result, missing approval, submit
twice, non-member submit), results against Python sets (duplicates, empty and disjoint sets, int/str/bytes, NFC),
join-and-compute through a SecureDataFrame, the audit log per party (verified in the party process and offline, and
a changed entry is caught), a kernel restart that restores jobs, and a flipped byte in a sealed job file.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import unicodedata
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from mesatee_notebook.attestation.audit_verify import verify_audit_log
from mesatee_notebook.errors import TamperedData
from tests.conftest import KernelProc, start_kernel, stop_kernel

PARTY_SCRIPT = r"""
import base64, json, sys, traceback
import numpy as np, pandas as pd
import mesatee_notebook as mn

def items_in(v):
    if isinstance(v, dict) and "npy" in v:
        return np.asarray(v["npy"], dtype=v.get("dtype", "int64"))
    return [base64.b64decode(x["b"]) if isinstance(x, dict) else x for x in v]

def items_out(v):
    return [{"b": base64.b64encode(x).decode()} if isinstance(x, bytes) else x for x in v]

session = None
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd.pop("op")
    try:
        if op == "connect":
            if session is not None:
                try:
                    session.close()
                except Exception:
                    pass
            pol = mn.Policy(platform_roots=[cmd["platform"]], measurements=[cmd["measurement"]])
            session = mn.connect(cmd["url"], policy=pol, identity=cmd["identity"])
            out = {"party": session.party_id, "whoami": session.whoami()}
        elif op == "create":
            st = session.psi.create(cmd["name"], cmd["parties"], mode=cmd.get("mode", "intersection"),
                                    receivers=cmd.get("receivers"))
            out = {"state": st.state, "missing_approvals": st.missing_approvals}
        elif op == "submit":
            values = pd.DataFrame(cmd["values"]) if cmd.get("values") is not None else None
            policy = mn.DataPolicy(**cmd["policy"]) if cmd.get("policy") else None
            st = session.psi.submit(cmd["name"], items_in(cmd["items"]), values=values, policy=policy,
                                    approve=cmd.get("approve", False))
            out = {"state": st.state}
        elif op == "submit_dataset":
            st = session.psi.submit(cmd["name"], dataset=cmd["dataset"], column=cmd["column"],
                                    value_columns=cmd.get("value_columns"), approve=cmd.get("approve", False))
            out = {"state": st.state}
        elif op == "upload":
            session.upload(pd.DataFrame(cmd["frame"]), cmd["dataset"], policy=mn.DataPolicy(**cmd["policy"]))
            out = {}
        elif op == "approve":
            out = {"state": session.psi.approve(cmd["name"]).state}
        elif op == "status":
            st = session.psi.status(cmd["name"])
            out = {"state": st.state, "error": st.error, "parties": session.psi.parties(cmd["name"])}
        elif op == "result":
            r = session.psi.result(cmd["name"])
            out = {"cardinality": r.cardinality, "mode": r.mode, "dataset": r.dataset,
                   "items": None if r.items is None else items_out(r.items.tolist())}
        elif op == "join_sum":
            sdf = session.psi.dataframe(cmd["name"])
            out = {"sum": float(sdf[cmd["column"]].sum().collect()), "count": int(sdf[cmd["column"]].count().collect())}
        elif op == "join_rows":
            r = session.psi.result(cmd["name"])
            out = {"rows": session.dataframe(r.dataset).head(3).collect().to_dict()}
        elif op == "dataframe":
            out = {"columns": list(session.dataframe(cmd["dataset"]).columns)}
        elif op == "jobs_list":
            info = session.call("job.list").info
            out = {"jobs": [j["name"] for j in info["jobs"]], "damaged": info["damaged"]}
        elif op == "audit":
            out = {"entries": session.audit()}
        else:
            raise ValueError(op)
        print(json.dumps({"ok": out}), flush=True)
    except Exception as exc:
        print(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}}), flush=True)
"""


class PartyError(Exception):
    """A call in a party process failed; ``kind`` is the exception class name there."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class Party:
    """One party: a separate Python process driven over JSON lines."""

    def __init__(self, script: Path, identity: Path) -> None:
        self.identity = identity
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(
            [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.id = ""

    def __call__(self, op: str, **kw: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"party process exited (code {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise PartyError(reply["error"]["type"], reply["error"]["message"])
        return reply["ok"]

    def connect(self, k: KernelProc) -> None:
        out = self("connect", url=k.url, platform=k.fingerprint, measurement=k.measurement, identity=str(self.identity))
        assert out["party"] == out["whoami"]
        self.id = out["party"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def _parties(tmp: Path, k: KernelProc, names: str = "abc") -> list[Party]:
    script = tmp / "party.py"
    script.write_text(PARTY_SCRIPT)
    parties = [Party(script, tmp / f"id-{n}") for n in names]
    for p in parties:
        p.connect(k)
    return parties


@pytest.fixture(scope="module")
def trio(kernel: KernelProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Party]]:
    parties = _parties(tmp_path_factory.mktemp("psi-parties"), kernel)
    yield parties
    for p in parties:
        p.close()


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _refused(party: Party, op: str, match: str, **kw: Any) -> str:
    with pytest.raises(PartyError) as info:
        party(op, **kw)
    assert info.value.kind == "PolicyViolation", info.value
    assert match in info.value.message, info.value.message
    return info.value.message


def test_intersection_refusals_and_audit(trio: list[Party], kernel: KernelProc) -> None:
    a, b, c = trio
    name = _name("refusals")
    rng = np.random.default_rng(1)
    items_a = rng.integers(0, 400, 300).tolist()  # duplicates on purpose
    items_b = rng.integers(200, 600, 300).tolist()
    out = a("create", name=name, parties={"alice": a.id, "bob": b.id}, receivers=[a.id, c.id])
    assert out["missing_approvals"] == [b.id]  # the creator approved its own spec

    _refused(c, "submit", "belongs to another party", name=name, items=[1, 2])  # c is a receiver, not an owner
    a("submit", name=name, items=items_a)
    _refused(a, "submit", "already submitted", name=name, items=[1])
    b("submit", name=name, items=items_b)
    _refused(a, "result", f"waiting for approval from {b.id}", name=name)
    assert b("approve", name=name)["state"] == "done"

    expected = sorted(set(items_a) & set(items_b))
    for receiver in (a, c):
        res = receiver("result", name=name)
        assert sorted(res["items"]) == expected and res["cardinality"] == len(expected)
    # order: first appearance in the first input
    assert a("result", name=name)["items"] == list(dict.fromkeys(x for x in items_a if x in set(items_b)))
    _refused(b, "result", "not a receiver", name=name)
    assert a("status", name=name)["parties"]["owners"] == {"alice": a.id, "bob": b.id}

    # a party outside the job: cannot see it, cannot submit to it
    other = _name("outsider")
    a("create", name=other, parties=[a.id, b.id])
    _refused(c, "status", "not a party to this job", name=other)
    _refused(c, "submit", "not a party to this job", name=other, items=[1])

    # every party sees its own refusals and the job's steps, verified in its own process
    job_entries = {}
    for p in trio:
        entries = p("audit")["entries"]
        job_entries[p.id] = [e for e in entries if name in json.dumps(e) or e["details"].get("job_id")]
        assert entries, "a party sees its audit entries"
    kinds_a = [e["kind"] for e in job_entries[a.id]]
    for kind in ("job", "upload", "approval", "result", "release", "refusal"):
        assert kind in kinds_a, kinds_a
    reasons_c = [e["details"].get("reason", "") for e in job_entries[c.id] if e["kind"] == "refusal"]
    assert any("not a party" in r for r in reasons_c) and any("belongs to another party" in r for r in reasons_c)
    assert any(e["kind"] == "release" and e["party"] == c.id for e in job_entries[c.id])

    # offline: the entries a party got verify against the platform key; a changed entry does not
    pub = load_pem_public_key((kernel.data_dir / "platform" / "platform.pub").read_bytes())
    entries = a("audit")["entries"]
    verify_audit_log(entries, pub, partial=True)  # type: ignore[arg-type]
    forged = json.loads(json.dumps(entries))
    forged[-1]["details"]["reason"] = "nothing happened"
    with pytest.raises(TamperedData):
        verify_audit_log(forged, pub, partial=True)  # type: ignore[arg-type]


def _b(xs: list[Any]) -> list[Any]:
    return [{"b": base64.b64encode(x).decode()} if isinstance(x, bytes) else x for x in xs]


@pytest.mark.parametrize("case", ["duplicates", "empty", "disjoint", "strings-nfc", "bytes-and-ints", "cardinality"])
def test_three_party_results_match_python_sets(trio: list[Party], case: str) -> None:
    a, b, c = trio
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    sets: list[list[Any]]
    mode = "cardinality" if case == "cardinality" else "intersection"
    if case in ("duplicates", "cardinality"):
        sets = [rng.integers(0, 300, 500).tolist() for _ in range(3)]
    elif case == "empty":
        sets = [rng.integers(0, 50, 100).tolist(), [], rng.integers(0, 50, 100).tolist()]
    elif case == "disjoint":
        sets = [list(range(0, 100)), list(range(100, 200)), list(range(50, 150))]
    elif case == "strings-nfc":
        words = [f"user{i}@example.org" for i in range(200)] + ["café", "Å"]
        sets = [[*words[:150], "café"], [unicodedata.normalize("NFD", w) for w in words[100:]], [*words[::2], "Å"]]
    else:  # bytes-and-ints: 1, "1" and b"1" never match each other
        sets = [[1, 2, 3, "1", b"1"], [1, "2", b"3", b"1"], [1, b"1", "1", 5]]
    name = _name(case)
    a("create", name=name, parties=[a.id, b.id, c.id], mode=mode, receivers=[c.id])
    for p, s in zip(trio, sets, strict=True):
        p("submit", name=name, items=_b(s) if case == "bytes-and-ints" else s, approve=True)
    res = c("result", name=name)
    norm = [{unicodedata.normalize("NFC", x) if isinstance(x, str) else x for x in s} for s in sets]
    if case == "bytes-and-ints":
        norm = [{(type(x).__name__, x) for x in s} for s in sets]
    expected = set.intersection(*norm)
    assert res["cardinality"] == len(expected)
    if mode == "intersection":
        got = [base64.b64decode(x["b"]) if isinstance(x, dict) else x for x in res["items"]]
        got_set = {(type(x).__name__, x) for x in got} if case == "bytes-and-ints" else set(got)
        assert got_set == expected and len(got) == len(expected)
    else:
        assert res["items"] is None


def test_join_and_compute(trio: list[Party]) -> None:
    a, b, c = trio
    name = _name("join")
    ds = f"shop-{name}"
    # bob's set comes from an enclave dataset he owns; alice uploads items with value columns
    b(
        "upload",
        dataset=ds,
        frame={"email": [f"u{i}" for i in range(100)], "spend": [float(i) for i in range(100)]},
        policy={"min_group_size": 5},
    )
    a("create", name=name, parties={"bank": a.id, "shop": b.id}, mode="join", receivers=[c.id])
    _refused(a, "submit_dataset", "does not own dataset", name=name, dataset=ds, column="email")
    a("submit", name=name, items=[f"u{i}" for i in range(50, 150)], values={"score": list(range(100))})
    b("submit_dataset", name=name, dataset=ds, column="email", value_columns=["spend"], approve=True)
    res = c("result", name=name)
    assert res["mode"] == "join" and res["cardinality"] == 50 and res["items"] is None
    agg = c("join_sum", name=name, column="shop.spend")
    assert agg == {"sum": float(sum(range(50, 100))), "count": 50}
    _refused(c, "join_rows", "row-level", name=name)  # the joined rows never leave
    # only the receivers may query (or even see) the joined dataset, not even the input owners
    with pytest.raises(PartyError) as info:
        a("dataframe", dataset=res["dataset"])
    assert info.value.kind == "NotFound", info.value


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_restart_restores_jobs_and_detects_tampering(tmp_path: Path) -> None:
    data_dir = tmp_path / "kernel"
    k = start_kernel(data_dir)
    a, b = _parties(tmp_path, k, "ab")
    try:
        a("create", name="survivor", parties=[a.id, b.id], receivers=[a.id, b.id])
        a("submit", name="survivor", items=["x", "y", "z"])
        sealed = data_dir / "sealed"
        before = {p.name for p in sealed.iterdir()}
        a("create", name="victim", parties=[a.id, b.id])
        new = sorted(sealed / n for n in {p.name for p in sealed.iterdir()} - before)
        assert len(new) == 1, new  # the victim's sealed state record
        stop_kernel(k)

        _flip_last_byte(new[0])  # the host changes a byte while the kernel is down
        k = start_kernel(data_dir)
        a.connect(k)
        b.connect(k)
        # the survivor's job and alice's sealed input came back; the run hashes them again
        assert a("status", name="survivor")["state"] == "waiting_for_inputs"
        b("submit", name="survivor", items=["y", "z", "w"], approve=True)
        assert sorted(b("result", name="survivor")["items"]) == ["y", "z"]
        # the tampered job is reported, never used and never silently dropped
        with pytest.raises(PartyError) as info:
            a("status", name="victim")
        assert info.value.kind == "TamperedData" and "failed to authenticate" in info.value.message
        listing = a("jobs_list")
        assert "survivor" in listing["jobs"] and len(listing["damaged"]) == 1
        entries = a("audit")["entries"]
        assert any(e["kind"] == "recovery" and "damaged" in e["details"] for e in entries)
    finally:
        a.close()
        b.close()
        stop_kernel(k)
