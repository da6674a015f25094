"""The %mesatee / %%mesatee magics, driven through a real IPython shell against a real embedded kernel."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from IPython.core.completer import provisionalcompleter
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import mesatee_notebook as mn
from mesatee_notebook.magics import RECEIPT_VARIABLE, MesateeMagics
from mesatee_notebook.magics.display import AttestationCard, humanize_age, notebook_error
from tests.waiting import PATIENCE


def magics(ip: InteractiveShell) -> MesateeMagics:
    found = ip.magics_manager.registry[MesateeMagics.__name__]
    assert isinstance(found, MesateeMagics)
    return found


def render(exc: BaseException) -> str:
    """What IPython shows for ``exc``: its ``_render_traceback_`` lines."""
    lines = exc._render_traceback_()  # type: ignore[attr-defined]
    return "\n".join(lines)


# -- connecting and attesting ------------------------------------------------------------------------


def test_first_cell_autoconnects_in_one_line(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    result = ip.run_cell("%%mesatee\n6 * 7")
    assert result.result == 42
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mesatee:")]
    assert len(lines) == 1
    assert "no %mesatee connect yet, so connected to the embedded local kernel" in lines[0]
    assert "SOFTWARE trust" in lines[0]
    assert "matches this install" in lines[0]


def test_connect_then_attest_card(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_cell("%mesatee connect")
    out = capsys.readouterr().out
    assert out.startswith("mesatee: connected to the embedded local kernel")
    card = ip.run_cell("%mesatee attest").result
    assert isinstance(card, AttestationCard)
    text, page = repr(card), card._repr_html_()
    assert "level softtee [SOFTWARE TRUST]" in text
    assert "✓ local code: matches the mesatee_notebook installed here" in text
    assert card.report.measurement in text and card.report.measurement in page
    assert "✗" not in text
    for check in ("platform signature", "platform root", "measurement", "freshness", "key binding"):
        assert f"✓ {check}:" in text
        assert f"<td style='text-align:left;vertical-align:top'>{check}</td>" in page  # JupyterLab right-aligns
    assert "numpy" in text and np.__version__ in text and pd.__version__ in page
    assert "evidence age" in text and "evidence age" in page
    # the card speaks user words, says "local code" once, and gives one evidence age (the one the check judged)
    assert "expected_measurement" not in text + page and "<td>" not in page
    assert text.count("matches the mesatee_notebook installed here") == 1
    fresh = next(c.detail for c in card.report.checks if c.name == "freshness")  # "evidence 5 s old (max ...)"
    assert f"evidence age  {fresh.split()[1]} s when verified" in text
    assert "SOFTWARE TRUST" in page and "host operator can read" in page


def test_card_marks_unprotected_red_and_foreign_code(ip: InteractiveShell) -> None:
    ip.run_cell("%mesatee connect")
    report = magics(ip)._sessions["default"].attestation
    unprotected = AttestationCard(dataclasses.replace(report, level=mn.Level.UNPROTECTED))
    page = unprotected._repr_html_()
    assert "UNPROTECTED" in page and "#b00020" in page
    assert "[UNPROTECTED]" in repr(unprotected)
    assert not unprotected.matches_local  # a self-reported measurement proves nothing
    assert "✗ local code: self-reported by an unprotected kernel" in repr(unprotected)
    refusal = render(notebook_error(mn.errors.UnprotectedNotAllowed("the kernel is UNPROTECTED. Refused.")))
    assert "%mesatee connect URL --allow-unprotected" in refusal
    foreign = AttestationCard(report, local_measurement="0" * 64)
    assert not foreign.matches_local
    assert "✗ local code: DIFFERS from this install" in repr(foreign)


def test_humanize_age() -> None:
    import datetime as dt

    assert humanize_age(dt.timedelta(seconds=5)) == "5 s"
    assert humanize_age(dt.timedelta(minutes=7)) == "7 min"
    assert humanize_age(dt.timedelta(hours=5, minutes=2)) == "5 h 02 min"
    assert humanize_age(dt.timedelta(days=2, hours=4)) == "2 d 4 h"


def test_attestation_refusal_is_one_paragraph_and_session_survives(
    ip: InteractiveShell, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.run_cell("%%mesatee\nkept = 11")
    policy = tmp_path / "strict.toml"
    policy.write_text('min_level = "sgx"\n')
    with pytest.raises(mn.AttestationError) as info:
        ip.run_cell(f"%mesatee connect --policy {policy}")
    assert isinstance(info.value, mn.errors.LevelTooLow)
    shown = render(info.value)
    assert len(shown.splitlines()) == 1
    assert "Attestation refused [level]" in shown
    assert "below the policy's minimum sgx" in shown
    assert "Nothing was sent to the kernel" in shown
    assert "Traceback" not in capsys.readouterr().out
    assert ip.run_cell("%%mesatee\nkept + 1").result == 12


def test_bad_policy_file_is_usage_error(ip: InteractiveShell, tmp_path: Path) -> None:
    policy = tmp_path / "typo.toml"
    policy.write_text('min_levl = "softtee"\n')
    with pytest.raises(UsageError, match="unknown keys in policy file"):
        ip.run_cell(f"%mesatee connect --policy {policy}")


def test_policy_file_for_embedded_kernel_keeps_local_platform_pinned(ip: InteractiveShell, tmp_path: Path) -> None:
    policy = tmp_path / "pin.toml"
    policy.write_text(f'measurements = ["{mn.expected_measurement()}"]\nmin_level = "softtee"\n')
    ip.run_cell(f"%mesatee connect --policy {policy} --session pinned")
    assert ip.run_cell("%%mesatee --session pinned\n'pinned ok'").result == "pinned ok"


# -- running cells -----------------------------------------------------------------------------------


def test_in_out_binds_after_verified_receipt_and_displays_dataframe(ip: InteractiveShell) -> None:
    ip.run_cell("import pandas as pd\nsales = pd.DataFrame({'region': list('aabbc'), 'amount': [5, 7, 1, 3, 9]})")
    ip.run_cell("threshold = 2")
    result = ip.run_cell(
        "%%mesatee --in sales,threshold --out total,big\n"
        "big = sales[sales.amount > threshold]\n"
        "total = int(big.amount.sum())\n"
        "big.groupby('region', as_index=False).amount.sum()"
    )
    shown = result.result
    assert isinstance(shown, pd.DataFrame)
    assert shown.to_dict("list") == {"region": ["a", "b", "c"], "amount": [12, 3, 9]}
    html = ip.display_formatter.format(shown)[0]["text/html"]
    assert "<table" in html
    assert ip.user_ns["total"] == 24
    pd.testing.assert_frame_equal(
        ip.user_ns["big"].reset_index(drop=True), pd.DataFrame({"region": list("aabc"), "amount": [5, 7, 3, 9]})
    )
    receipt = ip.user_ns[RECEIPT_VARIABLE]
    assert isinstance(receipt, mn.Receipt)
    assert set(receipt.predicate["inputs"]) == {"sales", "threshold"}
    assert {"out/total", "out/big"} <= set(receipt.subjects)


def test_trailing_semicolon_hides_the_value(ip: InteractiveShell) -> None:
    assert ip.run_cell("%%mesatee\n41 + 1", store_history=True).result == 42
    assert ip.run_cell("%%mesatee\n41 + 1;", store_history=True).result is None


def test_unsendable_last_value_shows_its_remote_repr(ip: InteractiveShell) -> None:
    result = ip.run_cell("%%mesatee\nclass Thing:\n    def __repr__(self):\n        return 'Thing()'\nThing()")
    assert repr(result.result) == "Thing()"


def test_stdout_and_stderr_stream_live(ip: InteractiveShell, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cell waits until the notebook has shown its first line (the test then interrupts that wait).

    Output that arrived only when the cell ended would leave the cell waiting its full two minutes. (It used to
    compare arrival times around a 1 s sleep: on a loaded machine a late first line failed it.)
    """
    seen: list[tuple[str, str]] = []
    shown = threading.Event()

    class Recorder(io.StringIO):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def write(self, s: str) -> int:
            seen.append((self.name, s))
            if self.name == "stdout" and "first" in s:
                shown.set()
            return len(s)

    ip.run_cell("%%mesatee\n1")  # the session is open
    session = magics(ip)._sessions["default"]

    def interrupt_once_shown() -> None:
        if shown.wait(PATIENCE):
            session.interrupt()

    nudge = threading.Thread(target=interrupt_once_shown, daemon=True)
    nudge.start()
    monkeypatch.setattr("sys.stdout", Recorder("stdout"))
    monkeypatch.setattr("sys.stderr", Recorder("stderr"))
    started = time.monotonic()
    ip.run_cell(
        "%%mesatee\nimport sys, time\nprint('first', flush=True)\nprint('oops', file=sys.stderr, flush=True)\n"
        "try:\n    time.sleep(120)\nexcept KeyboardInterrupt:\n    pass\nprint('second')"
    )
    took = time.monotonic() - started
    nudge.join(PATIENCE)
    assert any(name == "stderr" and "oops" in s for name, s in seen)
    assert any("second" in s for _, s in seen)
    assert took < 100, "stdout arrived only when the cell ended"  # the wait was never cut short


