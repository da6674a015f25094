"""Every notebook in notebooks/ runs top to bottom on a real ipykernel against the embedded enclave kernel."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    assert [p.name for p in ALL][:1] == ["01-quickstart.ipynb"]


def test_python3_kernel_is_this_interpreter(notebook_env: Path) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_notebook_runs_twice(path: Path, notebook_env: Path, tmp_path: Path) -> None:
    """Run All, then Run All again on the same ipykernel and enclave kernel (persisted datasets and jobs included).

    Every tutorial shares one kernel home (the fixture is per session), so each also runs after the others.
    """
    first = nbformat.read(path, as_version=4)
    client = NotebookClient(first, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        for run, nb in enumerate((first, nbformat.read(path, as_version=4)), start=1):
            client.nb = nb
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)  # a cell error raises CellExecutionError (unless raises-exception)
            outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
            assert not [o for o in outputs if o.output_type == "error"], f"run {run}"
            assert "Traceback" not in json.dumps(outputs), f"run {run}"
            if path.stem == "01-quickstart":
                _check_quickstart(nb)


def _check_quickstart(nb: nbformat.NotebookNode) -> None:
    def outputs_of(source_start: str) -> list[nbformat.NotebookNode]:
        cells = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(source_start)]
        assert cells, source_start
        return list(cells[0].outputs)

    connect = "".join(o.get("text", "") for o in outputs_of("%mesatee connect"))
    assert connect.startswith("mesatee: connected to the embedded local kernel") and "SOFTWARE trust" in connect
    card = outputs_of("%mesatee attest")[0]["data"]
    assert "SOFTWARE TRUST" in card["text/html"]
    assert "✓ local code: matches the mesatee_notebook installed here" in card["text/plain"]
    cell = outputs_of("%%mesatee --in visits")
    streamed = "".join(o.get("text", "") for o in cell if o.output_type == "stream")
    assert "visits are by patients aged 65+" in streamed
    shown = next(o for o in cell if o.output_type == "execute_result")["data"]
    assert "<table" in shown["text/html"] and "mean_cost" in shown["text/html"]
    verified = "".join(o.get("text", "") for o in outputs_of("verified = mn.verify_receipt"))
    assert "out/by_clinic" in verified and "visits" in verified
    tampered = "".join(o.get("text", "") for o in outputs_of("import base64"))
    assert tampered.startswith("refused:") and "signature does not verify" in tampered
