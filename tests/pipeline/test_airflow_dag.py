"""The Airflow DAG over the same steps, run with `dag.test()` in Airflow's own environment.

Airflow 3.3 pins fastapi<0.137 and Prefect needs fastapi<0.151 with MLflow's newer one, so Airflow
lives in its own environment, as its workers would in production: its tasks call the project's
`flywheel step NAME`. The environment is made from deploy/airflow/requirements.lock when missing,
in the download cache under a name that carries the lock's hash (a changed lock makes a new one). The DAG's
results must equal the local runner's for the same clock.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from flywheel.config import cache_dir
from flywheel.lifecycle.train import train_challenger
from flywheel.pipeline.runner import run_pipeline
from flywheel.pipeline.runs import list_runs
from flywheel.registry import CHAMPION, Registry
from tests.conftest import REPO
from tests.pipeline.test_loop import WEAK, with_env

DAG_FILE = REPO / "deploy" / "airflow" / "dags" / "flywheel_retrain.py"
LOCK = REPO / "deploy" / "airflow" / "requirements.lock"
AIRFLOW_VENV = cache_dir() / f"airflow-venv-{hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]}"
AT = date(2006, 10, 1)

RUNNER = """
import importlib.util, sys
from datetime import datetime, timezone
spec = importlib.util.spec_from_file_location("flywheel_retrain", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
# a run conf is whatever its trigger sends: a reason that a shell would run
reason = "drift; $(touch " + sys.argv[2] + ") `touch " + sys.argv[2] + "`"
run = module.dag.test(logical_date=datetime(2006, 10, 1, tzinfo=timezone.utc), run_conf={"reason": reason})
print("DAG_RUN_STATE", run.state)
"""


@pytest.fixture(scope="session")
def airflow_python() -> Path:
    python = AIRFLOW_VENV / "bin" / "python"
    if not (AIRFLOW_VENV / ".installed").is_file():
        shutil.rmtree(AIRFLOW_VENV, ignore_errors=True)  # a half-made one from an interrupted run
        subprocess.run(["python3", "-m", "venv", str(AIRFLOW_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r", str(LOCK)], check=True,
                       timeout=900)
        (AIRFLOW_VENV / ".installed").touch()
    return python


def test_dag_runs_every_step_with_the_same_results_as_the_local_runner(loaded_project, airflow_python,
                                                                       tmp_path):
    project = loaded_project(WEAK, name="airflow")
    train_challenger(project)
    twin = loaded_project(WEAK, name="local")
    train_challenger(twin)
    params = "{num_boost_round: 60}"

    airflow_home = tmp_path / "airflow-home"
    env = {**os.environ, "AIRFLOW_HOME": str(airflow_home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILE.parent), "AIRFLOW__CORE__PARALLELISM": "4",
           "FLYWHEEL_BIN": str(Path(sys.executable).parent / "flywheel"),
           "FLYWHEEL_CONFIG": str(project.path), "FLYWHEEL_HOME": str(project.home),
           "FLYWHEEL_MODEL__PARAMS": params}
    env.pop("VIRTUAL_ENV", None)
    migrate = subprocess.run([str(airflow_python), "-m", "airflow", "db", "migrate"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    marker = tmp_path / "injected"
    done = subprocess.run([str(airflow_python), "-c", RUNNER, str(DAG_FILE), str(marker)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert "DAG_RUN_STATE success" in done.stdout, done.stdout[-4000:] + done.stderr[-4000:]

    [run] = list_runs(project)
    assert run.id == "airflow-20061001T000000" and run.status == "succeeded" and run.trigger == "airflow"
    assert run.reason == f"drift; $(touch {marker}) `touch {marker}`" and not marker.exists()
    steps = ["extract", "features", "train", "evaluate", "promote", "alert"]
    assert [k for k in run.outputs if k not in ("clock", "pid", "host", "timings")] == steps
    # each step, run by Airflow in a process of its own, recorded when it started and finished
    assert list(run.outputs["timings"]) == steps
    assert all(t["started"] <= t["finished"] for t in run.outputs["timings"].values())
    local = run_pipeline(with_env(twin, MODEL__PARAMS=params), "manual", "twin", AT)
    for step in ("extract", "features"):
        a, b = dict(run.outputs[step]), dict(local.outputs[step])
        for key in ("snapshot", "feature_spec", "folder"):
            a.pop(key, None), b.pop(key, None)
        assert a == b, step
    assert run.outputs["train"]["metrics"] == pytest.approx(local.outputs["train"]["metrics"])
    assert run.outputs["evaluate"]["passed"] == local.outputs["evaluate"]["passed"]
    assert run.promoted == local.promoted
    champion = Registry.for_project(project).alias_version(CHAMPION)
    assert champion == Registry.for_project(twin).alias_version(CHAMPION)