def test_no_stream_prints_when_the_cell_ends(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_cell("%%mesatee --no-stream\nprint('buffered')\n1")
    assert "buffered" in capsys.readouterr().out


def test_receipt_command_variable_and_save(
    ip: InteractiveShell, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ip.run_cell("%%mesatee --out answer\nanswer = 7 * 6")
    card = ip.run_cell("%mesatee receipt").result
    assert "mesatee receipt ✓" in repr(card)
    assert "verified" in card._repr_html_()
    assert "out/answer" in repr(card)
    path = tmp_path / "receipt.json"
    ip.run_cell(f"%mesatee receipt --save {path}")
    assert f"mesatee verify-receipt {path}" in capsys.readouterr().out
    verified = mn.verify_receipt(path)
    assert verified.subjects == ip.user_ns[RECEIPT_VARIABLE].subjects
    bundle = json.loads(path.read_text())
    bundle["dsseEnvelope"]["payload"] = bundle["dsseEnvelope"]["payload"][:-8] + "AAAAAAA="
    path.write_text(json.dumps(bundle))
    with pytest.raises(mn.ReceiptError):
        mn.verify_receipt(path)


def test_receipt_before_any_cell_is_usage_error(ip: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="no receipt yet"):
        ip.run_cell("%mesatee receipt")


def test_status_sessions_restart_disconnect(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_cell("%mesatee status")
    assert "not connected" in capsys.readouterr().out
    ip.run_cell("%%mesatee\nremembered = 1")
    ip.run_cell("%%mesatee --session other\nremembered = 2")
    ip.run_cell("%mesatee status")
    status = capsys.readouterr().out
    assert "session 'default' on the embedded local kernel" in status
    assert "state idle" in status and "other sessions: other" in status
    table = repr(ip.run_cell("%mesatee sessions").result)
    assert "default" in table and "other" in table and "softtee" in table
    assert ip.run_cell("%%mesatee --session other\nremembered").result == 2
    ip.run_cell("%mesatee restart")
    assert "restarted session 'default'" in capsys.readouterr().out
    with pytest.raises(mn.RemoteExecutionError, match="remembered"):
        ip.run_cell("%%mesatee\nremembered")
    assert ip.run_cell("%%mesatee --session other\nremembered").result == 2
    ip.run_cell("%mesatee disconnect --session other")
    assert "other" not in repr(ip.run_cell("%mesatee sessions").result)
    ip.run_cell("%mesatee disconnect")
    assert "no mesatee sessions" in repr(ip.run_cell("%mesatee sessions").result)


# -- bad input: one clear message, nothing half-bound, the session goes on ----------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("%%mesatee --bogus\n1", "unrecognized arguments: --bogus"),
        ("%mesatee frobnicate", "invalid choice: 'frobnicate'"),
        ("%mesatee status --save x.json", "%mesatee status takes no --save"),
        ("%mesatee attest mesatee://h:1", "%mesatee attest takes no url"),
        ("%%mesatee --in 'not a name'\n1", "is not a Python variable name"),
        ("%%mesatee --timeout -1\n1", "--timeout must be a positive"),
        ("%mesatee restart --session nowhere", "no session 'nowhere'"),
    ],
)
def test_bad_magic_lines_are_usage_errors(ip: InteractiveShell, line: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        ip.run_cell(line)


def test_missing_in_name_sends_nothing(ip: InteractiveShell) -> None:
    ip.run_cell("present = 1")
    with pytest.raises(UsageError, match="not defined in this notebook: absent_one, absent_two"):
        ip.run_cell("%%mesatee --in present,absent_one,absent_two\nsent = True")
    with pytest.raises(mn.RemoteExecutionError, match="sent"):
        ip.run_cell("%%mesatee\nsent")


def test_out_name_never_set_binds_nothing(ip: InteractiveShell) -> None:
    ip.run_cell("first_out = 'old'")
    with pytest.raises(mn.errors.NotFound) as info:
        ip.run_cell("%%mesatee --out first_out,second_out\nfirst_out = 'new'")
    assert "second_out" in render(info.value)
    assert "No output was bound" in render(info.value)
    assert ip.user_ns["first_out"] == "old"
    assert "second_out" not in ip.user_ns
    assert ip.run_cell("%%mesatee --out first_out\nfirst_out").result == "new"


def test_unsendable_input_and_output(ip: InteractiveShell) -> None:
    ip.run_cell("import threading\nlock = threading.Lock()")
    with pytest.raises(mn.EncodingError) as info:
        ip.run_cell("%%mesatee --in lock\nlock")
    shown = render(info.value)
    assert "Cannot send this value" in shown and "lock" in shown.lower()
    assert len(shown.splitlines()) == 1
    ip.run_cell("gadget = 'old'")
    with pytest.raises(mn.EncodingError, match="gadget"):
        ip.run_cell("%%mesatee --out gadget\nimport threading\ngadget = threading.Lock()")
    assert ip.user_ns["gadget"] == "old"
    assert ip.run_cell("%%mesatee\n'still fine'").result == "still fine"


def test_remote_exception_shows_short_remote_traceback(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    cell = "%%mesatee\ndef ratio(a, b):\n    return a / b\n\nratio(1, 0)"
    with pytest.raises(mn.RemoteExecutionError) as info:
        ip.run_cell(cell)
    assert info.value.ename == "ZeroDivisionError"
    shown = render(info.value)
    assert "return a / b" in shown and "ratio(1, 0)" in shown
    assert "ZeroDivisionError: division by zero" in shown
    printed = capsys.readouterr().out
    assert "ZeroDivisionError" in printed
    for noise in ("_magics.py", "session.py", "channel.py", "interactiveshell.py"):
        assert noise not in printed
    assert ip.run_cell("%%mesatee\n'after the error'").result == "after the error"


def test_notebook_error_keeps_class_and_message() -> None:
    original = mn.PolicyViolation("column 'ssn' may not leave the enclave", column="ssn")
    shown = notebook_error(original)
    assert isinstance(shown, mn.PolicyViolation) and type(shown).__name__ == "PolicyViolation"
    assert shown.details == {"column": "ssn"} and shown.__cause__ is original
    assert render(shown).count("\n") == 0 and "Refused by policy" in render(shown)
    remote = mn.RemoteExecutionError("boom", ename="ValueError", traceback="ValueError: boom\n")
    assert notebook_error(remote) is remote


def test_timeout_stops_the_remote_cell(ip: InteractiveShell) -> None:
    started = time.monotonic()
    with pytest.raises(mn.RemoteExecutionError) as info:
        ip.run_cell("%%mesatee --timeout 0.5\nimport time\ntime.sleep(30)")
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - started < 25  # did not wait the cell's 30 s out (generous: a loaded machine)
    shown = render(info.value)  # what JupyterLab shows: the remote KeyboardInterrupt, then why, not only the former
    assert "KeyboardInterrupt" in shown and shown.splitlines()[-1].startswith("RemoteTimeout: "), shown
    assert "ran past its timeout of 0.5 s" in shown and "the session is intact" in shown, shown
    assert ip.run_cell("%%mesatee\n'alive'").result == "alive"


@pytest.mark.serial  # timing-sensitive (SIGINT 1 s into the cell): runs alone under pytest-xdist
def test_interrupt_stops_the_remote_cell(ip: InteractiveShell) -> None:
    # SIGINT 1 s into the cell, while the client waits for its reply. (A Ctrl-C that lands while the client reads a
    # frame is held until the frame is whole: remote/ctrl_c.py, test_session's mid-frame test.)
    ip.run_cell("%%mesatee\nbefore_interrupt = 5")
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(1.0, signal.pthread_kill, args=(main, signal.SIGINT))
    # whatever an earlier module or a background start left on SIGINT, the timer's Ctrl-C must raise here
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(mn.errors.RemoteInterrupted) as info:
            ip.run_cell("%%mesatee\nimport time\ntime.sleep(30)")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 25  # did not wait the cell's 30 s out
    shown = render(info.value)
    assert shown.splitlines()[-1] == f"RemoteInterrupted: {info.value.message}" and info.value.message, shown
    assert ip.run_cell("%%mesatee\nbefore_interrupt").result == 5


def test_progress_bars_in_a_terminal(ip: InteractiveShell, monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    ip.run_cell("%config MesateeMagics.progress_after = 0.2")
    ip.run_cell("%config MesateeMagics.progress_min_bytes = 1")
    ip.run_cell("import numpy as np\npayload = np.zeros(2_500_000)")  # 20 MB: sent in several chunks
    ip.run_cell("%%mesatee --in payload --out echoed\nimport time\ntime.sleep(0.8)\nechoed = payload + 1")
    text = term.getvalue()
    assert "mesatee ↑ sending" in text
    assert "mesatee ↓ receiving" in text
    assert "mesatee: running in the enclave" in text
    assert ip.user_ns["echoed"].shape == (2_500_000,)


def test_quick_cells_show_no_progress(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_cell("%%mesatee\n1")
    assert "running in the enclave" not in capsys.readouterr().err


# -- help and completion -----------------------------------------------------------------------------


def test_help_is_generated_from_the_arguments(ip: InteractiveShell) -> None:
    line_doc = ip.magics_manager.magics["line"]["mesatee"].__doc__
    cell_doc = ip.magics_manager.magics["cell"]["mesatee"].__doc__
    assert "%mesatee [--policy FILE] [--allow-unprotected]" in line_doc
    assert "receipt" in line_doc and "--save FILE" in line_doc
    assert "%%mesatee [--in A,B] [--out X,Y]" in cell_doc and "--no-stream" in cell_doc


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("%mesatee re", {"restart", "receipt"}),
        ("%mesatee connect --", {"--policy", "--allow-unprotected", "--session"}),
        ("%mesatee receipt --s", {"--save"}),
        ("%%mesatee --t", {"--timeout"}),
        ("%%mesatee --in completes_a,comp", {"completes_a", "completes_b"}),
    ],
)
def test_tab_completion(ip: InteractiveShell, typed: str, expected: set[str]) -> None:
    ip.user_ns.update(completes_a=1, completes_b=2)
    with provisionalcompleter():
        offered = {c.text for c in ip.Completer.completions(typed, len(typed))}
    assert expected <= offered


# -- a dead kernel (last: it restarts the module's embedded kernel) ------------------------------------


@pytest.mark.slow
def test_dead_kernel_is_one_message_then_reconnects(
    ip: InteractiveShell,
    mesatee_home: Path,
    stop_kernel: Callable[[Path, signal.Signals], None],
    start_kernel: Callable[[], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    ip.run_cell("%%mesatee\n1")
    stop_kernel(mesatee_home, signal.SIGKILL)  # a crash, not a shutdown
    with pytest.raises(mn.KernelConnectionError) as info:
        ip.run_cell("%%mesatee --out nothing_bound\nnothing_bound = 1")
    shown = render(info.value)
    assert "Lost the kernel" in shown and "reconnects" in shown
    assert "nothing_bound" not in ip.user_ns
    capsys.readouterr()
    start_kernel()  # what the next cell would do itself, minus the Popen ResourceWarning (see conftest)
    assert ip.run_cell("%%mesatee\n'back'").result == "back"
    assert "reconnected to the embedded local kernel" in capsys.readouterr().out
    assert os.path.exists(mesatee_home / "kernel.json")


@pytest.mark.slow
def test_a_shared_embedded_kernel_is_said_and_shown(
    ip: InteractiveShell, mesatee_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A kernel home shared by two installs: reusing the other's kernel is warned about and shown on connect."""
    import sys

    from mesatee_notebook.remote import embedded

    embedded.ensure_embedded_kernel()
    origin_file = mesatee_home / "launcher.json"
    mine = json.loads(origin_file.read_text())
    pid = json.loads((mesatee_home / "kernel.json").read_text())["pid"]
    assert mine == {"pid": pid, "python": sys.executable, "package": str(Path(mn.__file__).resolve().parent)}
    ip.run_cell("%mesatee connect")
    assert f"pid {pid}, home {mesatee_home})" in capsys.readouterr().out  # its own kernel: no warning
    assert "another install" not in embedded.describe_embedded()
    try:
        origin_file.write_text(json.dumps({**mine, "python": "/elsewhere/.venv/bin/python"}))
        with pytest.warns(embedded.SharedKernelWarning, match=r"reusing the embedded kernel \(pid \d+\).*/elsewhere/"):
            embedded.ensure_embedded_kernel()
        with pytest.warns(embedded.SharedKernelWarning):
            ip.run_cell("%mesatee connect")
        line = capsys.readouterr().out
        assert f"pid {pid}, home {mesatee_home}; started by another install: /elsewhere/.venv/bin/python" in line
    finally:
        origin_file.write_text(json.dumps(mine))


def test_stale_embedded_kernel_hint_names_the_pid(mesatee_home: Path) -> None:
    from mesatee_notebook.magics._magics import _stale_embedded_hint

    pid = json.loads((mesatee_home / "kernel.json").read_text())["pid"]
    hint = _stale_embedded_hint()
    assert f"(pid {pid})" in hint and "started from other code" in hint and str(mesatee_home) in hint


# -- short refusals through the Python API (issue 19) -------------------------------------------------


def _shown_traceback(ip: InteractiveShell, code: str, capsys: pytest.CaptureFixture[str]) -> str:
    """What a notebook shows for a cell that raises: IPython's own traceback display, without colours."""
    before = ip.colors
    ip.run_line_magic("colors", "nocolor")
    try:
        capsys.readouterr()
        InteractiveShell.run_cell(ip, code)  # the base class: show the error as a notebook does, do not raise it
        return capsys.readouterr().out
    finally:
        ip.run_line_magic("colors", before)


def test_refusals_through_the_api_show_a_short_traceback(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    owner = mn.connect(identity=tmp_path / "owner")
    analyst = mn.connect(identity=tmp_path / "analyst")
    try:
        table = pd.DataFrame({"a": range(50), "ssn": range(50)})
        owner.upload(
            table,
            "short_tb",
            policy=mn.DataPolicy(min_group_size=10, hidden_columns=["ssn"], allow_rows=False),
            replace=True,
        )
        ip.user_ns["sdf"] = analyst.dataframe("short_tb")
        cases = {  # code: (the message, where it was raised)
            "sdf.head().collect()": ("does not allow row-level results (allow_rows=False); aggregate", "channel.py"),
            "sdf.rename(columns={'ssn': 'x'})": ("rename() refers to column 'ssn', which the owner of", "schema.py"),
            "len(sdf[sdf.a == 7])": ("fewer than 10 rows of dataset 'short_tb' (min_group_size=10)", "channel.py"),
            "bool(sdf)": ("the expression is lazy and evaluated in the enclave only on .collect()", "frame_base.py"),
        }
        for code, (message, origin) in cases.items():
            shown = _shown_traceback(ip, code, capsys)
            assert message in shown, code  # the message is complete
            assert len(shown.strip().splitlines()) <= 14, shown  # it was 30-45 lines through frame.py and plan.py
            for internal in (
                "plan.py",
                "schema.py",
                "channel.py",
                "frame.py",
                "frame_base.py",
                "__create_fn__",
                "<genexpr>",
            ):
                assert internal not in shown, (code, internal)
            # nothing is lost: %mesatee traceback shows the frames that were cut
            ip.run_line_magic("mesatee", "traceback")
            full = capsys.readouterr().out
            assert "mesatee_notebook's own frames included" in full and code in full
            assert "remote/frame" in full and origin in full and message in full  # remote/frame*.py
            assert "_public.py" not in full and "IPython" not in full
        # the error is the same class, and plain Python (no IPython) sees the same short trace
        with pytest.raises(mn.PolicyViolation) as info:
            ip.user_ns["sdf"].rename(columns={"ssn": "x"})
        frames = [f.name for f in info.traceback]
        assert frames[-1] == "rename" and len(frames) == 2, frames  # this test's line, then the method it called
    finally:
        owner.call("dataset.delete", {"name": "short_tb"})
        owner.close()
        analyst.close()


def test_connect_to_nothing_says_unreachable_not_lost(ip: InteractiveShell) -> None:
    with pytest.raises(mn.KernelConnectionError) as info:
        ip.run_cell("%mesatee connect mesatee://127.0.0.1:1")
    shown = render(info.value)
    assert "Cannot reach the kernel" in shown and "Nothing was sent" in shown, shown
    assert "Lost the kernel" not in shown and "namespace is lost" not in shown, shown


def test_refusals_through_the_jobs_psi_and_ml_clients_are_short(mesatee_home: Path, tmp_path: Path) -> None:
    """``Session.jobs``, ``.psi``, ``.gbdt``, ``.tvm`` and the estimators cut their tracebacks like the frames do."""
    del mesatee_home
    from mesatee_notebook.remote._public import full_traceback

    session = mn.connect(identity=tmp_path / "client")
    try:
        cases = {
            "jobs.status": (lambda: session.jobs.status("no-such-job"), mn.errors.NotFound),
            "psi.result": (lambda: session.psi.result("no-such-psi"), mn.errors.NotFound),
            "gbdt.model": (lambda: session.gbdt.model("0" * 64), mn.errors.NotFound),
            "fit": (lambda: mn.SecureXGBRegressor().fit(pd.DataFrame({"a": [1.0, 2.0]}), [1.0, 2.0]), mn.EncodingError),
        }
        for label, (call, error) in cases.items():
            with pytest.raises(error) as info:
                call()
            frames = [f.name for f in info.traceback]
            method = label.rsplit(".", 1)[-1]
            assert frames[-2:] == ["<lambda>", method] and len(frames) == 3, (label, frames)  # caller, lambda, method
            assert full_traceback(info.value), label  # the cut frames are kept for %mesatee traceback
    finally:
        session.close()
