"""Differential privacy for the SecureDataFrame: mechanisms, contribution bounding and the budget ledger.

The noise comes from OpenDP (``opendp``; its ``contrib`` features): the discrete Laplace
mechanism (``make_laplace`` over integer vectors) for counts and sums, the Laplace
threshold mechanism (``make_laplace_threshold``) for partition selection and the
private quantile (``make_private_quantile``, permute-and-flip over candidates). Each
measurement's privacy map is evaluated by OpenDP and checked against the epsilon charged
before it runs. What is computed here, and argued in ``docs/privacy.md``:

* **Contribution bounding.** At most ``max_rows_per_unit`` rows of one privacy unit reach
  an aggregate (the first ones in plan order), so adding or removing one individual changes
  a count vector by at most ``k`` in L1, touches at most ``k`` groups, and changes the row
  multiset behind each group by at most ``k`` rows in total.
* **Exact sums on a grid.** Every summed value is clamped to the owner's bounds and rounded
  to a fixed grid of integers (``step`` = bound / 2^q, q chosen from the dataset's public row
  count so that every partial sum is exact in float64). Sums are then exact integers and the
  discrete Laplace mechanism applies without floating-point sensitivity surprises.
* **Derived statistics** (mean, variance, standard deviation) are post-processing of noisy
  count, sum and sum of squares; their 95% accuracy is a union bound over the parts.

The budget: every query writes a reservation (its epsilon and delta) to sealed storage
*before* it reads the data, then lists all reservations of the dataset and withdraws its own
if the analyst's total or the cap over all analysts would be exceeded. Entries are immutable
and written before the check, so two workers racing on one ledger can both be refused but
never both pass the cap (see :class:`BudgetLedger`).

Why this module is over ~500 lines: the DP release: the OpenDP mechanisms per statistic, their accuracy bounds, and
the sealed budget ledger they charge.
"""

from __future__ import annotations

import functools
import json
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd

from mesatee_notebook.errors import NotFound, PolicyViolation
from mesatee_notebook.wire.datapolicy import DP

__all__ = [
    "ALPHA",
    "BudgetLedger",
    "BudgetStatus",
    "LedgerStore",
    "MemoryLedgerStore",
    "Released",
    "bound_contributions",
    "dp_aggregate",
    "laplace_scale",
]

#: Every accuracy is reported at 1 - ALPHA = 95%.
ALPHA = 0.05
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
_TOL = 1e-9  # relative slack when comparing float epsilons (sums of 0.1s)
QUANTILE_CANDIDATES = 1025
_FLOAT_EXACT = 2.0**52


@functools.cache
def _opendp() -> Any:
    try:
        import opendp.prelude as dp
    except ModuleNotFoundError:
        msg = (
            "this kernel cannot release DP results: OpenDP is not installed in the enclave "
            "(install mesatee_notebook[dp]); nothing was released or charged"
        )
        raise PolicyViolation(msg, rule="dp") from None

    dp.enable_features("contrib")  # OpenDP's non-vetted (contrib) mechanisms; see docs/privacy.md
    return dp


# ---------------------------------------------------------------------------
# Mechanisms


@dataclass(frozen=True, slots=True)
class Released:
    """One released statistic (a column of a table, or a scalar) and how it was made."""

    values: FloatArray | IntArray
    accuracy: FloatArray
    mechanism: str
    epsilon: float
    delta: float
    accuracy_unit: str = "value"  # "value": |released - true| <= accuracy; "rank": rank error in rows
    details: dict[str, Any] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        """The public description that travels in the receipt's info."""
        return {
            "mechanism": self.mechanism,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "confidence": 1 - ALPHA,
            "accuracy_unit": self.accuracy_unit,
            **self.details,
        }


def laplace_scale(sensitivity: float, epsilon: float) -> float:
    """The discrete Laplace scale for ``epsilon`` at L1 ``sensitivity`` (the formula b = Δ/ε)."""
    return sensitivity / epsilon


