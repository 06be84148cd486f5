"""`flywheel import`: a model the team already has, registered as a challenger and gated like a
trained one.

The model must take the project's feature vector (the columns `flywheel train` builds, in the
feature spec's order: numbers as they are, NaN for missing, a category as its code in the
vocabulary learnt on the training slice) and answer for the project's task. Three formats:

- a LightGBM model file (`booster.save_model(...)`, text),
- an ONNX file with one float input of that width,
- a pickled scikit-learn estimator (`.pkl`, `.joblib`): unpickling runs code from the file, so it
  is loaded only by this command, on the user's say-so, with a warning; it is converted to ONNX
  here and the server only ever loads the ONNX.

Each is converted to ONNX with the task's one output and checked against the model it came from
on every holdout row (refused, with the reason, when it does not match), then scored on the
holdout against the champion, registered as `challenger`, gated and promoted if it passes; from
then on it is served, monitored and replaced by a retrained model that beats it, like any version.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.config import Project
from flywheel.core.errors import FlywheelError
from flywheel.core.progress import QuietReporter, Reporter
from flywheel.lifecycle.features import PreparedData
from flywheel.lifecycle.train import TrainResult, train_challenger
from flywheel.registry import Registry
from flywheel.training.model import FittedModel
from flywheel.training.onnx import (
    BOTH_CLASSES,
    ONNX_INPUT,
    ONNX_OUTPUT,
    new_session,
    session_predict,
    task_output,
)

log = logging.getLogger("flywheel.import")


class ModelImportError(FlywheelError):
    """The model cannot be imported as it is; the message says why and what would do."""


def read_model(path: Path, task: str, width: int, classes: int) -> FittedModel:
    """The file as a fitted model whose ONNX export answers for `task` over `width` features."""
    if not path.is_file():
        raise ModelImportError(f"{path}: no such file")
    raw = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _onnx_model(raw, task, width, classes)
    if suffix in (".pkl", ".pickle", ".joblib"):
        return _sklearn_model(path, task, width, classes)
    if raw.startswith(b"tree\n") or suffix in (".txt", ".lgb"):
        return _lightgbm_model(raw.decode(errors="replace"), task, width, classes)
    raise ModelImportError(f"{path}: not a model file this command reads (a LightGBM text model, an "
                       ".onnx file, or a pickled scikit-learn estimator as .pkl/.joblib)")


def _check_width(found: int | None, width: int, what: str) -> None:
    if found is not None and found != width:
        raise ModelImportError(f"{what} takes {found} features; this project's feature vector has {width} "
                           "(the model must be trained on the features `flywheel train` builds)")


def _lightgbm_model(text: str, task: str, width: int, classes: int) -> FittedModel:
    import lightgbm as lgb
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    from flywheel.training.trainers import float32_thresholds

    try:
        booster = lgb.Booster(model_str=float32_thresholds(text))
    except lgb.basic.LightGBMError as exc:
        raise ModelImportError(f"not a LightGBM model: {exc}") from None
    _check_width(booster.num_feature(), width, "the LightGBM model")
    objective = str(booster.params.get("objective") or _objective_line(text))
    wanted = {"binary": "binary", "regression": "regression", "multiclass": "multiclass"}[task]
    if not objective.startswith(wanted) and not (task == "regression" and objective in (
            "l2", "l1", "huber", "fair", "poisson", "quantile", "mape", "gamma", "tweedie")):
        raise ModelImportError(f"the LightGBM model's objective is '{objective}', not a {task} objective")
    if task == "multiclass" and booster.num_model_per_iteration() != classes:
        raise ModelImportError(f"the LightGBM model answers {booster.num_model_per_iteration()} classes; "
                           f"the project has {classes}")
    onnx_model = convert_lightgbm(booster, initial_types=[(ONNX_INPUT, FloatTensorType([None, width]))],
                                  zipmap=False, target_opset=15)
    return FittedModel(kind="imported-lightgbm",
                       predict=lambda X: np.asarray(booster.predict(X), dtype=np.float64),
                       onnx=task_output(onnx_model, task), params={"objective": objective},
                       best_iteration=booster.current_iteration(),
                       native_files={"model.lgb.txt": booster.model_to_string().encode()})


def _objective_line(text: str) -> str:
    for line in text.splitlines()[:50]:
        if line.startswith("objective="):
            return line.removeprefix("objective=").split()[0]
    return "unknown"


def _onnx_model(raw: bytes, task: str, width: int, classes: int) -> FittedModel:
    """An ONNX file as it is, given the task's one output: its first output (or its
    `probabilities` output, for a classifier that also answers a label) reshaped as the task wants."""
    import onnx

    try:
        model = onnx.load_from_string(raw)
        onnx.checker.check_model(model)
        session = new_session(raw)
    except Exception as exc:
        raise ModelImportError(f"not a valid ONNX model: {exc}") from None
    inputs = session.get_inputs()
    if len(inputs) != 1 or "float" not in inputs[0].type:
        raise ModelImportError("the ONNX model must take one float tensor (the feature vector); it takes "
                           + ", ".join(f"{i.name} {i.type}" for i in inputs))
    dims = inputs[0].shape
    _check_width(dims[1] if len(dims) == 2 and isinstance(dims[1], int) else None, width, "the ONNX model")
    if inputs[0].name != ONNX_INPUT:
        for node in model.graph.node:
            node.input[:] = [ONNX_INPUT if n == inputs[0].name else n for n in node.input]
        for graph_input in model.graph.input:
            if graph_input.name == inputs[0].name:
                graph_input.name = ONNX_INPUT
    names = [o.name for o in model.graph.output]
    source = BOTH_CLASSES if BOTH_CLASSES in names and task != "regression" else names[0]
    kept = [o for o in model.graph.output if o.name == source]  # a classifier's label: dropped
    del model.graph.output[:]
    model.graph.output.extend(kept)
    probe = np.zeros((3, width), dtype=np.float32)
    first = np.asarray(session.run([source], {inputs[0].name: probe})[0])
    exported = _as_task(model, source, first, task, classes)

    def predict(X: np.ndarray) -> np.ndarray:  # the file's own answer, as the task reads it
        out = np.asarray(session.run([source], {inputs[0].name: np.ascontiguousarray(X, np.float32)})[0])
        return _task_values(out, task)

    return FittedModel(kind="imported-onnx", predict=predict, onnx=exported, params={})


def _as_task(model: Any, source: str, sample: np.ndarray, task: str, classes: int) -> bytes:
    """The graph with the task's one output, named as serving reads it."""
    shape = sample.shape
    if task == "regression":
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise ModelImportError("a regression model must answer one value per row; this one "
                                   f"answers {shape}")
        return task_output(model, "regression")  # the first output, flattened and named `value`
    if task == "binary" and len(shape) == 1:  # P(positive) already
        _rename_output(model, source, ONNX_OUTPUT)
        return bytes(model.SerializeToString())
    width = shape[1] if len(shape) == 2 else 1
    if task == "multiclass" and width != classes:
        raise ModelImportError(f"the model answers {width} columns; the project has {classes} classes")
    if task == "binary" and width != 2:
        raise ModelImportError(f"a binary model must answer P(positive) or both classes' "
                               f"probabilities; this one answers {shape}")
    _rename_output(model, source, BOTH_CLASSES)
    return task_output(model, task)


