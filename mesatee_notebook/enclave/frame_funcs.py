"""pandas implementations of the ``map`` (elementwise) and ``window`` (across rows) functions of a series."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

_DT_FIELDS = {
    "dt_year": "year", "dt_month": "month", "dt_day": "day", "dt_hour": "hour", "dt_minute": "minute",
    "dt_second": "second", "dt_dayofweek": "day_of_week", "dt_quarter": "quarter", "dt_dayofyear": "day_of_year",
    "dt_date": "date",
}  # fmt: skip


def _str_series(s: pd.Series, name: str, args: tuple[Any, ...]) -> pd.Series:
    """A ``.str`` function; literal patterns only, never a regex."""
    if name == "contains":
        return s.str.contains(args[0], case=args[1], regex=False)
    if name == "replace":
        return s.str.replace(args[0], args[1], regex=False)
    out: pd.Series = getattr(s.str, name)(*args)
    return out


def _dt_series(s: pd.Series, func: str, args: tuple[Any, ...]) -> pd.Series:
    if func in _DT_FIELDS:
        out: pd.Series = getattr(s.dt, _DT_FIELDS[func])
        return out
    out = getattr(s.dt, func[3:])(args[0])  # floor, ceil, round
    return out


def _cut_series(s: pd.Series, args: tuple[Any, ...]) -> pd.Series:
    n = args[0]
    labels: Any = list(args[1 + n :]) or False
    return pd.Series(pd.cut(s, list(args[1 : 1 + n]), labels=labels), index=s.index, name=s.name)


def _pairs_dict(args: tuple[Any, ...]) -> dict[Any, Any]:
    return dict(zip(args[0::2], args[1::2], strict=True))


_MAPS: dict[str, Callable[[pd.Series, tuple[Any, ...]], pd.Series]] = {
    "isna": lambda s, _: s.isna(),
    "notna": lambda s, _: s.notna(),
    "clip": lambda s, a: s.clip(a[0], a[1]),
    "round": lambda s, a: s.round(a[0]),
    "map_dict": lambda s, a: s.map(_pairs_dict(a)),
    "replace": lambda s, a: s.replace(_pairs_dict(a)),
    "cut": _cut_series,
}


def _map_series(s: pd.Series, func: str, args: tuple[Any, ...]) -> pd.Series:
    """Apply one elementwise function (a ``map`` node)."""
    if func.startswith("str_"):
        return _str_series(s, func[4:], args)
    if func.startswith("dt_"):
        return _dt_series(s, func, args)
    return _MAPS[func](s, args)


def _window_series(s: pd.Series, func: str, args: tuple[Any, ...]) -> pd.Series:
    """Apply one function that mixes values across rows (a ``window`` node)."""
    out: pd.Series
    if func in ("shift", "diff", "pct_change"):
        out = getattr(s, func)(args[0])
    elif func == "rank":
        out = s.rank(method=args[0], ascending=args[1])
    elif func == "duplicated":
        out = s.duplicated(keep=False if args[0] == "none" else args[0])
    elif func == "rolling":
        out = _moving(s.rolling(args[1], min_periods=args[2]), args[0])
    elif func == "expanding":
        out = _moving(s.expanding(min_periods=args[1]), args[0])
    else:
        out = getattr(s, func)()
    return out


def _moving(window: Any, agg: str) -> pd.Series:
    out: pd.Series = getattr(window, agg)()
    return out
