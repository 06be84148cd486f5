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
    positive_rate: float  # binary: share of positives; regression: mean target; multiclass: NaN
    null_fraction: dict[str, float]
    # each feature's standalone score: ROC-AUC (binary), macro one-vs-rest ROC-AUC (multiclass),
    # out-of-sample R-squared (regression); `standalone_metric` names it
    standalone_auc: dict[str, float]
    failures: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    task: str = "binary"
    standalone_metric: str = "roc_auc"
    class_counts: dict[str, int] = field(default_factory=dict)  # multiclass
    target_range: dict[str, float] = field(default_factory=dict)  # regression: quantiles, outliers

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


def standalone_macro_auc(x: np.ndarray, y: np.ndarray, classes: int) -> float:
    """`standalone_auc` for a multiclass target: the mean over the classes of the feature's
    one-vs-rest score (classes the rows hold too few of to score are left out)."""
    scores = [standalone_auc(x, (y == k).astype(np.float64)) for k in range(classes)
              if 0 < int(np.sum(y == k)) < len(y)]
    return float(np.mean(scores)) if scores else 0.5


def standalone_r2(x: np.ndarray, y: np.ndarray) -> float:
    """How much of a numeric target's variance one feature alone explains, out of sample: fitted
    on every other row and scored on the rest, both ways round, as the better of a straight line
    (a leak is most often the target measured again: a heavy tail the groups below would blur) and
    the feature's groups mean-encoded as in `standalone_auc` (a non-monotone leak). 0 when it
    explains nothing (never negative)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keys = _group_keys(x)
    halves = np.arange(len(x)) % 2 == 0
    grouped, linear = [], []
    for fit, score in ((halves, ~halves), (~halves, halves)):
        spread = float(np.sum((y[score] - y[score].mean()) ** 2))
        if spread <= 0 or not fit.any():
            continue
        encoded = _target_encode(keys[fit], y[fit], keys[score])
        grouped.append(1 - float(np.sum((y[score] - encoded) ** 2)) / spread)
        linear.append(1 - float(np.sum((y[score] - _line(x[fit], y[fit], x[score])) ** 2)) / spread)
    if not grouped:
        return 0.0
    return max(0.0, float(np.mean(grouped)), float(np.mean(linear)))


def _line(fit_x: np.ndarray, fit_y: np.ndarray, score_x: np.ndarray) -> np.ndarray:
    """A least-squares line through the fit rows' finite values; missing values get their mean."""
    finite = ~np.isnan(fit_x)
    out = np.full(len(score_x), fit_y[~finite].mean() if (~finite).any() else fit_y.mean())
    if finite.sum() < 2 or np.ptp(fit_x[finite]) == 0:
        return np.where(np.isnan(score_x), out, fit_y[finite].mean() if finite.any() else fit_y.mean())
    slope, intercept = np.polyfit(fit_x[finite], fit_y[finite], 1)
    known = ~np.isnan(score_x)
    out[known] = slope * score_x[known] + intercept
    return out


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
    matrix: np.ndarray, y: np.ndarray, names: list[str], checks: ChecksConfig, task: str = "binary",
    classes: list[str] | None = None, unknown_classes: dict[str, int] | None = None,
) -> DataCheckReport:
    """Every check over the feature matrix of the training window; failures are collected."""
    failures: list[str] = []
    rows = len(y)
    if rows < checks.min_rows:
        failures.append(f"only {rows} labelled rows in the window; at least {checks.min_rows} needed")
    class_counts: dict[str, int] = {}
    target_range: dict[str, float] = {}
    if task == "multiclass":
        class_counts = _check_classes(y, classes or [], unknown_classes or {}, checks, failures)
    elif task == "regression":
        target_range = _check_values(y, checks, failures)
    elif rows:
        positives = int(np.sum(y))
        if min(positives, rows - positives) < checks.min_class_rows:
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
    scores, accepted = _leakage_screen(matrix, y, names, checks, task, len(classes or []), failures)
    return DataCheckReport(
        rows=rows,
        positive_rate=float(np.mean(y)) if rows and task != "multiclass" else float("nan"),
        null_fraction=nulls,
        standalone_auc=scores,
        failures=failures,
        accepted=accepted,
        task=task,
        standalone_metric=LEAKAGE_METRIC[task],
        class_counts=class_counts,
        target_range=target_range,
    )


