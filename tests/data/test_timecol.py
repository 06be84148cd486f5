"""The time column in each unit a source may hold: dates, integer years and months, text dates."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest

from flywheel.config import ConfigError, DataConfig
from flywheel.data.timecol import TimeColumnError, sql_bounds, to_timestamps


def data(**kw) -> DataConfig:
    base = {"table": "t", "id_column": "id", "time_column": "when",
            "window": {"start": "2010-01-01", "end": "2020-01-01"},
            "target": {"kind": "column", "column": "y", "positive": 1}}
    return DataConfig.model_validate({**base, **kw})


def test_years_months_and_text_dates_become_the_first_day_of_their_period():
    years = to_timestamps(pd.Series([2017, None, 2019]), data(time_unit="year"))
    assert list(years) == [pd.Timestamp("2017-01-01"), pd.NaT, pd.Timestamp("2019-01-01")]
    months = to_timestamps(pd.Series([201703, 201712]), data(time_unit="month"))
    assert list(months) == [pd.Timestamp("2017-03-01"), pd.Timestamp("2017-12-01")]
    text = to_timestamps(pd.Series(["28/02/1997", "01/03/1997"]),
                         data(time_unit="text", time_format="%d/%m/%Y"))
    assert list(text) == [pd.Timestamp("1997-02-28"), pd.Timestamp("1997-03-01")]
    iso = to_timestamps(pd.Series(["1997-02-28", "1997-03-01 10:30:00"]), data(time_unit="text"))
    assert list(iso) == [pd.Timestamp("1997-02-28"), pd.Timestamp("1997-03-01 10:30")]


@pytest.mark.parametrize(("values", "cfg", "message"), [
    ([2017, 2018], {}, "holds numbers (2017, 2018), not dates: set data.time_unit to year"),
    ([2017, 20171], {"time_unit": "year"}, "holds 20171: with time_unit year"),
    ([201713], {"time_unit": "month"}, "holds 201713: with time_unit month each value must be YYYYMM"),
    ([2017.5], {"time_unit": "year"}, "holds non-integers (for example 2017.5)"),
    (["1997-02-28", "yesterday"], {"time_unit": "text"}, "1 value(s) cannot be read"),
    (["28/02/1997"], {"time_unit": "text", "time_format": "%Y-%m-%d"}, "with format '%Y-%m-%d'"),
])
def test_values_the_unit_cannot_read_are_refused_with_examples(values, cfg, message):
    with pytest.raises(TimeColumnError, match=None) as err:
        to_timestamps(pd.Series(values), data(**cfg))
    assert message in str(err.value)


def test_window_bounds_in_the_columns_own_values():
    assert sql_bounds(date(2010, 1, 1), date(2015, 6, 1), data(time_unit="year")) == (2010, 2016)
    assert sql_bounds(date(2010, 1, 2), date(2015, 1, 1), data(time_unit="year")) == (2011, 2015)
    assert sql_bounds(date(2010, 12, 5), date(2011, 3, 1), data(time_unit="month")) == (201101, 201103)
    assert sql_bounds(date(2010, 1, 1), date(2011, 1, 1), data(time_unit="text")) == \
        ("2010-01-01", "2011-01-01")
    assert sql_bounds(date(2010, 1, 1), date(2011, 1, 1), data(time_unit="text", time_format="%d/%m/%Y")) \
        is None  # only Python can compare such text


def test_a_window_may_be_written_in_the_unit_and_a_number_for_a_date_is_explained():
    assert data(time_unit="year", window={"start": 2012, "end": 2020}).window.start == date(2012, 1, 1)
    assert data(time_unit="month", window={"start": 201203, "end": 201301}).window.end == date(2013, 1, 1)
    with pytest.raises(ValueError, match="window.start is the number 2012 but time_unit is date"):
        data(window={"start": 2012, "end": 2020})
    with pytest.raises(ValueError, match="time_format is for time_unit: text"):
        data(time_format="%Y")
    assert issubclass(ConfigError, ValueError)


def test_a_window_bound_is_read_in_the_time_unit():
    from datetime import date

    from flywheel.data.timecol import window_bound

    assert window_bound("2018", "year") == date(2018, 1, 1)
    assert window_bound("201803", "month") == date(2018, 3, 1)
    assert window_bound("2018-03-05", "year") == date(2018, 3, 5)
    with pytest.raises(ValueError, match="write 2018-01-01"):
        window_bound("2018", "date")  # never Unix seconds
    with pytest.raises(ValueError, match="YYYYMM"):
        window_bound("2018", "month")
