"""Crash safety of every alias move, and the lock, with real OS processes.

Every caller that moves an alias (train, promote, rollback, finetune, the retraining pipeline;
the replay moves through the pipeline) goes through one compare-and-set whose authority is the
state database. Each crash test SIGKILLs a `flywheel` command at a point (FLYWHEEL_CRASH_AT makes
the process kill itself there, exactly as `kill -9` would): after the state database recorded the
move and before MLflow followed (`alias:after-claim`), or after MLflow followed and before the
move was marked applied (`alias:after-mlflow`). Then: the state database already names the new
version; reconciliation (which every move, pipeline run and `flywheel serve` starts with) brings
MLflow to it and leaves no pending intent; the next move works.

Each test starts from a copy of a project trained once per module (`clone_project`): the crash is
what is under test, not the training before it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from flywheel.config import Project, load_llm_project, load_project
from flywheel.core.lineage import CRASH_ENV
from flywheel.lifecycle.aliases import promote, reconcile_aliases
from flywheel.lifecycle.train import train_challenger
from flywheel.pipeline.runner import run_pipeline
from flywheel.pipeline.runs import list_runs
from flywheel.registry import CHAMPION, Registry
from flywheel.state.aliases import alias_moves, pending_moves, pointer
from flywheel.state.db import open_state
from tests.conftest import clone_project, load_sample, new_project
from tests.tiny_llm import build_tiny_model, tiny_config, write_config

WEAK = {"model": {"params": {"num_boost_round": 2}}, "gate": {"floor": 0.5}}
STRONG = "{num_boost_round: 60}"
AT = "2006-10-01"
POINTS = ["alias:after-claim", "alias:after-mlflow"]


def flywheel(project_path: Path, home: Path, *args: str, crash: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    extra = {CRASH_ENV: crash} if crash else {}
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args, "--config", str(project_path)],
                          env={**os.environ, "FLYWHEEL_HOME": str(home), **extra, **(env or {})},
                          capture_output=True, text=True, timeout=600)


def views(project: Project) -> tuple[int | None, int | None, int | None, int]:
    """(MLflow's champion, the state database's, the last history row's, pending intents)."""
    registry = Registry.for_project(project)
    engine = open_state(project.state_url)
    here = pointer(engine, registry.model_name, CHAMPION)
    moves = alias_moves(engine, registry.model_name, CHAMPION)
    return (registry.alias_version(CHAMPION), here.version if here else None,
            moves[-1].version if moves else None, len(pending_moves(engine, registry.model_name)))


def assert_crashed_then_recovered(project: Project, done: subprocess.CompletedProcess[str], point: str,
                                  old: int | None, new: int) -> None:
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    mlflow_at = old if point == "alias:after-claim" else new
    assert views(project) == (mlflow_at, new, new, 1)  # the state DB is the authority already
    reconcile_aliases(Registry.for_project(project), open_state(project.state_url))
    assert views(project) == (new, new, new, 0)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, sba_sample) -> dict[str, Project]:
    """Made once per module: the sample loaded; v1 champion; v1 champion and v2 not promoted."""
    root = tmp_path_factory.mktemp("bases")
    loaded = load_sample(new_project(root / "loaded", WEAK), sba_sample)
    one = clone_project(loaded, root / "one")
    assert train_challenger(one).promoted
    two = clone_project(one, root / "two")
    assert not train_challenger(two).promoted  # same data: no improvement
    return {"loaded": loaded, "one": one, "two": two}


@pytest.fixture
def copy_of(bases, tmp_path):
    return lambda name: clone_project(bases[name], tmp_path / name)


@pytest.fixture
def two_versions(copy_of) -> Project:
    return copy_of("two")


@pytest.mark.parametrize("point", POINTS)
def test_train_killed_inside_its_promotion(copy_of, point):
    project = copy_of("loaded")
    done = flywheel(project.path, project.home, "train", crash=point)  # the first champion
    assert_crashed_then_recovered(project, done, point, None, 1)
    again = train_challenger(project)  # gated against the recovered champion
    assert again.champion_version == 1 and again.version == 2


