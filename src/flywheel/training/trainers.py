"""Trainers: LightGBM (default), a scikit-learn pipeline, a PyTorch MLP. Each exports to ONNX in
the format of `training.onnx` (one 1-D output also lets `mlflow models serve` answer DataFrame
requests with it)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from flywheel.config import ModelConfig
from flywheel.core.cpus import usable_cpus
from flywheel.core.errors import FlywheelError
from flywheel.core.extras import how_to_install
from flywheel.core.progress import Advance
from flywheel.training.evaluate import curve_metrics
from flywheel.training.model import FittedModel, TrainingData
from flywheel.training.onnx import ONNX_INPUT, task_output


class TrainerUnavailable(FlywheelError):
    """The chosen trainer needs a package that is not installed; the message says how to add it."""


def train_model(
    model: ModelConfig, data: TrainingData, progress: Advance | None = None
) -> FittedModel:
    """Train the configured model type with early stopping on the validation slice."""
    started = time.perf_counter()
    if model.type == "lightgbm":
        fitted = _train_lightgbm(model, data, progress)
    elif model.type == "sklearn":
        fitted = _train_sklearn(model, data, progress)
    else:
        try:
            from flywheel.training import torch_mlp  # imports torch: heavy and optional
        except ImportError as exc:
            raise TrainerUnavailable(
                f"model.type 'torch-mlp' needs PyTorch, which is not installed here ({exc}): "
                f"{how_to_install('mlp')}   (or choose model.type lightgbm or sklearn)"
            ) from None
        fitted = torch_mlp.train_mlp(model, data, progress)
    fitted.train_seconds = time.perf_counter() - started
    return fitted


# ---- LightGBM ----------------------------------------------------------------------------------

LIGHTGBM_DEFAULTS: dict[str, Any] = {
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 100,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "cat_smooth": 20,
    "verbose": -1,
    "num_boost_round": 300,
    "early_stopping_rounds": 50,
}
# What each task optimises and records; the first metric decides early stopping.
LIGHTGBM_OBJECTIVES: dict[str, dict[str, Any]] = {
    "binary": {"objective": "binary", "metric": ["auc", "binary_logloss"]},
    "regression": {"objective": "regression", "metric": ["rmse", "l1"]},
    "multiclass": {"objective": "multiclass", "metric": ["multi_logloss", "multi_error"]},
}


def _train_lightgbm(model: ModelConfig, data: TrainingData, progress: Advance | None) -> FittedModel:
    import lightgbm as lgb
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    # Threads from the CPUs this process may use (affinity, container quota, FLYWHEEL_CPUS, a
    # replay's budget), never a fixed count: oversubscribed OpenMP threads made a 3 s fit take 241 s.
    params = {**LIGHTGBM_DEFAULTS, "num_threads": usable_cpus(), **LIGHTGBM_OBJECTIVES[data.task],
              **model.params, "seed": model.seed, "deterministic": True}
    if data.task == "multiclass":
        params["num_class"] = len(data.classes)
    rounds = int(params.pop("num_boost_round"))
    patience = int(params.pop("early_stopping_rounds"))
    cats = sorted(data.cardinalities)
    train_set = lgb.Dataset(data.X_train, data.y_train, feature_name=data.feature_names,
                            categorical_feature=cats, free_raw_data=False)
    val_set = lgb.Dataset(data.X_val, data.y_val, reference=train_set)
    evals: dict[str, dict[str, list[float]]] = {}

    def report(env: lgb.callback.CallbackEnv) -> None:
        if progress:
            progress(env.iteration + 1, rounds)

    booster = lgb.train(
        params, train_set, num_boost_round=rounds, valid_sets=[train_set, val_set],
        valid_names=["train", "validation"],
        callbacks=[lgb.record_evaluation(evals), report,
                   lgb.early_stopping(patience, first_metric_only=True, verbose=False)],
    )
    best = booster.best_iteration or booster.current_iteration()
    # Keep exactly the trees that scored best on validation, natively and in ONNX.
    booster = lgb.Booster(model_str=float32_thresholds(booster.model_to_string(num_iteration=best)))
    onnx_model = convert_lightgbm(
        booster, initial_types=[(ONNX_INPUT, FloatTensorType([None, data.X_train.shape[1]]))],
        zipmap=False, target_opset=15,
    )
    history = {f"{split}_{metric.replace('binary_', '').replace('multi_', '')}": values
               for split, metrics in evals.items() for metric, values in metrics.items()}
    return FittedModel(
        kind="lightgbm",
        predict=lambda X: np.asarray(booster.predict(X), dtype=np.float64),
        onnx=task_output(onnx_model, data.task),
        params={**params, "num_boost_round": rounds, "early_stopping_rounds": patience},
        history=history,
        best_iteration=best,
        native_files={"model.lgb.txt": booster.model_to_string().encode()},
    )


def float32_thresholds(model_str: str) -> str:
    """Each split threshold lowered to the largest float32 at or below it. LightGBM compares in
    double, ONNX Runtime's tree ensemble in float32: a threshold that rounds up onto a value the data
    holds sends that value the other way in ONNX (seen on prices with cents: 0.4% of rows off by up
    to 0.013). For float32 inputs, which both are given, `x <= t` and `x <= floor32(t)` agree for
    every x, so the native model's predictions do not change and ONNX's now match them."""
    out = []
    for line in model_str.splitlines():
        if line.startswith("tree_sizes="):
            continue  # byte offsets of the trees, which change: LightGBM then reads them in order
        if line.startswith("threshold="):
            values = np.array(line.removeprefix("threshold=").split(), dtype=np.float64)
            low = values.astype(np.float32)
            above = low.astype(np.float64) > values
            low[above] = np.nextafter(low[above], np.float32(-np.inf))
            line = "threshold=" + " ".join(repr(float(v)) for v in low)
        out.append(line)
    return "\n".join(out) + "\n"


# ---- scikit-learn ------------------------------------------------------------------------------

SKLEARN_DEFAULTS: dict[str, Any] = {"C": 1.0, "max_iter": 1000}  # alpha = 1/C for regression


def _train_sklearn(model: ModelConfig, data: TrainingData, progress: Advance | None) -> FittedModel:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    params = {**SKLEARN_DEFAULTS, **model.params}
    cats = sorted(data.cardinalities)
    nums = [i for i in range(data.X_train.shape[1]) if i not in data.cardinalities]
    categories = [np.arange(data.cardinalities[i], dtype=np.float64) for i in cats]
    prep = ColumnTransformer([
        ("num", Pipeline([("impute", SimpleImputer(strategy="median")),
                          ("scale", StandardScaler())]), nums),
        ("cat", OneHotEncoder(categories=categories, handle_unknown="ignore"), cats),
    ])
    regression = data.task == "regression"
    clf = (Ridge(alpha=1.0 / params["C"], random_state=model.seed) if regression else
           LogisticRegression(C=params["C"], max_iter=params["max_iter"], random_state=model.seed))
    pipe = Pipeline([("prep", prep), ("clf", clf)])
    if progress:
        progress(0, 1)
    pipe.fit(data.X_train.astype(np.float64), data.y_train)
    if progress:
        progress(1, 1)
    onnx_model = to_onnx(
        pipe, initial_types=[(ONNX_INPUT, FloatTensorType([None, data.X_train.shape[1]]))],
        options=None if regression else {id(clf): {"zipmap": False}}, target_opset=15,
        final_types=None,
    )

    def predict(X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if regression:
            return np.asarray(pipe.predict(X), dtype=np.float64)
        proba = pipe.predict_proba(X)
        return proba[:, 1] if data.task == "binary" else proba

    history = {}
    for split, X, y in (("train", data.X_train, data.y_train), ("validation", data.X_val, data.y_val)):
        for name, value in curve_metrics(data, y, predict(X)).items():
            history[f"{split}_{name}"] = [value]
    return FittedModel(kind="sklearn", predict=predict, onnx=task_output(onnx_model, data.task),
                       params=params, history=history, best_iteration=1)