def _rename_output(model: Any, old: str, new: str) -> None:
    if old == new:
        return
    for node in model.graph.node:
        node.output[:] = [new if n == old else n for n in node.output]
        node.input[:] = [new if n == old else n for n in node.input]
    for out in model.graph.output:
        if out.name == old:
            out.name = new


def _task_values(out: np.ndarray, task: str) -> np.ndarray:
    out = out.astype(np.float64)
    if task == "binary":
        return out[:, 1] if out.ndim == 2 else out
    if task == "regression":
        return out.reshape(-1)
    return out


def _sklearn_model(path: Path, task: str, width: int, classes: int) -> FittedModel:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    log.warning("unpickling %s runs code from the file: import only models you trust", path,
                extra={"event": "unpickle", "path": str(path)})
    try:
        if path.suffix.lower() == ".joblib":
            import joblib

            estimator = joblib.load(path)
        else:
            with path.open("rb") as fh:
                estimator = pickle.load(fh)  # noqa: S301  # the user's own file, on their explicit command
    except Exception as exc:
        raise ModelImportError(f"{path}: could not be unpickled ({exc})") from None
    _check_width(getattr(estimator, "n_features_in_", None), width, "the estimator")
    regression = task == "regression"
    if regression == hasattr(estimator, "predict_proba"):
        kind = "regressor" if regression else "classifier"
        raise ModelImportError(f"{type(estimator).__name__} is not a {kind}; the project's task is {task}")
    found = len(getattr(estimator, "classes_", [])) or None
    if not regression and found != (2 if task == "binary" else classes):
        raise ModelImportError(f"the estimator knows {found} classes; the project's task needs "
                           f"{2 if task == 'binary' else classes}")
    try:
        onnx_model = to_onnx(estimator, initial_types=[(ONNX_INPUT, FloatTensorType([None, width]))],
                             options=None if regression else {id(estimator): {"zipmap": False}},
                             target_opset=15)
    except Exception as exc:
        raise ModelImportError(f"skl2onnx cannot convert {type(estimator).__name__} exactly: {exc}") from None

    def predict(X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if regression:
            return np.asarray(estimator.predict(X), dtype=np.float64).reshape(-1)
        return _task_values(np.asarray(estimator.predict_proba(X)), task)

    return FittedModel(kind=f"imported-{type(estimator).__name__}", predict=predict,
                       onnx=task_output(onnx_model, task), params={})


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def onnx_answers(onnx_bytes: bytes, X: np.ndarray) -> np.ndarray:
    """What the registered export answers (the same session options as serving)."""
    return session_predict(new_session(onnx_bytes), X)


def import_challenger(project: Project, path: Path, reporter: Reporter | None = None,
                      registry: Registry | None = None) -> TrainResult:
    """The whole import: `flywheel train`'s use case (extract and check the configured window,
    register, score the champion on the same holdout, gate, promote) with the model read from
    `path` instead of trained."""
    reporter = reporter or QuietReporter()

    def read(prepared: PreparedData) -> tuple[FittedModel, dict[str, str]]:
        with reporter.step(f"Read {path.name} and convert it to ONNX"):
            spec = prepared.spec
            fitted = read_model(path, spec.task, len(spec.names), len(spec.classes))
        return fitted, {"model_type": fitted.kind, "imported_from": path.name,
                        "imported_sha256": file_sha256(path)}

    return train_challenger(project, reporter, registry, model_from=read)
