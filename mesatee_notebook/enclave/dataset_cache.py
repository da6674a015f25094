"""The decoded datasets a service worker keeps between calls: per (party, dataset), bounded in bytes.

A worker serves many parties. Its cache of decoded datasets was keyed by dataset name alone, so how long a party's
first query of a large dataset took told it whether another party had used that dataset recently: measured here,
a 100 MB dataset took an analyst 2.2 s cold and 1.1 s after its owner had queried it (a gap session 7's red team
left: ``tests/security/test_gaps.py``, figures in ``docs/sandbox.md``). Each party now has entries of its own,
decoded from its own read of the sealed data, so another party's use warms nothing for it. Two parties that read one
dataset hold two copies, and the cache holds at most ``limit`` bytes in all (the least recently used entry goes
first), a quarter of the worker's memory by default. What is left: a party's entry can be evicted by the bytes other
parties loaded since, which says that someone loaded a lot, not what.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import pandas as pd

__all__ = ["DEFAULT_LIMIT", "DatasetCache", "frame_bytes"]

DEFAULT_LIMIT = 4 << 30  # bytes, when the worker's memory limit is not known (no sandbox, no limit)


def frame_bytes(df: pd.DataFrame, raw_size: int) -> int:
    """What a decoded frame holds: its Arrow bytes (shared by numeric columns) or its columns, whichever is more."""
    return max(raw_size, int(df.memory_usage(index=False, deep=False).sum()))


class DatasetCache:
    """(party, dataset) -> (data digest, frame), least recently used first, at most ``limit`` bytes in all."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[tuple[str, str], tuple[str, pd.DataFrame, int]] = (
            collections.OrderedDict()
        )
        self._bytes = 0

    @classmethod
    def of(cls, state: dict[str, Any]) -> DatasetCache:
        """The worker's cache (``state["dataset_cache"]``), made on first use with ``state["dataset_cache_bytes"]``."""
        cache = state.get("dataset_cache")
        if not isinstance(cache, cls):
            cache = state["dataset_cache"] = cls(int(state.get("dataset_cache_bytes") or DEFAULT_LIMIT))
        return cache

    def get(self, party: str, name: str, digest: str) -> pd.DataFrame | None:
        """``party``'s frame of ``name`` if it holds the data with ``digest`` (and mark it used), else None."""
        with self._lock:
            hit = self._entries.get((party, name))
            if hit is None or hit[0] != digest:
                return None
            self._entries.move_to_end((party, name))
            return hit[1]

    def put(self, party: str, name: str, digest: str, df: pd.DataFrame, nbytes: int) -> None:
        """Keep ``df`` for ``party``, evicting the least recently used entries (one over the bound is not kept)."""
        with self._lock:
            self._pop((party, name))
            if nbytes > self.limit:
                return
            while self._entries and self._bytes + nbytes > self.limit:
                self._pop(next(iter(self._entries)))
            self._entries[(party, name)] = (digest, df, nbytes)
            self._bytes += nbytes

    def drop(self, name: str) -> None:
        """Forget every party's frame of ``name`` (the dataset was deleted)."""
        with self._lock:
            for key in [k for k in self._entries if k[1] == name]:
                self._pop(key)

    def _pop(self, key: tuple[str, str]) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[2]

    @property
    def nbytes(self) -> int:
        """Bytes held now (never more than :attr:`limit`)."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
