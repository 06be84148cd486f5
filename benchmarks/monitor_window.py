"""Monitoring a window of the prediction log: the log as JSON text per row (how it was stored
before the columnar log, and how rows logged then are still read) against the columnar log (one
segment per log-sink batch), in one run, on SQLite and on PostgreSQL.

A project on the SBA sample is trained once (a tiny model: the model is not what is measured).
For each window size N the same N logged predictions (the sample's loans, cycled, with the meta a
client sends) are stored both ways, and `run_monitor` (in process: read the window, profile it,
the verdicts; the champion's reference cached by a first run, Evidently off) is timed on the
latest N rows of each, best of `--repeat`. The JSON rows are inserted as the old sink did; the
segments are written by the log sink's own `write` in batches of `--batch` rows. Printed: seconds
per window, µs per row, and JSON / segments as a ratio; with `--cli`, also `flywheel monitor
--size N` as a user runs it (a fresh process, best of `--repeat`), the cost of each row beyond the
smallest window.

    .venv/bin/python benchmarks/monitor_window.py [--rows 10000 100000 1000000] [--repeat 3]
        [--backend sqlite postgresql] [--batch 1024] [--cli] [--layouts json segments]

PostgreSQL: FLYWHEEL_BENCH_PG (default postgresql://postgres@127.0.0.1:5432/postgres), a database
of its own created and dropped. 10M rows: `--rows 10000000 --layouts segments` (the JSON layout
there takes about 20 minutes and 10 GB more).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import sqlalchemy as sa
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from flywheel.config import MonitorWindow, Project, load_project  # noqa: E402
from flywheel.data import features as feats  # noqa: E402
from flywheel.data.sources import write_table  # noqa: E402
from flywheel.demo.replay import records_of  # noqa: E402
from flywheel.demo.sba import SOURCE_TYPES  # noqa: E402
from flywheel.lifecycle.train import train_challenger  # noqa: E402
from flywheel.monitoring.monitor import run_monitor  # noqa: E402
from flywheel.serving.tabular.logsink import write  # noqa: E402
from flywheel.serving.tabular.predlog import insert_sql  # noqa: E402
from flywheel.state.db import open_state, prediction_segments, predictions  # noqa: E402

ADMIN = os.environ.get("FLYWHEEL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
SAMPLE = REPO / "tests" / "fixtures" / "sba_sample.parquet"
EXAMPLE = REPO / "examples" / "sba-loans" / "flywheel.yaml"
T0 = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1_000_000)


def make_project(folder: Path, state_url: str | None) -> Project:
    config = yaml.safe_load(EXAMPLE.read_text())
    config["model"] = {**config.get("model", {}), "params": {"num_boost_round": 5}}
    config["gate"] = {**config.get("gate", {}), "floor": 0.5}
    if state_url:
        config["stores"] = {"state": state_url}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flywheel.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    project = load_project(folder / "flywheel.yaml", env={"FLYWHEEL_HOME": str(folder / ".flywheel")})
    sample = pd.read_parquet(SAMPLE)
    for col in ("approval_date", "chgoff_date", "disbursement_date"):
        sample[col] = pd.to_datetime(sample[col]).dt.date
    write_table(sample, project.source_url, project.config.data.table, SOURCE_TYPES,
                index_columns=("approval_date",))
    return project


def served_rows(project: Project, n: int) -> Iterator[list[Any]]:
    """`n` log-sink frame rows: the sample's loans as a client sends them, cycled."""
    data = project.config.data
    sample = pd.read_parquet(SAMPLE)
    inputs = feats.input_columns(project.config.features)
    records = records_of(sample, inputs, data.id_column, data.time_column)
    name = project.config.registered_model
    for i in range(n):
        record = dict(records[i % len(records)])
        record["meta"] = dict(record["meta"])
        yield [f"r{i}", f"q{i}", T0 + i * 1000, name, 1, record, (i % 997) / 997, i % 2 == 0, 0.4]


def clear(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.delete(prediction_segments))
        conn.execute(sa.delete(predictions))
    if engine.dialect.name == "postgresql":
        # What autovacuum does within minutes of a mass delete: without it the next layout's
        # reads walk the deleted rows' index entries (the probe for JSON rows took 0.4 s a read
        # right after a million were deleted), which is the benchmark's churn, not the log's.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE predictions, prediction_segments")


