"""A data owner's release policy for one dataset (pure; both sides use it).

The enclave applies the policy of every dataset a query touches to the *result*
of that query, unless the requesting party owns the dataset. The policy is
public: analysts see it so they can write queries that pass.

Two release modes: the *threshold* mode (``min_group_size``, the differencing
guard) and the *differential privacy* mode (``privacy=DP(...)``), where every
released number is noisy and each analyst spends a budget the enclave keeps.
See ``docs/privacy.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from mesatee_notebook.errors import MalformedFrame

__all__ = ["DP", "DataPolicy", "SmallGroup"]

SmallGroup = Literal["suppress", "refuse"]

_FIELDS = (
    "min_group_size", "hidden_columns", "allow_rows", "small_group", "code_access", "differencing_guard", "privacy",
)  # fmt: skip
_DP_FIELDS = (
    "epsilon", "delta", "bounds", "unit", "max_rows_per_unit", "total_epsilon", "total_delta", "public_groups",
    "query_epsilon", "query_delta",
)  # fmt: skip


def _str_tuple(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        msg = f"DataPolicy.{what} must be a list of strings, not {type(value).__name__}"
        raise MalformedFrame(msg)
    out = tuple(cast("Iterable[object]", value))
    for item in out:
        if not isinstance(item, str) or not item:
            msg = f"DataPolicy.{what} must hold non-empty strings, got {item!r}"
            raise MalformedFrame(msg)
    if len(set(out)) != len(out):
        msg = f"DataPolicy.{what} has duplicates"
        raise MalformedFrame(msg)
    return cast("tuple[str, ...]", out)


def _number(value: object, what: str, *, positive: bool = False, at_most: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        msg = f"DP.{what} must be a finite number, not {value!r}"
        raise MalformedFrame(msg)
    out = float(value)
    if out < 0 or (positive and out == 0):
        msg = f"DP.{what} must be {'> 0' if positive else '>= 0'}, got {value!r}"
        raise MalformedFrame(msg)
    if at_most is not None and out >= at_most:
        msg = f"DP.{what} must be < {at_most}, got {value!r}"
        raise MalformedFrame(msg)
    return out


def _scalar_literal(value: object, what: str) -> str | int | float | bool:
    if isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    msg = f"DP.{what} values must be strings, ints, bools or finite floats, got {value!r}"
    raise MalformedFrame(msg)


@dataclass(frozen=True, slots=True)
class DP:
    """Differential privacy release mode for one dataset (see ``docs/privacy.md``).

    ``epsilon``/``delta``: the total budget of *each analyst* (party) on this dataset.
    ``bounds``: ``{column: (lo, hi)}``; every value summed, averaged or ranked is clamped
    to its column's bounds first. A numeric column without bounds can only be counted.
    ``unit``: the column that identifies one individual (``None``: each row is one).
    ``max_rows_per_unit``: at most this many rows of one individual enter an aggregate.
    ``total_epsilon``/``total_delta``: an optional cap summed over *all* analysts (collusion).
    ``public_groups``: ``{column: [values]}`` the owner declares public; a group-by on these
    columns releases exactly these keys. Other keys are released only through DP partition
    selection (which needs ``delta > 0``).
    ``query_epsilon``/``query_delta``: the default spent by one query (default: a tenth of
    the total).
    """

    epsilon: float
    delta: float = 0.0
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    unit: str | None = None
    max_rows_per_unit: int = 1
    total_epsilon: float | None = None
    total_delta: float | None = None
    public_groups: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    query_epsilon: float | None = None
    query_delta: float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "epsilon", _number(self.epsilon, "epsilon", positive=True))
        set_(self, "delta", _number(self.delta, "delta", at_most=1.0))
        for name in ("total_epsilon", "query_epsilon"):
            if getattr(self, name) is not None:
                set_(self, name, _number(getattr(self, name), name, positive=True))
        for name in ("total_delta", "query_delta"):
            if getattr(self, name) is not None:
                set_(self, name, _number(getattr(self, name), name, at_most=1.0))
        if self.query_epsilon is not None and self.query_epsilon > self.epsilon:
            msg = "DP.query_epsilon cannot exceed DP.epsilon"
            raise MalformedFrame(msg)
        if self.query_delta is not None and self.query_delta > self.delta:
            msg = "DP.query_delta cannot exceed DP.delta"
            raise MalformedFrame(msg)
        _check_units(self.max_rows_per_unit, self.unit)
        set_(self, "bounds", _checked_bounds(self.bounds))
        set_(self, "public_groups", _checked_groups(self.public_groups))

    @property
    def default_epsilon(self) -> float:
        """Epsilon one query spends when the analyst does not say."""
        return self.query_epsilon if self.query_epsilon is not None else self.epsilon / 10

    @property
    def default_delta(self) -> float:
        """Delta one query spends when the analyst does not say (only partition selection uses it)."""
        return self.query_delta if self.query_delta is not None else self.delta / 10

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form."""
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "bounds": {c: [lo, hi] for c, (lo, hi) in self.bounds.items()},
            "unit": self.unit,
            "max_rows_per_unit": self.max_rows_per_unit,
            "total_epsilon": self.total_epsilon,
            "total_delta": self.total_delta,
            "public_groups": {c: list(v) for c, v in self.public_groups.items()},
            "query_epsilon": self.query_epsilon,
            "query_delta": self.query_delta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DP:
        """Parse the form :meth:`to_dict` wrote; unknown keys and bad types raise ``MalformedFrame``."""
        if not isinstance(data, Mapping):
            msg = "DataPolicy.privacy must be a JSON object"
            raise MalformedFrame(msg)
        unknown = sorted(set(data) - set(_DP_FIELDS))
        if unknown:
            msg = f"unknown DP field(s): {', '.join(map(str, unknown))}"
            raise MalformedFrame(msg)
        if "epsilon" not in data:
            msg = "DP needs an epsilon"
            raise MalformedFrame(msg)
        return cls(**dict(data))


