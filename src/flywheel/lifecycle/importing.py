"""`flywheel import`: a model the team already has, registered as a challenger and gated like a
trained one.

Two kinds of model:

- over the project's feature vector (the columns `flywheel train` builds, in the feature spec's
  order: numbers as they are, NaN for missing, a category as its code in the vocabulary learnt on
  the training slice): a LightGBM model file, an ONNX file with one float input, or a pickled
  scikit-learn estimator;
- over the table's raw columns, with its own preprocessing: a scikit-learn `Pipeline` (say a
  `ColumnTransformer` then a model) fitted on a DataFrame, an ONNX file whose inputs name the
  columns, or an MLflow model (a folder, `runs:/...` or `models:/...`; sklearn or onnx flavor). It
  is served from its own inputs (see `raw_inputs`).

Unpickling runs code from the file, so a pickle (or an MLflow sklearn model) is loaded only by
this command, and only when the user says so (`--allow-pickle`), with a warning; it is converted
to ONNX here and the server only ever loads the ONNX. Each export is checked against the model it
came from on every holdout row (refused, with the reason, when it does not match), then scored on
the holdout against the champion, registered as `challenger`, gated and promoted if it passes;
from then on it is served, monitored and replaced by a retrained model that beats it, like any version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.config import Project
from flywheel.core.errors import FlywheelError
from flywheel.core.extras import MissingExtra, how_to_install
from flywheel.core.progress import QuietReporter, Reporter
from flywheel.lifecycle.features import PreparedData
from flywheel.lifecycle.raw_inputs import (
    declared_inputs,
    raw_frame,
    raw_prepared,
    session_feed,
    with_adapter,
)
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
from flywheel.training.trainers import float32_thresholds

log = logging.getLogger("flywheel.import")


class ModelImportError(FlywheelError):
    """The model cannot be imported as it is; the message says why and what would do."""


def read_model(path: Path, task: str, width: int, classes: int, allow_pickle: bool = False) -> FittedModel:
    """A model file over the project's feature vector as a fitted model whose ONNX export answers
    for `task` over `width` features; a pickle only with `allow_pickle`."""
    if not path.is_file():
        raise ModelImportError(f"{path}: no such file")
    raw = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _onnx_model(raw, task, width, classes)
    if suffix in (".pkl", ".pickle", ".joblib"):
        return _sklearn_model(_unpickle(path, allow_pickle), task, width, classes)
    if raw.startswith(b"tree\n") or suffix in (".txt", ".lgb"):
        return _lightgbm_model(raw.decode(errors="replace"), task, width, classes)
    if suffix in (".json", ".ubj", ".xgb"):
        return _xgboost_model(path, task, width, classes)
    raise ModelImportError(f"{path}: not a model file this command reads (a LightGBM text model, an "
                           "XGBoost model as .json/.ubj, an .onnx file, a pickled scikit-learn "
                           "estimator as .pkl/.joblib, or an MLflow model folder or URI)")


def read_for_project(source: str, prepared: PreparedData, allow_pickle: bool = False
                     ) -> tuple[FittedModel, PreparedData]:
    """The model at `source` (a file, an MLflow model folder, or a `models:/`/`runs:/` URI) and the
    data it reads: the project's prepared features, or its own raw columns. A pickle (or an MLflow
    sklearn model, which is one) only with `allow_pickle`."""
    spec = prepared.spec
    task, width, classes = spec.task, len(spec.names), len(spec.classes)
    path = Path(source)
    if ":/" in source or (path / "MLmodel").is_file():
        model = _mlflow_model(source, allow_pickle)
    elif path.suffix.lower() in (".pkl", ".pickle", ".joblib") and path.is_file():
        model = _unpickle(path, allow_pickle)
    elif path.suffix.lower() == ".onnx" and path.is_file():
        model = path.read_bytes()
    else:
        return read_model(path, task, width, classes, allow_pickle), prepared
    columns = _raw_columns(model, prepared)
    if columns is None:
        fitted = (_onnx_model(model, task, width, classes) if isinstance(model, bytes)
                  else _sklearn_model(model, task, width, classes))
        return fitted, prepared
    given = raw_prepared(prepared, columns)
    fitted = (_raw_onnx_model(model, given) if isinstance(model, bytes)
              else _raw_sklearn_model(model, given))
    return fitted, given


def _raw_columns(model: Any, prepared: PreparedData) -> list[str] | None:
    """The table columns a model reads when it reads raw columns (its inputs name them), else None
    (it takes the feature vector)."""
    if isinstance(model, bytes):
        try:
            names = [i.name for i in new_session(model).get_inputs()]
        except Exception as exc:
            raise ModelImportError(f"not a valid ONNX model: {exc}") from None
        if len(names) == 1 and names[0] not in prepared.frame.columns:
            return None
        return names
    names = [str(n) for n in getattr(model, "feature_names_in_", [])]
    if not names or names == prepared.spec.names or not all(n in prepared.frame.columns for n in names):
        return None
    return names


PICKLE_REFUSED = ("unpickling runs code from the file: if you trust it, import it with --allow-pickle "
                  "(allow_pickle=True from Python); or export it as ONNX, or a LightGBM or XGBoost "
                  "model file, which load without running code")


def _unpickle(path: Path, allowed: bool) -> Any:
    if not allowed:
        raise ModelImportError(f"{path}: a pickle; {PICKLE_REFUSED}")
    log.warning("unpickling %s runs code from the file: import only models you trust", path,
                extra={"event": "unpickle", "path": str(path)})
    try:
        if path.suffix.lower() == ".joblib":
            import joblib

            return joblib.load(path)
        with path.open("rb") as fh:
            return pickle.load(fh)  # noqa: S301  # the user's own file, on their explicit command
    except Exception as exc:
        raise ModelImportError(f"{path}: could not be unpickled ({exc})") from None


def _mlflow_model(uri: str, allow_pickle: bool) -> Any:
    """An MLflow model's scikit-learn estimator (unpickled, with the warning) or ONNX bytes."""
    import mlflow

    try:
        flavors = mlflow.models.get_model_info(uri).flavors
    except Exception as exc:
        raise ModelImportError(f"{uri}: not an MLflow model this store can read ({exc})") from None
    if "onnx" in flavors:
        return mlflow.onnx.load_model(uri).SerializeToString()
    if "sklearn" in flavors:
        if not allow_pickle:
            raise ModelImportError(f"{uri}: an MLflow sklearn model is a pickle; {PICKLE_REFUSED}")
        log.warning("loading %s unpickles it: import only models you trust", uri,
                    extra={"event": "unpickle", "path": uri})
        return mlflow.sklearn.load_model(uri)
    raise ModelImportError(f"{uri}: an MLflow model of flavor(s) {', '.join(flavors)}; this command "
                           "reads the sklearn and onnx flavors")


