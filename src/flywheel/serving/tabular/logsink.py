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
    SegmentRow,
    db_rows,
    insert_sql,
)
from flywheel.serving.tabular.shadow import SHADOW_ENV, ShadowFeed
from flywheel.state import segments
from flywheel.state.partitions import ensure_partitions

log = logging.getLogger("flywheel.logsink")
SLICE_ROWS = 16
MAX_BATCH_BYTES = 4 << 20  # at most this much of the pipe in one transaction (~10,000 rows)


BATCH_ROWS = 1024  # a batch (one transaction, one segment) closes at this many rows ...
LINGER_S = 0.25  # ... or this long after its first frame arrived, whichever comes first


def read_batches(fd: int, max_rows: int = BATCH_ROWS, linger_s: float = LINGER_S,
                 max_bytes: int = MAX_BATCH_BYTES) -> Iterator[list[bytes]]:
    """The frames that arrive, as batches of frame bodies: a batch closes `linger_s` after its
    first frame, at `max_rows` rows, at `max_bytes`, or at end of input.

    Waiting for a batch to fill (instead of writing each frame as it comes) is what lets a sink
    on the server's core keep up at full load: a saturated server's frames of 128 rows make one
    transaction and one segment of about a thousand rows, where a frame at a time was eight
    commits, eight segments and a merge re-encoding them all (measured in docs/measurements.md).
    A backlog in the pipe closes each batch at once, so the sink catches up in transactions of
    `max_rows` or more when the database is the bottleneck (PostgreSQL waits for its WAL flush
    on every commit).
    """
    buffer = bytearray()
    eof = False
    while True:
        eof = eof or _fill(fd, buffer, max_rows, linger_s, max_bytes)
        frames = _take_frames(buffer)
        if frames:
            yield frames
        if eof:
            if buffer:  # the worker died in the middle of a frame
                log.error("truncated frame at end of input", extra={"event": "prediction_log_drop"})
            return


def _fill(fd: int, buffer: bytearray, max_rows: int, linger_s: float, max_bytes: int) -> bool:
    """Read into `buffer` until a batch is due (see `read_batches`); True at end of input."""
    first = None
    while True:
        rows, size = _complete(buffer)
        wait: float | None = None  # no complete frame yet: wait for one as long as it takes
        if rows:
            first = first or time.monotonic()
            wait = first + linger_s - time.monotonic()
            if rows >= max_rows or size >= max_bytes or wait <= 0:
                return False
        if not select.select([fd], [], [], wait)[0]:
            return False  # the linger is over
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return True
        buffer += chunk


def _take_frames(buffer: bytearray) -> list[bytes]:
    """The bodies of the complete frames at the front of `buffer`, removed from it."""
    frames: list[bytes] = []
    offset = 0
    while len(buffer) - offset >= FRAME_HEADER.size:
        size, _ = FRAME_HEADER.unpack_from(buffer, offset)
        end = offset + FRAME_HEADER.size + size
        if end > len(buffer):
            break
        frames.append(bytes(buffer[offset + FRAME_HEADER.size : end]))
        offset = end
    del buffer[:offset]
    return frames


def _complete(buffer: bytearray) -> tuple[int, int]:
    """The rows and bytes of the complete frames at the front of `buffer`."""
    rows = offset = 0
    while len(buffer) - offset >= FRAME_HEADER.size:
        size, n = FRAME_HEADER.unpack_from(buffer, offset)
        if len(buffer) < offset + FRAME_HEADER.size + size:
            break
        rows += n
        offset += FRAME_HEADER.size + size
    return rows, offset


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


def run(state_url: str, fd: int, shadow: ShadowFeed | None = None) -> tuple[int, int]:
    metrics = ServingMetrics()
    if shadow is not None:
        shadow.on_skip = metrics.shadow_skipped.inc
    engine = make_engine(state_url)
    sql = insert_sql(engine.dialect.name)
    written = dropped = 0
    keep_partitions_ahead(engine)
    checked = time.monotonic()
    small = SmallSegments()
    for frames in read_batches(fd):
        if time.monotonic() - checked > PARTITIONS_EVERY_S:
            keep_partitions_ahead(engine)
            checked = time.monotonic()
        n_ok, n_lost = write(engine, sql, frames, small)
        if shadow is not None and not n_lost:  # committed: the shadow process may score them
            shadow.send(engine, frames)
        written, dropped = written + n_ok, dropped + n_lost
        metrics.log_written.inc(n_ok)
        if n_lost:
            metrics.log_dropped.inc(n_lost)
        if not select.select([fd], [], [], 0)[0]:  # merge only when no frame is waiting: under
            small.compact(engine)                  # load a merge is work the server's core lacks
    small.compact(engine, finishing=True)
    engine.dispose()
    if shadow is not None:
        shadow.close()
    return written, dropped


