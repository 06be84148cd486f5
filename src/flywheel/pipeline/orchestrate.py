"""Run the retraining pipeline with the configured orchestrator: Prefect (embedded) or local."""

from __future__ import annotations

import logging
from datetime import date

from flywheel.config import Project
from flywheel.core.errors import PipelineError
from flywheel.core.extras import installed, require, without
from flywheel.lifecycle.learning import data_clock
from flywheel.pipeline.prefect_flow import run_prefect_pipeline
from flywheel.pipeline.runner import run_pipeline
from flywheel.pipeline.runs import PipelineRun, load_run

log = logging.getLogger("flywheel.pipeline")


def pipeline_clock(project: Project, at: date | str | None = None) -> date:
    """A run's clock: `at` (a date, or "data"), else by `retraining.clock`: today, or the day
    after the latest row a retrain could learn from."""
    if isinstance(at, date):
        return at
    if follows_data(project, at):
        return data_clock(project)
    if at is None:
        return date.today()
    raise PipelineError(f"--at {at!r}: a date (YYYY-MM-DD) or 'data'")


def follows_data(project: Project, at: date | str | None) -> bool:
    """Whether a run with this `at` takes its clock from the data."""
    return at == "data" or (at is None and project.config.retraining.clock == "data")


def orchestrate(project: Project, trigger: str, reason: str, at: date | str | None = None,
                orchestrator: str | None = None) -> PipelineRun:
    data_time = follows_data(project, at)
    at = pipeline_clock(project, at)
    which = orchestrator or project.config.retraining.orchestrator
    if which is None:  # the default: Prefect when it is installed
        which = "prefect" if installed("prefect") else "local"
        if which == "local":
            log.warning(without("prefect", "retraining with the local runner"))
    if which == "prefect":
        require("prefect", "retraining.orchestrator: prefect")
        run_id, _ = run_prefect_pipeline(project, trigger, reason, at, data_time)
        return load_run(project, run_id)
    if which != "local":
        raise PipelineError(f"unknown orchestrator '{which}': use local or prefect "
                            "(Airflow runs the steps itself: see deploy/airflow)")
    return run_pipeline(project, trigger, reason, at, data_time=data_time)
