import asyncio
import time

import sqlalchemy as sa

from flywheel.config import PredictionLogConfig
from flywheel.data.sources import make_engine
from flywheel.serving.tabular.predlog import PredictionLogWriter, db_rows
from flywheel.state.db import open_state


def row(i: int) -> tuple:
    return (f"r{i}", "q", 1_700_000_000_000_042 + i, "m", 1, {"a": 1.0, "meta": {"id": i}}, 0.2, False,
            0.4)


def test_a_full_buffer_waits_for_room_without_blocking_the_event_loop_then_counts_the_drop():
    drops: list[int] = []
    writer = PredictionLogWriter("sqlite:///unused.db",
                                 PredictionLogConfig(queue_size=2, queue_wait_s=0.3),
                                 on_dropped=drops.append)  # never started: nothing drains
    assert writer.offer(row(1)) and writer.offer(row(2)) and not writer.offer(row(3))
    ticks = 0

    async def other_requests() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    async def scenario() -> bool:
        task = asyncio.create_task(other_requests())
        started = time.monotonic()
        stored = await writer.put(row(3))
        assert time.monotonic() - started >= 0.3  # it waited for room first
        task.cancel()
        return stored

    assert asyncio.run(scenario()) is False
    assert ticks >= 15  # the loop served others while this request waited (a blocking wait: 1)
    assert writer.dropped == 1 and drops == [1] and writer.depth() == 2