@functools.lru_cache(maxsize=256)
def _laplace_measurement(sensitivity: int, epsilon: float) -> tuple[Any, float]:
    dp = _opendp()
    space = dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.l1_distance(T=dp.i64)
    scale = laplace_scale(sensitivity, epsilon)
    meas = dp.m.make_laplace(*space, scale=scale)
    while meas.map(sensitivity) > epsilon:  # float rounding of Δ/ε: nudge the scale up until OpenDP agrees
        scale = float(np.nextafter(scale, math.inf))
        meas = dp.m.make_laplace(*space, scale=scale)
    return meas, scale


def _integer_laplace(values: IntArray, sensitivity: int, epsilon: float) -> tuple[IntArray, float]:
    """Add discrete Laplace noise (OpenDP) to an integer vector whose L1 sensitivity is ``sensitivity``."""
    meas, scale = _laplace_measurement(int(sensitivity), float(epsilon))
    if len(values) == 0:
        return values.astype(np.int64), scale
    return np.asarray(meas([int(v) for v in values]), dtype=np.int64), scale


def _laplace_accuracy(scale: float, alpha: float) -> float:
    return float(_opendp().discrete_laplacian_scale_to_accuracy(scale, alpha))


def noisy_count(counts: IntArray, k: int, epsilon: float, alpha: float = ALPHA) -> tuple[IntArray, float, float]:
    """Noisy counts (L1 sensitivity ``k``): (values, scale, accuracy at ``1 - alpha``)."""
    noisy, scale = _integer_laplace(counts, k, epsilon)
    return noisy, scale, _laplace_accuracy(scale, alpha)


@dataclass(frozen=True, slots=True)
class _Grid:
    """Values are clamped to [lo, hi], shifted by ``offset`` and rounded to multiples of ``step``."""

    lo: float
    hi: float
    offset: float
    step: float
    qmax: int


def _grid(lo: float, hi: float, *, centered: bool, n_max: int, integral: bool) -> _Grid:
    offset = (lo + hi) / 2 if centered else 0.0
    mag = max(abs(lo - offset), abs(hi - offset))
    levels = 2 ** math.floor(math.log2(_FLOAT_EXACT / max(n_max, 1)))
    levels = int(min(max(levels, 2**8), 2**40))
    if integral and not centered and mag <= levels:
        return _Grid(lo, hi, offset, 1.0, math.ceil(mag))
    return _Grid(lo, hi, offset, mag / levels, levels)


def noisy_sum(
    exact: IntArray, grid: _Grid, k: int, epsilon: float, alpha: float = ALPHA
) -> tuple[FloatArray, float, float]:
    """Noisy per-group sums from exact grid sums (``_Column.sums``): (values, scale in value units, accuracy)."""
    noisy, scale = _integer_laplace(exact, k * grid.qmax, epsilon)
    return noisy.astype(np.float64) * grid.step, scale * grid.step, _laplace_accuracy(scale, alpha) * grid.step


@functools.lru_cache(maxsize=64)
def _quantile_measurement(alpha_q: float, lo: float, hi: float, k: int, epsilon: float) -> tuple[Any, float]:
    dp = _opendp()
    candidates = np.linspace(lo, hi, QUANTILE_CANDIDATES).tolist()

    def make(scale: float) -> Any:
        return dp.m.make_private_quantile(
            dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.symmetric_distance(), dp.max_divergence(),
            candidates=candidates, alpha=alpha_q, scale=scale,
        )  # fmt: skip

    scale = float(make(1.0).map(k)) / epsilon  # the map is linear in 1/scale
    meas = make(scale)
    while meas.map(k) > epsilon:
        scale = float(np.nextafter(scale, math.inf))
        meas = make(scale)
    return meas, scale


