"""Performance estimated before the labels arrive, from a window's served outputs alone.

A classifier's probabilities, once calibrated, say how often it is right: a row scored 0.8 that
is truly positive four times in five. Confidence-based performance estimation (CBPE, as NannyML
names it) takes the expected value of a metric over labels drawn from the calibrated
probabilities; the same draws give the band within which the realized value should fall when the
labels come back (the sampling spread of a window of this size). What it cannot see by
construction is a change in what a score means (concept shift, a prior shift the scores do not
follow): then the realized value leaves the band, which is what the audit looks for.

The calibration is fitted at training time on the validation slice (never on the holdout the
gate scores), per class for multiclass (one-vs-rest, renormalised), as isotonic steps stored as
JSON with the version: no pickle.

A regression has no probabilities: direct loss estimation (DLE, as NannyML names it) fits, on the
same validation slice, two small LightGBM models of each row's absolute and squared error from its
features and the value answered, stored as LightGBM's text format; a window's MAE is the mean of
the predicted absolute errors, its RMSE the root of the mean predicted squared error, and the band
comes from those models' out-of-fold residuals: their spread (the window's sampling noise) and how
far off they are where they predict low or high losses (their own systematic error).

Expected values are exact where the metric allows (ROC-AUC as the expected pair counts, log
loss, Brier, accuracy); PR-AUC and F1 take the mean of a few label draws on the window itself
(at most 100,000 of its rows: both are biased on small samples). The band is `band_sigmas`
standard deviations of the metric over `draws` label draws, on a sample of `sample_rows` rows (more
when one class is rare: enough for 200 of it) and scaled to the window's size (these metrics'
spread shrinks as one over the root of the rows).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flywheel.core.cpus import usable_cpus

CALIBRATION_FILE = "calibration.json"
ESTIMATION_ARTIFACT = "estimation"  # the version's folder of what estimation needs
EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] for log loss, as the gate does
MIN_CLASS_ROWS = 20  # calibration needs at least this many rows of each class on the validation slice
BINARY_METRICS = ("roc_auc", "pr_auc", "log_loss", "brier")
MULTICLASS_METRICS = ("log_loss", "accuracy", "macro_f1", "weighted_f1", "macro_roc_auc")
REGRESSION_METRICS = ("rmse", "mae")
MIN_LOSS_ROWS = 100  # a loss model needs at least this many validation rows
# Few, wide trees: a window's cost is the trees times its rows (60 of 31 leaves estimated as well
# as 200 of 15 on benchmarks/estimation_vs_nannyml.py's windows, in 40% of the time)
LOSS_MODEL_PARAMS = {"objective": "regression", "learning_rate": 0.2, "num_leaves": 31,
                     "min_data_in_leaf": 50, "verbosity": -1, "seed": 0}  # threads: usable_cpus()
LOSS_MODEL_ROUNDS = 60
LOSS_MODEL_FOLDS = 5  # the residuals that size the band are out of fold


class EstimationError(ValueError):
    """A calibration or an estimate that cannot be made; the message says why."""


@dataclass(frozen=True)
class Calibration:
    """Isotonic steps per output (binary: P(positive); multiclass: each class's probability)."""

    task: str
    classes: list[str]
    steps: list[tuple[list[float], list[float]]]  # per output: (scores, calibrated probabilities)
    rows: int  # validation rows it was fitted on

    def apply(self, out: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of served outputs: (n,) for binary, (n, classes) rows summing
        to one for multiclass."""
        out = np.asarray(out, dtype=np.float64)
        if self.task == "binary":
            x, y = self.steps[0]
            return np.interp(out, x, y)
        P = np.column_stack([np.interp(out[:, i], x, y) for i, (x, y) in enumerate(self.steps)])
        total = P.sum(axis=1, keepdims=True)
        even = np.full_like(P, 1.0 / P.shape[1])  # every class calibrated to 0: no information
        return np.where(total > 0, P / np.where(total > 0, total, 1.0), even)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "classes": self.classes, "rows": self.rows,
                "steps": [{"scores": x, "probabilities": y} for x, y in self.steps]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(data["task"], list(data.get("classes") or []),
                   [(list(s["scores"]), list(s["probabilities"])) for s in data["steps"]],
                   int(data["rows"]))


def fit_calibration(task: str, y: np.ndarray, out: np.ndarray,
                    classes: list[str] | None = None) -> Calibration:
    """Isotonic calibration of served outputs `out` against true labels `y` (binary 0/1; multiclass
    class indices); EstimationError when the slice cannot calibrate (a class with fewer than
    MIN_CLASS_ROWS rows, or scores that never vary)."""
    from sklearn.isotonic import IsotonicRegression

    if task not in ("binary", "multiclass"):
        raise EstimationError(f"calibration is for classifiers; a {task} model's estimate is a "
                              "loss model's")
    y = np.asarray(y, dtype=np.int64)
    out = np.asarray(out, dtype=np.float64)
    columns = [(y == 1, out)] if task == "binary" else \
        [(y == i, out[:, i]) for i in range(out.shape[1])]
    names = ["positive"] if task == "binary" else list(classes or range(out.shape[1]))
    steps = []
    for name, (hit, score) in zip(names, columns, strict=True):
        counts = int(hit.sum()), int((~hit).sum())
        if min(counts) < MIN_CLASS_ROWS:
            raise EstimationError(
                f"the validation slice has {counts[0]:,} rows of class {name!s} and {counts[1]:,} "
                f"of the others; calibrating needs at least {MIN_CLASS_ROWS} of each")
        if np.ptp(score) == 0:
            raise EstimationError(f"the model gives every validation row the same score for class "
                                  f"{name!s}: its probabilities cannot be calibrated")
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(score, hit.astype(float))
        steps.append(([float(v) for v in iso.X_thresholds_], [float(v) for v in iso.y_thresholds_]))
    return Calibration(task, [str(c) for c in classes or []], steps, len(y))


@dataclass(frozen=True)
class LossModel:
    """What a regression's window estimate needs: models of each row's absolute and squared error
    from [features, answered value] (LightGBM text), and the spread of their out-of-fold residuals."""

    absolute: str
    squared: str
    absolute_spread: float
    squared_spread: float
    rows: int
    absolute_bias: float = 0.0  # the models' relative systematic error, out of fold
    squared_bias: float = 0.0
    task: str = "regression"

    def predict(self, X: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's expected absolute and squared error (never below zero), on as many threads
        as this process may use."""
        Z = _loss_inputs(X, values)
        threads = usable_cpus()
        absolute, squared = _boosters(self.absolute, self.squared)
        return (np.maximum(absolute.predict(Z, num_threads=threads), 0.0),
                np.maximum(squared.predict(Z, num_threads=threads), 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {"task": "regression", "method": "dle", "rows": self.rows,
                "absolute": self.absolute, "squared": self.squared,
                "absolute_spread": self.absolute_spread, "squared_spread": self.squared_spread,
                "absolute_bias": self.absolute_bias, "squared_bias": self.squared_bias}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LossModel:
        return cls(data["absolute"], data["squared"], float(data["absolute_spread"]),
                   float(data["squared_spread"]), int(data["rows"]), float(data["absolute_bias"]),
                   float(data["squared_bias"]))


@functools.lru_cache(maxsize=16)
def _boosters(absolute: str, squared: str) -> tuple[Any, Any]:
    """The loss models parsed once per process (parsing the text costs more than predicting)."""
    import lightgbm as lgb

    return lgb.Booster(model_str=absolute), lgb.Booster(model_str=squared)


def loss_sample(n: int, settings: EstimationSettings | None = None) -> np.ndarray | slice:
    """The rows of an n-row window whose errors are predicted: all of them, or a uniform sample
    of `loss_rows` (the mean predicted error of 200,000 rows stands for a million's within a
    fraction of the band, at a fifth of the trees' work)."""
    s = settings or EstimationSettings()
    if n <= s.loss_rows:
        return slice(None)
    return np.sort(np.random.default_rng(s.seed).integers(0, n, s.loss_rows))


def _loss_inputs(X: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.column_stack([np.asarray(X, dtype=np.float64), np.asarray(values, dtype=np.float64)])


def fit_loss_model(X: np.ndarray, y: np.ndarray, values: np.ndarray) -> LossModel:
    """Direct loss estimation's models, fitted on the validation slice; the residuals that size the
    band are out of fold, so it is not narrowed by what the models learnt by heart."""
    import lightgbm as lgb

    y = np.asarray(y, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    n = len(y)
    if n < MIN_LOSS_ROWS:
        raise EstimationError(f"the validation slice has {n:,} rows; a loss model needs at least "
                              f"{MIN_LOSS_ROWS}")
    Z = _loss_inputs(X, values)
    err = y - values
    params = {**LOSS_MODEL_PARAMS, "num_threads": usable_cpus()}  # the CPUs this process may use
    texts, spreads, biases = [], [], []
    folds = np.arange(n) % LOSS_MODEL_FOLDS
    for target in (np.abs(err), err ** 2):
        predicted = np.empty(n)
        for k in range(LOSS_MODEL_FOLDS):
            inside, held = folds != k, folds == k
            fit = lgb.train(params, lgb.Dataset(Z[inside], target[inside]), LOSS_MODEL_ROUNDS)
            predicted[held] = np.maximum(fit.predict(Z[held]), 0.0)
        residual = target - predicted
        spreads.append(float(residual.std(ddof=1)))
        biases.append(_relative_bias(target, predicted))
        final = lgb.train(params, lgb.Dataset(Z, target), LOSS_MODEL_ROUNDS)
        texts.append(final.model_to_string())
    return LossModel(texts[0], texts[1], spreads[0], spreads[1], n, biases[0], biases[1])


def _relative_bias(target: np.ndarray, predicted: np.ndarray, groups: int = 10) -> float:
    """How far off the loss model is where it predicts low or high losses, out of fold, as a share
    of the loss: over deciles of the predicted loss, the root of the summed squared gaps between
    realized and predicted mean loss (less what each decile's sampling noise explains) over the
    summed squared predicted means. A window that moves its traffic to one end is off by about
    this share of its loss; the band widens by it."""
    order = np.argsort(predicted, kind="stable")
    gaps = level = 0.0
    for part in np.array_split(order, groups):
        if len(part) < 2:
            continue
        expected = float(predicted[part].mean())
        noise = float((target[part] - predicted[part]).var(ddof=1)) / len(part)
        gaps += (float(target[part].mean()) - expected) ** 2 - noise
        level += expected ** 2
    return math.sqrt(max(0.0, gaps) / level) if level > 0 else 0.0


def estimate_loss(metric: str, absolute: np.ndarray, squared: np.ndarray, model: LossModel,
                  settings: EstimationSettings | None = None, rows: int | None = None) -> Estimate:
    """A regression window's RMSE or MAE from the predicted per-row errors, with its band; `rows`:
    the window's rows when the errors were predicted for a uniform sample of them (see
    `loss_sample`), whose own spread then widens the band."""
    s = settings or EstimationSettings()
    n = rows or len(absolute)
    sampled = len(absolute) < n
    if n < s.min_rows:
        return refused(metric, n, f"{n} predictions with a loss model in the window; a band needs "
                       f"at least {s.min_rows}", "dle")
    if metric not in REGRESSION_METRICS:
        return refused(metric, n, f"{metric} cannot be estimated; estimable: "
                       f"{', '.join(REGRESSION_METRICS)}", "dle")
    mae, mse = float(absolute.mean()), float(squared.mean())
    rmse = math.sqrt(mse)
    # the band: the window's sampling spread and the models' own systematic error, together
    def sample_error(losses: np.ndarray) -> float:  # the mean of a sample stands for the window's
        return float(losses.std(ddof=1)) / math.sqrt(len(losses)) if sampled else 0.0

    if metric == "mae":
        value = mae
        half = s.band_sigmas * math.hypot(model.absolute_spread / math.sqrt(n), model.absolute_bias * mae,
                                          sample_error(absolute))
        others = {"rmse": rmse}
    else:  # on the mean squared error, then the delta method: d sqrt(m) = dm / (2 sqrt(m))
        value = rmse
        spread = math.hypot(model.squared_spread / math.sqrt(n), model.squared_bias * mse,
                            sample_error(squared))
        half = s.band_sigmas * spread / (2 * rmse) if rmse > 0 else 0.0
        others = {"mae": mae}
    return Estimate(metric, value, max(value - half, 0.0), value + half, n, "dle", others=others)


@dataclass(frozen=True)
class Estimate:
    """The expected value of `metric` on a window, and the band its realized value should fall in;
    `value` None with `reason` when the window cannot be estimated."""

    metric: str
    value: float | None
    low: float | None
    high: float | None
    rows: int
    method: str = "cbpe"
    reason: str | None = None
    others: dict[str, float] = field(default_factory=dict)  # the task's other metrics, expected

    def covers(self, realized: float) -> bool | None:
        """Whether `realized` lies within the band (None without one)."""
        if self.low is None or self.high is None or not math.isfinite(realized):
            return None
        return self.low <= realized <= self.high

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "low": self.low, "high": self.high,
                "rows": self.rows, "method": self.method, "reason": self.reason,
                "others": self.others}

    def describe(self) -> str:
        if self.value is None:
            return f"estimated {self.metric}: none ({self.reason})"
        return f"estimated {self.metric} {self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


@dataclass(frozen=True)
class Audit:
    """A window's estimate checked against its labels once they are in: `estimate` is made for the
    labelled rows alone, `realized` is the metric on them; outside the band, `shift` is True (the
    scores no longer mean what they did: a probable concept shift, which no estimate can see)."""

    rows: int
    labelled_share: float
    estimate: Estimate
    realized: float
    shift: bool

    def describe(self) -> str:
        where = "outside" if self.shift else "within"
        return (f"audit on {self.rows:,} labelled ({self.labelled_share:.0%}): realized "
                f"{self.estimate.metric} {self.realized:.4g} {where} [{self.estimate.low:.4g}, "
                f"{self.estimate.high:.4g}]" + (": probable CONCEPT SHIFT" if self.shift else ""))


def refused(metric: str, rows: int, reason: str, method: str = "cbpe") -> Estimate:
    return Estimate(metric, None, None, None, rows, method, reason)


@dataclass(frozen=True)
class EstimationSettings:
    min_rows: int = 100  # fewer rows than this: no band worth the name
    draws: int = 64
    sample_rows: int = 2_000
    band_sigmas: float = 3.0
    seed: int = 0
    loss_rows: int = 200_000  # a regression window's errors are predicted for at most this many rows


def estimate(task: str, metric: str, p: np.ndarray, out: np.ndarray,
             settings: EstimationSettings | None = None, classes: list[str] | None = None) -> Estimate:
    """The expected `metric` of served outputs `out` (binary: P(positive), multiclass: (n, classes)
    probabilities) given their calibrated probabilities `p` (see `Calibration.apply`), with its
    band; a refusal (value None, with the reason) for a window too small or a metric the method
    cannot estimate."""
    s = settings or EstimationSettings()
    out = np.asarray(out, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    n = len(out)
    if n < s.min_rows:
        return refused(metric, n, f"{n} predictions with a calibration in the window; a band needs "
                       f"at least {s.min_rows}")
    if task == "binary":
        if metric not in BINARY_METRICS:
            return refused(metric, n, f"{metric} cannot be estimated; estimable: {', '.join(BINARY_METRICS)}")
        return _binary(p, metric, out, s)
    if metric not in MULTICLASS_METRICS:
        return refused(metric, n, f"{metric} cannot be estimated; estimable: {', '.join(MULTICLASS_METRICS)}")
    return _multiclass(p, metric, out, s, classes or [])


# ---- binary -------------------------------------------------------------------------------------


def expected_auc(p: np.ndarray, s: np.ndarray) -> float:
    """E[#(positive, negative) pairs ranked right] / E[#(positive, negative) pairs] for labels
    drawn independently with P(positive) = p, scores s (ties count half, as ROC-AUC counts them)."""
    order = np.argsort(s)  # ties are grouped below: no need for a stable sort
    s_sorted, p_sorted = s[order], p[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    P = np.add.reduceat(p_sorted, starts)  # per group of tied scores
    Q = np.add.reduceat(1.0 - p_sorted, starts)
    R = np.add.reduceat(p_sorted * (1.0 - p_sorted), starts)  # a row is never paired with itself
    below = np.cumsum(Q) - Q  # expected negatives scored lower than each group
    pairs = float(p.sum() * (1.0 - p).sum() - (p * (1.0 - p)).sum())
    if pairs <= 0:
        return float("nan")
    return float((P @ below + 0.5 * (P @ Q - R.sum())) / pairs)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, tied values sharing their average rank (scipy's rankdata, without its
    overhead on the small samples the band is drawn on)."""
    order = np.argsort(x)
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _binary_expected(metric: str, p: np.ndarray, q: np.ndarray) -> float | None:
    """Exact expectations (None: the metric has none in closed form)."""
    if metric == "roc_auc":
        return expected_auc(p, q)
    qc = np.clip(q, EPS, 1 - EPS)
    if metric == "log_loss":
        return float(-np.mean(p * np.log(qc) + (1 - p) * np.log(1 - qc)))
    if metric == "brier":
        return float(np.mean(p * (1 - q) ** 2 + (1 - p) * q ** 2))
    return None


def _binary_draws(metric: str, Y: np.ndarray, q: np.ndarray) -> np.ndarray:
    """`metric` for each row of drawn labels Y (draws, rows) and scores q; NaN where a draw holds
    one class only."""
    m = Y.shape[1]
    Yf = Y.astype(np.float64)  # a matrix product on floats runs in BLAS; on booleans it does not
    n1 = Yf.sum(axis=1)
    one_class = (n1 == 0) | (n1 == m)
    if metric == "roc_auc":
        with np.errstate(divide="ignore", invalid="ignore"):
            v = (Yf @ average_ranks(q) - n1 * (n1 + 1) / 2) / (n1 * (m - n1))
    elif metric == "log_loss":
        qc = np.clip(q, EPS, 1 - EPS)
        a, b = np.log(qc), np.log(1 - qc)
        return -(Yf @ (a - b) + b.sum()) / m
    elif metric == "brier":
        return (Yf @ (1 - 2 * q) + (q ** 2).sum()) / m
    else:  # pr_auc: average precision, sklearn's step form (tied scores are one threshold)
        order = np.argsort(-q, kind="stable")
        qs = q[order]
        ends = np.r_[np.flatnonzero(qs[1:] != qs[:-1]), m - 1]
        tp = np.cumsum(Y[:, order], axis=1, dtype=np.float64)[:, ends]
        precision = tp / (ends + 1)
        gained = np.diff(tp, axis=1, prepend=0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = (gained * precision).sum(axis=1) / n1
    return np.where(one_class, np.nan, v)


MIN_SAMPLE_MINORITY = 200  # the band's sample holds at least this many expected rows of the rarer class


def _binary(p: np.ndarray, metric: str, q: np.ndarray, s: EstimationSettings) -> Estimate:
    n = len(q)
    rng = np.random.default_rng(s.seed)
    rarer = min(float(p.mean()), 1.0 - float(p.mean()))
    m = max(s.sample_rows, int(MIN_SAMPLE_MINORITY / rarer) if rarer > 0 else n)
    take = np.sort(rng.integers(0, n, m)) if n > m else slice(None)  # with replacement: no permutation of n
    ps, qs = p[take], q[take]
    Y = rng.random((s.draws, len(ps)), dtype=np.float32) < ps
    drawn = _binary_draws(metric, Y, qs)
    drawn = drawn[np.isfinite(drawn)]
    if len(drawn) < s.draws // 2:
        return refused(metric, n, f"the calibrated probabilities expect {p.sum():.1f} positives in "
                       f"{n:,} rows: too few for {metric} to be defined")
    value = _binary_expected(metric, p, q)
    if value is None:  # no closed form (PR-AUC): the mean over draws on the window itself
        value = _mean_of_draws(lambda pick, draws: _binary_draws(
            metric, rng.random((draws, len(p[pick])), dtype=np.float32) < p[pick], q[pick]), n, s, rng)
    half = s.band_sigmas * float(drawn.std(ddof=1)) * math.sqrt(len(ps) / n)
    others = {k: v for k in ("log_loss", "brier") if k != metric
              for v in [_binary_expected(k, p, q)] if v is not None}
    others["positive_rate"] = float(p.mean())
    return Estimate(metric, value, *_bounded(metric, value, half), n, others=others)


# ---- multiclass ---------------------------------------------------------------------------------


def _multiclass_draws(metric: str, labels: np.ndarray, S: np.ndarray) -> np.ndarray:
    """`metric` for each row of drawn class indices `labels` (draws, rows), outputs S."""
    B, m = labels.shape
    k = S.shape[1]
    predicted = S.argmax(axis=1)
    if metric == "accuracy":
        return (labels == predicted).mean(axis=1)
    if metric == "log_loss":
        logs = np.log(np.clip(S / S.sum(axis=1, keepdims=True), EPS, 1.0))
        return -logs[np.arange(m), labels].mean(axis=1)
    if metric == "macro_roc_auc":
        aucs = np.full((B, k), np.nan)
        for c in range(k):
            hit = (labels == c).astype(np.float64)
            n1 = hit.sum(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                aucs[:, c] = (hit @ average_ranks(S[:, c]) - n1 * (n1 + 1) / 2) / (n1 * (m - n1))
        aucs[~np.isfinite(aucs)] = np.nan
        with np.errstate(all="ignore"):
            return np.nanmean(aucs, axis=1)
    # F1 per class from the confusion counts of each draw
    f1 = np.zeros((B, k))
    support = np.zeros((B, k))
    for c in range(k):
        truth, said = labels == c, predicted == c
        tp = (truth & said).sum(axis=1)
        fp = said.sum() - tp
        fn = truth.sum(axis=1) - tp
        denom = 2 * tp + fp + fn
        f1[:, c] = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
        support[:, c] = truth.sum(axis=1)
    if metric == "macro_f1":
        return f1.mean(axis=1)
    return (f1 * support).sum(axis=1) / m


def _multiclass(P: np.ndarray, metric: str, S: np.ndarray, s: EstimationSettings,
                classes: list[str]) -> Estimate:
    if S.ndim != 2 or S.shape != P.shape:
        return refused(metric, len(S), f"outputs of shape {S.shape} do not match the calibrated "
                       f"probabilities' {P.shape}")
    n, k = P.shape
    predicted = S.argmax(axis=1)
    never = [classes[c] if c < len(classes) else str(c) for c in range(k) if not (predicted == c).any()]
    if never and metric in ("macro_f1", "weighted_f1"):
        return refused(metric, n, f"the model predicts no row of class {', '.join(never[:5])} in "
                       f"this window: {metric}'s precision for it is undefined")
    rng = np.random.default_rng(s.seed)
    take = np.sort(rng.integers(0, n, s.sample_rows)) if n > s.sample_rows else slice(None)
    Ps, Ss = P[take], S[take]
    cum = np.cumsum(Ps, axis=1)
    u = rng.random((s.draws, len(Ps), 1))
    labels = np.minimum((u > cum[None, :, :]).sum(axis=2), k - 1)
    drawn = _multiclass_draws(metric, labels, Ss)
    drawn = drawn[np.isfinite(drawn)]
    if len(drawn) < s.draws // 2:
        return refused(metric, n, f"{metric} is undefined for most label draws of this window")
    Sn = np.clip(S / S.sum(axis=1, keepdims=True), EPS, 1.0)
    exact = {"accuracy": float(P[np.arange(n), predicted].mean()),
             "log_loss": float(-(P * np.log(Sn)).sum(axis=1).mean())}
    if metric == "macro_roc_auc":
        aucs = [expected_auc(P[:, c], S[:, c]) for c in range(k)]
        exact["macro_roc_auc"] = float(np.nanmean(aucs)) if not all(map(math.isnan, aucs)) else float("nan")
    if metric in exact:
        value = exact[metric]
    else:  # no closed form (F1): the mean over draws on the window itself
        def window_draws(pick: Any, draws: int) -> np.ndarray:
            cum_w = np.cumsum(P[pick], axis=1)
            u_w = rng.random((draws, len(cum_w), 1))
            return _multiclass_draws(metric, np.minimum((u_w > cum_w[None]).sum(axis=2), k - 1), S[pick])

        value = _mean_of_draws(window_draws, n, s, rng)
    half = s.band_sigmas * float(drawn.std(ddof=1)) * math.sqrt(len(Ps) / n)
    others = {key: v for key, v in exact.items() if key != metric}
    return Estimate(metric, value, *_bounded(metric, value, half), n, others=others)


VALUE_ROWS = 100_000  # a metric without a closed form is averaged over draws on this many rows at most
VALUE_DRAWS = 8


def _mean_of_draws(draw: Any, n: int, s: EstimationSettings, rng: np.random.Generator) -> float:
    """The expected value of a metric with no closed form: its mean over VALUE_DRAWS label draws on
    the window (or a uniform VALUE_ROWS of it). Not on the band's small sample: such metrics
    (average precision, F1) are biased at small sizes, and the estimate must be the window's."""
    pick = np.sort(rng.integers(0, n, VALUE_ROWS)) if n > VALUE_ROWS else slice(None)
    values = draw(pick, VALUE_DRAWS)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def _bounded(metric: str, value: float, half: float) -> tuple[float, float]:
    """The band around `value`, within the metric's range."""
    low, high = value - half, value + half
    if metric in ("log_loss", "brier"):
        return max(low, 0.0), high
    return max(low, 0.0), min(high, 1.0)
