"""The `flywheel` command as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flywheel import api
from flywheel.cli import app
from flywheel.core.jsonable import jsonable
from tests.conftest import example_config

runner = CliRunner()


@pytest.fixture
def cli_project(loaded_project, monkeypatch):
    project = loaded_project({"model": {"params": {"num_boost_round": 60}}})
    monkeypatch.setenv("FLYWHEEL_HOME", str(project.home))
    return project


def test_train_then_status_json_has_lineage_of_champion_and_challenger(cli_project):
    cfg = str(cli_project.path)
    trained = runner.invoke(app, ["train", "--config", cfg])
    assert trained.exit_code == 0, trained.output
    assert "Gate PASSED" in trained.output and "mlflow ui --backend-store-uri" in trained.output
    res = runner.invoke(app, ["status", "--config", cfg, "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.stdout)
    assert st == jsonable(api.status(cli_project))  # --json is the API's result, by the one rule
    assert st["model"] == "sba-loans"
    champ = st["champion"]
    assert champ["version"] == 1 and len(champ["run_id"]) == 32
    assert {"roc_auc", "pr_auc", "log_loss", "brier"} <= set(champ["metrics"])
    assert len(champ["data_hash"]) == 64 and champ["git_sha"]
    assert champ["trained_on"]["from"] == "1994-10-01" and champ["trained_on"]["rows"] > 5000
    assert st["challenger"]["version"] == 1
    table = runner.invoke(app, ["status", "--config", cfg])
    assert table.exit_code == 0 and "1994-10-01..2001-10-01" in table.output
    assert f"{champ['trained_on']['rows']:,}" in table.output


def test_promote_unknown_version_and_rollback_without_history_fail_clearly(cli_project):
    cfg = str(cli_project.path)
    assert runner.invoke(app, ["train", "--config", cfg]).exit_code == 0
    res = runner.invoke(app, ["promote", "--config", cfg, "--version", "7"])
    assert res.exit_code == 1 and "has no version 7" in res.output
    res = runner.invoke(app, ["rollback", "--config", cfg])
    assert res.exit_code == 1 and "no earlier champion" in res.output


def test_evaluate_json(cli_project):
    cfg = str(cli_project.path)
    assert runner.invoke(app, ["train", "--config", cfg]).exit_code == 0
    res = runner.invoke(app, ["evaluate", "--config", cfg, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["version"] == 1 and out["gate"]["passed"] is True
    assert out == jsonable(api.evaluate(cli_project))


def test_leaky_feature_stops_training_with_its_name(cli_project):
    cfg = yaml.safe_load(Path(cli_project.path).read_text())
    cfg["features"].append({"name": "term", "kind": "numeric", "column": "term"})
    Path(cli_project.path).write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["train", "--config", str(cli_project.path)])
    assert res.exit_code == 1
    assert "feature 'term' alone reaches ROC-AUC" in res.output


def test_ingest_loads_a_parquet_file_into_the_source_table(make_project, sba_sample, tmp_path, monkeypatch):
    project = make_project()
    monkeypatch.setenv("FLYWHEEL_HOME", str(project.home))
    file = tmp_path / "loans.parquet"
    sba_sample.to_parquet(file)
    res = runner.invoke(app, ["ingest", "--config", str(project.path), "--input", str(file)])
    assert res.exit_code == 0, res.output
    assert f"loaded {len(sba_sample):,} rows into loans" in res.output
    assert runner.invoke(app, ["train", "--config", str(project.path),
                               "--model-type", "sklearn"]).exit_code == 0


def test_the_installed_command_reports_a_bad_config_with_file_and_field(tmp_path):
    cfg = example_config()
    cfg["model"]["type"] = "lgbm"
    path = tmp_path / "flywheel.yaml"
    path.write_text(yaml.safe_dump(cfg))
    exe = Path(sys.executable).parent / "flywheel"
    res = subprocess.run([str(exe), "status", "--config", str(path)], capture_output=True, text=True,
                         env={**os.environ, "FLYWHEEL_HOME": str(tmp_path / "home")})
    assert res.returncode == 2
    assert "flywheel.yaml: model.type:" in res.stderr and "'torch-mlp'" in res.stderr
    assert "Traceback" not in res.stderr


def test_pipeline_commands_refuse_bad_input_with_the_option_named_and_record_nothing(cli_project):
    from flywheel.pipeline.runs import list_runs

    cfg = str(cli_project.path)
    bad_date = runner.invoke(app, ["retrain", "--config", cfg, "--at", "2006-13-01"])
    assert bad_date.exit_code == 2 and "--at" in bad_date.output and "YYYY-MM-DD" in bad_date.output
    bad_step = runner.invoke(app, ["step", "bogus", "--config", cfg, "--run-id", "r1"])
    assert bad_step.exit_code == 1 and "unknown step 'bogus'" in bad_step.output
    bad_orchestrator = runner.invoke(app, ["retrain", "--config", cfg, "--orchestrator", "cron"])
    assert bad_orchestrator.exit_code == 1 and "unknown orchestrator 'cron'" in bad_orchestrator.output
    assert list_runs(cli_project) == []


def test_serve_refuses_a_bad_log_sink_cpu_list_before_starting(cli_project, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_LOG_SINK_CPUS", "1;2")
    res = runner.invoke(app, ["serve", "--config", str(cli_project.path)])
    assert res.exit_code == 2
    assert "FLYWHEEL_LOG_SINK_CPUS='1;2': expected CPU numbers" in " ".join(res.output.split())


def test_serve_refuses_an_unknown_log_level_before_starting(cli_project):
    res = runner.invoke(app, ["serve", "--config", str(cli_project.path), "--log-level", "loud"])
    assert res.exit_code == 2
    assert "--log-level must be one of debug, info, warning, error" in " ".join(res.output.split())
