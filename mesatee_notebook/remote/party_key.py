"""A party's own identity key (client side): created on first use, kept in a private directory.

The private key is an unencrypted PKCS#8 PEM file, mode 0600, in a directory of mode 0700 owned by the user. A key
file or directory that others can read is refused, as ssh refuses it. The party id is the SHA-256 fingerprint of the
raw public key (see :mod:`mesatee_notebook.attestation.party_proof`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from mesatee_notebook.attestation.party_proof import migration_grant_message, party_id_of, proof_message
from mesatee_notebook.errors import PolicyViolation

__all__ = ["KEY_FILE_NAME", "PartyIdentity", "default_identity_dir"]

KEY_FILE_NAME: Final = "party_ed25519.pem"


def default_identity_dir() -> Path:
    """Return ``$XDG_CONFIG_HOME/mesatee_notebook/identity`` (``~/.config/...`` by default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mesatee_notebook" / "identity"


def _check_private(path: Path, what: str) -> None:
    st = path.stat()
    if st.st_uid != os.getuid():
        msg = f"{what} {path} belongs to another user (uid {st.st_uid}); refusing to use it"
        raise PolicyViolation(msg, path=str(path))
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        wanted = "700" if stat.S_ISDIR(st.st_mode) else "600"
        msg = f"{what} {path} is accessible to other users (mode {mode:o}); run: chmod {wanted} {path}"
        raise PolicyViolation(msg, path=str(path))


class PartyIdentity:
    """An Ed25519 party key pair; ``party_id`` is its public fingerprint."""

    __slots__ = ("_key", "path", "public_key_raw")

    def __init__(self, key: Ed25519PrivateKey, path: Path | None = None) -> None:
        self._key = key
        self.path = path
        self.public_key_raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def __repr__(self) -> str:
        return f"PartyIdentity(party_id={self.party_id[:16]}...)"

    @property
    def party_id(self) -> str:
        """SHA-256 fingerprint (hex) of the raw public key."""
        return party_id_of(self.public_key_raw)

    @classmethod
    def load_or_create(cls, directory: Path | None = None) -> PartyIdentity:
        """Load the key in ``directory`` (default :func:`default_identity_dir`), creating it on first use."""
        directory = Path(directory) if directory is not None else default_identity_dir()
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)
        _check_private(directory, "identity directory")
        path = directory / KEY_FILE_NAME
        if not path.exists():
            cls._create(path)
        _check_private(path, "identity key file")
        key = load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            msg = f"identity key file {path} does not hold an Ed25519 private key"
            raise PolicyViolation(msg, path=str(path))
        return cls(key, path)

    @staticmethod
    def _create(path: Path) -> None:
        """Write a new key atomically and without clobbering one another process created meanwhile."""
        pem = Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # fails if another process won the race: keep its key
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @classmethod
    def generate(cls) -> PartyIdentity:
        """Return an in-memory identity (tests, throwaway sessions); nothing is written."""
        return cls(Ed25519PrivateKey.generate())

    def prove(self, server_nonce: bytes | str, server_cert_sha256: bytes) -> bytes:
        """Sign the server's nonce and certificate hash: proof that this party holds its key on this channel."""
        return self._key.sign(proof_message(server_nonce, server_cert_sha256, self.public_key_raw))

    def sign_migration_grant(self, grant: dict[str, Any]) -> bytes:
        """Sign a migration grant (see :func:`~mesatee_notebook.attestation.party_proof.migration_grant`)."""
        return self._key.sign(migration_grant_message(grant))
