"""remote/ctrl_c.py: a Ctrl-C during a frame's read is held until the frame is whole; a second one abandons."""

from __future__ import annotations

import signal
import threading

import pytest

from mesatee_notebook.remote.ctrl_c import held_while_reading


@pytest.fixture(autouse=True)
def _python_sigint_handler():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background run may ignore SIGINT
    yield
    signal.signal(signal.SIGINT, previous)


def _press() -> None:
    signal.raise_signal(signal.SIGINT)


def test_one_press_is_held_until_the_block_ends():
    with held_while_reading() as held:
        _press()
        reached = True  # no KeyboardInterrupt mid-frame
    assert reached and held.pressed and not held.abandoned
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    with pytest.raises(KeyboardInterrupt):  # and live again after the frame
        _press()


def test_a_second_press_abandons_at_once():
    with pytest.raises(KeyboardInterrupt), held_while_reading() as held:
        _press()
        _press()
    assert held.pressed and held.abandoned
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_programs_own_handler_is_left_alone():
    seen: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    with held_while_reading() as held:
        _press()
    assert seen == [signal.SIGINT] and not held.pressed


def test_other_threads_hold_nothing():
    out: list[object] = []

    def read() -> None:
        with held_while_reading() as held:
            out.append(signal.getsignal(signal.SIGINT))
        out.append(held.pressed)

    t = threading.Thread(target=read)
    t.start()
    t.join(60)
    assert out == [signal.default_int_handler, False]
