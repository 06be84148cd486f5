"""Run the pipeline's steps: one step of a recorded run (what Airflow's tasks and Prefect's tasks
call), or all of them in this process (the `local` orchestrator)."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from datetime import date
from typing import Any

from flywheel.alerts import Alert, send_alert
from flywheel.config import Project
from flywheel.core.errors import FlywheelError, PipelineError
from flywheel.core.lineage import crash_point
from flywheel.core.progress import Reporter
from flywheel.lifecycle.aliases import reconcile_aliases
from flywheel.pipeline.runs import (
    STEPS,
    EvaluateResult,
    ExtractResult,
    FeaturesResult,
    PipelineRun,
    StepResult,
    TrainStepResult,
    fail_dead_runs,
    load_run,
    owner,
    save_step,
    start_run,
)
from flywheel.pipeline.steps import (
    step_alert,
    step_evaluate,
    step_extract,
    step_features,
    step_promote,
    step_train,
)
from flywheel.registry import Registry
from flywheel.state.db import open_state


def recover(project: Project) -> list[str]:
    """Before a run: finish or undo alias moves a dead process left, fail runs whose process died."""
    fixed = reconcile_aliases(Registry.for_project(project), open_state(project.state_url))
    return fixed + fail_dead_runs(project)


def run_step(project: Project, name: str, run_id: str, at: date | None = None,
             reporter: Reporter | None = None) -> StepResult:
    """Run one step of an existing pipeline run, reading earlier results from the state DB."""
    if name not in STEPS:
        raise PipelineError(f"unknown step '{name}'; steps are: {', '.join(STEPS)}")
    run = load_run(project, run_id)
    call = _step_call(project, run, name, run.clock or at or date.today(), reporter)
    save_step(project, run_id, name, **owner())
    try:
        result = call()
    except Exception as exc:
        save_step(project, run_id, name, None, "failed", f"{name}: {exc}")
        send_alert(Alert(f"{project.config.registered_model}: pipeline step '{name}' failed",
                         f"pipeline run `{run_id}`: {type(exc).__name__}: {exc}", "error"))
        raise
    save_step(project, run_id, name, result, "succeeded" if name == STEPS[-1] else "running")
    crash_point(f"after:{name}")
    return result


def _step_call(project: Project, run: PipelineRun, name: str, clock: date,
               reporter: Reporter | None) -> Callable[[], Any]:
    registry = Registry.for_project(project)
    calls: dict[str, Callable[[], Any]] = {
        "extract": lambda: step_extract(project, registry, clock, bool(run.outputs.get("data_time"))),
        "features": lambda: step_features(project, run.id, run.need("extract", ExtractResult, name)),
        "train": lambda: step_train(project, registry, run.need("features", FeaturesResult, name),
                                    reporter),
        "evaluate": lambda: step_evaluate(project, registry, run.need("extract", ExtractResult, name),
                                          run.need("features", FeaturesResult, name),
                                          run.need("train", TrainStepResult, name)),
        "promote": lambda: step_promote(project, registry, run.need("extract", ExtractResult, name),
                                        run.need("evaluate", EvaluateResult, name)),
        "alert": lambda: step_alert(project, run),
    }
    return calls[name]


def run_pipeline(project: Project, trigger: str = "manual", reason: str = "requested",
                 at: date | None = None, reporter: Reporter | None = None,
                 data_time: bool = False) -> PipelineRun:
    """Every step in order, in this process (the `local` orchestrator)."""
    clock = at or date.today()
    recover(project)
    run_id = start_run(project, trigger, reason, clock, data_time=data_time)
    for name in STEPS:
        try:
            run_step(project, name, run_id, clock, reporter)
        except FlywheelError:
            break  # said in the run's record, which the caller shows: no traceback for it
        except Exception:
            traceback.print_exc()  # a bug of ours or a library's: the trace helps whoever fixes it
            break
    return load_run(project, run_id)
