"""Reading the prediction log back: a window's rows as DataFrames, from its segments (the columns
of each log-sink batch) and from the rows logged before the columnar log (JSON text per row).

Every reader of the log's inputs and meta goes through `read_log`: monitoring (a window by time,
by event time, or the latest N), learning from feedback (the labelled rows by id) and exports.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import pandas as pd
import sqlalchemy as sa

from flywheel.state import segments as seg
from flywheel.state.db import prediction_segments, predictions

BASE_COLUMNS = ["id", "created_at", "model_version", "probability", "value", "label"]
_NAMES = dict(zip(seg.BASE, ["id", "t_us", "model_version", "probability", "value", "label"], strict=True))
_LEGACY = predictions.c.inputs != ""


@dataclass(frozen=True)
class LogRows:
    """Logged predictions, one row each, sorted by id: `base` (id, created_at in UTC,
    model_version, probability, value, label), `inputs` (one column per input) and `meta` (one
    column per meta key), all three on the same positions."""

    base: pd.DataFrame
    inputs: pd.DataFrame
    meta: pd.DataFrame

    def __len__(self) -> int:
        return len(self.base)

    def meta_values(self, key: str) -> list[Any]:
        """`meta[key]` of every row (None where absent)."""
        if key not in self.meta.columns:
            return [None] * len(self)
        return [None if _missing(v) else v for v in self.meta[key].tolist()]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _us(moment: datetime) -> int:
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def read_log(conn: sa.Connection, model_name: str, *, start: datetime | None = None,
             end: datetime | None = None, last: int | None = None,
             ids: Sequence[int] | None = None, inputs: Collection[str] | None = None,
             meta: Collection[str] | None = None, categories: bool = False,
             cache: dict[int, bytes] | None = None) -> LogRows:
    """The model's logged rows served in [start, end) (either bound may be left out), or the
    `last` N of them (by id), or those whose id is among `ids` (within [start, end] when given:
    the bounds only narrow the search). `inputs` and `meta` name the columns and keys to read
    (default: all); a reader that needs a few of them decodes only those. `categories`: texts
    that repeat as pandas Categoricals (else objects, as JSON would give them). `cache`: the
    segments fetched so far, by id (a segment never changes: a merge or a prune writes a new
    one), kept by a caller that reads overlapping windows, so each is fetched once."""
    if ids is not None and not len(ids):
        return _empty()
    cache = {} if cache is None else cache
    if last is not None:
        blobs = _latest_segments(conn, model_name, last, cache)
        legacy = _legacy(conn, model_name, None, None, None, last)
    else:
        blobs = _segments_between(conn, model_name, start, end, ids, cache)
        legacy = _legacy(conn, model_name, start, end, ids, None)
    wanted = _wanted(inputs, meta)
    parts = [seg.decode(b, wanted) for b in blobs]
    if legacy:
        parts.append(seg.decode(seg.encode(seg.columns_of(legacy)), wanted))
    rows = _assemble(parts, categories)
    if rows is None:
        return _empty()
    base, input_frame, meta_frame = rows
    keep = np.ones(len(base), dtype=bool)
    t_us = base["t_us"].to_numpy()
    if last is None and start is not None:
        keep &= t_us >= _us(start)
    if last is None and end is not None:
        keep &= t_us < _us(end) if ids is None else t_us <= _us(end)
    if ids is not None:
        keep &= np.isin(base["id"].to_numpy(), np.asarray(list(ids), dtype=np.int64))
    picked = np.flatnonzero(keep)
    found_ids = base["id"].to_numpy()[picked]
    if len(found_ids) > 1 and not (np.diff(found_ids) > 0).all():
        picked = picked[np.argsort(found_ids, kind="stable")]
    if last is not None:
        picked = picked[-last:] if last else picked[:0]
    return _rows(base, input_frame, meta_frame, picked)


def _wanted(inputs: Collection[str] | None, meta: Collection[str] | None) -> Callable[[str], bool] | None:
    if inputs is None and meta is None:
        return None
    names = {*seg.BASE}
    names |= {seg.INPUT + k for k in inputs or ()} | {seg.META + k for k in meta or ()}

    def wanted(name: str) -> bool:
        if name in names:
            return True
        return (inputs is None and name.startswith(seg.INPUT)) or (meta is None and name.startswith(seg.META))

    return wanted


def _segments_between(conn: sa.Connection, model_name: str, start: datetime | None, end: datetime | None,
                      ids: Sequence[int] | None, cache: dict[int, bytes]) -> list[bytes]:
    s = prediction_segments.c
    query = sa.select(s.id).where(s.model_name == model_name)
    if start is not None:
        query = query.where(s.last_at >= start)
    if end is not None:
        query = query.where(s.first_at <= end)
    if ids is not None:
        query = query.where(s.last_id >= int(min(ids)), s.first_id <= int(max(ids)))
    return _fetch(conn, lambda: list(conn.execute(query.order_by(s.first_id)).scalars()), cache)


def _empty() -> LogRows:
    base = pd.DataFrame({c: pd.Series(dtype=float) for c in BASE_COLUMNS})
    base["created_at"] = pd.Series(dtype="datetime64[ns, UTC]")
    return LogRows(base, pd.DataFrame(), pd.DataFrame())


def _rows(base: pd.DataFrame, inputs: pd.DataFrame, meta: pd.DataFrame, picked: np.ndarray) -> LogRows:
    """The rows at positions `picked`: a slice when they are one run in order (the usual case: a
    window's segments come in id order), a gather of every column otherwise."""
    run = len(picked) > 0 and picked[-1] - picked[0] == len(picked) - 1 and (np.diff(picked) == 1).all()
    frames = [base, inputs, meta]
    if not (run and picked[0] == 0 and len(picked) == len(base)):  # else: every row, as assembled
        where: Any = slice(int(picked[0]), int(picked[-1]) + 1) if run else picked
        # A shallow copy: a frame of its own (not linked to the assembled one as a pandas "slice"),
        # its columns still the slice's; positions from 0 without reset_index's copy.
        frames = [f.iloc[where].copy(deep=False) for f in frames]
        for f in frames:
            f.index = pd.RangeIndex(len(f))
    out = frames[0]
    created = pd.to_datetime(out.pop("t_us").to_numpy(dtype=np.int64), unit="us", utc=True)
    out.insert(1, "created_at", created)
    return LogRows(out, frames[1], frames[2])


def _latest_segments(conn: sa.Connection, model_name: str, last: int, cache: dict[int, bytes]) -> list[bytes]:
    """The segments that hold the model's `last` highest ids: newest first by their last id until
    they hold `last` rows, and any other whose last id reaches above the lowest id taken."""
    if last <= 0:
        return []
    return _fetch(conn, lambda: _latest_ids(conn, model_name, last), cache)


def _latest_ids(conn: sa.Connection, model_name: str, last: int) -> list[int]:
    s = prediction_segments.c
    found = conn.execute(sa.select(s.id, s.rows, s.first_id, s.last_id)
                         .where(s.model_name == model_name).order_by(s.last_id.desc()))
    chosen: list[int] = []
    rows, lowest = 0, None
    for sid, n, first_id, last_id in found:
        if rows >= last and lowest is not None and last_id < lowest:
            break
        chosen.append(sid)
        rows += n
        lowest = first_id if lowest is None else min(lowest, first_id)
    found.close()
    return chosen[::-1]  # oldest first: the rows then come in id order, one slice of them


def _fetch(conn: sa.Connection, segment_ids: Callable[[], list[int]], cache: dict[int, bytes],
           tries: int = 5) -> list[bytes]:
    """The segments whose ids `segment_ids()` gives, those not in `cache` fetched (and added).
    A sink's merge or a prune between the two queries removes segments (their rows move to a
    new one): the ids are then chosen again, so no row is silently left out."""
    s = prediction_segments.c
    for _ in range(tries):
        chosen = segment_ids()
        missing = [i for i in chosen if i not in cache]
        for at in range(0, len(missing), 500):
            cache.update(_blobs(conn, sa.select(s.id, s.columns).where(s.id.in_(missing[at:at + 500]))))
        if all(i in cache for i in chosen):
            return [cache[i] for i in chosen]
    raise RuntimeError(f"the prediction log's segments kept changing while being read ({tries} tries)")


def _blobs(conn: sa.Connection, query: sa.Select[Any]) -> dict[int, bytes]:
    """{id: bytes} of `query`'s (id, bytes) rows. On PostgreSQL through a binary cursor: psycopg
    otherwise fetches bytea as hex text and decodes it (0.9-1.1 s of a 1M-row window's 164 MB,
    against 0.33-0.36 s in binary)."""
    if conn.dialect.name != "postgresql":
        return {int(i): bytes(b) for i, b in conn.execute(query)}
    compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    cursor = conn.connection.dbapi_connection.cursor(binary=True)  # type: ignore[union-attr]
    try:
        cursor.execute(str(compiled), compiled.params)
        return {int(i): bytes(b) for i, b in cursor.fetchall()}
    finally:
        cursor.close()


def _legacy(conn: sa.Connection, model_name: str, start: datetime | None, end: datetime | None,
            ids: Sequence[int] | None, last: int | None) -> list[tuple[Any, ...]]:
    """Rows logged before the columnar log (inputs as JSON text), as `segments.columns_of` rows."""
    p = predictions.c
    query = sa.select(p.id, p.created_at, p.model_version, p.probability, p.value, p.label,
                      p.inputs, p.meta).where(p.model_name == model_name, _LEGACY)
    if last is not None:
        query = query.order_by(p.id.desc()).limit(last)
    else:
        if start is not None:
            query = query.where(p.created_at >= start)
        if end is not None:
            query = query.where(p.created_at <= end)
        if ids is not None:
            query = query.where(p.id.between(int(min(ids)), int(max(ids))))
    return [(r.id, _us(r.created_at), r.model_version, r.probability, r.value, r.label,
             orjson.loads(r.inputs), orjson.loads(r.meta) if r.meta else None)
            for r in conn.execute(query)]


def _assemble(parts: list[tuple[int, dict[str, tuple[str, Any]]]], categories: bool = False) \
        -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame] | None:
    """One column per name over every segment (a segment without it: missing values)."""
    parts = [p for p in parts if p[0]]
    if not parts:
        return None
    sizes = [n for n, _ in parts]
    names = list(dict.fromkeys(name for _, cols in parts for name in cols))
    columns = {name: _column([cols.get(name) for _, cols in parts], sizes,
                             categories and not name.startswith(seg.META) and name not in seg.BASE)
               for name in names}
    # copy=False: one block per column, as decoded (pandas would otherwise copy every column
    # into one 2-D block per dtype, 0.2-0.3 s of a 1M-row window)
    base = pd.DataFrame({_NAMES[name]: columns.get(name, [None] * sum(sizes)) for name in seg.BASE},
                        copy=False)
    base["id"] = base["id"].astype(np.int64)
    base["t_us"] = base["t_us"].astype(np.int64)
    inputs = pd.DataFrame({n[len(seg.INPUT):]: v for n, v in columns.items() if n.startswith(seg.INPUT)},
                          copy=False)
    meta = pd.DataFrame({n[len(seg.META):]: v for n, v in columns.items() if n.startswith(seg.META)},
                        copy=False)
    total = sum(sizes)
    if inputs.empty:
        inputs = pd.DataFrame(index=range(total))
    if meta.empty:
        meta = pd.DataFrame(index=range(total))
    return base, inputs, meta


