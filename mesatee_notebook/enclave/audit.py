"""The enclave's append-only, hash-chained, signed audit log.

One JSON line per entry (format and checks in :mod:`mesatee_notebook.attestation.audit_verify`), appended with
``O_APPEND`` and ``fsync``-ed before :meth:`AuditLog.append` returns. The log is signed, not encrypted: the host can
read it, so ``details`` carry ids, digests and counts, never data.

On open the whole log is verified with the enclave's own key. A final line without its newline is the trace of a
crash mid-append (never acknowledged to anyone); it is cut off and a ``recovery`` entry records how many bytes were
dropped. Any other damage raises ``TamperedData``. With a ``head_store`` the latest head is also sealed after every
append, so a log cut short behind the enclave's back is refused on the next open.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mesatee_notebook.attestation.audit_verify import (
    ALL_PARTIES,
    AUDIT_FORMAT_VERSION,
    AUDIT_KINDS,
    GENESIS,
    AuditHead,
    canonical_json,
    entry_concerns,
    entry_hash,
    signing_payload,
    verify_audit_log,
)
from mesatee_notebook.enclave.sealing import SealedStore
from mesatee_notebook.errors import EncodingError, SealingError, TamperedData

__all__ = ["AUDIT_KINDS", "AuditLog"]

_HEAD_NAME: Final = "audit/head"


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AuditLog:
    """Append-only signed audit log in one file; see the module docstring."""

    def __init__(
        self,
        path: Path,
        signing_key: Ed25519PrivateKey,
        *,
        head_store: SealedStore | None = None,
        clock: Callable[[], dt.datetime] = _utc_now,
    ) -> None:
        self.path = Path(path)
        self._key = signing_key
        self._head_store = head_store
        self._clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        entries, dropped = self._load()
        self._entries: list[dict[str, Any]] = entries
        self._check_sealed_head()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        os.fchmod(self._fd, 0o600)
        if dropped:  # the kernel's own crash, no party's call: every party is told its log lost an unfinished entry
            self.append(
                "recovery",
                None,
                {"dropped_bytes": dropped, "reason": "unfinished entry from a crash during append"},
                concerns=[ALL_PARTIES],
            )

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The key that verifies this log's entries."""
        return self._key.public_key()

    def close(self) -> None:
        """Close the log file; later appends fail."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self) -> tuple[list[dict[str, Any]], int]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return [], 0
        dropped = 0
        if raw and not raw.endswith(b"\n"):
            keep = raw.rfind(b"\n") + 1
            dropped = len(raw) - keep
            raw = raw[:keep]
            with self.path.open("r+b") as fh:
                fh.truncate(keep)
                os.fsync(fh.fileno())
        entries: list[dict[str, Any]] = []
        for lineno, line in enumerate(raw.splitlines()):
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                msg = f"audit log entry {lineno}: line is not valid JSON"
                raise TamperedData(msg, entry=lineno, seq=-1, reason="not JSON", file=str(self.path)) from None
            entries.append(entry)
        verify_audit_log(entries, self.public_key)
        return entries, dropped

    def _check_sealed_head(self) -> None:
        if self._head_store is None or not self._head_store.exists(_HEAD_NAME):
            return
        sealed = json.loads(self._head_store.get(_HEAD_NAME))
        head = AuditHead(int(sealed["seq"]), str(sealed["hash"]))
        verify_audit_log(self._entries, self.public_key, expected_head=head)

    def head(self) -> AuditHead | None:
        """Return the current head (last ``seq`` and its hash), or ``None`` while empty."""
        with self._lock:
            if not self._entries:
                return None
            last = self._entries[-1]
            return AuditHead(int(last["seq"]), entry_hash(last))

    def append(
        self,
        kind: str,
        party: str | None,
        details: Mapping[str, Any] | None = None,
        *,
        concerns: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Sign, append and fsync one entry; return it. ``concerns`` lists the other parties it is visible to."""
        if kind not in AUDIT_KINDS:
            msg = f"unknown audit entry kind {kind!r}; expected one of {sorted(AUDIT_KINDS)}"
            raise EncodingError(msg, kind=kind)
        with self._lock:
            if self._fd < 0:
                msg = f"the audit log {self.path} is closed"
                raise SealingError(msg)
            prev = entry_hash(self._entries[-1]) if self._entries else GENESIS
            entry: dict[str, Any] = {
                "v": AUDIT_FORMAT_VERSION,
                "seq": len(self._entries),
                "time": self._clock().astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "kind": kind,
                "party": party,
                "concerns": sorted(set(concerns) - ({party} if party else set())),
                "details": dict(details or {}),
                "prev": prev,
            }
            try:
                payload = signing_payload(entry)
            except (TypeError, ValueError) as exc:
                msg = f"audit details must be plain JSON values (str, int, bool, None, list, dict): {exc}"
                raise EncodingError(msg) from exc
            entry["sig"] = base64.b64encode(self._key.sign(payload)).decode()
            line = canonical_json(entry) + b"\n"
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
            self._entries.append(entry)
            if self._head_store is not None:
                head = {"seq": entry["seq"], "hash": entry_hash(entry)}
                self._head_store.put(_HEAD_NAME, canonical_json(head))
            return dict(entry)

    def entries(self) -> list[dict[str, Any]]:
        """All entries, oldest first (copies)."""
        with self._lock:
            return [dict(e) for e in self._entries]

    def visible_to(self, party_id: str) -> list[dict[str, Any]]:
        """Return the entries that concern ``party_id``; verify them with ``verify_audit_log(..., partial=True)``."""
        with self._lock:
            return [dict(e) for e in self._entries if entry_concerns(e, party_id)]
