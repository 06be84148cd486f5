"""The prediction log as a table that lives for years: day partitions on PostgreSQL (made ahead,
rows of a day without one kept in the default partition and moved later), the monitor's reads
touching only its window's partitions, retention, and the migration that partitions a log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig

from flywheel.config import MonitorWindow
from flywheel.monitoring.monitor import read_window
from flywheel.serving.tabular.logsink import write
from flywheel.serving.tabular.predlog import insert_sql, store_feedback
from flywheel.state.db import MIGRATIONS, close_state, feedback, open_state, predictions
from flywheel.state.partitions import (
    DEFAULT,
    day_partitions,
    ensure_partitions,
    is_partitioned,
    partition_name,
    prune,
)

NOW = datetime.now(UTC).replace(microsecond=0)


def frame(rows: list[tuple[str, datetime]]) -> bytes:
    """A log sink frame: one binary prediction per (record id, time)."""
    return orjson.dumps([[rid, rid.split("-")[0], int(at.timestamp() * 1_000_000), "m", 1,
                          {"x": i}, 0.5, True, 1.0] for i, (rid, at) in enumerate(rows)])


def where_rows_live(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.exec_driver_sql(
            "SELECT record_id, tableoid::regclass::text FROM predictions").all())


def test_the_log_is_partitioned_by_day_and_keeps_every_row(postgres_url):
    engine = open_state(postgres_url)
    now = datetime.now(UTC).replace(microsecond=0)  # not the module's NOW: a run may cross midnight
    with engine.connect() as conn:
        assert is_partitioned(conn)
        days = day_partitions(conn)
    today = now.date()
    assert {today + timedelta(days=d) for d in range(-1, 8)} <= set(days)
    far = now + timedelta(days=40)  # no partition for that day yet: the default one takes it
    sql = insert_sql("postgresql")
    first = [("a-0", now), ("b-0", now - timedelta(days=1)), ("c-0", far)]
    assert write(engine, sql, [frame(first)]) == (3, 0)
    assert where_rows_live(engine) == {"a-0": partition_name(today),
                                       "b-0": partition_name(today - timedelta(days=1)), "c-0": DEFAULT}
    # a sink's retry of a stored row (same id, same time) is skipped; the new row of the frame kept
    assert write(engine, sql, [frame([("a-0", now), ("d-0", now)])]) == (1, 0)
    assert ensure_partitions(engine, at=now) == [partition_name(far.date())]  # the stray row moves
    assert where_rows_live(engine)["c-0"] == partition_name(far.date())
    assert ensure_partitions(engine, at=now) == []  # idempotent
    # labels: upserted by record id as before (the feedback table is not partitioned)
    assert store_feedback(engine, [{"record_id": "a-0", "label": 1}]) == 1
    assert store_feedback(engine, [{"record_id": "a-0", "label": 0}]) == 1
    with engine.connect() as conn:
        assert conn.execute(sa.select(feedback.c.label)).scalars().all() == [0]
        assert conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar() == 4
    close_state(postgres_url)


def test_a_time_window_reads_only_its_own_partitions(postgres_url):
    """The monitor's own query (captured as it runs) planned by PostgreSQL: only the window's days."""
    engine = open_state(postgres_url)
    old = [(f"old{i}-0", NOW - timedelta(days=5, minutes=i)) for i in range(50)]
    new = [(f"new{i}-0", NOW - timedelta(minutes=i + 1)) for i in range(120)]
    assert write(engine, insert_sql("postgresql"), [frame(old + new)]) == (170, 0)
    seen: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if "FROM predictions" in statement:
            seen.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        window = read_window(engine, "m", MonitorWindow(by="time", hours=3), at=NOW)
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    assert len(window) == 120
    [(statement, parameters)] = seen
    with engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = on")
        plan = "\n".join(conn.exec_driver_sql("EXPLAIN " + statement, parameters).scalars())
    touched = {name for name in day_partitions_in(plan)}
    window_days = {partition_name((NOW - timedelta(hours=3)).date()), partition_name(NOW.date())}
    assert touched and touched <= window_days, plan
    assert partition_name((NOW - timedelta(days=5)).date()) not in plan and DEFAULT not in plan
    close_state(postgres_url)


def day_partitions_in(plan: str) -> set[str]:
    import re

    return set(re.findall(r"predictions_p\d{8}", plan))


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_retention_drops_old_days_and_their_labels(backend, postgres_url, tmp_path):
    url = postgres_url if backend == "postgresql" else f"sqlite:///{tmp_path / 'state.db'}"
    engine = open_state(url)
    ages = {"d40": 40, "d31": 31, "d29": 29, "d1": 1}
    rows = [(f"{name}-0", NOW - timedelta(days=age)) for name, age in ages.items()]
    if backend == "postgresql":  # the old days have partitions, as a log that ran 40 days would
        ensure_partitions(engine, at=NOW - timedelta(days=41), ahead=41)
    assert write(engine, insert_sql(engine.dialect.name), [frame(rows)]) == (4, 0)
    store_feedback(engine, [{"record_id": "d40-0", "label": 1}, {"record_id": "d1-0", "label": 0}])
    with engine.begin() as conn:  # the old label arrived back then
        conn.execute(sa.update(feedback).where(feedback.c.record_id == "d40-0")
                     .values(received_at=NOW - timedelta(days=39)))
    done = prune(engine, retention_days=30, at=NOW)
    assert done.rows == 2 and done.feedback == 1
    with engine.connect() as conn:
        left = sorted(conn.execute(sa.select(predictions.c.record_id)).scalars())
        labels = conn.execute(sa.select(feedback.c.record_id)).scalars().all()
    assert left == ["d1-0", "d29-0"] and labels == ["d1-0"]
    if backend == "postgresql":
        assert {partition_name((NOW - timedelta(days=d)).date()) for d in (40, 31)} <= set(done.partitions)
        assert partition_name((NOW - timedelta(days=30)).date()) not in done.partitions  # not whole yet
        with engine.connect() as conn:
            assert partition_name((NOW - timedelta(days=40)).date()) not in day_partitions(conn).values()
    assert prune(engine, retention_days=30, at=NOW).rows == 0
    close_state(url)


def test_partitioning_an_existing_log_keeps_every_row_and_steps_back(postgres_url):
    """A log written under the previous schema (0008) is moved into day partitions with its ids;
    the id sequence goes on after them; downgrading moves it back, row for row."""
    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    command.upgrade(cfg, "0008")
    rows = [(f"r{i}-0", NOW - timedelta(days=i % 12, minutes=i)) for i in range(600)]
    with engine.begin() as conn:  # as that version's sink stored them: inputs as JSON text
        conn.execute(sa.insert(predictions), [
            {"record_id": rid, "request_id": "r", "created_at": at, "model_name": "m", "model_version": 1,
             "inputs": f'{{"x":{i}}}', "probability": 0.5, "decision": True, "latency_ms": 1.0}
            for i, (rid, at) in enumerate(rows)])

    def contents() -> list[tuple]:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(
                "SELECT id, record_id, created_at, inputs, probability FROM predictions ORDER BY id"))]

    before = contents()
    command.upgrade(cfg, "head")
    with engine.connect() as conn:
        assert is_partitioned(conn)
        assert len(day_partitions(conn)) >= 12
        assert conn.exec_driver_sql(f"SELECT count(*) FROM {DEFAULT}").scalar() == 0
    assert contents() == before
    assert write(engine, insert_sql("postgresql"), [frame([("next-0", NOW)])]) == (1, 0)
    assert contents()[-1][0] == before[-1][0] + 1  # the sequence carried over
    command.downgrade(cfg, "0008")
    with engine.connect() as conn:
        assert not is_partitioned(conn)
    assert contents()[:-1] == before
    assert contents()[-1][3] == '{"x":0}'  # a row logged in columns went back to JSON text
    engine.dispose()