@dataclass(frozen=True, slots=True)
class DataPolicy:
    """What a data owner lets other parties learn from one dataset.

    ``min_group_size``: every released aggregate (group, cell or scalar) must be
    computed from at least this many of the dataset's rows.
    ``hidden_columns``: never released and never referenced, except as a merge key.
    ``allow_rows``: whether row-level results (``head``, a filtered frame, ...) may leave.
    ``small_group``: ``"suppress"`` drops small groups from a table, ``"refuse"``
    refuses the whole query. A scalar from a small group is always refused.
    ``code_access``: party ids that may reach the raw frame inside a code cell
    (empty: nobody but the owner).
    ``differencing_guard``: refuse aggregates whose row set differs from one already
    released to the same party by fewer than ``min_group_size`` rows.
    ``privacy``: ``DP(...)`` switches the dataset to the differential privacy mode: every
    released value is noisy, each analyst spends a budget; the threshold rules above
    then do not apply to it (``hidden_columns`` and ``code_access`` still do).
    """

    min_group_size: int = 10
    hidden_columns: tuple[str, ...] = field(default=())
    allow_rows: bool = False
    small_group: SmallGroup = "suppress"
    code_access: tuple[str, ...] = field(default=())
    differencing_guard: bool = True
    privacy: DP | None = None

    def __post_init__(self) -> None:
        if isinstance(self.min_group_size, bool) or not isinstance(self.min_group_size, int):
            msg = f"DataPolicy.min_group_size must be an int, not {type(self.min_group_size).__name__}"
            raise MalformedFrame(msg)
        if self.min_group_size < 0:
            msg = "DataPolicy.min_group_size must be >= 0"
            raise MalformedFrame(msg)
        for name in ("allow_rows", "differencing_guard"):
            if not isinstance(getattr(self, name), bool):
                msg = f"DataPolicy.{name} must be a bool"
                raise MalformedFrame(msg)
        if self.small_group not in ("suppress", "refuse"):
            msg = f"DataPolicy.small_group must be 'suppress' or 'refuse', not {self.small_group!r}"
            raise MalformedFrame(msg)
        object.__setattr__(self, "hidden_columns", _str_tuple(self.hidden_columns, "hidden_columns"))
        object.__setattr__(self, "code_access", _str_tuple(self.code_access, "code_access"))
        if self.privacy is not None and not isinstance(self.privacy, DP):
            msg = "DataPolicy.privacy must be a DP(...) or None"
            raise MalformedFrame(msg)
        if self.privacy is not None:
            hidden = set(self.hidden_columns)
            for col in (*self.privacy.bounds, *self.privacy.public_groups):
                if col in hidden:
                    msg = f"DP declares bounds or public groups for hidden column {col!r}"
                    raise MalformedFrame(msg)

    def allows_code_access(self, party: str, owner: str) -> bool:
        """Whether ``party`` may reach the raw frame inside a code cell."""
        return party == owner or party in self.code_access

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form."""
        return {
            "min_group_size": self.min_group_size,
            "hidden_columns": list(self.hidden_columns),
            "allow_rows": self.allow_rows,
            "small_group": self.small_group,
            "code_access": list(self.code_access),
            "differencing_guard": self.differencing_guard,
            "privacy": None if self.privacy is None else self.privacy.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataPolicy:
        """Parse the form :meth:`to_dict` wrote; unknown keys and bad types raise ``MalformedFrame``."""
        if not isinstance(data, Mapping):
            msg = "a DataPolicy must be a JSON object"
            raise MalformedFrame(msg)
        unknown = sorted(str(k) for k in set(data) - set(_FIELDS))
        if unknown:
            msg = f"unknown DataPolicy field(s): {', '.join(map(str, unknown))}"
            raise MalformedFrame(msg)
        for key in ("hidden_columns", "code_access"):
            if key in data and not isinstance(data[key], list):
                msg = f"DataPolicy.{key} must be a list"
                raise MalformedFrame(msg)
        kwargs: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        if kwargs.get("privacy") is not None:
            kwargs["privacy"] = DP.from_dict(kwargs["privacy"])
        return cls(**kwargs)


def _check_units(max_rows_per_unit: Any, unit: Any) -> None:
    if isinstance(max_rows_per_unit, bool) or not isinstance(max_rows_per_unit, int):
        msg = "DP.max_rows_per_unit must be an int"
        raise MalformedFrame(msg)
    if not 1 <= max_rows_per_unit <= 1000:
        msg = "DP.max_rows_per_unit must be within [1, 1000]"
        raise MalformedFrame(msg)
    if unit is not None and (not isinstance(unit, str) or not unit):
        msg = "DP.unit must be a column name or None"
        raise MalformedFrame(msg)


def _bound(value: object) -> float | None:
    return float(value) if not isinstance(value, bool) and isinstance(value, (int, float)) else None


def _checked_bounds(raw: Any) -> dict[str, tuple[float, float]]:
    """``DP.bounds`` validated: column name -> finite (lo, hi) with lo < hi."""
    if not isinstance(raw, Mapping):
        msg = "DP.bounds must be a mapping {column: (lo, hi)}"
        raise MalformedFrame(msg)
    bounds: dict[str, tuple[float, float]] = {}
    for col, pair in raw.items():
        if not isinstance(col, str) or not col:
            msg = f"DP.bounds keys must be column names, got {col!r}"
            raise MalformedFrame(msg)
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Iterable):
            msg = f"DP.bounds[{col!r}] must be a (lo, hi) pair"
            raise MalformedFrame(msg)
        items = list(cast("Iterable[object]", pair))
        if len(items) != 2:
            msg = f"DP.bounds[{col!r}] must be a (lo, hi) pair"
            raise MalformedFrame(msg)
        lo, hi = _bound(items[0]), _bound(items[1])
        if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)) or not lo < hi:
            msg = f"DP.bounds[{col!r}] must be finite numbers with lo < hi, got {tuple(items)!r}"
            raise MalformedFrame(msg)
        bounds[col] = (lo, hi)
    return bounds


def _checked_groups(raw: Any) -> dict[str, tuple[Any, ...]]:
    """``DP.public_groups`` validated: column name -> 1..100000 distinct literal values."""
    if not isinstance(raw, Mapping):
        msg = "DP.public_groups must be a mapping {column: [values]}"
        raise MalformedFrame(msg)
    groups: dict[str, tuple[Any, ...]] = {}
    for col, values in raw.items():
        if not isinstance(col, str) or not col:
            msg = f"DP.public_groups keys must be column names, got {col!r}"
            raise MalformedFrame(msg)
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            msg = f"DP.public_groups[{col!r}] must be a list of values"
            raise MalformedFrame(msg)
        vals = tuple(_scalar_literal(v, f"public_groups[{col!r}]") for v in cast("Iterable[object]", values))
        if not vals or len(set(vals)) != len(vals) or len(vals) > 100_000:
            msg = f"DP.public_groups[{col!r}] must be 1..100000 distinct values"
            raise MalformedFrame(msg)
        groups[col] = vals
    return groups