def test_a_row_that_cannot_be_serialised_is_counted_and_the_log_goes_on(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    open_state(url)
    writer = PredictionLogWriter(url, PredictionLogConfig(flush_interval_s=0.01))
    writer.start()
    deep: list = []
    for _ in range(300):  # orjson reads 1,024 levels but writes at most 254
        deep = [deep]
    bad = ("bad", "q", 1_700_000_000_000_000, "m", 1, {"a": 1.0, "meta": {"x": deep}}, 0.1, False, 0.1)
    assert writer.offer(row(1)) and writer.offer(bad) and writer.offer(row(2))
    time.sleep(0.3)  # the flusher handles the frame with the bad row, and lives
    assert writer.offer(row(3))
    assert writer.close() == 0
    assert writer.dropped == 1 and writer.sent == 3
    with make_engine(url).connect() as conn:
        stored = [r[0] for r in conn.execute(sa.text("SELECT record_id FROM predictions ORDER BY id"))]
    assert stored == ["r1", "r2", "r3"]


def test_rows_become_database_parameters_with_inputs_and_meta_in_the_segment():
    segment: list = []
    [sqlite_row] = db_rows([list(row(7))], "sqlite", segment)
    assert sqlite_row[0] == "r7" and sqlite_row[2] == "2023-11-14 22:13:20.000049"
    assert sqlite_row[5] == "" and sqlite_row[6] is None  # the row holds neither
    assert segment == [("m", 1_700_000_000_000_049, 1, 0.2, None, None, {"a": 1.0}, {"id": 7})]
    [pg_row] = db_rows([list(row(7))], "postgresql")
    assert pg_row[2].isoformat() == "2023-11-14T22:13:20.000049+00:00"


def test_times_match_python_datetime_on_both_sides_of_a_second():
    from datetime import UTC, datetime

    stamps = [1_700_000_000_999_999, 1_700_000_001_000_000, 1_700_000_001_000_001, 1_700_000_000_999_998]
    rows = [["r", "q", t, "m", 1, {"a": 1.0}, 0.2, False, 0.4] for t in stamps]
    for dialect in ("sqlite", "postgresql"):
        got = [r[2] for r in db_rows([list(r) for r in rows], dialect)]
        want = [datetime.fromtimestamp(t // 1_000_000, UTC).replace(microsecond=t % 1_000_000)
                for t in stamps]
        if dialect == "sqlite":
            want = [w.strftime("%Y-%m-%d %H:%M:%S.%f") for w in want]  # type: ignore[misc]
        assert got == want


def test_the_sink_takes_every_frame_already_in_the_pipe_as_one_batch_and_drops_a_torn_one(caplog):
    import os
    import threading

    import orjson

    from flywheel.serving.tabular.logsink import read_batches
    from flywheel.serving.tabular.predlog import FRAME_HEADER

    def frame(ids: range) -> bytes:
        body = orjson.dumps([list(row(i)) for i in ids])
        return FRAME_HEADER.pack(len(body), len(ids)) + body

    read_fd, write_fd = os.pipe()
    os.write(write_fd, frame(range(0, 3)) + frame(range(3, 5)) + frame(range(5, 6)))
    batches = (sum((orjson.loads(body) for body in frames), [])
               for frames in read_batches(read_fd, linger_s=0.05))
    assert [r[0] for r in next(batches)] == [f"r{i}" for i in range(6)]  # three frames, one batch
    later = frame(range(6, 8))
    # a frame that arrives in two writes is waited for, not cut
    writer = threading.Thread(target=lambda: (os.write(write_fd, later[:10]), time.sleep(0.2),
                                              os.write(write_fd, later[10:] + frame(range(8, 9))[:7]),
                                              os.close(write_fd)))
    writer.start()
    assert [r[0] for r in next(batches)] == ["r6", "r7"]
    assert list(batches) == []  # end of input: the torn last frame is reported, not parsed
    writer.join()
    os.close(read_fd)
    assert "truncated frame" in caplog.text


def test_a_sink_batch_waits_for_frames_until_it_is_full_or_its_linger_is_over():
    import os
    import threading

    import orjson

    from flywheel.serving.tabular.logsink import read_batches
    from flywheel.serving.tabular.predlog import FRAME_HEADER

    def frame(ids: range) -> bytes:
        body = orjson.dumps([list(row(i)) for i in ids])
        return FRAME_HEADER.pack(len(body), len(ids)) + body

    read_fd, write_fd = os.pipe()

    def send() -> None:
        for k in range(10):  # 10 frames of 2 rows, 20 ms apart: 200 ms in all
            os.write(write_fd, frame(range(2 * k, 2 * k + 2)))
            time.sleep(0.02)
        time.sleep(0.5)  # longer than the linger: the next frame starts a new batch
        os.write(write_fd, frame(range(20, 21)))
        os.close(write_fd)

    sender = threading.Thread(target=send)
    sender.start()
    sizes = [sum(len(orjson.loads(body)) for body in frames)
             for frames in read_batches(read_fd, max_rows=8, linger_s=0.3)]
    sender.join()
    os.close(read_fd)
    # frames of 2 rows were waited for until a batch had 8 (more when a busy machine let frames
    # pile up); what was left closed when the linger ran out, without waiting for the frame
    # that came after the pause (usually [8, 8, 4, 1])
    assert sum(sizes) == 21 and sizes[-1] == 1 and len(sizes) >= 3
    assert all(size >= 8 for size in sizes[:-2]) and sizes[0] >= 8


def test_the_sink_cpu_list_is_checked_with_a_clear_error():
    import os

    import pytest

    from flywheel.config import ConfigError
    from flywheel.serving.tabular.logsink import sink_cpus

    assert sink_cpus({}) is None and sink_cpus({"FLYWHEEL_LOG_SINK_CPUS": " "}) is None
    assert sink_cpus({"FLYWHEEL_LOG_SINK_CPUS": "0"}) == {0}
    with pytest.raises(ConfigError, match="expected CPU numbers separated by commas"):
        sink_cpus({"FLYWHEEL_LOG_SINK_CPUS": "cpu1"})
    with pytest.raises(ConfigError, match=f"not CPU {os.cpu_count()}"):
        sink_cpus({"FLYWHEEL_LOG_SINK_CPUS": f"0,{os.cpu_count()}"})
    # a worker pinned to one CPU may still place its sink on another (the serving benchmark does)
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) > 1:
        os.sched_setaffinity(0, {mine[0]})
        try:
            assert sink_cpus({"FLYWHEEL_LOG_SINK_CPUS": str(mine[1])}) == {mine[1]}
        finally:
            os.sched_setaffinity(0, set(mine))


def stored_ids(url: str) -> list[str]:
    with make_engine(url).connect() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT record_id FROM predictions ORDER BY id"))]


def wait_until(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_killed_sink_is_replaced_and_the_log_goes_on(tmp_path):
    import signal

    url = f"sqlite:///{tmp_path / 'state.db'}"
    open_state(url)
    health: list[dict] = []
    writer = PredictionLogWriter(url, PredictionLogConfig(flush_interval_s=0.01), on_health=health.append)
    writer.start()
    for i in range(100):
        assert writer.offer(row(i))
    wait_until(lambda: len(stored_ids(url)) == 100)
    # One handle: the flusher may replace `writer._sink` between a kill and a wait on the
    # attribute, and waiting on the new sink would wait forever.
    sink = writer._sink
    assert sink is not None
    sink.send_signal(signal.SIGKILL)
    sink.wait()
    wait_until(lambda: writer.sink_restarts == 1)
    assert writer._sink is not sink
    for i in range(100, 200):
        assert writer.offer(row(i))
    assert writer.close() == 0
    assert stored_ids(url) == [f"r{i}" for i in range(200)] and writer.dropped == 0
    assert health[-1]["state"] == "ok" and health[-1]["sink_restarts"] == 1


def test_a_dead_sink_shows_in_health_until_the_flusher_replaces_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    open_state(url)
    writer = PredictionLogWriter(url, PredictionLogConfig(flush_interval_s=0.01))
    writer._start_sink()  # the sink alone: no flusher yet to replace it
    assert writer._sink is not None
    writer._sink.kill()
    writer._sink.wait()
    assert writer.health()["state"] == "degraded" and writer.health()["reasons"] == ["sink_down"]
    writer._thread.start()
    wait_until(lambda: writer.sink_restarts == 1)
    assert writer.health()["state"] == "ok"
    assert writer.offer(row(0)) and writer.close() == 0
    assert stored_ids(url) == ["r0"]


def test_a_locked_state_database_degrades_the_log_which_recovers_and_the_numbers_add_up(tmp_path):
    """The database is locked by another process: the sink waits, the pipe and then the buffer
    fill, rows beyond them are dropped and counted, nothing blocks the event loop; unlocked, the
    rest is stored. Answered = stored + dropped."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'state.db'}"
    open_state(url)
    writer = PredictionLogWriter(url, PredictionLogConfig(queue_size=200, queue_wait_s=0,
                                                          flush_interval_s=0.01))
    writer.start()
    locker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    degraded: list[dict] = []

    async def traffic() -> int:
        answered = 0
        for i in range(3000):
            await writer.put(row(i))  # drops (counted) once the buffer is full: it never waits
            answered += 1
            if i % 100 == 99:
                await asyncio.sleep(0.01)
                degraded.append(writer.health())
        return answered

    started = time.monotonic()
    answered = asyncio.run(traffic())
    assert time.monotonic() - started < 5  # the sends never waited on the locked database
    states = {h["state"] for h in degraded}
    assert "degraded" in states and {"backlog", "dropping"} <= {r for h in degraded for r in h["reasons"]}
    assert writer.dropped > 0
    locker.execute("COMMIT")
    locker.close()
    assert writer.close() == 0
    stored = len(stored_ids(url))
    assert stored > 0 and stored + writer.dropped == answered == 3000


def test_binary_rows_leave_the_task_columns_out_of_sqlites_insert_and_other_rows_fill_them(tmp_path):
    import orjson

    from flywheel.serving.tabular.logsink import write
    from flywheel.serving.tabular.predlog import insert_sql
    from flywheel.state.db import open_state

    url = f"sqlite:///{tmp_path / 'state.db'}"
    engine = open_state(url)
    binary = list(row(1))
    regression = [*row(2)[:9], (12.5, None, None)]
    multiclass = [*row(3)[:9], (None, "b", {"a": 0.2, "b": 0.8})]
    assert [len(r) for r in db_rows([list(binary), list(regression)], "sqlite")] == [10, 13]
    assert len(db_rows([list(binary)], "postgresql")[0]) == 13  # COPY takes every column
    frame = orjson.dumps([binary, regression, multiclass])
    assert write(engine, insert_sql("sqlite"), [frame]) == (3, 0)
    with engine.connect() as conn:
        got = conn.execute(sa.text("SELECT record_id, probability, value, label, scores FROM predictions "
                                   "ORDER BY id")).all()
    assert [tuple(r)[:4] for r in got] == [("r1", 0.2, None, None), ("r2", 0.2, 12.5, None),
                                           ("r3", 0.2, None, "b")]
    assert orjson.loads(got[2].scores) == {"a": 0.2, "b": 0.8} and got[0].scores is None
