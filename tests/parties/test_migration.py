"""An upgrade keeps the data: state sealed for the old measurement waits, owners' signed grants move it, atomically.

The "upgrade" is real: the package is copied, one byte of a measured file changes, and the kernel runs from the copy
(PYTHONPATH), so it reports another measurement and derives other sealing keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mesatee_notebook as mn
from mesatee_notebook.attestation.party_proof import migration_grant
from mesatee_notebook.errors import NotFound
from mesatee_notebook.remote.party_key import PartyIdentity
from tests.conftest import KernelProc, start_kernel, stop_kernel

POLICY = mn.DataPolicy(min_group_size=2)


@pytest.fixture(scope="module")
def upgraded() -> Iterator[Path]:
    """A copy of the package with one byte of a measured file changed: the next release.

    It lives beside the package, not under /tmp: a sandboxed executor sees a private, empty /tmp.
    """
    src = Path(mn.__file__).resolve().parent
    root = Path(tempfile.mkdtemp(prefix=".upgraded-", dir=src.parent))
    root.chmod(0o755)  # readable like the package itself: a sandbox runs cells under its own uid
    try:
        shutil.copytree(src, root / "mesatee_notebook", ignore=shutil.ignore_patterns("__pycache__"))
        measured = root / "mesatee_notebook" / "wire" / "__init__.py"
        measured.write_bytes(measured.read_bytes() + b"\n")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _start_from(copy: Path | None, data_dir: Path) -> KernelProc:
    old, cwd = os.environ.get("PYTHONPATH"), Path.cwd()
    if copy is not None:  # `python -m` puts the working directory first on sys.path: start from the copy's
        os.environ["PYTHONPATH"] = str(copy)
        os.chdir(copy)
    try:
        return start_kernel(data_dir)
    finally:
        os.chdir(cwd)
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@contextlib.contextmanager
def _kernel(copy: Path | None, data_dir: Path) -> Iterator[KernelProc]:
    k = _start_from(copy, data_dir)
    try:
        yield k
    finally:
        stop_kernel(k)


def _connect(k: KernelProc, who: Path) -> mn.Session:
    return mn.connect(k.url, policy=k.policy(), identity=who)


def _files(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir() if p.suffix == ".seal"}


def _send_grant(s: mn.Session, grant: dict, signer: PartyIdentity) -> None:
    s._channel.request(
        {
            "t": "migration",
            "op": "approve",
            "grant": grant,
            "public_key": signer.public_key_raw,
            "signature": signer.sign_migration_grant(grant),
        }
    )


@pytest.mark.slow
def test_upgrade_grants_rollback_and_audit(tmp_path: Path, upgraded: Path) -> None:
    data_dir = tmp_path / "kernel"
    one = pd.DataFrame({"g": ["a", "b"] * 20, "x": np.arange(40.0)})
    two = pd.DataFrame({"g": ["c", "d"] * 10, "y": np.arange(20.0) * 3})
    with _kernel(None, data_dir) as ka:
        o1, o2 = _connect(ka, tmp_path / "o1"), _connect(ka, tmp_path / "o2")
        o1.upload(one, "one", policy=POLICY)
        o2.upload(two, "two", policy=POLICY)
        digest1 = o1.call("dataset.info", {"name": "one"}).info["sha256"]
        digest2 = o2.call("dataset.info", {"name": "two"}).info["sha256"]
        o1.run("with mesatee.open('notes', 'w') as f:\n    f.write('kept across the upgrade')")
        o1.psi.create("shared", [o1.party_id, o2.party_id])  # a job of both owners
        o1.psi.submit("shared", ["x", "y", "z"])
        job = o1.psi.status("shared")
        o2.dataframe("one").groupby("g").agg(s=("x", "sum")).collect()  # a release: guard history for (o2, one)
        o1.close()
        o2.close()
    a = ka.measurement

    with _kernel(upgraded, data_dir) as kb:
        b = kb.measurement
        assert b != a
        log = (data_dir / "serve.log").read_text()
        assert f"2 datasets of 2 owners are sealed for measurement {a}" in log and "need a migration" in log
        attest = subprocess.run(
            [
                sys.executable,
                "-m",
                "mesatee_notebook.cli",
                "attest",
                kb.url,
                "--platform-root",
                kb.fingerprint,
                "--measurement",
                b,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert f"SEALED STATE: 2 datasets of 2 owners are sealed for measurement {a}" in attest.stdout
        parked = data_dir / "sealed-parked" / a
        before = _files(parked)
        o1, o2 = _connect(kb, tmp_path / "o1"), _connect(kb, tmp_path / "o2")
        id1, id2 = PartyIdentity.load_or_create(tmp_path / "o1"), PartyIdentity.load_or_create(tmp_path / "o2")

        # nothing is readable before the grants, and nothing is hidden: both are listed as pending
        pending = {d["name"]: d for d in o1.datasets()}
        assert set(pending) == {"one", "two"} and all(d["pending_migration"] for d in pending.values())
        assert pending["one"]["owner"] == id1.party_id and pending["two"]["owner"] == id2.party_id
        assert pending["one"]["rows"] == 40 and pending["one"]["bytes"] > 0 and pending["one"]["measurement"] == a
        with pytest.raises(mn.MesateeError, match="no dataset named 'one'"):
            o1.dataframe("one")
        from mesatee_notebook.magics._magics import _sealed_state
        from mesatee_notebook.magics.display import AttestationCard

        card = AttestationCard(o1.attestation, url=o1.url, sealed_state=_sealed_state(o1))  # as %mesatee attest
        assert f"sealed state: 2 datasets of 2 owners are sealed for measurement {a}" in repr(card)
        assert "they need a migration" in card._repr_html_()
        with pytest.raises(mn.MesateeError):
            o1.run("mesatee.open('notes', 'r').read()")

        # a forged grant (owner 1's name, owner 2's key), another owner's dataset, another pair: all refused
        forged = migration_grant(id1.party_id, "*", a, b, rollback=False, time=time.time())
        with pytest.raises(mn.PolicyViolation, match="signed by"):
            _send_grant(o2, forged, id2)
        altered = migration_grant(id1.party_id, "*", a, b, rollback=False, time=time.time())
        sig = id1.sign_migration_grant(altered)
        altered["dataset"] = "two"
        with pytest.raises(mn.PolicyViolation, match="does not verify"):
            o1._channel.request(
                {
                    "t": "migration",
                    "op": "approve",
                    "grant": altered,
                    "public_key": id1.public_key_raw,
                    "signature": sig,
                }
            )
        with pytest.raises(mn.PolicyViolation, match="belongs to another party"):
            o2.approve_migration("one", from_=a)
        with pytest.raises(mn.PolicyViolation, match="another pair"):
            o1.approve_migration("*", from_=a, to="ab" * 32)
        assert _files(parked) == before

        # owner 1's grant moves owner 1's dataset and cell files, with equal digests; owner 2's stay put
        result = o1.approve_migration("*", from_=a)
        moved = {(u["kind"], u["key"]): u for u in result["migrated"]}
        assert set(moved) == {("dataset", "one"), ("cells", id1.party_id)}
        assert moved["dataset", "one"]["objects"] >= 3  # meta, data and o2's guard history move together
        held = {h["key"]: h for h in result["held"]}
        assert held["two"]["waiting_for"] == [id2.party_id] and held[job.job_id]["waiting_for"] == [id2.party_id]
        listed = {d["name"]: d for d in o1.datasets()}
        assert "pending_migration" not in listed["one"] and listed["one"]["sha256"] == digest1
        assert listed["two"]["pending_migration"] and listed["two"]["sha256"] == digest2
        got = o1.dataframe("one").groupby("g").agg(s=("x", "sum")).collect()
        assert got["s"].tolist() == [one[one.g == "a"].x.sum(), one[one.g == "b"].x.sum()]
        assert o1.run("mesatee.open('notes', 'r').read()").value == "kept across the upgrade"
        after = _files(parked)
        assert after and all(before[name] == digest for name, digest in after.items())  # untouched, by digest
        assert len(before) - len(after) == sum(u["objects"] for u in result["migrated"])
        with pytest.raises(mn.MesateeError, match="no dataset named 'two'"):
            o2.dataframe("two")

        # the audit log shows the grant, the migration (with the digest) and the refusals
        entries = o1.audit()
        grants = [e for e in entries if e["kind"] == "grant"]
        migrations = [e for e in entries if e["kind"] == "migration"]
        assert grants and grants[-1]["party"] == id1.party_id and grants[-1]["details"]["from"] == a
        assert migrations and migrations[-1]["details"]["datasets"]["one"] == digest1
        assert migrations[-1]["details"]["to"] == b
        assert any(e["kind"] == "refusal" and "migration_grant" in e["details"] for e in o2.audit())
        o1.close()
        o2.close()

    # back to the old code: owner 2's data is live there again; moving owner 1's back is a rollback
    with _kernel(None, data_dir) as ka2:
        assert ka2.measurement == a
        o1, o2 = _connect(ka2, tmp_path / "o1"), _connect(ka2, tmp_path / "o2")
        listed = {d["name"]: d for d in o2.datasets()}
        assert "pending_migration" not in listed["two"] and listed["two"]["sha256"] == digest2
        assert listed["one"]["pending_migration"] and listed["one"]["rollback"]
        with pytest.raises(mn.PolicyViolation, match="rollback"):
            o1.approve_migration("one", from_=b)
        status = o1.migration_status()
        assert status is not None and status["stores"][0]["measurement"] == b and status["stores"][0]["rollback"]
        o1.close()
        o2.close()

    # the new code again: owner 1's data is where the grant put it; owner 2's grant moves the rest, job included
    with _kernel(upgraded, data_dir) as kb2:
        assert kb2.measurement == b
        o1, o2 = _connect(kb2, tmp_path / "o1"), _connect(kb2, tmp_path / "o2")
        assert o1.run("mesatee.open('notes', 'r').read()").value == "kept across the upgrade"
        result = o2.approve_migration("*", from_=a)
        assert {(u["kind"], u["key"]) for u in result["migrated"]} == {("dataset", "two"), ("job", job.job_id)}
        listed = {d["name"]: d for d in o2.datasets()}
        assert [listed[n].get("pending_migration") for n in ("one", "two")] == [None, None]
        assert listed["two"]["sha256"] == digest2
        moved_job = o1.psi.status("shared")
        assert (moved_job.state, moved_job.spec_digest, moved_job.missing_inputs) == (
            job.state,
            job.spec_digest,
            job.missing_inputs,
        )
        summary = o1.migration_status()
        assert summary is not None and all(s["datasets"] == 0 for s in summary["stores"])
        o1.close()
        o2.close()


@pytest.mark.slow
def test_kill_9_mid_migration_is_all_or_nothing(tmp_path: Path, upgraded: Path) -> None:
    data_dir = tmp_path / "kernel"
    big = pd.DataFrame(np.random.default_rng(7).random((2_500_000, 4)), columns=list("abcd"))
    with _kernel(None, data_dir) as ka:
        o1 = _connect(ka, tmp_path / "o1")
        o1.upload(big, "big")
        digest = o1.call("dataset.info", {"name": "big"}).info["sha256"]
        o1.close()
    a = ka.measurement
    kb = _start_from(upgraded, data_dir)
    parked = data_dir / "sealed-parked" / a
    before = _files(parked)
    staging = data_dir / "sealed-staging"
    killed = False
    try:
        o1 = _connect(kb, tmp_path / "o1")
        errors: list[BaseException] = []

        def approve() -> None:
            try:
                o1.approve_migration("*", from_=a)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=approve)
        t.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed and t.is_alive():
            if staging.is_dir() and any(any(d.iterdir()) for d in staging.iterdir()):
                os.kill(kb.proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.002)
        t.join(60)
        assert killed, "never saw the migration in progress"
        assert errors and isinstance(errors[0], mn.MesateeError)
        with contextlib.suppress(mn.MesateeError):
            o1.close()
    finally:
        if not killed:
            stop_kernel(kb)
        else:
            kb.proc.wait(10)

    with _kernel(upgraded, data_dir) as kb2:
        o1 = _connect(kb2, tmp_path / "o1")
        listed = {d["name"]: d for d in o1.datasets()}
        after = _files(parked)
        assert not any(staging.iterdir())  # nothing half-done is left behind
        committed = not listed["big"].get("pending_migration")
        print(f"kill -9 landed {'after' if committed else 'before'} the commit")
        if not committed:  # killed before the commit: the old copy is untouched
            assert after == before
            o1.approve_migration("*", from_=a)
            listed = {d["name"]: d for d in o1.datasets()}
            after = _files(parked)
        else:  # killed after the commit: the restart finished it, and the old copy is gone
            assert after and set(after) < set(before)
        assert all(before[name] == d for name, d in after.items())
        assert "pending_migration" not in listed["big"] and listed["big"]["sha256"] == digest
        assert o1.run("len(mesatee.dataframe('big'))").value == len(big)
        o1.close()


class _Crash(BaseException):
    """Stands for a kill -9 at one exact point (the process stops; nothing after it runs)."""


def test_crash_right_after_the_commit_is_finished_on_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from mesatee_notebook.enclave.audit import AuditLog
    from mesatee_notebook.enclave.migration import SealedState, live_store

    secret, a, b = bytes(range(32)), "aa" * 32, "bb" * 32
    owner = PartyIdentity.generate()
    SealedState.at_start(tmp_path, secret, a)
    old = live_store(tmp_path, secret, a)
    payload = os.urandom(300_000)
    old.put("svc/datasets/d/data", payload)
    old.put(
        "svc/datasets/d/meta",
        b'{"name": "d", "owner": "%s", "rows": 3, "sha256": "%s"}'
        % (owner.party_id.encode(), hashlib.sha256(payload).hexdigest().encode()),
    )
    old.put("svc/cache/trees/x", b"rebuilt on use")
    state = SealedState.at_start(tmp_path, secret, b)
    assert state is not None and state.status()["stores"][0]["datasets"] == 1
    audit = AuditLog(tmp_path / "audit.log", Ed25519PrivateKey.generate())
    parked = tmp_path / "sealed-parked" / a
    before = _files(parked)

    def crash(self: SealedState, record: dict) -> None:
        raise _Crash

    monkeypatch.setattr(SealedState, "_roll_forward", crash)
    grant = migration_grant(owner.party_id, "d", a, b, rollback=False, time=time.time())
    with pytest.raises(_Crash):
        state.approve(grant, owner.public_key_raw, owner.sign_migration_grant(grant), audit)
    assert _files(parked) == before  # committed, but nothing moved yet
    assert not live_store(tmp_path, secret, b).exists("svc/datasets/d/data")
    monkeypatch.undo()

    again = SealedState.at_start(tmp_path, secret, b)
    assert again is not None
    again.announce(audit)
    new = live_store(tmp_path, secret, b)
    assert new.get("svc/datasets/d/data") == payload and not new.exists("svc/cache/trees/x")
    assert len(_files(parked)) == len(before) - 2  # the dataset's two objects left; the cache stayed behind
    assert not any((tmp_path / "sealed-staging").iterdir())
    assert again.status()["stores"][0]["datasets"] == 0
    kinds = [(e["kind"], e["details"].get("recovered")) for e in audit.entries()]
    assert kinds == [("grant", None), ("migration", None)]  # entered once, before the crash; not twice
    audit.close()


@pytest.mark.slow
def test_old_code_moves_the_data_with_migrate_to(tmp_path: Path, upgraded: Path) -> None:
    """The hardware-shaped path: owners approve B on kernel A, then `mesatee-enclave migrate --to B` runs as A."""
    from mesatee_notebook.attestation.measurement import expected_measurement

    data_dir = tmp_path / "kernel"
    b = expected_measurement(upgraded / "mesatee_notebook")
    df = pd.DataFrame({"g": ["a", "b"] * 5, "x": np.arange(10.0)})
    with _kernel(None, data_dir) as ka:
        o1 = _connect(ka, tmp_path / "o1")
        o1.upload(df, "early", policy=POLICY)
        digest = o1.call("dataset.info", {"name": "early"}).info["sha256"]
        result = o1.approve_migration("*", from_=ka.measurement, to=b)
        assert result["recorded"] and not result["migrated"] and "migrate --to" in result["next"]
        assert len(o1.dataframe("early")) == len(df)  # nothing moved yet: still readable on A
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "mesatee_notebook.cli",
                "enclave",
                "migrate",
                "--to",
                b,
                "--data-dir",
                str(data_dir),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert refused.returncode == 2 and "stop it first" in refused.stderr
        o1.close()
    a = ka.measurement
    done = subprocess.run(
        [sys.executable, "-m", "mesatee_notebook.cli", "enclave", "migrate", "--to", b, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert (
        "dataset early" in done.stdout
        and f"cells {PartyIdentity.load_or_create(tmp_path / 'o1').party_id}" not in done.stdout
    )
    with _kernel(upgraded, data_dir) as kb:
        assert kb.measurement == b
        o1 = _connect(kb, tmp_path / "o1")
        listed = {d["name"]: d for d in o1.datasets()}
        assert "pending_migration" not in listed["early"] and listed["early"]["sha256"] == digest
        entries = o1.audit()
        assert [e["details"]["to"] for e in entries if e["kind"] == "grant"] == [b]
        migration = [e for e in entries if e["kind"] == "migration"]
        assert migration and migration[0]["details"]["from"] == a
        assert migration[0]["details"]["datasets"]["early"] == digest
        o1.close()


def test_store_from_before_the_index_is_adopted_by_a_grant_naming_it(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from mesatee_notebook.enclave.audit import AuditLog
    from mesatee_notebook.enclave.migration import SealedState
    from mesatee_notebook.enclave.sealing import SealedStore

    secret, a, b = bytes(range(32)), "aa" * 32, "bb" * 32
    owner, other = PartyIdentity.generate(), PartyIdentity.generate()
    legacy = SealedStore(tmp_path / "sealed", secret, a)  # the layout before this change: no marker, no index
    legacy.put("svc/datasets/d/data", b"arrow bytes")
    legacy.put("svc/datasets/d/meta", b'{"name": "d", "owner": "%s", "rows": 1}' % owner.party_id.encode())
    legacy.put("svc/datasets/e/data", b"other bytes")
    legacy.put("svc/datasets/e/meta", b'{"name": "e", "owner": "%s", "rows": 1}' % other.party_id.encode())
    state = SealedState.at_start(tmp_path, secret, b)
    assert state is not None
    [store] = state.status()["stores"]
    assert not store["known"] and store["files"] == 4
    assert "measurement unknown" in state.summary_lines()[0]
    audit = AuditLog(tmp_path / "audit.log", Ed25519PrivateKey.generate())
    wrong = migration_grant(owner.party_id, "*", "cc" * 32, b, rollback=False, time=time.time())
    with pytest.raises(NotFound):
        state.approve(wrong, owner.public_key_raw, owner.sign_migration_grant(wrong), audit)
    grant = migration_grant(owner.party_id, "*", a, b, rollback=False, time=time.time())
    result = state.approve(grant, owner.public_key_raw, owner.sign_migration_grant(grant), audit)
    assert [(u["kind"], u["key"]) for u in result["migrated"]] == [("dataset", "d")]
    assert result["held"][0]["waiting_for"] == [other.party_id]
    new = SealedStore(tmp_path / "sealed", secret, b)
    assert new.get("svc/datasets/d/data") == b"arrow bytes" and not new.exists("svc/datasets/e/data")
    [store] = state.status(other.party_id)["stores"]
    assert store["known"] and [d["name"] for d in store["visible"]] == ["e"] and not store["rollback"]
    audit.close()


def test_replacing_the_embedded_kernel_says_what_happens_to_the_old_data(tmp_path: Path) -> None:
    import json

    from mesatee_notebook.remote import embedded

    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "kernel.json").write_text(
        json.dumps({"pid": gone.pid, "host": "127.0.0.1", "port": 1, "measurement": "ab" * 32})
    )
    with pytest.warns(embedded.SealedStateWarning, match="stay sealed for abab.*approve_migration"):
        assert embedded._running(tmp_path) is None


def test_rollback_needs_every_owner_to_say_so(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from mesatee_notebook.enclave.audit import AuditLog
    from mesatee_notebook.enclave.migration import SealedState, live_store

    secret, a, b = bytes(range(32)), "aa" * 32, "bb" * 32
    owner = PartyIdentity.generate()
    audit = AuditLog(tmp_path / "audit.log", Ed25519PrivateKey.generate())
    notes = f"cells/{owner.party_id}/notes"
    SealedState.at_start(tmp_path, secret, a)
    live_store(tmp_path, secret, a).put(notes, b"v1 notes")
    forward = SealedState.at_start(tmp_path, secret, b)  # the upgrade: b gets the next version
    assert forward is not None and forward.version == 2

    def grant(src: str, dst: str, *, rollback: bool) -> dict:
        return migration_grant(owner.party_id, "*", src, dst, rollback=rollback, time=time.time())

    g = grant(a, b, rollback=False)
    assert forward.approve(g, owner.public_key_raw, owner.sign_migration_grant(g), audit)["migrated"]
    back = SealedState.at_start(tmp_path, secret, a)  # the operator goes back to the old code
    assert back is not None and back.version == 1 and back.status()["stores"][0]["rollback"]
    g = grant(b, a, rollback=False)
    with pytest.raises(mn.PolicyViolation, match="rollback") as refused:
        back.approve(g, owner.public_key_raw, owner.sign_migration_grant(g), audit)
    assert refused.value.details["check"] == "rollback"
    assert not live_store(tmp_path, secret, a).exists(notes)
    g = grant(b, a, rollback=True)
    assert back.approve(g, owner.public_key_raw, owner.sign_migration_grant(g), audit)["migrated"]
    assert live_store(tmp_path, secret, a).get(notes) == b"v1 notes"
    kinds = [e["kind"] for e in audit.entries()]
    assert kinds == ["grant", "migration", "refusal", "grant", "migration"]
    audit.close()


def test_a_forged_index_entry_moves_nothing(tmp_path: Path) -> None:
    """The index decides what is shown; the dataset's own sealed metadata decides whose grant moves it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from mesatee_notebook.attestation.measurement import canonical_json
    from mesatee_notebook.enclave.audit import AuditLog
    from mesatee_notebook.enclave.migration import SealedState, live_store, platform_store

    secret, a, b = bytes(range(32)), "aa" * 32, "bb" * 32
    owner, thief = PartyIdentity.generate(), PartyIdentity.generate()
    SealedState.at_start(tmp_path, secret, a)
    old = live_store(tmp_path, secret, a)
    old.put("svc/datasets/d/data", b"the owner's rows")
    old.put("svc/datasets/d/meta", b'{"name": "d", "owner": "%s", "rows": 1}' % owner.party_id.encode())
    # code that holds the platform key (another kernel version) rewrites the index entry
    forged = {"name": "d", "owner": thief.party_id, "rows": 1, "sha256": "", "bytes": 1, "readers": None}
    platform_store(tmp_path, secret).put(f"index/{a}/datasets/d", canonical_json(forged))
    state = SealedState.at_start(tmp_path, secret, b)
    assert state is not None
    with AuditLog(tmp_path / "audit.log", Ed25519PrivateKey.generate()) as audit:
        grant = migration_grant(thief.party_id, "d", a, b, rollback=False, time=time.time())
        result = state.approve(grant, thief.public_key_raw, thief.sign_migration_grant(grant), audit)
    assert result["migrated"] == [] and "index disagrees" in result["held"][0]["reason"]
    assert not live_store(tmp_path, secret, b).exists("svc/datasets/d/data")


