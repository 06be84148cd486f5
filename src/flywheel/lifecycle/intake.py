"""Load a file into the project's source table: replace the table, or add rows to it by id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from flywheel.config import Project
from flywheel.core.progress import Advance
from flywheel.data.sources import SourceError, infer_sql_types, upsert_table, write_table
from flywheel.data.timecol import to_timestamps


@dataclass(frozen=True)
class IngestResult:
    table: str
    rows: int  # in the file
    added: int
    replaced: int  # rows of the table that carried an id of the file (append only)
    time_from: str
    time_to: str


def read_rows(path: Path) -> pd.DataFrame:
    """A .parquet or .csv file as a frame."""
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path)
    if path.suffix.lower() in (".csv", ".txt"):
        return pd.read_csv(path)
    raise SourceError(f"{path}: give a .parquet or .csv file")


def ingest(project: Project, path: Path, append: bool = False,
           progress: Advance | None = None) -> IngestResult:
    """Replace `data.table` with the file's rows, or (append) add them, replacing rows whose
    `data.id_column` they carry. The time column must read in `data.time_unit`."""
    data = project.config.data
    frame = read_rows(path)
    for column, setting in ((data.id_column, "id_column"), (data.time_column, "time_column")):
        if column not in frame.columns:
            raise SourceError(f"{path}: no column '{column}' (data.{setting}); it has: "
                              f"{', '.join(map(str, frame.columns))}")
    when = to_timestamps(frame[data.time_column], data)  # refuses what the unit cannot read
    if data.time_unit == "date":
        frame[data.time_column] = when  # a DATETIME column: SQL compares it with the window
    types = infer_sql_types(frame)
    if append:
        added, replaced = upsert_table(frame, project.source_url, data.table, data.id_column, types,
                                       index_columns=(data.time_column,), progress=progress)
    else:
        added, replaced = write_table(frame, project.source_url, data.table, types,
                                      index_columns=(data.time_column,), progress=progress), 0
    return IngestResult(data.table, len(frame), added, replaced, str(when.min()), str(when.max()))
