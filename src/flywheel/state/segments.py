"""The prediction log's columns: one blob per log-sink batch (a *segment*), in the state database.

Each prediction is still one row of `predictions` (its record id, time, version and outputs: what
feedback joins, the room and exports count), written in the same transaction as the segment that
holds the batch's columns: the ids, the times, the versions, the outputs, every input and every
`meta` key. Readers of a window read its segments, not a JSON text per row: a 1M-row window is
about a thousand database rows instead of a million (see docs/measurements.md).

A blob is `u32 header length | header | buffers`, the header orjson
`{"v": 1, "rows": n, "columns": [[name, kind, offset, length], ...]}`, each column one of:

- `i8`: little-endian int64, no missing values;
- `f8`: little-endian float64, NaN where the value was missing (null or absent);
- `dict`: texts: `u32 length | orjson list of the distinct texts` then an int32 code per row,
  0 for missing and k for the (k-1)-th text;
- `json`: anything else (booleans, mixed types, nested values): one orjson list.

Writing needs only NumPy and orjson (the slim serving image's sink writes segments); reading into
a DataFrame needs pandas (`flywheel.state.logread`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa

from flywheel.state.db import prediction_segments, predictions

FORMAT = 1
ID, TIME, VERSION, PROBABILITY, VALUE, LABEL = "id", "t_us", "version", "probability", "value", "label"
BASE = (ID, TIME, VERSION, PROBABILITY, VALUE, LABEL)
INPUT, META = "i:", "m:"  # prefixes of an input column's and a meta key's name
_U32 = struct.Struct("<I")
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
# A column's part of one segment, decoded: an array (i8, f8), (texts, codes) (dict), or a list.
Part = Any


def _kind(values: Sequence[Any]) -> str:
    numbers = texts = other = False
    ints = True
    for v in values:
        if v is None:
            ints = False
            continue
        t = type(v)
        if t is float:
            numbers, ints = True, False
        elif t is int:
            numbers = True
            if not _I64_MIN <= v <= _I64_MAX:
                other = True
        elif t is str:
            texts = True
        else:
            other = True
    if other or (numbers and texts):
        return "json"
    if texts:
        return "dict"
    if numbers:
        return "i8" if ints else "f8"
    return "dict"  # every value missing: the cheapest kind that says so


def encode_column(values: Sequence[Any]) -> tuple[str, bytes]:
    kind = _kind(values)
    if kind == "i8":
        return kind, np.asarray(values, dtype="<i8").tobytes()
    if kind == "f8":
        return kind, np.array([np.nan if v is None else v for v in values], dtype="<f8").tobytes()
    if kind == "dict":
        index: dict[Any, int] = {None: 0}
        setdefault = index.setdefault
        codes = np.fromiter((setdefault(v, len(index)) for v in values), dtype="<i4", count=len(values))
        words = orjson.dumps(list(index)[1:])
        return kind, _U32.pack(len(words)) + words + codes.tobytes()
    return kind, orjson.dumps(list(values))


def encode(columns: Mapping[str, Sequence[Any]]) -> bytes:
    """One segment from equally long columns (values as JSON would hold them)."""
    spec: list[list[Any]] = []
    parts: list[bytes] = []
    offset = 0
    rows = None
    for name, values in columns.items():
        if rows is None:
            rows = len(values)
        elif len(values) != rows:
            raise ValueError(f"column {name!r} has {len(values)} values, not {rows}")
        kind, data = encode_column(values)
        spec.append([name, kind, offset, len(data)])
        parts.append(data)
        offset += len(data)
    header = orjson.dumps({"v": FORMAT, "rows": rows or 0, "columns": spec})
    return _U32.pack(len(header)) + header + b"".join(parts)


def decode(blob: bytes | memoryview,
           wanted: Callable[[str], bool] | None = None) -> tuple[int, dict[str, tuple[str, Part]]]:
    """(rows, {name: (kind, part)}) of one segment: every column, or those `wanted` names."""
    view = memoryview(blob)
    (size,) = _U32.unpack_from(view)
    header = orjson.loads(view[4 : 4 + size])
    if header.get("v") != FORMAT:
        raise ValueError(f"prediction log segment format {header.get('v')!r}; this version reads {FORMAT}")
    body = view[4 + size :]
    out: dict[str, tuple[str, Part]] = {}
    for name, kind, offset, length in header["columns"]:
        if wanted is not None and not wanted(name):
            continue
        chunk = body[offset : offset + length]
        if kind == "i8":
            out[name] = (kind, np.frombuffer(chunk, dtype="<i8"))
        elif kind == "f8":
            out[name] = (kind, np.frombuffer(chunk, dtype="<f8"))
        elif kind == "dict":
            (n,) = _U32.unpack_from(chunk)
            out[name] = (kind, (orjson.loads(chunk[4 : 4 + n]), np.frombuffer(chunk[4 + n :], dtype="<i4")))
        elif kind == "json":
            out[name] = (kind, orjson.loads(chunk))
        else:
            raise ValueError(f"prediction log segment column {name!r} has an unknown kind {kind!r}")
    return header["rows"], out


def values_of(kind: str, part: Part) -> list[Any]:
    """A decoded part as the values that were encoded (None for missing)."""
    if kind == "i8":
        return [int(v) for v in part.tolist()]
    if kind == "f8":
        return [None if v != v else v for v in part.tolist()]
    if kind == "dict":
        words, codes = part
        table = [None, *words]
        return [table[c] for c in codes.tolist()]
    return list(part)


def columns_of(rows: Sequence[tuple[int, int, int, float | None, float | None, str | None,
                                     Mapping[str, Any], Mapping[str, Any] | None]]) -> dict[str, list[Any]]:
    """Segment columns from log rows: (id, time in µs, version, probability, value, label, inputs,
    meta). An input or meta key absent from a row is missing (None) in that row."""
    if not rows:
        return {name: [] for name in BASE}
    out = {name: list(values) for name, values in zip(BASE, zip(*(r[:6] for r in rows), strict=True),
                                                       strict=True)}
    out.update({INPUT + k: v for k, v in _keyed([r[6] for r in rows]).items()})
    out.update({META + k: v for k, v in _keyed([r[7] for r in rows]).items()})
    return out


def _keyed(records: list[Mapping[str, Any] | None]) -> dict[str, list[Any]]:
    """One list per key over the records. The usual batch (every record with the same keys in
    the same order: validated requests) is transposed in one step; any other key by key."""
    first = records[0]
    if first is not None:
        keys = tuple(first)
        if all(r is not None and tuple(r) == keys for r in records):
            columns = zip(*(r.values() for r in records if r is not None), strict=True)
            return {k: list(v) for k, v in zip(keys, columns, strict=True)}
    out: dict[str, list[Any]] = {}
    for n, record in enumerate(records):
        if record:
            for key, value in record.items():
                if key not in out:
                    out[key] = [None] * n
                out[key].append(value)
        for column in out.values():
            if len(column) <= n:
                column.append(None)
    return out


def rows_of(columns: Mapping[str, tuple[str, Part]], rows: int) -> list[tuple[Any, ...]]:
    """The inverse of `columns_of` (for rewriting a segment): every input of the segment comes
    back, None where it was missing; a meta key only where it had a value."""
    values = {name: values_of(kind, part) for name, (kind, part) in columns.items()}
    base = [values.get(name, [None] * rows) for name in BASE]
    keyed = [(name[len(INPUT):], v) for name, v in values.items() if name.startswith(INPUT)]
    metas = [(name[len(META):], v) for name, v in values.items() if name.startswith(META)]
    out = []
    for i in range(rows):
        inputs = {k: v[i] for k, v in keyed}
        meta = {k: v[i] for k, v in metas if v[i] is not None}
        out.append((*(b[i] for b in base), inputs, meta or None))
    return out


# ---- in the state database ---------------------------------------------------------------------

LogRow = tuple[int, int, int, Any, Any, Any, Mapping[str, Any], Any]  # as `columns_of` takes them


def _moment(t_us: int) -> datetime:
    return datetime.fromtimestamp(t_us // 1_000_000, UTC).replace(microsecond=t_us % 1_000_000)


def store(conn: sa.Connection, model_name: str, rows: Sequence[LogRow]) -> tuple[int, int]:
    """One segment of `rows` (ids already given), in the caller's transaction: (its id, rows)."""
    ids = [r[0] for r in rows]
    times = [r[1] for r in rows]
    blob = encode(columns_of(rows))
    found = conn.execute(sa.insert(prediction_segments).values(
        model_name=model_name, rows=len(rows), first_id=min(ids), last_id=max(ids),
        first_at=_moment(min(times)), last_at=_moment(max(times)), columns=blob)
        .returning(prediction_segments.c.id)).scalar_one()
    return int(found), len(rows)


