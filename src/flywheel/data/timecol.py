"""What the time column holds (`data.time_unit`), read as timestamps, and a window as SQL bounds.

A date or datetime column, an integer year (2017), an integer month written YYYYMM (201703) or a
date written as text (ISO, or `data.time_format`). A year or a month stands for its first day, so
the split by time and the label timing work on one axis whatever the source holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

import numpy as np
import pandas as pd

from flywheel.config import DataConfig
from flywheel.core.errors import FlywheelError
from flywheel.core.times import EventTimes


class TimeColumnError(FlywheelError, ValueError):
    """The time column holds values that the configured `data.time_unit` cannot read."""


def to_timestamps(values: pd.Series, data: DataConfig) -> pd.Series:
    """The time column as datetime64; nulls stay NaT; a value that cannot be read is an error."""
    unit = data.time_unit
    if unit in ("year", "month"):
        out = _periods(values, unit, data.time_column)
    elif unit == "text":
        text = values.astype("string")
        out = pd.to_datetime(text, format=data.time_format or "ISO8601", errors="coerce")
    else:
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            sample = _examples(values.dropna(), repr_text=False)
            raise TimeColumnError(
                f"time column '{data.time_column}' holds numbers ({sample}), not dates: set "
                "data.time_unit to year (2017) or month (201703), or load a date column")
        out = pd.to_datetime(values, errors="coerce", format="mixed") if values.dtype == object \
            else pd.to_datetime(values, errors="coerce")
    bad = values.notna() & out.isna()
    if bad.any():
        sample = _examples(values[bad])
        how = f"format {data.time_format!r}" if unit == "text" and data.time_format else f"time_unit {unit}"
        raise TimeColumnError(
            f"time column '{data.time_column}': {int(bad.sum()):,} value(s) cannot be read with {how} "
            f"(for example {sample}); see data.time_unit and data.time_format")
    if getattr(out.dt, "tz", None) is not None:
        out = out.dt.tz_convert(None)
    return out.astype("datetime64[ns]")


def _periods(values: pd.Series, unit: str, column: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    whole = numbers.notna() & (numbers == np.floor(numbers))
    if (values.notna() & ~whole).any():
        sample = _examples(values[values.notna() & ~whole])
        raise TimeColumnError(f"time column '{column}' with time_unit {unit} holds non-integers "
                              f"(for example {sample})")
    n = numbers.astype("Int64")
    year = n if unit == "year" else n // 100
    month = pd.Series(1, index=n.index, dtype="Int64") if unit == "year" else n % 100
    ok = n.notna() & year.between(1, 9999) & month.between(1, 12)
    if (n.notna() & ~ok).any():
        sample = _examples(n[n.notna() & ~ok], repr_text=False)
        shape = "a year such as 2017" if unit == "year" else "YYYYMM such as 201703"
        raise TimeColumnError(f"time column '{column}' holds {sample}: with time_unit {unit} "
                              f"each value must be {shape}")
    parts = pd.DataFrame({"year": year.where(ok), "month": month.where(ok), "day": 1})
    return pd.to_datetime(parts.astype("float64"), errors="coerce")


def _examples(values: pd.Series, repr_text: bool = True) -> str:
    """Up to three distinct values, as plain Python writes them."""
    seen = list(dict.fromkeys(values.tolist()))[:3]
    return ", ".join(repr(v) if repr_text else str(v) for v in seen)


def sql_bounds(start: date, end: date, data: DataConfig) -> tuple[Any, Any] | None:
    """[start, end) in the column's own values, for a WHERE clause; None when only Python can tell
    (dates as text in a non-ISO format)."""
    unit = data.time_unit
    if unit == "year":
        return _first_year_from(start), _first_year_from(end)
    if unit == "month":
        return _first_month_from(start), _first_month_from(end)
    if unit == "text":
        return None if data.time_format else (start.isoformat(), end.isoformat())
    return start, end


def _first_year_from(d: date) -> int:
    """The first year whose 1 January is on or after `d`."""
    return d.year if (d.month, d.day) == (1, 1) else d.year + 1


def _first_month_from(d: date) -> int:
    """The first month (YYYYMM) whose first day is on or after `d`."""
    year, month = (d.year, d.month) if d.day == 1 else (d.year + (d.month == 12), d.month % 12 + 1)
    return year * 100 + month


def window_bound(value: str | date, unit: str) -> date:
    """A window's bound (`monitor --from 2018`) in the project's time unit: a date, or with
    `year` a year (2018) and with `month` YYYYMM (201803), as the time column holds them;
    ValueError with what to write instead."""
    if isinstance(value, date):
        return value
    text = str(value).strip()
    if text.isdigit() and unit in ("year", "month"):
        try:
            return EventTimes(unit, date(1, 1, 1)).parse(int(text)).date()
        except ValueError as exc:
            raise ValueError(f"{text}: {exc}") from None
    try:
        return date.fromisoformat(text)
    except ValueError:
        example = {"year": "2018 or 2018-01-01", "month": "201803 or 2018-03-01"}.get(unit, "2018-01-01")
        raise ValueError(f"{text!r} is not a date the time unit ({unit}) reads: write {example}") from None


def served_row_times(inputs: pd.DataFrame, events: Sequence[Any], served_at: pd.Series,
                     data: DataConfig) -> pd.Series:
    """When each served row happened: the time column when the model reads it (it is among the
    inputs), else the request's `meta.event_time` (`events`, None where absent), else the moment
    it was served (`served_at`, naive UTC). What learning from feedback and monitoring by event
    time both go by."""
    served_at = naive_utc(served_at.reset_index(drop=True))
    if data.time_column in inputs.columns:
        return to_timestamps(inputs[data.time_column].reset_index(drop=True), data).fillna(served_at)
    # Numbers in the time unit (logs written before the server normalised meta.event_time)
    reader = EventTimes(data.time_unit)
    raw = list(events)
    raw = [_event_number(v, reader) if isinstance(v, int | float) and not isinstance(v, bool) else v
           for v in raw]
    event = pd.to_datetime(pd.Series(raw, dtype=object), errors="coerce", format="mixed", utc=True)
    return event.dt.tz_convert(None).astype("datetime64[ns]").fillna(served_at)


def _event_number(value: float, reader: EventTimes) -> str | None:
    try:
        return reader.parse(int(value)).isoformat() if value == int(value) else None
    except (ValueError, OverflowError):
        return None  # never read a number as Unix time: such a row falls back to when it was served


def naive_utc(values: pd.Series) -> pd.Series:
    """Timestamps in UTC without a zone (the state database stores UTC; SQLite drops the zone)."""
    return pd.to_datetime(values, utc=True).dt.tz_convert(None).astype("datetime64[ns]")