def _column(parts: list[tuple[str, Any] | None], sizes: list[int], categories: bool = False) -> Any:
    # a segment where every value was missing holds an empty dictionary: no kind of its own
    parts = [None if p is not None and p[0] == "dict" and not p[1][0] else p for p in parts]
    kinds = {p[0] for p in parts if p is not None}
    if kinds <= {"i8"} and None not in parts:
        return np.concatenate([p[1] for p in parts if p is not None])
    if kinds <= {"i8", "f8"}:
        return np.concatenate([np.full(n, np.nan) if p is None else p[1].astype(np.float64, copy=False)
                               for p, n in zip(parts, sizes, strict=True)])
    if kinds == {"dict"}:
        return _texts([None if p is None else p[1] for p in parts], sizes, categories)
    values: list[Any] = []  # mixed kinds: the values themselves, typed by pandas as from JSON
    for p, n in zip(parts, sizes, strict=True):
        values += [None] * n if p is None else seg.values_of(*p)
    return values


def _texts(parts: Sequence[tuple[list[str], np.ndarray] | None], sizes: list[int],
           categories: bool = False) -> Any:
    """Dictionary-coded texts of every segment: an object array (None where missing), one take
    of each segment's codes from its own dictionary (no lookup per row or per distinct text).
    `categories`: a pandas Categorical instead when the texts repeat (fewer distinct than a
    quarter of the rows): what DuckDB and pandas then handle by code, not by string."""
    if categories:
        coded = _categorical(parts, sizes)
        if coded is not None:
            return coded
    out = np.empty(sum(sizes), dtype=object)
    at = 0
    for part, n in zip(parts, sizes, strict=True):
        if part is not None:
            words, codes = part
            table = np.empty(len(words) + 1, dtype=object)
            table[1:] = words
            out[at:at + n] = table[codes]
        at += n
    return out


def _categorical(parts: Sequence[tuple[list[str], np.ndarray] | None], sizes: list[int]) -> Any:
    every = [w for p in parts if p is not None for w in p[0]]
    codes, uniques = pd.factorize(np.array(every, dtype=object))
    if len(uniques) * 4 > sum(sizes):
        return None
    out = np.empty(sum(sizes), dtype=np.int32)
    at = start = 0
    for part, n in zip(parts, sizes, strict=True):
        if part is None:
            out[at:at + n] = -1
        else:
            words, local = part
            table = np.concatenate([np.array([-1], dtype=np.int32), codes[start:start + len(words)]])
            out[at:at + n] = table[local]
            start += len(words)
        at += n
    return pd.Categorical.from_codes(out, categories=pd.Index(uniques, dtype=object))  # type: ignore[arg-type]
