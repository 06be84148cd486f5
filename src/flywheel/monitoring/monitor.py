"""A monitoring run: a window of the prediction log against the champion's training reference.

Verdicts (per-feature drift, prediction drift, performance on the latest labelled predictions)
go to the state database (`monitor_runs`, `monitor_columns`), where the server's /metrics reads
them as gauges; an Evidently report (HTML + JSON) on samples of both sides goes to MLflow.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import orjson
import pandas as pd
import sqlalchemy as sa

from flywheel.config import DataConfig, MonitoringConfig, MonitorWindow, Project
from flywheel.core.errors import FlywheelError
from flywheel.core.extras import installed, require, without
from flywheel.core.times import EVENT_TIME
from flywheel.data.features import FeatureSpec, build_matrix
from flywheel.data.sources import labels_known_at
from flywheel.data.timecol import served_row_times, window_bound
from flywheel.monitoring.drift import DriftResult, ReferenceProfile, detect_drift
from flywheel.monitoring.estimation import (
    CALIBRATION_FILE,
    ESTIMATION_ARTIFACT,
    Audit,
    Calibration,
    Estimate,
    EstimationSettings,
    LossModel,
    estimate,
    estimate_loss,
    loss_sample,
    refused,
)
from flywheel.monitoring.reference import (
    PREDICTION,
    PROFILE_FILE,
    SAMPLE_FILE,
    categorical_features,
    feature_frame,
)
from flywheel.registry import CHAMPION, Registry, RegistryError
from flywheel.state.db import feedback, monitor_columns, monitor_runs, now, open_state, predictions
from flywheel.state.logread import read_log
from flywheel.training.evaluate import (
    HIGHER_IS_BETTER,
    holdout_metrics,
    multiclass_metrics,
    regression_metrics,
)

log = logging.getLogger("flywheel.monitoring")


def choose_window(project: Project, size: int | None = None, hours: float | None = None,
                  start: str | date | None = None, end: str | date | None = None) -> MonitorWindow:
    """The window asked for (one of the latest `size` rows, the latest `hours`, or event time in
    [start, end), read in the project's time unit), else the configured one. The CLI and the
    Python API both ask here, so they refuse the same things."""
    if (start is None) != (end is None):
        raise MonitorError("a window by event time needs both a start and an end (--from and --to)")
    if sum(x is not None for x in (size, hours, start)) > 1:
        raise MonitorError("choose one window: a size, hours, or a start and end (--from/--to)")
    if size is not None:
        return MonitorWindow(by="count", size=size)
    if hours is not None:
        return MonitorWindow(by="time", hours=hours)
    if start is None or end is None:
        return project.config.monitoring.window
    unit = project.config.data.time_unit
    try:
        bounds = window_bound(start, unit), window_bound(end, unit)
    except ValueError as exc:
        raise MonitorError(f"window by event time: {exc}") from None
    if bounds[0] >= bounds[1]:
        raise MonitorError(f"window by event time: the start {bounds[0]} is not before the end {bounds[1]}")
    return MonitorWindow(by="event", start=bounds[0], end=bounds[1])


class MonitorError(FlywheelError):
    """Monitoring cannot run: no champion, no reference, or too few predictions."""


@dataclass(frozen=True)
class Performance:
    """The task's metrics over a window's labelled predictions; `metric` is the gate's."""

    rows: int
    positives: int  # binary; 0 for the other tasks
    metric: str
    value: float
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def roc_auc(self) -> float:
        return self.metrics.get("roc_auc", float("nan"))

    @property
    def pr_auc(self) -> float:
        return self.metrics.get("pr_auc", float("nan"))

    @property
    def brier(self) -> float:
        return self.metrics.get("brier", float("nan"))


@dataclass(frozen=True)
class MonitorVerdict:
    id: int
    model_name: str
    model_version: int
    window_kind: str
    window_start: datetime | None
    window_end: datetime | None
    drift: DriftResult
    prediction_drift: float | None
    performance: Performance | None
    performance_drop: bool
    seconds: float
    report_path: Path | None
    mlflow_run_id: str | None
    # category feature -> rows of the window whose value the model never learnt (scored as "other")
    unseen: dict[str, int] = field(default_factory=dict)
    # the gate's metric estimated from the window's outputs alone, before any label
    estimate: Estimate | None = None
    # once the window's labels are in: the realized value against the estimate for the same rows
    audit: Audit | None = None
    # the estimate worse than the serving versions promised (by the drop thresholds)
    estimated_drop: bool = False
    # earlier windows whose labels arrived since, audited by this run: (their monitoring run, audit)
    earlier_audits: list[tuple[int, Audit]] = field(default_factory=list)

    @property
    def shifts(self) -> list[tuple[int | None, Audit]]:
        """Every audit of this run that found a probable concept shift (None: this window's)."""
        audits: list[tuple[int | None, Audit]] = [(None, self.audit)] if self.audit else []
        return [(run, a) for run, a in [*audits, *self.earlier_audits] if a.shift]

    # the JSON form (`flywheel monitor --json`) also names these, at its top level
    JSON_PROPERTIES: ClassVar[tuple[str, ...]] = ("rows", "drift_share", "drift_detected")

    @property
    def rows(self) -> int:
        return self.drift.rows

    @property
    def drift_share(self) -> float:
        return self.drift.share

    @property
    def drift_detected(self) -> bool:
        return self.drift.detected

    def summary(self) -> str:
        parts = [f"v{self.model_version}: {self.drift.rows:,} predictions, "
                 f"{len(self.drift.drifted_columns)}/{len(self.drift.columns)} features drifted "
                 f"(share {self.drift.share:.2f}, dataset drift {'YES' if self.drift.detected else 'no'})"]
        if any(self.unseen.values()):
            parts.append("categories the model never learnt: " + ", ".join(
                f"{name} {n:,} rows" for name, n in self.unseen.items() if n))
        if self.estimate is not None:
            parts.append(self.estimate.describe() + (" (DROP)" if self.estimated_drop else ""))
        if self.audit is not None:
            parts.append(self.audit.describe())
        for run, audit in self.earlier_audits:
            parts.append(f"window #{run}, {audit.describe()}")
        if self.performance is not None:
            perf = self.performance
            parts.append(f"{perf.metric} {perf.value:.4g} on {perf.rows:,} labelled"
                         + (" (DROP)" if self.performance_drop else ""))
        return "; ".join(parts)


def reference_of(registry: Registry, version: int, cache: Path) -> tuple[ReferenceProfile, Path]:
    """The champion's reference profile, and a local copy of its sample for Evidently."""
    folder = registry.download_run_artifacts(version, "reference", cache)
    profile_path = folder / PROFILE_FILE
    if not profile_path.is_file():
        raise MonitorError(f"v{version} has no reference profile (trained before monitoring existed): "
                           "retrain it with flywheel train")
    return ReferenceProfile.from_dict(json.loads(profile_path.read_text())), folder / SAMPLE_FILE


_FACTS: dict[tuple[str, str, int], tuple[ReferenceProfile, Path, FeatureSpec]] = {}


def _version_facts(registry: Registry, version: int,
                   cache: Path) -> tuple[ReferenceProfile, Path, FeatureSpec]:
    """Reference and feature spec of a version: immutable, so fetched once per process."""
    key = (registry.tracking_url, registry.model_name, version)
    if key not in _FACTS:
        profile, sample = reference_of(registry, version, cache)
        _FACTS[key] = (profile, sample, FeatureSpec.from_json(registry.load_artifacts(version).feature_spec))
    return _FACTS[key]


def read_window(engine: sa.Engine, model_name: str, window: MonitorWindow,
                at: datetime | None = None, data: DataConfig | None = None,
                inputs: Sequence[str] | None = None, cache: dict[int, bytes] | None = None) -> pd.DataFrame:
    """The window's predictions: inputs (those named, default all), probability, model version,
    time, read from the log's segments (and rows logged before them). A window by event time
    needs `data` (which column is the time column). `cache`: see `read_log`."""
    wanted = None if inputs is None else \
        [*inputs, *([data.time_column] if data is not None and window.by == "event" else [])]
    keys = [EVENT_TIME] if window.by == "event" else []
    with engine.connect() as conn:
        if window.by == "time":
            end = at or now()
            found = read_log(conn, model_name, start=end - timedelta(hours=window.hours), end=end,
                             inputs=wanted, meta=keys, categories=True, cache=cache)
        elif window.by == "event":  # a row is served at or after it happened: a bound for the read
            found = read_log(conn, model_name, start=_utc_midnight(window.start), inputs=wanted,
                             meta=keys, categories=True, cache=cache)
        else:
            found = read_log(conn, model_name, last=window.size, inputs=wanted, meta=keys,
                             categories=True, cache=cache)
    if not len(found):
        return pd.DataFrame(columns=["id", "created_at", "model_version", "probability", SERVED_VALUE,
                                     SERVED_LABEL])
    meta = found.base.rename(columns={"value": SERVED_VALUE, "label": SERVED_LABEL})
    frame = side_by_side(meta, found.inputs)
    if window.by == "event":
        if data is None:
            raise ValueError("a window by event time needs the project's data config")
        served = found.inputs
        if data.time_column in served.columns:  # times are parsed from the texts, not their codes
            served = served.assign(**{data.time_column: served[data.time_column].astype(object)})
        when = served_row_times(served, found.meta_values(EVENT_TIME), meta["created_at"], data)
        inside = (when >= pd.Timestamp(_utc_midnight(window.start).replace(tzinfo=None))) & \
            (when < pd.Timestamp(_utc_midnight(window.end).replace(tzinfo=None)))
        frame = frame.loc[inside.to_numpy()].copy(deep=False)  # its own frame, not a "slice"
        frame.index = pd.RangeIndex(len(frame))
    return frame


SERVED_VALUE, SERVED_LABEL = "__served_value__", "__served_label__"  # a regression's, a multiclass'


def side_by_side(left: pd.DataFrame, right: pd.DataFrame) -> pd.DataFrame:
    """The columns of two frames of the same rows (both indexed 0..n-1) as one frame, without
    copying them: pd.concat would copy every column into one 2-D block per dtype (0.4 s of a
    1M-row window). Names in both: concat's frame, which keeps both."""
    if set(left.columns) & set(right.columns):
        return pd.concat([left, right], axis=1)
    return pd.DataFrame({**{c: left[c] for c in left.columns}, **{c: right[c] for c in right.columns}},
                        copy=False)


def served_prediction(spec: FeatureSpec, frame: pd.DataFrame) -> np.ndarray:
    """What prediction drift is measured on, from the log: P(positive), the value, or the index of
    the predicted class (NaN for a class the version does not know)."""
    if spec.task == "regression":
        return pd.to_numeric(frame[SERVED_VALUE], errors="coerce").to_numpy(dtype=np.float64)
    if spec.task == "multiclass":
        index = {c: float(i) for i, c in enumerate(spec.classes)}
        return np.array([index.get(v, np.nan) for v in frame[SERVED_LABEL]], dtype=np.float64)
    return frame["probability"].to_numpy(dtype=np.float64)


def _utc_midnight(day: date | None) -> datetime:
    return datetime.combine(day or date.min, datetime.min.time(), tzinfo=UTC)


def _in_window(query: sa.Select[Any], within: pd.Series | None,
               since: datetime | None = None) -> sa.Select[Any]:
    """The latest rows, or (for an event window) the rows of the window's id range served at or
    after `since` (the bound that lets PostgreSQL read only the window's log partitions)."""
    if within is None:
        return query.order_by(predictions.c.id.desc())
    if since is not None:
        query = query.where(predictions.c.created_at >= since)
    return query.where(predictions.c.id.between(int(within.min()), int(within.max())))


LABELLED = ["id", "model_version", "probability", "value", "scores", "label"]
_TRUTH = {"binary": feedback.c.label, "regression": feedback.c.value, "multiclass": feedback.c.label_text}


def read_labelled(engine: sa.Engine, model_name: str, rows: int,
                  within: pd.Series | None = None, task: str = "binary",
                  since: datetime | None = None) -> pd.DataFrame:
    """The latest `rows` predictions that have a label (feedback), with the version that served
    them and what it answered; or every labelled one among the prediction ids `within`."""
    truth = _TRUTH[task]
    query = (sa.select(predictions.c.id, predictions.c.model_version, predictions.c.probability,
                       predictions.c.value, predictions.c.scores, truth)
             .join(feedback, feedback.c.record_id == predictions.c.record_id)
             .where(predictions.c.model_name == model_name, truth.is_not(None)))
    query = _in_window(query, within, since)
    with engine.connect() as conn:
        found = pd.DataFrame(conn.execute(query if within is not None else query.limit(rows)).all(),
                             columns=LABELLED)
    return found if within is None else found[found["id"].isin(within)]


def read_source_labelled(project: Project, engine: sa.Engine, model_name: str, rows: int,
                         at: datetime, within: pd.Series | None = None, since: datetime | None = None,
                         cache: dict[int, bytes] | None = None) -> pd.DataFrame:
    """Labels from the source database for the latest predictions (or those `within`) whose
    `meta.entity_id` names a source row whose label is known by `at` (the target's own rule)."""
    with engine.connect() as conn:
        if within is None:
            found = read_log(conn, model_name, last=rows, inputs=(), meta=["entity_id"], cache=cache)
        else:
            found = read_log(conn, model_name, start=since, ids=within.astype(np.int64).tolist(),
                             inputs=(), meta=["entity_id"], cache=cache)
        ids = found.base["id"].tolist()
        scores: dict[int, Any] = {}
        if ids:  # multiclass scores: kept in the row, not in the segment
            p = predictions.c
            scores = dict(conn.execute(sa.select(p.id, p.scores).where(
                p.model_name == model_name, p.id.between(min(ids), max(ids)), p.scores.is_not(None))).all())
    entity = ["" if v is None else str(v) for v in found.meta_values("entity_id")]
    preds = pd.DataFrame({"id": ids, "model_version": found.base["model_version"].tolist(),
                          "probability": found.base["probability"].tolist(),
                          "value": found.base["value"].tolist(), "scores": [scores.get(i) for i in ids],
                          "entity_id": entity})
    preds = preds[preds["entity_id"] != ""]
    if within is not None:
        preds = preds[preds["id"].isin(within)]
    if preds.empty:
        return pd.DataFrame(columns=LABELLED)
    labels = labels_known_at(project.source_url, project.config.data, sorted(set(preds["entity_id"])),
                             at.date())
    joined = preds.merge(labels, on="entity_id", how="inner")
    return joined[LABELLED]


def labelled_window(project: Project, engine: sa.Engine, model_name: str, rows: int,
                    at: datetime, within: pd.Series | None = None,
                    since: datetime | None = None, cache: dict[int, bytes] | None = None) -> pd.DataFrame:
    """The latest `rows` labelled predictions (or every labelled one among the ids `within`,
    served at or after `since`): feedback labels first, else the source database's. `cache`:
    the log's segments already fetched (see `read_log`)."""
    feedback_rows = read_labelled(engine, model_name, rows, within, project.config.task, since)
    source_rows = read_source_labelled(project, engine, model_name, rows, at, within, since, cache)
    source_rows = source_rows[~source_rows["id"].isin(feedback_rows["id"])]
    # Only frames with rows are concatenated (pandas deprecates deciding dtypes from empty ones).
    parts = [frame for frame in (feedback_rows, source_rows) if len(frame)] or [feedback_rows]
    both = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    both = both.sort_values("id", ascending=False)
    return (both if within is not None else both.head(rows)).reset_index(drop=True)


def expected_metric(registry: Registry, labelled: pd.DataFrame, metric: str = "roc_auc") -> float | None:
    """What the versions that served these predictions promised: their holdout value of `metric`,
    row-weighted.

    Labels arrive late (24 months for the SBA loans), so the labelled predictions were usually
    served by an earlier champion; each is held to its own model's promise, not to today's.
    """
    weights = labelled["model_version"].value_counts()
    promised = {int(v): registry.version(int(v)).metrics.get(f"holdout_{metric}") for v in weights.index}
    known = {v: a for v, a in promised.items() if a is not None}
    if not known:
        return None
    total = sum(int(weights[v]) for v in known)
    return sum(a * int(weights[v]) for v, a in known.items()) / total


def window_performance(labelled: pd.DataFrame, min_rows: int, min_positives: int,
                       spec: FeatureSpec | None = None, metric: str = "roc_auc") -> Performance | None:
    """The task's metrics over the labelled predictions, or None when too few are labelled (or,
    binary, too few of one class) to say anything."""
    task, classes = (spec.task, spec.classes) if spec else ("binary", [])
    if task == "binary":
        y = labelled["label"].to_numpy(dtype=np.int64)
        positives = int(y.sum())
        if len(y) < min_rows or positives < min_positives or positives == len(y):
            return None
        m = holdout_metrics(y, labelled["probability"].to_numpy(dtype=np.float64))
        return Performance(len(y), positives, metric, m[metric], m)
    if task == "multiclass":  # labels of a class this version does not know cannot be scored
        labelled = labelled[labelled["label"].isin(classes) & labelled["scores"].notna()]
    else:
        labelled = labelled[labelled["value"].notna()]
    if len(labelled) < min_rows:
        return None
    if task == "regression":
        m = regression_metrics(labelled["label"].to_numpy(dtype=np.float64),
                               labelled["value"].to_numpy(dtype=np.float64))
    else:
        index = {c: i for i, c in enumerate(classes)}
        scores = [orjson.loads(s) for s in labelled["scores"]]
        P = np.array([[row.get(c, 0.0) for c in classes] for row in scores], dtype=np.float64)
        m = multiclass_metrics(np.array([index[c] for c in labelled["label"]]), P, classes)
    return Performance(len(labelled), 0, metric, m[metric], m)


def performance_dropped(perf: Performance | None, promised: float | None, cfg: MonitoringConfig,
                        task: str) -> bool:
    """Whether the window's value of the gate's metric fell below what the serving versions
    promised: for ROC-AUC and PR-AUC (binary) by more than `max_auc_drop`, for every other metric
    by more than `max_relative_drop` of the promise, in the metric's direction."""
    if perf is None or promised is None or not np.isfinite(perf.value):
        return False
    absolute = task == "binary" and perf.metric in ("roc_auc", "pr_auc")
    margin = cfg.max_auc_drop if absolute else cfg.max_relative_drop * abs(promised)
    worse = promised - perf.value if HIGHER_IS_BETTER[perf.metric] else perf.value - promised
    return bool(worse > margin)


def estimate_dropped(estimated: Estimate | None, promised: float | None, cfg: MonitoringConfig,
                     task: str) -> bool:
    """Whether the estimate is worse than promised by the same margins as a realized drop."""
    if estimated is None or estimated.value is None:
        return False
    return performance_dropped(Performance(estimated.rows, 0, estimated.metric, estimated.value),
                               promised, cfg, task)


def run_monitor(project: Project, registry: Registry | None = None, window: MonitorWindow | None = None,
                at: datetime | None = None, report: bool | None = None) -> MonitorVerdict:
    """Monitor the latest window of predictions of the champion's model; store the verdicts."""
    cfg = project.config.monitoring
    window = window or cfg.window
    registry = registry or Registry.for_project(project)
    engine = open_state(project.state_url)
    version = registry.alias_version(CHAMPION)
    if version is None:
        raise MonitorError("no champion: nothing is served, so there is nothing to monitor")
    started = time.perf_counter()
    profile, sample_path, spec = _version_facts(registry, version, project.home / "cache")
    fetched: dict[int, bytes] = {}  # the log's segments, read once for the window and its labels
    frame = read_window(engine, registry.model_name, window, at, project.config.data, spec.input_columns,
                        fetched)
    if len(frame) < 100:
        raise MonitorError(f"only {len(frame)} predictions in the window{_described(window)}; "
                           "monitoring needs at least 100")
    missing = [c for c in spec.input_columns if c not in frame.columns]
    if missing:
        raise MonitorError(f"logged inputs lack column(s) {', '.join(missing)} that v{version} uses")
    X = build_matrix(spec, frame)
    current = feature_frame(spec, X)
    unseen = unseen_categories(spec, frame, X)
    current[PREDICTION] = served_prediction(spec, frame)
    drift = detect_drift(profile, current, cfg.drift_threshold, cfg.drift_share, columns=spec.names)
    pred = detect_drift(profile, current, cfg.drift_threshold, 1.0, columns=[PREDICTION]).columns[0]
    labelled = labelled_window(project, engine, registry.model_name, cfg.performance_rows, at or now(),
                               frame["id"] if window.by == "event" else None,
                               _utc_midnight(window.start) if window.by == "event" else None, fetched)
    metric = project.config.gate.metric
    perf = window_performance(labelled, cfg.min_labelled, cfg.min_positives, spec, metric)
    promised = expected_metric(registry, labelled, metric) if perf is not None else None
    drop = performance_dropped(perf, promised, cfg, spec.task)
    estimated, audit, estimated_drop = None, None, False
    if cfg.estimation.enabled:
        estimated, estimate_for = window_estimate(registry, spec, frame, X, engine, metric, cfg,
                                                  project.home / "cache")
        audit = audit_window(frame["id"], estimate_for, labelled, spec, metric, cfg)
        estimated_drop = estimate_dropped(estimated, expected_metric(registry, frame, metric), cfg,
                                          spec.task)
    seconds = time.perf_counter() - started
    w_start, w_end = (frame["created_at"].min(), frame["created_at"].max()) if window.by != "event" \
        else (_utc_midnight(window.start), _utc_midnight(window.end))
    verdict_id = _store(engine, registry.model_name, version, window.by, w_start, w_end, drift,
                        pred.score, perf, drop, seconds, unseen, estimated, audit, estimated_drop)
    earlier = audit_earlier_windows(project, registry, engine, spec, metric, verdict_id, at or now(),
                                    fetched) if cfg.estimation.enabled else []
    report_path, mlflow_run = None, None
    if _report_wanted(cfg.evidently_report if report is None else report):
        folder = project.monitoring_dir / f"{verdict_id:06d}"
        report_path = evidently_report(pd.read_parquet(sample_path), current, spec, folder,
                                       cfg.report_sample_rows, cfg.drift_threshold, cfg.drift_share)
        mlflow_run = _log_to_mlflow(registry, version, verdict_id, folder, drift, pred.score, perf, drop)
        with engine.begin() as conn:
            conn.execute(monitor_runs.update().where(monitor_runs.c.id == verdict_id).values(
                report_path=str(report_path), mlflow_run_id=mlflow_run))
    return MonitorVerdict(verdict_id, registry.model_name, version, window.by, w_start, w_end, drift,
                          pred.score, perf, drop, seconds, report_path, mlflow_run, unseen, estimated,
                          audit, estimated_drop, earlier)


_ESTIMATORS: dict[tuple[str, str, int], tuple[Calibration | LossModel | None, str | None]] = {}


def calibration_of(registry: Registry, version: int, cache: Path
                   ) -> tuple[Calibration | LossModel | None, str | None]:
    """A version's calibration (a classifier) or loss models (a regression), hash-checked, or None
    and why: fetched once per process."""
    key = (registry.tracking_url, registry.model_name, version)
    if key not in _ESTIMATORS:
        try:
            folder = registry.download_attached(version, ESTIMATION_ARTIFACT,
                                                cache / f"estimation-v{version}")
        except RegistryError as exc:
            if registry.attached_hashes(version, ESTIMATION_ARTIFACT):
                raise  # files that fail their hash are never used
            log.debug("no calibration", extra={"version": version, "error": str(exc)})
            _ESTIMATORS[key] = (None, f"v{version} has nothing to estimate with (trained before "
                                      "performance estimation existed): retrain it to get estimates")
        else:
            data = json.loads((folder / CALIBRATION_FILE).read_text())
            if "refused" in data:
                what = "loss model could not be fitted" if data.get("task") == "regression" \
                    else "probabilities could not be calibrated"
                _ESTIMATORS[key] = (None, f"v{version}'s {what}: {data['refused']}")
            else:
                _ESTIMATORS[key] = (LossModel.from_dict(data) if data.get("method") == "dle"
                                    else Calibration.from_dict(data), None)
    return _ESTIMATORS[key]


def regression_estimate(registry: Registry, frame: pd.DataFrame, X: np.ndarray, metric: str,
                        cfg: MonitoringConfig, cache: Path) -> Estimate:
    """RMSE or MAE of a regression's window from its rows' predicted errors, each row's from the
    loss models of the version that answered it."""
    values = pd.to_numeric(frame[SERVED_VALUE], errors="coerce").to_numpy(dtype=np.float64)
    versions = frame["model_version"].to_numpy()
    e = cfg.estimation
    settings = EstimationSettings(e.min_rows, e.draws, e.sample_rows, e.band_sigmas)
    absolute, squared, why = [], [], []
    spreads: list[tuple[int, LossModel]] = []
    for version in np.unique(versions):
        model, reason = calibration_of(registry, int(version), cache)
        if not isinstance(model, LossModel):
            why.append(reason or f"v{version} has no loss model")
            continue
        rows = np.flatnonzero((versions == version) & np.isfinite(values))
        rows = rows[loss_sample(len(rows), settings)]
        a, q = model.predict(X[rows], values[rows])
        absolute.append(a)
        squared.append(q)
        spreads.append((int(((versions == version) & np.isfinite(values)).sum()), model))
    if not absolute:
        return refused(metric, len(frame), "; ".join(why), "dle")
    n = sum(k for k, _ in spreads)
    # one spread for the window: the versions' own, weighted by their rows
    model = LossModel("", "", sum(k * m.absolute_spread for k, m in spreads) / n,
                      sum(k * m.squared_spread for k, m in spreads) / n, n,
                      sum(k * m.absolute_bias for k, m in spreads) / n,
                      sum(k * m.squared_bias for k, m in spreads) / n)
    return estimate_loss(metric, np.concatenate(absolute), np.concatenate(squared), model, settings, n)


@dataclass(frozen=True)
class CalibratedWindow:
    """A window's answers with their calibrated probabilities: the rows of versions that have a
    calibration (`keep`), or why none has (`why`)."""

    ids: np.ndarray
    keep: np.ndarray
    p: np.ndarray  # calibrated probabilities (rows where `keep`)
    out: np.ndarray  # what was answered
    why: str

    def estimate(self, task: str, metric: str, cfg: MonitoringConfig, classes: list[str],
                 rows: np.ndarray | None = None) -> Estimate:
        use = self.keep if rows is None else self.keep & rows
        if not use.any():
            return refused(metric, int(len(self.keep) if rows is None else rows.sum()),
                           self.why or "no row of the window has a calibration")
        e = cfg.estimation
        settings = EstimationSettings(e.min_rows, e.draws, e.sample_rows, e.band_sigmas)
        return estimate(task, metric, self.p[use], self.out[use], settings, classes)


def calibrated_window(registry: Registry, spec: FeatureSpec, frame: pd.DataFrame, engine: sa.Engine,
                      cache: Path) -> CalibratedWindow:
    """Each row calibrated by the version that answered it (a window of a backfill or across a
    promotion holds several); rows of a version without a calibration are left out."""
    if spec.task == "binary":
        out = frame["probability"].to_numpy(dtype=np.float64)
    else:
        out = _class_scores(engine, registry.model_name, frame["id"], spec.classes)
    versions = frame["model_version"].to_numpy()
    ids = frame["id"].to_numpy(dtype=np.int64)
    if out.ndim == 1:  # rows in the order of their answers: a calibration reads sorted scores
        order = np.argsort(out, kind="stable")  # ten times faster, and the estimate sorts them anyway
        out, versions, ids = out[order], versions[order], ids[order]
    answered = np.isfinite(out) if out.ndim == 1 else np.isfinite(out).all(axis=1)
    keep = np.zeros(len(frame), dtype=bool)
    p = np.zeros(out.shape)
    why = []
    width = 1 if out.ndim == 1 else out.shape[-1]
    for version in np.unique(versions):
        calibration, reason = calibration_of(registry, int(version), cache)
        if not isinstance(calibration, Calibration) or len(calibration.steps) != width:
            why.append(reason or f"v{version}'s calibration does not match its answers")
            continue
        rows = (versions == version) & answered
        p[rows] = calibration.apply(out[rows])
        keep |= rows
    return CalibratedWindow(ids, keep, p, out, "; ".join(why))


def window_estimate(registry: Registry, spec: FeatureSpec, frame: pd.DataFrame, X: np.ndarray,
                    engine: sa.Engine, metric: str, cfg: MonitoringConfig, cache: Path
                    ) -> tuple[Estimate, Callable[[np.ndarray], Estimate]]:
    """The gate's metric estimated over the window from what its rows were answered, and a function
    that estimates it for the rows of given ids (for the audit)."""
    if spec.task == "regression":
        def for_ids(ids: np.ndarray) -> Estimate:
            rows = frame["id"].isin(ids).to_numpy()
            return regression_estimate(registry, frame[rows], X[rows], metric, cfg, cache)

        return regression_estimate(registry, frame, X, metric, cfg, cache), for_ids
    window = calibrated_window(registry, spec, frame, engine, cache)
    return window.estimate(spec.task, metric, cfg, spec.classes), \
        lambda ids: window.estimate(spec.task, metric, cfg, spec.classes, np.isin(window.ids, ids))


def audit_window(ids: pd.Series, estimate_for: Callable[[np.ndarray], Estimate], labelled: pd.DataFrame,
                 spec: FeatureSpec, metric: str, cfg: MonitoringConfig) -> Audit | None:
    """Once at least `audit_labelled_share` of the window's rows (`ids`) are labelled: the metric
    realized on the labelled rows against the estimate made for the same rows from their answers
    alone; a realized value outside the band is a probable concept shift. None before that."""
    if not len(ids):
        return None
    inside = labelled[labelled["id"].isin(ids)]
    share = len(inside) / len(ids)
    if share < cfg.estimation.audit_labelled_share:
        return None
    perf = window_performance(inside, 1, 1, spec, metric)
    if perf is None:
        return None
    estimated = estimate_for(inside["id"].to_numpy(dtype=np.int64))
    covered = estimated.covers(perf.value)
    if covered is None:
        return None
    return Audit(len(inside), share, estimated, perf.value, not covered)


# Earlier windows re-checked per monitoring run, oldest first (the likeliest to have their labels),
# at most this many and this many rows in all (reading a million rows back costs about a second)
EARLIER_AUDITS = 20
EARLIER_AUDIT_ROWS = 1_000_000
EARLIER_SOURCE_LOOKUPS = 3


def audit_earlier_windows(project: Project, registry: Registry, engine: sa.Engine, spec: FeatureSpec,
                          metric: str, before: int, at: datetime, cache: dict[int, bytes]
                          ) -> list[tuple[int, Audit]]:
    """The audit of earlier windows whose labels have arrived since they were monitored (a loan's
    outcome is known two years after it was scored): stored windows with an estimate and no audit
    yet are read again (see EARLIER_AUDITS), and audited once `audit_labelled_share` of their rows
    are labelled; the verdict is stored with that window. Returns the windows audited now."""
    cfg, name, r = project.config.monitoring, registry.model_name, monitor_runs
    with engine.connect() as conn:
        pending = conn.execute(sa.select(r.c.id, r.c.window_kind, r.c.window_start, r.c.window_end,
                                         r.c.rows).where(
            r.c.model_name == name, r.c.id < before, r.c.estimated_value.is_not(None),
            r.c.concept_shift.is_(None), r.c.window_start.is_not(None), r.c.window_end.is_not(None))
            .order_by(r.c.id).limit(EARLIER_AUDITS)).all()
    done: list[tuple[int, Audit]] = []
    read = source_lookups = 0
    # a project whose labels are sent back is audited on those; one that sends none, on its source's
    sends_labels = _any_label_sent_back(engine, name, spec.task) if pending else False
    for run_id, kind, start, end, rows in pending:
        read += rows
        if read > EARLIER_AUDIT_ROWS and read > rows:  # the next run goes on from here
            break
        start, end = _aware(start), _aware(end)
        if kind != "event" and sends_labels and _labels_sent_back(engine, name, spec.task, start, end) < \
                cfg.estimation.audit_labelled_share * rows:
            continue  # labels come back here, not enough of this window's yet: not worth reading it
        if kind == "event":
            frame = read_window(engine, name, MonitorWindow(by="event", start=start.date(), end=end.date()),
                                at, project.config.data, spec.input_columns, cache)
        else:  # the rows served between the window's first and last
            with engine.connect() as conn:
                found = read_log(conn, name, start=start, end=end + timedelta(microseconds=1),
                                 inputs=spec.input_columns, categories=True, cache=cache)
            frame = side_by_side(found.base.rename(columns={"value": SERVED_VALUE, "label": SERVED_LABEL}),
                                 found.inputs) if len(found) else pd.DataFrame()
        if not len(frame):
            continue
        # Labels sent back (one query); the source database's (a lookup per window, about 0.4 s
        # for 15,000 SBA loans) only for a project that sends none back, a few windows a run.
        labelled = read_labelled(engine, name, cfg.performance_rows, frame["id"], spec.task, start)
        if len(labelled) < cfg.estimation.audit_labelled_share * len(frame):
            if sends_labels or source_lookups >= EARLIER_SOURCE_LOOKUPS:
                continue
            source_lookups += 1
            labelled = labelled_window(project, engine, name, cfg.performance_rows, at, frame["id"], start,
                                       cache)
        X = build_matrix(spec, frame) if spec.task == "regression" else np.zeros((len(frame), 0))
        _, estimate_for = window_estimate(registry, spec, frame, X, engine, metric, cfg,
                                          project.home / "cache")
        audit = audit_window(frame["id"], estimate_for, labelled, spec, metric, cfg)
        if audit is None:
            continue
        with engine.begin() as conn:
            conn.execute(r.update().where(r.c.id == run_id).values(**_audit_columns(audit)))
        done.append((int(run_id), audit))
    return done


def _labels_sent_back(engine: sa.Engine, model_name: str, task: str, start: datetime, end: datetime) -> int:
    """How many predictions served in [start, end] have a label sent back (one counting query)."""
    p, truth = predictions.c, _TRUTH[task]
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(
            predictions.join(feedback, feedback.c.record_id == p.record_id)).where(
            p.model_name == model_name, p.created_at >= start, p.created_at <= end,
            truth.is_not(None))).scalar_one())


