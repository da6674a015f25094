"""Short tracebacks for errors raised through the public Python API.

A refusal raised deep in the plan checks (``wire/plan.py``), or rebuilt from the wire in ``Channel.request``,
would otherwise show the user 30-45 lines of this package's internals around a one-line message. Every public
method of the user-facing classes is wrapped by :func:`public_api`: when a :class:`MesateeError` leaves it, it is
re-raised with its traceback cut at that method, so what a user sees is their own line, one frame naming the
method they called, and the complete message. Nothing is lost: the cut frames are kept on the exception
(:func:`full_traceback`), and ``%mesatee traceback`` prints them.
"""

from __future__ import annotations

import functools
import inspect
import traceback
from collections.abc import Callable
from typing import Any, TypeVar, cast

from mesatee_notebook.errors import MesateeError

__all__ = ["full_traceback", "public_api", "public_methods"]

_F = TypeVar("_F", bound=Callable[..., Any])
_C = TypeVar("_C", bound=type)

_ATTR = "_mesatee_internal_frames"
# methods never wrapped: construction, identity and display must stay plain (and never raise refusals)
_PLAIN = frozenset(
    {
        "__init__",
        "__new__",
        "__repr__",
        "__str__",
        "__hash__",
        "__dir__",
        "__init_subclass__",
        "__class_getitem__",
        "__copy__",
        "__deepcopy__",
        "__getstate__",
        "__setstate__",
        "__post_init__",
        "__enter__",
        "__exit__",
        "__del__",
    }
)


def full_traceback(exc: BaseException) -> traceback.StackSummary | None:
    """The frames inside this package that :func:`public_api` cut from ``exc``'s traceback (None if none were)."""
    frames = getattr(exc, _ATTR, None)
    return frames if isinstance(frames, traceback.StackSummary) else None


def _keep_cut_frames(exc: MesateeError) -> None:
    here = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]  # not the wrappers
    # an inner public method cut the trace already: what it cut goes below what this one cuts
    setattr(exc, _ATTR, traceback.StackSummary.from_list([*here, *(full_traceback(exc) or [])]))


def public_api(fn: _F) -> _F:
    """Wrap ``fn`` so a :class:`MesateeError` leaving it carries a traceback that starts at ``fn``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # IPython and pytest hide this frame where they can
        try:
            return fn(*args, **kwargs)
        except MesateeError as exc:
            _keep_cut_frames(exc)
            # the frames below this one are mesatee_notebook's own; `%mesatee traceback` shows them
            raise exc.with_traceback(None) from exc.__cause__  # (an explicit cause stays: it says why)

    # the one frame users see is named after the method they called, not "wrapper"
    wrapper.__code__ = wrapper.__code__.replace(co_name=fn.__name__, co_qualname=fn.__qualname__)
    return cast("_F", functools.update_wrapper(wrapper, fn))


def public_methods(cls: _C) -> _C:
    """Class decorator: wrap the methods ``cls`` defines itself (public ones and operators) with :func:`public_api`."""
    for name, value in list(vars(cls).items()):
        if name in _PLAIN or (name.startswith("_") and not (name.startswith("__") and name.endswith("__"))):
            continue
        if inspect.isfunction(value):
            setattr(cls, name, public_api(value))
    return cls
