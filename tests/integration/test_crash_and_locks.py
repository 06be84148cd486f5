"""Crash safety and the promotion lock, with the pipeline in real OS processes.

Each crash test SIGKILLs `flywheel retrain` at one point (FLYWHEEL_CRASH_AT makes the process kill
itself there, exactly as `kill -9` would), then checks that the registry's champion and the alias
history agree (after the recovery every pipeline run starts with) and that the next run completes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import date

import pytest

from flywheel.config import Project, load_project
from flywheel.data.sources import write_table
from flywheel.demo.sba import SOURCE_TYPES
from flywheel.pipeline.retrain import CRASH_ENV, list_runs, reconcile, run_pipeline
from flywheel.pipeline.steps import open_registry, train_challenger
from flywheel.registry import CHAMPION
from flywheel.state.db import alias_moves, open_state

WEAK = {"model": {"params": {"num_boost_round": 2}}, "gate": {"floor": 0.5}}
AT = "2006-10-01"


def retrain_process(project: Project, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "FLYWHEEL_HOME": str(project.home),
           "FLYWHEEL_MODEL__PARAMS": "{num_boost_round: 60}", **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "flywheel.cli", "retrain", "--config", str(project.path),
                             "--orchestrator", "local", "--at", AT], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def champion_and_history(project: Project) -> tuple[int | None, int | None]:
    registry = open_registry(project)
    moves = alias_moves(open_state(project.state_url), registry.model_name, CHAMPION)
    return registry.alias_version(CHAMPION), (moves[-1].version if moves else None)


@pytest.mark.parametrize("point", ["after:extract", "after:features", "after:train", "after:evaluate",
                                   "promote:after-intent", "promote:after-alias", "after:promote"])
def test_sigkill_at_each_step_boundary_and_inside_promote(loaded_project, point):
    project = loaded_project(WEAK)
    assert train_challenger(project).promoted
    proc = retrain_process(project, {CRASH_ENV: point})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out

    champion, recorded = champion_and_history(project)
    if point == "promote:after-alias":
        # the alias moved, the history row was not written yet: recovery records it
        assert (champion, recorded) == (2, 1)
        assert reconcile(project) == [f"recorded the promotion of v2 left by run {list_runs(project)[0].id}"]
    elif point == "after:promote":
        assert (champion, recorded) == (2, 2)
    else:
        assert (champion, recorded) == (1, 1)  # nothing promoted, nothing half-done
        reconcile(project)
    champion, recorded = champion_and_history(project)
    assert champion == recorded

    nxt = run_pipeline(load_project(project.path, env={"FLYWHEEL_HOME": str(project.home),
                                                       "FLYWHEEL_MODEL__PARAMS": "{num_boost_round: 60}"}),
                       "manual", "after the crash", date.fromisoformat(AT))
    assert nxt.status == "succeeded", nxt.error
    champion, recorded = champion_and_history(project)
    assert champion == recorded
    versions = open_registry(project).versions()
    assert champion in versions and len(versions) in (2, 3)  # a crash before train leaves no version


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_two_pipeline_processes_at_once_never_both_promote(make_project, sba_sample, request, store):
    patch = dict(WEAK)
    if store == "postgresql":
        url = request.getfixturevalue("postgres_url")
        patch["stores"] = {"state": url, "tracking": url}
    project = make_project(patch)
    write_table(sba_sample, project.source_url, "loans", SOURCE_TYPES, index_columns=("approval_date",))
    assert train_challenger(project).promoted
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
    champion, recorded = champion_and_history(project)
    assert champion == recorded == promoted[0].version
