"""Per-minute traffic rollups: what the control room's traffic charts read.

Each server worker counts its requests per (minute, endpoint, model version) in memory and adds
them here every few seconds: requests, client errors (4xx, refusals included: they never reach the
prediction log), server errors (5xx), records the prediction log dropped, the latency sum and a
latency histogram in fixed buckets. Workers and replicas add to the same rows (an upsert that
sums), so a minute's row is the whole deployment's. SQLite has no percentile function and a
rollup cannot keep every latency: p50/p99 over any range are read from the summed histogram,
interpolated within a bucket as Prometheus' `histogram_quantile` does.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from flywheel.state.db import traffic_minutes

# Upper bounds of the latency buckets in milliseconds; the last bucket is everything above.
BOUNDS_MS: tuple[float, ...] = (0.5, 1, 2, 3, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
                                30000, 60000)
BUCKETS = len(BOUNDS_MS) + 1
COUNTS = ("requests", "client_errors", "server_errors", "log_dropped")


def bucket_of(ms: float) -> int:
    return bisect.bisect_left(BOUNDS_MS, ms)


@dataclass
class Minute:
    """One (minute, endpoint, version)'s counts, as a worker accumulates them."""

    requests: int = 0
    client_errors: int = 0
    server_errors: int = 0
    log_dropped: int = 0
    latency_ms: float = 0.0
    buckets: list[int] | None = None

    def observe(self, status: int, ms: float) -> None:
        self.requests += 1
        if 400 <= status < 500:
            self.client_errors += 1
        elif status >= 500:
            self.server_errors += 1
        self.latency_ms += ms
        if self.buckets is None:
            self.buckets = [0] * BUCKETS
        self.buckets[bucket_of(ms)] += 1


Key = tuple[int, str, int]  # (minute as epoch seconds, endpoint, model version)


def add_minutes(engine: sa.Engine, model_name: str, minutes: dict[Key, Minute]) -> None:
    """Add the counts to their rows (made when missing): one transaction."""
    if not minutes:
        return
    rows = [_row(model_name, key, m) for key, m in minutes.items()]
    dialect = engine.dialect.name
    insert = (pg_insert if dialect == "postgresql" else sqlite_insert)(traffic_minutes)
    summed = {c: traffic_minutes.c[c] + insert.excluded[c]
              for c in (*COUNTS, "latency_ms_sum", *_bucket_columns())}
    statement = insert.on_conflict_do_update(
        index_elements=["model_name", "minute", "endpoint", "model_version"], set_=summed)
    with engine.begin() as conn:
        conn.execute(statement, rows)


def _bucket_columns() -> list[str]:
    return [f"b{i:02d}" for i in range(BUCKETS)]


def _row(model_name: str, key: Key, m: Minute) -> dict[str, Any]:
    minute, endpoint, version = key
    row: dict[str, Any] = {"model_name": model_name, "minute": datetime.fromtimestamp(minute, UTC),
                           "endpoint": endpoint, "model_version": version,
                           "requests": m.requests, "client_errors": m.client_errors,
                           "server_errors": m.server_errors, "log_dropped": m.log_dropped,
                           "latency_ms_sum": m.latency_ms}
    buckets = m.buckets or [0] * BUCKETS
    row.update({c: buckets[i] for i, c in enumerate(_bucket_columns())})
    return row


def quantile(q: float, buckets: Sequence[float]) -> float | None:
    """The q-quantile (0..1) of a latency histogram in ms; None when it is empty. Within a bucket
    the value is interpolated linearly; in the open last bucket it is that bucket's lower bound."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank, seen = q * total, 0.0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i >= len(BOUNDS_MS):
                return BOUNDS_MS[-1]
            low = BOUNDS_MS[i - 1] if i else 0.0
            return low + (BOUNDS_MS[i] - low) * (rank - seen) / count
        seen += count
    return BOUNDS_MS[-1]


def traffic_series(engine: sa.Engine, model_name: str, since: datetime, until: datetime,
                   step: timedelta) -> list[dict[str, Any]]:
    """Per model version and per `step` from `since` to `until`: requests/s, p50/p99 latency (ms),
    error and 4xx rates, log drops. The sums run in SQL over the (model_name, minute) index; the
    steps are grouped here (a few hundred rows at most)."""
    t = traffic_minutes
    columns = [sa.func.sum(t.c[c]).label(c) for c in (*COUNTS, "latency_ms_sum", *_bucket_columns())]
    query = (sa.select(t.c.minute, t.c.model_version, *columns)
             .where(t.c.model_name == model_name, t.c.minute >= since, t.c.minute < until)
             .group_by(t.c.minute, t.c.model_version).order_by(t.c.minute))
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return _by_step(rows, since, step)


def _by_step(rows: Iterable[Any], since: datetime, step: timedelta) -> list[dict[str, Any]]:
    groups: dict[tuple[datetime, int], dict[str, Any]] = {}
    for r in rows:
        minute = r["minute"] if r["minute"].tzinfo else r["minute"].replace(tzinfo=UTC)
        start = since + step * ((minute - since) // step)
        g = groups.setdefault((start, r["model_version"]), {
            **dict.fromkeys(COUNTS, 0), "latency_ms_sum": 0.0, "buckets": [0] * BUCKETS})
        for c in COUNTS:
            g[c] += int(r[c] or 0)
        g["latency_ms_sum"] += float(r["latency_ms_sum"] or 0)
        for i, c in enumerate(_bucket_columns()):
            g["buckets"][i] += int(r[c] or 0)
    out = []
    for (start, version), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        n, seconds = g["requests"], step.total_seconds()
        out.append({"start": start.isoformat(), "model_version": version, "requests": n,
                    "rps": n / seconds, "p50_ms": quantile(0.5, g["buckets"]),
                    "p99_ms": quantile(0.99, g["buckets"]),
                    "mean_ms": g["latency_ms_sum"] / n if n else None,
                    "error_rate": g["server_errors"] / n if n else 0.0,
                    "client_error_rate": g["client_errors"] / n if n else 0.0,
                    "log_dropped": g["log_dropped"]})
    return out


def traffic_totals(series: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The series' totals per model version (requests, 5xx and 4xx counts, drops)."""
    totals: dict[int, dict[str, Any]] = {}
    for s in series:
        t = totals.setdefault(s["model_version"], {"requests": 0, "server_errors": 0,
                                                   "client_errors": 0, "log_dropped": 0})
        t["requests"] += s["requests"]
        t["server_errors"] += round(s["error_rate"] * s["requests"])
        t["client_errors"] += round(s["client_error_rate"] * s["requests"])
        t["log_dropped"] += s["log_dropped"]
    return totals