@pytest.mark.parametrize("point", POINTS)
def test_promote_killed_inside_the_move(two_versions, point):
    project = two_versions
    done = flywheel(project.path, project.home, "promote", "--version", "2", crash=point)
    assert_crashed_then_recovered(project, done, point, 1, 2)
    moves = alias_moves(open_state(project.state_url), "sba-loans", CHAMPION)
    assert moves[-1].action == "manual" and moves[-1].actor and "@" in moves[-1].actor


@pytest.mark.parametrize("point", POINTS)
def test_rollback_killed_inside_the_move(two_versions, point):
    project = two_versions
    promote(project, 2, reason="to roll back from")
    done = flywheel(project.path, project.home, "rollback", crash=point)
    assert_crashed_then_recovered(project, done, point, 2, 1)
    assert promote(project, 2).previous_version == 1


def test_finetune_killed_inside_its_promotion(tmp_path):
    folder = tmp_path / "lora"
    path = write_config(folder, tiny_config(build_tiny_model(tmp_path / "base"), training={"steps": 5}))
    project = load_llm_project(path, env={"FLYWHEEL_HOME": str(folder / ".flywheel")})
    done = flywheel(project.path, project.home, "finetune", crash="alias:after-claim")
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert views(project) == (None, 1, 1, 1)  # the first champion: MLflow had none
    # `flywheel serve` reconciles before its workers start; here the same call directly
    fixed = reconcile_aliases(Registry.for_project(project), open_state(project.state_url))
    assert fixed == ["tiny-lora@champion: finished the interrupted move to v1"]
    assert views(project) == (1, 1, 1, 0)


def retrain_process(project: Project, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "FLYWHEEL_HOME": str(project.home), "FLYWHEEL_MODEL__PARAMS": STRONG,
           **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "flywheel.cli", "retrain", "--config", str(project.path),
                             "--orchestrator", "local", "--at", AT], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("point", ["after:extract", "after:features", "after:train", "after:evaluate",
                                   *POINTS, "after:promote"])
def test_pipeline_killed_at_each_step_boundary_and_inside_promote(copy_of, point):
    project = copy_of("one")
    proc = retrain_process(project, {CRASH_ENV: point})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out
    moved = point in (*POINTS, "after:promote")
    mlflow_at = 1 if point in ("after:extract", "after:features", "after:train", "after:evaluate",
                               "alias:after-claim") else 2
    assert views(project)[:3] == (mlflow_at, 2 if moved else 1, 2 if moved else 1)

    again = load_project(project.path, env={"FLYWHEEL_HOME": str(project.home),
                                            "FLYWHEEL_MODEL__PARAMS": STRONG})
    nxt = run_pipeline(again, "manual", "after the crash", date.fromisoformat(AT))
    assert nxt.status == "succeeded", nxt.error
    champion, state_says, recorded, pending = views(project)
    assert champion == state_says == recorded and pending == 0
    first = list_runs(project)[0]
    assert first.status == "failed" and "died" in (first.error or "")  # not left 'running'
    versions = Registry.for_project(project).versions()
    assert champion in versions and len(versions) in (2, 3)  # a crash before train leaves no version


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_two_pipeline_processes_at_once_never_both_promote(make_project, sba_sample, copy_of, request,
                                                          store):
    if store == "postgresql":
        url = request.getfixturevalue("postgres_url")
        project = load_sample(make_project({**WEAK, "stores": {"state": url, "tracking": url}}), sba_sample)
        assert train_challenger(project).promoted
    else:
        project = copy_of("one")
    first, second = retrain_process(project), retrain_process(project)
    outs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    runs = list_runs(project)
    assert len(runs) == 2 and all(r.status == "succeeded" for r in runs)
    promoted = [r for r in runs if r.promoted]
    assert len(promoted) == 1, [r.outputs["promote"] for r in runs]
    loser = next(r for r in runs if not r.promoted)
    assert ("champion moved since evaluation" in loser.outputs["promote"]["reason"]
            or "gate failed" in loser.outputs["promote"]["reason"])
    champion, state_says, recorded, pending = views(project)
    assert champion == state_says == recorded == promoted[0].version and pending == 0
