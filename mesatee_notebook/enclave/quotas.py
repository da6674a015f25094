"""Quotas per party, and one shared quota for anonymous clients.

Four limits, each counted per *holder* (a proven party id, or ``anonymous`` for every client that proved none):

- ``sessions``: open sessions;
- ``executors``: executor processes working for the holder (its sessions' executors, plus service workers busy
  with its calls);
- ``concurrent_calls``: cells and service calls in flight at once;
- ``sealed_bytes``: plaintext bytes the holder has sealed (cells' ``mesatee.open`` and service writes made
  during its calls). The attribution ledger is itself sealed (``quota/ledger``), so it survives a restart.

A refusal is :class:`~mesatee_notebook.errors.QuotaExceeded` naming the limit and the ``serve`` flag that raises it.
All anonymous clients share one quota: an anonymous flood cannot take more than it, and proven parties keep theirs.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from mesatee_notebook.errors import NotFound, QuotaExceeded

__all__ = ["ANONYMOUS", "ANONYMOUS_QUOTA", "LIMITS", "PARTY_QUOTA", "ByteBudget", "Quota", "QuotaBook"]

ANONYMOUS = "anonymous"
LIMITS = ("sessions", "executors", "concurrent_calls", "sealed_bytes")
_LEDGER = "quota/ledger"


@dataclass(frozen=True, slots=True)
class Quota:
    """What one holder may use at once."""

    sessions: int
    executors: int
    concurrent_calls: int
    sealed_bytes: int

    def as_dict(self) -> dict[str, int]:
        """The limits by name."""
        return asdict(self)


PARTY_QUOTA = Quota(sessions=16, executors=20, concurrent_calls=16, sealed_bytes=64 << 30)
ANONYMOUS_QUOTA = Quota(sessions=4, executors=4, concurrent_calls=4, sealed_bytes=1 << 30)


def flag(holder_kind: str, limit: str) -> str:
    """The ``mesatee-enclave serve`` flag that sets ``limit`` for parties or anonymous clients."""
    return f"--{holder_kind}-{limit.replace('_', '-')}"


class QuotaBook:
    """Counts what each holder uses and refuses what would go over its quota (thread-safe)."""

    def __init__(self, party: Quota, anonymous: Quota, store: Callable[[], Any] | None = None) -> None:
        self.party_quota = party
        self.anonymous_quota = anonymous
        self._store = store
        self._lock = threading.Lock()
        self._used: dict[str, dict[str, int]] = {}
        self._ledger: dict[str, list[Any]] | None = None

    @staticmethod
    def holder(party: str | None) -> str:
        """The quota holder for a connection's party (``anonymous`` when none was proven)."""
        return party if party is not None else ANONYMOUS

    def quota_of(self, holder: str) -> Quota:
        """The quota that applies to ``holder``."""
        return self.anonymous_quota if holder == ANONYMOUS else self.party_quota

    def _refuse(self, holder: str, limit: str, used: int, want: int) -> QuotaExceeded:
        value = getattr(self.quota_of(holder), limit)
        kind = "anonymous" if holder == ANONYMOUS else "party"
        who = "anonymous clients (together)" if holder == ANONYMOUS else f"party {holder[:16]}…"
        what = limit.replace("_", " ")
        hint = (
            "connect with a party identity for the larger party quota, or ask the kernel operator"
            if holder == ANONYMOUS
            else "close what you no longer need, or ask the kernel operator"
        )
        msg = (
            f"quota exceeded: {who} would use {used + want} {what}, over the limit of {value}; "
            f"{hint} to raise it (mesatee-enclave serve {flag(kind, limit)} N)"
        )
        return QuotaExceeded(msg, limit=limit, value=value, used=used, holder=kind, flag=flag(kind, limit))

    def take(self, holder: str, **amounts: int) -> None:
        """Count ``amounts`` (e.g. ``sessions=1, executors=1``) for ``holder``, or refuse them all."""
        quota = self.quota_of(holder)
        with self._lock:
            used = self._used.setdefault(holder, dict.fromkeys(LIMITS, 0))
            for limit, n in amounts.items():
                if used[limit] + n > getattr(quota, limit):
                    raise self._refuse(holder, limit, used[limit], n)
            for limit, n in amounts.items():
                used[limit] += n

    def give_back(self, holder: str, **amounts: int) -> None:
        """Release what :meth:`take` counted."""
        with self._lock:
            used = self._used.setdefault(holder, dict.fromkeys(LIMITS, 0))
            for limit, n in amounts.items():
                used[limit] = max(0, used[limit] - n)

    @contextlib.contextmanager
    def holding(self, holder: str, **amounts: int) -> Iterator[None]:
        """Take ``amounts`` for the duration of a block."""
        self.take(holder, **amounts)
        try:
            yield
        finally:
            self.give_back(holder, **amounts)

    # -- sealed bytes -----------------------------------------------------------------------------------------
    def _load_ledger(self) -> dict[str, list[Any]]:
        if self._ledger is None:
            self._ledger = {}
            if self._store is not None:
                try:
                    raw = json.loads(self._store().get(_LEDGER))
                    self._ledger = {str(k): list(v) for k, v in raw.items()}
                except NotFound:
                    pass
        return self._ledger

    def _save_ledger(self) -> None:
        if self._store is not None and self._ledger is not None:
            self._store().put(_LEDGER, json.dumps(self._ledger).encode())

    def _sealed_used(self, holder: str) -> int:
        return sum(int(size) for who, size in self._load_ledger().values() if who == holder)

    def seal(self, holder: str, name: str, size: int, write: Callable[[], None]) -> None:
        """Run ``write`` (sealing ``size`` bytes under ``name``) if the holder's sealed-bytes quota allows it."""
        with self._lock:
            ledger = self._load_ledger()
            previous = ledger.get(name)
            used = self._sealed_used(holder) - (int(previous[1]) if previous and previous[0] == holder else 0)
            if used + size > self.quota_of(holder).sealed_bytes:
                raise self._refuse(holder, "sealed_bytes", used, size)
            ledger[name] = [holder, size]  # reserved now, so concurrent writers cannot both fit in one quota
        try:
            write()
        except BaseException:
            with self._lock:
                if previous is None:
                    ledger.pop(name, None)
                else:
                    ledger[name] = previous
            raise
        with self._lock:
            self._save_ledger()

    def unseal(self, name: str, delete: Callable[[], None]) -> None:
        """Run ``delete`` for ``name`` and stop counting its bytes."""
        with self._lock:
            delete()
            if self._load_ledger().pop(name, None) is not None:
                self._save_ledger()

    def report(self, party: str | None) -> dict[str, Any]:
        """What ``whoami`` shows: the holder, its limits and what it uses now."""
        holder = self.holder(party)
        with self._lock:
            used = dict(self._used.get(holder, dict.fromkeys(LIMITS, 0)))
            used["sealed_bytes"] = self._sealed_used(holder)
        return {
            "holder": "anonymous" if holder == ANONYMOUS else "party",
            "limits": self.quota_of(holder).as_dict(),
            "used": used,
        }