def private_quantile(
    x: FloatArray, alpha_q: float, lo: float, hi: float, k: int, epsilon: float
) -> tuple[float, float, float]:
    """One private quantile (OpenDP ``make_private_quantile``): (value, scale, rank accuracy at 95%)."""
    meas, scale = _quantile_measurement(alpha_q, lo, hi, k, epsilon)
    value = float(meas(np.clip(x, lo, hi).tolist()))
    # permute-and-flip is no worse than the exponential mechanism: the rank of the released candidate is
    # within (2k/eps) * ln(|candidates| / alpha) rows of the target rank (plus one grid step) at 1 - alpha.
    rank = 2 * k / epsilon * math.log(QUANTILE_CANDIDATES / ALPHA)
    return value, scale, rank


def threshold_select(counts: IntArray, k: int, epsilon: float, delta: float) -> tuple[IntArray, IntArray, float, int]:
    """DP partition selection (OpenDP ``make_laplace_threshold``): (kept group codes, noisy counts, scale, threshold).

    ``counts`` are the exact row counts of the groups present; a unit touches at most ``k`` groups
    with at most ``k`` rows in total.
    """
    meas, scale, threshold = _threshold_measurement(k, epsilon, delta)
    out: dict[int, int] = meas({i: int(c) for i, c in enumerate(counts) if c > 0})
    kept = np.asarray(sorted(out), dtype=np.int64)
    return kept, np.asarray([out[int(i)] for i in kept], dtype=np.int64), scale, threshold


@functools.lru_cache(maxsize=64)
def _threshold_measurement(k: int, epsilon: float, delta: float) -> tuple[Any, float, int]:
    dp = _opendp()
    domain = dp.map_domain(dp.atom_domain(T=dp.i64), dp.atom_domain(T=dp.i64))
    metric = dp.l01inf_distance(dp.absolute_distance(T=dp.i64))
    d_in = (k, k, k)
    scale = laplace_scale(k, epsilon)

    def make(s: float, t: int) -> Any:
        return dp.m.make_laplace_threshold(domain, metric, scale=s, threshold=t)

    while make(scale, 1 << 40).map(d_in)[0] > epsilon:
        scale = float(np.nextafter(scale, math.inf))
    lo, hi = 1, 1 << 40  # the smallest threshold whose delta fits, by OpenDP's own privacy map
    while lo < hi:
        mid = (lo + hi) // 2
        if make(scale, mid).map(d_in)[1] <= delta:
            hi = mid
        else:
            lo = mid + 1
    return make(scale, lo), scale, lo


# ---------------------------------------------------------------------------
# Contribution bounding


def bound_contributions(units: npt.NDArray[Any], k: int) -> npt.NDArray[np.bool_]:
    """Keep the first ``k`` rows of each privacy unit (missing unit ids are one unit)."""
    codes, _ = pd.factorize(units, use_na_sentinel=False)
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
    rank = np.arange(len(codes)) - np.repeat(starts, np.diff(np.r_[starts, len(codes)]))
    keep = np.empty(len(codes), dtype=bool)
    keep[order] = rank < k
    return keep


# ---------------------------------------------------------------------------
# The aggregate


_QUANTILE_FUNCS = {"median": 0.5, **{f"p{i}": i / 100 for i in range(1, 100)}}
#: measurement slots of each function: the query's epsilon is split evenly over them.
_SLOTS = {"size": 1, "count": 1, "sum": 1, "mean": 2, "var": 3, "std": 3, **dict.fromkeys(_QUANTILE_FUNCS, 1)}
DP_FUNCS = frozenset(_SLOTS)


def slots_needed(funcs: Sequence[str], *, selection: bool) -> int:
    """How many parts the query's epsilon is split into (partition selection also gives the group sizes)."""
    n = sum(_SLOTS[f] for f in funcs if not (selection and f == "size"))
    return n + (1 if selection else 0)


@dataclass(slots=True)
class Aggregated:
    """Noisy columns over the released groups (``keep``: indices into the exact groups)."""

    columns: dict[str, Released]
    keep: IntArray
    selection: dict[str, Any] | None


