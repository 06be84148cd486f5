"""The training step end to end on a real MLflow store and real SQLite databases."""

import json
from pathlib import Path

import pytest

from flywheel.core.errors import PipelineError
from flywheel.lifecycle.aliases import promote, rollback
from flywheel.lifecycle.evaluation import evaluate_version
from flywheel.lifecycle.status import project_status
from flywheel.lifecycle.train import train_challenger
from flywheel.monitoring.monitor import calibration_of
from flywheel.registry import Registry, RegistryError
from flywheel.state.aliases import alias_moves
from flywheel.state.db import open_state
from tests.conftest import example_config

QUICK = {"model": {"params": {"num_boost_round": 60}}}


def test_train_twice_gate_refuses_no_improvement_then_promote_and_rollback(loaded_project):
    project = loaded_project(QUICK)
    first = train_challenger(project)
    assert first.version == 1 and first.gate.passed and first.promoted
    assert "no champion yet" in first.gate.reasons[-1]
    reg = Registry.for_project(project)
    assert reg.alias_version("champion") == 1 == reg.alias_version("challenger")
    assert reg.alias_version("Production") == 1  # stage names map to aliases

    second = train_challenger(project)  # same data, same seed: no improvement
    assert second.version == 2 and not second.gate.passed and not second.promoted
    assert reg.alias_version("champion") == 1 and reg.alias_version("challenger") == 2
    # the champion was re-scored on the challenger's holdout with its own spec and ONNX file
    assert second.champion_metrics["roc_auc"] == pytest.approx(first.metrics["roc_auc"], abs=1e-9)
    tags = reg.version(2).tags
    assert tags["gate"] == "failed" and "improvement" in tags["gate_reasons"]
    assert tags["champion_at_evaluation"] == "1"

    assert promote(project, 2, reason="ops override").previous_version == 1
    assert reg.alias_version("champion") == 2
    back = rollback(project)
    assert (back.version, back.previous_version, back.action) == (1, 2, "rollback")
    assert reg.alias_version("champion") == 1
    with pytest.raises(PipelineError, match="first champion"):
        rollback(project)
    moves = alias_moves(open_state(project.state_url), "sba-loans", "champion")
    assert [(m.version, m.action) for m in moves] == [(1, "promote"), (2, "manual"), (1, "rollback")]


