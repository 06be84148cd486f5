"""Performance estimated before labels: the expectations and draws against sklearn, the band
under a covariate shift (the estimate must track) and under flipped labels (it cannot), and clear
refusals for what cannot be estimated."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    f1_score,
    log_loss,
    roc_auc_score,
)

from flywheel.monitoring import estimation as est
from flywheel.serving.http.metrics import _verdict_text
from flywheel.training.evaluate import multiclass_metrics

BINARY = {"roc_auc": roc_auc_score, "pr_auc": average_precision_score,
          "log_loss": lambda y, q: log_loss(y, np.clip(q, 1e-7, 1 - 1e-7), labels=[0, 1]),
          "brier": brier_score_loss}


def population(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two features, labels from a logistic model of them, and a served score that ranks like the
    truth but is miscalibrated (what calibration is for)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    logit = 1.4 * X[:, 0] + 0.6 * X[:, 1] - 1.5
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    score = 1 / (1 + np.exp(-(0.6 * logit + 0.4)))
    return X, y, score


@pytest.mark.parametrize("metric", sorted(BINARY))
def test_each_draw_is_scored_as_sklearn_scores_it(metric):
    rng = np.random.default_rng(3)
    q = np.round(rng.beta(1, 4, 2_000), 3)  # rounded: ties, as tree models give
    Y = rng.random((6, len(q))) < q
    drawn = est._binary_draws(metric, Y, q)
    assert np.allclose(drawn, [BINARY[metric](y, q) for y in Y], atol=1e-12)


@pytest.mark.parametrize("metric", est.MULTICLASS_METRICS)
def test_each_multiclass_draw_is_scored_as_the_gate_scores_it(metric):
    rng = np.random.default_rng(4)
    S = rng.dirichlet(np.ones(4), 1_500)
    labels = rng.integers(0, 4, (5, len(S)))
    drawn = est._multiclass_draws(metric, labels, S)
    classes = list("abcd")
    assert np.allclose(drawn, [multiclass_metrics(y, S, classes)[metric] for y in labels], atol=1e-9)
    if metric == "accuracy":  # and the gate's own function agrees with sklearn here
        assert np.isclose(drawn[0], accuracy_score(labels[0], S.argmax(1)))
    if metric == "macro_f1":
        assert np.isclose(drawn[0], f1_score(labels[0], S.argmax(1), average="macro"))


def test_the_expected_auc_is_the_mean_over_label_draws():
    rng = np.random.default_rng(5)
    q = np.round(rng.beta(1, 5, 1_500), 2)
    p = np.clip(q * 1.3, 0, 1)
    draws = rng.random((600, len(q))) < p
    simulated = np.mean([roc_auc_score(y, q) for y in draws])
    assert est.expected_auc(p, q) == pytest.approx(simulated, abs=0.003)


@pytest.mark.parametrize("metric", sorted(BINARY))
def test_under_a_covariate_shift_the_estimate_tracks_within_its_band(metric):
    X, y, score = population(120_000, seed=1)
    calibration = est.fit_calibration("binary", y[:30_000], score[:30_000])
    rng = np.random.default_rng(2)
    covered, gaps = 0, []
    for shift in np.linspace(-1.0, 1.5, 10):  # windows resampled towards high or low X0
        weight = np.exp(shift * X[30_000:, 0])
        window = 30_000 + rng.choice(90_000, 8_000, p=weight / weight.sum())
        estimate = est.estimate("binary", metric, calibration.apply(score[window]), score[window])
        realized = BINARY[metric](y[window], score[window])
        covered += bool(estimate.covers(realized))
        gaps.append(abs(estimate.value - realized))
    assert covered >= 9, (metric, gaps)  # a 3-sigma band: a miss in ten is already unlikely


def test_flipped_labels_move_the_realized_value_out_of_the_band():
    """A concept shift (the same scores, other outcomes) is what no estimator sees: the estimate
    stays where the scores put it and the realized value leaves the band."""
    X, y, score = population(60_000, seed=7)
    calibration = est.fit_calibration("binary", y[:30_000], score[:30_000])
    window = np.arange(30_000, 40_000)
    estimate = est.estimate("binary", "roc_auc", calibration.apply(score[window]), score[window])
    truth = y[window].copy()
    flip = np.random.default_rng(8).random(len(truth)) < 0.3
    truth[flip] = 1 - truth[flip]
    assert estimate.covers(roc_auc_score(y[window], score[window]))
    assert not estimate.covers(roc_auc_score(truth, score[window]))


def test_a_multiclass_estimate_tracks_a_covariate_shift():
    rng = np.random.default_rng(11)
    n = 60_000
    X = rng.normal(size=(n, 2))
    logits = np.column_stack([X[:, 0], X[:, 1], -X[:, 0] - X[:, 1] + 0.5])
    P = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = (rng.random((n, 1)) > P.cumsum(axis=1)).sum(axis=1)
    S = np.exp(0.7 * logits) / np.exp(0.7 * logits).sum(axis=1, keepdims=True)  # underconfident
    calibration = est.fit_calibration("multiclass", y[:20_000], S[:20_000], ["a", "b", "c"])
    weight = np.exp(0.8 * X[20_000:, 0])
    window = 20_000 + rng.choice(n - 20_000, 6_000, p=weight / weight.sum())
    for metric in est.MULTICLASS_METRICS:
        estimate = est.estimate("multiclass", metric, calibration.apply(S[window]), S[window])
        realized = multiclass_metrics(y[window], S[window], ["a", "b", "c"])[metric]
        assert estimate.covers(realized), (metric, estimate, realized)


def test_the_calibration_is_json_and_reads_back_the_same():
    _, y, score = population(5_000, seed=3)
    calibration = est.fit_calibration("binary", y, score)
    again = est.Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert np.array_equal(again.apply(score), calibration.apply(score))
    ends = calibration.steps[0][1]
    assert again.apply(np.array([-1.0, 2.0])).tolist() == [ends[0], ends[-1]]  # clipped, not extrapolated


def test_what_cannot_be_estimated_gets_a_reason_not_a_number():
    _, y, score = population(5_000, seed=3)
    with pytest.raises(est.EstimationError, match="at least 20 of each"):
        est.fit_calibration("binary", np.r_[np.ones(10), np.zeros(990)], score[:1_000])
    with pytest.raises(est.EstimationError, match="same score"):
        est.fit_calibration("binary", y[:1_000], np.full(1_000, 0.3))
    calibration = est.fit_calibration("binary", y, score)
    p = calibration.apply(score)
    small = est.estimate("binary", "roc_auc", p[:50], score[:50])
    assert small.value is None and "at least 100" in small.reason
    unknown = est.estimate("binary", "rmse", p, score)
    assert unknown.value is None and "estimable: roc_auc" in unknown.reason
    # no positive expected at all: ROC-AUC is undefined in every draw
    assert "too few" in est.estimate("binary", "roc_auc", np.zeros(len(score)), score).reason
    # a class the model never predicts in the window: its F1 is undefined
    S = np.tile([0.6, 0.3, 0.1], (500, 1)) + np.random.default_rng(1).normal(0, 0.01, (500, 3))
    refused = est.estimate("multiclass", "macro_f1", S, S, classes=["a", "b", "c"])
    assert refused.value is None and "no row of class b, c" in refused.reason


def test_the_latest_estimate_is_a_gauge_with_its_band():
    text = _verdict_text({"model_version": 2, "drift_detected": False, "drift_share": 0.1,
                          "columns": [], "performance_drop": False, "estimated_metric": "roc_auc",
                          "estimated_value": 0.71, "estimated_low": 0.68, "estimated_high": 0.74})
    assert 'flywheel_window_estimated_metric{metric="roc_auc",bound="estimate"} 0.71' in text
    assert 'flywheel_window_estimated_metric{metric="roc_auc",bound="high"} 0.74' in text
    none = _verdict_text({"model_version": 2, "drift_detected": False, "drift_share": 0.1,
                          "columns": [], "performance_drop": False, "estimated_metric": "roc_auc",
                          "estimated_value": None, "estimate_note": "too small"})
    assert "estimated_metric" not in none


def regression_population(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A model that gets the mean right, with noise that grows with the first feature: where the
    traffic moves decides the error, which is what direct loss estimation must follow."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    mean = 3 * X[:, 1] + X[:, 2]
    y = mean + rng.normal(size=n) * (0.5 + np.abs(X[:, 0]))
    return X, y, mean + rng.normal(0, 0.1, n)


@pytest.mark.parametrize("metric", est.REGRESSION_METRICS)
def test_direct_loss_estimation_tracks_a_covariate_shift(metric):
    X, y, value = regression_population(60_000, seed=2)
    model = est.fit_loss_model(X[:10_000], y[:10_000], value[:10_000])
    again = est.LossModel.from_dict(json.loads(json.dumps(model.to_dict())))  # stored as text
    rng = np.random.default_rng(3)
    covered, values = 0, []
    for shift in np.linspace(0, 2.5, 8):  # from the calm middle to the noisy tails
        weight = np.exp(shift * np.abs(X[10_000:, 0]))
        window = 10_000 + rng.choice(50_000, 5_000, p=weight / weight.sum())
        absolute, squared = again.predict(X[window], value[window])
        estimate = est.estimate_loss(metric, absolute, squared, again)
        err = y[window] - value[window]
        realized = float(np.sqrt(np.mean(err ** 2))) if metric == "rmse" else float(np.mean(np.abs(err)))
        covered += bool(estimate.covers(realized))
        values.append((round(estimate.value, 3), round(realized, 3)))
    assert covered >= 7, values
    assert values[-1][0] > values[0][0] * 1.3  # it followed the traffic into the noise
    # a shift in what the inputs mean (the same answers, other outcomes): outside the band
    absolute, squared = again.predict(X[10_000:15_000], value[10_000:15_000])
    shifted = y[10_000:15_000] + 2.0 - value[10_000:15_000]
    realized = float(np.sqrt(np.mean(shifted ** 2))) if metric == "rmse" else float(np.mean(np.abs(shifted)))
    assert est.estimate_loss(metric, absolute, squared, again).covers(realized) is False


def test_a_loss_model_needs_rows_and_a_known_metric():
    X, y, value = regression_population(500, seed=4)
    with pytest.raises(est.EstimationError, match="at least 100"):
        est.fit_loss_model(X[:50], y[:50], value[:50])
    model = est.fit_loss_model(X, y, value)
    absolute, squared = model.predict(X, value)
    assert est.estimate_loss("r2", absolute, squared, model).reason.startswith("r2 cannot be estimated")
    assert "at least 100" in est.estimate_loss("rmse", absolute[:20], squared[:20], model).reason
