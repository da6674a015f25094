#!/usr/bin/env python3
"""Store a notebook as the tutorials are kept in git: no outputs, no execution counts, one stable kernelspec.

Used as a git clean filter (``.gitattributes``; ``scripts/_venv.sh`` registers it), so a tutorial run or autosaved
in JupyterLab keeps its outputs in the working tree while git sees it unchanged. Standard library only:
``python3 scripts/strip_notebook.py < in.ipynb > out.ipynb``, or give paths to rewrite files in place.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# What JupyterLab writes when it has the tutorials' own kernelspec: nothing for it to rename on save.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python"}
# per-cell metadata that records a run or a view, not the tutorial (as nbstripout drops them)
RUN_METADATA = ("execution", "ExecuteTime", "collapsed", "scrolled", "trusted")


def strip(nb: dict[str, Any]) -> dict[str, Any]:
    """Return ``nb`` without outputs, counts, run metadata and widget state, on the stable kernelspec."""
    for cell in nb.get("cells", []):
        if isinstance(cell.get("source"), str):  # as nbformat (and so JupyterLab) writes it: a list of lines
            cell["source"] = cell["source"].splitlines(keepends=True)
        meta = cell.get("metadata", {})
        for key in RUN_METADATA:
            meta.pop(key, None)
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    meta = nb.setdefault("metadata", {})
    meta.pop("widgets", None)
    meta["kernelspec"] = dict(KERNELSPEC)
    meta["language_info"] = dict(LANGUAGE_INFO)
    return nb


def dumps(nb: dict[str, Any]) -> str:
    """The text nbformat (and JupyterLab) writes: one-space indent, sorted keys, UTF-8, final newline."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    """Filter stdin to stdout, or rewrite each path given."""
    if not argv:
        sys.stdout.write(dumps(strip(json.loads(sys.stdin.read()))))
        return 0
    for name in argv:
        path = Path(name)
        path.write_text(dumps(strip(json.loads(path.read_text(encoding="utf-8")))), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
