"""The prediction log, offline: a window of it written to a Parquet file for analysis elsewhere
(a notebook, a warehouse), each prediction beside the label posted for it, if any."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from pathlib import Path

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from flywheel.config import Project
from flywheel.core.errors import FlywheelError
from flywheel.state.db import feedback, open_state, predictions
from flywheel.state.logread import read_log
from flywheel.state.partitions import PruneResult, ensure_partitions, prune

SCHEMA = pa.schema([
    ("record_id", pa.string()), ("request_id", pa.string()), ("created_at", pa.timestamp("us", tz="UTC")),
    ("model_name", pa.string()), ("model_version", pa.int64()), ("inputs", pa.string()),
    ("meta", pa.string()), ("probability", pa.float64()), ("decision", pa.bool_()),
    ("value", pa.float64()), ("label", pa.string()), ("scores", pa.string()), ("latency_ms", pa.float64()),
    ("feedback_label", pa.int64()), ("feedback_value", pa.float64()), ("feedback_label_text", pa.string()),
    ("feedback_observed_at", pa.timestamp("us", tz="UTC")),
])


@dataclass(frozen=True)
class LogExport:
    path: Path
    rows: int
    labelled: int
    start: datetime
    end: datetime


def _instant(day: date | datetime) -> datetime:
    moment = day if isinstance(day, datetime) else datetime.combine(day, time.min)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def export_log(project: Project, start: date | datetime, end: date | datetime, output: Path,
               chunk_rows: int = 50_000) -> LogExport:
    """The predictions served in [start, end) (UTC), with their labels, as Parquet at `output`:
    read and written in chunks (a window of millions of rows never sits in memory whole), to a
    temporary file renamed at the end (a crash leaves no half file under the name)."""
    begin, stop = _instant(start), _instant(end)
    if stop <= begin:
        raise FlywheelError("the export window must end after it starts "
                            f"({begin:%Y-%m-%d} .. {stop:%Y-%m-%d})")
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    p, f = predictions.c, feedback.c
    query = (sa.select(p.record_id, p.request_id, p.created_at, p.model_name, p.model_version, p.id,
                       p.id, p.probability, p.decision, p.value, p.label, p.scores, p.latency_ms,
                       f.label, f.value, f.label_text, f.observed_at)
             .select_from(predictions.outerjoin(feedback, f.record_id == p.record_id))
             .where(p.model_name == project.config.registered_model, p.created_at >= begin,
                    p.created_at < stop)
             .order_by(p.created_at, p.id))
    rows = labelled = 0
    engine = open_state(project.state_url)
    try:
        with engine.connect() as conn, pq.ParquetWriter(partial, SCHEMA) as writer:
            result = conn.execution_options(stream_results=True, yield_per=chunk_rows).execute(query)
            for part in result.partitions(chunk_rows):
                columns = list(zip(*part, strict=True))
                batch = {name: list(values) for name, values in zip(SCHEMA.names, columns, strict=True)}
                batch["inputs"], batch["meta"] = _inputs_and_meta(conn, project.config.registered_model,
                                                                  batch["inputs"], batch["created_at"])
                batch["created_at"] = [_utc(v) for v in batch["created_at"]]
                batch["feedback_observed_at"] = [_utc(v) for v in batch["feedback_observed_at"]]
                writer.write_table(pa.Table.from_pydict(batch, schema=SCHEMA))
                rows += len(part)
                labelled += sum(1 for r in part if any(v is not None for v in r[13:16]))
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return LogExport(output, rows, labelled, begin, stop)


def _inputs_and_meta(conn: sa.Connection, model_name: str, ids: list[int],
                     times: list[datetime]) -> tuple[list[str], list[str | None]]:
    """The rows' inputs and meta as JSON text (one object each), from the log's segments."""
    found = read_log(conn, model_name, ids=ids, start=min(times), end=max(times))
    position = pd.Index(found.base["id"]).get_indexer(ids)
    inputs = _no_nan(found.inputs).to_dict("records")
    metas = _no_nan(found.meta).to_dict("records")
    numpy = orjson.OPT_SERIALIZE_NUMPY
    text = [orjson.dumps(inputs[i], option=numpy).decode() if i >= 0 else "{}" for i in position]
    meta = []
    for i in position:
        kept = {k: v for k, v in metas[i].items() if v is not None} if i >= 0 else {}
        meta.append(orjson.dumps(kept, option=numpy).decode() if kept else None)
    return text, meta


def _no_nan(frame: pd.DataFrame) -> pd.DataFrame:
    """Missing values as None (JSON null), every column as Python objects."""
    return frame.astype(object).mask(frame.isna(), None)  # type: ignore[arg-type]


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def prune_log(project: Project, days: int | None = None, at: datetime | None = None) -> PruneResult | None:
    """Apply the log's retention (`days`, default `serving.log.retention_days`; None when neither
    is set: nothing is removed). On PostgreSQL the coming days' partitions are made first."""
    keep = days or project.config.serving.log.retention_days
    if keep is None:
        return None
    engine = open_state(project.state_url)
    ensure_partitions(engine, at)
    return prune(engine, keep, at)
