"""The tabular core runs without the optional extras: each default falls back and says so, and
asking for a missing part is an error that names its extra.

A package is made absent for a `flywheel` process with an import blocker (a sitecustomize on its
PYTHONPATH that refuses to import the named packages), as in an environment without the extra.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx

from flywheel.core.extras import EXTRAS
from flywheel.lifecycle.train import train_challenger
from tests.conftest import REPO, ServerProcess

BLOCKER = '''
import importlib.abc, os, sys
BLOCKED = set(os.environ["FLYWHEEL_TEST_BLOCK"].split(","))
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, Blocker())
'''
OPTIONAL = "prefect,evidently,torch,transformers,peft,gguf,accelerate"


def without_extras(tmp_path: Path, project, *args: str) -> subprocess.CompletedProcess[str]:
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(site), "FLYWHEEL_TEST_BLOCK": OPTIONAL,
           "FLYWHEEL_HOME": str(project.home), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args, "--config", str(project.path)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_the_core_dependencies_leave_out_every_extra():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("[")[0].split("=")[0].strip().lower() for d in meta["dependencies"]}
    assert not core & {"torch", "transformers", "peft", "gguf", "accelerate", "prefect", "evidently"}
    extras = meta["optional-dependencies"]
    assert set(EXTRAS) <= set(extras) and extras["all"] == [f"mlflywheel[{','.join(EXTRAS)}]"]


def test_with_the_base_alone_the_loop_names_the_train_extra_and_status_still_works(loaded_project, tmp_path):
    """The base serves; a command of the loop, where [train]'s libraries are missing, names it."""
    project = loaded_project({"model": {"params": {"num_boost_round": 2}}, "gate": {"floor": 0.5}})
    assert train_challenger(project).promoted
    site = tmp_path / "blocker"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(site), "FLYWHEEL_TEST_BLOCK": f"{OPTIONAL},pandas,duckdb,"
           "lightgbm,sklearn,matplotlib,pyarrow,scipy,onnx,onnxmltools,skl2onnx",
           "FLYWHEEL_HOME": str(project.home), "COLUMNS": "200"}
    for command in ("train", "monitor", "evaluate"):
        done = subprocess.run([sys.executable, "-m", "flywheel.cli", command, "--config", str(project.path)],
                              capture_output=True, text=True, env=env, timeout=300)
        said = " ".join((done.stdout + done.stderr).split())
        assert done.returncode == 1 and "pip install 'mlflywheel[train]'" in said, said
        assert "Traceback" not in said
    status = subprocess.run([sys.executable, "-m", "flywheel.cli", "status", "--json", "--config",
                             str(project.path)], capture_output=True, text=True, env=env, timeout=300)
    assert status.returncode == 0 and '"champion"' in status.stdout, status.stderr[-2000:]
    # and the server, with the control room on it (its page and model cards need no [train])
    server = ServerProcess(project, env={"PYTHONPATH": env["PYTHONPATH"], "FLYWHEEL_TEST_BLOCK":
                                         env["FLYWHEEL_TEST_BLOCK"], "FLYWHEEL_ROOM__MOUNT_ON_SERVE": "true"})
    try:
        server.wait_ready(90)
        assert httpx.get(f"{server.url}/room/", timeout=30).status_code == 200
        card = httpx.get(f"{server.url}/room/cards/1", timeout=30)
        assert card.status_code == 200 and "Gate decision" in card.text
    finally:
        server.stop()


def test_without_extras_a_retrain_runs_locally_and_says_what_prefect_adds(loaded_project, tmp_path):
    project = loaded_project({"model": {"params": {"num_boost_round": 2}}, "gate": {"floor": 0.5}})
    assert train_challenger(project).promoted
    done = without_extras(tmp_path, project, "retrain", "--at", "2006-10-01")
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 0, said
    assert "retraining with the local runner (pip install 'mlflywheel[prefect]' adds the embedded " \
           "Prefect orchestrator" in said
    assert "succeeded" in said and "Traceback" not in said

    asked = without_extras(tmp_path, project, "retrain", "--at", "2006-10-01", "--orchestrator", "prefect")
    said = " ".join((asked.stdout + asked.stderr).split())
    assert asked.returncode == 1 and "pip install 'mlflywheel[prefect]'" in said

    mlp = without_extras(tmp_path, project, "train", "--model-type", "torch-mlp")
    said = " ".join((mlp.stdout + mlp.stderr).split())
    assert mlp.returncode == 1 and "pip install 'mlflywheel[mlp]'" in said and "Traceback" not in said


def test_without_the_llm_extra_finetune_names_it(tmp_path):
    from flywheel.config import load_llm_project
    from tests.tiny_llm import tiny_config, write_config

    path = write_config(tmp_path / "lora", tiny_config(tmp_path / "no-base-needed"))
    project = load_llm_project(path, env={"FLYWHEEL_HOME": str(tmp_path / "lora" / ".flywheel")})
    done = without_extras(tmp_path, project, "finetune")
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1 and "pip install 'mlflywheel[llm]'" in said and "Traceback" not in said


def test_monitoring_reports_only_when_evidently_is_there(monkeypatch, caplog):
    from flywheel.monitoring import monitor

    monkeypatch.setitem(EXTRAS, "reports", ("no_such_module_here", EXTRAS["reports"][1]))
    assert monitor._report_wanted(None) is False
    assert "monitoring without Evidently's HTML report (pip install 'mlflywheel[reports]'" in caplog.text
    assert monitor._report_wanted(False) is False
    try:
        monitor._report_wanted(True)
    except Exception as err:  # asked for explicitly: an error that names the extra
        assert "mlflywheel[reports]" in str(err)
    else:
        raise AssertionError("an explicit report without Evidently was accepted")
