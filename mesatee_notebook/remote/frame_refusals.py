"""The pandas calls a remote frame or series refuses, each with the reason (a clear error, not an AttributeError)."""

from __future__ import annotations

__all__ = ["NOT_SUPPORTED", "_CALLABLE_HINT"]

_CALLABLE_HINT = (
    "it would run your code on the data: run it in a %%mesatee cell, which needs code access granted by the owner"
)
#: pandas calls that are not evaluated in the enclave, and why (a clear error, not an AttributeError).
NOT_SUPPORTED: dict[str, str] = {
    "apply": f"apply() takes a function; {_CALLABLE_HINT}",
    "applymap": f"applymap() takes a function; {_CALLABLE_HINT}",
    "pipe": f"pipe() takes a function; {_CALLABLE_HINT}",
    "transform": f"transform() takes a function; {_CALLABLE_HINT}",
    "iterrows": "iterrows() would release every row; collect() a policy-checked result instead",
    "itertuples": "itertuples() would release every row; collect() a policy-checked result instead",
    "to_numpy": "to_numpy() needs the data; collect() first (row-level results need allow_rows)",
    "values": "values needs the data; collect() first (row-level results need allow_rows)",
    "set_index": (
        "set_index() is not available yet: remote rows are labelled by storage position; group with "
        "groupby(...) (as_index=True) or set the index locally after collect()"
    ),
    "join": ("join() aligns on the index, which for remote rows is a storage position; use merge(on=...) instead"),
    "pivot": (
        "pivot() is not available: each of its cells is one record's value; use pivot_table(index=, columns=, "
        "values=, aggfunc=), an aggregate released under the group rules"
    ),
    "to_csv": "to_csv() needs the data; collect() first",
    "to_parquet": "to_parquet() needs the data; collect() first",
    **{
        name: f"{name}() needs the data; collect() first (row-level results need allow_rows)"
        for name in ("to_dict", "to_list", "tolist", "items")
    },
    "map": f"map() of a frame takes a function; {_CALLABLE_HINT}",
    "index": (
        "the index of remote rows is their storage positions, which are not released as data; collect() a "
        "result and use its index"
    ),
    "at": "at[] reads one cell, which singles out a record; filter with a boolean series and collect() the rows",
    "iat": "iat[] reads one cell, which singles out a record; filter with a boolean series and collect() the rows",
    **dict.fromkeys(
        ("stack", "unstack", "transpose", "T"),
        "reshaping a remote value is not available; collect() the aggregate and reshape it locally (or use "
        "pivot_table())",
    ),
    "explode": "explode() needs list-valued columns, which remote frames do not hold",
    "insert": "insert() changes a frame in place; remote values are immutable: use assign(...)",
    **dict.fromkeys(
        ("plot", "hist"), "plotting needs the data; collect() an aggregate (or rows, if allowed) and plot it locally"
    ),
}
