"""Rich display for notebooks: the attestation card, the receipt card, short error renderings.

Every object here has both ``_repr_html_`` (JupyterLab) and ``__repr__`` (terminals, logs,
``text/plain`` in saved notebooks), and says in words what was verified and what it means.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import Iterable
from typing import Any, cast

from mesatee_notebook.attestation.levels import Level
from mesatee_notebook.attestation.policy import AttestationReport
from mesatee_notebook.attestation.receipts import VerifiedReceipt
from mesatee_notebook.errors import (
    AttestationError,
    EncodingError,
    KernelConnectionError,
    MesateeError,
    NotFound,
    PolicyViolation,
    ReceiptError,
    UnprotectedNotAllowed,
)

__all__ = ["AttestationCard", "ReceiptCard", "RemoteRepr", "SessionTable", "humanize_age", "notebook_error"]

_RED = "#b00020"
_AMBER = "#9a5b00"
_GREEN = "#1b5e20"
_GREY = "#666"


def _left_aligned(page: str) -> str:
    """Left-align every table cell: JupyterLab's stylesheet right-aligns them, which scatters a card's labels."""
    cell = "text-align:left;vertical-align:top"
    return page.replace("<td style='", f"<td style='{cell};").replace("<td>", f"<td style='{cell}'>")


def humanize_age(delta: dt.timedelta) -> str:
    """``42 s``, ``3 min``, ``5 h 02 min``, ``2 d 4 h``: short and honest about the unit."""
    secs = int(delta.total_seconds())
    sign = "-" if secs < 0 else ""
    secs = abs(secs)
    if secs < 120:
        return f"{sign}{secs} s"
    if secs < 3600:
        return f"{sign}{secs // 60} min"
    if secs < 86400:
        return f"{sign}{secs // 3600} h {secs % 3600 // 60:02d} min"
    return f"{sign}{secs // 86400} d {secs % 86400 // 3600} h"


def _local_measurement() -> str | None:
    from mesatee_notebook.attestation.measurement import expected_measurement

    try:
        return expected_measurement()
    except OSError:
        return None


def _libraries(n: int) -> str:
    return f"{n} shared {'library' if n == 1 else 'libraries'}"


def _level_badge(report: AttestationReport) -> tuple[str, str]:
    label = report.trust_label
    colour = {"UNPROTECTED": _RED, "TEST CHAIN, NOT HARDWARE": _RED, "HARDWARE TRUST": _GREEN}
    colour["TPM CHIP, EK CERTIFIED"] = _GREEN
    return label, colour.get(label, _AMBER)  # software trust and software or uncertified TPMs: amber


class AttestationCard:
    """What the client verified about a kernel, for people: level, code, platform, native parts, checks.

    The local measurement is recomputed when the card is built, so "matches this install"
    is true of the package on disk now, not only at connect time.
    """

    def __init__(
        self,
        report: AttestationReport,
        *,
        url: str | None = None,
        local_measurement: str | None = None,
        now: dt.datetime | None = None,
        sealed_state: list[str] | None = None,
        budgets: list[Any] | None = None,
    ) -> None:
        self.report = report
        self.sealed_state = list(sealed_state or [])  # state sealed for other measurements, as the kernel says
        self.budgets = list(budgets or [])  # this party's DP budgets (remote.frame.PrivacyBudget), the party view
        self.url = url
        self.local_measurement = local_measurement if local_measurement is not None else _local_measurement()
        self.now = now or dt.datetime.now(dt.UTC)

    @property
    def matches_local(self) -> bool:
        """True when a vouched-for measurement equals this install's ``expected_measurement()``.

        An unprotected kernel only *claims* a measurement; nobody vouches for it, so it never matches.
        """
        if self.report.level is Level.UNPROTECTED:
            return False
        return self.local_measurement is not None and self.report.measurement == self.local_measurement

    def _match_text(self) -> str:
        if self.report.level is Level.UNPROTECTED:
            return "self-reported by an unprotected kernel: nobody vouches for it, so it proves nothing"
        if self.local_measurement is None:
            return "cannot recompute the local measurement (package files unreadable)"
        if self.matches_local:
            return "matches the mesatee_notebook installed here"
        return f"DIFFERS from this install ({self.local_measurement[:16]}…); accepted only because the policy pins it"

    def _age_text(self) -> str:
        """One evidence age: the one the freshness check judged, when the evidence was verified."""
        r = self.report
        age = r.age(r.verified_at)
        for c in r.checks:  # the freshness check states the age it judged: show that very number
            found = re.match(r"evidence (-?\d+) s old", c.detail) if c.name == "freshness" else None
            if found:
                age = dt.timedelta(seconds=int(found.group(1)))
        return f"{humanize_age(age)} when verified (signed {r.evidence_time:%Y-%m-%d %H:%M:%S} UTC)"

    def _components(self) -> list[tuple[str, str, int]]:
        return [
            (str(c.get("name")), str(c.get("version") or "?"), len(c.get("libraries") or []))
            for c in self.report.unsafe_components
        ]

    def _all_checks(self) -> list[tuple[bool, str, str]]:
        rows = [(c.passed, c.name, c.detail) for c in self.report.checks]
        rows.append((self.matches_local, "local code", self._match_text()))
        return rows

    def __repr__(self) -> str:
        r = self.report
        badge, _ = _level_badge(r)
        manifest = r.manifest
        lines = [
            f"mesatee attestation — level {r.level_text} [{badge}]" + (f" at {self.url}" if self.url else ""),
            f"  {r.trust_note}",
            f"  measurement   {r.measurement} (local code: see the checks)",
            f"  platform      {r.platform}",
            f"  python        {manifest.get('python', '?')}, {len(manifest.get('files', []))} measured files",
            f"  evidence age  {self._age_text()}",
            f"  sandbox       {'' if r.sandboxed else '✗ '}{r.sandbox_note}",
            "  native (unsafe) components, measured by library digest:",
        ]
        lines += [f"    {n:<14} {v:<16} {_libraries(k)}" for n, v, k in self._components()]
        lines.append("  checks:")
        lines += [f"    {'✓' if ok else '✗'} {name}: {detail}" for ok, name, detail in self._all_checks()]
        lines += [f"  sealed state: {line}" for line in self.sealed_state]
        lines += [
            f"  privacy budget {b.dataset}: spent epsilon {b.epsilon_spent:g} of {b.epsilon_total:g} "
            f"({b.epsilon_remaining:g} left, {b.queries} queries)"
            for b in self.budgets
        ]
        return "\n".join(lines)

    def _budgets_html(self) -> str:
        if not self.budgets:
            return ""
        from mesatee_notebook.remote.frame import budget_meters_html

        return "<div style='margin-top:4px'><b>your privacy budgets</b>" + budget_meters_html(self.budgets) + "</div>"

    def _sandbox_details(self) -> str:
        sb = self.report.sandbox
        if not sb.get("active"):
            return ""
        e = html.escape
        seccomp = sb.get("seccomp") or {}
        limits = sb.get("limits") or {}
        rows = [
            ("uid", str(sb.get("uid_mode", "?"))),
            ("bubblewrap", str(sb.get("bubblewrap", "?"))),
            ("seccomp", f"{seccomp.get('rules', '?')} rules, BPF sha256 {str(seccomp.get('bpf_sha256', '?'))[:16]}…"),
            ("landlock", str(sb.get("landlock", "?"))),
            ("cgroup", str(sb.get("cgroup", "?"))),
            ("limits", ", ".join(f"{k}={v}" for k, v in sorted(limits.items()))),
            ("self-test", ", ".join(sb.get("self_test") or [])),
        ]
        body = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in rows)
        return f"<details><summary>sandbox details</summary><table>{body}</table></details>"

    def _repr_html_(self) -> str:
        r = self.report
        badge, colour = _level_badge(r)
        e = html.escape
        checks = "".join(
            f"<tr><td style='color:{_GREEN if ok else _RED};font-weight:bold'>{'✓' if ok else '✗'}</td>"
            f"<td>{e(name)}</td><td>{e(detail)}</td></tr>"
            for ok, name, detail in self._all_checks()
        )
        comps = "".join(
            f"<tr><td><code>{e(n)}</code></td><td>{e(v)}</td><td>{_libraries(k)}</td></tr>"
            for n, v, k in self._components()
        )
        match_colour = _GREEN if self.matches_local else _RED
        where = f" at <code>{e(self.url)}</code>" if self.url else ""
        manifest = r.manifest
        return _left_aligned(
            f"<div class='mesatee-attestation' style='border:2px solid {colour};border-radius:6px;padding:8px 12px;"
            "font-family:sans-serif;max-width:60em'>"
            f"<div style='font-size:1.1em'><b>mesatee attestation</b>{where}: level <b>{e(r.level_text)}</b> "
            f"<span style='background:{colour};color:white;padding:1px 6px;border-radius:3px;font-weight:bold'>"
            f"{badge}</span></div>"
            f"<div style='color:{colour};margin:4px 0'>{e(r.trust_note)}</div>"
            "<table style='border-collapse:collapse'>"
            f"<tr><td><b>measurement</b></td><td><code>{e(r.measurement)}</code> "
            f"<span style='color:{match_colour}'>{'✓' if self.matches_local else '✗'} local code</span>"
            "</td></tr>"
            f"<tr><td><b>platform</b></td><td><code>{e(r.platform)}</code></td></tr>"
            f"<tr><td><b>python</b></td><td>{e(str(manifest.get('python', '?')))}, "
            f"{len(manifest.get('files', []))} measured files</td></tr>"
            f"<tr><td><b>evidence age</b></td><td>{e(self._age_text())}</td></tr>"
            f"<tr><td><b>sandbox</b></td><td style='color:{_GREEN if r.sandboxed else _RED}'>"
            f"{'' if r.sandboxed else '<b>NO SANDBOX</b> '}{e(r.sandbox_note)}{self._sandbox_details()}</td></tr>"
            "</table>"
            "<details><summary>native (unsafe) components, measured by library digest "
            f"({len(self._components())})</summary><table>{comps}</table></details>"
            f"<table style='margin-top:4px'>{checks}</table>"
            + "".join(f"<div style='color:{_RED}'><b>sealed state:</b> {e(line)}</div>" for line in self.sealed_state)
            + self._budgets_html()
            + "</div>"
        )


class ReceiptCard:
    """A verified receipt: what ran, on which attested code, with which inputs and outputs."""

    def __init__(self, verified: VerifiedReceipt, *, variable: str | None = None) -> None:
        self.verified = verified
        self.variable = variable

    def _rows(self) -> list[tuple[str, str]]:
        p = self.verified.predicate
        when = p.get("finishedAt")
        finished = (
            dt.datetime.fromtimestamp(float(when), dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            if isinstance(when, (int, float))
            else "?"
        )
        code = p.get("code")
        code = code if isinstance(code, dict) else {}
        rows = [
            ("kind", str(p.get("kind", "?"))),
            ("session", str(p.get("session", "?"))),
            ("level", str(p.get("level", "?"))),
            ("measurement", str(p.get("measurement", "?"))),
            ("nonce", str(p.get("nonce", "?"))),
            ("code sha256", str(code.get("sha256", "?"))),
            ("finished", finished),
        ]
        inputs = p.get("inputs")
        inputs = inputs if isinstance(inputs, dict) else {}
        rows += [(f"input {k}", str(v)) for k, v in sorted(inputs.items())]
        rows += [(f"output {k}", v) for k, v in sorted(self.verified.subjects.items())]
        return rows

    def _footer(self) -> str:
        where = f"; it is also in the variable {self.variable}" if self.variable else ""
        return (
            "verified: signature by the attested receipt key, nonce, code, input and output digests"
            f"{where}. Save it with %mesatee receipt --save FILE and check it offline with "
            "mesatee verify-receipt FILE or mn.verify_receipt(FILE)."
        )

    def __repr__(self) -> str:
        lines = ["mesatee receipt ✓"] + [f"  {k:<18} {v}" for k, v in self._rows()]
        lines.append("  " + self._footer())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        e = html.escape
        rows = "".join(f"<tr><td>{e(k)}</td><td><code>{e(v)}</code></td></tr>" for k, v in self._rows())
        return (
            f"<div class='mesatee-receipt' style='border:1px solid {_GREEN};border-radius:6px;padding:8px 12px;"
            "font-family:sans-serif;max-width:60em'>"
            f"<div><b>mesatee receipt</b> <span style='color:{_GREEN};font-weight:bold'>✓ verified</span></div>"
            f"<table>{rows}</table><div style='color:{_GREY}'>{e(self._footer())}</div></div>"
        )


class SessionTable:
    """The sessions this notebook holds, with the kernel's view of each."""

    def __init__(self, rows: Iterable[dict[str, str]]) -> None:
        self.rows = list(rows)
        self.columns = ["", "name", "url", "level", "session", "state", "calls"]

    def __repr__(self) -> str:
        if not self.rows:
            return "no mesatee sessions (use %mesatee connect, or run a %%mesatee cell)"
        widths = {c: max(len(c), *(len(r.get(c, "")) for r in self.rows)) for c in self.columns}
        head = "  ".join(c.ljust(widths[c]) for c in self.columns)
        body = ["  ".join(r.get(c, "").ljust(widths[c]) for c in self.columns) for r in self.rows]
        return "\n".join([head.rstrip(), *(b.rstrip() for b in body)])

    def _repr_html_(self) -> str:
        if not self.rows:
            return f"<i>{html.escape(repr(self))}</i>"
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(r.get(c, ''))}</td>" for c in self.columns) + "</tr>" for r in self.rows
        )
        return f"<table class='mesatee-sessions'><tr>{head}</tr>{body}</table>"


