"""`flywheel import`: a model trained elsewhere on the project's features is converted, checked,
gated against the champion and served like a trained one; what cannot be imported exactly is
refused with the reason."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from starlette.testclient import TestClient
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.config import Project, load_project
from flywheel.data.sources import infer_sql_types, write_table
from flywheel.lifecycle.features import extract_training_window, prepare_features
from flywheel.lifecycle.importing import ModelImportError, import_challenger
from flywheel.lifecycle.train import train_challenger
from flywheel.registry import CHAMPION, Registry
from flywheel.serving.tabular.app import create_app

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.xdist_group("import")


def _project(name: str, folder: Path, fixture: str, patch: str = "") -> Project:
    folder.mkdir(parents=True)
    text = (REPO / "examples" / name / "flywheel.yaml").read_text() + patch
    (folder / "flywheel.yaml").write_text(text)
    project = load_project(folder / "flywheel.yaml", env={"FLYWHEEL_HOME": str(folder / ".flywheel")})
    frame = pd.read_parquet(REPO / "tests" / "fixtures" / fixture)
    data = project.config.data
    history = frame[frame[data.time_column] < pd.Timestamp(data.window.end)]
    write_table(history, project.source_url, data.table, infer_sql_types(history),
                index_columns=(data.time_column,))
    return project


@pytest.fixture(scope="module")
def hours(tmp_path_factory: pytest.TempPathFactory) -> Project:
    project = _project("bikeshare", tmp_path_factory.mktemp("imp") / "hours", "bikeshare.parquet")
    assert train_challenger(project).promoted
    return project


def test_a_lightgbm_model_trained_elsewhere_is_gated_and_served(hours: Project, tmp_path: Path) -> None:
    prepared = prepare_features(hours, extract_training_window(hours))
    data = prepared.training_data()
    booster = lgb.train({"objective": "multiclass", "num_class": 3, "learning_rate": 0.1,
                         "num_leaves": 15, "verbose": -1, "seed": 7},
                        lgb.Dataset(data.X_train, data.y_train), num_boost_round=60)
    path = tmp_path / "team-model.txt"
    booster.save_model(str(path))
    before = Registry.for_project(hours).alias_version(CHAMPION)
    result = import_challenger(hours, path)
    assert result.model_type == "imported-lightgbm" and result.version == before + 1
    assert result.onnx_max_abs_diff < 1e-4
    hold = prepared.split.holdout
    P = booster.predict(prepared.X[hold])
    assert result.metrics["log_loss"] == pytest.approx(
        -np.mean(np.log(np.clip(P[np.arange(len(hold)), prepared.y[hold]], 1e-7, 1))), rel=1e-3)
    assert result.champion_version == before and result.champion_metrics is not None
    info = Registry.for_project(hours).version(result.version)
    assert info.run_tags["imported_from"] == "team-model.txt" and len(info.run_tags["imported_sha256"]) == 64
    assert info.tags["gate"] == ("passed" if result.gate.passed else "failed")
    if result.promoted:  # served like any version
        with TestClient(create_app(hours)) as client:
            assert client.get("/v1/models").json()["version"] == result.version


def test_a_pickled_pipeline_and_an_onnx_file_are_converted_exactly(hours: Project, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    prepared = prepare_features(hours, extract_training_window(hours))
    data = prepared.training_data()
    pipe = make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(max_iter=500)).fit(
        data.X_train, data.y_train)
    pickled = tmp_path / "pipe.pkl"
    pickled.write_bytes(pickle.dumps(pipe))
    with pytest.raises(ModelImportError, match="--allow-pickle"):  # never without being asked
        import_challenger(hours, pickled)
    assert not any(r.__dict__.get("event") == "unpickle" for r in caplog.records)
    result = import_challenger(hours, pickled, allow_pickle=True)
    assert result.model_type == "imported-Pipeline" and result.onnx_max_abs_diff < 1e-4
    assert any(r.__dict__.get("event") == "unpickle" for r in caplog.records)
    # the same estimator as an ONNX file of its own, with the converter's names and label output
    onnx_file = tmp_path / "pipe.onnx"
    onnx_file.write_bytes(to_onnx(pipe, initial_types=[("float_input", FloatTensorType([None, 9]))],
                                  options={id(pipe.steps[-1][1]): {"zipmap": False}},
                                  target_opset=15).SerializeToString())
    again = import_challenger(hours, onnx_file)
    assert again.model_type == "imported-onnx"
    assert again.metrics["log_loss"] == pytest.approx(result.metrics["log_loss"], abs=1e-4)


def test_what_cannot_be_imported_is_refused_with_the_reason(hours: Project, tmp_path: Path) -> None:
    prepared = prepare_features(hours, extract_training_window(hours))
    data = prepared.training_data()
    cases = {
        "narrow.txt": (lgb.train({"objective": "multiclass", "num_class": 3, "verbose": -1},
                                 lgb.Dataset(data.X_train[:, :4], data.y_train), 5),
                       "takes 4 features; this project's feature vector has 9"),
        "ridge.pkl": (make_pipeline(SimpleImputer(), Ridge()).fit(data.X_train, data.y_train),
                      "is not a classifier"),
        "binary.txt": (lgb.train({"objective": "binary", "verbose": -1},
                                 lgb.Dataset(data.X_train, data.y_train == 0), 5),
                       "objective is 'binary', not a multiclass objective"),
    }
    for name, (model, message) in cases.items():
        path = tmp_path / name
        if name.endswith(".txt"):
            model.save_model(str(path))
        else:
            path.write_bytes(pickle.dumps(model))
        with pytest.raises(ModelImportError, match=message):
            import_challenger(hours, path, allow_pickle=True)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    runner = CliRunner()
    res = runner.invoke(app, ["import", "--config", str(hours.path), "--model", str(junk)],
                        env={"FLYWHEEL_HOME": str(hours.home)})
    assert res.exit_code == 1 and "not a valid ONNX model" in res.output


def test_a_regression_model_is_imported_too(tmp_path: Path) -> None:
    project = _project("flights", tmp_path / "flights", "flights_sample.parquet")
    prepared = prepare_features(project, extract_training_window(project))
    data = prepared.training_data()
    model = make_pipeline(SimpleImputer(), Ridge()).fit(data.X_train, data.y_train)
    path = tmp_path / "ridge.joblib"
    import joblib

    joblib.dump(model, path)
    result = import_challenger(project, path, allow_pickle=True)
    hold = prepared.split.holdout
    expected = np.sqrt(np.mean((model.predict(prepared.X[hold]) - prepared.y[hold]) ** 2))
    assert result.metrics["rmse"] == pytest.approx(expected, rel=1e-4)
    assert result.promoted == result.gate.passed  # no champion yet: the floor decides
    shutil.rmtree(tmp_path / "flights", ignore_errors=True)


@pytest.fixture(scope="module")
def flights_raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Project, pd.DataFrame, object]:
    """A flights project and a team's own pipeline over raw columns (its preprocessing inside)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder

    project = _project("flights", tmp_path_factory.mktemp("imp") / "raw", "flights_sample.parquet")
    frame = pd.read_parquet(REPO / "tests" / "fixtures" / "flights_sample.parquet")
    history = frame[(frame["scheduled"] < "2013-07-01")].dropna(subset=["arr_delay"])
    numbers, texts = ["distance", "hour", "precip", "visib"], ["carrier", "origin"]
    pipe = make_pipeline(ColumnTransformer([
        ("num", make_pipeline(SimpleImputer(), StandardScaler()), numbers),
        ("cat", OneHotEncoder(handle_unknown="ignore"), texts)]), Ridge())
    pipe.fit(history[numbers + texts], history["arr_delay"])
    return project, frame, pipe


