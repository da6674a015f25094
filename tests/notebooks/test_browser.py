"""The quick start as a user sees it: JupyterLab in headless Chromium, driven by Playwright.

JupyterLab is started the way the README starts it (``jupyter lab --no-browser``, here on a free port with a
token) on a copy of the tutorials, so its autosave never touches the tracked files. Chromium is Debian's
``/usr/bin/chromium`` (installed by ``scripts/_venv.sh``); Playwright never downloads a browser here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
CHROMIUM = Path("/usr/bin/chromium")
# as root Chromium needs --no-sandbox; the rest keeps it from calling home or updating itself
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DEADLINE = 240.0  # seconds for the whole run: start, open, run all, check


def _need_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is not installed (Debian package 'chromium'; scripts/_venv.sh installs it as root)"
    if os.environ.get("CI"):
        pytest.fail(f"the browser test must run in CI: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def lab(notebook_env: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A JupyterLab server on a copy of notebooks/; yields (base URL with token, the notebook directory)."""
    _need_chromium()
    root = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, root)
    config = tmp_path / "jupyter_config"
    # render every cell (JupyterLab 4 otherwise only renders the cells in view)
    tracker = config / "lab" / "user-settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    tracker.joinpath("tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    news = config / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    news.joinpath("notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    log = (tmp_path / "lab.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            f"--notebook-dir={root}",
            "--no-browser",
            "--allow-root",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            f"--IdentityProvider.token={token}",
            "--ServerApp.open_browser=False",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    log.close()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # JupyterLab takes ~10 s here alone; a loaded machine, several times that
        while True:
            assert proc.poll() is None, (tmp_path / "lab.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "JupyterLab did not start: " + (tmp_path / "lab.log").read_text()
            time.sleep(0.25)
        yield f"{base}/lab/tree/01-quickstart.ipynb?token={token}", root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server shuts its kernels down
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_quickstart_in_jupyterlab(lab: tuple[str, Path], tmp_path: Path) -> None:
    from playwright import sync_api  # in .[test]; a missing install fails the test rather than skip it

    url, root = lab
    started = time.monotonic()

    def left() -> float:
        remaining = DEADLINE - (time.monotonic() - started)
        assert remaining > 0, "the browser run took longer than its bound"
        return remaining * 1000  # Playwright counts milliseconds

    shot = tmp_path / "01-quickstart.png"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(url, timeout=left())
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=left())
            select = page.locator(".jp-Dialog").get_by_role("button", name="Select", exact=True)
            with contextlib.suppress(sync_api.TimeoutError):  # JupyterLab may ask which kernel to start
                select.click(timeout=10_000)
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=left())
            page.get_by_role("menuitem", name="Run", exact=True).click(timeout=left())
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click(timeout=left())
            _wait_until_all_ran(page, left)
            card = page.locator(".jp-OutputArea-output .mesatee-attestation")
            card.wait_for(state="visible", timeout=left())
            text = card.inner_text()
            assert "SOFTWARE TRUST" in text and "softtee" in text and "✗" not in text, text
            table = page.locator(".jp-OutputArea-output table", has_text="mean_cost").first
            table.wait_for(state="visible", timeout=left())
            assert {"north", "south", "east"} <= set(table.inner_text().split())
            page.screenshot(path=str(shot), full_page=True)
            card.screenshot(path=str(tmp_path / "attestation-card.png"))
            page.keyboard.press("Control+s")  # save, so the outputs can be read back as the notebook holds them
            _wait_saved(root / "01-quickstart.ipynb", left)
        except BaseException:
            page.screenshot(path=str(tmp_path / "failed.png"), full_page=True)
            print(f"screenshot of the failure: {tmp_path / 'failed.png'}")
            raise
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    saved = json.loads((root / "01-quickstart.ipynb").read_text())
    outputs = [o for c in saved["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    errors = [o for o in outputs if o["output_type"] == "error"]
    assert not errors, [f"{o['ename']}: {o['evalue']}" for o in errors]
    assert "Traceback" not in json.dumps(outputs)
    print(f"screenshot: {shot}")


def _wait_until_all_ran(page: Any, left: Any) -> None:
    """Every code cell has an execution count and none is queued or running ([*])."""
    prompts = page.locator(".jp-CodeCell .jp-InputArea-prompt")
    while True:
        texts = [t.strip() for t in prompts.all_inner_texts()]
        if texts and all(t.startswith("[") and t[1:-2].isdigit() for t in texts):
            return
        assert left() > 1000, f"cells still to run: {texts}"
        page.wait_for_timeout(250)


def _wait_saved(path: Path, left: Any) -> None:
    while True:
        cells = json.loads(path.read_text())["cells"]
        if all(c.get("execution_count") for c in cells if c["cell_type"] == "code"):
            return
        left()
        time.sleep(0.25)