def _raw_sklearn_model(estimator: Any, given: PreparedData) -> FittedModel:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    spec = given.spec
    task = spec.task
    _check_estimator(estimator, task, len(spec.classes))
    regression = task == "regression"
    initial = [(c, StringTensorType([None, 1]) if spec.input_types[c] == "string" else
                FloatTensorType([None, 1])) for c in spec.input_columns]
    try:
        proto = to_onnx(estimator, initial_types=initial, target_opset=15,
                        options=None if regression else {id(estimator): {"zipmap": False}})
    except Exception as exc:
        raise ModelImportError(f"skl2onnx cannot convert {type(estimator).__name__} exactly: {exc}") from None

    def predict(X: np.ndarray) -> np.ndarray:
        frame = raw_frame(spec, X)
        if regression:
            return np.asarray(estimator.predict(frame), dtype=np.float64).reshape(-1)
        return _task_values(np.asarray(estimator.predict_proba(frame)), task)

    return _adapted(proto, spec, predict, f"imported-{type(estimator).__name__}")


def _raw_onnx_model(raw: bytes, given: PreparedData) -> FittedModel:
    import onnx

    spec = given.spec
    session = new_session(raw)
    inputs = declared_inputs(session)
    ranks = {i.name: len(i.shape) for i in session.get_inputs()}
    source = _output_name(onnx.load_from_string(raw), spec.task)

    def predict(X: np.ndarray) -> np.ndarray:
        out = session.run([source], session_feed(inputs, ranks, raw_frame(spec, X)))[0]
        return _task_values(np.asarray(out), spec.task)

    return _adapted(onnx.load_from_string(raw), spec, predict, "imported-onnx")


def _output_name(model: Any, task: str) -> str:
    names = [o.name for o in model.graph.output]
    return BOTH_CLASSES if BOTH_CLASSES in names and task != "regression" else names[0]


def _adapted(proto: Any, spec: Any, predict: Any, kind: str) -> FittedModel:
    """A raw-column model behind the adapter, with the task's one output."""
    source = _output_name(proto, spec.task)
    kept = [o for o in proto.graph.output if o.name == source]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    adapted = with_adapter(proto, spec)
    probe = np.zeros((3, len(spec.names)), dtype=np.float32)
    try:
        sample = np.asarray(new_session(adapted.SerializeToString()).run([source], {ONNX_INPUT: probe})[0])
    except Exception as exc:
        raise ModelImportError(f"the model cannot be fed from the feature vector: {exc}") from None
    exported = _as_task(adapted, source, sample, spec.task, len(spec.classes))
    return FittedModel(kind=kind, predict=predict, onnx=exported, params={"inputs": "raw columns"})


