"""The registry behind an MLflow tracking server over http://, as the compose stack and the
Kubernetes manifests run it: `mlflow server` with proxied artifact storage, started by the test.
A project trains, registers and promotes through it; the artifacts land where the server keeps
them (not in the project's folder); a prediction server loads the champion from it."""

from __future__ import annotations

import httpx
import numpy as np

from flywheel.lifecycle.train import train_challenger
from flywheel.registry import Registry
from flywheel.serving.process import ServerProcess
from flywheel.serving.tabular.runtime import load_version
from tests.conftest import mlflow_server


def test_train_promote_and_serve_through_an_mlflow_tracking_server(loaded_project, sba_sample, tmp_path):
    with mlflow_server(tmp_path) as url:
        project = loaded_project({"stores": {"tracking": url}, "model": {"params": {"num_boost_round": 20}},
                                  "gate": {"floor": 0.5}})
        assert project.tracking_url == url
        assert train_challenger(project).promoted
        artifacts = tmp_path / "server-artifacts"
        assert list(artifacts.rglob("model.onnx")), "the model went through the server's artifact store"
        assert not (project.home / "mlartifacts").exists()
        spec = load_version(Registry.for_project(project), 1).spec
        row = sba_sample[spec.input_columns].iloc[0]
        record = {c: (None if isinstance(v, float) and np.isnan(v) else v.item() if hasattr(v, "item") else v)
                  for c, v in row.items()}
        with ServerProcess(project) as server:
            server.wait_ready()
            answer = httpx.post(f"{server.url}/v1/predict", json=record, timeout=30)
            assert answer.status_code == 200 and answer.json()["version"] == 1, answer.text