def merge(conn: sa.Connection, segment_ids: Sequence[int]) -> tuple[int, int] | None:
    """The segments `segment_ids` (of one model) rewritten as one, in the caller's transaction:
    (the new segment's id, its rows); None when fewer than two of them are still there. Raises
    `SegmentsMoved` when another writer removed one between the read and the delete (a prune):
    the caller's transaction must roll back, or its rows would be stored twice."""
    s = prediction_segments.c
    found = conn.execute(sa.select(s.id, s.model_name, s.columns).where(s.id.in_(list(segment_ids)))
                         .order_by(s.first_id)).all()
    if len(found) < 2 or len({r.model_name for r in found}) != 1:
        return None
    rows: list[tuple[Any, ...]] = []
    for r in found:
        n, columns = decode(bytes(r.columns))
        rows += rows_of(columns, n)
    deleted = conn.execute(sa.delete(prediction_segments).where(s.id.in_([r.id for r in found]))).rowcount
    if deleted != len(found):
        raise SegmentsMoved(f"{len(found) - deleted} of the segments to merge were removed meanwhile")
    return store(conn, found[0].model_name, rows)  # type: ignore[arg-type]


class SegmentsMoved(RuntimeError):
    """Segments being merged were changed by another writer: roll back and leave them."""


DELETE_BATCH = 2_000


