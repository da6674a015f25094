"""Progress bars that end in their final state: a widget in JupyterLab, a text bar on a terminal, none in pipes.

A ``tqdm.notebook`` widget saves into the notebook file with the text it had when it was first shown
("mesatee gbdt: 0%| | 0/50"), and an exported or reopened notebook shows that stale text. Here a notebook bar is
shown through a display handle instead, and :func:`close_bar` replaces that output with the bar's final line
(or with nothing, for a transient bar), so what is saved is what the bar ended at.
"""

from __future__ import annotations

from typing import Any

__all__ = ["close_bar", "open_bar"]

_HANDLE = "_mesatee_display"


class _FinalLine:
    """What a finished bar's output becomes: plain text (empty for a transient bar)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {"text/plain": self.text}


def _notebook_tqdm(cls: type) -> bool:
    try:
        from tqdm.notebook import tqdm as notebook_tqdm
    except ImportError:  # pragma: no cover - tqdm.auto then never picks the notebook bar either
        return False
    return issubclass(cls, notebook_tqdm)


def open_bar(**kwargs: Any) -> Any:
    """A ``tqdm.auto`` bar (``disable=None``: nothing when output is not a terminal or a notebook)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", None)
    if not _notebook_tqdm(tqdm):
        return tqdm(**kwargs)
    bar: Any = tqdm(display=False, **kwargs)
    container = getattr(bar, "container", None)
    if container is not None and not bar.disable:
        from IPython import display as ipython_display

        show: Any = ipython_display.display  # (IPython is untyped)
        setattr(bar, _HANDLE, show(container, display_id=True))  # shown here, so close_bar can replace it
    return bar


def close_bar(bar: Any) -> None:
    """Close ``bar``; in a notebook its output becomes its final line (``leave=True``) or nothing."""
    handle = getattr(bar, _HANDLE, None)
    final = str(bar) if handle is not None and bar.leave else ""
    bar.close()
    if handle is not None:
        handle.update(_FinalLine(final))
