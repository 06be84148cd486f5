"""One tick of the loop: monitor the latest window, decide whether a trigger fires, retrain if so.

`flywheel run` ticks on the wall clock; the replay demo ticks once per simulated quarter, with
its own window and clock. Both call `check_once`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime

from flywheel.alerts import Alert, send_alert
from flywheel.config import MonitorWindow, Project
from flywheel.lifecycle.rollout import RolloutCheck, check_rollout
from flywheel.monitoring.monitor import MonitorError, MonitorVerdict, run_monitor
from flywheel.pipeline.orchestrate import orchestrate, pipeline_clock
from flywheel.pipeline.runs import PipelineRun, get_watermark
from flywheel.pipeline.steps import labelled_rows_since
from flywheel.pipeline.triggers import TriggerDecision, due_trigger, last_retrain_clock
from flywheel.registry import Registry


@dataclass(frozen=True)
class Tick:
    verdict: MonitorVerdict | None
    decision: TriggerDecision | None
    run: PipelineRun | None
    rollout: RolloutCheck | None = None


def check_once(project: Project, at: date | None = None, say: Callable[[str], None] = print,
               window: MonitorWindow | None = None, monitor_at: datetime | None = None,
               report: bool | None = None) -> Tick:
    """Monitor (`window`, default the config's; `monitor_at`, default now), decide, maybe retrain."""
    clock = pipeline_clock(project, at)  # today, or the data's time (retraining.clock: data)
    verdict = None
    try:
        verdict = run_monitor(project, Registry.for_project(project), window, monitor_at, report)
        say(f"monitor: {verdict.summary()}")
    except MonitorError as exc:
        say(f"monitor: skipped ({exc})")
    rollout = check_rollout(project, clock)
    if rollout is not None:
        say(f"rollout: {rollout.summary()}")
        if rollout.decision != "continue":
            name = project.config.registered_model
            title = (f"{name}: v{rollout.rollout.challenger_version} promoted after its shadow rollout"
                     if rollout.decision == "promote" else
                     f"{name}: shadow rollout of v{rollout.rollout.challenger_version} aborted")
            send_alert(Alert(title, rollout.summary(), "info"))
    new_rows = None
    if project.config.retraining.triggers.new_labelled_rows:
        new_rows = labelled_rows_since(project, get_watermark(project), clock)
    decision = due_trigger(project, clock, verdict, last_retrain_clock(project), new_rows)
    if decision is None:
        return Tick(verdict, None, None, rollout)
    say(f"trigger {decision.trigger}: {decision.reason}")
    run = orchestrate(project, decision.trigger, decision.reason, clock)
    say(f"pipeline run {run.id}: {run.status}, v{run.version} "
        f"{'promoted' if run.promoted else 'not promoted'}")
    return Tick(verdict, decision, run, rollout)
