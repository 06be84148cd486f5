"""Data checks run before every training: shape, target balance, nulls, and the leakage screen."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score

from flywheel.config import ChecksConfig
from flywheel.core.errors import FlywheelError

# Exact values are target-encoded when a feature has at most this many; else quantile bins.
_MAX_EXACT_VALUES = 512
_QUANTILE_BINS = 64
_PRIOR_WEIGHT = 20.0


class DataCheckError(FlywheelError):
    """Training data failed a check; the message lists every failure and how to proceed."""


@dataclass(frozen=True)
class DataCheckReport:
    rows: int
    positive_rate: float
    null_fraction: dict[str, float]
    standalone_auc: dict[str, float]
    failures: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def standalone_auc(x: np.ndarray, y: np.ndarray) -> float:
    """How well one feature alone ranks the target, measured out of sample.

    The feature's values (exact values, or quantile bins for continuous features, with missing
    values as their own group) are target-encoded on every other row and scored on the rest, both
    ways round. This catches non-monotone leaks such as SBA's `Term` (charged-off loans carry the
    months they actually ran), which a plain AUC of the raw value would understate.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keys = _group_keys(x)
    halves = np.arange(len(x)) % 2 == 0
    aucs = []
    for fit, score in ((halves, ~halves), (~halves, halves)):
        if len(np.unique(y[score])) < 2:
            continue
        encoded = _target_encode(keys[fit], y[fit], keys[score])
        aucs.append(roc_auc_score(y[score], encoded))
    return float(np.mean(aucs)) if aucs else 0.5


def _group_keys(x: np.ndarray) -> np.ndarray:
    finite = ~np.isnan(x)
    values = np.unique(x[finite])
    keys = np.full(len(x), -1, dtype=np.int64)  # -1: missing
    if len(values) <= _MAX_EXACT_VALUES:
        keys[finite] = np.searchsorted(values, x[finite])
    else:
        edges = np.unique(np.quantile(x[finite], np.linspace(0, 1, _QUANTILE_BINS + 1)[1:-1]))
        keys[finite] = np.searchsorted(edges, x[finite], side="right")
    return keys


def _target_encode(fit_keys: np.ndarray, fit_y: np.ndarray, score_keys: np.ndarray) -> np.ndarray:
    prior = fit_y.mean()
    shift = 1  # keys start at -1
    sums = np.bincount(fit_keys + shift, weights=fit_y)
    counts = np.bincount(fit_keys + shift)
    rates = (sums + _PRIOR_WEIGHT * prior) / (counts + _PRIOR_WEIGHT)
    idx = score_keys + shift
    known = idx < len(rates)
    out = np.full(len(score_keys), prior)
    out[known] = rates[idx[known]]
    return out


def run_data_checks(
    matrix: np.ndarray, y: np.ndarray, names: list[str], checks: ChecksConfig
) -> DataCheckReport:
    """Every check over the feature matrix of the training window; failures are collected."""
    failures: list[str] = []
    rows = len(y)
    positive_rate = float(np.mean(y)) if rows else float("nan")
    if rows < checks.min_rows:
        failures.append(f"only {rows} labelled rows in the window; at least {checks.min_rows} needed")
    positives = int(np.sum(y))
    if rows and min(positives, rows - positives) < checks.min_class_rows:
        failures.append(
            f"the target has {positives} positive and {rows - positives} negative rows; each "
            f"class needs at least checks.min_class_rows = {checks.min_class_rows}"
        )
    nulls = {n: float(np.isnan(matrix[:, i]).mean()) if rows else 0.0 for i, n in enumerate(names)}
    for name, frac in nulls.items():
        if frac > checks.max_null_fraction:
            failures.append(
                f"feature '{name}' is missing in {frac:.1%} of rows "
                f"(limit checks.max_null_fraction = {checks.max_null_fraction:.0%})"
            )
    aucs: dict[str, float] = {}
    accepted: list[str] = []
    if rows and len(np.unique(y)) == 2:
        for i, name in enumerate(names):
            aucs[name] = round(standalone_auc(matrix[:, i], y), 4)
            if aucs[name] >= checks.leakage_auc_threshold:
                if name in checks.accept_leaky:
                    accepted.append(name)
                    continue
                failures.append(
                    f"possible target leakage: feature '{name}' alone reaches ROC-AUC "
                    f"{aucs[name]:.3f} (threshold checks.leakage_auc_threshold = "
                    f"{checks.leakage_auc_threshold}). A value recorded only after the outcome (how "
                    f"long a loan actually ran, a closing date, a status code) must not be a "
                    f"feature: remove '{name}'; if it is truly known when a prediction is made "
                    f"(and simply that strong), list it under checks.accept_leaky"
                )
    return DataCheckReport(
        rows=rows,
        positive_rate=positive_rate,
        null_fraction=nulls,
        standalone_auc=aucs,
        failures=failures,
        accepted=accepted,
    )
