"""Party identities on the channel, trusted services in the service worker, the audit log."""

from __future__ import annotations

import json
import os
import signal

import pandas as pd
import pytest

import mesatee_notebook as mn
from mesatee_notebook.attestation.audit_verify import ALL_PARTIES, entry_concerns
from mesatee_notebook.errors import NotFound
from tests.waiting import wait_dead

pytestmark = pytest.mark.process


@pytest.fixture
def alice(kernel, tmp_path):
    s = mn.connect(kernel.url, policy=kernel.policy(), identity=tmp_path / "alice")
    yield s
    s.close()


@pytest.fixture
def bob(kernel, tmp_path):
    s = mn.connect(kernel.url, policy=kernel.policy(), identity=tmp_path / "bob")
    yield s
    s.close()


def test_identity_is_proven_and_stable(kernel, tmp_path, alice):
    assert alice.whoami() == alice.party_id
    key = tmp_path / "alice" / "party_ed25519.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    again = mn.connect(kernel.url, policy=kernel.policy(), identity=tmp_path / "alice")
    try:
        assert again.party_id == alice.party_id
    finally:
        again.close()


def test_anonymous_connections_cannot_call_services(kernel):
    anon = mn.connect(kernel.url, policy=kernel.policy(), identity=False)
    try:
        assert anon.whoami() is None
        with pytest.raises(mn.PolicyViolation, match="party identity"):
            anon.call("dataset.list")
        assert anon.run("1 + 1").value == 2
    finally:
        anon.close()


def test_unknown_service_names_the_known_ones(alice):
    with pytest.raises(NotFound, match=r"dataset\.upload"):
        alice.call("no.such.service")


def test_call_receipt_binds_service_party_and_values(kernel, alice):
    df = pd.DataFrame({"g": ["a"] * 12, "v": range(12)})
    alice.upload(df, "svc_receipt", policy=mn.DataPolicy(min_group_size=5))
    res = alice.call("dataset.info", {"name": "svc_receipt"})
    pred = res.verified.predicate
    assert pred["service"] == "dataset.info" and pred["party"] == alice.party_id
    assert res.info["rows"] == 12 and res.info["owner"] == alice.party_id
    v = mn.verify_receipt(res.receipt.to_json(), kernel.policy())
    assert "info" in v.subjects


def test_owner_only_operations_are_refused_and_audited(alice, bob):
    alice.upload(pd.DataFrame({"x": range(20)}), "owned_by_alice")
    with pytest.raises(mn.PolicyViolation, match="owner"):
        bob.call("dataset.delete", {"name": "owned_by_alice"})
    with pytest.raises(mn.PolicyViolation, match="another party"):
        bob.upload(pd.DataFrame({"x": [1]}), "owned_by_alice")
    kinds_alice = [(e["kind"], e["party"]) for e in alice.audit()]
    assert ("upload", alice.party_id) in kinds_alice
    assert ("refusal", bob.party_id) in kinds_alice  # refusals concerning alice's data are visible to her
    # bob sees his own entries, those that name him, and those addressed to every party (other tests on this
    # session-wide kernel make some of those), never another party's entry about alice's data
    shown = bob.audit()
    assert all(entry_concerns(e, bob.party_id) for e in shown)
    assert not [e for e in shown if e["party"] == alice.party_id and ALL_PARTIES not in (e.get("concerns") or [])]


def test_cells_reach_a_dataset_only_with_code_access(alice, bob):
    df = pd.DataFrame({"x": range(30)})
    alice.upload(df, "coded", policy=mn.DataPolicy(code_access=(bob.party_id,)))
    alice.upload(df, "closed")
    assert alice.run("int(mesatee.dataframe('closed').x.sum())").value == 435
    assert bob.run("int(mesatee.dataframe('coded').x.sum())").value == 435
    with pytest.raises(mn.PolicyViolation, match="code access"):
        bob.run("mesatee.dataframe('closed')")
    assert bob.run("2 + 2").value == 4


def test_service_worker_crash_is_reported_and_recovered(kernel, alice):
    alice.upload(pd.DataFrame({"x": range(10)}), "survives_crash")
    info = json.loads((kernel.data_dir / "kernel.json").read_text())
    import psutil

    workers = [
        p
        for p in psutil.Process(info["pid"]).children()
        if p.status() != psutil.STATUS_ZOMBIE and "--service" in p.cmdline()
    ]
    assert workers  # the call above started at least one (lazily: pools start workers on first use)
    for w in workers:
        os.kill(w.pid, signal.SIGKILL)
    for w in workers:  # a zombie until the kernel reaps it
        wait_dead(w.pid)
    # The kernel notices the dead worker before the call (process and socket EOF), starts a new one, which
    # reloads state from sealed storage, and says so in the audit log: the first call after the death succeeds.
    rows = alice.call("dataset.info", {"name": "survives_crash"}).info["rows"]
    assert rows == 10
    recoveries = [e for e in alice.audit() if e["kind"] == "recovery"]
    assert recoveries and recoveries[-1]["details"]["service_worker"] == "restarted"


def test_audit_log_is_verifiable_offline_and_tamper_evident(kernel, alice):
    from mesatee_notebook.attestation.audit_verify import verify_audit_log
    from mesatee_notebook.enclave.platform import load_platform
    from mesatee_notebook.errors import TamperedData

    alice.upload(pd.DataFrame({"x": range(3)}), "audited")
    lines = (kernel.data_dir / "audit.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pub = load_platform(kernel.data_dir).key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    verify_audit_log(entries, pub)
    entries[len(entries) // 2]["details"]["forged"] = True
    with pytest.raises(TamperedData):
        verify_audit_log(entries, pub)


def test_service_arguments_that_are_not_json_are_refused_cleanly(kernel, alice):
    """Bytes inside ``args`` cannot be hashed for the receipt: a typed refusal, not an internal error."""
    with pytest.raises(mn.MesateeError, match="JSON values") as info:
        alice.call("dataset.info", {"name": "x", "blob": b"\x00\x01"})
    assert "internal error" not in str(info.value)
    assert alice.call("dataset.list", {}).info is not None  # the connection goes on
