"""Every notebook in notebooks/ runs top to bottom on a real ipykernel against the embedded enclave kernel."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
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


def _committed(path: Path) -> str:
    """The tutorial as git stores it (the index: what the next commit holds), which JupyterLab's autosave cannot
    change once the clean filter is set (``scripts/_venv.sh``); the file itself outside a git checkout."""
    rel = path.relative_to(NOTEBOOKS.parent).as_posix()
    run = subprocess.run(["git", "show", f":{rel}"], cwd=NOTEBOOKS, capture_output=True, text=True, check=False)
    return run.stdout if run.returncode == 0 else path.read_text(encoding="utf-8")


def _stripped(nb: nbformat.NotebookNode | dict) -> str:
    spec = importlib.util.spec_from_file_location("strip_notebook", NOTEBOOKS.parent / "scripts" / "strip_notebook.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    as_saved = json.loads(nbformat.writes(nbformat.from_dict(nb)))  # sources as lists of lines, as on disk
    return str(module.dumps(module.strip(as_saved)))


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_committed_without_outputs(path: Path) -> None:
    text = _committed(path)
    nb = nbformat.reads(text, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"
    assert nb.metadata.kernelspec == {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    assert _stripped(nb) == text, f"{path.name}: store it as scripts/strip_notebook.py writes it"


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
            assert _stripped(nb) == _committed(path), f"run {run}: git would see the run tutorial as modified"


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


@pytest.mark.slow
def test_saved_notebook_explains_timeouts_and_keeps_no_stale_progress(notebook_env: Path, tmp_path: Path) -> None:
    """Widget bars end as their final line (training) or as nothing (transfers), so a saved file has no '0%|';
    a timed-out cell's traceback (what JupyterLab shows) says why after the remote KeyboardInterrupt."""
    del notebook_env
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nb.cells = [
        nbformat.v4.new_code_cell(
            "%load_ext mesatee_notebook\n%mesatee connect\n%config MesateeMagics.progress_after = 0.0"
        ),
        nbformat.v4.new_code_cell("%%mesatee\nimport numpy as np\nimport time\ntime.sleep(1.5)\nnp.ones(1_500_000)"),
        nbformat.v4.new_code_cell(
            "import numpy as np, pandas as pd, mesatee_notebook as mn\n"
            "rng = np.random.default_rng(0)\n"
            "df = pd.DataFrame({'a': rng.normal(size=300), 'b': rng.normal(size=300)})\n"
            "df['y'] = (df.a + df.b > 0).astype(float)\n"
            "model = mn.connect().gbdt.train(df, 'y', params={'objective': 'binary:logistic'}, num_boost_round=12)"
        ),
        nbformat.v4.new_code_cell(
            "%%mesatee --timeout 0.5\nimport time\ntime.sleep(30)", metadata={"tags": ["raises-exception"]}
        ),
    ]
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    saved = tmp_path / "saved.ipynb"
    nbformat.write(nb, saved)
    text = saved.read_text()
    assert not re.search(r"(?<!\d)0%\||(?<!\d)0/12", text), text  # nothing saved at its starting state
    assert "application/vnd.jupyter.widget-view+json" not in text  # every bar's widget output was replaced
    training = [o for o in nb.cells[2].outputs if o.output_type in ("display_data", "update_display_data")]
    final = [o["data"]["text/plain"] for o in training if o["data"].get("text/plain")]
    assert len(final) == 1 and "mesatee gbdt: 100%" in final[0] and "12/12" in final[0], final
    transfer = [o for o in nb.cells[1].outputs if o.output_type == "display_data"]
    assert transfer and all(o["data"] == {"text/plain": ""} for o in transfer), transfer  # cleared when done
    error = next(o for o in nb.cells[3].outputs if o.output_type == "error")
    assert error["ename"] == "RemoteTimeout" and "KeyboardInterrupt" in error["traceback"], error
    assert re.sub(r"\x1b\[[0-9;]*m", "", error["traceback"][-1]).startswith(
        "RemoteTimeout: the cell ran past its timeout"
    )
    shown = next(o for o in nb.cells[1].outputs if o.output_type == "execute_result")
    assert "shape=(1500000,)" in shown["data"]["text/plain"]
