"""Write tests/xdist_weights.json from a JUnit report: seconds per pytest-xdist group (tests/conftest.py).

    python -m pytest tests -n 2 --dist loadgroup --junitxml=/tmp/suite.xml
    python scripts/xdist_weights.py /tmp/suite.xml

The workers hand out the heaviest group first; a group missing from the table is estimated from its tests.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIRECTORY_GROUPS = ("cluster", "tpm")  # as tests/conftest.py


def group_of(classname: str) -> str:
    """``tests.core.test_quotas`` -> ``tests/core/test_quotas.py``; tests/cluster and tests/tpm: the directory."""
    parts = classname.split(".")
    if len(parts) > 2 and parts[0] == "tests" and parts[1] in DIRECTORY_GROUPS:
        return "/".join(parts[:2])
    module = []
    for p in parts:
        module.append(p)
        if p.startswith("test_"):
            break
    return "/".join(module) + ".py"


def main(report: str) -> None:
    """Sum each group's test times (setup, call and teardown) and write the table."""
    seconds: Counter[str] = Counter()
    for case in ET.parse(report).getroot().iter("testcase"):  # noqa: S314 - our own pytest report
        seconds[group_of(case.get("classname", ""))] += float(case.get("time", 0))
    out = ROOT / "tests" / "xdist_weights.json"
    out.write_text(json.dumps({g: round(s) for g, s in sorted(seconds.items())}, indent=0) + "\n")
    print(f"{out}: {len(seconds)} groups, {sum(seconds.values()):.0f} s")


if __name__ == "__main__":
    main(sys.argv[1])