SEGMENT_ROWS = 1024  # at most this many rows in a segment the sink writes at once
# A segment of the sink's with fewer rows is merged with the next ones: a full batch (a busy
# server's) makes segments of 512 to 1,024 rows, never merged; a trickle's small ones are.
MERGE_BELOW = SEGMENT_ROWS // 2
COMPACT_AFTER_S = 300.0  # ... or, at a trickle of traffic, once the oldest of them is this old


class SmallSegments:
    """The segments this sink wrote with fewer than MERGE_BELOW rows, merged into one when they
    add up to COMPACT_ROWS (or have waited COMPACT_AFTER_S, or the sink is finishing): a reader then
    reads about a thousand segments for a million rows however the traffic came."""

    def __init__(self) -> None:
        self.pending: dict[str, list[tuple[int, int]]] = {}
        self.since: dict[str, float] = {}

    def add(self, model_name: str, segment_id: int, rows: int) -> None:
        if rows >= MERGE_BELOW:
            return
        self.pending.setdefault(model_name, []).append((segment_id, rows))
        self.since.setdefault(model_name, time.monotonic())

    def compact(self, engine: sa.Engine, finishing: bool = False) -> None:
        for model_name, found in list(self.pending.items()):
            due = sum(n for _, n in found) >= segments.COMPACT_ROWS or finishing or \
                time.monotonic() - self.since[model_name] > COMPACT_AFTER_S
            if not due or len(found) < 2:
                continue
            del self.pending[model_name], self.since[model_name]
            try:
                with engine.begin() as conn:
                    merged = segments.merge(conn, [sid for sid, _ in found], os.sched_yield)
            except Exception as exc:  # the small segments stay as they are: readable, just slower
                log.warning("prediction log segments not merged", extra={
                    "event": "prediction_log_compact", "segments": len(found), "error": str(exc)})
                continue
            if merged is not None:
                self.add(model_name, *merged)


def _slices(frames: list[bytes], dialect: str, segment: list[SegmentRow]) -> Iterator[list[tuple[Any, ...]]]:
    """The frames' rows as database parameters, SLICE_ROWS at a time, yielding the core between
    (their inputs and meta go to `segment`).

    On a core shared with the server every stretch of work here that does not yield delays
    every request in flight by its length: converting a whole batch in one go (a few ms when
    frames had piled up) added 0.8 ms to the server's p99 with no database work at all.
    """
    for body in frames:
        rows = orjson.loads(body)
        for start in range(0, len(rows), SLICE_ROWS):
            yield db_rows(rows[start : start + SLICE_ROWS], dialect, segment)
            os.sched_yield()


def _insert(conn: sa.Connection, sql: str, frames: list[bytes]) -> tuple[int, list[tuple[str, int, int]]]:
    """The frames' rows and their segments (one per model) in the caller's transaction: (rows,
    [(model, segment id, rows), ...])."""
    # One transaction per batch, written slice by slice: a commit per slice would cost more than
    # the sink can spare at full load.
    segment: list[SegmentRow] = []
    ids: list[int] = []
    if conn.dialect.name == "postgresql":
        # COPY: the rows stream to the server, which does the insert work in its own process
        # (half the sink's CPU per row of executemany's, on the worker's core). The ids are
        # taken from the sequence first: COPY cannot hand them back.
        total = sum(_frame_rows(body) for body in frames)
        ids = _next_ids(conn, total)
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(_COPY_SQL) as copy:
            n = 0
            for rows in _slices(frames, "postgresql", segment):
                for row in rows:
                    copy.write_row((ids[n], *row))
                    n += 1
    else:
        order: list[int] = []  # each row's place in the batch, in the order it was inserted
        for rows in _slices(frames, conn.dialect.name, segment):
            order += execute_rows(conn, sql, rows, len(order))
        # An INSERT's rows get consecutive ids while the transaction holds SQLite's write lock:
        # the batch's ids end at the last one given.
        last = conn.exec_driver_sql("SELECT last_insert_rowid()").scalar_one() if order else 0
        ids = [0] * len(order)
        for k, i in enumerate(order):
            ids[i] = last - len(order) + 1 + k
    return len(ids), _store_segments(conn, segment, ids)


def _frame_rows(body: bytes) -> int:
    return len(orjson.loads(body))


def _next_ids(conn: sa.Connection, n: int) -> list[int]:
    return list(conn.exec_driver_sql(
        "SELECT nextval(pg_get_serial_sequence('predictions', 'id')) FROM generate_series(1, %(n)s)",
        {"n": n}).scalars())


