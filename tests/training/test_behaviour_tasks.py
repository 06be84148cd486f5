"""Behavioural tests of the regression (flights) and multiclass (bikeshare) example models, as for
the binary one: each change names a feature, a direction taken from the training slice (never
from belief) and a share of rows that must follow it; holdout rows are changed in their raw
fields, features rebuilt with the model's own spec, and the ONNX export scores both versions."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flywheel.config import ModelConfig, Project, load_project
from flywheel.data.features import build_matrix
from flywheel.data.sources import TARGET
from flywheel.lifecycle.features import PreparedData, prepare_frame
from flywheel.training.model import FittedModel
from flywheel.training.onnx import onnx_predict
from flywheel.training.trainers import train_model

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.xdist_group("training-behaviour-tasks")


def _prepared(name: str, fixture: str, target: str, folder: Path) -> tuple[Project, PreparedData]:
    folder.mkdir(parents=True)
    shutil.copy(REPO / "examples" / name / "flywheel.yaml", folder / "flywheel.yaml")
    project = load_project(folder / "flywheel.yaml", env={"FLYWHEEL_HOME": str(folder / ".flywheel")})
    data = project.config.data
    frame = pd.read_parquet(REPO / "tests" / "fixtures" / fixture)
    frame = frame[frame[data.time_column] < pd.Timestamp(data.window.end)].dropna(subset=[target])
    frame = frame.assign(**{TARGET: frame[target]}).reset_index(drop=True)
    return project, prepare_frame(project, frame)


@pytest.fixture(scope="module")
def flights(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreparedData, FittedModel]:
    _, prep = _prepared("flights", "flights_sample.parquet", "arr_delay",
                        tmp_path_factory.mktemp("b") / "flights")
    return prep, train_model(ModelConfig(type="lightgbm"), prep.training_data())


@pytest.fixture(scope="module")
def hours(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreparedData, FittedModel]:
    _, prep = _prepared("bikeshare", "bikeshare.parquet", "weathersit",
                        tmp_path_factory.mktemp("b") / "hours")
    return prep, train_model(ModelConfig(type="lightgbm"), prep.training_data())


def _scores(fitted: FittedModel, prep: PreparedData, rows: pd.DataFrame) -> np.ndarray:
    return onnx_predict(fitted.onnx, build_matrix(prep.spec, rows))


def test_flights_evening_departures_are_predicted_later(flights: tuple[PreparedData, FittedModel]) -> None:
    prep, fitted = flights
    train = prep.frame.iloc[prep.split.train]
    # +1: evening departures (17:00 and later) arrive later than morning ones in the training slice
    direction = 1.0 if train.loc[train["hour"] >= 17, TARGET].mean() > train.loc[
        train["hour"] <= 9, TARGET].mean() else -1.0
    hold = prep.frame.iloc[prep.split.holdout]
    before = hold[hold["hour"] <= 9]
    after = before.assign(hour=18)
    assert len(before) > 300
    delta = (_scores(fitted, prep, after) - _scores(fitted, prep, before)) * direction
    # a contract with margin: the first run measured 97% (trees are not monotone in one input)
    assert np.mean(delta >= -1e-9) >= 0.85 and delta.mean() > 0


def test_flights_invariance_and_minimum_functionality(flights: tuple[PreparedData, FittedModel]) -> None:
    prep, fitted = flights
    hold = prep.frame.iloc[prep.split.holdout]
    changed = hold.assign(dep_delay=999.0, flight_id=0)  # read by no feature
    v = _scores(fitted, prep, hold)
    assert np.array_equal(v, _scores(fitted, prep, changed))
    y = hold[TARGET].to_numpy()
    top = v >= np.quantile(v, 0.9)
    bottom = v <= np.median(v)
    assert y[top].mean() > y[bottom].mean() + 5  # minutes: the latest-predicted tenth arrives later


def test_hours_humid_hours_are_predicted_rainier(hours: tuple[PreparedData, FittedModel]) -> None:
    prep, fitted = hours
    rain = prep.spec.classes.index("rain/snow")
    train = prep.frame.iloc[prep.split.train]
    wet = (train[TARGET] == "rain/snow")
    direction = 1.0 if wet[train["hum"] >= 0.85].mean() > wet[train["hum"] < 0.5].mean() else -1.0
    hold = prep.frame.iloc[prep.split.holdout]
    before = hold[hold["hum"] < 0.5]
    after = before.assign(hum=0.92)
    assert len(before) > 100
    delta = (_scores(fitted, prep, after)[:, rain] - _scores(fitted, prep, before)[:, rain]) * direction
    # the first run measured 100%
    assert np.mean(delta >= -1e-9) >= 0.85 and delta.mean() > 0


def test_hours_minimum_functionality(hours: tuple[PreparedData, FittedModel]) -> None:
    prep, fitted = hours
    rain = prep.spec.classes.index("rain/snow")
    hold = prep.frame.iloc[prep.split.holdout]
    P = _scores(fitted, prep, hold)
    assert np.allclose(P.sum(axis=1), 1, atol=1e-5)
    wet = (hold[TARGET] == "rain/snow").to_numpy()
    top = P[:, rain] >= np.quantile(P[:, rain], 0.9)
    bottom = P[:, rain] <= np.median(P[:, rain])
    assert wet[top].mean() > 2 * wet[bottom].mean()
    changed = hold.assign(weekday=0, holiday=1)  # read by no feature
    assert np.array_equal(P, _scores(fitted, prep, changed))
