"""Run the retraining pipeline with the configured orchestrator: Prefect (embedded) or local."""

from __future__ import annotations

import logging
from datetime import date

from flywheel.config import Project
from flywheel.core.errors import PipelineError
from flywheel.core.extras import installed, require, without
from flywheel.lifecycle.learning import data_clock
from flywheel.pipeline.prefect_flow import run_prefect_pipeline
from flywheel.pipeline.runner import run_pipeline, run_step
from flywheel.pipeline.runs import STEPS, PipelineRun, StepResult, load_run, start_run

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


def step_of_run(project: Project, name: str, run_id: str, trigger: str = "external",
                reason: str = "orchestrator", at: date | str | None = None) -> StepResult:
    """One step of pipeline run `run_id` (an external orchestrator's task): the run is created on
    its first step with this trigger, reason and clock; earlier steps' results come from the
    state database."""
    if name not in STEPS:  # before a run record is created for it
        raise PipelineError(f"unknown step '{name}'; steps are: {', '.join(STEPS)}")
    start_run(project, trigger, reason, pipeline_clock(project, at), run_id,
              data_time=follows_data(project, at))
    return run_step(project, name, run_id)
