"""The prediction log: requests append to a bounded buffer; a separate process writes the database.

Hot path: one tuple appended to a deque (atomic, no lock, no thread wake-up). Every
`flush_interval_s` a flusher thread sends what accumulated as one orjson frame down a pipe to a
log-sink process (`python -m flywheel.serving.tabular.logsink`), which serialises the inputs and inserts
in batches. Inserting in the worker itself cost about 1.3 ms of p99 latency (the database driver
binds parameters while holding the GIL); in its own process it costs the request path nothing.

Guarantees: a full buffer makes the request wait up to `queue_wait_s` for room, then the record
is counted as dropped (metric and log line), never silently lost. `close()` (a graceful stop,
SIGTERM) sends everything and waits for the sink to commit it. If the worker is SIGKILLed, frames
already in the pipe are still written (the sink drains to end-of-file); what was still in the
buffer, at most one flush interval of traffic, is lost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa

from flywheel.config import PredictionLogConfig
from flywheel.state.db import feedback

log = logging.getLogger("flywheel.predlog")

# (record_id, request_id, created_at in integer microseconds since the epoch, model_name,
#  model_version, record, probability, decision, latency_ms[, (value, label, scores)]); `record`
#  holds the inputs plus an optional meta object. A binary model's rows end at latency_ms; a
#  regression's carry (value, None, None) with probability and decision None, a multiclass
#  model's (None, label, {class: probability}) with the label's probability.
Row = tuple[Any, ...]
FRAME_HEADER = struct.Struct(">II")  # a frame's body length and rows, then its body
SINK_STATE_ENV = "FLYWHEEL_LOG_SINK_STATE"  # the state database's URL, for the log-sink process
SHADOW_ENV = "FLYWHEEL_LOG_SINK_SHADOW"  # the registry's coordinates (serving.tabular.shadow)


class PredictionLogWriter:
    def __init__(self, state_url: str, config: PredictionLogConfig,
                 on_dropped: Callable[[int], None] | None = None,
                 on_depth: Callable[[int], None] | None = None,
                 on_health: Callable[[dict[str, Any]], None] | None = None,
                 shadow: str | None = None):
        self.state_url = state_url
        self.shadow = shadow  # where the sink finds a shadow rollout's challenger (shadow.ShadowTarget)
        self.config = config
        self.buffer: collections.deque[Row] = collections.deque()
        self.on_dropped = on_dropped
        self.on_depth = on_depth
        self.on_health = on_health
        self.sent = 0
        self.dropped = 0
        self.sink_restarts = 0
        self.last_drop = float("-inf")  # time.monotonic() of the latest drop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._sink: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._start_sink()
        self._thread.start()

    def _start_sink(self) -> None:
        # The URL goes by the environment, not argv: `ps` shows argv (and a password in it) to
        # every user of the machine.
        self._sink = subprocess.Popen(
            [sys.executable, "-m", "flywheel.serving.tabular.logsink"],
            stdin=subprocess.PIPE, env={**os.environ, SINK_STATE_ENV: self.state_url,
                                        **({SHADOW_ENV: self.shadow} if self.shadow else {})},
        )

    def _restart_sink_if_dead(self) -> bool:
        """A sink that died (killed, out of memory) is replaced; what its pipe held is lost."""
        if self._sink is None or self._sink.poll() is None:
            return False
        log.error("log sink exited; starting a new one", extra={
            "event": "prediction_log_error", "exit_code": self._sink.returncode})
        with contextlib.suppress(OSError):
            if self._sink.stdin:
                self._sink.stdin.close()
        self._start_sink()
        self.sink_restarts += 1  # after the new sink is in place: a reader of the count sees it
        return True

    def health(self) -> dict[str, Any]:
        """The log's state for /health: `degraded` while its sink is down, its buffer is over half
        full, or it dropped rows in the last minute (the reasons say which)."""
        reasons = []
        if self._sink is not None and self._sink.poll() is not None:
            reasons.append("sink_down")
        if len(self.buffer) * 2 > self.config.queue_size:
            reasons.append("backlog")
        if time.monotonic() - self.last_drop < 60:
            reasons.append("dropping")
        return {"state": "degraded" if reasons else "ok", "reasons": reasons,
                "queue_depth": len(self.buffer), "dropped": self.dropped,
                "sink_restarts": self.sink_restarts}

    def offer(self, row: Row) -> bool:
        """Buffer one prediction if there is room (the hot path: a length check and an append)."""
        if len(self.buffer) < self.config.queue_size:
            self.buffer.append(row)
            return True
        return False

    async def put(self, row: Row) -> bool:
        """Buffer one prediction; with the buffer full, wait up to `queue_wait_s` for room without
        blocking the event loop (other requests, /health, go on), then count it as dropped."""
        if self.offer(row):
            return True
        deadline = time.monotonic() + self.config.queue_wait_s
        while time.monotonic() < deadline:  # backpressure: this request waits for room
            await asyncio.sleep(0.002)
            if self.offer(row):
                return True
        self.drop([row], "prediction log buffer full; record dropped")
        return False

    def drop(self, rows: list[Row], why: str, error: str | None = None) -> None:
        """Count rows that will never be stored (metric and a log line naming them): never silent."""
        self.dropped += len(rows)
        self.last_drop = time.monotonic()
        if self.on_dropped:
            self.on_dropped(len(rows))
        log.warning(why, extra={"event": "prediction_log_drop", "rows": len(rows),
                                "record_id": rows[0][0] if rows else None, "error": error})

    def depth(self) -> int:
        return len(self.buffer)

    def close(self, timeout: float = 120.0) -> int:
        """Send everything buffered, then wait for the sink to commit it; returns the sink's code."""
        self._stop.set()
        self._thread.join(timeout=timeout)
        if self._sink is None:
            return 0
        if self._sink.stdin:
            self._sink.stdin.close()  # end-of-file: the sink writes what it has and exits
        try:
            return self._sink.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("log sink did not finish in time", extra={"event": "prediction_log_error"})
            return -1

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self.config.flush_interval_s)
            if not stopping:
                self._restart_sink_if_dead()
            if self.on_depth:
                self.on_depth(len(self.buffer))
            if self.on_health:
                self.on_health(self.health())
            while self.buffer:
                # Small frames: serialising a whole interval at once held the GIL long enough to
                # show in p99 (frames of 128 rows: 3.4-3.6 ms; one frame per 50 ms: 5.1-5.3 ms;
                # 32 or 64 rows cost more in pipe writes and commits than they saved).
                rows = self._take(self.config.batch_size)
                try:
                    self._send(rows)
                except Exception as exc:  # the flusher never dies: what it cannot send is counted
                    self.drop(rows, "prediction log rows could not be sent; dropped", repr(exc))
            if stopping:
                return

    def _take(self, limit: int) -> list[Row]:
        rows: list[Row] = []
        pop = self.buffer.popleft
        try:
            while len(rows) < limit:
                rows.append(pop())
        except IndexError:
            pass
        return rows

    def _send(self, rows: list[Row]) -> None:
        try:
            frame = orjson.dumps(rows)
        except TypeError:  # a row orjson cannot write (JSONEncodeError): keep the others
            good = []
            for r in rows:
                try:
                    orjson.dumps(r)
                    good.append(r)
                except TypeError as exc:
                    self.drop([r], "prediction log row cannot be serialised; dropped", str(exc))
            if not good:
                return
            rows, frame = good, orjson.dumps(good)
        for attempt in (1, 2):
            try:
                assert self._sink is not None and self._sink.stdin is not None
                self._sink.stdin.write(FRAME_HEADER.pack(len(frame), len(rows)) + frame)
                self._sink.stdin.flush()
                self.sent += len(rows)
                return
            except (OSError, ValueError, AssertionError) as exc:  # ValueError: a closed pipe
                if attempt == 2 or not self._restart_sink_if_dead():
                    self.drop(rows, "log sink is gone; rows dropped", str(exc))
                    return


