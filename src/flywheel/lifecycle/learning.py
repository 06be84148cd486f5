"""Rows to learn from: the source table, the labels posted back to `/v1/feedback`, or both.

A feedback row is a served prediction joined with its label: the inputs exactly as they were
served (the prediction log), the label as it was received. Its time is the row's own time when the
model reads the time column, else `meta.event_time` when the client sent one, else the moment it
was served. Label timing is respected as for the source: a label counts only if it was received
by the clock of the run (through the end of that day).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from flywheel.config import Project
from flywheel.core.errors import FlywheelError
from flywheel.core.times import EVENT_TIME
from flywheel.data import features as feats
from flywheel.data.sources import (
    FROM_FEEDBACK,
    LABEL_KNOWN_AT,
    TARGET,
    EmptyWindowError,
    Snapshot,
    latest_source_time,
    read_labelled_window,
    save_snapshot,
)
from flywheel.data.timecol import naive_utc, served_row_times
from flywheel.state.db import CLIENT_META, feedback, open_state, predictions
from flywheel.state.logread import LogRows, read_log

ENTITY_ID = "entity_id"  # the key of `meta` that names the row's id in the source table
# Where a label posted to /v1/feedback is kept, by task, and the target's type in a snapshot.
FEEDBACK_LABEL = {"binary": feedback.c.label, "regression": feedback.c.value,
                  "multiclass": feedback.c.label_text}
FEEDBACK_DTYPE: dict[str, type] = {"binary": np.int8, "regression": np.float64, "multiclass": object}


def end_of_day(day: date) -> datetime:
    return datetime.combine(day + timedelta(days=1), datetime.min.time())


def feedback_rows(project: Project, columns: Sequence[str], start: date, at: date,
                  data_time: bool = False) -> pd.DataFrame:
    """Served rows of the project's model with a label received by the end of day `at`, whose time
    lies in [start, end of `at`): the `columns` as served, the id, the time, the target and when
    the label arrived. Empty (with those columns) when there are none.

    `data_time` (a run whose clock follows the data: history loaded or labelled late): a label is
    known from its `observed_at`, else from the row's own time, whenever it was served or
    received."""
    data = project.config.data
    upper = end_of_day(at)
    label_column = FEEDBACK_LABEL[project.config.task]
    query = (sa.select(predictions.c.id, predictions.c.record_id, predictions.c.created_at,
                       label_column.label("label"), feedback.c.received_at, feedback.c.observed_at)
             .join(feedback, feedback.c.record_id == predictions.c.record_id)
             .where(predictions.c.model_name == project.config.registered_model,
                    label_column.is_not(None))
             .order_by(predictions.c.id))
    if not data_time:
        query = query.where(predictions.c.created_at < upper, feedback.c.received_at < upper)
    with open_state(project.state_url).connect() as conn:
        found = conn.execute(query).all()
        served = _served(conn, project.config.registered_model, found)
    wanted = list(dict.fromkeys([data.id_column, data.time_column, *columns]))
    if not found:
        return pd.DataFrame(columns=[*wanted, TARGET, LABEL_KNOWN_AT, FROM_FEEDBACK])
    inputs = served.inputs
    missing = [c for c in columns if c not in inputs.columns and c != data.time_column]
    if missing:
        raise EmptyWindowError(
            f"the served predictions lack input column(s) {', '.join(missing)} that the features "
            "need, so the feedback cannot be learnt from; retrain from the source table "
            "(retraining.train_from: source) or serve a model whose inputs include them")
    frame = inputs.reindex(columns=[c for c in wanted if c in inputs.columns])
    frame[data.id_column] = [str(e or r.record_id) for e, r in
                             zip(served.meta_values(ENTITY_ID), found, strict=True)]
    frame[data.time_column] = served_row_times(inputs, served.meta_values(EVENT_TIME),
                                               served.base["created_at"], data)
    frame[TARGET] = np.array([r.label for r in found], dtype=FEEDBACK_DTYPE[project.config.task])
    frame[LABEL_KNOWN_AT] = naive_utc(pd.Series([r.received_at for r in found]))
    if data_time:
        observed = naive_utc(pd.Series([r.observed_at for r in found], dtype=object))
        frame[LABEL_KNOWN_AT] = observed.fillna(frame[data.time_column]).to_numpy()
        frame = frame.loc[frame[LABEL_KNOWN_AT] < pd.Timestamp(upper)]
    frame[FROM_FEEDBACK] = True
    # An id served twice: its latest, within each client. A client reusing another's entity id
    # (declared clients only; all callers are one anonymous client otherwise) adds its own row and
    # never displaces the other's labelled one.
    frame["__client__"] = ["" if c is None else str(c) for c in served.meta_values(CLIENT_META)]
    frame = frame.drop_duplicates([data.id_column, "__client__"], keep="last").drop(columns="__client__")
    when = frame[data.time_column]
    frame = frame.loc[(when >= pd.Timestamp(start)) & (when < pd.Timestamp(upper))]
    return frame.sort_values([data.time_column, data.id_column], kind="stable").reset_index(drop=True)


def extract_retraining_rows(project: Project, extra_columns: Sequence[str], window: tuple[date, date],
                            at: date, data_time: bool = False) -> Snapshot:
    """A retrain's rows by `retraining.train_from`, saved as one snapshot whose lineage says how
    many came from the feedback. Never empty (`EmptyWindowError` says what was found)."""
    origin = project.config.retraining.train_from
    data = project.config.data
    cols = list(dict.fromkeys(feats.input_columns(project.config.features) + list(extra_columns)))
    start, end = window
    source, immature = pd.DataFrame(), 0
    if origin in ("source", "both"):
        try:
            source, immature = read_labelled_window(project.source_url, data, cols, start, end, at)
        except EmptyWindowError:
            if origin == "source":
                raise
    served = pd.DataFrame()
    if origin in ("feedback", "both"):
        served = feedback_rows(project, cols, start, at, data_time)
        if served.empty and source.empty:
            raise EmptyWindowError(f"no labelled rows in [{start}, {at}]: " + _why_no_feedback(project, at)
                                   + (" The source table has none in the window either."
                                      if origin == "both" else ""))
    frame = _combine(source, served, data.id_column, data.time_column) if origin == "both" \
        else served if origin == "feedback" else source
    return save_snapshot(frame.reset_index(drop=True), data, project.snapshot_dir, start,
                         at if origin == "feedback" else end, at, immature, origin,
                         feedback_rows=int(len(frame) - len(source)) if origin == "both" else len(served))


def labelled_feedback_times(project: Project, at: date | None = None) -> pd.Series:
    """The event times of the project's served predictions that have a label (received by the end
    of day `at`, when given): what a retrain from feedback could learn from."""
    data = project.config.data
    query = (sa.select(predictions.c.id, predictions.c.created_at)
             .join(feedback, feedback.c.record_id == predictions.c.record_id)
             .where(predictions.c.model_name == project.config.registered_model,
                    FEEDBACK_LABEL[project.config.task].is_not(None)))
    if at is not None:
        query = query.where(feedback.c.received_at < end_of_day(at))
    with open_state(project.state_url).connect() as conn:
        found = conn.execute(query).all()
        served = _served(conn, project.config.registered_model, found)
    if not found:
        return pd.Series([], dtype="datetime64[ns]")
    return served_row_times(served.inputs, served.meta_values(EVENT_TIME), served.base["created_at"], data)


def _served(conn: sa.Connection, model_name: str, found: Sequence[Any]) -> LogRows:
    """What the log holds of the rows `found` (each with its id and created_at), in their order:
    their inputs and meta read from the segments (or JSON text) of the span they were served in."""
    if not found:
        return read_log(conn, model_name, ids=[])
    times = [r.created_at for r in found]
    rows = read_log(conn, model_name, ids=[r.id for r in found], start=min(times), end=max(times))
    position = pd.Index(rows.base["id"]).get_indexer([r.id for r in found])
    if (position < 0).any():
        raise FlywheelError(f"{int((position < 0).sum())} labelled predictions have no inputs in the "
                            "prediction log: their segment is missing (the log was edited by hand?)")
    return LogRows(rows.base.iloc[position].reset_index(drop=True),
                   rows.inputs.iloc[position].reset_index(drop=True),
                   rows.meta.iloc[position].reset_index(drop=True))


def _why_no_feedback(project: Project, at: date) -> str:
    """What labelled feedback exists and why none of it is in the window ending at `at`."""
    name = project.config.registered_model
    times = labelled_feedback_times(project, at)
    if times.empty:
        return (f"no served prediction of '{name}' has a label received by the end of {at} (POST "
                "them to /v1/feedback).")
    return (f"{len(times):,} served predictions of '{name}' have labels, with event times from "
            f"{times.min().date()} to {times.max().date()}: outside the window, which ends at the "
            f"clock ({at}, {project.config.retraining.clock} time) and reaches back "
            f"retraining.lookback_months ({project.config.retraining.lookback_months}). To learn "
            "from them, retrain with --at data (the day after the latest of them) or set "
            "retraining.clock: data.")


def data_clock(project: Project) -> date:
    """The clock that follows the data: the day after the latest row a retrain could learn from
    (the source table's latest time and/or the latest labelled prediction's event time, by
    `retraining.train_from`); today when there is no row at all."""
    origin = project.config.retraining.train_from
    latest: list[pd.Timestamp] = []
    if origin in ("source", "both"):
        last = latest_source_time(project.source_url, project.config.data)
        if last is not None:
            latest.append(last)
    if origin in ("feedback", "both"):
        times = labelled_feedback_times(project)
        if not times.empty:
            latest.append(times.max())
        observed = _latest_observed(project)
        if observed is not None:
            latest.append(observed)
    if not latest:
        return date.today()
    return (max(latest) + pd.Timedelta(days=1)).date()


def _latest_observed(project: Project) -> pd.Timestamp | None:
    """The latest `observed_at` of a label of the project's served predictions (None: none sent)."""
    query = (sa.select(sa.func.max(feedback.c.observed_at))
             .join(predictions, feedback.c.record_id == predictions.c.record_id)
             .where(predictions.c.model_name == project.config.registered_model))
    with open_state(project.state_url).connect() as conn:
        value = conn.execute(query).scalar()
    return None if value is None else naive_utc(pd.Series([value])).iloc[0]


