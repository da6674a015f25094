"""A data owner's release policy for one dataset (pure; both sides use it).

The enclave applies the policy of every dataset a query touches to the *result*
of that query, unless the requesting party owns the dataset. The policy is
public: analysts see it so they can write queries that pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from mesatee_notebook.errors import MalformedFrame

__all__ = ["DataPolicy", "SmallGroup"]

SmallGroup = Literal["suppress", "refuse"]

_FIELDS = ("min_group_size", "hidden_columns", "allow_rows", "small_group", "code_access", "differencing_guard")


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
    """

    min_group_size: int = 10
    hidden_columns: tuple[str, ...] = field(default=())
    allow_rows: bool = False
    small_group: SmallGroup = "suppress"
    code_access: tuple[str, ...] = field(default=())
    differencing_guard: bool = True

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
        return cls(**kwargs)