def dp_aggregate(
    frame: pd.DataFrame,
    codes: IntArray,
    n_groups: int,
    aggs: Sequence[tuple[str, str | None, str]],
    policy: DP,
    epsilon: float,
    delta: float,
    *,
    select: bool,
    n_max: int,
) -> Aggregated:
    """Release ``aggs`` per group (``codes``: group of each row, -1 = none) under ``epsilon``/``delta``.

    ``select``: the group keys are not public, so they pass DP partition selection first.
    ``n_max`` bounds the rows of any aggregate (k times the dataset's public row count).
    """
    k = policy.max_rows_per_unit
    funcs = [f for _, _, f in aggs]
    eps = epsilon / slots_needed(funcs, selection=select)
    in_group = codes >= 0
    if not in_group.all():
        frame, codes = frame[in_group], codes[in_group]
    sizes = np.bincount(codes, minlength=n_groups).astype(np.int64)
    selection: dict[str, Any] | None = None
    keep = np.arange(n_groups, dtype=np.int64)
    size_release: Released | None = None
    if select:
        keep, noisy, scale, threshold = threshold_select(sizes, k, eps, delta)
        acc = _laplace_accuracy(scale, ALPHA)
        size_release = Released(
            noisy, np.full(len(keep), acc), "laplace threshold (OpenDP make_laplace_threshold)", eps, delta,
            details={"scale": scale, "threshold": threshold},
        )  # fmt: skip
        selection = {
            "mechanism": size_release.mechanism,
            "epsilon": eps,
            "delta": delta,
            "threshold": threshold,
            "scale": scale,
            "groups_released": len(keep),
        }
        remap = np.full(n_groups, -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        codes = remap[codes]
        ok = codes >= 0
        if not ok.all():
            frame, codes = frame[ok], codes[ok]
        n_groups = len(keep)
        sizes = np.bincount(codes, minlength=n_groups).astype(np.int64)
    out: dict[str, Released] = {}
    counts_cache: dict[str | None, Any] = {None: {c for _, c, f in aggs if f in ("var", "std")}}
    for name, col, func in aggs:
        if func == "size" and size_release is not None:
            out[name] = size_release
            continue
        out[name] = _one(frame, codes, n_groups, sizes, col, func, policy, eps, k, n_max, counts_cache)
    return Aggregated(out, keep, selection)


def _bounds(policy: DP, col: str | None, dtype: Any) -> tuple[float, float, bool]:
    if pd.api.types.is_bool_dtype(dtype):
        return 0.0, 1.0, True
    assert col is not None
    lo, hi = policy.bounds[col]
    return lo, hi, pd.api.types.is_integer_dtype(dtype) and float(lo).is_integer() and float(hi).is_integer()


_CHUNK = 1 << 16  # rows per pass: the clamp/shift/round/bincount pipeline stays in the CPU cache


class _Column:
    """One aggregated column's non-missing values and their exact per-group counts and sums (computed once)."""

    def __init__(self, frame: pd.DataFrame, codes: IntArray, n_groups: int, col: str, *, squares: bool) -> None:
        self.series = frame[col]
        self.dtype = self.series.dtype
        self._notna = self.series.notna().to_numpy()
        self.codes = codes if self._notna.all() else codes[self._notna]
        self.n_groups = n_groups
        self.squares = squares  # a var/std of this column is asked for: compute the squares in the same pass
        self._x: FloatArray | None = None
        self._counts: IntArray | None = None
        self._sums: dict[_Grid, IntArray] = {}

    @property
    def x(self) -> FloatArray:
        """The non-missing values as float64 (numeric and boolean columns only; counts never need them)."""
        if self._x is None:
            x = self.series.to_numpy(dtype=np.float64, na_value=np.nan)
            self._x = x if self._notna.all() else x[self._notna]
        return self._x

    @property
    def counts(self) -> IntArray:
        if self._counts is None:
            self._counts = np.bincount(self.codes, minlength=self.n_groups).astype(np.int64)
        return self._counts

    def sums(self, grid: _Grid, sq_grid: _Grid | None = None) -> IntArray:
        """Exact per-group sums on ``grid``; with ``sq_grid`` also of the squares of the shifted values.

        Every partial sum is an integer below 2^52, so the float64 accumulation is exact.
        """
        if grid in self._sums and (sq_grid is None or sq_grid in self._sums):
            return self._sums[grid]
        x, codes, g = self.x, self.codes, self.n_groups
        s1 = np.zeros(g)
        s2 = np.zeros(g) if sq_grid is not None else None
        inv = 1.0 / grid.step
        for i in range(0, len(x), _CHUNK):
            c = codes[i : i + _CHUNK]
            y = np.clip(x[i : i + _CHUNK], grid.lo, grid.hi)
            if grid.offset:
                y -= grid.offset
            if sq_grid is not None and s2 is not None:
                z = y * y
                z -= -sq_grid.lo  # squares shifted to [-h^2/2, h^2/2]: sq_grid.lo = -h^2/2
                z *= 1.0 / sq_grid.step
                np.rint(z, out=z)
                s2 += np.bincount(c, weights=z, minlength=g)
            if grid.step != 1.0:
                y *= inv
                np.rint(y, out=y)
            s1 += np.bincount(c, weights=y, minlength=g)
        self._sums[grid] = np.rint(s1).astype(np.int64)
        if sq_grid is not None and s2 is not None:
            self._sums[sq_grid] = np.rint(s2).astype(np.int64)
        return self._sums[grid]


def _one(
    frame: pd.DataFrame,
    codes: IntArray,
    n_groups: int,
    sizes: IntArray,
    col: str | None,
    func: str,
    policy: DP,
    eps: float,
    k: int,
    n_max: int,
    cache: dict[str | None, Any],
) -> Released:
    if func == "size":
        return _released_count(sizes, n_groups, k, eps)
    assert col is not None
    column = cache.get(col)
    if column is None:
        column = cache[col] = _Column(frame, codes, n_groups, col, squares=col in cache.get(None, ()))
    if func == "count":
        return _released_count(column.counts, n_groups, k, eps)
    lo, hi, integral = _bounds(policy, col, column.dtype)
    if func == "sum":
        return _released_sum(column, n_groups, lo, hi, integral, k, eps, n_max)
    if func in _QUANTILE_FUNCS:
        return _released_quantile(column, n_groups, _QUANTILE_FUNCS[func], lo, hi, k, eps)
    return _released_moments(column, func, n_groups, lo, hi, k, eps, n_max)


_LAPLACE = "discrete laplace (OpenDP make_laplace)"


def _released_count(counts: IntArray, n_groups: int, k: int, eps: float) -> Released:
    noisy, scale, acc = noisy_count(counts, k, eps)
    return Released(
        np.maximum(noisy, 0), np.full(n_groups, acc), _LAPLACE, eps, 0.0, details={"scale": scale, "sensitivity": k}
    )


def _released_sum(
    column: _Column, n_groups: int, lo: float, hi: float, integral: bool, k: int, eps: float, n_max: int
) -> Released:
    grid = _grid(lo, hi, centered=False, n_max=n_max, integral=integral)
    sums, scale, acc = noisy_sum(column.sums(grid), grid, k, eps)
    acc += n_max * grid.step / 2 if grid.step != 1.0 else 0.0  # worst-case rounding to the grid
    values: Any = np.rint(sums).astype(np.int64) if grid.step == 1.0 else sums
    return Released(
        values,
        np.full(n_groups, acc),
        _LAPLACE,
        eps,
        0.0,
        details={"scale": scale, "sensitivity": k * grid.qmax * grid.step, "bounds": [lo, hi]},
    )


def _released_quantile(column: _Column, n_groups: int, a: float, lo: float, hi: float, k: int, eps: float) -> Released:
    vals = np.empty(n_groups)
    rank = 0.0
    scale = 0.0
    order = np.argsort(column.codes, kind="stable")
    bounds_ = np.r_[0, np.cumsum(column.counts)]
    xs = column.x[order]
    for g in range(n_groups):
        vals[g], scale, rank = private_quantile(xs[bounds_[g] : bounds_[g + 1]], a, lo, hi, k, eps)
    return Released(
        vals,
        np.full(n_groups, rank),
        "private quantile (OpenDP make_private_quantile)",
        eps,
        0.0,
        "rank",
        details={
            "scale": scale,
            "quantile": a,
            "candidates": QUANTILE_CANDIDATES,
            "grid_step": (hi - lo) / (QUANTILE_CANDIDATES - 1),
            "bounds": [lo, hi],
        },
    )


def _released_moments(
    column: _Column, func: str, n_groups: int, lo: float, hi: float, k: int, eps: float, n_max: int
) -> Released:
    """mean, var, std: noisy count, centered sum (and sum of squares) at alpha split over the parts."""
    clamp = {"bounds": [lo, hi]}
    parts = 2 if func == "mean" else 3
    a_part = ALPHA / parts
    n_noisy, _, acc_n = noisy_count(column.counts, k, eps, a_part)
    cnt = np.maximum(n_noisy.astype(np.float64), 1.0)
    grid = _grid(lo, hi, centered=True, n_max=n_max, integral=False)
    half = (hi - lo) / 2
    sq_grid = _grid(-(half**2) / 2, half**2 / 2, centered=False, n_max=n_max, integral=False)
    s, _, acc_s = noisy_sum(column.sums(grid, sq_grid if column.squares else None), grid, k, eps, a_part)
    acc_s += n_max * grid.step / 2
    mid = grid.offset
    mean_c = np.clip(s / cnt, -half, half)  # centered mean, clamped to the bounds (post-processing)
    acc_mean = np.minimum((acc_s + half * acc_n) / cnt, hi - lo)
    if func == "mean":
        return Released(
            mid + mean_c,
            acc_mean,
            _LAPLACE,
            eps * 2,
            0.0,
            details={"parts": "noisy count and noisy centered sum, eps/2 each", **clamp},
        )
    column.sums(grid, sq_grid)
    q, _, acc_q = noisy_sum(column._sums[sq_grid], sq_grid, k, eps, a_part)
    acc_q += n_max * sq_grid.step / 2
    q = q + half**2 / 2 * n_noisy  # sum of squares (about the midpoint), using the noisy count
    second = np.clip(q / cnt, 0.0, half**2)
    var = np.clip(second - mean_c**2, 0.0, half**2)
    # a rigorous interval: Q/C within [(Q-aq)/(C+an), (Q+aq)/(C-an)], mean within acc_mean
    c_lo = np.maximum(n_noisy - acc_n, 1.0)
    sec_lo = np.maximum(q - acc_q - half**2 / 2 * acc_n, 0.0) / (n_noisy + acc_n).clip(1.0)
    sec_hi = (q + acc_q + half**2 / 2 * acc_n) / c_lo
    m_abs = np.abs(mean_c)
    m2_lo = np.maximum(m_abs - acc_mean, 0.0) ** 2
    m2_hi = np.minimum(m_abs + acc_mean, half) ** 2
    v_lo = np.clip(sec_lo - m2_hi, 0.0, half**2)
    v_hi = np.clip(sec_hi - m2_lo, 0.0, half**2)
    details = {"parts": "noisy count, centered sum and sum of squares, eps/3 each", "ddof": 0, **clamp}
    if func == "var":
        return Released(var, np.maximum(var - v_lo, v_hi - var), _LAPLACE, eps * 3, 0.0, details=details)
    std = np.sqrt(var)
    return Released(std, np.maximum(std - np.sqrt(v_lo), np.sqrt(v_hi) - std), _LAPLACE, eps * 3, 0.0, details=details)


# ---------------------------------------------------------------------------
# The budget ledger


class LedgerStore(Protocol):
    """Where the ledger keeps its entries (the service worker's sealed storage in the kernel)."""

    def put(self, name: str, data: bytes) -> None: ...

    def get(self, name: str) -> bytes: ...

    def list(self, prefix: str) -> list[str]: ...

    def delete(self, name: str) -> None: ...


class MemoryLedgerStore:
    """An in-process ledger store (tests, the in-process evaluator)."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, name: str, data: bytes) -> None:
        with self._lock:
            self._data[name] = bytes(data)

    def get(self, name: str) -> bytes:
        with self._lock:
            try:
                return self._data[name]
            except KeyError:
                msg = f"no ledger entry {name!r}"
                raise NotFound(msg) from None

    def list(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(n for n in self._data if n.startswith(prefix))

    def delete(self, name: str) -> None:
        with self._lock:
            if self._data.pop(name, None) is None:
                msg = f"no ledger entry {name!r}"
                raise NotFound(msg)


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """What one analyst has spent of a dataset's budget (and all analysts together, when capped)."""

    dataset: str
    epsilon_spent: float
    delta_spent: float
    epsilon_total: float
    delta_total: float
    queries: int
    all_epsilon_spent: float | None = None
    all_delta_spent: float | None = None
    all_epsilon_total: float | None = None
    all_delta_total: float | None = None

    @property
    def epsilon_remaining(self) -> float:
        own = max(self.epsilon_total - self.epsilon_spent, 0.0)
        if self.all_epsilon_total is not None and self.all_epsilon_spent is not None:
            own = min(own, max(self.all_epsilon_total - self.all_epsilon_spent, 0.0))
        return own

    @property
    def delta_remaining(self) -> float:
        own = max(self.delta_total - self.delta_spent, 0.0)
        if self.all_delta_total is not None and self.all_delta_spent is not None:
            own = min(own, max(self.all_delta_total - self.all_delta_spent, 0.0))
        return own

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "epsilon_spent": self.epsilon_spent,
            "epsilon_total": self.epsilon_total,
            "epsilon_remaining": self.epsilon_remaining,
            "delta_spent": self.delta_spent,
            "delta_total": self.delta_total,
            "delta_remaining": self.delta_remaining,
            "queries": self.queries,
        }
        if self.all_epsilon_total is not None or self.all_delta_total is not None:
            out["all_analysts"] = {
                "epsilon_spent": self.all_epsilon_spent,
                "epsilon_total": self.all_epsilon_total,
                "delta_spent": self.all_delta_spent,
                "delta_total": self.all_delta_total,
            }
        return out


