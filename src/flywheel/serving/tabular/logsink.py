"""The log-sink process: reads prediction frames from stdin and inserts them in batches.

Started by each server worker (`PredictionLogWriter.start`). It ignores SIGINT and SIGTERM: it
stops only at end-of-file, after writing everything it received, so a worker killed with SIGKILL
still has its already-sent predictions stored.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
import sqlalchemy as sa

from flywheel.config import ConfigError
from flywheel.core.cpus import cpuset_cpus
from flywheel.data.engine import make_engine
from flywheel.serving.http.logs import configure_json_logging
from flywheel.serving.http.metrics import ServingMetrics
from flywheel.serving.tabular.predlog import (
    BINARY_PARAMS,
    FRAME_HEADER,
    LOG_COLUMNS,
    SINK_STATE_ENV,
    db_rows,
    insert_sql,
)
from flywheel.state.partitions import ensure_partitions

log = logging.getLogger("flywheel.logsink")
SLICE_ROWS = 16
MAX_BATCH_BYTES = 4 << 20  # at most this much of the pipe in one transaction (~10,000 rows)


def read_batches(fd: int, max_bytes: int = MAX_BATCH_BYTES) -> Iterator[list[bytes]]:
    """Every complete frame that has arrived, as one batch of frame bodies per wake-up.

    Waits for the first frame, then takes whatever else is already in the pipe without waiting
    (up to `max_bytes`): when the sink falls behind, frames pile up in the pipe and are written
    in one transaction, so the commits per row shrink exactly when the database is the
    bottleneck (PostgreSQL waits for its WAL flush on every commit).
    """
    buffer = bytearray()
    eof = False
    while True:
        while not eof and (not _complete_frames(buffer) or select.select([fd], [], [], 0)[0]):
            if len(buffer) >= max_bytes and _complete_frames(buffer):
                break
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                eof = True
            buffer += chunk
        frames: list[bytes] = []
        offset = 0
        while len(buffer) - offset >= FRAME_HEADER.size:
            (size,) = FRAME_HEADER.unpack_from(buffer, offset)
            end = offset + FRAME_HEADER.size + size
            if end > len(buffer):
                break
            frames.append(bytes(buffer[offset + FRAME_HEADER.size : end]))
            offset = end
        del buffer[:offset]
        if frames:
            yield frames
        if eof:
            if buffer:  # the worker died in the middle of a frame
                log.error("truncated frame at end of input", extra={"event": "prediction_log_drop"})
            return


def _complete_frames(buffer: bytearray) -> bool:
    if len(buffer) < FRAME_HEADER.size:
        return False
    (size,) = FRAME_HEADER.unpack_from(buffer, 0)
    return len(buffer) >= FRAME_HEADER.size + size


PARTITIONS_EVERY_S = 3600.0


def keep_partitions_ahead(engine: sa.Engine) -> None:
    """The coming days' log partitions (PostgreSQL): made when the sink starts and hourly, so a
    row never waits for one. A failure is logged and tried again next time: rows of a day with
    no partition go to the default partition meanwhile and are moved later, never refused."""
    try:
        made = ensure_partitions(engine)
    except Exception as exc:
        log.error("could not make the prediction log's partitions", extra={
            "event": "prediction_log_error", "error": str(exc)})
        return
    if made:
        log.info("prediction log partitions made", extra={"event": "log_partitions", "made": made})


def run(state_url: str, fd: int) -> tuple[int, int]:
    metrics = ServingMetrics()
    engine = make_engine(state_url)
    sql = insert_sql(engine.dialect.name)
    written = dropped = 0
    keep_partitions_ahead(engine)
    checked = time.monotonic()
    for frames in read_batches(fd):
        if time.monotonic() - checked > PARTITIONS_EVERY_S:
            keep_partitions_ahead(engine)
            checked = time.monotonic()
        n_ok, n_lost = write(engine, sql, frames)
        written, dropped = written + n_ok, dropped + n_lost
        metrics.log_written.inc(n_ok)
        if n_lost:
            metrics.log_dropped.inc(n_lost)
    engine.dispose()
    return written, dropped


def _slices(frames: list[bytes], dialect: str) -> Iterator[list[tuple[Any, ...]]]:
    """The frames' rows as database parameters, SLICE_ROWS at a time, yielding the core between.

    On a core shared with the server every stretch of work here that does not yield delays
    every request in flight by its length: converting a whole batch in one go (a few ms when
    frames had piled up) added 0.8 ms to the server's p99 with no database work at all.
    """
    for body in frames:
        rows = orjson.loads(body)
        for start in range(0, len(rows), SLICE_ROWS):
            yield db_rows(rows[start : start + SLICE_ROWS], dialect)
            os.sched_yield()


def _insert(conn: sa.Connection, sql: str, frames: list[bytes]) -> int:
    # One transaction per batch, written slice by slice: a commit per slice would cost more than
    # the sink can spare at full load.
    n = 0
    if conn.dialect.name == "postgresql":
        # COPY: the rows stream to the server, which does the insert work in its own process
        # (half the sink's CPU per row of executemany's, on the worker's core).
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(_COPY_SQL) as copy:
            for rows in _slices(frames, "postgresql"):
                for row in rows:
                    copy.write_row(row)
                n += len(rows)
        return n
    for rows in _slices(frames, conn.dialect.name):
        execute_rows(conn, sql, rows)
        n += len(rows)
    return n


def execute_rows(conn: sa.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """`sql` (every column) for full rows, the binary INSERT for binary rows (see `db_rows`)."""
    short = [r for r in rows if len(r) == BINARY_PARAMS]
    if short:
        conn.exec_driver_sql(insert_sql(conn.dialect.name, BINARY_PARAMS), short)
    if len(short) < len(rows):
        conn.exec_driver_sql(sql, [r for r in rows if len(r) != BINARY_PARAMS])


_COPY_SQL = f"COPY predictions ({', '.join(LOG_COLUMNS)}) FROM STDIN"


def _duplicate(exc: Exception) -> bool:
    """A unique-key violation, whether SQLAlchemy wrapped it or it came from psycopg's COPY."""
    if isinstance(exc, sa.exc.IntegrityError):
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(exc, psycopg.IntegrityError)


