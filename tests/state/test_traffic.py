"""Per-minute traffic rollups: workers add up on SQLite and PostgreSQL, percentiles come back from
the histogram, and a worker's rollup loses no request while its flusher writes."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from flywheel.serving.http.traffic import TrafficRollup
from flywheel.state.db import close_state, open_state, traffic_minutes
from flywheel.state.traffic import BOUNDS_MS, Minute, add_minutes, bucket_of, quantile, traffic_series

T0 = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


def minute(statuses_ms: list[tuple[int, float]]) -> Minute:
    m = Minute()
    for status, ms in statuses_ms:
        m.observe(status, ms)
    return m


def test_quantile_from_buckets_is_within_the_true_values_bucket() -> None:
    rng = np.random.default_rng(0)
    latencies = rng.lognormal(mean=1.0, sigma=1.0, size=20_000)  # ms
    buckets = [0] * (len(BOUNDS_MS) + 1)
    for ms in latencies:
        buckets[bucket_of(ms)] += 1
    for q in (0.5, 0.9, 0.99):
        true = float(np.quantile(latencies, q))
        got = quantile(q, buckets)
        assert got is not None
        i = bucket_of(true)
        low, high = (BOUNDS_MS[i - 1] if i else 0.0), BOUNDS_MS[i]
        assert low <= got <= high, (q, true, got)
    assert quantile(0.5, [0] * len(buckets)) is None


def check_adds_up(url: str) -> None:
    engine = open_state(url)
    key = (int(T0.timestamp()), "predict", 3)
    add_minutes(engine, "m", {key: minute([(200, 1.5), (200, 2.5), (422, 0.4)])})
    add_minutes(engine, "m", {key: minute([(200, 40.0), (500, 3.0)]),  # another worker, same minute
                              (int(T0.timestamp()) + 60, "predict", 3): minute([(200, 1.0)])})
    add_minutes(engine, "other", {key: minute([(200, 1.0)] * 7)})
    with engine.connect() as conn:
        rows = conn.execute(sa.select(traffic_minutes).where(traffic_minutes.c.model_name == "m")
                            .order_by(traffic_minutes.c.minute)).mappings().all()
    assert [(r["requests"], r["client_errors"], r["server_errors"]) for r in rows] == [(5, 1, 1), (1, 0, 0)]
    assert rows[0]["latency_ms_sum"] == pytest.approx(47.4)
    series = traffic_series(engine, "m", T0, T0 + timedelta(hours=1), timedelta(minutes=15))
    assert len(series) == 1 and series[0]["requests"] == 6 and series[0]["model_version"] == 3
    assert series[0]["rps"] == pytest.approx(6 / 900)
    assert series[0]["error_rate"] == pytest.approx(1 / 6)
    assert series[0]["client_error_rate"] == pytest.approx(1 / 6)
    assert 25 < series[0]["p99_ms"] <= 50  # 40 ms falls in the (25, 50] bucket
    assert traffic_series(engine, "m", T0 + timedelta(hours=1), T0 + timedelta(hours=2),
                          timedelta(minutes=1)) == []


def test_workers_add_to_the_same_minute_on_sqlite(tmp_path: Path) -> None:
    check_adds_up(f"sqlite:///{tmp_path / 'state.db'}")


@pytest.mark.postgres
def test_workers_add_to_the_same_minute_on_postgresql(postgres_url: str) -> None:
    try:
        check_adds_up(postgres_url)
    finally:
        close_state(postgres_url)


def test_the_rollup_loses_no_request_while_its_flusher_writes(tmp_path: Path) -> None:
    """The event loop's thread counts while the flusher swaps and writes every few ms."""
    engine = open_state(f"sqlite:///{tmp_path / 'state.db'}")
    rollup = TrafficRollup(engine, "m", interval_s=0.005)
    rollup.start()
    n = 30_000

    def hot_path() -> None:
        for i in range(n):
            rollup.observe("predict", 200 if i % 10 else 422, 1, 0.002)
        rollup.dropped(5, 1)

    worker = threading.Thread(target=hot_path)
    worker.start()
    worker.join()
    rollup.stop()
    with engine.connect() as conn:
        got = conn.execute(sa.select(sa.func.sum(traffic_minutes.c.requests),
                                     sa.func.sum(traffic_minutes.c.client_errors),
                                     sa.func.sum(traffic_minutes.c.log_dropped),
                                     sa.func.sum(traffic_minutes.c.b02))).one()
    assert tuple(got) == (n, n // 10, 5, n)  # every 2 ms request in the (1, 2] ms bucket
