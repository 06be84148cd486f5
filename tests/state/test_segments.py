"""The prediction log's columns: the segment format, what the log sink writes, how readers read it
back (against rows logged as JSON text before segments existed), compaction and retention."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pandas as pd
import pytest
import sqlalchemy as sa

from flywheel.serving.tabular.logsink import SmallSegments, write
from flywheel.serving.tabular.predlog import insert_sql
from flywheel.state import segments as seg
from flywheel.state.db import close_state, open_state, prediction_segments, predictions
from flywheel.state.logread import read_log
from flywheel.state.partitions import prune

T0 = 1_700_000_000_000_000  # µs


def test_each_kind_of_column_round_trips_through_a_segment():
    columns = {
        "ints": [1, 2, -3],
        "ints_with_null": [1, None, 3],
        "floats": [0.5, None, 1e300],
        "texts": ["CA", None, "CA"],
        "all_null": [None, None, None],
        "bools": [True, False, None],
        "mixed": ["7", 7, None],
        "nested": [{"a": [1]}, None, []],
        "huge": [2**64 - 1, 1, None],  # beyond int64, as orjson reads it
    }
    blob = seg.encode(columns)
    rows, decoded = seg.decode(blob)
    assert rows == 3
    assert {name: kind for name, (kind, _) in decoded.items()} == {
        "ints": "i8", "ints_with_null": "f8", "floats": "f8", "texts": "dict", "all_null": "dict",
        "bools": "json", "mixed": "json", "nested": "json", "huge": "json"}
    assert {name: seg.values_of(*part) for name, part in decoded.items()} == columns
    with pytest.raises(ValueError, match="has 2 values, not 3"):
        seg.encode({"a": [1, 2, 3], "b": [1, 2]})
    newer = bytearray(blob)
    newer[4:4 + len(b'{"v":1')] = b'{"v":9'
    with pytest.raises(ValueError, match="format 9"):
        seg.decode(bytes(newer))


def test_rows_become_columns_and_back_with_keys_a_row_lacks_missing():
    rows = [(1, T0, 2, 0.5, None, None, {"a": 1, "b": "x"}, {"event_time": "2020-01-01"}),
            (2, T0 + 1, 2, 0.25, None, None, {"a": None, "c": 2.5}, None)]
    columns = seg.columns_of(rows)
    assert columns["i:a"] == [1, None] and columns["i:b"] == ["x", None] and columns["i:c"] == [None, 2.5]
    assert columns["m:event_time"] == ["2020-01-01", None]
    back = seg.rows_of(seg.decode(seg.encode(columns))[1], 2)
    assert back[0][6] == {"a": 1, "b": "x", "c": None} and back[0][7] == {"event_time": "2020-01-01"}
    assert back[1][6] == {"a": None, "b": None, "c": 2.5} and back[1][7] is None
    assert [r[:6] for r in back] == [r[:6] for r in rows]


@pytest.mark.parametrize("pieces", [
    [[1, 2], [3]],  # ints stay ints
    [[1, 2], None, [3]],  # a segment without the column: missing values, so floats
    [[1, None], [2.5, 3]],
    [[2**60, 1], [0.5]],  # an integer a float cannot hold: the values themselves
    [["CA", None, "NY"], None, ["NY", "TX"], [None, None]],  # dictionaries merged
    [["CA"], [7, "7"]],  # texts and mixed values
    [[None, None], None],  # nothing but missing values
    [[True, None], [1]],
])
def test_a_column_merged_from_segments_equals_the_column_of_all_their_values(pieces):
    sizes = [2 if p is None else len(p) for p in pieces]
    parts = [None if p is None else seg.decode(seg.encode({"c": p}))[1]["c"] for p in pieces]
    values = [v for p, n in zip(pieces, sizes, strict=True) for v in ([None] * n if p is None else p)]
    kind, part = seg.concat_parts(parts, sizes)
    assert kind == seg.typed_column(values)[0]
    assert seg.values_of(kind, part) == values
    assert seg.values_of(*seg.decode(seg.encode_parts({"c": (kind, part)}))[1]["c"]) == values


# ---- in a database -----------------------------------------------------------------------------

def served(i: int, inputs: dict, meta: dict | None = None, model: str = "m", version: int = 1,
           t_us: int | None = None, task: tuple | None = None) -> list:
    """A log-sink frame row, as a server worker sends it."""
    record = dict(inputs)
    if meta is not None:
        record["meta"] = meta
    row = [f"r{i}", "q", T0 + i * 1000 if t_us is None else t_us, model, version, record,
           None if task else 0.01 * (i % 100), None if task else i % 2 == 0, 0.3]
    if task:
        row.append(task)
    return row


def as_json_rows(engine: sa.Engine, rows: list[list]) -> None:
    """The same rows as a version before the columnar log stored them: JSON text per row."""
    values = []
    for r in rows:
        record = dict(r[5])
        meta = record.pop("meta", None)
        value, label, scores = r[9] if len(r) > 9 else (None, None, None)
        values.append({"record_id": r[0], "request_id": r[1], "model_name": r[3], "model_version": r[4],
                       "created_at": datetime.fromtimestamp(r[2] // 1_000_000, UTC).replace(
                           microsecond=r[2] % 1_000_000),
                       "inputs": orjson.dumps(record).decode(),
                       "meta": None if meta is None else orjson.dumps(meta).decode(),
                       "probability": r[6], "decision": r[7], "latency_ms": r[8], "value": value,
                       "label": label, "scores": None if scores is None else orjson.dumps(scores).decode()})
    with engine.begin() as conn:
        conn.execute(sa.insert(predictions), values)


def awkward_rows(n: int) -> list[list]:
    """Every kind of input a log holds: numbers with gaps, ints, texts with gaps and unseen ones,
    booleans, a column that mixes types, a key some rows lack, meta that comes and goes."""
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        inputs = {"amount": None if i % 17 == 0 else float(rng.lognormal(3, 1)),
                  "term": int(rng.integers(1, 400)),
                  "state": None if i % 11 == 0 else ["CA", "TX", "NY", f"new{i % 7}"][i % 4],
                  "flag": bool(i % 3),
                  "code": str(i) if i % 5 == 0 else i}
        if i % 4 == 0:
            inputs["sometimes"] = i * 0.5
        meta = {"event_time": f"2024-01-{1 + i % 28:02d}T00:00:00+00:00", "entity_id": f"e{i}"} \
            if i % 3 else None
        out.append(served(i, inputs, meta))
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" \
        else f"sqlite:///{tmp_path / 'state.db'}"
    engine = open_state(url)
    yield engine
    close_state(url)


def frames(rows: list[list], per_frame: int = 64) -> list[bytes]:
    return [orjson.dumps(rows[i:i + per_frame]) for i in range(0, len(rows), per_frame)]


def test_the_sink_writes_each_batch_with_one_segment_that_holds_its_rows(engine):
    rows = awkward_rows(300)
    assert write(engine, insert_sql(engine.dialect.name), frames(rows)) == (300, 0)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(predictions.c.id, predictions.c.record_id, predictions.c.inputs,
                                        predictions.c.meta).order_by(predictions.c.id)).all()
        [segment] = conn.execute(sa.select(prediction_segments)).all()
        found = read_log(conn, "m")
    assert [r.record_id for r in stored] == [f"r{i}" for i in range(300)]
    assert {r.inputs for r in stored} == {""} and {r.meta for r in stored} == {None}
    assert (segment.rows, segment.first_id, segment.last_id) == (300, stored[0].id, stored[-1].id)
    assert found.base["id"].tolist() == [r.id for r in stored]  # each row's id is its own
    assert found.inputs["term"].tolist() == [r[5]["term"] for r in rows]


@pytest.mark.parametrize("window", ["all", "time", "last", "ids"])
def test_segments_read_back_as_the_same_frame_as_json_rows(engine, window):
    """Half the rows as JSON text, the other half through the sink into a second model: both
    read back alike, and a log holding both (an upgraded one) reads as one."""
    rows = awkward_rows(400)
    as_json_rows(engine, rows)
    moved = [[*r[:3], "n", *r[4:]] for r in rows]
    for r in moved:
        r[0] = "s" + r[0]
    assert write(engine, insert_sql(engine.dialect.name), frames(moved)) == (400, 0)
    start = datetime.fromtimestamp((T0 + 100_000) / 1e6, UTC)
    end = datetime.fromtimestamp((T0 + 300_000) / 1e6, UTC)
    with engine.connect() as conn:
        def read(model: str):
            if window == "time":
                return read_log(conn, model, start=start, end=end)
            if window == "last":
                return read_log(conn, model, last=123)
            if window == "ids":
                ids = read_log(conn, model).base["id"].tolist()[::7]
                return read_log(conn, model, ids=ids)
            return read_log(conn, model)
        old, new = read("m"), read("n")
    assert len(old) == {"all": 400, "time": 200, "last": 123, "ids": 58}[window]
    pd.testing.assert_frame_equal(old.base.drop(columns="id"), new.base.drop(columns="id"))
    pd.testing.assert_frame_equal(old.inputs, new.inputs)
    pd.testing.assert_frame_equal(old.meta, new.meta)
    assert new.inputs["term"].dtype == np.int64 and new.inputs["amount"].dtype == np.float64
    assert new.inputs["flag"].dtype == bool and new.inputs["code"].dtype == object
    assert new.meta_values("entity_id")[:3] == [None, "e1", "e2"][:len(new)] or window != "all"


def test_the_latest_rows_come_from_the_newest_segments_even_when_writers_interleave(engine):
    sql = insert_sql(engine.dialect.name)
    for k in range(6):  # small batches, as two sinks at a trickle of traffic write them
        assert write(engine, sql, frames([served(10 * k + i, {"x": k}) for i in range(7)])) == (7, 0)
    with engine.connect() as conn:
        everything = read_log(conn, "m").base["id"].tolist()
        for n in (1, 7, 8, 20, 42, 100):
            assert read_log(conn, "m", last=n).base["id"].tolist() == everything[-n:]
        assert len(read_log(conn, "m", last=0)) == 0 and len(read_log(conn, "other", last=5)) == 0


@pytest.mark.parametrize("how", ["all", "last", "ids"])
def test_the_frames_read_are_the_callers_own(engine, how):
    """The rows are slices of the decoded segments, not copies, yet each read is the caller's
    own: adding or changing a column (with warnings as errors) changes nothing another read sees,
    whether the read is every row, the latest rows (a slice) or chosen ids (a gather)."""
    sql = insert_sql(engine.dialect.name)
    for k in range(3):
        write(engine, sql, frames([served(10 * k + i, {"x": k}) for i in range(7)]))
    kwargs = {"all": {}, "last": {"last": 9}, "ids": {"ids": [3, 4, 5, 11, 12]}}[how]
    with engine.connect() as conn, warnings.catch_warnings():
        warnings.simplefilter("error")
        found = read_log(conn, "m", **kwargs)
        for frame in (found.base, found.inputs, found.meta):
            frame["added"] = 1
        found.inputs.loc[0, "x"] = 99
        again = read_log(conn, "m", **kwargs)
    assert len(found) == len(again) == {"all": 21, "last": 9, "ids": 5}[how]
    assert "added" not in again.base.columns and again.inputs["x"].iloc[0] != 99


def test_small_segments_are_merged_and_readers_see_the_same_rows(engine):
    sql = insert_sql(engine.dialect.name)
    small = SmallSegments()
    rows = awkward_rows(200)
    for i in range(0, 200, 10):
        assert write(engine, sql, frames(rows[i:i + 10]), small) == (10, 0)
    with engine.connect() as conn:
        before = read_log(conn, "m")
    small.compact(engine)  # 200 rows are not yet worth a merge
    assert _segments(engine) == 20
    small.compact(engine, finishing=True)  # the sink at end of input merges what it has
    assert _segments(engine) == 1
    with engine.connect() as conn:
        after = read_log(conn, "m")
    pd.testing.assert_frame_equal(before.base, after.base)
    pd.testing.assert_frame_equal(before.inputs, after.inputs)
    pd.testing.assert_frame_equal(before.meta, after.meta)


def test_compact_rewrites_json_rows_into_segments_and_merges_small_ones(engine):
    rows = awkward_rows(500)
    as_json_rows(engine, rows[:300])
    sql = insert_sql(engine.dialect.name)
    for i in range(300, 500, 20):
        write(engine, sql, frames(rows[i:i + 20]))
    with engine.connect() as conn:
        before = read_log(conn, "m")
    seen: list[tuple[str, int, int]] = []
    done = seg.compact(engine, "m", lambda *a: seen.append(a))
    assert done.rewritten_rows == 300 and done.merged_segments == 11 and done.segments == 1
    assert seen[0] == ("rewrite", 300, 300) and seen[-1] == ("merge", 1, 1)
    with engine.connect() as conn:
        after = read_log(conn, "m")
        left = conn.execute(sa.select(sa.func.count()).select_from(predictions)
                            .where(predictions.c.inputs != "")).scalar()
    assert left == 0
    pd.testing.assert_frame_equal(before.base, after.base)
    pd.testing.assert_frame_equal(before.inputs[sorted(before.inputs.columns)],
                                  after.inputs[sorted(after.inputs.columns)])
    assert seg.compact(engine, "m") == seg.Compacted(0, 0, 1)  # nothing left to do


def test_retention_takes_the_old_rows_columns_and_keeps_the_rest(engine):
    now = datetime.now(UTC).replace(microsecond=0)
    t = [int((now - timedelta(days=d)).timestamp() * 1e6) for d in (40, 35, 20, 1)]
    sql = insert_sql(engine.dialect.name)
    write(engine, sql, frames([served(i, {"x": i}, t_us=t[0] + i) for i in range(5)]))  # old
    # one segment across the cutoff: two rows before it, two after
    write(engine, sql, frames([served(10 + i, {"x": 10 + i}, t_us=[t[1], t[1] + 1, t[2], t[3]][i])
                               for i in range(4)]))
    done = prune(engine, retention_days=30, at=now)
    assert done.rows == 7 and done.segments == 2
    with engine.connect() as conn:
        left = read_log(conn, "m")
        rows = conn.execute(sa.select(predictions.c.record_id).order_by(predictions.c.id)).scalars().all()
    assert left.inputs["x"].tolist() == [12, 13] and rows == ["r12", "r13"]
    assert _segments(engine) == 1


def test_outputs_of_every_task_are_read_back(engine):
    rows = [served(0, {"x": 1}), served(1, {"x": 2}, task=(12.5, None, None)),
            served(2, {"x": 3}, task=(None, "b", {"a": 0.2, "b": 0.8}))]
    write(engine, insert_sql(engine.dialect.name), frames(rows))
    with engine.connect() as conn:
        found = read_log(conn, "m")
    assert found.base["value"].tolist()[1] == 12.5 and found.base["label"].tolist()[2] == "b"
    assert found.base["probability"].tolist()[0] == 0.0 and np.isnan(found.base["probability"][1])


def _segments(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(prediction_segments)).scalar_one()


def test_a_cached_reader_fetches_each_segment_once_and_a_merge_meanwhile_loses_no_row(engine, monkeypatch):
    from flywheel.state import logread

    sql = insert_sql(engine.dialect.name)
    rows = awkward_rows(120)
    for i in range(0, 120, 20):
        write(engine, sql, frames(rows[i:i + 20]))
    fetched: list[int] = []
    blobs = logread._blobs
    monkeypatch.setattr(logread, "_blobs", lambda conn, query: fetched.append(1) or blobs(conn, query))
    cache: dict[int, bytes] = {}
    with engine.connect() as conn:
        first = read_log(conn, "m", last=120, cache=cache)
        assert len(cache) == 6 and fetched
        fetched.clear()
        again = read_log(conn, "m", last=100, cache=cache)  # within what was read: no fetch
        assert not fetched and again.base["id"].tolist() == first.base["id"].tolist()[-100:]
    monkeypatch.undo()
    # A merge between choosing the segments and fetching them (another writer, committed) takes
    # the chosen ones away: they are chosen again, and every row is still read.
    with engine.connect() as conn:
        chosen = [logread._latest_ids(conn, "m", 120)]

        def ids_then_merge() -> list[int]:
            if chosen:
                ids = chosen.pop()
                with engine.begin() as other:
                    seg.merge(other, ids)
                return ids
            return logread._latest_ids(conn, "m", 120)

        blobs_read = logread._fetch(conn, ids_then_merge, {})
    n = sum(seg.decode(b)[0] for b in blobs_read)
    assert n == 120 and _segments(engine) == 1