class ByteBudget:
    """Payload bytes that unauthenticated connections may hold at once, all together.

    A per-frame limit alone lets many anonymous connections each hold one large half-sent frame; this bounds
    their sum. :meth:`allocator` wraps a payload allocator so each buffer is counted before it is made.
    """

    def __init__(self, limit: int, flag_name: str = "--anonymous-inflight-bytes") -> None:
        self.limit = limit
        self.flag = flag_name
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Count ``n`` bytes, or refuse them with ``QuotaExceeded``."""
        with self._lock:
            if self.used + n > self.limit:
                msg = (
                    f"quota exceeded: anonymous clients (together) would hold {self.used + n} bytes of requests in "
                    f"flight, over the limit of {self.limit}; connect with a party identity, or ask the kernel "
                    f"operator to raise it (mesatee-enclave serve {self.flag} N)"
                )
                raise QuotaExceeded(
                    msg, limit="inflight_bytes", value=self.limit, used=self.used, holder="anonymous", flag=self.flag
                )
            self.used += n

    def give_back(self, n: int) -> None:
        """Release bytes counted by :meth:`take`."""
        with self._lock:
            self.used = max(0, self.used - n)

    def allocator(self, inner: Callable[[int], Any]) -> tuple[Callable[[int], Any], Callable[[], None]]:
        """``(allocator, release)``: the allocator counts every buffer; ``release`` gives all of them back."""
        taken = [0]

        def alloc(size: int) -> Any:
            self.take(size)
            taken[0] += size
            return inner(size)

        def release() -> None:
            self.give_back(taken[0])
            taken[0] = 0

        return alloc, release
