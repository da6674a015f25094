"""KeyStore (issue 17): keys that parties hold inside the enclave, used by name like an HSM's.

A key is sealed as ``svc/keys/<name>`` (JSON: kind, owner, users, versions with their private material, state);
the private material never leaves the service worker: calls return public keys, signatures, ciphertexts and
plaintexts only. Only the owner and the listed users may use a key; only the owner may rotate or destroy it. Every
use and every refusal is in the audit log (the key's name, operation, version, and the SHA-256 of the data; never
the data). ``destroy`` wipes every version's material and leaves a sealed tombstone, so the name can never be used
again, even after a restart. All cryptography comes from ``cryptography``.

Kinds: ``ed25519`` (sign), ``p256`` (ECDSA P-256 with SHA-256, DER signatures), ``rsa-3072`` (RSA-PSS SHA-256
signatures, RSA-OAEP SHA-256 encryption), ``aes-256-gcm`` (AEAD; ciphertext = version u32 BE | 12-byte nonce |
ciphertext+tag). Signatures verify with the public key alone; after ``rotate`` new operations use the new version
and old versions still verify and decrypt (``version`` picks one).

``wrap``/``unwrap`` (``aes-256-gcm`` keys): AES key wrap with padding (RFC 5649, the padded form of RFC 3394's AES
key wrap) under a key-encryption key derived from the key's version by HKDF-SHA256 (so the AEAD key itself is
never used for a second algorithm); wrapped = version u32 BE | RFC 5649 output. For wrapping other keys (a data
key to hand out wrapped), not for bulk data: use ``encrypt`` for that.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
import time
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from mesatee_notebook.enclave.services import ServiceContext, ServiceResult, service
from mesatee_notebook.errors import EncodingError, NotFound, PolicyViolation

__all__ = ["KINDS"]

KINDS: Final = ("ed25519", "p256", "rsa-3072", "aes-256-gcm")
_NAME: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_VER: Final = struct.Struct(">I")
_MAX_DATA: Final = 64 << 20
_MAX_WRAP: Final = 1 << 16
_KEK_INFO: Final = b"mesatee-notebook keystore key-wrap v1"


def _key_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        msg = f"invalid key name {name!r}: letters, digits and _.- (at most 100 characters)"
        raise EncodingError(msg)
    return name


def _path(name: str) -> str:
    return f"keys/{name}"


def _new_material(kind: str) -> bytes:
    if kind == "aes-256-gcm":
        return AESGCM.generate_key(bit_length=256)
    priv: Any
    if kind == "ed25519":
        priv = ed25519.Ed25519PrivateKey.generate()
    elif kind == "p256":
        priv = ec.generate_private_key(ec.SECP256R1())
    else:
        priv = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return bytes(
        priv.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _private(kind: str, material: bytes) -> Any:
    return serialization.load_der_private_key(material, password=None)


def _public_pem(kind: str, material: bytes) -> str | None:
    if kind == "aes-256-gcm":
        return None
    pub = _private(kind, material).public_key()
    return str(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())


def _load(ctx: ServiceContext, name: str) -> dict[str, Any]:
    try:
        record = json.loads(ctx.seal_get(_path(name)))
    except NotFound:
        msg = f"no key named {name!r} in this kernel"
        raise NotFound(msg, key=name) from None
    if not isinstance(record, dict):
        msg = f"key {name!r} has a malformed sealed record"
        raise NotFound(msg, key=name)
    return record


def _save(ctx: ServiceContext, record: dict[str, Any]) -> None:
    ctx.seal_put(_path(str(record["name"])), json.dumps(record, sort_keys=True).encode())


def _concerns(record: dict[str, Any]) -> list[str]:
    return sorted({str(record["owner"]), *map(str, record.get("users") or [])})


def _refuse(ctx: ServiceContext, record: dict[str, Any], op: str, reason: str) -> PolicyViolation:
    ctx.audit("refusal", {"key": record["name"], "op": op, "reason": reason}, concerns=_concerns(record))
    return PolicyViolation(f"key {record['name']!r}: {reason}", key=record["name"])


def _usable(ctx: ServiceContext, name: object, op: str, *, owner_only: bool = False) -> dict[str, Any]:
    record = _load(ctx, _key_name(name))
    allowed = ctx.party == record["owner"] or (not owner_only and ctx.party in (record.get("users") or []))
    if not allowed:
        who = "its owner" if owner_only else "its owner and its listed users"
        raise _refuse(ctx, record, op, f"party {ctx.party} may not {op} with it: only {who} may")
    if record.get("state") == "destroyed":
        raise _refuse(ctx, record, op, "it was destroyed and can never be used again")
    return record


def _version(record: dict[str, Any], asked: object) -> dict[str, Any]:
    versions = record["versions"]
    if asked is None:
        return dict(versions[-1])
    for v in versions:
        if v["version"] == asked:
            return dict(v)
    msg = f"key {record['name']!r} has no version {asked!r} (versions: {[v['version'] for v in versions]})"
    raise NotFound(msg, key=record["name"])


def _material(v: dict[str, Any]) -> bytes:
    return base64.b64decode(v["material"])


def _data(inputs: dict[str, Any], name: str = "data") -> bytes:
    value = inputs.get(name)
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, (bytes, bytearray, memoryview)):
        msg = f"give the {name} as bytes (or text)"
        raise EncodingError(msg)
    raw = bytes(value)
    if len(raw) > _MAX_DATA:
        msg = f"the {name} is over {_MAX_DATA >> 20} MiB; sign or encrypt a digest of it instead"
        raise EncodingError(msg)
    return raw


def _use(ctx: ServiceContext, record: dict[str, Any], op: str, version: int, data: bytes) -> None:
    ctx.audit(
        "key",
        {"key": record["name"], "op": op, "version": version, "data_sha256": hashlib.sha256(data).hexdigest()},
        concerns=_concerns(record),
    )


def _info(record: dict[str, Any]) -> dict[str, Any]:
    current = record["versions"][-1] if record["versions"] else None
    return {
        "name": record["name"],
        "kind": record["kind"],
        "owner": record["owner"],
        "users": list(record.get("users") or []),
        "state": record.get("state", "active"),
        "version": current["version"] if current else None,
        "versions": [v["version"] for v in record["versions"]],
        "public_key": current.get("public") if current else None,
        "created": record.get("created"),
    }


@service("key.create")
def create(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Make a key ``{name, kind, users}`` owned by the caller; return its public half (if the kind has one)."""
    name = _key_name(args.get("name"))
    kind = args.get("kind", "ed25519")
    if kind not in KINDS:
        msg = f"unknown key kind {kind!r}: choose one of {', '.join(KINDS)}"
        raise EncodingError(msg)
    users = args.get("users") or []
    if isinstance(users, str) or not isinstance(users, list) or not all(isinstance(u, str) and u for u in users):
        msg = "users must be a list of party ids"
        raise EncodingError(msg)
    try:
        existing = _load(ctx, name)
    except NotFound:
        existing = None
    if existing is not None:
        state = (
            "was destroyed (a destroyed key's name is never reused)"
            if existing.get("state") == "destroyed"
            else "already exists"
        )
        msg = f"a key named {name!r} {state}"
        raise PolicyViolation(msg, key=name)
    material = _new_material(str(kind))
    now = time.time()
    record = {
        "name": name,
        "kind": kind,
        "owner": ctx.party,
        "users": sorted(set(users) - {ctx.party}),
        "state": "active",
        "created": now,
        "versions": [
            {
                "version": 1,
                "material": base64.b64encode(material).decode(),
                "public": _public_pem(str(kind), material),
                "created": now,
            }
        ],
    }
    _save(ctx, record)
    ctx.audit("key", {"key": name, "op": "create", "kind": kind, "version": 1}, concerns=_concerns(record))
    return ServiceResult(info=_info(record))