def write(engine: sa.Engine, sql: str, frames: list[bytes]) -> tuple[int, int]:
    """Insert the frames' rows; on a duplicate record id insert the others one by one; retry
    other errors. Returns (rows written, rows dropped)."""
    for attempt in range(1, 8):
        try:
            with engine.begin() as conn:
                return _insert(conn, sql, frames), 0
        except Exception as exc:
            if not _duplicate(exc):
                log.error("prediction log write failed", extra={
                    "event": "prediction_log_error", "attempt": attempt, "error": str(exc)})
                time.sleep(min(0.2 * 2**attempt, 10.0))
                continue
            return _one_by_one(engine, sql, frames)
    lost = sum(len(orjson.loads(body)) for body in frames)
    log.error("prediction log batch dropped after retries",
              extra={"event": "prediction_log_drop", "rows": lost})
    return 0, lost


def _one_by_one(engine: sa.Engine, sql: str, frames: list[bytes]) -> tuple[int, int]:
    """After a duplicate: each row alone; a duplicate is skipped (already stored), any other
    failure drops and counts that row, and the sink goes on."""
    ok = lost = 0
    for rows in _slices(frames, engine.dialect.name):
        for row in rows:
            try:
                with engine.begin() as conn:
                    execute_rows(conn, sql, [row])
                ok += 1
            except sa.exc.IntegrityError:
                continue
            except Exception as exc:
                lost += 1
                log.error("prediction log row dropped", extra={
                    "event": "prediction_log_drop", "rows": 1, "error": type(exc).__name__})
    return ok, lost


SINK_CPUS_ENV = "FLYWHEEL_LOG_SINK_CPUS"


def sink_cpus(env: Mapping[str, str]) -> set[int] | None:
    """The CPUs FLYWHEEL_LOG_SINK_CPUS pins the log sinks to ("3" or "2,3"), None when unset.

    `flywheel serve` checks it before starting any worker, so a typo is a clear error there,
    not a sink that dies at start and a log that counts every row as dropped.
    """
    value = env.get(SINK_CPUS_ENV, "").strip()
    if not value:
        return None
    try:
        cpus = {int(part) for part in value.split(",")}
    except ValueError:
        raise ConfigError(f"{SINK_CPUS_ENV}={value!r}: expected CPU numbers separated by commas, "
                          "e.g. 3 or 2,3") from None
    # The CPUs the sink may be moved to (the container's cpuset), not this process's affinity: a
    # worker pinned to CPU 0 may put its sink on CPU 1.
    available = cpuset_cpus()
    missing = sorted(c for c in cpus if c not in available)
    if missing:
        listed = ",".join(str(c) for c in sorted(available))
        raise ConfigError(f"{SINK_CPUS_ENV}={value!r}: the CPUs here are {listed}; not CPU {missing[0]}")
    return cpus


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # SCHED_BATCH: the sink never preempts the server when it wakes up, and it writes in small
    # slices with a yield between them, so on a shared core it delays a request by one slice at
    # most. Normal priority (nice 0): with nice 5 or 10 it fell behind a saturated server (the
    # buffer filled to 97,542 of 100,000 in 30 s) and backpressure then slowed every request.
    if hasattr(os, "SCHED_BATCH"):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    cpus = sink_cpus(os.environ)  # e.g. "1": keep the sink off the worker's core
    if cpus:
        os.sched_setaffinity(0, cpus)
    configure_json_logging()
    written, dropped = run(os.environ.get(SINK_STATE_ENV) or sys.argv[1], sys.stdin.fileno())
    log.info("log sink finished", extra={"event": "log_sink_stopped", "logged": written,
                                          "dropped": dropped})


if __name__ == "__main__":
    main()
