"""The performance-drop verdict: the gate's metric of a labelled window against what the serving
versions promised, in the metric's direction, for every task."""

from __future__ import annotations

import pytest

from flywheel.config import MonitoringConfig
from flywheel.monitoring.monitor import Performance, performance_dropped


@pytest.mark.parametrize(("task", "metric", "value", "promised", "dropped"), [
    ("binary", "roc_auc", 0.74, 0.80, True), ("binary", "roc_auc", 0.76, 0.80, False),
    ("binary", "pr_auc", 0.24, 0.30, True),  # absolute, as ROC-AUC: 0.06 > max_auc_drop 0.05
    ("binary", "log_loss", 0.56, 0.50, True), ("binary", "log_loss", 0.54, 0.50, False),  # 10%
    ("regression", "rmse", 44.5, 40.0, True), ("regression", "rmse", 43.5, 40.0, False),
    ("regression", "r2", 0.17, 0.20, True),  # higher is better: 0.03 worse > 10% of 0.20
    ("multiclass", "macro_f1", 0.40, 0.50, True), ("multiclass", "log_loss", 0.52, 0.50, False),
])
def test_the_performance_drop_is_judged_on_the_gates_metric(task: str, metric: str, value: float,
                                                             promised: float, dropped: bool) -> None:
    perf = Performance(rows=1000, positives=0, metric=metric, value=value)
    assert performance_dropped(perf, promised, MonitoringConfig(), task) is dropped
    assert performance_dropped(perf, None, MonitoringConfig(), task) is False
