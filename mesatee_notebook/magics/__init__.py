"""IPython magics and rich display: ``%load_ext mesatee_notebook``, then ``%mesatee`` and ``%%mesatee``.

See ``docs/notebooks.md`` for a tour, and ``%mesatee?`` / ``%%mesatee?`` for the options.
"""

from __future__ import annotations

from typing import Any

from mesatee_notebook.magics._magics import RECEIPT_VARIABLE, MesateeMagics

__all__ = ["RECEIPT_VARIABLE", "MesateeMagics", "load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics on ``ipython`` and their tab completion."""
    magics = MesateeMagics(ipython)
    ipython.register_magics(magics)

    def _complete(_shell: Any, event: Any) -> list[str]:
        return magics.complete(str(event.text_until_cursor))

    for key in ("%mesatee", "%%mesatee"):
        ipython.set_hook("complete_command", _complete, str_key=key)


def unload_ipython_extension(ipython: Any) -> None:
    """Close every session the magics opened."""
    magics = ipython.magics_manager.registry.get(MesateeMagics.__name__)
    if isinstance(magics, MesateeMagics):
        magics.close_all()
