"""Categories the model never learnt are counted per feature, stored and exposed as gauges."""

from __future__ import annotations

import pandas as pd

from flywheel.config import CategoryFeature, NumericFeature
from flywheel.data.features import build_matrix, fit_spec
from flywheel.monitoring.monitor import unseen_categories
from flywheel.serving.http.metrics import _verdict_text


def test_values_outside_the_vocabulary_are_counted_and_empty_ones_are_not():
    train = pd.DataFrame({"plan": ["basic"] * 50 + ["pro"] * 30 + ["legacy"] * 2,
                          "state": ["CA"] * 41 + ["NY"] * 41, "age": range(82)})
    spec = fit_spec([CategoryFeature(kind="category", name="plan", column="plan", min_count=5),
                     CategoryFeature(kind="category", name="state", column="state"),
                     NumericFeature(kind="numeric", name="age", column="age")], train)
    assert spec.vocabularies["plan"] == ["basic", "pro"]  # legacy: too rare to be learnt
    window = pd.DataFrame({"plan": ["basic", "enterprise", "legacy", None, "pro", "enterprise"],
                           "state": ["CA", "NY", "TX", "CA", None, "CA"], "age": [1, 2, 3, 4, 5, 6]})
    counts = unseen_categories(spec, window, build_matrix(spec, window))
    assert counts == {"plan": 3, "state": 1}


def test_unseen_rows_become_a_gauge_per_category_feature():
    verdict = {"model_version": 3, "drift_detected": False, "drift_share": 0.0, "prediction_drift": None,
               "performance_drop": False,
               "columns": [{"column_name": "plan", "stattest": "jensenshannon", "score": 0.01,
                            "drifted": False, "unseen_rows": 42},
                           {"column_name": "age", "stattest": "wasserstein", "score": 0.02,
                            "drifted": False, "unseen_rows": None}]}
    text = _verdict_text(verdict)
    assert 'flywheel_feature_unseen_rows{feature="plan"} 42' in text
    assert 'flywheel_feature_unseen_rows{feature="age"}' not in text


def test_label_values_are_escaped_so_the_exposition_parses():
    from prometheus_client.parser import text_string_to_metric_families

    name = 'odd "name"\\ with\nnewline'
    verdict = {"model_version": 1, "drift_detected": True, "drift_share": 1.0, "prediction_drift": None,
               "performance_drop": False,
               "columns": [{"column_name": name, "stattest": "wasserstein", "score": 0.5, "drifted": True,
                            "unseen_rows": 2}]}
    families = {f.name: f for f in text_string_to_metric_families(_verdict_text(verdict))}
    for family in ("flywheel_feature_drift_score", "flywheel_feature_drifted",
                   "flywheel_feature_unseen_rows"):
        [sample] = families[family].samples
        assert sample.labels["feature"] == name
