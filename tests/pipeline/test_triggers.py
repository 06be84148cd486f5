"""Trigger decisions: budget first, then drift, performance drop, new labelled data, schedule."""

from datetime import date
from types import SimpleNamespace

from flywheel.monitoring.drift import ColumnDrift, DriftResult
from flywheel.pipeline.triggers import due_trigger


def verdict(drifted: bool = False, drop: bool = False):
    cols = [ColumnDrift("a", "wasserstein", 0.3 if drifted else 0.01, 0.1, drifted),
            ColumnDrift("b", "jensenshannon", 0.01, 0.1, False)]
    drift = DriftResult(cols, 1000, 0.5 if drifted else 0.0, drifted, 0.5)
    perf = SimpleNamespace(metric="roc_auc", value=0.55, rows=900)
    return SimpleNamespace(drift_detected=drifted, drift=drift, performance_drop=drop, performance=perf)


def test_drift_fires_with_the_drifted_features_named(make_project):
    d = due_trigger(make_project(), date(2003, 1, 1), verdict(drifted=True), None)
    assert d.trigger == "drift" and "1/2 features" in d.reason and "a" in d.reason


def test_performance_drop_fires(make_project):
    d = due_trigger(make_project(), date(2003, 1, 1), verdict(drop=True), None)
    assert d.trigger == "performance_drop" and "roc_auc 0.55 on the latest 900" in d.reason


def test_budget_blocks_every_trigger_until_it_has_passed(make_project):
    project = make_project({"retraining": {"triggers": {"min_days_between": 270, "schedule_days": 1}}})
    last = date(2003, 1, 1)
    assert due_trigger(project, date(2003, 6, 1), verdict(True, True), last) is None
    assert due_trigger(project, date(2003, 10, 1), verdict(True, True), last).trigger == "drift"


def test_no_verdict_no_trigger_unless_schedule_or_new_data(make_project):
    project = make_project({"retraining": {"triggers": {"schedule_days": 90, "new_labelled_rows": 100,
                                                        "min_days_between": 0}}})
    assert due_trigger(make_project(name="plain"), date(2003, 1, 1), None, None) is None
    assert due_trigger(project, date(2003, 1, 1), verdict(), date(2002, 12, 1), 99) is None
    assert due_trigger(project, date(2003, 1, 1), verdict(), date(2002, 12, 1), 100).trigger == "new_data"
    assert due_trigger(project, date(2003, 3, 2), verdict(), date(2002, 12, 1), 0).trigger == "schedule"


def test_the_audit_and_the_estimate_fire_their_own_triggers_when_switched_on(make_project):
    from flywheel.monitoring.estimation import Audit, Estimate

    band = Estimate("roc_auc", 0.72, 0.69, 0.75, 4000)
    on = make_project({"retraining": {"triggers": {"concept_shift": True,
                                                   "estimated_performance_drop": True}}}, name="on")
    shifted = verdict()
    shifted.shifts = [(12, Audit(3900, 0.975, band, 0.61, True))]  # an earlier window, audited now
    d = due_trigger(on, date(2003, 1, 1), shifted, None)
    assert d.trigger == "concept_shift"
    assert d.reason.startswith("window #12, audit on 3,900 labelled (98%): realized roc_auc 0.61 outside")
    assert due_trigger(make_project(name="default"), date(2003, 1, 1), shifted, None) is None  # default: off
    shifted.shifts = []  # every audit within its band: nothing to say
    assert due_trigger(on, date(2003, 1, 1), shifted, None) is None

    low = verdict()
    low.estimate, low.estimated_drop = Estimate("roc_auc", 0.62, 0.59, 0.65, 4000), True
    assert due_trigger(make_project(name="plain"), date(2003, 1, 1), low, None) is None  # off by default
    d = due_trigger(on, date(2003, 1, 1), low, None)
    assert d.trigger == "estimated_performance_drop" and "estimated roc_auc 0.62 [0.59, 0.65]" in d.reason
