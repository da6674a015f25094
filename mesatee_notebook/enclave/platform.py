"""The softtee platform: its long-lived Ed25519 key and sealing secret, in a data directory.

Layout (files 0600, directories 0700)::

    DATA_DIR/platform/platform_key.pem    Ed25519 private key (PKCS#8 PEM)
    DATA_DIR/platform/platform.pub        its public key (PEM), safe to share
    DATA_DIR/platform/fingerprint         hex SHA-256 of the raw public key: what clients pin
    DATA_DIR/platform/sealing.key         32 random bytes, root of sealed storage keys

Keys are read from files only, never from argv or the environment.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from mesatee_notebook.attestation.evidence import fingerprint
from mesatee_notebook.errors import MesateeError

__all__ = ["Platform", "init_platform", "load_platform", "platform_fingerprint"]


@dataclass(frozen=True)
class Platform:
    """A loaded softtee platform."""

    key: Ed25519PrivateKey
    sealing_secret: bytes
    fingerprint: str
    directory: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def init_platform(data_dir: Path, *, exist_ok: bool = True) -> str:
    """Create the platform key and sealing secret; return the fingerprint to pin."""
    pdir = Path(data_dir).expanduser() / "platform"
    if (pdir / "platform_key.pem").exists():
        if not exist_ok:
            msg = f"a platform already exists in {pdir}; refusing to overwrite its key"
            raise MesateeError(msg)
        return platform_fingerprint(data_dir)
    pdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(pdir, 0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    _write_private(pdir / "sealing.key", secrets.token_bytes(32))
    _write_private(pdir / "platform_key.pem", pem)
    pub = key.public_key()
    (pdir / "platform.pub").write_bytes(pub.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    fp = fingerprint(pub.public_bytes(Encoding.Raw, PublicFormat.Raw))
    (pdir / "fingerprint").write_text(fp + "\n")
    return fp


def platform_fingerprint(data_dir: Path) -> str:
    """The fingerprint clients pin for the platform in ``data_dir``."""
    path = Path(data_dir).expanduser() / "platform" / "fingerprint"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        msg = f"no softtee platform in {data_dir}; run `mesatee-enclave init-platform --data-dir {data_dir}` first"
        raise MesateeError(msg) from None


def load_platform(data_dir: Path, *, secret_in_tpm_ok: bool = False) -> Platform:
    """Load the platform; refuse key files readable by others.

    Once a ``--level tpm`` kernel has moved the sealing secret into the TPM (``enclave/tpm_secret.py``) there is no
    ``sealing.key``: with ``secret_in_tpm_ok`` the platform loads with an empty ``sealing_secret`` (the kernel unseals
    it after its measured launch); without it, the refusal says to serve at ``--level tpm``.
    """
    pdir = Path(data_dir).expanduser() / "platform"
    key_path = pdir / "platform_key.pem"
    if not key_path.exists():
        msg = f"no softtee platform in {data_dir}; run `mesatee-enclave init-platform --data-dir {data_dir}` first"
        raise MesateeError(msg)
    secret_path = pdir / "sealing.key"
    if not secret_path.exists() and any((pdir / "tpm-sealed").glob("*.json")):
        if not secret_in_tpm_ok:
            msg = (
                f"the sealing secret of {data_dir} is sealed in a TPM (platform/tpm-sealed/): serve it with "
                "--level tpm --tcti TCTI, or reseal for another measurement with `mesatee-enclave tpm-reseal`"
            )
            raise MesateeError(msg)
        secret_path = key_path  # checked for permissions below; the secret itself comes from the TPM
    for p in (key_path, secret_path):
        if p.stat().st_mode & 0o077:
            msg = f"{p} is readable by other users; chmod 600 it (keys must be private)"
            raise MesateeError(msg)
    key = load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        msg = f"{key_path} is not an Ed25519 key"
        raise MesateeError(msg)
    secret = secret_path.read_bytes() if secret_path != key_path else b""
    fp = fingerprint(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    return Platform(key=key, sealing_secret=secret, fingerprint=fp, directory=pdir)