# ---- the sink (runs in its own process) --------------------------------------------------------

LOG_COLUMNS = ("record_id", "request_id", "created_at", "model_name", "model_version", "inputs",
               "meta", "probability", "decision", "latency_ms", "value", "label", "scores")
_NO_TASK_OUTPUT = (None, None, None)


BINARY_PARAMS = 10  # a binary row's parameters: LOG_COLUMNS up to latency_ms


def insert_sql(dialect: str, params: int = len(LOG_COLUMNS)) -> str:
    """The INSERT of the first `params` columns: a binary row leaves value, label and scores
    out (binding three NULLs more cost SQLite about 30% more per row)."""
    mark = "?" if dialect == "sqlite" else "%s"
    marks = ", ".join([mark] * params)
    return f"INSERT INTO predictions ({', '.join(LOG_COLUMNS[:params])}) VALUES ({marks})"


# A row of the batch's segment: (model name, time in µs, version, probability, value, label,
# inputs, meta); the sink adds each row's id once the database has given it one.
SegmentRow = tuple[str, int, int, float | None, float | None, str | None, dict[str, Any], Any]


def db_rows(rows: list[list[Any]], dialect: str,
            segment: list[SegmentRow] | None = None) -> list[tuple[Any, ...]]:
    """Frame rows as the database's parameter tuples; their inputs and meta go to `segment`
    (the batch's columns), not into the row (`inputs` is '' and `meta` NULL).

    The sink runs on the worker's core in the default setup, so this is written for its cost:
    the time of day is formatted once per second and the microseconds appended (strftime on
    every row was a quarter of the sink's time).
    """
    out = []
    seconds: dict[int, Any] = {}
    sqlite = dialect == "sqlite"
    for row in rows:
        rid, req, t_us, name, version, record, p, d, latency = row[:9]
        value, label, scores = row[9] if len(row) > 9 else _NO_TASK_OUTPUT
        second, micro = divmod(t_us, 1_000_000)
        base: Any = seconds.get(second)
        if base is None:
            when = datetime.fromtimestamp(second, UTC)
            # SQLite: the text SQLAlchemy's DateTime type writes and reads back (UTC, no offset).
            base = seconds[second] = when.strftime("%Y-%m-%d %H:%M:%S.") if sqlite else when
        stamp = f"{base}{micro:06d}" if sqlite else base.replace(microsecond=micro)
        meta = record.pop("meta", None)
        if segment is not None:
            segment.append((name, t_us, version, p, value, label, record, meta))
        base_row: tuple[Any, ...] = (rid, req, stamp, name, version, "", None, p, d, latency)
        if len(row) > 9 or not sqlite:  # PostgreSQL's COPY takes every column
            base_row += (value, label, None if scores is None else orjson.dumps(scores).decode())
        out.append(base_row)
    return out


