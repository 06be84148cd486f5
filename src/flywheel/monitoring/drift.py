"""Fast drift verdicts from precomputed reference statistics, with Evidently's own tests.

Evidently's DataDriftPreset (reference over 1,000 rows) applies, per column: the normed
Wasserstein distance to numeric columns with more than 5 distinct values, and the Jensen-Shannon
distance to categorical and low-cardinality numeric columns; a column drifts when the distance
reaches 0.1, the dataset when at least half its columns drift. It recomputes everything from the
raw reference each time. Here the reference is summarised once, at training time, into a profile:
1,000 quantiles and the standard deviation of each numeric column, the category shares of the
others. A window then costs one sort per numeric column and one count per categorical column:
- Wasserstein-1 between two 1-D distributions is the mean absolute difference of their quantile
  functions, so it is computed from 1,000 quantiles of each side (error about range / 1,000);
- Jensen-Shannon is taken over the shares of each distinct value (natural log), as Evidently does.
Evidently picks the test from the distinct values of reference and current together; the profile
knows only the reference, so a column with at most 5 distinct reference values keeps the
Jensen-Shannon test even if new values appear (they count as shares the reference lacks).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

QUANTILES = 1000
PROBS = (np.arange(QUANTILES) + 0.5) / QUANTILES
LOW_CARDINALITY = 5
MIN_NORM = 0.001  # Evidently divides the Wasserstein distance by max(std, 0.001)

ColumnKind = Literal["numeric", "categorical"]


@dataclass(frozen=True)
class ColumnProfile:
    """What drift detection needs to know about one reference column."""

    name: str
    kind: ColumnKind
    stattest: Literal["wasserstein", "jensenshannon"]
    rows: int
    quantiles: list[float] | None = None
    std: float | None = None
    shares: dict[str, float] | None = None


@dataclass(frozen=True)
class ReferenceProfile:
    columns: list[ColumnProfile]
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "columns": [asdict(c) for c in self.columns]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReferenceProfile:
        return cls([ColumnProfile(**c) for c in data["columns"]], int(data["rows"]))

    def column(self, name: str) -> ColumnProfile:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    stattest: str
    score: float
    threshold: float
    drifted: bool


@dataclass(frozen=True)
class DriftResult:
    columns: list[ColumnDrift]
    rows: int
    share: float
    detected: bool
    share_threshold: float
    notes: list[str] = field(default_factory=list)

    @property
    def drifted_columns(self) -> list[str]:
        return [c.column for c in self.columns if c.drifted]


def _values(series: pd.Series) -> np.ndarray:
    if series.dtype.kind == "f":  # a mask, not pandas' dropna (a tenth of the time at 1M rows)
        values = series.to_numpy()
        missing = np.isnan(values)
        return values[~missing] if missing.any() else values
    return series.dropna().to_numpy()


def quantiles_of(values: np.ndarray, probs: np.ndarray = PROBS) -> np.ndarray:
    """np.quantile's default (linear) quantiles of `values` (no NaN) at `probs`, by one sort: for
    1,000 probabilities numpy partitions around 2,000 points, a third slower than sorting."""
    ordered = np.sort(values.astype(np.float64, copy=False))
    at = probs * (len(ordered) - 1)
    low = np.floor(at).astype(np.int64)
    high = np.minimum(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def _series_shares(series: pd.Series) -> dict[str, float]:
    counts = series.value_counts(dropna=True)  # hashing, not sorting: the fast path for 1M rows
    total = counts.sum()
    return {_key(k): float(v / total) for k, v in counts.items()} if total else {}


def _key(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def profile_column(name: str, series: pd.Series, categorical: bool) -> ColumnProfile:
    values = _values(series)
    numeric = not categorical and pd.api.types.is_numeric_dtype(series.dtype)
    if numeric and len(np.unique(values)) > LOW_CARDINALITY:
        v = values.astype(np.float64)
        return ColumnProfile(name, "numeric", "wasserstein", len(v),
                             quantiles=quantiles_of(v).tolist(), std=float(np.std(v)))
    return ColumnProfile(name, "numeric" if numeric else "categorical", "jensenshannon", len(values),
                         shares=_series_shares(series))


def build_profile(frame: pd.DataFrame, categorical: list[str] | tuple[str, ...] = ()) -> ReferenceProfile:
    """Summarise a reference frame once; every later window is compared with this."""
    cols = [profile_column(str(c), frame[c], str(c) in categorical) for c in frame.columns]
    return ReferenceProfile(cols, len(frame))


def wasserstein_from_quantiles(ref_q: np.ndarray, cur_q: np.ndarray) -> float:
    return float(np.mean(np.abs(ref_q - cur_q)))


def jensenshannon(ref: dict[str, float], cur: dict[str, float]) -> float:
    keys = sorted(set(ref) | set(cur))
    p = np.array([ref.get(k, 0.0) for k in keys])
    q = np.array([cur.get(k, 0.0) for k in keys])
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log(p / m), 0.0)
        kl_q = np.where(q > 0, q * np.log(q / m), 0.0)
    js = 0.5 * np.sum(kl_p) + 0.5 * np.sum(kl_q)
    return float(math.sqrt(max(js, 0.0)))


def column_drift(ref: ColumnProfile, series: pd.Series, threshold: float) -> ColumnDrift:
    values = _values(series)
    if len(values) == 0:
        return ColumnDrift(ref.name, ref.stattest, float("nan"), threshold, False)
    if ref.stattest == "wasserstein":
        assert ref.quantiles is not None and ref.std is not None
        cur_q = quantiles_of(values)
        distance = wasserstein_from_quantiles(np.asarray(ref.quantiles), cur_q)
        score = distance / max(ref.std, MIN_NORM)
    else:
        assert ref.shares is not None
        score = jensenshannon(ref.shares, _series_shares(series))
    return ColumnDrift(ref.name, ref.stattest, score, threshold, bool(score >= threshold))


def detect_drift(profile: ReferenceProfile, current: pd.DataFrame, threshold: float = 0.1,
                 share_threshold: float = 0.5, columns: list[str] | None = None) -> DriftResult:
    """Per-column verdicts and the dataset verdict (share of drifted columns >= share_threshold)."""
    names = columns or [c.name for c in profile.columns]
    missing = [n for n in names if n not in current.columns]
    if missing:
        raise ValueError(f"current window lacks column(s) {', '.join(missing)}")
    results = [column_drift(profile.column(n), current[n], threshold) for n in names]
    share = sum(r.drifted for r in results) / len(results) if results else 0.0
    return DriftResult(results, len(current), share, share >= share_threshold, share_threshold)