def test_a_pipeline_over_raw_columns_is_served_from_its_own_inputs(flights_raw, tmp_path: Path) -> None:
    project, frame, pipe = flights_raw
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps(pipe))
    result = import_challenger(project, path, allow_pickle=True)
    assert result.model_type == "imported-Pipeline" and result.onnx_max_abs_diff < 1e-3
    spec = result.prepared.spec
    assert spec.input_columns == ["distance", "hour", "precip", "visib", "carrier", "origin"]
    assert spec.input_types["carrier"] == "string" and spec.input_types["distance"] == "number"
    hold = result.prepared.frame.iloc[result.prepared.split.holdout]
    expected = pipe.predict(hold[spec.input_columns])
    rmse = float(np.sqrt(np.mean((expected - hold["__target__"]) ** 2)))
    assert result.metrics["rmse"] == pytest.approx(rmse, rel=1e-4)
    assert result.promoted  # the first model: the floor decides, and it holds
    row = frame.iloc[-1]
    record = {c: (None if pd.isna(row[c]) else row[c].item() if hasattr(row[c], "item") else row[c])
              for c in spec.input_columns}
    with TestClient(create_app(project)) as client:
        served = client.post("/v1/predict", json=record)
        refused = client.post("/v1/predict", json={**record, "dest": "BOS"})  # not an input of this model
        missing = client.post("/v1/predict", json={k: v for k, v in record.items() if k != "carrier"})
    assert served.status_code == 200, served.text
    value = served.json()["predictions"][0]["value"]
    assert value == pytest.approx(float(pipe.predict(pd.DataFrame([record]))[0]), abs=1e-3)
    assert refused.status_code == 422 and missing.status_code == 422
    # an airline the window never saw reaches the pipeline as unknown: its one-hot is all zeros
    unseen = {**record, "carrier": "ZZ"}
    with TestClient(create_app(project)) as client:
        answer = client.post("/v1/predict", json=unseen).json()["predictions"][0]["value"]
    assert answer == pytest.approx(float(pipe.predict(pd.DataFrame([unseen]))[0]), abs=1e-3)