def fill_json(engine: sa.Engine, rows: Iterator[list[Any]], chunk: int = 20_000) -> None:
    """The rows as JSON text, one per prediction (the log before segments)."""
    dialect = engine.dialect.name
    sql = insert_sql(dialect, 10)
    buffer: list[tuple[Any, ...]] = []

    def flush() -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql(sql, buffer)
        buffer.clear()

    for r in rows:
        record = r[5]
        meta = record.pop("meta", None)
        when = datetime.fromtimestamp(r[2] / 1e6, UTC)
        stamp = when.strftime("%Y-%m-%d %H:%M:%S.%f") if dialect == "sqlite" else when
        buffer.append((r[0], r[1], stamp, r[3], r[4], orjson.dumps(record).decode(),
                       orjson.dumps(meta).decode(), r[6], r[7], r[8]))
        if len(buffer) >= chunk:
            flush()
    if buffer:
        flush()


def fill_segments(engine: sa.Engine, rows: Iterator[list[Any]], batch: int) -> None:
    """The rows through the log sink's own write, `batch` rows per transaction and segment."""
    sql = insert_sql(engine.dialect.name)
    pending: list[list[Any]] = []
    for r in rows:
        pending.append(r)
        if len(pending) >= batch:
            write(engine, sql, [orjson.dumps(pending[i:i + 128]) for i in range(0, len(pending), 128)])
            pending.clear()
    if pending:
        write(engine, sql, [orjson.dumps(pending)])


def best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def cli_seconds(project: Project, n: int) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flywheel.cli", "monitor", "--config", str(project.path),
                    "--size", str(n)], check=True, capture_output=True,
                   env={**os.environ, "FLYWHEEL_HOME": str(project.home)})
    return time.perf_counter() - started


LAYOUTS = ("json", "segments")


def measure(label: str, project: Project, sizes: list[int], repeat: int, batch: int, cli: bool,
            layouts: tuple[str, ...] = LAYOUTS) -> None:
    engine = open_state(project.state_url)
    window = lambda n: MonitorWindow(by="count", size=n)  # noqa: E731
    print(f"{label}: run_monitor on the latest N rows (best of {repeat})")
    print(f"  {'rows':>10}  " + "  ".join(f"{kind + ' s':>10} {'µs/row':>7}" for kind in layouts)
          + ("  json/segments" if len(layouts) == 2 else ""))
    cli_times: dict[str, list[float]] = {kind: [] for kind in layouts}
    for n in sizes:
        t: dict[str, float] = {}
        for kind in layouts:
            clear(engine)
            if kind == "json":
                fill_json(engine, served_rows(project, n))
            else:
                fill_segments(engine, served_rows(project, n), batch)
            size = window(n)
            run_monitor(project, window=size, report=False)  # warm: the reference is cached
            t[kind] = best(lambda: run_monitor(project, window=size, report=False), repeat)  # noqa: B023
            if cli:
                cli_times[kind].append(best(lambda: cli_seconds(project, n), repeat))  # noqa: B023
        print(f"  {n:>10,}  " + "  ".join(f"{t[kind]:10.2f} {t[kind] / n * 1e6:7.2f}" for kind in layouts)
              + (f"  x{t['json'] / t['segments']:.1f}" if len(layouts) == 2 else ""))
    if cli and len(sizes) > 1:
        span = sizes[-1] - sizes[0]
        for kind, times in cli_times.items():
            extra = (times[-1] - times[0]) / span * 1e6
            print(f"  flywheel monitor --size: {kind} {times[0]:.2f} s at {sizes[0]:,} rows, "
                  f"{times[-1]:.2f} s at {sizes[-1]:,}: {extra:.2f} µs per extra row")
    clear(engine)
    engine.dispose()


@contextmanager
def postgres() -> Iterator[str | None]:
    name = f"flywheel_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        print(f"PostgreSQL: skipped, no server at {ADMIN} ({exc.__class__.__name__})")
        yield None
        return
    try:
        yield ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--backend", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--cli", action="store_true")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                        help="e.g. only segments at 10M rows (the JSON reader takes minutes there)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backend:
            if backend == "sqlite":
                project = make_project(Path(tmp) / "sqlite", None)
                assert train_challenger(project).promoted
                measure("SQLite", project, args.rows, args.repeat, args.batch, args.cli, tuple(args.layouts))
                continue
            with postgres() as url:
                if url is None:
                    continue
                project = make_project(Path(tmp) / "postgresql", url)
                assert train_challenger(project).promoted
                measure("PostgreSQL", project, args.rows, args.repeat, args.batch, args.cli,
                        tuple(args.layouts))


if __name__ == "__main__":
    main()
