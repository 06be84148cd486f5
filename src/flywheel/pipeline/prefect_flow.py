"""The retraining pipeline as a Prefect flow: one task per step, the same step functions.

Prefect runs embedded: with no PREFECT_API_URL it starts a temporary local server whose database
lives under the project's `.flywheel/prefect/` (PREFECT_HOME), so flow and task run states can be
read there afterwards (`flow_run_states`). Set PREFECT_API_URL to use a Prefect server instead.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from datetime import date
from pathlib import Path
from typing import Any

from flywheel.config import Project
from flywheel.pipeline.runner import recover, run_step
from flywheel.pipeline.runs import STEPS, fail_run, load_run, start_run

log = logging.getLogger("flywheel.pipeline")


def prefect_home(project: Project) -> Path:
    return project.home / "prefect"


def configure_prefect(project: Project) -> None:
    """Point Prefect at the project's folder; must run before `prefect` is imported."""
    home = prefect_home(project)
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server starts in 7-13 s on an idle 2-core machine; beside the replay's server
    # and oracle processes it took longer than Prefect's default 20 s, and the flow never ran.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")


def run_prefect_pipeline(project: Project, trigger: str, reason: str,
                         at: date | None = None, data_time: bool = False) -> tuple[str, str]:
    """Run the pipeline as a Prefect flow run; return (pipeline run id, Prefect flow run id)."""
    configure_prefect(project)
    from prefect import flow, task  # heavy and optional: imported after PREFECT_HOME is set
    from prefect.runtime import flow_run

    clock = at or date.today()

    @task(name="step", task_run_name="{name}", retries=0)
    def step(name: str, run_id: str) -> None:
        run_step(project, name, run_id, clock)

    @flow(name=f"retrain-{project.config.registered_model}", flow_run_name=f"{trigger}-{clock}",
          log_prints=False, persist_result=False)
    def retraining(run_id: str) -> tuple[str, str]:
        for name in STEPS:
            step(name, run_id)
        return run_id, str(flow_run.id)

    recover(project)
    run_id = start_run(project, trigger, reason, clock, data_time=data_time)
    try:
        return retraining(run_id)
    except Exception as exc:
        # A failed step has been recorded and alerted on by run_step; anything else (Prefect could
        # not start its server, say) is recorded here so the run never stays "running" silently.
        run = load_run(project, run_id)
        if run.status == "running":
            log.exception("prefect flow of pipeline run %s failed outside the steps", run_id)
            fail_run(project, run_id, f"prefect: {type(exc).__name__}: {exc}")
        return run_id, ""


def flow_run_states(project: Project) -> list[dict[str, Any]]:
    """Flow runs recorded in the embedded Prefect database (read straight from its SQLite file)."""
    db = prefect_home(project) / "prefect.db"
    if not db.is_file():
        return []
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT id, name, state_type, state_name FROM flow_run "
                            "ORDER BY created").fetchall()
    return [dict(r) for r in rows]
