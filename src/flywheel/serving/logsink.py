"""The log-sink process: reads prediction frames from stdin and inserts them in batches.

Started by each server worker (`PredictionLogWriter.start`). It ignores SIGINT and SIGTERM: it
stops only at end-of-file, after writing everything it received, so a worker killed with SIGKILL
still has its already-sent predictions stored.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any, BinaryIO

import orjson
import sqlalchemy as sa

from flywheel.data.sources import make_engine
from flywheel.serving.predlog import _FRAME_HEADER, db_rows, insert_sql

log = logging.getLogger("flywheel.logsink")
SLICE_ROWS = 16


def read_frames(stream: BinaryIO) -> Any:
    while True:
        header = stream.read(_FRAME_HEADER.size)
        if len(header) < _FRAME_HEADER.size:
            return
        (size,) = _FRAME_HEADER.unpack(header)
        body = stream.read(size)
        if len(body) < size:  # the worker died in the middle of a frame
            log.error("truncated frame at end of input", extra={"event": "prediction_log_drop"})
            return
        yield orjson.loads(body)


def run(state_url: str, stream: BinaryIO) -> tuple[int, int]:
    from flywheel.serving.metrics import ServingMetrics

    metrics = ServingMetrics()
    engine = make_engine(state_url)
    sql = insert_sql(engine.dialect.name)
    written = dropped = 0
    for frame in read_frames(stream):
        n_ok, n_lost = write(engine, sql, db_rows(frame, engine.dialect.name))
        written, dropped = written + n_ok, dropped + n_lost
        metrics.log_written.inc(n_ok)
        if n_lost:
            metrics.log_dropped.inc(n_lost)
    engine.dispose()
    return written, dropped


def _insert_in_slices(conn: sa.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    # One transaction per frame, executed in small slices that yield the core between them:
    # on a core shared with the server, one long burst here shows in the server's tail latency,
    # and a commit per slice would cost more than the sink can spare at full load.
    for start in range(0, len(rows), SLICE_ROWS):
        conn.exec_driver_sql(sql, rows[start : start + SLICE_ROWS])
        os.sched_yield()


def write(engine: sa.Engine, sql: str, rows: list[tuple[Any, ...]]) -> tuple[int, int]:
    """Insert rows; on a duplicate record id insert the others one by one; retry other errors."""
    for attempt in range(1, 8):
        try:
            with engine.begin() as conn:
                _insert_in_slices(conn, sql, rows)
            return len(rows), 0
        except sa.exc.IntegrityError:
            ok = 0
            for row in rows:
                try:
                    with engine.begin() as conn:
                        conn.exec_driver_sql(sql, [row])
                    ok += 1
                except sa.exc.IntegrityError:
                    continue
            return ok, 0
        except Exception as exc:
            log.error("prediction log write failed", extra={
                "event": "prediction_log_error", "attempt": attempt, "rows": len(rows),
                "error": str(exc)})
            time.sleep(min(0.2 * 2**attempt, 10.0))
    log.error("prediction log batch dropped after retries",
              extra={"event": "prediction_log_drop", "rows": len(rows)})
    return 0, len(rows)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # SCHED_BATCH: the sink never preempts the server when it wakes up, and it writes in small
    # slices with a yield between them, so on a shared core it delays a request by one slice at
    # most. Normal priority (nice 0): with nice 5 or 10 it fell behind a saturated server (the
    # buffer filled to 97,542 of 100,000 in 30 s) and backpressure then slowed every request.
    if hasattr(os, "SCHED_BATCH"):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    cpus = os.environ.get("FLYWHEEL_LOG_SINK_CPUS")  # e.g. "1": keep the sink off the worker's core
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    from flywheel.serving.logs import configure_json_logging

    configure_json_logging()
    written, dropped = run(sys.argv[1], sys.stdin.buffer)
    log.info("log sink finished", extra={"event": "log_sink_stopped", "logged": written,
                                          "dropped": dropped})


if __name__ == "__main__":
    main()