def _any_label_sent_back(engine: sa.Engine, model_name: str, task: str) -> bool:
    p, truth = predictions.c, _TRUTH[task]
    with engine.connect() as conn:
        return conn.execute(sa.select(p.id).select_from(
            predictions.join(feedback, feedback.c.record_id == p.record_id)).where(
            p.model_name == model_name, truth.is_not(None)).limit(1)).first() is not None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _audit_columns(audit: Audit | None) -> dict[str, Any]:
    return {"audit_rows": audit.rows if audit else None,
            "audit_realized": _finite(audit.realized) if audit else None,
            "audit_estimate": audit.estimate.value if audit else None,
            "audit_low": audit.estimate.low if audit else None,
            "audit_high": audit.estimate.high if audit else None,
            "concept_shift": audit.shift if audit else None}


def _class_scores(engine: sa.Engine, model_name: str, ids: pd.Series, classes: list[str]) -> np.ndarray:
    """The class probabilities answered for the rows `ids`, in their order (multiclass keeps them
    in the row, not the segment); NaN for a row without them."""
    out = np.full((len(ids), len(classes)), np.nan)
    if not len(ids):
        return out
    p = predictions.c
    with engine.connect() as conn:
        found = dict(conn.execute(sa.select(p.id, p.scores).where(
            p.model_name == model_name, p.id.between(int(ids.min()), int(ids.max())),
            p.scores.is_not(None))).all())
    for i, rid in enumerate(ids.astype(np.int64).tolist()):
        scores = found.get(rid)
        if scores is not None:
            row = orjson.loads(scores)
            out[i] = [row.get(c, 0.0) for c in classes]
    return out


