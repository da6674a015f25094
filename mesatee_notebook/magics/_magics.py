"""The ``%mesatee`` line magic and ``%%mesatee`` cell magic.

State lives on the one :class:`MesateeMagics` instance that ``%load_ext`` registers: the
open sessions by name, how each was reached (so a lost connection can be re-made), and
the last verified receipt. Outputs are bound into the notebook only after
``Session.run`` has verified the receipt, all at once, so a failure binds nothing.

Why this module is over ~500 lines: the ``%mesatee`` / ``%%mesatee`` magics: IPython registers one Magics class, and
each subcommand is a short method.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tokenize
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, cast

from IPython.core import magic_arguments as _magic_arguments
from IPython.core.displayhook import DisplayHook
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from traitlets import Bool, Float, Int

from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.attestation.policy import Policy
from mesatee_notebook.attestation.receipts import VerifiedReceipt
from mesatee_notebook.errors import (
    EncodingError,
    KernelConnectionError,
    MeasurementMismatch,
    MesateeError,
    NotFound,
    PolicyViolation,
    ReceiptError,
    RemoteExecutionError,
)
from mesatee_notebook.magics._progress import CallProgress
from mesatee_notebook.magics.display import (
    AttestationCard,
    ReceiptCard,
    RemoteRepr,
    SessionTable,
    notebook_error,
)
from mesatee_notebook.remote._public import full_traceback
from mesatee_notebook.remote.session import RunResult, Session, connect

__all__ = ["COMMANDS", "RECEIPT_VARIABLE", "MesateeMagics"]

RECEIPT_VARIABLE = "_mesatee_receipt"
"""After each ``%%mesatee`` cell, the notebook variable holding its verified :class:`~mesatee_notebook.Receipt`."""

COMMANDS = ("connect", "attest", "status", "sessions", "restart", "disconnect", "receipt", "traceback")
DEFAULT_SESSION = "default"

_F = TypeVar("_F", bound=Callable[..., Any])
_MA: Any = _magic_arguments  # IPython's magic_arguments is untyped; these wrappers give it types


def magic_arguments(name: str) -> Callable[[_F], _F]:
    """``IPython.core.magic_arguments.magic_arguments``, typed."""
    return cast("Callable[[_F], _F]", _MA.magic_arguments(name=name))


def argument(*args: Any, **kwargs: Any) -> Callable[[_F], _F]:
    """``IPython.core.magic_arguments.argument``, typed."""
    return cast("Callable[[_F], _F]", _MA.argument(*args, **kwargs))


def parse_argstring(func: Callable[..., Any], line: str) -> Any:
    """Parse ``line`` with the argparse parser that ``magic_arguments`` built for ``func``."""
    return _MA.parse_argstring(func, line)


def _named_line_magic(name: str) -> Callable[[_F], _F]:
    return cast("Callable[[_F], _F]", line_magic(name))


def _named_cell_magic(name: str) -> Callable[[_F], _F]:
    return cast("Callable[[_F], _F]", cell_magic(name))


@dataclass(frozen=True)
class _Target:
    """How a session was reached, so it can be reached again."""

    url: str | None
    policy: Policy | None
    allow_unprotected: bool

    @property
    def where(self) -> str:
        return "the embedded local kernel" if self.url is None else self.url


def _split_names(values: Iterable[str], flag: str) -> list[str]:
    names: list[str] = []
    for value in values:
        for raw in value.split(","):
            name = raw.strip()
            if not name:
                continue
            if not name.isidentifier():
                msg = f"{flag} {name!r} is not a Python variable name"
                raise UsageError(msg)
            if name not in names:
                names.append(name)
    return names


def _summary(session: Session, card: AttestationCard) -> str:
    level = session.attestation.level
    if level is Level.UNPROTECTED:
        trust = "UNPROTECTED: no attestation, the host sees everything"
    elif level is Level.SOFTTEE:
        trust = "softtee: SOFTWARE trust, the host can read its memory"
    elif level is Level.TPM and session.attestation.tpm_kind != "hardware":
        trust = f"{session.attestation.level_text}: SOFTWARE or uncertified TPM, the host can read its memory"
    elif level is Level.TPM:
        trust = f"{session.attestation.level_text}: measured boot, the host OS can still read its memory"
    elif session.attestation.hw_tee is not None and not session.attestation.hw_vendor_root:
        trust = f"{session.attestation.level_text}: a TEST chain, no memory protection"
    else:
        trust = f"{session.attestation.level_text}: hardware trust"
    if level is Level.UNPROTECTED:
        code = "(self-reported, unverified)"
    else:
        code = "matches this install" if card.matches_local else "DIFFERS from this install (pinned by policy)"
    return f"level {trust}; measurement {session.attestation.measurement[:12]}… {code}. %mesatee attest shows the card."


def _where(target: _Target, session: Session) -> str:
    if target.url is not None:
        return session.url
    from mesatee_notebook.remote.embedded import describe_embedded

    return f"{target.where} ({session.url}, {describe_embedded()})"  # which kernel, and who started it


@magics_class
class MesateeMagics(Magics):
    """``%mesatee`` and ``%%mesatee``: run notebook cells in an attested enclave kernel."""

    show_progress = Bool(True, help="Show progress bars for big transfers and long remote cells.").tag(config=True)
    progress_after = Float(3.0, help="Seconds a remote cell runs before an elapsed-time bar appears.").tag(config=True)
    progress_min_bytes = Int(4 << 20, help="Transfers at least this big get a byte progress bar.").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        self._sessions: dict[str, Session] = {}
        self._targets: dict[str, _Target] = {}
        self._current = DEFAULT_SESSION
        self._last: tuple[str, VerifiedReceipt] | None = None

    @property
    def _ns(self) -> dict[str, Any]:
        """The notebook's namespace."""
        if self.shell is None:
            msg = "the mesatee magics are not attached to an IPython shell"
            raise RuntimeError(msg)
        return cast("dict[str, Any]", self.shell.user_ns)

    # -- the line magic --------------------------------------------------------------------------
    @magic_arguments(name="mesatee")
    @argument(
        "command",
        choices=COMMANDS,
        metavar="COMMAND",
        help="connect [URL] | attest | status | sessions | restart | disconnect | receipt | traceback",
    )
    @argument(
        "url",
        nargs="?",
        default=None,
        help="connect only: mesatee://HOST:PORT of a remote kernel (default: the embedded local kernel)",
    )
    @argument("--policy", metavar="FILE", help="connect only: a TOML verification policy (see mn.Policy.from_toml)")
    @argument(
        "--allow-unprotected",
        action="store_true",
        help="connect only: accept a kernel with NO attestation (development only; shown loudly)",
    )
    @argument("--session", metavar="NAME", help="the session to act on (default: the current one)")
    @argument("--save", metavar="FILE", help="receipt only: write the last receipt to FILE as JSON")
    @_named_line_magic("mesatee")
    def mesatee_line(self, line: str) -> Any:
        """Connect to an attested enclave kernel and inspect it.

        Commands:
          connect [URL]   attest a kernel and open a session; no URL = the embedded local softtee kernel
          attest          show the attestation card: level, measurement, platform, native parts, checks
          status          the current session, its kernel and the last receipt
          sessions        every session this notebook holds
          restart         restart the session's executor (the enclave namespace is cleared)
          disconnect      close --session NAME, or every session
          receipt         show the last verified receipt; --save FILE writes it for offline checks
          traceback       the last error's full traceback, mesatee_notebook's own frames included

        The last receipt is also in the variable ``_mesatee_receipt``. Settings:
        ``%config MesateeMagics.show_progress = False`` (and ``progress_after``, ``progress_min_bytes``).
        """
        args = parse_argstring(self.mesatee_line, line)
        cmd: str = args.command
        only = {"url": "connect", "policy": "connect", "allow_unprotected": "connect", "save": "receipt"}
        for opt, allowed in only.items():
            if getattr(args, opt) not in (None, False) and cmd != allowed:
                flag = opt if opt == "url" else "--" + opt.replace("_", "-")
                msg = f"%mesatee {cmd} takes no {flag} (it belongs to %mesatee {allowed})"
                raise UsageError(msg)
        handler = getattr(self, f"_cmd_{cmd}")
        try:
            return handler(args)
        except MesateeError as exc:
            shown = notebook_error(exc)
            if shown is exc:
                raise
            raise shown from exc

    def _cmd_connect(self, args: Any) -> None:
        name = args.session or DEFAULT_SESSION
        policy = None
        if args.policy:
            try:
                policy = Policy.from_toml(args.policy)
            except (OSError, ValueError) as exc:
                msg = f"cannot use policy file {args.policy}: {exc}"
                raise UsageError(msg) from exc
        target = _Target(args.url, policy, bool(args.allow_unprotected))
        try:
            session = self._open(name, target)  # a refusal leaves the current session as it was
        except KernelConnectionError as exc:
            # this kernel was never reached: nothing to lose, and the current session (if any) stays as it was
            raise type(exc)(exc.message, **{**exc.details, "never_connected": True}) from exc
        self._close(name)
        self._sessions[name], self._targets[name] = session, target
        self._current = name
        card = AttestationCard(
            session.attestation, url=session.url, local_measurement=session.attestation.expected_measurement
        )
        print(f"mesatee: connected to {_where(target, session)}, session {name!r}; {_summary(session, card)}")

    def _cmd_attest(self, args: Any) -> AttestationCard:
        session = self._session(args.session)
        return AttestationCard(
            session.attestation, url=session.url, sealed_state=_sealed_state(session), budgets=_budgets(session)
        )

    def _cmd_status(self, args: Any) -> None:
        name = args.session or self._current
        session = self._sessions.get(name)
        if session is None:
            print(f"mesatee: not connected (session {name!r}). Run %mesatee connect, or just run a %%mesatee cell.")
            return
        a = session.attestation
        state = self._kernel_state(session)
        print(f"mesatee: session {name!r} on {_where(self._targets[name], session)}")
        print(f"  level        {a.level_text} — {a.trust_note}")
        print(f"  measurement  {a.measurement}")
        print(f"  kernel       session id {session.id}, {state}")
        if self._last is not None:
            p = self._last[1].predicate
            print(
                f"  last receipt session {self._last[0]!r}, nonce {p.get('nonce')}, outputs "
                f"{sorted(self._last[1].subjects)} (in {RECEIPT_VARIABLE})"
            )
        others = sorted(set(self._sessions) - {name})
        if others:
            print(f"  other sessions: {', '.join(others)}")

    def _cmd_sessions(self, args: Any) -> SessionTable:
        del args
        rows = []
        for name, session in self._sessions.items():
            info = self._kernel_info(session)
            rows.append(
                {
                    "": "*" if name == self._current else "",
                    "name": name,
                    "url": session.url,
                    "level": session.attestation.level.label,
                    "session": session.id,
                    "state": str(info.get("state", "unreachable")),
                    "calls": str(info.get("calls", "")),
                }
            )
        return SessionTable(rows)

    def _cmd_restart(self, args: Any) -> None:
        name = args.session or self._current
        session = self._sessions.get(name)
        if session is None:
            msg = f"no session {name!r} to restart; open one with %mesatee connect"
            raise UsageError(msg)
        try:
            session.restart()
        except KernelConnectionError:
            self._close(name)
            raise
        print(f"mesatee: restarted session {name!r}; its enclave namespace is empty now.")

    def _cmd_disconnect(self, args: Any) -> None:
        names = [args.session] if args.session else list(self._sessions)
        unknown = [n for n in names if n not in self._sessions]
        if unknown:
            msg = f"no session {unknown[0]!r}; open sessions: {', '.join(self._sessions) or 'none'}"
            raise UsageError(msg)
        for name in names:
            self._close(name)
            self._targets.pop(name, None)
        print(f"mesatee: disconnected {', '.join(repr(n) for n in names) or 'nothing (no open session)'}.")

    def _cmd_receipt(self, args: Any) -> ReceiptCard | None:
        if self._last is None:
            msg = "no receipt yet: run a %%mesatee cell first"
            raise UsageError(msg)
        verified = self._last[1]
        if args.save:
            path = verified.receipt.save(args.save)
            print(
                f"mesatee: saved the receipt to {path}. Check it offline: mesatee verify-receipt {path}  "
                f"(or mn.verify_receipt({str(path)!r}))"
            )
            return None
        return ReceiptCard(verified, variable=RECEIPT_VARIABLE)

    def _cmd_traceback(self, args: Any) -> None:
        exc = getattr(sys, "last_value", None)
        if exc is None:
            print("mesatee: no error in this notebook yet.")
            return
        print(full_traceback_text(exc), end="")

    # -- the cell magic --------------------------------------------------------------------------
    @magic_arguments(name="%mesatee")  # shown as %%mesatee in the help
    @argument(
        "--in",
        dest="inputs",
        action="append",
        default=[],
        metavar="A,B",
        help="notebook variables to send into the enclave (comma-separated; repeatable)",
    )
    @argument(
        "--out",
        dest="outputs",
        action="append",
        default=[],
        metavar="X,Y",
        help="enclave variables to bind back into the notebook once the receipt verifies",
    )
    @argument("--timeout", type=float, metavar="S", help="stop the remote cell after S seconds")
    @argument("--session", metavar="NAME", help="run in this session (opened on first use)")
    @argument("--no-stream", action="store_true", help="print the cell's stdout/stderr when it ends, not live")
    @_named_cell_magic("mesatee")
    def mesatee_cell(self, line: str, cell: str) -> Any:
        """Run this cell in the attested enclave kernel.

        The cell's last expression is shown like a normal cell's. stdout and stderr stream
        live. ``--out`` names are bound only after the receipt is verified, all together;
        if anything fails, nothing is bound. The receipt is left in ``_mesatee_receipt``.
        The first cell with no ``%mesatee connect`` connects to the embedded local kernel.
        """
        args = parse_argstring(self.mesatee_cell, line)
        in_names = _split_names(args.inputs, "--in")
        out_names = _split_names(args.outputs, "--out")
        if args.timeout is not None and args.timeout <= 0:
            msg = "--timeout must be a positive number of seconds"
            raise UsageError(msg)
        ns = self._ns
        missing = [n for n in in_names if n not in ns]
        if missing:
            msg = (
                f"--in names {'a variable' if len(missing) == 1 else 'variables'} not defined in this notebook: "
                f"{', '.join(missing)}"
            )
            raise UsageError(msg)
        inputs = {n: ns[n] for n in in_names}
        name = args.session or self._current
        try:
            result = self._run(name, cell, inputs, out_names, timeout=args.timeout, stream=not args.no_stream)
        except MesateeError as exc:
            shown = notebook_error(exc)
            if shown is exc:
                raise
            raise shown from exc
        ns.update(result.outputs)
        ns[RECEIPT_VARIABLE] = result.receipt
        self._last = (name, result.verified)
        if args.no_stream:
            for stream, text in ((sys.stdout, result.stdout), (sys.stderr, result.stderr)):
                stream.write(text)
                stream.flush()
        if _ends_with_semicolon(cell):
            return None  # like a normal cell: a trailing ';' hides the value
        if result.value is None and result.value_repr is not None:
            return RemoteRepr(result.value_repr)
        return result.value

    def _run(
        self, name: str, code: str, inputs: dict[str, Any], outputs: list[str], *, timeout: float | None, stream: bool
    ) -> RunResult:
        session = self._session(name, for_cell=True)
        progress = CallProgress(
            enabled=self.show_progress, min_bytes=self.progress_min_bytes, long_after=self.progress_after
        )
        try:
            with progress:
                return session.run(
                    code,
                    inputs,
                    outputs,
                    timeout=timeout,
                    stream=progress.write if stream else None,
                    upload_progress=progress.upload,
                    download_progress=progress.download,
                )
        except (RemoteExecutionError, PolicyViolation, EncodingError, NotFound, ReceiptError):
            raise  # a typed reply, or refused before sending: the connection is in step
        except BaseException:
            # The connection broke, or the call was abandoned mid-request (a second interrupt, a
            # failed interrupt): the channel may be out of step. Forget it; the next cell reconnects.
            self._close(name)
            raise

    # -- sessions --------------------------------------------------------------------------------
    def _open(self, name: str, target: _Target) -> Session:
        policy = target.policy
        if target.url is None and policy is not None:
            from mesatee_notebook.remote.embedded import ensure_embedded_kernel

            _, _, fp = ensure_embedded_kernel()
            if fp not in policy.platform_roots:
                policy = policy.with_roots(fp)  # the embedded platform is always the one we pin
        if policy is not None and target.allow_unprotected:
            policy = replace(policy, allow_unprotected=True)
        try:
            return connect(target.url, policy=policy, session=name, allow_unprotected=target.allow_unprotected)
        except MeasurementMismatch as exc:
            if target.url is not None or (policy is not None and policy.measurements is not None):
                raise
            raise MeasurementMismatch(exc.message + _stale_embedded_hint(), **exc.details) from exc

    def _session(self, name: str | None, *, for_cell: bool = False) -> Session:
        """Return the open session ``name``, opening it (and saying so in one line) if needed."""
        name = name or self._current
        session = self._sessions.get(name)
        if session is not None:
            return session
        if name in self._targets:
            target, how = self._targets[name], "reconnected to"
            note = " (a new session: the enclave namespace starts empty)"
        elif self._current in self._targets:
            target, how, note = self._targets[self._current], "opened a new session on", ""
        else:
            target = _Target(None, None, allow_unprotected=False)
            how = "no %mesatee connect yet, so connected to" if for_cell else "connected to"
            note = ""
        session = self._open(name, target)
        self._sessions[name], self._targets[name] = session, target
        card = AttestationCard(
            session.attestation, url=session.url, local_measurement=session.attestation.expected_measurement
        )
        print(f"mesatee: {how} {_where(target, session)}, session {name!r}{note}; {_summary(session, card)}")
        return session

    def _kernel_info(self, session: Session) -> dict[str, Any]:
        try:
            listed = session.sessions()
        except (MesateeError, OSError):
            return {}
        return next((s for s in listed if s.get("session") == session.id), {})

    def _kernel_state(self, session: Session) -> str:
        info = self._kernel_info(session)
        if not info:
            return "UNREACHABLE (the next %%mesatee cell reconnects)"
        return f"state {info.get('state', '?')}, {info.get('calls', '?')} calls, executor pid {info.get('pid', '?')}"

    def _close(self, name: str) -> None:
        """Close and forget session ``name``; its target stays, so the next cell can reconnect."""
        session = self._sessions.pop(name, None)
        if session is not None:
            _quiet_close(session)

    def close_all(self) -> None:
        """Close every session (``%unload_ext``)."""
        for name in list(self._sessions):
            self._close(name)
        self._targets.clear()

    # -- completion ------------------------------------------------------------------------------
    def complete(self, line: str) -> list[str]:
        """Completions for the ``%mesatee`` / ``%%mesatee`` line typed so far (cursor at its end)."""
        words = line.split()
        before = words if not words or line[-1:].isspace() else words[:-1]
        prev = before[-1] if len(before) > 1 else ""
        if before and before[0].startswith("%%"):
            if prev == "--in":
                return sorted(n for n in self._ns if not n.startswith("_"))
            if prev == "--session":
                return sorted(self._sessions)
            return ["--in", "--out", "--timeout", "--session", "--no-stream"]
        if len(before) <= 1:
            return list(COMMANDS)
        if prev == "--session":
            return sorted(self._sessions)
        per = {
            "connect": ["mesatee://", "--policy", "--allow-unprotected", "--session"],
            "receipt": ["--save"],
            "traceback": [],
            "restart": ["--session"],
            "disconnect": ["--session"],
            "attest": ["--session"],
            "status": ["--session"],
        }
        return per.get(before[1], [])


