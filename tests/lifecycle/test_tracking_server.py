"""The registry behind an MLflow tracking server over http://, as the compose stack and the
Kubernetes manifests run it: `mlflow server` with proxied artifact storage, started by the test.
A project trains, registers and promotes through it; the artifacts land where the server keeps
them (not in the project's folder); a prediction server loads the champion from it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from flywheel.lifecycle import train_challenger
from flywheel.registry import Registry
from flywheel.serving.process import ServerProcess, free_port
from flywheel.serving.runtime import load_version


def test_train_promote_and_serve_through_an_mlflow_tracking_server(loaded_project, sba_sample, tmp_path):
    port = free_port()
    artifacts = tmp_path / "server-artifacts"
    log = open(tmp_path / "mlflow-server.log", "w")  # noqa: SIM115 - closed below
    mlflow = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'mlflow-server.db'}", "--artifacts-destination", str(artifacts),
         "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and mlflow.poll() is None, \
                (tmp_path / "mlflow-server.log").read_text()[-3000:]
            time.sleep(0.5)
        project = loaded_project({"stores": {"tracking": url}, "model": {"params": {"num_boost_round": 20}},
                                  "gate": {"floor": 0.5}})
        assert project.tracking_url == url
        assert train_challenger(project).promoted
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
    finally:
        mlflow.terminate()
        mlflow.wait(30)
        log.close()