def test_an_onnx_file_and_an_mlflow_model_over_raw_columns(flights_raw, tmp_path: Path) -> None:
    import mlflow
    from mlflow.models import infer_signature
    from skl2onnx.common.data_types import StringTensorType

    project, frame, pipe = flights_raw
    columns = ["distance", "hour", "precip", "visib", "carrier", "origin"]
    types = [(c, StringTensorType([None, 1]) if c in ("carrier", "origin") else FloatTensorType([None, 1]))
             for c in columns]
    onnx_file = tmp_path / "raw.onnx"
    onnx_file.write_bytes(to_onnx(pipe, initial_types=types, target_opset=15).SerializeToString())
    from_onnx = import_challenger(project, onnx_file)
    assert from_onnx.model_type == "imported-onnx"
    assert from_onnx.prepared.spec.input_columns == columns
    registry = Registry.for_project(project)
    sample = frame[columns].head(50)
    with mlflow.start_run(experiment_id=registry.experiment_id) as run:
        mlflow.sklearn.log_model(pipe, name="team", signature=infer_signature(sample, pipe.predict(sample)),
                                 skops_trusted_types=["numpy.dtype"])
    with pytest.raises(ModelImportError, match="MLflow sklearn model is a pickle"):
        import_challenger(project, Path(f"runs:/{run.info.run_id}/team"))
    from_mlflow = import_challenger(project, Path(f"runs:/{run.info.run_id}/team"), allow_pickle=True)
    assert from_mlflow.metrics["rmse"] == pytest.approx(from_onnx.metrics["rmse"], rel=1e-4)
    assert registry.version(from_mlflow.version).run_tags["imported_from"] == f"runs:/{run.info.run_id}/team"


def test_an_xgboost_champion_is_replaced_by_a_retrained_model_that_beats_it(tmp_path: Path) -> None:
    import xgboost as xgb

    project = _project("bikeshare", tmp_path / "xgb", "bikeshare.parquet")
    prepared = prepare_features(project, extract_training_window(project))
    data = prepared.training_data()
    # a team's quick model: two shallow rounds, much weaker than Flywheel's own
    weak = xgb.train({"objective": "multi:softprob", "num_class": 3, "max_depth": 1, "eta": 0.3},
                     xgb.DMatrix(data.X_train, label=data.y_train), num_boost_round=2)
    path = tmp_path / "team.json"
    weak.save_model(str(path))
    imported = import_challenger(project, path)
    assert imported.model_type == "imported-xgboost" and imported.onnx_max_abs_diff < 1e-4
    hold = prepared.split.holdout
    P = weak.predict(xgb.DMatrix(prepared.X[hold]))
    assert imported.metrics["accuracy"] == pytest.approx(np.mean(P.argmax(axis=1) == prepared.y[hold]))
    assert imported.promoted and Registry.for_project(project).alias_version(CHAMPION) == imported.version
    retrained = train_challenger(project)
    assert retrained.champion_version == imported.version
    assert retrained.metrics["log_loss"] < imported.metrics["log_loss"] and retrained.promoted
    assert Registry.for_project(project).alias_version(CHAMPION) == retrained.version
    binary = xgb.train({"objective": "binary:logistic"},
                       xgb.DMatrix(data.X_train, label=data.y_train == 0), num_boost_round=2)
    binary.save_model(str(tmp_path / "binary.json"))
    with pytest.raises(ModelImportError, match="objective is 'binary:logistic', not a multiclass objective"):
        import_challenger(project, tmp_path / "binary.json")
