"""A worker's traffic rollup: requests counted per minute in memory, added to the state database
every few seconds by a thread of its own (never in the event loop).

The hot path (`observe`, from `ServingMetrics.observe`) is a dict lookup and a few increments in
the event loop's thread. The flusher swaps the dict for a fresh one and writes the one it swapped
out on its *next* turn, so no increment made through a reference taken before the swap is lost.
A failed write is kept and tried again with the next one; after `max_pending` minutes it is
dropped with a log line (the counts are a chart, the predictions themselves are elsewhere).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import sqlalchemy as sa

from flywheel.state.traffic import Key, Minute, add_minutes

log = logging.getLogger("flywheel.serving")


class TrafficRollup:
    def __init__(self, engine: sa.Engine, model_name: str, interval_s: float = 5.0,
                 max_pending: int = 10_000) -> None:
        self.engine, self.model_name, self.interval_s = engine, model_name, interval_s
        self.max_pending = max_pending
        self.current: dict[Key, Minute] = {}
        self._swapped: dict[Key, Minute] = {}
        self._pending: dict[Key, Minute] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic-rollup", daemon=True)

    def observe(self, endpoint: str, status: int, version: int, seconds: float) -> None:
        now = time.time()
        key = (int(now // 60) * 60, endpoint, version)
        minute = self.current.get(key)
        if minute is None:
            minute = self.current[key] = Minute()
        minute.observe(status, seconds * 1000)

    def dropped(self, n: int, version: int = 0) -> None:
        """Records the prediction log could not keep, counted on this minute's `log` row."""
        key = (int(time.time() // 60) * 60, "log", version)
        minute = self.current.get(key)
        if minute is None:
            minute = self.current[key] = Minute()
        minute.log_dropped += n

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.flush(final=True)

    def stopped(self) -> dict[str, Any]:
        """`stop`, as a worker's stop callback (nothing to add to its log line)."""
        self.stop()
        return {}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def flush(self, final: bool = False) -> None:
        ready, self._swapped = self._swapped, {}
        fresh, self.current = self.current, {}
        if final:  # the loop has stopped: nothing holds a reference any more
            _merge(ready, fresh)
        else:
            self._swapped = fresh
        _merge(self._pending, ready)
        if not self._pending:
            return
        try:
            add_minutes(self.engine, self.model_name, self._pending)
            self._pending = {}
        except Exception as exc:
            log.warning("traffic rollup not written; will retry", extra={
                "event": "traffic_rollup_error", "error": type(exc).__name__, "minutes": len(self._pending)})
            if len(self._pending) > self.max_pending:
                self._pending = {}


def _merge(into: dict[Key, Minute], more: dict[Key, Minute]) -> None:
    for key, m in more.items():
        have = into.get(key)
        if have is None:
            into[key] = m
            continue
        have.requests += m.requests
        have.client_errors += m.client_errors
        have.server_errors += m.server_errors
        have.log_dropped += m.log_dropped
        have.latency_ms += m.latency_ms
        if m.buckets is not None:
            have.buckets = [a + b for a, b in zip(have.buckets or [0] * len(m.buckets), m.buckets,
                                                  strict=True)]