def _combine(source: pd.DataFrame, served: pd.DataFrame, id_col: str, time_col: str) -> pd.DataFrame:
    """Source rows plus served rows whose id the source does not hold (a row is learnt once),
    the served columns read with the source's types; the target columns of served rows stay
    empty (TARGET holds their label)."""
    if served.empty:
        return source
    if source.empty:
        return served
    served = served.copy()
    source = source.assign(**{FROM_FEEDBACK: False})
    as_served = (id_col, time_col, TARGET, LABEL_KNOWN_AT, FROM_FEEDBACK)
    for name in source.columns:
        if name not in served.columns:
            served[name] = None
        elif name not in as_served and pd.api.types.is_numeric_dtype(source[name]):
            served[name] = pd.to_numeric(served[name], errors="coerce")
    numeric_ids = pd.api.types.is_integer_dtype(source[id_col]) and served[id_col].str.fullmatch(r"\d+").all()
    if numeric_ids:
        served[id_col] = served[id_col].astype(np.int64)
    else:
        source = source.assign(**{id_col: source[id_col].astype(str)})
    served = served.loc[~served[id_col].isin(source[id_col]), list(source.columns)]
    both = pd.concat([source, served], ignore_index=True)
    for name in both.columns:  # a text column with numbers from one side: text throughout
        if both[name].dtype == object:
            both[name] = both[name].map(lambda v: v if v is None or isinstance(v, str) else
                                        (None if isinstance(v, float) and np.isnan(v) else str(v)))
    return both.sort_values([time_col, id_col], kind="stable").reset_index(drop=True)


def feedback_labels_between(project: Project, after: date | None, at: date) -> int:
    """Labels of the project's served predictions received after the end of day `after` (the
    watermark) and by the end of day `at`: the feedback side of 'new labelled rows'."""
    query = (sa.select(sa.func.count()).select_from(
        feedback.join(predictions, feedback.c.record_id == predictions.c.record_id))
        .where(predictions.c.model_name == project.config.registered_model,
               feedback.c.received_at < end_of_day(at)))
    if after is not None:
        query = query.where(feedback.c.received_at >= end_of_day(after))
    with open_state(project.state_url).connect() as conn:
        return int(conn.execute(query).scalar() or 0)
