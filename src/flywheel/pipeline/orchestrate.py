"""Run the retraining pipeline with the configured orchestrator: Prefect (embedded) or local."""

from __future__ import annotations

import logging
from datetime import date

from flywheel.config import Project
from flywheel.core.errors import PipelineError
from flywheel.core.extras import installed, require, without
from flywheel.pipeline.prefect_flow import run_prefect_pipeline
from flywheel.pipeline.runner import run_pipeline
from flywheel.pipeline.runs import PipelineRun, load_run

log = logging.getLogger("flywheel.pipeline")


def orchestrate(project: Project, trigger: str, reason: str, at: date | None = None,
                orchestrator: str | None = None) -> PipelineRun:
    which = orchestrator or project.config.retraining.orchestrator
    if which is None:  # the default: Prefect when it is installed
        which = "prefect" if installed("prefect") else "local"
        if which == "local":
            log.warning(without("prefect", "retraining with the local runner"))
    if which == "prefect":
        require("prefect", "retraining.orchestrator: prefect")
        run_id, _ = run_prefect_pipeline(project, trigger, reason, at)
        return load_run(project, run_id)
    if which != "local":
        raise PipelineError(f"unknown orchestrator '{which}': use local or prefect "
                            "(Airflow runs the steps itself: see deploy/airflow)")
    return run_pipeline(project, trigger, reason, at)
