"""scripts/_venv.sh installs once and then skips what is installed; git keeps the tutorials stripped (issue 19)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A stand-in Python: `-m venv` makes a venv of stand-ins, `-m pip|ipykernel` are logged, `-c` runs the real one.
FAKE_PYTHON = """#!/bin/bash
case "$1" in
  -m)
    echo "python $*" >>"$CALLS"
    if [ "$2" = venv ]; then
      mkdir -p "$3/bin" && cp "$0" "$3/bin/python"
      echo "PATH=\\"$PWD/$3/bin:\\$PATH\\"" >"$3/bin/activate"
    fi ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""
FAKE_DPKG = """#!/bin/bash
echo "dpkg-query $*" >>"$CALLS"
for p in $MISSING; do [ "$p" = "${@: -1}" ] && { echo -n "deinstall ok config-files"; exit 0; }; done
echo -n "install ok installed"
"""
FAKE_APT = """#!/bin/bash
echo "apt-get $*" >>"$CALLS"
"""
FAKE_ID = """#!/bin/bash
if [ "$1" = -u ]; then echo "$FAKE_UID"; else exec /usr/bin/id "$@"; fi
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A bare copy of what _venv.sh reads, with stand-ins for Python, dpkg-query and apt-get on PATH."""
    work = tmp_path / "checkout"
    (work / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "_venv.sh", work / "scripts" / "_venv.sh")
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    (work / "mesatee_notebook").mkdir()
    (work / "mesatee_notebook" / "__init__.py").write_text("")  # what an editable install resolves to
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", FAKE_PYTHON), ("dpkg-query", FAKE_DPKG), ("apt-get", FAKE_APT), ("id", FAKE_ID)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return work


def _launch(work: Path, missing: str = "", uid: int = 0) -> list[str]:
    calls = work.parent / "calls.log"
    calls.write_text("")
    env = {
        "PATH": f"{work.parent / 'bin'}:/usr/bin:/bin",
        "CALLS": str(calls),
        "REAL_PYTHON": sys.executable,
        "MISSING": missing,
        "FAKE_UID": str(uid),
        "HOME": str(work.parent),
    }
    run = subprocess.run(
        ["bash", "-c", "source scripts/_venv.sh && echo sourced"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("sourced"), run.stderr
    return calls.read_text().splitlines()


def _pip(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith(("python -m pip", "python -m ipykernel"))]


def test_venv_installs_on_a_bare_machine_then_skips(checkout: Path) -> None:
    first = _launch(checkout, missing="chromium")
    assert "python -m venv .venv" in first
    assert "apt-get install -y -qq chromium" in first
    assert "python -m pip install --quiet -e .[all]" in first
    assert any("--display-name Python 3 (ipykernel)" in c for c in first), first  # the tutorials' own kernelspec
    second = _launch(checkout)
    assert second == [], second  # nothing checked or installed again (it was 5 s and a warning each launch)
    with (checkout / "pyproject.toml").open("a") as fh:
        fh.write("\n# a new dependency\n")
    third = _launch(checkout)
    assert "python -m pip install --quiet -e .[all]" in third and not [c for c in third if "dpkg" in c]
    assert _launch(checkout) == []
    shutil.rmtree(checkout / "mesatee_notebook")  # the venv no longer resolves the package to this checkout
    assert "python -m pip install --quiet -e .[all]" in _launch(checkout)


def test_venv_rechecks_debian_packages_while_some_are_missing(checkout: Path) -> None:
    """Not root: the missing packages are named (not installed), and checked again at the next launch."""
    first = _launch(checkout, missing="bubblewrap", uid=1000)
    assert _pip(first) and any("bubblewrap" in c for c in first) and not any("apt-get" in c for c in first)
    again = _launch(checkout, missing="bubblewrap", uid=1000)
    assert any("dpkg-query" in c for c in again) and not _pip(again)
    assert _launch(checkout, uid=1000) and _launch(checkout, uid=1000) == []  # once they are there: recorded


def _run_looking(nb: dict) -> dict:
    """The tutorial as JupyterLab saves it after Run All: outputs, counts, run metadata, another kernelspec name."""
    for n, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        cell["execution_count"] = n + 1
        cell["outputs"] = [{"name": "stdout", "output_type": "stream", "text": ["mesatee gbdt: 0%| | 0/50\n"]}]
        cell["metadata"]["execution"] = {"iopub.status.busy": "2026-12-01T12:00:00.000Z"}
    nb["metadata"]["kernelspec"]["display_name"] = "Python 3 (mesatee_notebook)"
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.13.5", "mimetype": "text/x-python"}
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    return nb


def test_git_sees_a_run_and_autosaved_tutorial_as_unmodified(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "scripts").mkdir()
    shutil.copy(ROOT / ".gitattributes", repo / ".gitattributes")
    shutil.copy(ROOT / "scripts" / "strip_notebook.py", repo / "scripts" / "strip_notebook.py")
    tutorial = repo / "notebooks" / "01-quickstart.ipynb"
    shutil.copy(ROOT / "notebooks" / "01-quickstart.ipynb", tutorial)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=repo,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    git("init", "-q")
    git("config", "filter.mesatee-notebook.clean", f"{sys.executable} scripts/strip_notebook.py")  # as _venv.sh does
    git("add", ".")
    git("commit", "-qm", "tutorials")
    tutorial.write_text(json.dumps(_run_looking(json.loads(tutorial.read_text())), indent=1))
    assert "0/50" in tutorial.read_text()  # the working copy keeps its outputs ...
    assert git("diff") == ""  # ... and git sees the tutorial as it was committed
    git("add", "-A")  # (`git status` may list it until then: git trusts a changed file size without reading)
    assert git("status", "--porcelain") == ""  # nothing to commit: outputs and the rename never reach a commit
    assert git("show", "HEAD:notebooks/01-quickstart.ipynb") == (ROOT / "notebooks" / "01-quickstart.ipynb").read_text()
