import asyncio
import time

import sqlalchemy as sa

from flywheel.config import PredictionLogConfig
from flywheel.data.sources import make_engine
from flywheel.serving.predlog import PredictionLogWriter, db_rows
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


def test_rows_become_database_parameters_with_inputs_and_meta_apart():
    [sqlite_row] = db_rows([list(row(7))], "sqlite")
    assert sqlite_row[0] == "r7" and sqlite_row[2] == "2023-11-14 22:13:20.000049"
    assert sqlite_row[5] == '{"a":1.0}' and sqlite_row[6] == '{"id":7}'
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

    from flywheel.serving.logsink import read_batches
    from flywheel.serving.predlog import FRAME_HEADER

    def frame(ids: range) -> bytes:
        body = orjson.dumps([list(row(i)) for i in ids])
        return FRAME_HEADER.pack(len(body)) + body

    read_fd, write_fd = os.pipe()
    os.write(write_fd, frame(range(0, 3)) + frame(range(3, 5)) + frame(range(5, 6)))
    batches = (sum((orjson.loads(body) for body in frames), []) for frames in read_batches(read_fd))
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


def test_the_sink_cpu_list_is_checked_with_a_clear_error():
    import os

    import pytest

    from flywheel.config import ConfigError
    from flywheel.serving.logsink import sink_cpus

    assert sink_cpus({}) is None and sink_cpus({"FLYWHEEL_LOG_SINK_CPUS": " "}) is None
    assert sink_cpus({"FLYWHEEL_LOG_SINK_CPUS": "0"}) == {0}
    with pytest.raises(ConfigError, match="expected CPU numbers separated by commas"):
        sink_cpus({"FLYWHEEL_LOG_SINK_CPUS": "cpu1"})
    with pytest.raises(ConfigError, match=f"no CPU {os.cpu_count()}"):
        sink_cpus({"FLYWHEEL_LOG_SINK_CPUS": f"0,{os.cpu_count()}"})
