"""DP results and privacy-budget meters of the DataFrame proxy (display only; the enclave keeps the ledger)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

# ---------------------------------------------------------------------------
# Differentially private releases


def _fmt_eps(x: Any) -> str:
    return "∞" if x is None or x == float("inf") else f"{float(x):.4g}"


@dataclass(frozen=True, slots=True)
class PrivacyBudget:
    """What this party has spent of one DP dataset's budget, and what is left (from a signed receipt)."""

    dataset: str
    epsilon_spent: float
    epsilon_total: float
    epsilon_remaining: float
    delta_spent: float
    delta_total: float
    delta_remaining: float
    queries: int
    all_analysts: Mapping[str, Any] | None = None
    owner_exempt: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyBudget:
        """Build from the ``privacy_budget`` record of a receipt's info."""
        return cls(
            str(data["dataset"]), float(data["epsilon_spent"]), float(data["epsilon_total"]),
            float(data["epsilon_remaining"]), float(data["delta_spent"]), float(data["delta_total"]),
            float(data["delta_remaining"]), int(data["queries"]), data.get("all_analysts"),
            bool(data.get("owner_exempt", False)),
        )  # fmt: skip

    def __repr__(self) -> str:
        line = (
            f"<PrivacyBudget {self.dataset!r}: epsilon spent {_fmt_eps(self.epsilon_spent)} of "
            f"{_fmt_eps(self.epsilon_total)}, {_fmt_eps(self.epsilon_remaining)} left; delta spent "
            f"{self.delta_spent:.3g} of {self.delta_total:.3g}; {self.queries} queries"
        )
        if self.all_analysts:
            line += (
                f"; all analysts: epsilon {_fmt_eps(self.all_analysts.get('epsilon_spent'))} of "
                f"{_fmt_eps(self.all_analysts.get('epsilon_total'))}"
            )
        return line + (" (you own it: your own queries are exact and free)" if self.owner_exempt else "") + ">"

    def _repr_html_(self) -> str:
        return budget_meter_html(self)


def budget_meter_html(budget: PrivacyBudget) -> str:
    """A small spent/remaining meter for one dataset (used by DP results and the party view)."""
    esc = html.escape
    total = budget.epsilon_total
    frac = 0.0 if total <= 0 else min(max(budget.epsilon_spent / total, 0.0), 1.0)
    color = "#2e7d32" if frac < 0.7 else "#f9a825" if frac < 0.9 else "#c62828"
    cap = ""
    if budget.all_analysts:
        cap = (
            f"<div>all analysts: epsilon {_fmt_eps(budget.all_analysts.get('epsilon_spent'))} of the owner's cap "
            f"{_fmt_eps(budget.all_analysts.get('epsilon_total'))}</div>"
        )
    return (
        f"<div class='mesatee-budget'><b>privacy budget</b> <code>{esc(budget.dataset)}</code>: epsilon "
        f"{_fmt_eps(budget.epsilon_spent)} spent, <b>{_fmt_eps(budget.epsilon_remaining)} left</b> of "
        f"{_fmt_eps(total)} (delta {budget.delta_spent:.3g} of {budget.delta_total:.3g}; {budget.queries} queries)"
        f"<div style='width:240px;height:10px;border:1px solid #999;background:#eee'>"
        f"<div style='width:{frac * 100:.1f}%;height:100%;background:{color}'></div></div>{cap}</div>"
    )


def budget_meters_html(budgets: Sequence[PrivacyBudget]) -> str:
    """One meter per DP dataset (for a party view such as the attestation card's)."""
    if not budgets:
        return "<div class='mesatee-budgets'><i>no DP-mode datasets</i></div>"
    return "<div class='mesatee-budgets'>" + "".join(budget_meter_html(b) for b in budgets) + "</div>"


class DPResult:
    """A differentially private release: the noisy ``value``, its 95% ``accuracy``, how it was made.

    ``value`` is a DataFrame, Series or number; ``accuracy`` has the same shape: with 95%
    probability the released value is within ``accuracy`` of the true (clamped) statistic
    (for quantiles the accuracy is a rank error in rows, see ``mechanisms``). ``meta`` is the
    signed record from the receipt: dataset, epsilon/delta spent, mechanisms, the budget left.
    Post-processing the value locally is free: it costs no budget.
    """

    __slots__ = ("accuracy", "meta", "receipt", "value")

    def __init__(self, value: Any, accuracy: Any, meta: Mapping[str, Any], receipt: Any = None) -> None:
        self.value = value
        self.accuracy = accuracy
        self.meta = dict(meta)
        self.receipt = receipt

    @property
    def epsilon(self) -> float:
        """Epsilon this release spent."""
        return float(self.meta["epsilon"])

    @property
    def delta(self) -> float:
        """Delta this release spent (partition selection only)."""
        return float(self.meta["delta"])

    @property
    def mechanisms(self) -> dict[str, Any]:
        """Per released column: mechanism, epsilon, delta, scale, clamping bounds, accuracy unit."""
        return dict(self.meta.get("columns") or {})

    @property
    def budget(self) -> PrivacyBudget:
        """The budget left after this release."""
        return PrivacyBudget.from_dict(self.meta["budget"])

    def interval(self) -> tuple[Any, Any]:
        """``(value - accuracy, value + accuracy)``: a 95% interval for each value-unit statistic."""
        return self.value - self.accuracy, self.value + self.accuracy

    def to_pandas(self) -> Any:
        """Return the noisy value."""
        return self.value

    def __float__(self) -> float:
        return float(self.value)

    def __int__(self) -> int:
        return round(float(self.value))

    def __repr__(self) -> str:
        head = f"<DPResult: epsilon {_fmt_eps(self.epsilon)}, delta {self.delta:.3g} on {self.meta.get('dataset')!r}>"
        if isinstance(self.value, (pd.DataFrame, pd.Series)):
            body = f"{self.value!r}\n95% accuracy (±):\n{self.accuracy!r}"
        else:
            body = f"{self.value!r} ± {self.accuracy:.4g} (95%)"
        return f"{head}\n{body}\n{self.budget!r}"

    def _repr_html_(self) -> str:
        esc = html.escape
        if isinstance(self.value, (pd.DataFrame, pd.Series)):
            table = self.value.to_frame().to_html() if isinstance(self.value, pd.Series) else self.value.to_html()
            acc = self.accuracy
            acc_table = acc.to_frame().to_html() if isinstance(acc, pd.Series) else acc.to_html()
            body = f"{table}<details><summary>95% accuracy (±)</summary>{acc_table}</details>"
        else:
            body = f"<div><code>{esc(repr(self.value))}</code> ± {float(self.accuracy):.4g} (95%)</div>"
        mech = "".join(
            f"<li><code>{esc(str(col))}</code>: {esc(str(m.get('mechanism')))}, epsilon {_fmt_eps(m.get('epsilon'))}"
            f"{', accuracy in ranks (rows)' if m.get('accuracy_unit') == 'rank' else ''}</li>"
            for col, m in self.mechanisms.items()
        )
        sel = self.meta.get("selection")
        if sel:
            mech += (
                f"<li>group keys: {esc(str(sel.get('mechanism')))}, epsilon {_fmt_eps(sel.get('epsilon'))}, "
                f"delta {float(sel.get('delta', 0)):.3g}, threshold {esc(str(sel.get('threshold')))}</li>"
            )
        return (
            f"<div class='mesatee-dp'><b>DP release</b> <i>(noisy; epsilon {_fmt_eps(self.epsilon)}, delta "
            f"{self.delta:.3g})</i>{body}<ul>{mech}</ul>{budget_meter_html(self.budget)}</div>"
        )
