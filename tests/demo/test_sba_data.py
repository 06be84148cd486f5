"""Expectations on the SBA data as the source database holds it, and on the features built from it."""

import numpy as np
import pandas as pd
import pytest

from flywheel.data.checks import DataCheckError, run_data_checks, standalone_auc
from flywheel.data.features import input_columns
from flywheel.demo.sba import LEAKY_DROPPED, LEAKY_KEPT_NOT_FEATURES, SOURCE_TYPES
from flywheel.lifecycle.features import check_data, extract_training_window, prepare_features

LEAKY_NAMES = {"term", "chgoff_date", "chgoff_prin_gr", "balance_gross", "mis_status"}


def test_sample_has_the_source_schema_and_types(sba_sample):
    assert set(sba_sample.columns) <= set(SOURCE_TYPES)
    assert not set(LEAKY_DROPPED) & set(sba_sample.columns)
    assert sba_sample["loan_nr"].is_unique
    assert set(sba_sample["mis_status"]) == {"P I F", "CHGOFF"}
    assert pd.api.types.is_float_dtype(sba_sample["gr_appv"])
    assert (sba_sample["gr_appv"] > 0).all()
    years = pd.to_datetime(sba_sample["approval_date"]).dt.year
    assert years.between(1989, 2013).all()  # two-digit years were fixed
    # Nearly every charge-off has its date (47 of 157,558 in the full data do not). Some loans
    # paid in full carry a charge-off date too (4,927 in the full data): the target counts a loan
    # only when its status is CHGOFF and the date falls inside the performance window.
    chgoff = sba_sample["mis_status"] == "CHGOFF"
    assert sba_sample.loc[chgoff, "chgoff_date"].notna().mean() > 0.99


def test_no_feature_reads_a_leaky_column(make_project):
    project = make_project()
    read = set(input_columns(project.config.features))
    assert not read & LEAKY_NAMES
    assert not read & set(LEAKY_KEPT_NOT_FEATURES)


def test_training_window_target_and_label_maturity(loaded_project):
    project = loaded_project()
    snap = extract_training_window(project)
    frame = snap.frame()
    assert snap.rows == len(frame) > 5000
    assert frame["__target__"].isin([0, 1]).all()
    # both classes present in numbers a model can learn from (the sample over-represents
    # charge-offs; the population rate in FY1995-1999 is about 0.1%)
    assert 100 <= frame["__target__"].sum() <= 0.2 * len(frame)
    # a 24-month performance window: only loans approved by as_of - 24 months are labelled
    assert frame["approval_date"].max() <= pd.Timestamp("1999-10-01")
    assert snap.immature_dropped > 0
    positive = frame[frame["__target__"] == 1]
    assert (positive["mis_status"] == "CHGOFF").all()
    months = (pd.to_datetime(positive["chgoff_date"]) - positive["approval_date"]).dt.days / 30.44
    assert (months <= 24.1).all()


def test_leakage_screen_passes_the_example_features(loaded_project):
    project = loaded_project()
    prepared = prepare_features(project, extract_training_window(project))
    report = check_data(project, prepared)
    assert report.passed
    assert max(report.standalone_auc.values()) < project.config.checks.leakage_auc_threshold


def test_leakage_screen_stops_training_when_term_is_added_back(loaded_project):
    project = loaded_project({"features": [*_example_features(), {"name": "term", "kind": "numeric",
                                                                    "column": "term"}]})
    prepared = prepare_features(project, extract_training_window(project))
    with pytest.raises(DataCheckError) as err:
        check_data(project, prepared)
    assert "feature 'term' alone reaches ROC-AUC" in str(err.value)
    assert "checks.accept_leaky" in str(err.value)


def test_an_accepted_leak_is_recorded_not_refused(loaded_project):
    features = [*_example_features(), {"name": "term", "kind": "numeric", "column": "term"}]
    project = loaded_project({"features": features, "checks": {"accept_leaky": ["term"]}})
    report = check_data(project, prepare_features(project, extract_training_window(project)))
    assert report.accepted == ["term"]


def test_standalone_auc_catches_a_non_monotone_leak_and_ignores_noise():
    rng = np.random.default_rng(1)
    y = (rng.random(20000) < 0.1).astype(int)
    months = np.where(y == 1, rng.integers(1, 60, 20000), rng.choice([60, 84, 120, 240], 20000))
    assert standalone_auc(months.astype(float), y) > 0.9
    assert abs(standalone_auc(rng.normal(size=20000), y) - 0.5) < 0.03


def test_checks_report_too_few_rows_and_a_single_class():
    from flywheel.config import ChecksConfig

    X = np.zeros((10, 1))
    report = run_data_checks(X, np.zeros(10), ["f"], ChecksConfig())
    assert any("only 10 labelled rows" in f for f in report.failures)
    assert any("0 positive" in f for f in report.failures)


def _example_features() -> list[dict]:
    from tests.conftest import example_config

    return example_config()["features"]