def prune(engine: sa.Engine, cutoff: datetime) -> int:
    """Remove the log's columns of the rows served before `cutoff`: whole segments in batches,
    and each segment that straddles it rewritten with its newer rows (one transaction each).
    Returns the segments removed or rewritten."""
    s = prediction_segments.c
    done = 0
    while True:
        with engine.begin() as conn:
            ids = sa.select(s.id).where(s.last_at < cutoff).limit(DELETE_BATCH)
            deleted = conn.execute(sa.delete(prediction_segments).where(s.id.in_(ids))).rowcount
        done += deleted
        if deleted < DELETE_BATCH:
            break
    limit_us = _us(cutoff)
    with engine.connect() as conn:
        across = sa.select(s.id).where(s.first_at < cutoff, s.last_at >= cutoff)
        straddling = list(conn.execute(across).scalars())
    for sid in straddling:
        with engine.begin() as conn:
            found = conn.execute(sa.select(s.model_name, s.columns).where(s.id == sid)).first()
            if found is None:
                continue
            n, columns = decode(bytes(found.columns))
            kept = [r for r in rows_of(columns, n) if r[1] >= limit_us]
            conn.execute(sa.delete(prediction_segments).where(s.id == sid))
            if kept:
                store(conn, found.model_name, kept)  # type: ignore[arg-type]
        done += 1
    return done


COMPACT_ROWS = 1024  # a segment with fewer rows is worth merging with its neighbours
REWRITE_ROWS = 4096  # rows of JSON text rewritten per transaction (and per segment)


@dataclass(frozen=True)
class Compacted:
    """What `compact` did: JSON rows rewritten into segments, small segments merged, and the
    segments of the log afterwards."""

    rewritten_rows: int
    merged_segments: int
    segments: int


def compact(engine: sa.Engine, model_name: str | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> Compacted:
    """Rewrite the log's rows still in JSON text (logged before the columnar log) into segments,
    REWRITE_ROWS per transaction, and merge small segments into ones of about COMPACT_ROWS.
    Safe beside running servers: each step is its own transaction, a merge that races another
    writer rolls back and leaves its segments as they were. `progress(stage, done, total)`."""
    say = progress or (lambda stage, done, total: None)
    rewritten = _rewrite_json(engine, model_name, say)
    merged = 0
    groups = _small_groups(engine, model_name)
    for done, group in enumerate(groups, 1):
        try:
            with engine.begin() as conn:
                if merge(conn, group) is not None:
                    merged += len(group)
        except SegmentsMoved:
            pass  # a server's sink merged some of them meanwhile: left to the next run
        say("merge", done, len(groups))
    s = prediction_segments.c
    count = sa.select(sa.func.count()).select_from(prediction_segments)
    if model_name is not None:
        count = count.where(s.model_name == model_name)
    with engine.connect() as conn:
        return Compacted(rewritten, merged, conn.execute(count).scalar_one())


def _rewrite_json(engine: sa.Engine, model_name: str | None, say: Callable[[str, int, int], None]) -> int:
    p = predictions.c
    legacy = p.inputs != ""
    where = [legacy] if model_name is None else [legacy, p.model_name == model_name]
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(predictions).where(*where)).scalar_one()
    rewritten = 0
    while True:
        with engine.begin() as conn:
            found = conn.execute(sa.select(p.id, p.created_at, p.model_name, p.model_version, p.probability,
                                           p.value, p.label, p.inputs, p.meta)
                                 .where(*where).order_by(p.id).limit(REWRITE_ROWS)).all()
            if not found:
                return rewritten
            by_model: dict[str, list[LogRow]] = {}
            for r in found:
                by_model.setdefault(r.model_name, []).append(
                    (r.id, _us(r.created_at), r.model_version, r.probability, r.value, r.label,
                     orjson.loads(r.inputs), orjson.loads(r.meta) if r.meta else None))
            for name, rows in by_model.items():
                store(conn, name, rows)
            conn.execute(sa.update(predictions).where(p.id.in_([r.id for r in found]), legacy)
                         .values(inputs="", meta=None))
        rewritten += len(found)
        say("rewrite", rewritten, total)


def _small_groups(engine: sa.Engine, model_name: str | None) -> list[list[int]]:
    """The small segments in runs of one model that add up to about COMPACT_ROWS rows."""
    s = prediction_segments.c
    query = sa.select(s.model_name, s.id, s.rows).where(s.rows < COMPACT_ROWS)
    if model_name is not None:
        query = query.where(s.model_name == model_name)
    with engine.connect() as conn:
        small = conn.execute(query.order_by(s.model_name, s.first_id)).all()
    groups: list[list[int]] = []
    current: list[int] = []
    size, last_model = 0, None
    for name, sid, n in small:
        if name != last_model or size >= COMPACT_ROWS:
            groups.append(current)
            current, size, last_model = [], 0, name
        current.append(sid)
        size += n
    groups.append(current)
    return [g for g in groups if len(g) > 1]


def _us(moment: datetime) -> int:
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond
