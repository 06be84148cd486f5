"""The replay shares the CPUs it may use, and a replay that fails stops its oracle at once."""

import multiprocessing
import time

import pytest

from flywheel.demo import replay
from flywheel.demo.replay import ThreadBudget, run_replay
from flywheel.lifecycle.train import train_challenger


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 16])
def test_compute_threads_running_at_once_never_exceed_the_usable_cpus(cpus):
    budget = ThreadBudget.for_cpus(cpus)
    at_once = budget.oracle_processes * budget.oracle_threads + budget.retrain_threads
    assert at_once <= cpus and budget.retrain_threads >= 1
    assert (budget.oracle_processes == 0) == (cpus == 1)  # one CPU: the oracle runs after the loop
    assert f"{cpus} usable CPU" in budget.describe()


def test_a_failed_replay_stops_the_oracles_processes_now(loaded_project, monkeypatch):
    project = loaded_project({"model": {"params": {"num_boost_round": 20}}})
    assert train_challenger(project).promoted

    def broken(*args, **kwargs):
        time.sleep(3)  # the oracle's processes are up and training
        raise RuntimeError("the source database went away")

    monkeypatch.setattr(replay, "_replay_frame", broken)
    said = []
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="went away"):
        run_replay(project, n_quarters=8, progress=said.append)
    assert time.monotonic() - started < 30  # not after the oracle's 8 trainings
    assert multiprocessing.active_children() == []
    assert said and said[0].startswith("CPU budget:")
