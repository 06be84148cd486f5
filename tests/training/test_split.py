import numpy as np
import pandas as pd
import pytest

from flywheel.config import SplitConfig
from flywheel.training.split import SplitError, split_by_time


def test_parts_are_ordered_in_time_and_never_share_a_timestamp():
    rng = np.random.default_rng(0)
    times = pd.Series(pd.to_datetime("2000-01-01") + pd.to_timedelta(rng.integers(0, 400, 5000), "D"))
    s = split_by_time(times, SplitConfig(validation_fraction=0.2, holdout_fraction=0.1))
    t = times.to_numpy()
    assert t[s.train].max() < t[s.validation].min()
    assert t[s.validation].max() < t[s.holdout].min()
    assert len(s.train) + len(s.validation) + len(s.holdout) == 5000
    assert abs(len(s.holdout) / 5000 - 0.1) < 0.02
    assert set(s.train) | set(s.validation) | set(s.holdout) == set(range(5000))


def test_unsorted_input_is_split_by_time_not_by_position():
    times = pd.Series(pd.to_datetime(["2001-01-03", "2001-01-01", "2001-01-05", "2001-01-02",
                                      "2001-01-04", "2001-01-06", "2001-01-07", "2001-01-08"]))
    s = split_by_time(times, SplitConfig(validation_fraction=0.25, holdout_fraction=0.25))
    assert sorted(times[s.holdout]) == list(pd.to_datetime(["2001-01-07", "2001-01-08"]))


def test_a_window_with_one_timestamp_cannot_be_split():
    times = pd.Series(pd.to_datetime(["2001-01-01"] * 100))
    with pytest.raises(SplitError, match="widen data.window"):
        split_by_time(times, SplitConfig())
