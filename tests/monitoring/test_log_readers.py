"""The monitor's verdicts on the same predictions logged two ways: as JSON text per row (how a log
written before the columnar log holds them, and how the monitor read every row until then) and
as segments (the log sink's columns). Same drift scores, same unseen-category counts, same
prediction drift, for every task, on rows with nulls, unseen categories and mixed types."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from flywheel.config import CategoryFeature, FlagFeature, MonitorWindow, NumericFeature, RatioFeature
from flywheel.data.features import build_matrix, fit_spec
from flywheel.monitoring.drift import build_profile, detect_drift
from flywheel.monitoring.monitor import (
    PREDICTION,
    read_window,
    served_prediction,
    side_by_side,
    unseen_categories,
)
from flywheel.monitoring.reference import feature_frame
from flywheel.serving.tabular.logsink import write
from flywheel.serving.tabular.predlog import insert_sql
from flywheel.state.db import close_state, open_state
from tests.state.test_segments import as_json_rows, frames, served

FEATURES = [
    NumericFeature(kind="numeric", name="amount", column="amount"),
    NumericFeature(kind="numeric", name="term", column="term"),
    RatioFeature(kind="ratio", name="per_term", numerator="amount", denominator="term"),
    CategoryFeature(kind="category", name="state", column="state", min_count=5),
    CategoryFeature(kind="category", name="code", column="code", min_count=5),
    FlagFeature(kind="flag", name="urban", column="urban", op="==", value=1),
]
TASKS = {"binary": None, "regression": "value", "multiclass": "label"}


def training_rows(n: int, rng: np.random.Generator) -> pd.DataFrame:
    return pd.DataFrame({"amount": rng.lognormal(3, 1, n), "term": rng.integers(1, 300, n),
                         "state": rng.choice(["CA", "TX", "NY", "WA"], n),
                         "code": rng.choice(["a1", "b2", "c3"], n), "urban": rng.integers(0, 2, n)})


def logged_rows(n: int, task: str, rng: np.random.Generator) -> list[list]:
    """What clients sent: nulls, categories the model never saw, a column that mixes numbers and
    texts, shifted amounts; and what the model answered, by task."""
    out = []
    for i in range(n):
        inputs = {"amount": None if i % 13 == 0 else float(rng.lognormal(3.4, 1)),
                  "term": int(rng.integers(1, 300)),
                  "state": None if i % 9 == 0 else ["CA", "TX", "NY", "WA", "ZZ", "QQ"][i % 6],
                  "code": ["a1", "b2", 7, "zz"][i % 4],  # a number among texts: mixed types
                  "urban": None if i % 11 == 0 else i % 2}
        meta = {"entity_id": f"e{i}"} if i % 2 else None
        task_out = None
        if task == "regression":
            task_out = (float(rng.normal(10, 3)), None, None)
        elif task == "multiclass":
            task_out = (None, ["low", "mid", "high", "new"][i % 4], {"low": 0.2, "mid": 0.5, "high": 0.3})
        row = served(i, inputs, meta, task=task_out)
        if task == "binary":
            row[6] = float(rng.random())
        out.append(row)
    return out


def verdict(engine, model: str, spec, profile, window: MonitorWindow):
    frame = read_window(engine, model, window, None, None, spec.input_columns)
    X = build_matrix(spec, frame)
    current = feature_frame(spec, X)
    current[PREDICTION] = served_prediction(spec, frame)
    drift = detect_drift(profile, current, 0.1, 0.5, columns=spec.names)
    pred = detect_drift(profile, current, 0.1, 1.0, columns=[PREDICTION]).columns[0]
    return ([(c.column, c.score, c.drifted) for c in drift.columns], drift.detected, pred.score,
            unseen_categories(spec, frame, X), len(frame))


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_verdicts_are_the_same_read_from_json_rows_or_from_segments(task, backend, tmp_path, request):
    url = request.getfixturevalue("postgres_url") if backend == "postgresql" \
        else f"sqlite:///{tmp_path / 'state.db'}"
    engine = open_state(url)
    rng = np.random.default_rng(7)
    train = training_rows(2000, rng)
    spec = dataclasses.replace(fit_spec(FEATURES, train), task=task,
                               classes=["low", "mid", "high"] if task == "multiclass" else [])
    reference = feature_frame(spec, build_matrix(spec, train))
    n = len(train)
    reference[PREDICTION] = rng.random(n) if task == "binary" else \
        rng.normal(10, 3, n) if task == "regression" else rng.integers(0, 3, n).astype(float)
    profile = build_profile(reference, categorical=[spec.names[i] for i in spec.categorical_indices])

    rows = logged_rows(1500, task, rng)
    as_json_rows(engine, [[r[0], r[1], r[2], "json", *r[4:]] for r in rows])
    write(engine, insert_sql(engine.dialect.name), frames([[r[0] + "s", r[1], r[2], "cols", *r[4:]]
                                                          for r in rows]))
    for window in (MonitorWindow(by="count", size=1200), MonitorWindow(by="count", size=5000)):
        old = verdict(engine, "json", spec, profile, window)
        new = verdict(engine, "cols", spec, profile, window)
        assert old == new
    # and the verdicts saw what was sent: unseen states and codes, drift in the shifted amounts
    assert old[3]["state"] > 0 and old[3]["code"] > 0 and old[4] == 1500
    assert dict((c, d) for c, _, d in old[0])["amount"]
    close_state(url)


def test_the_window_joins_the_log_columns_and_the_inputs_without_copying_them():
    """A 1M-row window is not copied to be joined: the frame's columns are the decoded arrays.
    An input named like a log column (a client's own `id`) keeps both, as pandas' concat does."""
    log = pd.DataFrame({"id": np.arange(5), "probability": np.linspace(0, 1, 5)}, copy=False)
    inputs = pd.DataFrame({"amount": np.arange(5.0), "state": pd.Categorical(list("abcab"))}, copy=False)
    frame = side_by_side(log, inputs)
    assert list(frame.columns) == ["id", "probability", "amount", "state"]
    assert np.shares_memory(frame["amount"].to_numpy(), inputs["amount"].to_numpy())
    assert frame["state"].dtype == "category"
    clash = side_by_side(log, pd.DataFrame({"id": ["x1", "x2", "x3", "x4", "x5"]}))
    assert list(clash.columns) == ["id", "probability", "id"]
    assert clash.iloc[:, 2].tolist() == ["x1", "x2", "x3", "x4", "x5"]