def unseen_categories(spec: FeatureSpec, frame: pd.DataFrame, X: np.ndarray) -> dict[str, int]:
    """For each category feature, the rows with a value (not empty) outside the model's vocabulary:
    a value never seen in training, or too rare there to be learnt; the model scores them all as
    one 'other' category, which is worth knowing when it grows."""
    out = {}
    for i in spec.categorical_indices:
        f = spec.features[i]
        other = X[:, i] == len(spec.vocabularies.get(f.name, []))
        present = frame[f.column].notna().to_numpy()  # type: ignore[union-attr]  # category: column
        out[f.name] = int((other & present).sum())
    return out


def _store(engine: sa.Engine, model_name: str, version: int, kind: str, start: Any, end: Any,
           drift: DriftResult, prediction_drift: float, perf: Performance | None, drop: bool,
           seconds: float, unseen: dict[str, int], estimated: Estimate | None = None,
           audit: Audit | None = None, estimated_drop: bool = False) -> int:
    with engine.begin() as conn:
        verdict_id = conn.execute(monitor_runs.insert().values(  # type: ignore[index]
            model_name=model_name, model_version=version, window_kind=kind, window_start=start,
            window_end=end, rows=drift.rows, drift_share=drift.share, drift_detected=drift.detected,
            prediction_drift=_finite(prediction_drift), labelled_rows=perf.rows if perf else 0,
            roc_auc=_finite(perf.roc_auc) if perf else None, pr_auc=_finite(perf.pr_auc) if perf else None,
            brier=_finite(perf.brier) if perf else None, performance_drop=drop, seconds=seconds,
            created_at=now(), metric=perf.metric if perf else None,
            metric_value=_finite(perf.value) if perf else None,
            metrics=orjson.dumps({k: v for k, v in perf.metrics.items() if np.isfinite(v)}).decode()
            if perf else None,
            estimated_metric=estimated.metric if estimated else None,
            estimated_value=_finite(estimated.value) if estimated and estimated.value is not None else None,
            estimated_low=estimated.low if estimated else None,
            estimated_high=estimated.high if estimated else None,
            estimate_note=estimated.reason if estimated else None,
            estimated_drop=estimated_drop,
            **_audit_columns(audit),
        )).inserted_primary_key[0]
        conn.execute(monitor_columns.insert(), [
            {"run_id": verdict_id, "column_name": c.column, "stattest": c.stattest,
             "score": _finite(c.score) or 0.0, "threshold": c.threshold, "drifted": c.drifted,
             "unseen_rows": unseen.get(c.column)}
            for c in drift.columns
        ])
    return int(verdict_id)