@service("key.info")
def info(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """A key's public facts (kind, owner, users, versions, public key) for its owner and users."""
    record = _load(ctx, _key_name(args.get("name")))
    if ctx.party != record["owner"] and ctx.party not in (record.get("users") or []):
        raise _refuse(ctx, record, "info", f"party {ctx.party} is neither its owner nor a listed user")
    out = _info(record)
    if args.get("version") is not None and record["versions"]:
        out["public_key"] = _version(record, args.get("version")).get("public")
    return ServiceResult(info=out)


@service("key.list")
def listing(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """The keys the caller owns or may use."""
    out = []
    for path in ctx.seal_list("keys/"):
        try:
            record = _load(ctx, path.rsplit("/", 1)[-1])
        except NotFound:
            continue
        if ctx.party == record["owner"] or ctx.party in (record.get("users") or []):
            out.append(_info(record))
    return ServiceResult(info={"keys": sorted(out, key=lambda k: str(k["name"]))})


@service("key.sign")
def sign(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Sign ``data`` with the key's current version; return the signature and the version."""
    record = _usable(ctx, args.get("name"), "sign")
    kind = str(record["kind"])
    if kind == "aes-256-gcm":
        msg = f"key {record['name']!r} is an {kind} key: it encrypts, it does not sign"
        raise EncodingError(msg)
    data = _data(inputs)
    v = _version(record, None)
    priv = _private(kind, _material(v))
    if kind == "ed25519":
        sig = priv.sign(data)
    elif kind == "p256":
        sig = priv.sign(data, ec.ECDSA(hashes.SHA256()))
    else:
        sig = priv.sign(
            data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH), hashes.SHA256()
        )
    _use(ctx, record, "sign", int(v["version"]), data)
    return ServiceResult(
        info={"key": record["name"], "version": v["version"], "kind": kind}, values={"signature": bytes(sig)}
    )


@service("key.verify")
def verify(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Check ``signature`` over ``data`` (``version`` or the current one); ``info['valid']``."""
    record = _usable(ctx, args.get("name"), "verify")
    kind = str(record["kind"])
    if kind == "aes-256-gcm":
        msg = f"key {record['name']!r} is an {kind} key: it has no signatures to verify"
        raise EncodingError(msg)
    data, sig = _data(inputs), _data(inputs, "signature")
    v = _version(record, args.get("version"))
    pub = _private(kind, _material(v)).public_key()
    try:
        if kind == "ed25519":
            pub.verify(sig, data)
        elif kind == "p256":
            pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        else:
            pub.verify(
                sig,
                data,
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
                hashes.SHA256(),
            )
        valid = True
    except InvalidSignature:
        valid = False
    _use(ctx, record, "verify", int(v["version"]), data)
    return ServiceResult(info={"key": record["name"], "version": v["version"], "valid": valid})


@service("key.encrypt")
def encrypt(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """AEAD-encrypt ``data`` (``aes-256-gcm``, with optional ``aad``) or RSA-OAEP-encrypt it (``rsa-3072``)."""
    record = _usable(ctx, args.get("name"), "encrypt")
    kind = str(record["kind"])
    data = _data(inputs)
    v = _version(record, None)
    if kind == "aes-256-gcm":
        aad = _aad(inputs)
        nonce = os.urandom(12)
        ct = _VER.pack(int(v["version"])) + nonce + AESGCM(_material(v)).encrypt(nonce, data, aad)
    elif kind == "rsa-3072":
        ct = _VER.pack(int(v["version"])) + _private(kind, _material(v)).public_key().encrypt(data, _oaep())
    else:
        msg = f"key {record['name']!r} is an {kind} key: it signs; encrypt with an aes-256-gcm or rsa-3072 key"
        raise EncodingError(msg)
    _use(ctx, record, "encrypt", int(v["version"]), data)
    return ServiceResult(info={"key": record["name"], "version": v["version"]}, values={"ciphertext": bytes(ct)})


@service("key.decrypt")
def decrypt(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Decrypt what ``key.encrypt`` made (the version is in the ciphertext); a forged one is refused."""
    record = _usable(ctx, args.get("name"), "decrypt")
    kind = str(record["kind"])
    ct = _data(inputs, "ciphertext")
    if kind not in ("aes-256-gcm", "rsa-3072"):
        msg = f"key {record['name']!r} is an {kind} key: it does not decrypt"
        raise EncodingError(msg)
    if len(ct) < _VER.size + (12 if kind == "aes-256-gcm" else 1):
        msg = "the ciphertext is too short to be one this key made"
        raise EncodingError(msg)
    (version,) = _VER.unpack_from(ct)
    v = _version(record, version)
    try:
        if kind == "aes-256-gcm":
            body = ct[_VER.size :]
            pt = AESGCM(_material(v)).decrypt(body[:12], body[12:], _aad(inputs))
        else:
            pt = _private(kind, _material(v)).decrypt(ct[_VER.size :], _oaep())
    except (InvalidTag, ValueError):
        raise _refuse(ctx, record, "decrypt", "the ciphertext (or its associated data) does not authenticate") from None
    _use(ctx, record, "decrypt", int(v["version"]), ct)
    return ServiceResult(info={"key": record["name"], "version": v["version"]}, values={"plaintext": bytes(pt)})


@service("key.rotate")
def rotate(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Owner only: a new version becomes current; old versions still verify and decrypt."""
    record = _usable(ctx, args.get("name"), "rotate", owner_only=True)
    material = _new_material(str(record["kind"]))
    version = int(record["versions"][-1]["version"]) + 1
    record["versions"].append(
        {
            "version": version,
            "material": base64.b64encode(material).decode(),
            "public": _public_pem(str(record["kind"]), material),
            "created": time.time(),
        }
    )
    _save(ctx, record)
    ctx.audit("key", {"key": record["name"], "op": "rotate", "version": version}, concerns=_concerns(record))
    return ServiceResult(info=_info(record))


@service("key.destroy")
def destroy(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Owner only: wipe every version's material; the sealed tombstone refuses any later use or re-creation."""
    record = _usable(ctx, args.get("name"), "destroy", owner_only=True)
    record["state"] = "destroyed"
    record["destroyed"] = time.time()
    record["versions"] = [
        {"version": v["version"], "public": v.get("public"), "created": v.get("created")} for v in record["versions"]
    ]
    _save(ctx, record)
    ctx.audit("key", {"key": record["name"], "op": "destroy"}, concerns=_concerns(record))
    out = _info(record)
    return ServiceResult(info=out)


def _aad(inputs: dict[str, Any]) -> bytes | None:
    aad = inputs.get("aad")
    if aad is None:
        return None
    if isinstance(aad, str):
        return aad.encode()
    if isinstance(aad, (bytes, bytearray)):
        return bytes(aad)
    msg = "aad must be bytes or text"
    raise EncodingError(msg)


def _oaep() -> Any:
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def _kek(v: dict[str, Any]) -> bytes:
    """The key-encryption key of an ``aes-256-gcm`` key version (HKDF-SHA256, its own label)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEK_INFO).derive(_material(v))


def _wrapping_key(ctx: ServiceContext, args: dict[str, Any], op: str) -> dict[str, Any]:
    record = _usable(ctx, args.get("name"), op)
    if record["kind"] != "aes-256-gcm":
        msg = f"key {record['name']!r} is an {record['kind']} key: wrap and unwrap with an aes-256-gcm key"
        raise EncodingError(msg)
    return record


@service("key.wrap")
def wrap(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Wrap ``key`` (key material, 1 byte to 64 KiB) with AES key wrap with padding (RFC 5649)."""
    record = _wrapping_key(ctx, args, "wrap")
    material = _data(inputs, "key")
    if not material or len(material) > _MAX_WRAP:
        msg = f"the key material to wrap must be 1 byte to {_MAX_WRAP >> 10} KiB (encrypt bulk data instead)"
        raise EncodingError(msg)
    v = _version(record, None)
    wrapped = _VER.pack(int(v["version"])) + aes_key_wrap_with_padding(_kek(v), material)
    _use(ctx, record, "wrap", int(v["version"]), material)
    return ServiceResult(info={"key": record["name"], "version": v["version"]}, values={"wrapped": bytes(wrapped)})


@service("key.unwrap")
def unwrap(ctx: ServiceContext, args: dict[str, Any], inputs: dict[str, Any]) -> ServiceResult:
    """Unwrap what ``key.wrap`` made (the version is in front); an altered one is refused."""
    record = _wrapping_key(ctx, args, "unwrap")
    wrapped = _data(inputs, "wrapped")
    if len(wrapped) < _VER.size + 16:
        msg = "the wrapped key is too short to be one this key made"
        raise EncodingError(msg)
    (version,) = _VER.unpack_from(wrapped)
    v = _version(record, version)
    try:
        material = aes_key_unwrap_with_padding(_kek(v), wrapped[_VER.size :])
    except InvalidUnwrap:
        raise _refuse(ctx, record, "unwrap", "the wrapped key does not authenticate under this key") from None
    _use(ctx, record, "unwrap", int(v["version"]), wrapped)
    return ServiceResult(info={"key": record["name"], "version": v["version"]}, values={"key": bytes(material)})
