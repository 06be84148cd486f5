"""When to retrain: schedule, new labelled data past the watermark, a drift verdict, a performance
drop, a concept shift found by the audit, an estimated performance drop.

The same decision serves `flywheel run` (wall clock) and the replay demo (simulated clock): time is
passed in, never read here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from flywheel.config import Project
from flywheel.pipeline.runs import list_runs


@dataclass(frozen=True)
class TriggerDecision:
    # drift | performance_drop | concept_shift | estimated_performance_drop | new_data | schedule
    trigger: str
    reason: str


def due_trigger(project: Project, at: date, verdict: Any | None, last_retrain: date | None,
                labelled_since_watermark: int | None = None) -> TriggerDecision | None:
    """The first trigger that fires at `at`, or None; the retraining budget is checked first."""
    t = project.config.retraining.triggers
    if last_retrain is not None and t.min_days_between and (at - last_retrain).days < t.min_days_between:
        return None
    if t.drift and verdict is not None and verdict.drift_detected:
        drifted = verdict.drift.drifted_columns
        d = verdict.drift
        return TriggerDecision("drift", f"{len(drifted)}/{len(d.columns)} features drifted (share "
                                        f"{d.share:.2f} >= {d.share_threshold}): {', '.join(drifted)}")
    if t.performance_drop and verdict is not None and verdict.performance_drop:
        perf = verdict.performance
        return TriggerDecision("performance_drop", f"{perf.metric} {perf.value:.4g} on the latest "
                                                   f"{perf.rows:,} labelled predictions")
    shifts = getattr(verdict, "shifts", None) or []
    if t.concept_shift and shifts:
        run, audit = shifts[0]
        where = "" if run is None else f"window #{run}, "
        return TriggerDecision("concept_shift", where + audit.describe())
    if t.estimated_performance_drop and verdict is not None and getattr(verdict, "estimated_drop", False):
        return TriggerDecision("estimated_performance_drop", verdict.estimate.describe()
                               + " on the latest window, before its labels")
    if t.new_labelled_rows and labelled_since_watermark is not None \
            and labelled_since_watermark >= t.new_labelled_rows:
        return TriggerDecision("new_data", f"{labelled_since_watermark:,} newly labelled rows "
                                           f"(>= {t.new_labelled_rows:,}) since the watermark")
    if t.schedule_days and (last_retrain is None or (at - last_retrain).days >= t.schedule_days):
        return TriggerDecision("schedule", f"every {t.schedule_days:g} days")
    return None


def last_retrain_clock(project: Project) -> date | None:
    """The clock of the newest pipeline run (its simulated date in a replay)."""
    clocks = [r.outputs.get("clock") for r in list_runs(project)]
    dated = [date.fromisoformat(c) for c in clocks if c]
    return max(dated) if dated else None
