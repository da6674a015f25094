"""Ctrl-C while the client reads a frame: held until the frame is whole, so the stream stays in step.

A Ctrl-C (SIGINT, Python's ``KeyboardInterrupt``) raised inside the frame reader left the rest of that frame on the
socket: the client asked the kernel to interrupt the cell and then read on from the middle of the frame, saw "bad
magic bytes" and lost the session (found in session 8: ``tests/core/test_session.py``). The channel now waits for a
frame to begin with Ctrl-C live (nothing has been read, so an interrupt there is safe), then reads the frame with
Ctrl-C held: a press while the frame comes in is kept and acted on once it is whole. A second press while one is
held is not held: it abandons the call at once (the channel is closed), so a frame that never completes cannot
make Ctrl-C unanswerable.

Only the main thread gets signals, and only Python's own handler is replaced (for the frame's read, then put back):
a program that installed its own SIGINT handler keeps it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

__all__ = ["Held", "held_while_reading"]


@dataclass
class Held:
    """What happened to Ctrl-C during one frame's read."""

    pressed: bool = False  # one press came while the frame was read: act on it now that it is whole
    abandoned: bool = False  # a second press raised KeyboardInterrupt mid-frame: the stream is out of step


@contextlib.contextmanager
def held_while_reading() -> Iterator[Held]:
    """Hold Ctrl-C for the block (the read of one frame), when this thread may and Python's handler is in place."""
    held = Held()
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield held
        return

    def hold(signum: int, frame: FrameType | None) -> None:
        if held.pressed:  # the second press: abandon the call rather than wait for the frame
            held.abandoned = True
            raise KeyboardInterrupt
        held.pressed = True

    signal.signal(signal.SIGINT, hold)
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)