def _store_segments(conn: sa.Connection, segment: list[SegmentRow],
                    ids: list[int]) -> list[tuple[str, int, int]]:
    names = {row[0] for row in segment}
    groups = [(segment, ids)] if len(names) == 1 else [
        ([r for r in segment if r[0] == name], [i for i, r in zip(ids, segment, strict=True) if r[0] == name])
        for name in names]
    stored = []
    for rows, row_ids in groups:
        # A backlog of 10,000 rows is ten segments, each encoded a column at a time with a yield
        # between: one long stretch of encoding (segments of 4,096 rows: p99 x1.44 of the JSON
        # sink on a shared core) delays every request in flight.
        step = -(-len(rows) // -(-len(rows) // SEGMENT_ROWS))  # equal parts of <= SEGMENT_ROWS
        for start in range(0, len(rows), step):
            os.sched_yield()
            part = rows[start:start + step]
            _, times, versions, probabilities, values, labels, inputs, meta = zip(*part, strict=True)
            columns = segments.columns_from(row_ids[start:start + step], times, versions,
                                            probabilities, values, labels, inputs, meta)
            stored.append((part[0][0], *segments.store_columns(conn, part[0][0], columns, os.sched_yield)))
    return stored


def execute_rows(conn: sa.Connection, sql: str, rows: list[tuple[Any, ...]], offset: int = 0) -> list[int]:
    """`sql` (every column) for full rows, the binary INSERT for binary rows (see `db_rows`), on
    SQLite; returns the rows' places (`offset` + their index) in the order they were inserted."""
    order = []
    for short in (True, False):
        at = [i for i, r in enumerate(rows) if (len(r) == BINARY_PARAMS) == short]
        if not at:
            continue
        statement = insert_sql(conn.dialect.name, BINARY_PARAMS) if short else sql
        conn.exec_driver_sql(statement, [rows[i] for i in at])
        order += [offset + i for i in at]
    return order


_COPY_SQL = f"COPY predictions (id, {', '.join(LOG_COLUMNS)}) FROM STDIN"


def _duplicate(exc: Exception) -> bool:
    """A unique-key violation, whether SQLAlchemy wrapped it or it came from psycopg's COPY."""
    if isinstance(exc, sa.exc.IntegrityError):
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(exc, psycopg.IntegrityError)


def write(engine: sa.Engine, sql: str, frames: list[bytes],
          small: SmallSegments | None = None) -> tuple[int, int]:
    """Insert the frames' rows with their segments; on a duplicate record id insert the others
    one by one; retry other errors. Returns (rows written, rows dropped)."""
    for attempt in range(1, 8):
        try:
            with engine.begin() as conn:
                n, stored = _insert(conn, sql, frames)
        except Exception as exc:
            if not _duplicate(exc):
                log.error("prediction log write failed", extra={
                    "event": "prediction_log_error", "attempt": attempt, "error": str(exc)})
                time.sleep(min(0.2 * 2**attempt, 10.0))
                continue
            return _one_by_one(engine, sql, frames, small)
        if small is not None:
            for name, sid, rows in stored:
                small.add(name, sid, rows)
        return n, 0
    lost = sum(len(orjson.loads(body)) for body in frames)
    log.error("prediction log batch dropped after retries",
              extra={"event": "prediction_log_drop", "rows": lost})
    return 0, lost


def _one_by_one(engine: sa.Engine, sql: str, frames: list[bytes],
                small: SmallSegments | None) -> tuple[int, int]:
    """After a duplicate: each row alone (with a segment of its own, merged later); a duplicate
    is skipped (already stored), any other failure drops and counts that row, and the sink goes
    on."""
    ok = lost = 0
    for body in frames:
        for row in orjson.loads(body):
            try:
                with engine.begin() as conn:
                    _, stored = _insert(conn, sql, [orjson.dumps([row])])
                ok += 1
            except Exception as exc:
                if _duplicate(exc):
                    continue
                lost += 1
                log.error("prediction log row dropped", extra={
                    "event": "prediction_log_drop", "rows": 1, "error": type(exc).__name__})
                continue
            if small is not None:
                for name, sid, rows in stored:
                    small.add(name, sid, rows)
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
    state_url = os.environ.get(SINK_STATE_ENV) or sys.argv[1]
    target = os.environ.get(SHADOW_ENV)  # shadow scoring runs beside the sink, at idle priority
    written, dropped = run(state_url, sys.stdin.fileno(),
                           ShadowFeed(state_url, target) if target else None)
    log.info("log sink finished", extra={"event": "log_sink_stopped", "logged": written,
                                          "dropped": dropped})


if __name__ == "__main__":
    main()
