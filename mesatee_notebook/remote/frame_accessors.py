"""The ``.str`` and ``.dt`` accessors and the ``.loc``/``.iloc`` indexers of remote series and frames."""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any

from mesatee_notebook.errors import FrameUsageError
from mesatee_notebook.remote.frame_base import (
    _literals,
    _str_fn,
)
from mesatee_notebook.wire.ops import (
    Slice,
)

if TYPE_CHECKING:
    from mesatee_notebook.remote.frame import (
        SecureDataFrame,
    )


from mesatee_notebook.remote.frame_series import SecureSeries


class _StrMethods:
    """``series.str``: string functions evaluated in the enclave (literal patterns only)."""

    __slots__ = ("_s",)

    def __init__(self, series: SecureSeries) -> None:
        self._s = series

    @staticmethod
    def _literal_pattern(pat: Any, regex: bool | None, what: str) -> None:
        import re

        if regex and isinstance(pat, str) and re.escape(pat) != pat:
            msg = (
                f".str.{what}() with a regular expression is not evaluated in the enclave (a pattern can take "
                "exponential time); pass regex=False for a literal match"
            )
            raise FrameUsageError(msg)

    lower = _str_fn("lower", "Lower-cased strings.")
    upper = _str_fn("upper", "Upper-cased strings.")
    len = _str_fn("len", "String lengths.")
    strip = _str_fn("strip", "Strings without leading and trailing whitespace.")
    lstrip = _str_fn("lstrip", "Strings without leading whitespace.")
    rstrip = _str_fn("rstrip", "Strings without trailing whitespace.")

    def contains(self, pat: str, case: bool = True, regex: bool = True) -> SecureSeries:
        """Whether each string contains ``pat`` (a literal; a regex only if it has no special characters)."""
        self._literal_pattern(pat, regex, "contains")
        return self._s._map("str_contains", pat, bool(case))

    def startswith(self, pat: str) -> SecureSeries:
        """Whether each string starts with ``pat``."""
        return self._s._map("str_startswith", pat)

    def endswith(self, pat: str) -> SecureSeries:
        """Whether each string ends with ``pat``."""
        return self._s._map("str_endswith", pat)

    def replace(self, pat: str, repl: str, regex: bool = False) -> SecureSeries:
        """Occurrences of ``pat`` replaced by ``repl`` (literal)."""
        self._literal_pattern(pat, regex, "replace")
        return self._s._map("str_replace", pat, repl)

    def slice(self, start: int | None = None, stop: int | None = None, step: int | None = None) -> SecureSeries:
        """Substrings by position."""
        return self._s._map("str_slice", start, stop, step)

    def __getitem__(self, key: builtins.slice) -> SecureSeries:
        if not isinstance(key, builtins.slice):
            msg = ".str[...] takes a slice, e.g. s.str[:3]"
            raise FrameUsageError(msg)
        return self.slice(key.start, key.stop, key.step)


class _DtMethods:
    """``series.dt``: datetime fields and rounding evaluated in the enclave."""

    __slots__ = ("_s",)

    def __init__(self, series: SecureSeries) -> None:
        self._s = series

    def _field(self, name: str) -> SecureSeries:
        return self._s._map(f"dt_{name}")

    year = property(lambda self: self._field("year"), doc="The year.")
    month = property(lambda self: self._field("month"), doc="The month (1-12).")
    day = property(lambda self: self._field("day"), doc="The day of the month.")
    hour = property(lambda self: self._field("hour"), doc="The hour.")
    minute = property(lambda self: self._field("minute"), doc="The minute.")
    second = property(lambda self: self._field("second"), doc="The second.")
    dayofweek = property(lambda self: self._field("dayofweek"), doc="Day of the week, Monday=0.")
    day_of_week = dayofweek
    weekday = dayofweek
    quarter = property(lambda self: self._field("quarter"), doc="The quarter.")
    dayofyear = property(lambda self: self._field("dayofyear"), doc="Day of the year.")
    day_of_year = dayofyear
    date = property(lambda self: self._field("date"), doc="The date part (datetime.date objects).")

    def floor(self, freq: str) -> SecureSeries:
        """Timestamps rounded down to a fixed frequency ('D', 'h', '15min' ...)."""
        return self._s._map("dt_floor", freq)

    def ceil(self, freq: str) -> SecureSeries:
        """Timestamps rounded up to a fixed frequency."""
        return self._s._map("dt_ceil", freq)

    def round(self, freq: str) -> SecureSeries:
        """Timestamps rounded to a fixed frequency."""
        return self._s._map("dt_round", freq)


class _Indexer:
    """``.loc``/``.iloc`` of a remote frame or series: boolean masks, slices, column lists."""

    __slots__ = ("_kind", "_of")

    def __init__(self, of: Any, kind: str) -> None:
        self._of = of
        self._kind = kind

    def __getitem__(self, key: Any) -> Any:
        of = self._of
        rows, cols = key if isinstance(key, tuple) and len(key) == 2 else (key, None)
        out = of
        if isinstance(rows, SecureSeries):
            if self._kind == "iloc":
                msg = "iloc[] takes positions; use loc[mask] (or frame[mask]) for a boolean series"
                raise FrameUsageError(msg)
            out = of[rows]
        elif isinstance(rows, slice):
            if rows != slice(None):
                bounds = _literals((rows.start, rows.stop, rows.step), self._kind)
                out = of._wrap(Slice(of._node, self._kind, bounds))
        else:
            msg = (
                f"{self._kind}[] of a remote value takes a boolean remote series or a slice (single rows by "
                "label or position would single out records)"
            )
            raise FrameUsageError(msg)
        if cols is None:
            return out
        from mesatee_notebook.remote.frame import SecureDataFrame

        if not isinstance(out, SecureDataFrame):
            msg = f"{self._kind}[rows, columns] needs a frame"
            raise FrameUsageError(msg)
        if isinstance(cols, slice) and cols == slice(None):
            return out
        try:
            return self._columns(out, cols)
        except (ValueError, IndexError, TypeError) as exc:
            msg = f"{self._kind}[rows, columns]: {cols!r} does not name columns of this frame ({exc})"
            raise FrameUsageError(msg) from None

    def _columns(self, out: SecureDataFrame, cols: Any) -> Any:
        names = list(out.columns)
        if self._kind == "iloc":
            if isinstance(cols, int):
                return out[names[cols]]
            picked = names[cols] if isinstance(cols, slice) else [names[i] for i in cols]
            return out[picked]
        if isinstance(cols, str):
            return out[cols]
        if isinstance(cols, slice):
            lo = 0 if cols.start is None else names.index(cols.start)
            hi = len(names) if cols.stop is None else names.index(cols.stop) + 1
            return out[names[lo:hi]]
        return out[list(cols)]
