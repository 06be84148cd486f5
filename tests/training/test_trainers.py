"""Every trainer: trains on the time split, exports to ONNX within 1e-4, logs its curves."""

import numpy as np
import pytest

from flywheel.config import ModelConfig
from flywheel.training.evaluate import holdout_metrics
from flywheel.training.onnx import onnx_predict
from flywheel.training.trainers import TrainerUnavailable, train_model

# One worker builds this module's shared fixture (a trained model, a server) once.
pytestmark = pytest.mark.xdist_group("training-test_trainers")

FAST = {
    "lightgbm": {"num_boost_round": 60},
    "sklearn": {},
    "torch-mlp": {"max_epochs": 4, "hidden": [32, 16]},
}


@pytest.fixture(scope="module", params=list(FAST))
def trained(request, prepared_sample):
    kind = request.param
    fitted = train_model(ModelConfig(type=kind, params=FAST[kind]), prepared_sample.training_data())
    return kind, fitted, prepared_sample


def test_onnx_export_matches_native_probabilities_on_the_holdout(trained):
    _, fitted, prep = trained
    X = prep.X[prep.split.holdout]
    diff = np.max(np.abs(fitted.predict(X) - onnx_predict(fitted.onnx, X)))
    assert diff <= 1e-4


def test_model_ranks_better_than_chance_on_the_later_holdout(trained):
    kind, fitted, prep = trained
    hold = prep.split.holdout
    auc = holdout_metrics(prep.y[hold], onnx_predict(fitted.onnx, prep.X[hold]))["roc_auc"]
    assert auc > 0.58, f"{kind} holdout ROC-AUC {auc:.3f}"


def test_training_curves_are_recorded_for_train_and_validation(trained):
    kind, fitted, _ = trained
    assert {"train_auc", "validation_auc"} <= set(fitted.history)
    n = len(fitted.history["validation_auc"])
    assert n == len(fitted.history["train_auc"]) >= 1
    if kind != "sklearn":
        assert n > 1  # per iteration / per epoch
    assert 1 <= fitted.best_iteration <= n


def test_onnx_handles_missing_values_and_unseen_category_codes(trained):
    _, fitted, prep = trained
    X = prep.X[prep.split.holdout][:50].copy()
    X[:, 0] = np.nan
    cats = list(prep.training_data().cardinalities)
    X[:, cats[0]] = 10_000  # a code beyond the vocabulary
    p = onnx_predict(fitted.onnx, X)
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    assert np.max(np.abs(fitted.predict(X) - p)) <= 1e-4


def test_mlp_is_deterministic_with_a_fixed_seed(prepared_sample):
    cfg = ModelConfig(type="torch-mlp", params={"max_epochs": 2, "hidden": [16]}, seed=7)
    a = train_model(cfg, prepared_sample.training_data())
    b = train_model(cfg, prepared_sample.training_data())
    X = prepared_sample.X[:500]
    assert np.array_equal(a.predict(X), b.predict(X))
    assert a.history == b.history


def test_mlp_early_stops_and_keeps_its_best_epoch(prepared_sample):
    cfg = ModelConfig(type="torch-mlp", params={"max_epochs": 40, "patience": 2, "learning_rate": 0.05})
    fitted = train_model(cfg, prepared_sample.training_data())
    epochs = len(fitted.history["validation_auc"])
    assert epochs < 40
    best = int(np.argmax(fitted.history["validation_auc"])) + 1
    assert fitted.best_iteration == best


def test_choosing_the_mlp_without_torch_says_how_to_install_it(prepared_sample, monkeypatch):
    import sys

    # None in sys.modules makes `import torch` raise ImportError, as in an env without torch.
    import flywheel.training

    monkeypatch.delitem(sys.modules, "flywheel.training.torch_mlp", raising=False)
    monkeypatch.delattr(flywheel.training, "torch_mlp", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(TrainerUnavailable, match=r"pip install 'mlflywheel\[mlp\]'"):
        train_model(ModelConfig(type="torch-mlp"), prepared_sample.training_data())


def test_float32_thresholds_change_no_native_prediction_and_give_onnx_exact_splits():
    import lightgbm as lgb

    from flywheel.training.trainers import float32_thresholds

    rng = np.random.default_rng(3)
    X = np.column_stack([rng.gamma(2.0, 30.0, 4000).round(2), rng.integers(18, 80, 4000)]).astype(np.float32)
    y = (X[:, 0] / 60 - X[:, 1] / 50 + rng.normal(0, 1, 4000) > 0).astype(int)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 63, "min_data_in_leaf": 2},
                        lgb.Dataset(X, y), num_boost_round=30)
    lowered = lgb.Booster(model_str=float32_thresholds(booster.model_to_string()))
    assert np.array_equal(booster.predict(X), lowered.predict(X))
    thresholds = [float(v) for line in lowered.model_to_string().splitlines()
                  if line.startswith("threshold=") for v in line.split("=", 1)[1].split()]
    assert thresholds and all(float(np.float32(t)) == t for t in thresholds)
    before = [float(v) for line in booster.model_to_string().splitlines()
              if line.startswith("threshold=") for v in line.split("=", 1)[1].split()]
    assert any(float(np.float32(t)) != t for t in before)  # the case it exists for


def test_lightgbm_threads_follow_the_usable_cpus_and_a_configured_count_wins(prepared_sample):
    from flywheel.core.cpus import compute_budget, usable_cpus

    data = prepared_sample.training_data()
    fitted = train_model(ModelConfig(type="lightgbm", params={"num_boost_round": 5}), data)
    assert fitted.params["num_threads"] == usable_cpus()
    with compute_budget(1):
        assert train_model(ModelConfig(type="lightgbm", params={"num_boost_round": 5}),
                           data).params["num_threads"] == 1
    pinned = ModelConfig(type="lightgbm", params={"num_boost_round": 5, "num_threads": 3})
    assert train_model(pinned, data).params["num_threads"] == 3
