"""Progress for one remote call: byte bars for big transfers, an elapsed-time bar for long jobs.

``tqdm.auto`` picks a widget bar in notebooks and a text bar in terminals. Bars are
created lazily: a small, quick cell shows nothing at all.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from types import TracebackType
from typing import Any

from mesatee_notebook.remote._bars import close_bar, open_bar

__all__ = ["CallProgress"]

_TICK = 0.5


class CallProgress:
    """Context manager handed to ``Session.run``'s progress and stream callbacks."""

    def __init__(self, *, enabled: bool = True, min_bytes: int = 4 << 20, long_after: float = 3.0) -> None:
        self.enabled = enabled
        self.min_bytes = min_bytes
        self.long_after = long_after
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._bars: dict[str, Any] = {}
        self._ticker: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> CallProgress:
        if self.enabled and self.long_after >= 0:
            ctx = contextvars.copy_context()  # so a notebook bar lands in this cell's output
            self._ticker = threading.Thread(target=ctx.run, args=(self._tick,), name="mesatee-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            for bar in self._bars.values():
                close_bar(bar)  # in a notebook its output is cleared, so no stale "0%" is saved
            self._bars.clear()

    # -- callbacks ------------------------------------------------------------------------------
    def upload(self, done: int, total: int) -> None:
        """``upload_progress(done_bytes, total_bytes)``."""
        self._bytes("upload", "mesatee ↑ sending", done, total)

    def download(self, done: int, total: int) -> None:
        """``download_progress(done_bytes, total_bytes)``."""
        self._bytes("download", "mesatee ↓ receiving", done, total)

    def write(self, name: str, text: str) -> None:
        """Echo one chunk of the remote stdout/stderr without tearing a terminal bar."""
        stream = sys.stderr if name == "stderr" else sys.stdout
        with self._lock:
            text_bars = [b for b in self._bars.values() if not _is_widget(b)]
            for bar in text_bars:
                bar.clear()
            stream.write(text)
            stream.flush()
            for bar in text_bars:
                bar.refresh()

    # -- internals ------------------------------------------------------------------------------
    def _bytes(self, key: str, desc: str, done: int, total: int) -> None:
        if not self.enabled or total < self.min_bytes:
            return
        with self._lock:
            bar = self._bars.get(key)
            if bar is not None and (bar.total != total or done < bar.n):
                close_bar(bar)  # the next payload of a multi-part message
                bar = None
            if bar is None:
                bar = _tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)
                self._bars[key] = bar
            bar.update(done - bar.n)

    def _tick(self) -> None:
        if self._done.wait(self.long_after):
            return
        with self._lock:
            bar = _tqdm(total=None, desc="mesatee: running in the enclave", bar_format="{desc} {elapsed}")
            self._bars["job"] = bar
        while not self._done.wait(_TICK):
            with self._lock:
                bar.refresh()


def _tqdm(**kwargs: Any) -> Any:
    # disable=None: a widget in notebooks, a text bar on a terminal, nothing in logs and pipes.
    return open_bar(leave=False, disable=None, **kwargs)


def _is_widget(bar: Any) -> bool:
    return hasattr(bar, "container")
