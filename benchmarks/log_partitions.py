"""The prediction log on PostgreSQL, partitioned by day versus one table: a monitoring window of
1M rows read from a log of several months, and a day of retention; one run, printed with ratios.

Two databases on the same server get the same rows (made by PostgreSQL's generate_series:
SBA-like inputs as JSON, one model, `--days` days of `--per-day` predictions each): one at the
previous schema (one `predictions` table, its (model_name, created_at) index), one at head (day
partitions). Measured on each, caches warm (each query runs once before it is timed; the best of
`--repeat` runs is printed):
- the monitor's SQL for a time window of `--window-days` days (every row fetched by the driver);
- `read_window`, what the monitor calls: that SQL plus parsing every row's inputs into a frame;
- a count over the window (the database's side only);
- removing the oldest day: DROP of its partition versus DELETE of its rows (plus the VACUUM the
  deleted rows need before their space is reused).

Usage: python benchmarks/log_partitions.py [--days 40] [--per-day 100000] [--window-days 10]
Needs a PostgreSQL server (FLYWHEEL_BENCH_PG, default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from alembic import command  # noqa: E402
from alembic.config import Config as AlembicConfig  # noqa: E402

from flywheel.config import MonitorWindow  # noqa: E402
from flywheel.monitoring.monitor import read_window  # noqa: E402
from flywheel.state.db import MIGRATIONS, VERSION_TABLE, open_state  # noqa: E402
from flywheel.state.partitions import day_partitions, ensure_partitions, partition_name  # noqa: E402

ADMIN = os.environ.get("FLYWHEEL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")

FILL = """
INSERT INTO predictions (record_id, request_id, created_at, model_name, model_version, inputs,
                         probability, decision, latency_ms)
SELECT 'r' || i || '-0', 'r' || i,
       :start + (i::float8 / :rows) * (:end - :start),
       'sba-loans', 1 + (i % 3),
       json_build_object(
         'gr_appv', round((random() * 900000 + 10000)::numeric, 2),
         'sba_appv', round((random() * 700000 + 5000)::numeric, 2),
         'no_emp', (random() * 50)::int, 'create_job', (random() * 10)::int,
         'retained_job', (random() * 20)::int, 'new_exist', 1 + (random())::int,
         'franchise_code', (random() * 3)::int,
         'state', (ARRAY['CA','NY','TX','FL','IL','OH','WA','MA'])[1 + (i % 8)],
         'bank_state', (ARRAY['CA','NY','TX','DE','NC','SD'])[1 + (i % 6)],
         'urban_rural', (i % 3), 'rev_line_cr', (ARRAY['N','Y','0'])[1 + (i % 3)],
         'low_doc', (ARRAY['N','Y'])[1 + (i % 2)], 'naics', 100000 + (i % 900000),
         'bank', 'BANK OF ' || (i % 400))::text,
       random(), random() > 0.8, random() * 5
FROM generate_series(0, :rows - 1) AS i
"""


def make_database(kind: str, start: datetime, end: datetime, rows: int) -> str:
    name = f"flywheel_bench_{kind}_{uuid.uuid4().hex[:6]}"
    admin = sa.create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    url = ADMIN.rsplit("/", 1)[0] + f"/{name}"
    if kind == "flat":  # the schema before partitioning
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["engine"] = engine
        command.upgrade(cfg, "0008")
    else:
        engine = open_state(url)
        ensure_partitions(engine, at=start - timedelta(days=1), ahead=(end - start).days + 9)
    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.text(FILL), {"start": start, "end": end, "rows": rows})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
        size = conn.exec_driver_sql("SELECT pg_size_pretty(pg_database_size(current_database()))").scalar()
    print(f"  {kind}: {rows:,} rows written in {time.perf_counter() - t0:.0f} s, database {size}", flush=True)
    return url


def best(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    fn()  # warm the cache
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def measure(url: str, kind: str, at: datetime, window_days: int, repeat: int) -> dict[str, float]:
    engine = open_state(url, migrate=False)
    lo = at - timedelta(days=window_days)
    sql = ("SELECT id, created_at, model_version, inputs, probability, meta, value, label "
           "FROM predictions WHERE model_name = 'sba-loans' AND created_at >= %(lo)s AND created_at < %(hi)s")

    def fetch() -> int:
        with engine.connect() as conn:
            return len(conn.exec_driver_sql(sql, {"lo": lo, "hi": at}).all())

    def count() -> int:
        with engine.connect() as conn:
            return conn.exec_driver_sql(sql.replace("id, created_at, model_version, inputs, probability, "
                                                    "meta, value, label", "count(*)"),
                                        {"lo": lo, "hi": at}).scalar() or 0

    out: dict[str, float] = {}
    out["sql"], rows = best(fetch, repeat)
    out["count"], _ = best(count, repeat)
    window = MonitorWindow(by="time", hours=24.0 * window_days)
    out["read_window"], frame = best(lambda: read_window(engine, "sba-loans", window, at=at), 1)
    out["rows"] = float(rows)  # type: ignore[arg-type]
    assert len(frame) == rows, (len(frame), rows)  # type: ignore[arg-type]
    out.update(drop_oldest_day(engine, kind))
    engine.dispose()
    return out


def drop_oldest_day(engine: sa.Engine, kind: str) -> dict[str, float]:
    with engine.connect() as conn:
        first = conn.exec_driver_sql("SELECT min(created_at) FROM predictions").scalar()
    day = first.astimezone(UTC).date()
    bound = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    t0 = time.perf_counter()
    with engine.begin() as conn:
        if kind == "partitioned":
            assert partition_name(day) in day_partitions(conn).values()
            conn.exec_driver_sql(f"DROP TABLE {partition_name(day)}")
        else:
            conn.exec_driver_sql("DELETE FROM predictions WHERE created_at < %(b)s", {"b": bound})
    removed = time.perf_counter() - t0
    vacuum = 0.0
    if kind == "flat":
        t0 = time.perf_counter()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM predictions")
        vacuum = time.perf_counter() - t0
    return {"retention": removed, "vacuum": vacuum}


def drop_database(url: str) -> None:
    admin = sa.create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=40)
    parser.add_argument("--per-day", type=int, default=100_000)
    parser.add_argument("--window-days", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    at = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = at - timedelta(days=args.days)
    rows = args.days * args.per_day
    print(f"log: {rows:,} predictions over {args.days} days; window: the latest {args.window_days} days "
          f"(~{args.window_days * args.per_day:,} rows)", flush=True)
    urls = {kind: make_database(kind, start, at, rows) for kind in ("flat", "partitioned")}
    try:
        results = {kind: measure(url, kind, at, args.window_days, args.repeat) for kind, url in urls.items()}
    finally:
        for url in urls.values():
            drop_database(url)
    flat, part = results["flat"], results["partitioned"]
    print(f"\nwindow rows: {int(part['rows']):,} (both)")
    print(f"{'':34}{'one table':>12}{'partitioned':>14}{'one table / partitioned':>26}")
    for key, label in (("sql", "monitor's SQL, rows fetched"), ("count", "count over the window"),
                       ("read_window", "read_window (SQL + parse)"),
                       ("retention", "remove the oldest day")):
        print(f"{label:34}{flat[key]:>11.3f}s{part[key]:>13.3f}s{flat[key] / part[key]:>25.1f}x")
    print(f"{'VACUUM after the DELETE':34}{flat['vacuum']:>11.3f}s{'-':>14}")
    print(f"(schema head {VERSION_TABLE}; PostgreSQL at {ADMIN.rsplit('@', 1)[-1]})")


if __name__ == "__main__":
    main()
