"""The regression (flights) and multiclass (bikeshare) examples through the whole loop, on their
committed samples: train, serve as live traffic with labels, monitor, retrain on the feedback,
hot swap; then what each task's server answers, logs and accepts."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from flywheel.config import Project, load_project
from flywheel.demo.examples import ExampleError, WalkResult, walk
from flywheel.registry import Registry
from flywheel.serving.tabular.app import create_app
from flywheel.serving.tabular.batch import score_frame
from flywheel.state.db import feedback, monitor_runs, open_state, predictions
from flywheel.training.evaluate import multiclass_metrics, regression_metrics

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("examples")]


def _project(name: str, folder: Path) -> Project:
    folder.mkdir(parents=True)
    shutil.copy(REPO / "examples" / name / "flywheel.yaml", folder / "flywheel.yaml")
    return load_project(folder / "flywheel.yaml", env={"FLYWHEEL_HOME": str(folder / ".flywheel")})


@pytest.fixture(scope="module")
def flights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Project, pd.DataFrame, WalkResult]:
    project = _project("flights", tmp_path_factory.mktemp("ex") / "flights")
    frame = pd.read_parquet(REPO / "tests" / "fixtures" / "flights_sample.parquet")
    return project, frame, walk(project, frame, lambda _: None)


@pytest.fixture(scope="module")
def bikeshare(tmp_path_factory: pytest.TempPathFactory) -> tuple[Project, pd.DataFrame, WalkResult]:
    project = _project("bikeshare", tmp_path_factory.mktemp("ex") / "bikeshare")
    frame = pd.read_parquet(REPO / "tests" / "fixtures" / "bikeshare.parquet")
    return project, frame, walk(project, frame, lambda _: None)


def _logged(project: Project) -> pd.DataFrame:
    with open_state(project.state_url).connect() as conn:
        return pd.DataFrame(conn.execute(sa.select(
            predictions.c.record_id, predictions.c.model_version, predictions.c.probability,
            predictions.c.decision, predictions.c.value, predictions.c.label, predictions.c.scores,
            predictions.c.meta, feedback.c.label.label("truth_label"), feedback.c.value.label("truth_value"),
            feedback.c.label_text.label("truth_text"))
            .join(feedback, feedback.c.record_id == predictions.c.record_id, isouter=True)
            .order_by(predictions.c.id)).all())


def test_flights_regression_closes_the_loop(flights: Any) -> None:
    project, frame, result = flights
    end = pd.Timestamp(project.config.data.window.end)
    arriving = frame[frame["scheduled"] >= end]
    assert result.first.metrics["rmse"] > 0 and "r2" in result.first.metrics
    assert "roc_auc" not in result.first.metrics
    assert result.first.onnx_max_abs_diff < 0.01
    # every arriving flight served once, a label posted for each that arrived (cancelled: none)
    assert result.served == len(arriving) and result.refused == 0
    assert result.labels == int(arriving["arr_delay"].notna().sum())
    log = _logged(project)
    first = log[log["model_version"] == result.first.version]
    assert len(first) == len(arriving)
    assert first["value"].notna().all() and first["probability"].isna().all()
    assert first["decision"].isna().all() and first["label"].isna().all()
    # the verdict's RMSE is the RMSE of what was served against what was posted back
    verdict = result.verdict
    assert verdict is not None and verdict.performance is not None
    labelled = first[first["truth_value"].notna()].tail(project.config.monitoring.performance_rows)
    expected = regression_metrics(labelled["truth_value"].to_numpy(), labelled["value"].to_numpy())
    assert verdict.performance.metric == "rmse"
    assert verdict.performance.value == pytest.approx(expected["rmse"], rel=1e-9)
    with open_state(project.state_url).connect() as conn:
        row = conn.execute(sa.select(monitor_runs).where(monitor_runs.c.id == verdict.id)).one()
    assert row.metric == "rmse" and row.metric_value == pytest.approx(expected["rmse"])
    assert row.roc_auc is None and orjson.loads(row.metrics)["mae"] == pytest.approx(expected["mae"])
    # the RMSE estimated before the labels, by the loss models fitted at training time
    estimated = verdict.estimate
    print("FLIGHTS", estimated.describe(), verdict.audit.describe() if verdict.audit else None)
    assert estimated.metric == "rmse" and estimated.method == "dle" and estimated.rows == len(first)
    assert 0 < estimated.low < estimated.value < estimated.high
    assert row.estimated_value == pytest.approx(estimated.value) and row.estimated_metric == "rmse"
    # the retrain learnt from the arriving rows too and the server swapped to what it promoted
    run = result.retrain
    assert run is not None and run.status == "succeeded", run.error if run else None
    assert run.outputs["extract"]["rows"] == int(frame["arr_delay"].notna().sum())
    if run.promoted:
        assert result.swapped_to == run.version
    else:
        assert result.swapped_to is None


def test_bikeshare_multiclass_closes_the_loop(bikeshare: Any) -> None:
    project, frame, result = bikeshare
    classes = ["clear", "cloudy/misty", "rain/snow"]
    arriving = frame[frame["time"] >= pd.Timestamp(project.config.data.window.end)]
    m = result.first.metrics
    assert {"log_loss", "accuracy", "macro_f1", "weighted_f1", "macro_roc_auc"} <= set(m)
    assert {f"roc_auc_{c.replace('/', '_')}" for c in classes} <= set(m)
    assert result.served == len(arriving) == result.labels
    log = _logged(project)
    first = log[log["model_version"] == result.first.version]
    scores = [orjson.loads(s) for s in first["scores"]]
    assert all(list(s) == classes and math.isclose(sum(s.values()), 1, abs_tol=1e-5) for s in scores)
    # the label is the most probable class and `probability` its probability
    assert list(first["label"]) == [max(s, key=s.get) for s in scores]
    assert np.allclose(first["probability"], [max(s.values()) for s in scores])
    assert first["decision"].isna().all() and first["value"].isna().all()
    verdict = result.verdict
    assert verdict is not None and verdict.performance is not None
    labelled = first.tail(project.config.monitoring.performance_rows)
    P = np.array([[orjson.loads(s)[c] for c in classes] for s in labelled["scores"]])
    y = np.array([classes.index(t) for t in labelled["truth_text"]])
    assert verdict.performance.metric == "log_loss"
    assert verdict.performance.value == pytest.approx(multiclass_metrics(y, P, classes)["log_loss"])
    # prediction drift is measured on the predicted classes' shares
    assert verdict.prediction_drift is not None
    # the log loss estimated from the class probabilities answered, calibrated per class
    estimated = verdict.estimate
    print("BIKESHARE", estimated.describe(), verdict.audit.describe() if verdict.audit else None)
    assert estimated.metric == "log_loss" and estimated.method == "cbpe" and estimated.rows == len(first)
    assert 0 < estimated.low < estimated.value < estimated.high
    run = result.retrain
    assert run is not None and run.status == "succeeded", run.error if run else None
    if run.promoted:
        assert result.swapped_to == run.version
    with pytest.raises(ExampleError, match="retraining run.*starts from an empty project"):
        walk(project, frame, lambda _: None)  # a second walk would mix its rows with the first's


def test_each_task_answers_and_accepts_its_own_labels(flights: Any, bikeshare: Any) -> None:
    cases = ((flights, (12.5, "late", True)), (bikeshare, ("rain/snow", "hail", 3)))
    for (project, frame, _), labels in cases:
        inputs = [c for c in project.config.model_dump()["features"]]
        columns = sorted({f.get("column") or f.get("numerator") for f in inputs} |
                         {f["denominator"] for f in inputs if f.get("denominator")})
        record = {c: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v)
                  for c, v in frame.iloc[-1][columns].items()}
        with TestClient(create_app(project)) as client:
            body = client.post("/v1/predict", json=record).json()
            pred = body["predictions"][0]
            oip = client.get(f"/v2/models/{project.config.registered_model}").json()
            doc = client.get("/openapi.json").json()
            scraped = client.get("/metrics").text
            def label(value: Any) -> Any:
                return client.post("/v1/feedback", json={"labels": [
                    {"record_id": pred["record_id"], "label": value}]})  # noqa: B023

            ok, bad, bad_type = (label(v) for v in labels)
        assert ok.status_code == 200, ok.text
        assert f'flywheel_window_metric{{metric="{project.config.gate.metric}"}}' in scraped
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "label"
        assert bad_type.status_code == 422
        item = doc["paths"]["/v1/predict"]["post"]["responses"]["200"]["content"]["application/json"][
            "schema"]["properties"]["predictions"]["items"]["properties"]
        if project.config.task == "regression":
            assert set(pred) == {"record_id", "value"} and body["task"] == "regression"
            assert [o["name"] for o in oip["outputs"]] == ["value"] and "value" in item
        else:
            assert set(pred) == {"record_id", "label", "probability", "probabilities"}
            assert list(pred["probabilities"]) == ["clear", "cloudy/misty", "rain/snow"]
            assert oip["outputs"][1] == {"name": "probabilities", "datatype": "FP64", "shape": [-1, 3]}
            assert item["label"]["enum"] == ["clear", "cloudy/misty", "rain/snow"]
        # `flywheel predict` answers as the server does
        scored = score_frame(project, frame.tail(50))
        if project.config.task == "regression":
            assert {"value", "model_version"} <= set(scored.columns) and "decision" not in scored
        else:
            shares = scored[[f"probability_{c}" for c in ("clear", "cloudy/misty", "rain/snow")]]
            assert np.allclose(shares.sum(axis=1), 1, atol=1e-5)
            assert (scored["probability"] == shares.max(axis=1)).all()


def test_models_carry_their_task_and_signature(flights: Any, bikeshare: Any) -> None:
    for (project, _, result), outputs in ((flights, ["value"]),
                                          (bikeshare, ["clear", "cloudy/misty", "rain/snow"])):
        registry = Registry.for_project(project)
        spec = orjson.loads(registry.load_artifacts(result.first.version).feature_spec)
        assert spec["task"] == project.config.task
        assert spec.get("classes", []) == (outputs if project.config.task == "multiclass" else [])
        import mlflow

        info = mlflow.models.get_model_info(
            f"models:/{project.config.registered_model}/{result.first.version}")
        assert info.signature.outputs.input_names() == outputs


def test_each_task_has_a_model_card_with_its_plots(flights: Any, bikeshare: Any, tmp_path: Path) -> None:
    """Logged to the run once the gate decided: the task's plots, importance, leakage, gate."""
    for (project, _, result), plot in ((flights, "predicted_vs_true.png"),
                                       (bikeshare, "confusion_matrix.png")):
        registry = Registry.for_project(project)
        version = result.first.version
        folder = registry.download_run_artifacts(version, "card", tmp_path / project.config.project)
        names = {p.name for p in folder.iterdir()}
        assert {"facts.json", "model_card.md", "model_card.html", plot, "importance.png"} <= names
        facts = orjson.loads((folder / "facts.json").read_bytes())
        assert facts["task"] == project.config.task
        assert set(facts["importance"]["values"]) == set(facts["inputs"])
        assert max(facts["importance"]["values"].values()) > 0  # some feature matters
        card = (folder / "model_card.md").read_text()
        for section in ("## Problem and target", "## Leakage screen", "## Holdout metrics",
                        "## Feature importance", "## Gate decision", "## Monitoring"):
            assert section in card, section
        assert f"![{plot}]({plot})" in card
        html = (folder / "model_card.html").read_text()
        assert html.count("data:image/png;base64,") == len(facts["plots"])  # one file, plots inlined
