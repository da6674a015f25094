"""The KeyStore: keys made and used inside the enclave; the private bytes never leave it."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding

import mesatee_notebook as mn
from mesatee_notebook.errors import EncodingError, PolicyViolation
from tests.conftest import KernelProc, start_kernel, stop_kernel
from tests.faas.conftest import Parties, unique


def test_ed25519_signature_verifies_outside_with_cryptography(parties: Parties) -> None:
    p = parties
    name = unique("sig")
    info = p.a.keys.create(name, kind="ed25519")
    assert info["public_key"].startswith("-----BEGIN PUBLIC KEY-----") and "material" not in str(info)
    sig = p.a.keys.sign(name, b"release v1.0")
    pub = serialization.load_pem_public_key(p.a.keys.public_key(name).encode())
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    pub.verify(sig, b"release v1.0")  # raises if not valid
    assert p.a.keys.verify(name, b"release v1.0", sig)
    assert not p.a.keys.verify(name, b"release v1.1", sig)
    kinds = [e["details"].get("op") for e in p.a.audit() if e["kind"] == "key" and e["details"].get("key") == name]
    assert kinds[:3] == ["create", "sign", "verify"]


def test_p256_and_rsa_signatures_verify_outside(parties: Parties) -> None:
    p = parties
    ec_name, rsa_name = unique("p256"), unique("rsa")
    p.a.keys.create(ec_name, kind="p256")
    pub = serialization.load_pem_public_key(p.a.keys.public_key(ec_name).encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(p.a.keys.sign(ec_name, b"m"), b"m", ec.ECDSA(hashes.SHA256()))
    p.a.keys.create(rsa_name, kind="rsa-3072")
    rpub = serialization.load_pem_public_key(p.a.keys.public_key(rsa_name).encode())
    rpub.verify(
        p.a.keys.sign(rsa_name, b"m"),
        b"m",  # type: ignore[union-attr,call-arg]
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
        hashes.SHA256(),
    )
    assert p.a.keys.decrypt(rsa_name, p.a.keys.encrypt(rsa_name, b"short secret")) == b"short secret"


def test_aead_and_users(parties: Parties) -> None:
    p = parties
    name = unique("aes")
    p.a.keys.create(name, kind="aes-256-gcm", users=[p.b.party_id])
    ct = p.a.keys.encrypt(name, b"payroll", aad=b"ctx")
    assert b"payroll" not in ct
    assert p.b.keys.decrypt(name, ct, aad=b"ctx") == b"payroll"  # a listed user
    with pytest.raises(PolicyViolation, match="authenticate"):
        p.a.keys.decrypt(name, ct, aad=b"other")
    with pytest.raises(PolicyViolation, match="authenticate"):
        p.a.keys.decrypt(name, ct[:-1] + bytes([ct[-1] ^ 1]), aad=b"ctx")
    with pytest.raises(PolicyViolation, match="may not"):  # C is not a user
        p.c.keys.decrypt(name, ct, aad=b"ctx")
    with pytest.raises(PolicyViolation, match="only its owner"):  # users cannot rotate or destroy
        p.b.keys.destroy(name)
    with pytest.raises(EncodingError, match="does not sign"):
        p.a.keys.sign(name, b"x")
    refused = [e for e in p.a.audit() if e["kind"] == "refusal" and e["details"].get("key") == name]
    assert {e["party"] for e in refused} >= {p.c.party_id, p.b.party_id}


def test_cell_signs_by_name_but_cannot_reach_key_bytes(parties: Parties, kernel: KernelProc) -> None:
    p = parties
    name = unique("cellkey")
    p.a.keys.create(name, kind="ed25519")
    data_dir = str(kernel.data_dir)
    code = textwrap.dedent(f"""
        import os
        sig = mesatee.keys.sign({name!r}, b"from a cell")
        ok = mesatee.keys.verify({name!r}, b"from a cell", sig)
        reach = []
        for path in ({data_dir!r}, {data_dir + "/sealed"!r}):
            try:
                reach.append(os.listdir(path))
            except OSError as exc:
                reach.append(type(exc).__name__)
        try:
            mesatee.open("../../svc/keys/{name}", "rb")
            reach.append("sealed key readable")
        except Exception as exc:
            reach.append(type(exc).__name__)
        """)
    out = p.a.run(code, outputs=["sig", "ok", "reach"]).outputs
    pub = serialization.load_pem_public_key(p.a.keys.public_key(name).encode())
    pub.verify(out["sig"], b"from a cell")  # type: ignore[call-arg,union-attr]
    assert out["ok"] is True
    assert "sealed key readable" not in out["reach"]
    assert all(isinstance(r, str) for r in out["reach"]), out["reach"]
    with pytest.raises(PolicyViolation, match="may not sign"):  # C's cell may not use A's key
        p.c.run(f"mesatee.keys.sign({name!r}, b'x')")


@pytest.fixture
def own_kernel(tmp_path: Path) -> Iterator[tuple[KernelProc, Path]]:
    k = start_kernel(tmp_path / "k")
    yield k, tmp_path
    stop_kernel(k)


@pytest.mark.slow
def test_rotate_and_destroy_survive_a_restart(own_kernel: tuple[KernelProc, Path]) -> None:
    k, root = own_kernel
    s = mn.connect(k.url, policy=cast("mn.Policy", k.policy()), identity=root / "owner")
    s.keys.create("release", kind="ed25519")
    old_sig = s.keys.sign("release", b"v1")
    info = s.keys.rotate("release")
    assert info["version"] == 2 and info["versions"] == [1, 2]
    s.keys.create("gone", kind="aes-256-gcm")
    ct = s.keys.encrypt("gone", b"x")
    s.keys.destroy("gone")
    s.close()
    stop_kernel(k)
    k2 = start_kernel(k.data_dir)
    try:
        s2 = mn.connect(k2.url, policy=cast("mn.Policy", k2.policy()), identity=root / "owner")
        assert s2.keys.info("release")["version"] == 2
        assert s2.keys.verify("release", b"v1", old_sig, version=1)
        assert not s2.keys.verify("release", b"v1", old_sig)  # the current version is a new key
        with pytest.raises(PolicyViolation, match="destroyed"):
            s2.keys.decrypt("gone", ct)
        with pytest.raises(PolicyViolation, match="destroyed"):
            s2.keys.create("gone", kind="aes-256-gcm")
        s2.close()
    finally:
        stop_kernel(k2)


def test_wrap_and_unwrap_a_data_key(parties: Parties) -> None:
    p = parties
    name = unique("kek")
    p.a.keys.create(name, kind="aes-256-gcm", users=[p.b.party_id])
    dek = bytes(range(32))
    wrapped = p.a.keys.wrap(name, dek)
    assert dek not in wrapped and len(wrapped) == 4 + 40  # version | RFC 5649 (32 bytes -> 40)
    assert p.b.keys.unwrap(name, wrapped) == dek  # a listed user unwraps
    assert p.a.keys.unwrap(name, p.a.keys.wrap(name, b"odd-length")) == b"odd-length"  # padded (RFC 5649)
    forged = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
    with pytest.raises(PolicyViolation, match="does not authenticate"):
        p.a.keys.unwrap(name, forged)
    with pytest.raises(PolicyViolation, match="may not"):
        p.c.keys.wrap(name, dek)  # not a user
    p.a.keys.rotate(name)
    assert p.a.keys.unwrap(name, wrapped) == dek  # the version is in front: old wraps still unwrap
    sig_key = unique("sig")
    p.a.keys.create(sig_key, kind="ed25519")
    with pytest.raises(EncodingError, match="aes-256-gcm"):
        p.a.keys.wrap(sig_key, dek)
    ops = [e["details"].get("op") for e in p.a.audit() if e["kind"] == "key" and e["details"].get("key") == name]
    assert "wrap" in ops and "unwrap" in ops


USES_KEY = """
def main(data, key):
    return mesatee.keys.sign(key, b"rows=" + str(len(data)).encode())
