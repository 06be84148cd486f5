"""The prediction log as a table that can live for years: day partitions on PostgreSQL, retention.

On PostgreSQL `predictions` is partitioned by range of `created_at` (when the server answered:
the time the monitor's time windows and the log's retention use), one partition per UTC day,
named `predictions_pYYYYMMDD`, plus a default partition that catches a row of a day nobody made
a partition for yet (a clock far off, maintenance that did not run): no row is ever refused for
lack of a partition. `ensure_partitions` makes the partitions of yesterday, today and the next
`AHEAD_DAYS` days, and moves any rows the default partition holds into partitions of their own
days; each log sink runs it when it starts and hourly, the migration when it converts the table.

A unique index on a partitioned table must include the partition key, so the log's key is
(record_id, created_at). It rejects exactly what a key on record_id alone did: a server mints a
record id and stamps its time in one step (`score_and_log`), and every copy of a row (a sink's
retry after a commit it could not confirm) carries both, so the sink's duplicate skip works as
before. Feedback is keyed by record id in its own table (not partitioned), upserted as before,
and an id this deployment did not issue is refused by its signature with no read of the log.

`prune` applies `serving.log.retention_days`: on PostgreSQL it drops the partitions whose whole
day is older than the cutoff (a catalogue change, no row-by-row delete, no table bloat) and
deletes the default partition's older rows; on SQLite it deletes the older rows in batches.
The log's columns (`prediction_segments`) of the older rows go first, in their own batches.
Feedback received before the cutoff goes too (a label arrives after its prediction, so such a
label's prediction is already gone).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa

from flywheel.state import segments
from flywheel.state.db import feedback, predictions

PARENT = "predictions"
DEFAULT = "predictions_default"
AHEAD_DAYS = 7
_NAME = re.compile(r"^predictions_p(\d{8})$")
_LOCK = 7_136_221_901  # pg_advisory_xact_lock key: one maintainer at a time per database
DELETE_BATCH = 20_000


@dataclass
class PruneResult:
    cutoff: datetime
    partitions: list[str] = field(default_factory=list)
    rows: int = 0  # predictions removed (in dropped partitions, or deleted)
    feedback: int = 0
    segments: int = 0  # segments of the log's columns removed or rewritten


def partition_name(day: date) -> str:
    return f"predictions_p{day:%Y%m%d}"


def is_partitioned(conn: sa.Connection) -> bool:
    if conn.dialect.name != "postgresql":
        return False
    kind = conn.exec_driver_sql(
        "SELECT relkind FROM pg_class WHERE oid = to_regclass('predictions')").scalar()
    return bool(kind == "p")


def day_partitions(conn: sa.Connection) -> dict[date, str]:
    """The day partitions that exist, by their day."""
    names = conn.exec_driver_sql(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass('predictions')").scalars()
    found = {}
    for name in names:
        match = _NAME.match(name)
        if match:
            found[datetime.strptime(match.group(1), "%Y%m%d").date()] = name
    return found


def _bound(day: date) -> str:
    return f"'{day.isoformat()} 00:00:00+00'"


def create_day(conn: sa.Connection, day: date, move_from_default: bool) -> str:
    """The partition of `day`; with `move_from_default`, the default partition's rows of that day
    move into it first (PostgreSQL refuses a partition whose rows the default partition holds)."""
    name, lo, hi = partition_name(day), _bound(day), _bound(day + timedelta(days=1))
    if not move_from_default:
        conn.exec_driver_sql(f"CREATE TABLE {name} PARTITION OF {PARENT} FOR VALUES FROM ({lo}) TO ({hi})")
        return name
    conn.exec_driver_sql(f"CREATE TABLE {name} (LIKE {PARENT} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    conn.exec_driver_sql(
        f"WITH moved AS (DELETE FROM {DEFAULT} WHERE created_at >= {lo} AND created_at < {hi} "
        f"RETURNING *) INSERT INTO {name} SELECT * FROM moved")
    conn.exec_driver_sql(f"ALTER TABLE {PARENT} ATTACH PARTITION {name} FOR VALUES FROM ({lo}) TO ({hi})")
    return name


def _days_in(conn: sa.Connection, table: str) -> set[date]:
    return set(conn.exec_driver_sql(
        f"SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date FROM {table}").scalars())


def make_partitions(conn: sa.Connection, days: Iterable[date]) -> list[str]:
    """Partitions for `days` and for every day the default partition holds rows of (those rows
    moved in); the ones that exist are left alone. Runs under an advisory lock: several sinks
    may start at once."""
    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK})")
    existing = day_partitions(conn)
    stray = _days_in(conn, DEFAULT)
    return [create_day(conn, day, day in stray)
            for day in sorted((set(days) | stray) - set(existing))]


def window_days(at: datetime, ahead: int = AHEAD_DAYS) -> list[date]:
    today = at.astimezone(UTC).date()
    return [today + timedelta(days=d) for d in range(-1, ahead + 1)]


def ensure_partitions(engine: sa.Engine, at: datetime | None = None, ahead: int = AHEAD_DAYS) -> list[str]:
    """Make the coming days' partitions (and empty the default partition); returns what it made.
    Nothing to do on SQLite or on a table that is not partitioned."""
    with engine.begin() as conn:
        if not is_partitioned(conn):
            return []
        return make_partitions(conn, window_days(at or datetime.now(UTC), ahead))


def prune(engine: sa.Engine, retention_days: int, at: datetime | None = None) -> PruneResult:
    """Remove the predictions older than `retention_days` (see the module's note)."""
    cutoff = (at or datetime.now(UTC)).astimezone(UTC) - timedelta(days=retention_days)
    result = PruneResult(cutoff=cutoff)
    # The columns first: a crash in between leaves old rows without their inputs (going anyway),
    # never inputs of rows that are gone.
    result.segments = segments.prune(engine, cutoff)
    with engine.begin() as conn:
        partitioned = is_partitioned(conn)
        if partitioned:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK})")
            for day, name in sorted(day_partitions(conn).items()):
                if day + timedelta(days=1) <= cutoff.date():
                    result.rows += conn.exec_driver_sql(f"SELECT count(*) FROM {name}").scalar() or 0
                    conn.exec_driver_sql(f"DROP TABLE {name}")
                    result.partitions.append(name)
    # The rest row by row, in small transactions (the log sink goes on between them): every old
    # row on SQLite; on PostgreSQL only the default partition's (a day partition goes whole).
    table = sa.table(DEFAULT, sa.column("id"), sa.column("created_at")) if partitioned else predictions
    older = table.c.created_at < cutoff
    while True:
        with engine.begin() as conn:
            ids = sa.select(table.c.id).where(older).limit(DELETE_BATCH)
            deleted = conn.execute(sa.delete(table).where(table.c.id.in_(ids), older)).rowcount
        result.rows += deleted
        if deleted < DELETE_BATCH:
            break
    with engine.begin() as conn:
        result.feedback = conn.execute(sa.delete(feedback).where(feedback.c.received_at < cutoff)).rowcount
    return result