def full_traceback_text(exc: BaseException) -> str:
    """``exc``'s whole traceback: the user's frames and the mesatee_notebook frames its short display cut."""
    import traceback

    # the magics show an error as one paragraph (a copy, caused by the original): go back to the original
    while _is_display_copy(exc):
        exc = cast("BaseException", exc.__cause__)
    from mesatee_notebook.remote import _public

    shown = [f for f in traceback.extract_tb(exc.__traceback__) if not _is_ipython_frame(f.filename)]
    frames = [f for f in [*shown, *(full_traceback(exc) or [])] if f.filename != _public.__file__]
    head = "Traceback (most recent call last), mesatee_notebook's own frames included:\n"
    return head + "".join(traceback.format_list(frames)) + "".join(traceback.format_exception_only(type(exc), exc))


def _is_display_copy(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, MesateeError) and type(exc).__bases__ == (type(cause),) and exc.args == cause.args


def _is_ipython_frame(filename: str) -> bool:
    import IPython

    return filename.startswith(str(Path(IPython.__file__).parent))


def _stale_embedded_hint() -> str:
    from mesatee_notebook.remote.embedded import embedded_home

    info = embedded_home() / "kernel.json"
    try:
        pid = f" (pid {int(json.loads(info.read_text())['pid'])})"
    except (OSError, ValueError, KeyError, TypeError):
        pid = ""
    return (
        f" The embedded kernel{pid} was started from other code than what is installed now, e.g. before an "
        f"upgrade or an edit; stop it (its pid is in {info}) and the next connect starts a fresh one."
    )


def _ends_with_semicolon(cell: str) -> bool:
    try:
        check: Any = DisplayHook.semicolon_at_end_of_expression  # untyped in IPython
        return bool(check(cell))
    except (tokenize.TokenError, SyntaxError):
        return False


def _quiet_close(session: Session) -> None:
    with contextlib.suppress(MesateeError, OSError):
        session.close()


def _budgets(session: Session) -> list[Any]:
    """The DP budgets of this session's party, for the card's party view (none if anonymous, or on a refusal)."""
    from mesatee_notebook.errors import MesateeError

    if session.party_id is None:
        return []
    try:
        return list(session.privacy_budgets())
    except MesateeError:
        return []


def _sealed_state(session: Session) -> list[str]:
    """What the kernel says about state sealed for other measurements (nothing from a kernel that predates it)."""
    from mesatee_notebook.errors import MesateeError
    from mesatee_notebook.wire.messages import sealed_state_summary

    try:
        return sealed_state_summary(session.migration_status())
    except MesateeError:
        return []