"""


def _key_task(p: Parties, key: str, keys: list[str] | None) -> Any:
    fn = p.b.functions.register(unique("keyfn"), python=USES_KEY, inputs=["data"])
    name = unique("ktask")
    p.b.tasks.create(name, function=fn, inputs={"data": p.ds_b}, args={"key": key}, keys=keys)
    return p.b.tasks.status(name)


def test_a_function_uses_only_the_keys_its_task_names(parties: Parties) -> None:
    p = parties
    key, other = unique("fk"), unique("fk")
    pem = p.b.keys.create(key, kind="ed25519")["public_key"]
    p.b.keys.create(other, kind="ed25519")
    st = _key_task(p, key, [key])  # B creates, owns the input (approves at once) and owns the key
    assert st.state == "done", st.error
    sig = p.b.tasks.result(st.name).value
    pub = serialization.load_pem_public_key(pem.encode())
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    pub.verify(sig, f"rows={len(p.sales_b)}".encode())
    uses = [e for e in p.b.audit() if e["kind"] == "key" and (e.get("details") or {}).get("via") == "function"]
    assert any(u["details"]["key"] == key and u["details"]["task"] == st.job_id for u in uses)
    # a key the task does not name, and a task that names none: the function's call is refused, the task fails
    for asked, named in ((other, [key]), (key, None)):
        failed = _key_task(p, asked, named)
        assert failed.state == "failed" and "PolicyViolation" in str(failed.error)


def test_a_task_cannot_lend_a_key_its_creator_may_not_use(parties: Parties) -> None:
    p = parties
    key = unique("fk")
    p.c.keys.create(key, kind="ed25519")  # C's key; B is not a user
    failed = _key_task(p, key, [key])
    assert failed.state == "failed" and "may not sign" in str(failed.error)
    with pytest.raises(EncodingError, match="Python functions"):
        fn = p.b.functions.register(unique("w"), wasm=b"\0asm\x01\0\0\0", inputs=["data"])
        p.b.tasks.create(unique("wk"), function=fn, inputs={"data": p.ds_b}, keys=[key])
