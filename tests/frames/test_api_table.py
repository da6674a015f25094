"""docs/dataframe.md's supported-API table is checked against the code, in both directions, so it cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _frames_support import OWNER, World
from test_parity import OPEN, random_frame

import mesatee_notebook as mn
from mesatee_notebook.errors import FrameNotSupported
from mesatee_notebook.remote.frame import NOT_SUPPORTED, SecureDataFrame, SecureGroupBy, SecureSeries
from mesatee_notebook.remote.frame_groupby import GROUPBY_NOT_SUPPORTED

DOC = Path(__file__).resolve().parents[2] / "docs" / "dataframe.md"
TABLES = {"DataFrame": SecureDataFrame, "Series": SecureSeries, "GroupBy": SecureGroupBy}
REFUSED = {"DataFrame": NOT_SUPPORTED, "Series": NOT_SUPPORTED, "GroupBy": GROUPBY_NOT_SUPPORTED}
PROXY = {"collect", "collect_with_receipt", "to_pandas", "plan_json", "explain", "schema", "privacy_budget",
         "from_source", "from_dataset_info"}  # fmt: skip


def section() -> str:
    text = DOC.read_text()
    start = text.index("## Supported pandas API")
    return text[start : text.index("\n## ", start + 1)]


def table(kind: str) -> list[tuple[list[str], str]]:
    """(names, status) rows of one table; names are the plain identifiers in the first cell."""
    rows = []
    lines = section().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith(f"| {kind} call |"))
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        first, status = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:3]]
        names = [n for n in re.findall(r"`([^`]+)`", first) if re.fullmatch(r"[A-Za-z_]\w*", n)]
        rows.append((names, status))
    return rows


def test_statuses_are_known() -> None:
    for kind in TABLES:
        for _, status in table(kind):
            assert status in {"agg", "elem", "rows", "reveal", "record", "refused"}, status


@pytest.mark.parametrize("kind", sorted(TABLES))
def test_every_listed_call_exists_and_every_method_is_listed(kind: str) -> None:
    cls = TABLES[kind]
    listed: set[str] = set()
    for names, status in table(kind):
        for name in names:
            listed.add(name)
            if status == "refused":
                assert name in REFUSED[kind], name
                assert name not in vars(cls), f"{name} is listed as refused but {cls.__name__} defines it"
            else:
                assert hasattr(cls, name), f"{cls.__name__}.{name} is listed but does not exist"
    public = {n for n in dir(cls) if not n.startswith("_")}
    assert public - listed - PROXY == set(), f"{cls.__name__} methods missing from docs/dataframe.md"


def test_refused_calls_raise_a_clear_error() -> None:
    sdf = World({"d": (random_frame(0, 5), OPEN, OWNER)}).frame("d", OWNER)
    for kind in ("DataFrame", "Series", "GroupBy"):
        target = {"DataFrame": sdf, "Series": sdf.x, "GroupBy": sdf.groupby("a")}[kind]
        for names, status in table(kind):
            for name in names if status == "refused" else ():
                with pytest.raises(FrameNotSupported):
                    getattr(target, name)


def test_module_functions_exist() -> None:
    names = re.findall(r"`mn\.(\w+)\(", section())
    assert sorted(names) == ["concat", "cut"]
    for name in names:
        assert name in mn.__all__ and callable(getattr(mn, name))


def test_the_coverage_figures_in_the_doc_are_the_table_s() -> None:
    text = section()
    for kind in TABLES:
        rows = table(kind)
        supported = sum(len(n) for n, s in rows if s != "refused")
        refused = sum(len(n) for n, s in rows if s == "refused")
        m = re.search(rf"{kind}: (\d+)\s+calls\s+supported,\s+(\d+)\s+refused", text)
        assert m is not None, kind
        assert (int(m.group(1)), int(m.group(2))) == (supported, refused), kind


def reference_coverage() -> dict[str, tuple[int, int]]:
    """(supported, listed) per kind over tests/frames/pandas_calls.py's fixed list of common pandas calls."""
    import pandas_calls

    lists = {"DataFrame": pandas_calls.DATAFRAME, "Series": pandas_calls.SERIES, "GroupBy": pandas_calls.GROUPBY}
    out = {}
    for kind, names in lists.items():
        cls = TABLES[kind]
        ok = [
            n for n in names
            if (n in pandas_calls.MODULE and n in mn.__all__) or hasattr(cls, n)  # refused calls are no attributes
        ]  # fmt: skip
        out[kind] = (len(ok), len(names))
    return out


def test_the_reference_coverage_in_the_doc_is_counted() -> None:
    cov = reference_coverage()
    total = (sum(s for s, _ in cov.values()), sum(n for _, n in cov.values()))
    words = ", ".join(f"{k} {s}/{n}" for k, (s, n) in cov.items())
    expected = f"{words}; together {total[0]}/{total[1]}"
    assert expected in " ".join(section().split()), expected
    # and every call the table refuses really is one a user may reach for: none is silently missing
    for kind, cls in TABLES.items():
        for names, status in table(kind):
            for name in names:
                assert status == "refused" or hasattr(cls, name), (kind, name)