def _check_width(found: int | None, width: int, what: str) -> None:
    if found is not None and found != width:
        raise ModelImportError(f"{what} takes {found} features; this project's feature vector has {width} "
                           "(the model must be trained on the features `flywheel train` builds)")


def _lightgbm_model(text: str, task: str, width: int, classes: int) -> FittedModel:
    import lightgbm as lgb
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

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


XGBOOST_OBJECTIVES = {"binary": ("binary:logistic",), "multiclass": ("multi:softprob",),
                      "regression": ("reg:squarederror", "reg:absoluteerror", "reg:pseudohubererror",
                                     "reg:squaredlogerror", "reg:tweedie", "reg:gamma", "count:poisson")}


def _xgboost_model(path: Path, task: str, width: int, classes: int) -> FittedModel:
    """An XGBoost booster saved with `save_model` (JSON or UBJSON), over the feature vector."""
    try:
        import xgboost as xgb
    except ImportError:
        raise MissingExtra(f"reading an XGBoost model needs xgboost: {how_to_install('xgboost')}") from None
    from onnxmltools import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    try:
        booster = xgb.Booster(model_file=str(path))
    except xgb.core.XGBoostError as exc:
        raise ModelImportError(f"{path}: not an XGBoost model ({str(exc).splitlines()[0]})") from None
    _check_width(booster.num_features(), width, "the XGBoost model")
    learner = json.loads(booster.save_config())["learner"]
    objective = learner["objective"]["name"]
    if objective not in XGBOOST_OBJECTIVES[task]:
        raise ModelImportError(f"the XGBoost model's objective is '{objective}', not a {task} objective "
                               f"({', '.join(XGBOOST_OBJECTIVES[task])})")
    found = int(learner["learner_model_param"].get("num_class", 0))
    if task == "multiclass" and found != classes:
        raise ModelImportError(f"the XGBoost model answers {found} classes; the project has {classes}")
    booster.feature_names = None  # the converter names the columns f0, f1, ... itself
    onnx_model = convert_xgboost(booster, initial_types=[(ONNX_INPUT, FloatTensorType([None, width]))],
                                 target_opset=15)
    names = [o.name for o in onnx_model.graph.output]
    if task != "regression":
        kept = [o for o in onnx_model.graph.output if o.name == BOTH_CLASSES]
        del onnx_model.graph.output[:]
        onnx_model.graph.output.extend(kept or [])
        if not kept:
            raise ModelImportError(f"the XGBoost export has outputs {names}, no probabilities")

    def predict(X: np.ndarray) -> np.ndarray:
        return np.asarray(booster.predict(xgb.DMatrix(X)), dtype=np.float64)

    return FittedModel(kind="imported-xgboost", predict=predict, onnx=task_output(onnx_model, task),
                       params={"objective": objective}, best_iteration=booster.num_boosted_rounds(),
                       native_files={"model.xgb.json": path.read_bytes() if path.suffix == ".json"
                                     else booster.save_raw("json").decode().encode()})


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


def _check_estimator(estimator: Any, task: str, classes: int) -> None:
    regression = task == "regression"
    if regression == hasattr(estimator, "predict_proba"):
        kind = "regressor" if regression else "classifier"
        raise ModelImportError(f"{type(estimator).__name__} is not a {kind}; the project's task is {task}")
    found = len(getattr(estimator, "classes_", [])) or None
    if not regression and found != (2 if task == "binary" else classes):
        raise ModelImportError(f"the estimator knows {found} classes; the project's task needs "
                               f"{2 if task == 'binary' else classes}")


def _sklearn_model(estimator: Any, task: str, width: int, classes: int) -> FittedModel:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    _check_width(getattr(estimator, "n_features_in_", None), width, "the estimator")
    _check_estimator(estimator, task, classes)
    regression = task == "regression"
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
                      registry: Registry | None = None, allow_pickle: bool = False) -> TrainResult:
    """The whole import: `flywheel train`'s use case (extract and check the configured window,
    register, score the champion on the same holdout, gate, promote) with the model read from
    `path` instead of trained."""
    reporter = reporter or QuietReporter()

    def read(prepared: PreparedData) -> tuple[FittedModel, dict[str, str], PreparedData]:
        with reporter.step(f"Read {path.name} and convert it to ONNX"):
            fitted, given = read_for_project(str(path), prepared, allow_pickle)
        return fitted, {"model_type": fitted.kind,
                        "imported_from": path.name if path.is_file() else str(path),
                        "imported_sha256": file_sha256(path) if path.is_file() else "",
                        "inputs": "raw columns" if given is not prepared else "features"}, given

    return train_challenger(project, reporter, registry, model_from=read)