def test_a_run_records_params_curves_artifacts_and_lineage(loaded_project):
    project = loaded_project(QUICK)
    result = train_challenger(project)
    reg = Registry.for_project(project)
    run = reg.client.get_run(result.run_id)
    assert run.data.params["model.type"] == "lightgbm"
    assert run.data.params["model.num_boost_round"] == "60"
    curve = reg.client.get_metric_history(result.run_id, "validation_auc")
    assert len(curve) == len(result.fitted.history["validation_auc"]) > 1
    assert [m.step for m in curve] == list(range(1, len(curve) + 1))
    for key in ("roc_auc", "pr_auc", "log_loss", "brier"):
        assert run.data.metrics[f"holdout_{key}"] == pytest.approx(result.metrics[key])
    assert run.data.metrics["onnx_max_abs_diff"] <= 1e-4
    tags = run.data.tags
    snap = result.prepared.snapshot
    assert tags["data_hash"] == snap.content_hash
    assert (tags["window_start"], tags["window_end"]) == ("1994-10-01", "2001-10-01")
    assert int(tags["rows"]) == snap.rows
    assert tags["config_hash"] == project.config_hash()
    assert "git_sha" in tags
    files = {a.path for a in reg.client.list_artifacts(result.run_id)}
    assert {"calibration.png", "feature_spec.json", "data_checks.json", "native"} <= files
    png = Path(reg.client.download_artifacts(result.run_id, "calibration.png", str(project.home)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_registered_model_carries_its_signature_and_mlflow_pyfunc_checks_input(loaded_project):
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from flywheel.data.features import FeatureSpec, build_matrix
    from tests.conftest import SAMPLE

    project = loaded_project(QUICK)
    result = train_challenger(project)
    reg = Registry.for_project(project)
    spec = FeatureSpec.from_json(reg.load_artifacts(result.version).feature_spec)
    mlflow.set_tracking_uri(reg.tracking_url)
    model = mlflow.pyfunc.load_model(f"models:/sba-loans/{result.version}")
    assert model.metadata.signature.inputs.input_names() == spec.names
    assert model.metadata.signature.outputs.input_names() == ["probability"]
    frame = pd.read_parquet(SAMPLE).iloc[:50]
    features = pd.DataFrame(build_matrix(spec, frame), columns=spec.names).astype("float32")
    served = np.asarray(model.predict(features)).ravel()
    assert served.shape == (50,)
    assert np.allclose(served, result.fitted.predict(features.to_numpy(dtype=np.float64)), atol=1e-4)
    with pytest.raises(MlflowException, match=spec.names[0]):
        model.predict(features.drop(columns=[spec.names[0]]))


def test_floor_refuses_a_first_model_and_status_shows_no_champion(loaded_project):
    project = loaded_project({**QUICK, "gate": {"floor": 0.99}})
    result = train_challenger(project)
    assert not result.gate.passed and not result.promoted
    status = project_status(project)
    assert status.champion is None
    assert status.challenger.version == 1 and status.challenger.gate == "failed"


def test_a_tampered_model_file_is_refused(loaded_project):
    project = loaded_project(QUICK)
    train_challenger(project)
    [onnx_file] = list(project.artifact_root.rglob("model.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\x00")
    with pytest.raises(RegistryError, match="does not match the hash recorded"):
        Registry.for_project(project).load_artifacts(1)
    # what performance estimation reads is attached with its hash too, and refused when changed
    [calibration] = list(project.artifact_root.rglob("estimation/calibration.json"))
    assert json.loads(calibration.read_text())["task"] == "binary"
    calibration.write_text(calibration.read_text().replace("}", ', "extra": 1}', 1))
    with pytest.raises(RegistryError, match="do not match the hashes recorded"):
        calibration_of(Registry.for_project(project), 1, project.home / "cache-tampered")


def test_schema_change_fails_the_gate_and_champion_keeps_its_own_features(loaded_project):
    project = loaded_project(QUICK)
    train_challenger(project)
    features = [*example_config()["features"],
                {"name": "disbursed", "kind": "numeric", "column": "disbursement_gross"}]
    wider = loaded_project({**QUICK, "features": features,
                            "stores": {"tracking": project.tracking_url, "state": project.state_url},
                            "gate": {"min_improvement": 0.0, "floor": 0.0}}, name="wider")
    result = train_challenger(wider)
    assert not result.gate.passed
    assert any("new required input 'disbursement_gross'" in r for r in result.gate.reasons)
    assert result.champion_metrics is not None  # scored with v1's spec, which lacks the column


def test_evaluate_scores_challenger_and_champion_on_the_current_holdout(loaded_project):
    project = loaded_project(QUICK)
    first = train_challenger(project)
    ev = evaluate_version(project)
    assert ev.version == 1 and ev.champion_version is None  # the challenger is the champion
    assert ev.metrics["roc_auc"] == pytest.approx(first.metrics["roc_auc"], abs=1e-9)
    train_challenger(project)
    ev2 = evaluate_version(project, version=2)
    assert ev2.champion_version == 1 and not ev2.gate.passed
    with pytest.raises(RegistryError, match="has no version 9"):
        evaluate_version(project, version=9)


def test_evaluating_a_version_on_a_holdout_it_trained_on_says_its_score_is_optimistic(loaded_project):
    """v1 trained on a window that ends later than the current configured one: today's holdout
    holds rows it trained and early-stopped on."""
    project = loaded_project({**QUICK, "data": {"window": {"start": "1995-10-01", "end": "2004-10-01"}}})
    assert train_challenger(project).promoted
    shorter = loaded_project({**QUICK, "data": {"window": {"start": "1995-10-01", "end": "2001-10-01"}},
                              "stores": {"source": project.source_url, "tracking": project.tracking_url,
                                         "state": project.state_url}}, name="shorter")
    ev = evaluate_version(shorter, version=1)
    assert any(r.startswith("caution: v1 trained and early-stopped on rows up to") for r in ev.gate.reasons)
    assert not any(r.startswith("caution") for r in evaluate_version(project, version=1).gate.reasons)