FEEDBACK_WAIT_S = 2.0


def store_feedback(engine: sa.Engine, labels: list[dict[str, Any]]) -> int:
    """Upsert ground-truth labels by record id: repeating one is a no-op, a late one is accepted."""
    now = datetime.now(UTC)
    rows = [{"record_id": item["record_id"], "label": item.get("label"), "value": item.get("value"),
             "label_text": item.get("label_text"), "observed_at": item.get("observed_at"),
             "received_at": now} for item in labels]
    if not rows:
        return 0
    dialect = engine.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    else:
        raise RuntimeError(f"feedback upsert is not implemented for {dialect}")
    stmt = insert(feedback)
    stmt = stmt.on_conflict_do_update(
        index_elements=["record_id"],
        set_={"label": stmt.excluded.label, "value": stmt.excluded.value,
              "label_text": stmt.excluded.label_text, "observed_at": stmt.excluded.observed_at},
    )
    with engine.begin() as conn:
        if dialect == "sqlite":  # a locked file: give up in seconds (the caller answers 503)
            conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(FEEDBACK_WAIT_S * 1000)}")
        try:
            conn.execute(stmt, rows)
        finally:
            if dialect == "sqlite":
                conn.exec_driver_sql("PRAGMA busy_timeout = 30000")  # the engine's default
    return len(rows)