def _described(window: MonitorWindow) -> str:
    if window.by == "event":
        return f" (event time in [{window.start}, {window.end}))"
    return f" (the latest {window.hours:g} hours)" if window.by == "time" else ""


def _report_wanted(setting: bool | None) -> bool:
    """Evidently's report: when asked for (an error naming the extra if it is missing), or by
    default when its extra is installed."""
    if setting is None:
        if not installed("reports"):
            log.warning(without("reports", "monitoring without Evidently's HTML report"))
        return installed("reports")
    if setting:
        require("reports", "monitoring.evidently_report: true")
    return setting


def _finite(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def evidently_report(reference: pd.DataFrame, current: pd.DataFrame, spec: FeatureSpec, folder: Path,
                     sample_rows: int, threshold: float, share: float, seed: int = 0) -> Path:
    """Evidently's DataDriftPreset on samples of both sides: report.html and report.json.

    It carries the project's thresholds, so that the report and the verdict say the same: a
    column drifts at `threshold`, the data when `share` of the features do. The preset covers the
    features only, as the verdict does; the prediction's drift is its own metric beside it."""
    import os

    os.environ.setdefault("DO_NOT_TRACK", "1")
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset

    folder.mkdir(parents=True, exist_ok=True)
    cats = categorical_features(spec) + ([PREDICTION] if spec.task == "multiclass" else [])
    columns = spec.names + [PREDICTION]
    ref = reference[columns].sample(n=min(sample_rows, len(reference)), random_state=seed)
    cur = current[columns].sample(n=min(sample_rows, len(current)), random_state=seed)
    for c in cats:  # Evidently reads categories from strings
        ref[c] = ref[c].astype("Int64").astype(str)
        cur[c] = cur[c].astype("Int64").astype(str)
    definition = DataDefinition(numerical_columns=[c for c in columns if c not in cats],
                                categorical_columns=cats)
    snapshot = Report([DataDriftPreset(columns=spec.names, threshold=threshold, drift_share=share),
                       ValueDrift(column=PREDICTION, threshold=threshold)]).run(
        Dataset.from_pandas(cur, data_definition=definition),
        Dataset.from_pandas(ref, data_definition=definition))
    html = folder / "report.html"
    snapshot.save_html(str(html))
    (folder / "report.json").write_text(snapshot.json())
    return html


def _log_to_mlflow(registry: Registry, version: int, verdict_id: int, folder: Path, drift: DriftResult,
                   prediction_drift: float, perf: Performance | None, drop: bool) -> str:
    tags = {"flywheel.kind": "monitoring", "model_version": str(version), "verdict_id": str(verdict_id)}
    with registry.run(f"monitor-{verdict_id:06d}-v{version}", tags) as run_id:
        metrics: dict[str, float] = {"drift_share": drift.share, "rows": float(drift.rows),
                                     "dataset_drift": float(drift.detected),
                                     "performance_drop": float(drop)}
        if np.isfinite(prediction_drift):
            metrics["prediction_drift"] = prediction_drift
        metrics.update({f"drift_{c.column}": c.score for c in drift.columns if np.isfinite(c.score)})
        if perf is not None:
            metrics.update({f"window_{k}": v for k, v in perf.metrics.items()
                            if k != "rows" and np.isfinite(v)})
            metrics["labelled_rows"] = float(perf.rows)
        registry.log_metrics(run_id, metrics)
        for path in sorted(folder.iterdir()):
            registry.log_artifact(run_id, path, "evidently")
    return run_id
