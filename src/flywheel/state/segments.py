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

import operator
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
# A column's part of one segment, decoded: an array (i8, f8), (texts, codes) (dict), or a list.
Part = Any


_NONE = type(None)


def encode_column(values: Sequence[Any]) -> tuple[str, bytes]:
    """A column's kind and bytes (see `typed_column`)."""
    kind, part = typed_column(values)
    return kind, part_bytes(kind, part)


def typed_column(values: Sequence[Any]) -> tuple[str, Part]:
    """A column's kind and its part, as `decode` gives them back; the values' types are read
    once, in C (`map(type, ...)`): the log sink spends its core here, beside the server."""
    types = set(map(type, values))
    missing = _NONE in types
    types.discard(_NONE)
    if types == {int} and not missing:
        try:
            return "i8", np.asarray(values, dtype="<i8")
        except OverflowError:  # beyond int64
            return "json", list(values)
    if types and types <= {int, float}:
        try:
            data = np.array([np.nan if v is None else v for v in values] if missing else values, dtype="<f8")
        except OverflowError:
            return "json", list(values)
        if int in types and (np.abs(data) > 2**53).any():  # an integer a float cannot hold exactly
            return "json", list(values)
        return "f8", data
    if types <= {str}:  # texts, or every value missing: a dictionary and a code per row
        index = dict.fromkeys(values)
        index.pop(None, None)
        words = list(index)
        code = {w: i for i, w in enumerate(words, 1)}
        code[None] = 0  # type: ignore[index]
        return "dict", (words, np.fromiter(map(code.__getitem__, values), dtype="<i4", count=len(values)))
    return "json", list(values)


def part_bytes(kind: str, part: Part) -> bytes:
    if kind in ("i8", "f8"):
        return bytes(np.asarray(part, dtype=f"<{kind}").tobytes())
    if kind == "dict":
        words, codes = part
        text = orjson.dumps(words)
        return _U32.pack(len(text)) + text + np.asarray(codes, dtype="<i4").tobytes()
    return orjson.dumps(list(part))


def encode(columns: Mapping[str, Sequence[Any]], pause: Callable[[], None] | None = None) -> bytes:
    """One segment from equally long columns (values as JSON would hold them). `pause` is called
    between columns (the log sink yields its core there: it shares one with the server)."""
    return encode_parts({name: _typed(values, pause) for name, values in columns.items()})


def _typed(values: Sequence[Any], pause: Callable[[], None] | None) -> tuple[str, Part]:
    typed = typed_column(values)
    if pause is not None:
        pause()
    return typed


def encode_parts(columns: Mapping[str, tuple[str, Part]]) -> bytes:
    """One segment from typed columns of equal length (`typed_column`'s or `decode`'s parts)."""
    spec: list[list[Any]] = []
    parts: list[bytes] = []
    offset = 0
    rows = None
    for name, (kind, part) in columns.items():
        n = len(part[1]) if kind == "dict" else len(part)
        if rows is None:
            rows = n
        elif n != rows:
            raise ValueError(f"column {name!r} has {n} values, not {rows}")
        data = part_bytes(kind, part)
        spec.append([name, kind, offset, len(data)])
        parts.append(data)
        offset += len(data)
    header = orjson.dumps({"v": FORMAT, "rows": rows or 0, "columns": spec})
    return _U32.pack(len(header)) + header + b"".join(parts)


def concat_parts(parts: Sequence[tuple[str, Part] | None], sizes: Sequence[int]) -> tuple[str, Part]:
    """One column from the same column of several segments (None: a segment without it, its
    values missing), as `typed_column` would type the values together, without a Python step
    per value where the kinds allow: numbers are concatenated, dictionaries merged and their
    codes remapped by one take per segment."""
    parts = [None if p is not None and p[0] == "dict" and not p[1][0] else p for p in parts]
    kinds = {p[0] for p in parts if p is not None}
    if kinds == {"i8"} and None not in parts:
        return "i8", np.concatenate([p[1] for p in parts if p is not None])
    if kinds and kinds <= {"i8", "f8"} and not any(
            p is not None and p[0] == "i8" and len(p[1]) and np.abs(p[1]).max() > 2**53 for p in parts):
        return "f8", np.concatenate([np.full(n, np.nan) if p is None else p[1].astype("<f8")
                                     for p, n in zip(parts, sizes, strict=True)])
    if kinds <= {"dict"}:  # texts, or nothing but missing values
        index: dict[str, int] = {}
        codes = []
        for p, n in zip(parts, sizes, strict=True):
            if p is None:
                codes.append(np.zeros(n, dtype="<i4"))
                continue
            words, local = p[1]
            table = np.array([0, *(index.setdefault(w, len(index) + 1) for w in words)], dtype="<i4")
            codes.append(table[local])
        return "dict", (list(index), np.concatenate(codes) if codes else np.zeros(0, dtype="<i4"))
    values: list[Any] = []
    for p, n in zip(parts, sizes, strict=True):
        values += [None] * n if p is None else values_of(*p)
    return typed_column(values)


