"""The production profile, as the docs' Scale out page documents it: the source table, the state database and
MLflow's backend on the PostgreSQL server, MLflow as a tracking server reached over http:// (with
proxied artifacts), `flywheel serve` with two workers. A short loop runs on it: train, serve,
traffic with labels, monitor, retrain, promote, and the server hot-swaps."""

from __future__ import annotations

import time
from datetime import date

import httpx
import pytest
import sqlalchemy as sa

from flywheel import api
from flywheel.data.sources import make_engine
from flywheel.lifecycle.train import train_challenger
from flywheel.monitoring.monitor import run_monitor
from flywheel.serving.process import ServerProcess
from tests.conftest import mlflow_server
from tests.pipeline.test_loop import WEAK, send_traffic

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def test_a_short_loop_on_postgresql_and_an_mlflow_server(loaded_project, postgres_url, tmp_path):
    with mlflow_server(tmp_path, backend=postgres_url) as tracking:
        project = loaded_project({**WEAK, "stores": {"source": postgres_url, "state": postgres_url,
                                                     "tracking": tracking},
                                  "serving": {"workers": 2, "reload_interval_s": 0.5},
                                  "monitoring": {"evidently_report": False}})
        assert project.tracking_url.startswith("http://")
        first = train_challenger(project)
        assert first.promoted and first.version == 1
        with ServerProcess(project, workers=2) as server:
            server.wait_ready()
            sent = send_traffic(project, server.url, date(2002, 1, 1), date(2004, 1, 1))
            verdict = run_monitor(project, report=False)
            assert verdict.drift.rows == min(sent, project.config.monitoring.window.size)
            run = api.retrain(project, at=date(2006, 10, 1), orchestrator="local")
            assert run.status == "succeeded", run.error
            version = run.version
            assert version == 2
            if not run.promoted:
                api.promote(project, version, reason="production profile test")
            # each worker follows the alias on its own: wait until every answer comes from v2
            deadline, streak = time.monotonic() + 60, 0
            while streak < 20:
                assert time.monotonic() < deadline, server.tail()
                served = httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"][0]["version"]
                streak = streak + 1 if served == version else 0
                time.sleep(0.05)
        with make_engine(postgres_url).connect() as conn:
            logged = conn.execute(sa.text("SELECT count(*) FROM predictions")).scalar()
            labels = conn.execute(sa.text("SELECT count(*) FROM feedback")).scalar()
            verdicts = conn.execute(sa.text("SELECT count(*) FROM monitor_runs")).scalar()
            versions = conn.execute(sa.text("SELECT count(*) FROM model_versions")).scalar()
        assert logged == sent and labels == sent and verdicts >= 1 and versions == 2
        assert list((tmp_path / "server-artifacts").rglob("model.onnx"))