def _over(spent: float, total: float) -> bool:
    return spent > total * (1 + _TOL) + 1e-300


class BudgetLedger:
    """Spent privacy budget per (party, dataset), one immutable sealed entry per query.

    Entry ``dp/<dataset>/<party>/<time>-<random>`` holds ``{epsilon, delta, plan_sha256, time}``.
    :meth:`charge` is *write, then verify*: it writes the query's entry, lists every entry of
    the dataset, and deletes its own entry and refuses if a total would be exceeded. Two
    chargers that interleave both see each other's entry at least on the later list, so
    they cannot both pass a cap (both may be refused, which is safe). A charge survives a
    worker death: it is written before the data is read, and never refunded.
    """

    def __init__(self, store: LedgerStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._cache: dict[str, tuple[float, float]] = {}  # entries are immutable: name -> (epsilon, delta)
        self._lock = threading.Lock()

    @staticmethod
    def _prefix(dataset: str) -> str:
        return f"dp/{dataset}/"

    def _totals(self, dataset: str, party: str) -> tuple[float, float, int, float, float]:
        names = self._store.list(self._prefix(dataset))
        own_e: list[float] = []
        own_d: list[float] = []
        all_e: list[float] = []
        all_d: list[float] = []
        for name in names:
            amounts = self._cache.get(name)
            if amounts is None:
                try:
                    entry = json.loads(self._store.get(name))
                except NotFound:
                    continue  # withdrawn while we listed
                amounts = (float(entry["epsilon"]), float(entry["delta"]))
                self._cache[name] = amounts
            all_e.append(amounts[0])
            all_d.append(amounts[1])
            if name.split("/")[2] == party:
                own_e.append(amounts[0])
                own_d.append(amounts[1])
        return math.fsum(own_e), math.fsum(own_d), len(own_e), math.fsum(all_e), math.fsum(all_d)

    def status(self, dataset: str, party: str, policy: DP) -> BudgetStatus:
        """The budget of ``party`` on ``dataset`` as recorded now."""
        with self._lock:
            e, d, n, ae, ad = self._totals(dataset, party)
        return self._status(dataset, policy, e, d, n, ae, ad)

    @staticmethod
    def _status(dataset: str, policy: DP, e: float, d: float, n: int, ae: float, ad: float) -> BudgetStatus:
        capped = policy.total_epsilon is not None or policy.total_delta is not None
        return BudgetStatus(
            dataset, e, d, policy.epsilon, policy.delta, n,
            ae if capped else None, ad if capped else None,
            (policy.total_epsilon if policy.total_epsilon is not None else math.inf) if capped else None,
            (policy.total_delta if policy.total_delta is not None else math.inf) if capped else None,
        )  # fmt: skip

    def _refusal(
        self, dataset: str, policy: DP, e: float, d: float, ae: float, ad: float, epsilon: float, delta: float
    ) -> PolicyViolation | None:
        if _over(e + epsilon, policy.epsilon) or _over(d + delta, policy.delta):
            msg = (
                f"privacy budget exhausted for dataset {dataset!r}: you have spent epsilon {e:.6g} of "
                f"{policy.epsilon:.6g} (delta {d:.3g} of {policy.delta:.3g}); this query asks for epsilon "
                f"{epsilon:.6g}, delta {delta:.3g}"
            )
            return PolicyViolation(
                msg,
                dataset=dataset,
                rule="privacy_budget",
                epsilon_spent=e,
                epsilon_remaining=max(policy.epsilon - e, 0.0),
            )
        te, td = policy.total_epsilon, policy.total_delta
        if (te is not None and _over(ae + epsilon, te)) or (td is not None and _over(ad + delta, td)):
            msg = (
                f"privacy budget exhausted for dataset {dataset!r}: all analysts together have spent epsilon "
                f"{ae:.6g} of the owner's cap {te if te is not None else math.inf:.6g} "
                f"(delta {ad:.3g} of {td if td is not None else math.inf:.3g}); this query asks for epsilon "
                f"{epsilon:.6g}, delta {delta:.3g}"
            )
            return PolicyViolation(msg, dataset=dataset, rule="privacy_budget_cap", all_epsilon_spent=ae)
        return None

    def charge(
        self, dataset: str, party: str, policy: DP, epsilon: float, delta: float, note: Mapping[str, Any] | None = None
    ) -> BudgetStatus:
        """Record ``epsilon``/``delta`` spent by ``party``; ``PolicyViolation`` if a budget would be exceeded."""
        with self._lock:
            e, d, _n, ae, ad = self._totals(dataset, party)
            refused = self._refusal(dataset, policy, e, d, ae, ad, epsilon, delta)
            if refused is not None:
                raise refused
            now = self._clock()
            name = f"{self._prefix(dataset)}{party}/{int(now * 1e9):020d}-{secrets.token_hex(8)}"
            entry = {"epsilon": epsilon, "delta": delta, "time": now, **(note or {})}
            self._store.put(name, json.dumps(entry, sort_keys=True).encode())
            self._cache[name] = (epsilon, delta)
            e2, d2, n2, ae2, ad2 = self._totals(dataset, party)  # verify after writing (see the class doc)
            refused = self._refusal(
                dataset, policy, e2 - epsilon, d2 - delta, ae2 - epsilon, ad2 - delta, epsilon, delta
            )
            if refused is not None:
                self._store.delete(name)
                self._cache.pop(name, None)
                raise refused
            return self._status(dataset, policy, e2, d2, n2, ae2, ad2)