def test_crash_before_the_migration_entry_is_audited_on_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from mesatee_notebook.enclave.audit import AuditLog
    from mesatee_notebook.enclave.migration import SealedState, live_store

    secret, a, b = bytes(range(32)), "aa" * 32, "bb" * 32
    owner = PartyIdentity.generate()
    SealedState.at_start(tmp_path, secret, a)
    live_store(tmp_path, secret, a).put(f"cells/{owner.party_id}/notes", b"notes")
    state = SealedState.at_start(tmp_path, secret, b)
    assert state is not None
    audit = AuditLog(tmp_path / "audit.log", Ed25519PrivateKey.generate())

    def crash(self: SealedState, record: dict, audit: object, *, recovered: bool = False) -> None:
        raise _Crash

    monkeypatch.setattr(SealedState, "_audit_migration", crash)
    grant = migration_grant(owner.party_id, "*", a, b, rollback=False, time=time.time())
    with pytest.raises(_Crash):
        state.approve(grant, owner.public_key_raw, owner.sign_migration_grant(grant), audit)
    monkeypatch.undo()
    again = SealedState.at_start(tmp_path, secret, b)
    assert again is not None
    again.announce(audit)
    again.announce(audit)  # a second start must not enter it twice
    assert live_store(tmp_path, secret, b).get(f"cells/{owner.party_id}/notes") == b"notes"
    entries = [(e["kind"], e["details"].get("recovered")) for e in audit.entries()]
    assert entries == [("grant", None), ("migration", True)]
    audit.close()
