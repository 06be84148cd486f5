"""A request's own times (`meta.event_time`, a label's `observed_at`): read in the project's time
unit and bounded. Plain Python: the slim serving image reads them without pandas."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

EVENT_TIME = "event_time"  # the key of a request's `meta` that carries the row's own time


class EventTimes:
    """How a request's own times (`meta.event_time`, `observed_at`) are read and bounded.

    A string is an ISO 8601 date or date-time (a zone is converted to UTC). A number is read in
    the project's `time_unit` (2018 with `year`, 201803 with `month`); with any other unit a number
    is refused rather than guessed (Unix seconds would put 2018 in 1970). The result must lie in
    [earliest, now + max_future]."""

    def __init__(self, unit: str = "date", earliest: date = date(1900, 1, 1),
                 max_future: timedelta = timedelta(days=1), now: Callable[[], datetime] | None = None):
        self.unit = unit
        self.earliest = datetime.combine(earliest, time.min)
        self.max_future = max_future
        self.now = now or (lambda: datetime.now(UTC).replace(tzinfo=None))

    def read(self, value: Any) -> datetime:
        """The value as a naive UTC datetime; ValueError with a message for the client."""
        when = self.parse(value)
        latest = self.now() + self.max_future
        if not self.earliest <= when <= latest:
            raise ValueError(f"{when.isoformat()} is outside the plausible range "
                             f"{self.earliest.date().isoformat()} to {latest.isoformat(timespec='seconds')}"
                             " (serving.times in flywheel.yaml)")
        return when

    def parse(self, value: Any) -> datetime:
        if isinstance(value, str) and self.unit in ("year", "month") and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, int) and not isinstance(value, bool):
            if self.unit == "year" and 1 <= value <= 9999:
                return datetime(value, 1, 1)
            if self.unit == "month" and 100 < value <= 999_912 and 1 <= value % 100 <= 12:
                return datetime(value // 100, value % 100, 1)
            if self.unit in ("year", "month"):
                shape = "a year such as 2017" if self.unit == "year" else "YYYYMM such as 201703"
                raise ValueError(f"with data.time_unit {self.unit} a number must be {shape}")
            raise ValueError("a number is not read as a time here (data.time_unit is "
                             f"{self.unit}): send an ISO 8601 date such as 2018-01-01")
        if not isinstance(value, str) or len(value) > 64:
            raise ValueError("an ISO 8601 date or date-time, e.g. 2018-01-01 or 2018-01-01T12:00:00Z")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("an ISO 8601 date or date-time, e.g. 2018-01-01 or "
                             "2018-01-01T12:00:00Z") from None
        if parsed.tzinfo is not None:
            try:
                parsed = parsed.astimezone(UTC).replace(tzinfo=None)
            except OverflowError:  # 0001-01-01T00:00+00:03 is before the first instant Python has
                raise ValueError("outside the times Python can represent (years 1 to 9999, in UTC)") from None
        return parsed

    def iso(self, value: Any) -> str:
        """`read(value)` written as ISO 8601: what the log stores for the value the client sent."""
        return self.read(value).isoformat()
