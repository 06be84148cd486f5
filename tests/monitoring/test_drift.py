"""The profile-based drift detector: Evidently's tests, from precomputed reference statistics."""

import numpy as np
import pandas as pd
import pytest

from flywheel.monitoring.drift import (
    PROBS,
    ReferenceProfile,
    build_profile,
    detect_drift,
    jensenshannon,
    quantiles_of,
)
from tests.drift_data import SHIFTED, make_frame


def test_every_shifted_column_is_flagged_and_no_other():
    ref, cur = make_frame(200_000, 1, False), make_frame(200_000, 2, True)
    profile = build_profile(ref, [c for c in ref.columns if c.startswith("cat_")])
    result = detect_drift(profile, cur)
    assert set(result.drifted_columns) == set(SHIFTED)
    assert result.share == pytest.approx(len(SHIFTED) / ref.shape[1])
    assert not result.detected  # 6 of 20 < half


def test_same_distribution_does_not_drift():
    ref, cur = make_frame(50_000, 1, False), make_frame(50_000, 3, False)
    result = detect_drift(build_profile(ref, ["cat_00"]), cur)
    assert result.drifted_columns == []
    assert max(c.score for c in result.columns) < 0.05


def test_scores_match_evidently_on_the_same_data():
    from tests.drift_data import evidently_scores

    ref, cur = make_frame(20_000, 1, False), make_frame(20_000, 2, True)
    cats = [c for c in ref.columns if c.startswith("cat_")]
    ours = {c.column: c for c in detect_drift(build_profile(ref, cats), cur).columns}
    theirs = evidently_scores(ref, cur, cats)
    assert set(theirs) == set(ours)
    for name, score in theirs.items():
        assert ours[name].score == pytest.approx(score, abs=0.003), name
        assert ours[name].drifted == (score >= 0.1), name


def test_profile_round_trips_through_json():
    ref = make_frame(5_000, 1, False)
    profile = build_profile(ref, ["cat_00"])
    again = ReferenceProfile.from_dict(profile.to_dict())
    assert again == profile
    assert again.column("num_00").stattest == "wasserstein"
    assert again.column("low_00").stattest == "jensenshannon"  # numeric, but only 4 values
    assert again.column("cat_00").kind == "categorical"


def test_jensenshannon_edges_and_new_categories():
    assert jensenshannon({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == pytest.approx(0.0)
    assert jensenshannon({"a": 1.0}, {"b": 1.0}) == pytest.approx(np.sqrt(np.log(2)))
    assert jensenshannon({"a": 1.0}, {"a": 0.7, "new": 0.3}) > 0.1


def test_missing_values_are_ignored_and_a_missing_column_is_an_error():
    ref = pd.DataFrame({"x": np.arange(1000.0)})
    cur = pd.DataFrame({"x": np.r_[np.arange(1000.0), [np.nan] * 500]})
    assert detect_drift(build_profile(ref), cur).columns[0].score == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="lacks column"):
        detect_drift(build_profile(ref), pd.DataFrame({"y": [1.0]}))


@pytest.mark.parametrize("values", [
    np.array([3.5]), np.array([2.0, -1.0]), np.arange(1001.0)[::-1],
    np.random.default_rng(1).lognormal(size=20_000),  # skewed
    np.random.default_rng(2).integers(0, 4, 5_000).astype(float),  # heavy ties
    np.random.default_rng(3).integers(-50, 50, 777),  # integers, not floats
])
def test_quantiles_by_one_sort_are_numpys(values):
    """The window's quantiles come from one sort instead of np.quantile's partitions: the same
    numbers (to rounding), so the drift scores and verdicts are those numpy gave."""
    np.testing.assert_allclose(quantiles_of(values), np.quantile(values.astype(float), PROBS),
                               rtol=1e-12, atol=1e-12)
