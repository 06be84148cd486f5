"""Reading a window of the prediction log back, by how its inputs are stored: one JSON text per
prediction (today's `predictions.inputs`) against one row per log-sink batch holding that batch's
columns as a blob, on SQLite and on PostgreSQL, in one run. A measurement for choosing the log's
columnar path, not a product path.

The rows are SBA-like (12 numbers, 4 texts, some missing); the same rows go into both designs.
Timed, caches warm, best of `--repeat`:
- `json rows`: SELECT every row's inputs, parse each with orjson, build a DataFrame (what
  `monitoring.monitor.read_window` does with them today);
- `batch blobs`: SELECT the window's batches, decode each blob into NumPy arrays (numbers as
  float64 with a null mask, texts as one JSON list per column), concatenate, build a DataFrame.
  Writing a blob needs only NumPy and orjson: the slim serving image has both.
Printed: seconds per window, µs per row, and blobs / JSON as a ratio.

    .venv/bin/python benchmarks/log_columnar.py [--rows 100000 1000000] [--batch 128] [--repeat 3]

PostgreSQL: FLYWHEEL_BENCH_PG (default postgresql://postgres@127.0.0.1:5432/postgres), a database
of its own created and dropped; skipped with a line when no server answers.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import struct
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import sqlalchemy as sa

ADMIN = os.environ.get("FLYWHEEL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
NUMBERS = ["term", "no_emp", "create_job", "retained_job", "gr_appv", "sba_appv", "disbursement_gross",
           "urban_rural", "new_exist", "franchise_code", "approval_fy", "naics_sector"]
TEXTS = ["state", "bank_state", "low_doc", "rev_line_cr"]


def make_rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Columns of `n` predictions' inputs; about 2% of each number and text missing."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name in NUMBERS:
        values = rng.lognormal(3, 1.5, n).round(2)
        values[rng.random(n) < 0.02] = np.nan
        out[name] = values
    states = np.array(["CA", "TX", "NY", "FL", "IL", "OH", "PA", "WA", "GA", "NC"], dtype=object)
    for name in TEXTS:
        values = states[rng.integers(0, len(states), n)]
        values[rng.random(n) < 0.02] = None
        out[name] = values
    return out


def json_texts(cols: dict[str, np.ndarray]) -> Iterator[bytes]:
    n = len(next(iter(cols.values())))
    for i in range(n):
        row = {k: (None if (isinstance(v[i], float) and v[i] != v[i]) else v[i]) for k, v in cols.items()}
        yield orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY)


# ---- one blob per batch ------------------------------------------------------------------------
# layout: u32 header length, header (orjson: rows, [[name, kind, offset, length], ...]), buffers.
# kind "f8": float64 values, NaN for missing; kind "json": one orjson list of str|None.

def encode_batch(cols: dict[str, np.ndarray], start: int, stop: int) -> bytes:
    parts: list[bytes] = []
    spec: list[list[Any]] = []
    offset = 0
    for name, values in cols.items():
        piece = values[start:stop]
        if piece.dtype.kind == "f":
            data = np.ascontiguousarray(piece, dtype="<f8").tobytes()
            kind = "f8"
        elif DICTIONARY:
            # the batch's distinct values once (None first, code 0), then an int32 code per row
            index: dict[Any, int] = {None: 0}
            codes = np.fromiter((index.setdefault(v, len(index)) for v in piece.tolist()), dtype="<i4",
                                count=len(piece))
            words = orjson.dumps(list(index)[1:])
            data = struct.pack("<I", len(words)) + words + codes.tobytes()
            kind = "dict"
        else:
            data = orjson.dumps(piece.tolist())
            kind = "json"
        spec.append([name, kind, offset, len(data)])
        parts.append(data)
        offset += len(data)
    header = orjson.dumps({"rows": stop - start, "columns": spec})
    return struct.pack("<I", len(header)) + header + b"".join(parts)


DICTIONARY = False  # texts as per-batch dictionaries and int32 codes (--dictionary)


def decode_batches(blobs: list[bytes]) -> pd.DataFrame:
    columns: dict[str, list[Any]] = {}
    kinds: dict[str, str] = {}
    for blob in blobs:
        size = struct.unpack_from("<I", blob)[0]
        header = orjson.loads(blob[4:4 + size])
        body = memoryview(blob)[4 + size:]
        for name, kind, offset, length in header["columns"]:
            chunk = body[offset:offset + length]
            if kind == "f8":
                part: Any = np.frombuffer(chunk, dtype="<f8")
            elif kind == "dict":
                words = struct.unpack_from("<I", chunk)[0]
                part = (orjson.loads(chunk[4:4 + words]), np.frombuffer(chunk[4 + words:], dtype="<i4"))
            else:
                part = orjson.loads(chunk)
            columns.setdefault(name, []).append(part)
            kinds[name] = kind
    return pd.DataFrame({name: _column(kinds[name], parts) for name, parts in columns.items()})


def _column(kind: str, parts: list[Any]) -> Any:
    if kind == "f8":
        return np.concatenate(parts)
    if kind == "json":
        return np.array([x for p in parts for x in p], dtype=object)
    # one dictionary for the window; each batch's codes mapped onto it with one take
    words: dict[str, int] = {}
    mapped = []
    for batch_words, codes in parts:
        remap = np.fromiter((words.setdefault(w, len(words)) for w in batch_words), dtype="<i4",
                            count=len(batch_words))
        mapped.append(np.concatenate([np.array([-1], dtype="<i4"), remap])[codes])
    return pd.Categorical.from_codes(np.concatenate(mapped), categories=list(words))


# ---- the two stores ----------------------------------------------------------------------------

def fill(engine: sa.Engine, cols: dict[str, np.ndarray], batch: int) -> None:
    n = len(next(iter(cols.values())))
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE rows_json (id INTEGER PRIMARY KEY, inputs TEXT NOT NULL)"))
        conn.execute(sa.text("CREATE TABLE batches (id INTEGER PRIMARY KEY, first_id INTEGER NOT NULL, "
                             "rows INTEGER NOT NULL, columns BYTEA NOT NULL)".replace(
                                 "BYTEA", "BYTEA" if engine.dialect.name == "postgresql" else "BLOB")))
    step = 50_000
    for start in range(0, n, step):
        stop = min(n, start + step)
        texts = list(json_texts({k: v[start:stop] for k, v in cols.items()}))
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO rows_json (id, inputs) VALUES (:id, :inputs)"),
                         [{"id": start + i, "inputs": t.decode()} for i, t in enumerate(texts)])
    blobs = [{"id": b, "first_id": s, "rows": min(batch, n - s),
              "columns": encode_batch(cols, s, min(n, s + batch))} for b, s in enumerate(range(0, n, batch))]
    with engine.begin() as conn:
        for i in range(0, len(blobs), 2_000):
            conn.execute(sa.text("INSERT INTO batches (id, first_id, rows, columns) "
                                 "VALUES (:id, :first_id, :rows, :columns)"), blobs[i:i + 2_000])


def read_json(engine: sa.Engine) -> pd.DataFrame:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT inputs FROM rows_json ORDER BY id")).all()
    return pd.DataFrame.from_records([orjson.loads(r.inputs) for r in rows])


def read_blobs(engine: sa.Engine) -> pd.DataFrame:
    with engine.connect() as conn:
        blobs = [bytes(r.columns) for r in conn.execute(sa.text("SELECT columns FROM batches ORDER BY id"))]
    return decode_batches(blobs)


def best(fn: Callable[[], pd.DataFrame], repeat: int) -> tuple[float, pd.DataFrame]:
    fn()  # warm the caches
    times, frame = [], pd.DataFrame()
    for _ in range(repeat):
        started = time.perf_counter()
        frame = fn()
        times.append(time.perf_counter() - started)
    return min(times), frame


def measure(label: str, engine: sa.Engine, n: int, batch: int, repeat: int) -> None:
    cols = make_rows(n)
    started = time.perf_counter()
    fill(engine, cols, batch)
    print(f"{label}, {n:,} rows: filled in {time.perf_counter() - started:.1f} s")
    t_json, a = best(lambda: read_json(engine), repeat)
    t_blob, b = best(lambda: read_blobs(engine), repeat)
    same = all(np.allclose(a[c].astype(float), b[c].astype(float), equal_nan=True) for c in NUMBERS) and \
        all((a[c].astype(object).fillna("∅") == b[c].astype(object).fillna("∅")).all() for c in TEXTS)
    print(f"  json rows   {t_json:7.2f} s  {t_json / n * 1e6:6.2f} µs/row")
    print(f"  batch blobs {t_blob:7.2f} s  {t_blob / n * 1e6:6.2f} µs/row   "
          f"blobs / json x{t_blob / t_json:.3f}   same frame: {same}")


def postgres() -> tuple[sa.Engine, Callable[[], None]] | None:
    name = f"flywheel_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
    except sa.exc.OperationalError as exc:
        print(f"PostgreSQL skipped: no server at {ADMIN} ({type(exc).__name__})")
        return None
    engine = sa.create_engine(ADMIN.rsplit("/", 1)[0] + f"/{name}")

    def drop() -> None:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE {name}"))

    return engine, drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--batch", type=int, default=128, help="rows per blob (serving.log.batch_size)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dictionary", action="store_true",
                        help="texts as per-batch dictionaries with int32 codes (read as a Categorical)")
    args = parser.parse_args()
    global DICTIONARY
    DICTIONARY = args.dictionary
    print(f"sqlite3 {sqlite3.sqlite_version}; rows per blob {args.batch}; texts "
          + ("dictionary-coded" if DICTIONARY else "as JSON lists"))
    for n in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            engine = sa.create_engine(f"sqlite:///{Path(tmp) / 'log.db'}")
            measure("SQLite", engine, n, args.batch, args.repeat)
            engine.dispose()
        found = postgres()
        if found:
            engine, drop = found
            try:
                measure("PostgreSQL", engine, n, args.batch, args.repeat)
            finally:
                drop()


if __name__ == "__main__":
    main()