LEAKAGE_METRIC = {"binary": "roc_auc", "multiclass": "macro_roc_auc", "regression": "r2"}


def _leakage_screen(matrix: np.ndarray, y: np.ndarray, names: list[str], checks: ChecksConfig,
                    task: str, classes: int, failures: list[str]) -> tuple[dict[str, float], list[str]]:
    """Each feature's standalone score against the task's threshold; a failure per suspect."""
    scores: dict[str, float] = {}
    accepted: list[str] = []
    if not len(y) or len(np.unique(y)) < 2:
        return scores, accepted
    threshold = checks.leakage_r2_threshold if task == "regression" else checks.leakage_auc_threshold
    setting = "leakage_r2_threshold" if task == "regression" else "leakage_auc_threshold"
    measure = {"binary": "ROC-AUC", "multiclass": "macro ROC-AUC (one class against the rest)",
               "regression": "out-of-sample R-squared"}[task]
    for i, name in enumerate(names):
        x = matrix[:, i]
        score = (standalone_r2(x, y) if task == "regression" else
                 standalone_macro_auc(x, y, classes) if task == "multiclass" else standalone_auc(x, y))
        scores[name] = round(score, 4)
        if scores[name] < threshold:
            continue
        if name in checks.accept_leaky:
            accepted.append(name)
            continue
        failures.append(
            f"possible target leakage: feature '{name}' alone reaches {measure} "
            f"{scores[name]:.3f} (threshold checks.{setting} = {threshold}). A value recorded "
            f"only after the outcome (how long a loan actually ran, a closing date, a status code, "
            f"a delay measured on the way) must not be a feature: remove '{name}'; if it is truly "
            f"known when a prediction is made (and simply that strong), list it under "
            f"checks.accept_leaky"
        )
    return scores, accepted


def _check_classes(y: np.ndarray, classes: list[str], unknown: dict[str, int], checks: ChecksConfig,
                   failures: list[str]) -> dict[str, int]:
    counts = {c: int(np.sum(y == i)) for i, c in enumerate(classes)}
    if unknown:
        failures.append(
            f"{sum(unknown.values())} row(s) have a class not in data.target.classes: "
            + ", ".join(f"'{c}' ({n})" for c, n in sorted(unknown.items())[:10])
            + "; add it to the list, or clean the rows")
    rare = {c: n for c, n in counts.items() if n < checks.min_class_rows}
    if rare:
        failures.append(
            "class(es) with fewer rows than checks.min_class_rows = "
            f"{checks.min_class_rows}: " + ", ".join(f"'{c}' ({n})" for c, n in rare.items())
            + "; widen data.window, lower the setting, or leave the class out of "
            "data.target.classes and its rows out of the table")
    return counts


def _check_values(y: np.ndarray, checks: ChecksConfig, failures: list[str]) -> dict[str, float]:
    """The target's range and its outliers (beyond 3 interquartile ranges of the quartiles)."""
    if not len(y):
        return {}
    q = np.quantile(y, [0, 0.01, 0.25, 0.5, 0.75, 0.99, 1])
    iqr = q[4] - q[2]
    outliers = int(np.sum((y < q[2] - 3 * iqr) | (y > q[4] + 3 * iqr)))
    if q[0] == q[6]:
        failures.append(f"the target is {q[0]} in every row: there is nothing to learn")
    if checks.target_range is not None:
        low, high = checks.target_range
        outside = int(np.sum((y < low) | (y > high)))
        if outside:
            failures.append(f"{outside} row(s) have a target outside checks.target_range "
                            f"[{low}, {high}] (seen: {q[0]:g} .. {q[6]:g})")
    return {"min": float(q[0]), "p01": float(q[1]), "median": float(q[3]), "p99": float(q[5]),
            "max": float(q[6]), "mean": float(np.mean(y)), "outliers": float(outliers)}