class RemoteRepr:
    """The enclave's ``repr`` of a last value that cannot travel as data (shown, never bound)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


# -- errors ------------------------------------------------------------------------------------

_HINTS: list[tuple[type[MesateeError], str, str]] = [
    (
        UnprotectedNotAllowed,
        "Attestation refused",
        "Nothing was sent. To use it anyway for development: %mesatee connect URL --allow-unprotected.",
    ),
    (
        AttestationError,
        "Attestation refused",
        "Nothing was sent to the kernel. Check the policy (--policy FILE) or the kernel you meant to reach.",
    ),
    (PolicyViolation, "Refused by policy", "Nothing was released; the notebook namespace is unchanged."),
    (EncodingError, "Cannot send this value", "Nothing was sent; the notebook namespace is unchanged."),
    (NotFound, "Not found", "No output was bound; the notebook namespace is unchanged."),
    (ReceiptError, "Receipt did not verify", "No output was bound; the notebook namespace is unchanged."),
    (
        KernelConnectionError,
        "Lost the kernel",
        "No output was bound. The next %%mesatee cell reconnects (the enclave namespace is lost), "
        "or run %mesatee connect.",
    ),
]


def _paragraph(exc: MesateeError) -> list[str]:
    title, hint = "mesatee error", ""
    for cls, t, h in _HINTS:
        if isinstance(exc, cls):
            title, hint = t, h
            break
    if isinstance(exc, KernelConnectionError) and exc.details.get("never_connected"):
        title = "Cannot reach the kernel"
        hint = (
            "Nothing was sent, and the current session (if any) is unchanged. Check the URL and that the kernel "
            "is running (mesatee-enclave serve)."
        )
    check = getattr(exc, "check", None)
    label = f" [{check}]" if isinstance(exc, AttestationError) and check else ""
    text = (exc.message or str(exc)).strip()
    if hint and not text.endswith((".", "!", "?")):
        text += "."
    return [f"\x1b[1;31m{title}{label}\x1b[0m ({type(exc).__name__}): {text}" + (f" {hint}" if hint else "")]


def _render_paragraph(self: MesateeError) -> list[str]:
    return _paragraph(self)


_RENDERABLE: dict[type[MesateeError], type[MesateeError]] = {}


def _renderable(cls: type[MesateeError]) -> type[MesateeError]:
    if cls in _RENDERABLE:
        return _RENDERABLE[cls]
    namespace: dict[str, Any] = {
        "_render_traceback_": _render_paragraph,
        "__doc__": cls.__doc__,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
    }
    sub = cast("type[MesateeError]", type(cls.__name__, (cls,), namespace))
    _RENDERABLE[cls] = sub
    return sub


def notebook_error(exc: MesateeError) -> MesateeError:
    """Return the same error, shown in a notebook as one clear paragraph instead of a local traceback.

    Errors that already render short (``RemoteExecutionError`` shows the remote cell's
    traceback) come back unchanged. Others come back as an instance of a subclass of their
    own class that adds ``_render_traceback_`` — so ``isinstance`` and the error's name
    stay the same, and IPython itself is left untouched.
    """
    if hasattr(type(exc), "_render_traceback_"):
        return exc
    new = _renderable(type(exc))(exc.message, **exc.details)
    new.__cause__ = exc
    new.__suppress_context__ = True
    return new
