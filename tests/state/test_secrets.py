"""Passwords never printed: every store on PostgreSQL with a password in its URL, then train,
status, serve (with the log sink running: `ps` shows every process's argv), a prediction, a
failing retrain that alerts; the password appears in no output, log or process list."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.postgres
PASSWORD = "Sup3r-S3cret-pw"


def test_no_output_of_a_run_shows_a_store_password(loaded_project, postgres_url):
    url = postgres_url.replace("postgres@", f"postgres:{PASSWORD}@")  # trust auth: accepted, unused
    project = loaded_project({"stores": {"source": url, "tracking": url, "state": url},
                              "model": {"params": {"num_boost_round": 20}},
                              "retraining": {"orchestrator": "local"}})
    env = {**os.environ, "FLYWHEEL_HOME": str(project.home), "COLUMNS": "200"}
    seen: list[str] = []

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "flywheel.cli", *args, "--config", str(project.path)],
                              env=env, capture_output=True, text=True, timeout=600)
        seen.extend([done.stdout, done.stderr])
        return done

    assert cli("train").returncode == 0, seen[-1]
    assert "mlflow ui --backend-store-uri postgresql://postgres:***@" in " ".join(seen[-2].split())
    assert cli("status", "--json").returncode == 0
    assert '"tracking_uri": "postgresql://postgres:***@' in seen[-2]
    with ServerProcess(project) as server:
        processes = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
        assert "flywheel.serving.tabular.logsink" in processes  # the sink runs, and its argv holds no URL
        seen.append(processes)
        assert httpx.post(f"{server.url}/v1/predict", json={"x": 1}).status_code == 422
    seen.append(server.log_path.read_text())
    failed = cli("retrain", "--at", "1980-01-01")  # no rows back then: fails, alerts to the log
    assert failed.returncode == 1 and "nothing to retrain on" in failed.stdout + failed.stderr
    # What the MLflow UI shows: every run's tags and params, every version's tags.
    from flywheel.registry import Registry

    registry = Registry.for_project(project)
    for run in registry.client.search_runs([registry.experiment_id]):
        seen.extend([repr(run.data.tags), repr(run.data.params)])
    for mv in registry.client.search_model_versions(f"name='{registry.model_name}'"):
        seen.append(repr(mv.tags))
    leaks = [text[max(0, text.find(PASSWORD) - 200):text.find(PASSWORD) + 50]
             for text in seen if PASSWORD in text]
    assert not leaks, leaks
