"""The source database: loading business rows into it and extracting a time window out of it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from flywheel.config import DataConfig, PerformanceWindowTarget
from flywheel.core.errors import FlywheelError
from flywheel.core.progress import Advance
from flywheel.data import spark as spark_engine
from flywheel.data.engine import make_engine
from flywheel.data.timecol import sql_bounds, to_timestamps

TARGET = "__target__"
LABEL_KNOWN_AT = "__label_known_at__"
FROM_FEEDBACK = "__from_feedback__"  # true on a row learnt from a label posted to /v1/feedback


class SourceError(FlywheelError):
    """The source database cannot give what the config asks for."""


class EmptyWindowError(SourceError):
    """No rows (or none with a known label) in the window: nothing may be trained on it."""


@dataclass(frozen=True)
class Snapshot:
    """An immutable extract of the source: a parquet file plus what it is and where it came from."""

    path: Path
    content_hash: str
    window_start: date
    window_end: date
    as_of: date
    rows: int
    immature_dropped: int
    # binary: the share of positive rows; regression: the mean target; multiclass: NaN
    positive_rate: float
    # Where the rows came from: "source" (the source table), "feedback" (served predictions
    # joined with the labels posted back) or "both"; and how many came from the feedback.
    origin: str = "source"
    feedback_rows: int = 0

    def frame(self) -> pd.DataFrame:
        return pd.read_parquet(self.path)

    @classmethod
    def load(cls, path: Path) -> Snapshot:
        """A snapshot written by `extract_window`, from its parquet path (the JSON lies beside it)."""
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise SourceError(f"snapshot {path} (or its .json) is missing; run the extract step again")
        meta = json.loads(meta_path.read_text())
        return cls(path=path, content_hash=meta["content_hash"],
                   window_start=date.fromisoformat(meta["window_start"]),
                   window_end=date.fromisoformat(meta["window_end"]),
                   as_of=date.fromisoformat(meta["as_of"]), rows=int(meta["rows"]),
                   immature_dropped=int(meta["immature_dropped"]),
                   positive_rate=float(meta["positive_rate"]),
                   origin=meta.get("origin", "source"), feedback_rows=int(meta.get("feedback_rows", 0)))

    def lineage(self) -> dict[str, str]:
        return {
            "data_hash": self.content_hash,
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "as_of": self.as_of.isoformat(),
            "rows": str(self.rows),
            "rows_from": self.origin,
            "feedback_rows": str(self.feedback_rows),
        }


def write_table(
    frame: pd.DataFrame,
    url: str,
    table: str,
    types: dict[str, sa.types.TypeEngine],
    index_columns: tuple[str, ...] = (),
    chunk_rows: int = 50_000,
    progress: Advance | None = None,
) -> int:
    """Replace `table` with `frame`, inserted in chunks inside one transaction."""
    engine = make_engine(url)
    meta = sa.MetaData()
    columns = [sa.Column(name, types[name]) for name in frame.columns]
    tbl = sa.Table(table, meta, *columns)
    for col in index_columns:
        sa.Index(f"ix_{table}_{col}", tbl.c[col])
    # NaN/NaT/pd.NA become SQL NULL; object dtype keeps ints as ints.
    records = frame.astype(object).mask(frame.isna(), None)
    sqlite = engine.dialect.name == "sqlite"
    with engine.begin() as conn:
        tbl.drop(conn, checkfirst=True)
        tbl.create(conn)
        total = len(records)
        for start in range(0, total, chunk_rows):
            chunk = records.iloc[start : start + chunk_rows]
            if sqlite:
                _insert_sqlite(conn, tbl, chunk)
            else:
                rows = chunk.to_dict("records")
                conn.execute(tbl.insert(), [{str(k): v for k, v in row.items()} for row in rows])
            if progress:
                progress(min(start + chunk_rows, total), total)
    engine.dispose()
    return len(frame)


def upsert_table(frame: pd.DataFrame, url: str, table: str, id_column: str,
                 types: dict[str, sa.types.TypeEngine], index_columns: tuple[str, ...] = (),
                 progress: Advance | None = None) -> tuple[int, int]:
    """Add `frame` to `table`, replacing the rows whose id it carries, in one transaction (the
    table is made when missing). Returns (rows added, rows replaced)."""
    engine = make_engine(url)
    try:
        existing = sa.Table(table, sa.MetaData(), autoload_with=engine)
    except sa.exc.NoSuchTableError:
        engine.dispose()
        return write_table(frame, url, table, types, index_columns, progress=progress), 0
    have, come = set(existing.c.keys()), set(frame.columns)
    if have != come:
        engine.dispose()
        raise SourceError(f"cannot append to '{table}': the file's columns differ from the table's "
                          f"(only in the file: {sorted(come - have) or 'none'}; only in the table: "
                          f"{sorted(have - come) or 'none'}); ingest without --append replaces it")
    if frame[id_column].isna().any() or frame[id_column].duplicated().any():
        engine.dispose()
        raise SourceError(f"cannot append: '{id_column}' (data.id_column) must be unique and non-null "
                          "in the file, since it says which rows to replace")
    numeric = isinstance(existing.c[id_column].type, sa.Integer)
    ids = [int(i) if numeric else str(i) for i in frame[id_column].tolist()]
    records = frame.astype(object).mask(frame.isna(), None)[list(existing.c.keys())]
    replaced = 0
    with engine.begin() as conn:
        for start in range(0, len(ids), 5000):
            gone = conn.execute(existing.delete().where(existing.c[id_column].in_(ids[start:start + 5000])))
            replaced += gone.rowcount or 0
        for start in range(0, len(records), 50_000):
            rows = records.iloc[start:start + 50_000].to_dict("records")
            conn.execute(existing.insert(), [{str(k): v for k, v in r.items()} for r in rows])
            if progress:
                progress(min(start + 50_000, len(records)), len(records))
    engine.dispose()
    return len(frame) - replaced, replaced


def _insert_sqlite(conn: sa.Connection, tbl: sa.Table, chunk: pd.DataFrame) -> None:
    """Tuples through the driver's executemany: a quarter of the time of SQLAlchemy's per-row
    bind processing (897k SBA rows: the demo's load). Dates and datetimes are written as the text
    SQLAlchemy's SQLite types write and read back."""
    values = []
    for name in chunk.columns:
        column = chunk[name].tolist()
        kind = tbl.c[str(name)].type
        if isinstance(kind, sa.DateTime):
            column = [None if v is None else v.strftime("%Y-%m-%d %H:%M:%S.%f") for v in column]
        elif isinstance(kind, sa.Date):
            column = [None if v is None else v.isoformat()[:10] for v in column]
        values.append(column)
    names = ", ".join(conn.dialect.identifier_preparer.quote(str(n)) for n in chunk.columns)
    marks = ", ".join("?" * len(chunk.columns))
    sql = f"INSERT INTO {conn.dialect.identifier_preparer.quote(tbl.name)} ({names}) VALUES ({marks})"
    conn.exec_driver_sql(sql, list(zip(*values, strict=True)))


def extract_window(
    url: str,
    data: DataConfig,
    columns: list[str],
    snapshot_dir: Path,
    window: tuple[date, date] | None = None,
    as_of: date | None = None,
) -> Snapshot:
    """Rows of the window whose label is known by `as_of`, with the target, saved as a snapshot.

    Never empty: a window with no rows, or none whose label is known yet, is an `EmptyWindowError`
    that says what the table holds."""
    start, end = window or (data.window.start, data.window.end)
    as_of = as_of or data.as_of or end
    frame, immature = read_labelled_window(url, data, columns, start, end, as_of, configured=window is None)
    return save_snapshot(frame, data, snapshot_dir, start, end, as_of, immature)


def read_labelled_window(url: str, data: DataConfig, columns: list[str], start: date, end: date,
                         as_of: date, configured: bool = False) -> tuple[pd.DataFrame, int]:
    """The source rows of [start, end) whose label is known by `as_of`, with the target and when it
    became known; and how many rows were left out because their label was not known yet."""
    engine = make_engine(url)
    try:
        tbl = _source_table(engine, data, columns)
        frame = _read_window(engine, tbl, data, _required_columns(data, columns), start, end)
        if frame.empty:
            raise EmptyWindowError(_empty_window_message(engine, tbl, data, start, end, configured))
    finally:
        engine.dispose()
    frame, immature = _attach_target(frame, data, as_of)
    if frame.empty:
        raise EmptyWindowError(
            f"{immature:,} rows of '{data.table}' in [{start}, {end}), but none has a label known by "
            f"{as_of} (data.as_of, or the clock of the run): move the window earlier or as_of later")
    return frame.reset_index(drop=True), immature


def _source_table(engine: sa.Engine, data: DataConfig, columns: list[str]) -> sa.Table:
    try:
        tbl = sa.Table(data.table, sa.MetaData(), autoload_with=engine)
    except sa.exc.NoSuchTableError:
        raise SourceError(
            f"table '{data.table}' not found in the source database {engine.url!r}; "
            "load it first with flywheel ingest (flywheel demo does this for the SBA example)"
        ) from None
    missing = [c for c in _required_columns(data, columns) if c not in tbl.c]
    if missing:
        raise SourceError(
            f"table '{data.table}' has no column(s) {', '.join(missing)}; "
            f"it has: {', '.join(tbl.c.keys())}"
        )
    return tbl


def _read_window(engine: sa.Engine, tbl: sa.Table, data: DataConfig, needed: list[str],
                 start: date, end: date) -> pd.DataFrame:
    """[start, end) on the time column, ordered by time then id, the time column as timestamps."""
    time_col = tbl.c[data.time_column]
    query = sa.select(*[tbl.c[c] for c in needed])
    bounds = sql_bounds(start, end, data)
    if bounds is not None:
        query = query.where(time_col >= bounds[0], time_col < bounds[1])
        query = query.order_by(time_col, tbl.c[data.id_column])
    if data.engine == "spark" and engine.dialect.name == "postgresql":
        frame = _read_with_spark(engine, tbl, data, query)
        frame[data.time_column] = to_timestamps(frame[data.time_column], data)
        frame = frame.sort_values([data.time_column, data.id_column], kind="stable").reset_index(drop=True)
    else:
        with engine.connect() as conn:
            frame = pd.read_sql(query, conn)
        frame[data.time_column] = to_timestamps(frame[data.time_column], data)
    if bounds is None:  # dates as text in a format SQL cannot compare: filter and order here
        when = frame[data.time_column]
        frame = frame.loc[(when >= pd.Timestamp(start)) & (when < pd.Timestamp(end))]
        frame = frame.sort_values([data.time_column, data.id_column], kind="stable")
    return frame


def _read_with_spark(engine: sa.Engine, tbl: sa.Table, data: DataConfig,
                     query: sa.Select[Any]) -> pd.DataFrame:
    """The window read by Spark over JDBC (in parallel slices of an integer id), returned to this
    process: the query is the SQLAlchemy path's own, compiled for PostgreSQL with its bounds."""
    sql = str(query.order_by(None).compile(engine, compile_kwargs={"literal_binds": True}))
    bounds = None
    if isinstance(tbl.c[data.id_column].type, sa.Integer):  # the slices' bounds: the window's ids
        window = query.order_by(None).subquery()
        with engine.connect() as conn:
            low, high = conn.execute(sa.select(sa.func.min(window.c[data.id_column]),
                                               sa.func.max(window.c[data.id_column]))).one()
        bounds = None if low is None else (int(low), int(high))
    return spark_engine.read_jdbc(data.spark, engine.url.render_as_string(hide_password=False), sql,
                                  data.id_column if bounds else None, bounds)


def latest_source_time(url: str, data: DataConfig) -> pd.Timestamp | None:
    """The end of the source table's latest time (a year's or a month's last day for those
    units), None for an empty or missing table."""
    engine = make_engine(url)
    try:
        if not sa.inspect(engine).has_table(data.table):
            return None
        column = sa.Table(data.table, sa.MetaData(), autoload_with=engine).c[data.time_column]
        with engine.connect() as conn:
            if data.time_unit == "text" and data.time_format:  # text in another order than ISO's
                values = pd.Series(conn.execute(sa.select(column).distinct()).scalars().all())
            else:
                values = pd.Series([conn.execute(sa.select(sa.func.max(column))).scalar()])
    finally:
        engine.dispose()
    values = values.dropna()
    if values.empty:
        return None
    start = to_timestamps(values, data).max()
    step = {"year": pd.DateOffset(years=1), "month": pd.DateOffset(months=1)}.get(data.time_unit)
    return start + step - pd.Timedelta(days=1) if step is not None else start


def _empty_window_message(engine: sa.Engine, tbl: sa.Table, data: DataConfig, start: date,
                          end: date, configured: bool) -> str:
    time_col = tbl.c[data.time_column]
    with engine.connect() as conn:
        rows, low, high = conn.execute(
            sa.select(sa.func.count(), sa.func.min(time_col), sa.func.max(time_col))).one()
    if not rows:
        return f"table '{data.table}' is empty: load rows first (flywheel ingest)"
    fix = ("set data.window inside that span" if configured else
           "a retrain's window ends at its clock (--at) and reaches back retraining.lookback_months")
    return (f"0 rows of '{data.table}' have {data.time_column} in [{start}, {end}); the table's "
            f"{rows:,} rows span {low} .. {high} (time_unit {data.time_unit}): {fix}")


def save_snapshot(frame: pd.DataFrame, data: DataConfig, snapshot_dir: Path, start: date, end: date,
                  as_of: date, immature: int, origin: str = "source", feedback_rows: int = 0) -> Snapshot:
    """Write labelled rows (with the target) as an immutable, content-hashed parquet snapshot."""
    content_hash = frame_hash(frame)
    snapshot_dir.mkdir(parents=True, exist_ok=True)
    path = snapshot_dir / f"{data.table}-{start}-{end}-{content_hash[:12]}.parquet"
    # Written aside and renamed: a reader (another step, another process) never sees half a file.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    frame.to_parquet(partial, index=False)
    os.replace(partial, path)
    snap = Snapshot(
        path=path,
        content_hash=content_hash,
        window_start=start,
        window_end=end,
        as_of=as_of,
        rows=len(frame),
        immature_dropped=immature,
        positive_rate=target_summary(frame[TARGET]),
        origin=origin,
        feedback_rows=feedback_rows,
    )
    meta = path.with_name(f".{path.stem}.{os.getpid()}.json.partial")
    meta.write_text(json.dumps(asdict(snap), default=str, indent=2))
    os.replace(meta, path.with_suffix(".json"))
    return snap


def target_summary(target: pd.Series) -> float:
    """The snapshot's one-number summary of its target (see `Snapshot.positive_rate`)."""
    if pd.api.types.is_numeric_dtype(target) and len(target):
        return float(target.mean())
    return float("nan")


def target_values(target: pd.Series, task: str, classes: list[str] | None = None) -> np.ndarray:
    """The model's y from a snapshot's target column: 0/1 (binary), the value (regression) or the
    index of the class in `classes` (multiclass; -1 for a class not among them)."""
    if task == "regression":
        return target.to_numpy(dtype=np.float64)
    if task == "multiclass":
        index = {c: i for i, c in enumerate(classes or [])}
        return np.array([index.get(str(v), -1) for v in target], dtype=np.int64)
    return target.to_numpy(dtype=np.int64)


def frame_hash(frame: pd.DataFrame) -> str:
    """A content hash of a frame that does not depend on the parquet writer's version."""
    digest = hashlib.sha256(json.dumps(list(frame.columns)).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def _required_columns(data: DataConfig, feature_columns: list[str]) -> list[str]:
    target_cols = (
        [data.target.event_column, data.target.event_time_column]
        if isinstance(data.target, PerformanceWindowTarget)
        else [data.target.column]
    )
    ordered = [data.id_column, data.time_column, *feature_columns, *target_cols]
    return list(dict.fromkeys(ordered))


def labels_known_at(url: str, data: DataConfig, ids: list[str], as_of: date) -> pd.DataFrame:
    """The 0/1 target of the rows with these ids whose label is known by `as_of` (id as text)."""
    engine = make_engine(url)
    tbl = sa.Table(data.table, sa.MetaData(), autoload_with=engine)
    id_col = tbl.c[data.id_column]
    numeric = isinstance(id_col.type, sa.Integer)
    keys: list[Any] = [int(i) for i in ids if i.isdigit()] if numeric else list(ids)
    cols = [tbl.c[c] for c in _required_columns(data, [])]
    parts = []
    with engine.connect() as conn:
        for start in range(0, len(keys), 5000):
            query = sa.select(*cols).where(id_col.in_(keys[start:start + 5000]))
            parts.append(pd.read_sql(query, conn))
    engine.dispose()
    if not parts or not sum(len(p) for p in parts):
        return pd.DataFrame(columns=["entity_id", "label"])
    frame = pd.concat(parts, ignore_index=True)
    frame[data.time_column] = to_timestamps(frame[data.time_column], data)
    frame, _ = _attach_target(frame, data, as_of)
    label = frame[TARGET].astype(int) if data.target.task == "binary" else frame[TARGET]
    return pd.DataFrame({"entity_id": frame[data.id_column].astype(str), "label": label})


def _attach_target(frame: pd.DataFrame, data: DataConfig, as_of: date) -> tuple[pd.DataFrame, int]:
    """Add the target (0/1, a value or a class name) and when it became known; drop rows whose
    label is not yet known (and, for regression and multiclass, rows whose target is empty)."""
    target = data.target
    known = pd.Series(True, index=frame.index)
    if isinstance(target, PerformanceWindowTarget):
        event_time = pd.to_datetime(frame[target.event_time_column])
        horizon = frame[data.time_column] + pd.DateOffset(months=target.months)
        happened = frame[target.event_column].astype(str).str.strip() == target.event_value
        frame[TARGET] = (happened & event_time.notna() & (event_time <= horizon)).astype(np.int8)
        frame[LABEL_KNOWN_AT] = horizon
    else:
        frame[TARGET] = _column_target(frame[target.column], target.task, target.column, target.positive)
        known = frame[TARGET].notna()
        frame[LABEL_KNOWN_AT] = frame[data.time_column]
    mature = known & (frame[LABEL_KNOWN_AT] <= pd.Timestamp(datetime.combine(as_of, datetime.min.time())))
    return frame.loc[mature].copy(), int((~mature).sum())


def _column_target(raw: pd.Series, task: str, column: str, positive: object) -> pd.Series:
    if task == "binary":
        return (raw == positive).astype(np.int8)
    if task == "multiclass":
        return raw.map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v))
                       else str(v).strip() or None)
    values = pd.to_numeric(raw, errors="coerce").astype(np.float64)
    bad = raw.notna() & values.isna()
    if bad.any():
        examples = ", ".join(repr(v) for v in raw[bad].astype(str).unique()[:3])
        raise SourceError(f"the target column '{column}' is a regression target, but {int(bad.sum())} "
                          f"row(s) hold no number (e.g. {examples}): clean them or make them empty")
    if np.isinf(values).any():
        raise SourceError(f"the target column '{column}' holds infinite values: a regression target "
                          "must be finite")
    return values


def infer_sql_types(frame: pd.DataFrame) -> dict[str, sa.types.TypeEngine]:
    """Column types for `write_table` from a frame's dtypes (for files a user ingests)."""
    types: dict[str, sa.types.TypeEngine] = {}
    for name, dtype in frame.dtypes.items():
        if pd.api.types.is_bool_dtype(dtype):
            types[str(name)] = sa.Boolean()
        elif pd.api.types.is_integer_dtype(dtype):
            types[str(name)] = sa.BigInteger()
        elif pd.api.types.is_float_dtype(dtype):
            types[str(name)] = sa.Float()
        elif pd.api.types.is_datetime64_any_dtype(dtype):
            types[str(name)] = sa.DateTime()
        else:
            types[str(name)] = sa.Text()
    return types