def take_part(kind: str, part: Part, keep: np.ndarray) -> Part:
    """The rows of a decoded part where the boolean mask `keep` is true."""
    if kind in ("i8", "f8"):
        return part[keep]
    if kind == "dict":
        return part[0], part[1][keep]
    return [v for v, k in zip(part, keep.tolist(), strict=True) if k]


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
    return columns_from(*zip(*rows, strict=True))


def columns_from(ids: Sequence[int], times: Sequence[int], versions: Sequence[int],
                 probabilities: Sequence[Any], values: Sequence[Any], labels: Sequence[Any],
                 inputs: Sequence[Mapping[str, Any]], metas: Sequence[Mapping[str, Any] | None]) \
        -> dict[str, list[Any]]:
    """`columns_of` from the rows' fields, each already a column (the log sink's batch)."""
    out = {name: list(v) for name, v in zip(BASE, (ids, times, versions, probabilities, values, labels),
                                            strict=True)}
    out.update({INPUT + k: v for k, v in _keyed(list(inputs)).items()})
    out.update({META + k: v for k, v in _keyed(list(metas)).items()})
    return out


def _keyed(records: list[Mapping[str, Any] | None]) -> dict[str, list[Any]]:
    """One list per key over the records. The usual batch (every record with the same keys:
    validated requests) is transposed in C; any other key by key."""
    same = _transposed(records)
    if same is not None:
        return same
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


def _transposed(records: list[Any]) -> dict[str, list[Any]] | None:
    """The columns when every record has the first one's keys (one itemgetter per record, then
    zip: no Python step per value), else None."""
    first = records[0]
    if not first or None in records:
        return None
    keys = tuple(first)
    if set(map(len, records)) != {len(keys)}:
        return None
    try:
        picked = list(map(operator.itemgetter(*keys), records))
    except KeyError:  # as many keys, other names
        return None
    if len(keys) == 1:
        return {keys[0]: picked}
    return {k: list(v) for k, v in zip(keys, zip(*picked, strict=True), strict=True)}


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


def store(conn: sa.Connection, model_name: str, rows: Sequence[LogRow],
          pause: Callable[[], None] | None = None) -> tuple[int, int]:
    """One segment of `rows` (ids already given), in the caller's transaction: (its id, rows)."""
    return store_columns(conn, model_name, columns_of(rows), pause)


def store_columns(conn: sa.Connection, model_name: str, columns: Mapping[str, Sequence[Any]],
                  pause: Callable[[], None] | None = None) -> tuple[int, int]:
    """One segment of `columns` (as `columns_of` makes them), in the caller's transaction."""
    return _store_parts(conn, model_name, {name: _typed(values, pause) for name, values in columns.items()})


def _store_parts(conn: sa.Connection, model_name: str,
                 parts: Mapping[str, tuple[str, Part]]) -> tuple[int, int]:
    ids, times = np.asarray(parts[ID][1], dtype=np.int64), np.asarray(parts[TIME][1], dtype=np.int64)
    found = conn.execute(sa.insert(prediction_segments).values(
        model_name=model_name, rows=len(ids), first_id=int(ids.min()), last_id=int(ids.max()),
        first_at=_moment(int(times.min())), last_at=_moment(int(times.max())), columns=encode_parts(parts))
        .returning(prediction_segments.c.id)).scalar_one()
    return int(found), len(ids)


def merge(conn: sa.Connection, segment_ids: Sequence[int],
          pause: Callable[[], None] | None = None) -> tuple[int, int] | None:
    """The segments `segment_ids` (of one model) rewritten as one, in the caller's transaction:
    (the new segment's id, its rows); None when fewer than two of them are still there. Raises
    `SegmentsMoved` when another writer removed one between the read and the delete (a prune):
    the caller's transaction must roll back, or its rows would be stored twice."""
    s = prediction_segments.c
    found = conn.execute(sa.select(s.id, s.model_name, s.columns).where(s.id.in_(list(segment_ids)))
                         .order_by(s.first_id)).all()
    if len(found) < 2 or len({r.model_name for r in found}) != 1:
        return None
    decoded = [decode(bytes(r.columns)) for r in found]
    sizes = [n for n, _ in decoded]
    names = list(dict.fromkeys(name for _, columns in decoded for name in columns))
    merged = {}
    for name in names:
        merged[name] = concat_parts([columns.get(name) for _, columns in decoded], sizes)
        if pause is not None:
            pause()
    deleted = conn.execute(sa.delete(prediction_segments).where(s.id.in_([r.id for r in found]))).rowcount
    if deleted != len(found):
        raise SegmentsMoved(f"{len(found) - deleted} of the segments to merge were removed meanwhile")
    return _store_parts(conn, found[0].model_name, merged)


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
            _, columns = decode(bytes(found.columns))
            keep = np.asarray(columns[TIME][1]) >= limit_us
            conn.execute(sa.delete(prediction_segments).where(s.id == sid))
            if keep.any():
                kept = {name: (kind, take_part(kind, part, keep)) for name, (kind, part) in columns.items()}
                _store_parts(conn, found.model_name, kept)
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
