"""The one place that knows flywheel.yaml: pydantic models, FLYWHEEL_* overrides, paths."""

from __future__ import annotations

import hashlib
import json
import math
import os
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from flywheel.core.errors import FlywheelError
from flywheel.core.secrets import with_file_secrets
from flywheel.core.trees import first_path

# Environment variables that are settings of the process, not fields of the config file.
_NOT_CONFIG_ENV = {"FLYWHEEL_HOME", "FLYWHEEL_CACHE_DIR", "FLYWHEEL_SLACK_WEBHOOK",
                   "FLYWHEEL_ADMIN_TOKEN", "FLYWHEEL_CONFIG"}


class ConfigError(FlywheelError, ValueError):
    """A config file that cannot be used; the message names the file, the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Stores(_Strict):
    """Three SQLAlchemy URLs. Unset means a SQLite file under the project's .flywheel/ folder."""

    # SQLAlchemy URL of the business data (default: SQLite under .flywheel/).
    source: str | None = None
    # MLflow's tracking and registry store: a SQLAlchemy URL, or an MLflow server's http(s):// URL.
    tracking: str | None = None
    # Flywheel's own tables: alias history, prediction log, verdicts, runs (default: SQLite).
    state: str | None = None


class Window(_Strict):
    """Half-open time window [start, end) on the time column."""

    # First time in the window (included).
    start: date
    # End of the window (excluded).
    end: date

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        return self


Task = Literal["binary", "regression", "multiclass"]
TASKS: tuple[str, ...] = ("binary", "regression", "multiclass")
# The metrics each task is measured by on the holdout and in monitoring; the gate may use any.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("roc_auc", "pr_auc", "log_loss", "brier"),
    "regression": ("rmse", "mae", "r2", "mape"),
    "multiclass": ("log_loss", "accuracy", "macro_f1", "weighted_f1", "macro_roc_auc"),
}
DEFAULT_GATE_METRIC = {"binary": "roc_auc", "regression": "rmse", "multiclass": "log_loss"}


class PerformanceWindowTarget(_Strict):
    """Positive when the event happened within `months` of the row's time; known `months` later."""

    # A label made from an event within a performance window after each row's time.
    kind: Literal["performance_window"]
    # Always binary: the event happened within the window or not.
    task: Literal["binary"] = "binary"
    # The column that records the event (e.g. the loan's status).
    event_column: str
    # The value of `event_column` that is the event (e.g. CHGOFF).
    event_value: str
    # When the event happened.
    event_time_column: str
    # The window's length: an event later than this is a negative; a row is labelled only this long after
    # its time.
    months: int = Field(gt=0, le=240)


class ColumnTarget(_Strict):
    """The value of `column`, known as soon as the row exists. `task: binary` (the default): positive
    when it equals `positive`; `regression`: the number itself; `multiclass`: one of `classes`
    (default: the classes the training window holds, in sorted order). Rows whose target is empty
    are not labelled yet (regression, multiclass)."""

    # The label is a column of the table.
    kind: Literal["column"]
    # The column to predict.
    column: str
    # binary (two values), regression (a number) or multiclass (one of several values).
    task: Task = "binary"
    # Binary: the value that is the positive class (default: found from the values).
    positive: str | int | bool | None = None
    # Multiclass: the classes, in order (default: those the window holds, sorted).
    classes: list[str] | None = Field(default=None, min_length=2)

    @model_validator(mode="after")
    def _fits_the_task(self) -> ColumnTarget:
        if self.task == "binary" and self.positive is None:
            raise ValueError("a binary target needs `positive`: the value of the column that "
                             "counts as the event (or set task: regression | multiclass)")
        if self.task != "binary" and self.positive is not None:
            raise ValueError(f"`positive` is for task: binary, not {self.task}")
        if self.classes is not None:
            if self.task != "multiclass":
                raise ValueError(f"`classes` is for task: multiclass, not {self.task}")
            if len(set(self.classes)) != len(self.classes):
                raise ValueError("target.classes repeats a class")
        return self


Target = Annotated[PerformanceWindowTarget | ColumnTarget, Field(discriminator="kind")]


TimeUnit = Literal["date", "year", "month", "text"]


class SparkConfig(_Strict):
    """Where Spark runs when `data.engine` is spark: `local[N]` (this machine, N cores), a
    standalone cluster (`spark://HOST:7077`), or what a managed service gives; any Spark setting
    in `conf`; extra jars (a JDBC driver) in `jars`."""

    # local[N], a standalone cluster spark://HOST:7077, or what a managed service gives.
    master: str = "local[2]"
    # The Spark application's name.
    app_name: str = "flywheel"
    # Any Spark setting, as in spark-defaults.conf.
    conf: dict[str, str] = {}
    # More jars for the session (Debian's PostgreSQL JDBC driver is added when present).
    jars: list[str] = []
    # A PostgreSQL source is read over JDBC by Spark in this many parallel slices of the id column
    # (an integer id; one slice otherwise).
    jdbc_partitions: int = Field(default=4, ge=1, le=1024)


class DataConfig(_Strict):
    """Where the rows are and what time means for them.

    `time_unit` says what the time column holds: `date` (a DATE, DATETIME or TIMESTAMP column, or
    ISO text), `year` (an integer such as 2017), `month` (an integer YYYYMM such as 201703) or `text`
    (dates written as `time_format`, a strftime pattern such as "%d/%m/%Y"). A year or a month
    stands for its first day. With `year` or `month`, the window may be written in that unit
    (`start: 2010`, `start: 201001`).
    """

    # The source table that holds the rows.
    table: str
    # Each row's unique id.
    id_column: str
    # When each row happened: windows, splits and monitoring follow it.
    time_column: str
    # What the time column holds: a date or timestamp, a year (2017), a month (201703) or text.
    time_unit: TimeUnit = "date"
    # With time_unit text: its strftime pattern, such as %d/%m/%Y (none: ISO text).
    time_format: str | None = None
    # The half-open time window to train on.
    window: Window
    # What to predict: a column, or an event within a performance window.
    target: Target
    # Train only on labels known by this date (default: the window's end).
    as_of: date | None = None
    # What computes the features at training: DuckDB in this process, or Spark (data.spark).
    # Serving computes them per record in Python either way, with the same values.
    engine: Literal["duckdb", "spark"] = "duckdb"
    # The Spark session, when data.engine is spark.
    spark: SparkConfig = SparkConfig()

    @model_validator(mode="before")
    @classmethod
    def _window_in_the_time_unit(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or not isinstance(raw.get("window"), dict):
            return raw
        unit = raw.get("time_unit", "date")
        window = dict(raw["window"])
        for key in ("start", "end"):
            value = window.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                window[key] = period_start(value, unit, f"window.{key}")
        return {**raw, "window": window}

    @model_validator(mode="after")
    def _format_only_for_text(self) -> DataConfig:
        if self.time_format and self.time_unit != "text":
            raise ValueError(f"time_format is for time_unit: text, not {self.time_unit}")
        return self


def period_start(value: int, unit: str, where: str) -> date:
    """The first day of an integer period: a year (2017) or a month written YYYYMM (201703)."""
    if unit == "year" and 1 <= value <= 9999:
        return date(value, 1, 1)
    if unit == "month" and 1 <= value % 100 <= 12 and 1 <= value // 100 <= 9999:
        return date(value // 100, value % 100, 1)
    if unit in ("year", "month"):
        shape = "a year such as 2017" if unit == "year" else "a month written YYYYMM such as 201703"
        raise ValueError(f"{where} is {value}: with time_unit {unit} it must be {shape}")
    raise ValueError(f"{where} is the number {value} but time_unit is {unit}: write a date "
                     "(2017-01-01), or set data.time_unit to year (2017) or month (201703)")


class NumericFeature(_Strict):
    # A column's number, as it is.
    kind: Literal["numeric"]
    # The feature's name (what the model and the reports call it).
    name: str
    # The source column.
    column: str


class RatioFeature(_Strict):
    # One column divided by another; missing when the denominator is 0 or missing.
    kind: Literal["ratio"]
    # The feature's name.
    name: str
    # The column on top.
    numerator: str
    # The column below.
    denominator: str


class FlagFeature(_Strict):
    """1.0 when `column OP value` (or `column OP other`) holds, 0.0 when not, missing when null."""

    # 1 when a comparison holds, else 0.
    kind: Literal["flag"]
    # The feature's name.
    name: str
    # The column compared.
    column: str
    # The comparison: == != > >= < <= or in.
    op: Literal["==", "!=", ">", ">=", "<", "<=", "in"]
    # What it is compared with (a list for in).
    value: str | float | int | list[str | float | int] | None = None
    # Or another column to compare with.
    other: str | None = None

    @model_validator(mode="after")
    def _one_operand(self) -> FlagFeature:
        if (self.value is None) == (self.other is None):
            raise ValueError("give exactly one of 'value' or 'other'")
        if self.op == "in" and not isinstance(self.value, list):
            raise ValueError("op 'in' needs 'value' to be a list")
        if self.op != "in" and isinstance(self.value, list):
            raise ValueError(f"op '{self.op}' needs a single 'value', not a list")
        return self


class BucketFeature(_Strict):
    """Index of the bucket the value falls in, given increasing edges."""

    # The index of the interval a number falls in.
    kind: Literal["bucket"]
    # The feature's name.
    name: str
    # The column bucketed.
    column: str
    # Increasing edges of the intervals.
    edges: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _increasing(self) -> BucketFeature:
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must be strictly increasing")
        return self


class CategoryFeature(_Strict):
    """A category passed through; the vocabulary is learnt on the training slice."""

    # A text column's values, the frequent ones kept and the rest as other.
    kind: Literal["category"]
    # The feature's name.
    name: str
    # The column.
    column: str
    # Keep only the value's first N characters (an industry code's sector, say).
    prefix: int | None = Field(default=None, gt=0)
    # Keep at most this many values, the most frequent.
    max_categories: int = Field(default=50, gt=0, le=10_000)
    # A value seen fewer times than this in training is other.
    min_count: int = Field(default=20, ge=1)


Feature = Annotated[
    NumericFeature | RatioFeature | FlagFeature | BucketFeature | CategoryFeature,
    Field(discriminator="kind"),
]


class ChecksConfig(_Strict):
    # Training stops on fewer labelled rows than this.
    min_rows: int = 1000
    # Each class needs at least this many labelled rows (a rate floor would reject rare events).
    min_class_rows: int = Field(default=50, ge=1)
    # Training stops when a feature is missing in more than this share of rows.
    max_null_fraction: float = Field(default=0.5, ge=0, le=1)
    # Any single feature whose standalone ROC-AUC reaches this stops training (binary; multiclass:
    # the macro one-vs-rest ROC-AUC). 0.9: at 0.8 a legitimate feature (a customer's age, 0.84) was
    # stopped on data we had not seen; the leaks we know reach more (the SBA loans' Term: 0.94).
    leakage_auc_threshold: float = Field(default=0.9, gt=0.5, le=1)
    # Regression: any single feature whose out-of-sample R-squared alone reaches this (a
    # correlation of about 0.87) stops training. Fixed before the example data was measured.
    leakage_r2_threshold: float = Field(default=0.75, gt=0, le=1)
    # Regression: the values a target may take; a row outside stops training (a unit or entry error).
    target_range: tuple[float, float] | None = None
    # Features the leakage screen may pass although they reach the threshold (say why in the config).
    accept_leaky: list[str] = []


class SplitConfig(_Strict):
    # The share of the window, by time, for early stopping.
    validation_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    # The latest share of the window, by time, held out for the gate.
    holdout_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    # The most of a holdout that rows learnt from /v1/feedback may make up when it also holds
    # source rows: the gate decides on it, and callers choose what they label and when it happened.
    max_feedback_share: float = Field(default=0.5, gt=0, le=1)


class ModelConfig(_Strict):
    # The trainer: lightgbm, sklearn (a logistic or ridge pipeline) or torch-mlp.
    type: Literal["lightgbm", "sklearn", "torch-mlp"] = "lightgbm"
    # The trainer's parameters (see Configuration: trainer parameters).
    params: dict[str, Any] = {}
    # Seed of every random choice in training.
    seed: int = 42


GateMetric = Literal["roc_auc", "pr_auc", "log_loss", "brier", "rmse", "mae", "r2", "mape",
                     "accuracy", "macro_f1", "weighted_f1", "macro_roc_auc"]


class GateConfig(_Strict):
    # default: roc_auc (binary), rmse (regression), log_loss (multiclass)
    metric: GateMetric = "roc_auc"
    # The worst value of the gate's metric a challenger may have and be promoted.
    floor: float
    # How much better than the champion, on the same holdout, a challenger must be.
    min_improvement: float = Field(default=0.0, ge=0)
    # Refuse a challenger that needs an input the champion's clients do not send, or changes one's type.
    require_schema_compatible: bool = True


class PredictionLogConfig(_Strict):
    """The batched writer of the prediction log: bounded, never silently lossy."""

    # Records the log may hold in memory before requests wait for room.
    queue_size: int = Field(default=100_000, ge=1)
    # Rows per frame sent to the log sink, each one insert transaction there.
    batch_size: int = Field(default=128, ge=1, le=100_000)
    # The longest a record waits in memory before it is sent to the log sink.
    flush_interval_s: float = Field(default=0.05, gt=0, le=60)
    # A full queue makes the request wait this long for room, then the record is counted as dropped.
    queue_wait_s: float = Field(default=0.25, ge=0, le=60)
    # Keep this many days of predictions (None: keep every one). `flywheel run` applies it on
    # each check, `flywheel log prune` on demand; PostgreSQL drops whole day partitions.
    retention_days: int | None = Field(default=None, ge=1)


class ConnectionLimits(_Strict):
    """What one client may hold of a worker: a request's headers (size, time to arrive), its body's
    time to arrive, an idle keep-alive connection's life, and the connections open at once
    (beyond `max_connections` a request is answered 503)."""

    # Request headers larger than this get 431 and the connection closes.
    max_header_bytes: int = Field(default=32_768, ge=1024, le=1_048_576)
    # Headers not complete within this get 408 and a close.
    header_timeout_s: float = Field(default=10.0, gt=0, le=600)
    # A body not complete within this of its headers gets 408 and a close.
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # An idle keep-alive connection is closed after this.
    keep_alive_s: int = Field(default=5, ge=1, le=600)
    # Connections at once per worker; more get 503.
    max_connections: int = Field(default=1_000, ge=1, le=100_000)


class PlausibleTimes(_Strict):
    """The times a request may carry (`meta.event_time`, a label's `observed_at`): from `earliest`
    to `max_future_days` after the server's clock. Anything outside is refused with a field error,
    never clamped: a time read in the wrong unit (a year taken for Unix seconds is 1970) would
    otherwise file rows under the wrong window, or put them in a holdout."""

    # meta.event_time and observed_at before this are refused.
    earliest: date = date(1900, 1, 1)
    # Times more than this many days ahead are refused.
    max_future_days: float = Field(default=1.0, ge=0, le=36_500)


Scope = Literal["predict", "feedback", "admin"]


class ServingClient(_Strict):
    """A caller of the prediction server: its name (logged with each prediction it asks for), the
    environment variable that holds its bearer token (or `<name>_FILE`, a mounted secret), and what
    it may do: `predict`, `feedback` (label only the record ids issued to it), `admin`."""

    # The client's name, in the log and the metrics.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # The environment variable (or _FILE) that holds its bearer token.
    token_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
    # What it may do: predict, feedback, admin.
    scopes: list[Scope] = Field(min_length=1)

    @model_validator(mode="after")
    def _not_a_config_override(self) -> ServingClient:
        if self.token_env.startswith("FLYWHEEL_"):
            raise ValueError(f"token_env {self.token_env}: FLYWHEEL_* variables are config overrides; "
                             "choose another name, e.g. SCORING_TOKEN_" + self.name.upper().replace("-", "_"))
        return self


class ServerConfig(_Strict):
    """What every `flywheel serve` has: where it listens, its workers, how often it checks the alias."""

    # The address the server binds.
    host: str = "127.0.0.1"
    # The port it listens on.
    port: int = Field(default=8000, ge=1, le=65535)
    # Worker processes.
    workers: int = Field(default=1, ge=1, le=64)
    # How often each worker checks where the champion alias points.
    reload_interval_s: float = Field(default=2.0, gt=0, le=3600)
    # Log one JSON line per request.
    access_log: bool = False
    # The connection limits (header size and time, body time, keep-alive, connections).
    connections: ConnectionLimits = ConnectionLimits()


class ServingConfig(ServerConfig):
    # Binary: the decision is positive when the probability reaches this.
    threshold: float = Field(default=0.5, ge=0, le=1)
    # Larger request bodies get 413.
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    # The most records in one request.
    max_records: int = Field(default=1_000, ge=1)
    # The longest text value a record may carry.
    max_string_length: int = Field(default=1_000, ge=1)
    # Labels for record ids this deployment did not issue (rows scored elsewhere): refused unless
    # set, so nobody can label what they were not served or fill the feedback table with junk.
    accept_unsigned_feedback: bool = False
    # The prediction log's writer: batching, waiting, retention.
    log: PredictionLogConfig = PredictionLogConfig()
    # The plausible range of a request's own times (meta.event_time, observed_at).
    times: PlausibleTimes = PlausibleTimes()
    # Callers with their own tokens and scopes. None declared: no token for predict and feedback
    # (the quick start), and /admin takes FLYWHEEL_ADMIN_TOKEN.
    clients: list[ServingClient] = []

    @model_validator(mode="after")
    def _clients_differ(self) -> ServingConfig:
        for field in ("name", "token_env"):
            values = [getattr(c, field) for c in self.clients]
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"clients: {field} {twice[0]} is given to two clients")
        return self


class MonitorWindow(_Strict):
    """Which predictions a monitoring run looks at: the latest `size` rows, those served in the
    latest `hours`, or those whose event time (the time column when the model reads it, else the
    request's meta.event_time, else when it was served) lies in [start, end)."""

    # count (the latest size predictions), time (the latest hours) or event (rows' own time in [start,
    # end)).
    by: Literal["count", "time", "event"] = "count"
    # With by count: how many predictions.
    size: int = Field(default=10_000, ge=100)
    # With by time: how many hours.
    hours: float = Field(default=24.0, gt=0)
    # With by event: the first time.
    start: date | None = None
    # With by event: the end (excluded).
    end: date | None = None

    @model_validator(mode="after")
    def _event_bounds(self) -> MonitorWindow:
        if self.by == "event" and (self.start is None or self.end is None or self.end <= self.start):
            raise ValueError("a window by event time needs start and end, start before end "
                             "(flywheel monitor --from DATE --to DATE)")
        return self


class EstimationConfig(_Strict):
    """The gate's metric estimated in every monitoring window from the served outputs alone."""

    # Estimate in every monitoring run (false: no estimate, no calibration read).
    enabled: bool = True
    # The band: this many standard deviations of the metric over label draws (3: about 99.7%).
    band_sigmas: float = Field(default=3.0, gt=0)
    # Fewer predictions than this in a window: no estimate (the band would say nothing).
    min_rows: int = Field(default=100, ge=20)
    # Label draws from the calibrated probabilities ...
    draws: int = Field(default=64, ge=8, le=10_000)
    # ... on a sample of this many rows of the window (more when a class is rare; the band is
    # scaled to the window's size).
    sample_rows: int = Field(default=2_000, ge=500)
    # The audit: once this share of a window's rows is labelled, the realized value is checked
    # against the estimate for the same rows; outside the band is a probable concept shift.
    audit_labelled_share: float = Field(default=0.9, gt=0, le=1)


class MonitoringConfig(_Strict):
    # Which predictions a monitoring run reads.
    window: MonitorWindow = MonitorWindow()
    # Evidently's defaults: a column drifts at distance >= 0.1, the data at half the columns.
    drift_threshold: float = Field(default=0.1, gt=0)
    # Dataset drift when at least this share of the features drift.
    drift_share: float = Field(default=0.5, gt=0, le=1)
    # Performance over the latest labelled predictions (labels arrive late: feedback or source).
    performance_rows: int = Field(default=5_000, ge=50)
    # Performance is judged only on at least this many labelled predictions.
    min_labelled: int = Field(default=500, ge=10)
    # Binary: and at least this many positives among them.
    min_positives: int = Field(default=10, ge=1)
    # A drop: the window's value of the gate's metric worse than what the serving versions
    # promised (their holdout value, weighted by rows): ROC-AUC or PR-AUC lower by more than
    # max_auc_drop; any other metric (log loss, Brier, RMSE, macro F1, ...) worse by more than
    # max_relative_drop of the promised value.
    max_auc_drop: float = Field(default=0.05, ge=0, le=1)
    # A gate metric other than ROC-AUC or PR-AUC worse than promised by this share is a drop.
    max_relative_drop: float = Field(default=0.1, gt=0, le=10)
    # Rows of each side given to Evidently for the HTML/JSON report (verdicts use every row).
    report_sample_rows: int = Field(default=10_000, ge=100)
    # null: when Evidently (the `reports` extra) is installed
    evidently_report: bool | None = None
    # The gate's metric estimated in every window from its answers, before labels arrive.
    estimation: EstimationConfig = EstimationConfig()


class TriggersConfig(_Strict):
    """What starts the retraining pipeline; each is checked by `flywheel run` and the replay."""

    # Retrain at least this often (none: no schedule).
    schedule_days: float | None = Field(default=None, gt=0)
    # Retrain when this many labelled rows arrived since the last retrain (none: off).
    new_labelled_rows: int | None = Field(default=None, ge=1)
    # Retrain on a dataset-drift verdict.
    drift: bool = True
    # Retrain on a performance drop.
    performance_drop: bool = True
    # Retrain when a window's realized metric falls outside its estimate's band (the audit; off by
    # default: turning it on changes when an existing project retrains).
    concept_shift: bool = False
    # Retrain when the estimated metric (before labels) drops by the monitoring drop thresholds.
    estimated_performance_drop: bool = False
    # A retraining budget: no trigger fires within this many days of the last retrain.
    min_days_between: float = Field(default=0, ge=0)


class RetrainingConfig(_Strict):
    # The training window of a retrain: this many months of rows whose labels are known by now.
    lookback_months: int = Field(default=72, ge=1, le=600)
    # Where a retrain's rows come from: the source table, the served predictions whose labels came
    # back through /v1/feedback, or both (a served row whose meta.entity_id is a source id is
    # learnt once, from the source). `flywheel train` always reads the source table.
    train_from: Literal["source", "feedback", "both"] = "source"
    # What starts a retrain.
    triggers: TriggersConfig = TriggersConfig()
    # null: Prefect when its extra is installed, else the local runner
    orchestrator: Literal["local", "prefect"] | None = None
    check_interval_s: float = Field(default=300, gt=0)  # how often `flywheel run` checks triggers
    # What "now" is for a retrain without --at: the wall clock (today), or the data's own time (the
    # day after the latest row a retrain could learn from): for history replayed or loaded late.
    clock: Literal["wall", "data"] = "wall"


def input_fields(features: list[Feature]) -> list[str]:
    """The raw fields the features read, in first-use order."""
    cols: list[str] = []
    for f in features:
        if isinstance(f, RatioFeature):
            cols += [f.numerator, f.denominator]
        elif isinstance(f, FlagFeature):
            cols += [f.column] + ([f.other] if f.other else [])
        else:
            cols.append(f.column)
    return list(dict.fromkeys(cols))


class SegmentConfig(_Strict):
    """A way to cut traffic into groups that a decision must not quietly get worse for."""

    # The segment's name in reports.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # The input field whose value puts a record in a group (or `meta.KEY`: a key of its meta).
    column: str = Field(min_length=1)
    # Numbers: groups cut at these increasing edges (below the first, between each two, from the
    # last on); none: each distinct value is a group (text, codes).
    edges: list[float] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _increasing(self) -> SegmentConfig:
        if self.edges and any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError(f"segment {self.name}: edges must increase")
        return self


class RolloutConfig(_Strict):
    """What happens between a gate that passed and the promotion."""

    # direct: the gate promotes at once. shadow: the challenger scores the same requests as the
    # champion (in the log sink, off the answered request's path; never returned) and is promoted
    # when a sequential test on the labelled records both answered says it is better. canary: the
    # challenger answers `canary_share` of the traffic (the same entities always) and is promoted
    # when the test on the labelled answers of both says it is better.
    mode: Literal["direct", "shadow", "canary"] = "direct"
    # canary: the share of traffic the challenger answers.
    canary_share: float = Field(default=0.1, gt=0, lt=1)
    # canary: what keeps an entity on one version: an input field, or `meta.KEY` (a record
    # without it is routed at random).
    entity: str = "meta.entity_id"
    # The test's declared false-promotion rate: the chance of promoting a challenger that is not
    # better, however often the evidence is looked at.
    false_promotion_rate: float = Field(default=0.05, gt=0, lt=0.5)
    # The test decides on no fewer labelled pairs than this.
    min_pairs: int = Field(default=200, ge=20)
    # On the project's clock: a rollout undecided after this many days ends and the champion stays.
    max_days: float = Field(default=60, gt=0)
    # A segment's group is tested once it has this many labelled pairs (fewer: reported only).
    min_segment_pairs: int = Field(default=200, ge=20)
    # Guard rail: the rollout aborts when the challenger fails on more than this share of its
    # answers (a shadow's scoring failures, a canary's server errors; judged on 100 or more) and
    # more often than the champion. A challenger that cannot be loaded aborts it at once.
    max_error_rate: float = Field(default=0.01, ge=0, lt=1)
    # Guard rail (canary): the rollout aborts when the challenger's p99 latency is over this many
    # times the champion's over the same time (100 or more requests of each).
    max_latency_ratio: float = Field(default=1.5, gt=1)


class RoomConfig(_Strict):
    """`flywheel room`: the control-room page. Beyond 127.0.0.1 it needs FLYWHEEL_VIEWER_TOKEN."""

    # The control room's bind address.
    host: str = "127.0.0.1"
    # The control room's port.
    port: int = Field(default=8090, ge=1, le=65535)
    # MLflow's UI, for links to runs and versions (e.g. http://127.0.0.1:5000); none: no links.
    mlflow_url: str | None = None
    # The prediction server whose served version the page shows; default: serving.host/port.
    serving_url: str | None = None
    # Also serve the page at /room on `flywheel serve` (its queries run in worker threads, never in
    # the event loop that answers predictions).
    mount_on_serve: bool = False


class CardConfig(_Strict):
    """What the model card says a version is for and where it should not be trusted."""

    intended_use: str | None = None  # default: scoring rows like the training window's
    limitations: list[str] = []  # added to the limits the card states itself


class CommonConfig(_Strict):
    """What every project has: a name, the three stores, and the registered model's name."""

    # The project's name: MLflow's experiment.
    project: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # The registered model's name (default: the project's).
    model_name: str | None = None
    # The three stores: source data, MLflow, Flywheel's state.
    stores: Stores = Stores()
    # The control room.
    room: RoomConfig = RoomConfig()
    # What the model card says beyond what is measured.
    card: CardConfig = CardConfig()

    @property
    def registered_model(self) -> str:
        return self.model_name or self.project


class Config(CommonConfig):
    """A tabular project: a source table, row-level features, a classifier."""

    # tabular (the default) or lora.
    kind: Literal["tabular"] = "tabular"
    # Where the rows are, their time, the training window and the target.
    data: DataConfig
    # The features, each computed from a row alone.
    features: list[Feature] = Field(min_length=1)
    # The data checks before every training, with the leakage screen.
    checks: ChecksConfig = ChecksConfig()
    # The split by time into train, validation and holdout.
    split: SplitConfig = SplitConfig()
    # The trainer and its parameters.
    model: ModelConfig = ModelConfig()
    # What a challenger must reach to be promoted.
    gate: GateConfig
    # The prediction server.
    serving: ServingConfig = ServingConfig()
    # Drift and performance verdicts over the prediction log.
    monitoring: MonitoringConfig = MonitoringConfig()
    # When and on what to retrain.
    retraining: RetrainingConfig = RetrainingConfig()
    # Between the gate and the promotion: at once, or after a shadow rollout decides.
    rollout: RolloutConfig = RolloutConfig()
    # Groups of traffic a rollout must not make worse (each one's paired losses are tested too).
    segments: list[SegmentConfig] = []

    @model_validator(mode="after")
    def _segments_and_entity_are_inputs(self) -> Config:
        fields = input_fields(self.features)
        named = [(f"segments[{i}].column", s.column) for i, s in enumerate(self.segments)]
        if self.rollout.mode == "canary":
            named.append(("rollout.entity", self.rollout.entity))
        for where, column in named:
            if column.startswith("meta."):
                if not column[5:]:
                    raise ValueError(f"{where}: 'meta.' needs a key, e.g. meta.entity_id")
            elif column not in fields:
                raise ValueError(f"{where}: {column!r} is not an input of the model's features "
                                 f"({', '.join(fields)}); a key of the request's meta is written meta.KEY")
        return self

    @model_validator(mode="after")
    def _unique_feature_names(self) -> Config:
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature names must be unique; repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_gate_metric(cls, raw: Any) -> Any:
        try:
            task = raw["data"]["target"].get("task") or "binary"
            gate = raw["gate"]
        except (TypeError, KeyError, AttributeError):
            return raw
        if isinstance(gate, dict) and gate.get("metric") is None and task in DEFAULT_GATE_METRIC:
            return {**raw, "gate": {**gate, "metric": DEFAULT_GATE_METRIC[task]}}
        return raw

    @model_validator(mode="after")
    def _gate_metric_of_the_task(self) -> Config:
        task = self.task
        if self.gate.metric not in TASK_METRICS[task]:
            raise ValueError(f"gate.metric '{self.gate.metric}' does not measure a {task} model; "
                             f"choose one of {', '.join(TASK_METRICS[task])}")
        return self

    @property
    def task(self) -> str:
        return self.data.target.task


# ---- LoRA fine-tuning projects (kind: lora) -----------------------------------------------------

BUILTIN_BASE_MODEL = "smollm2-135m-instruct"


class TextConfig(_Strict):
    """The documents to fine-tune on, split by document into train and held-out.

    `source: indian-constitution` is the Constitution's 465 articles (a PyPI wheel, fetched once);
    `source: file` reads `path` (a JSON list or JSON Lines of objects). Each document is rendered
    with `template` (Python format fields from the object) and identified by `id_field`.
    """

    # indian-constitution (a wheel on PyPI) or file.
    source: Literal["indian-constitution", "file"] = "indian-constitution"
    # With source file: a JSON Lines file, relative to the config.
    path: str | None = None
    # Each record's id: the split into training and held-out text is by it.
    id_field: str = "article"
    # Each record as text: Python format fields of the record.
    template: str = "Article {article}: {title}\n{description}"
    # The share of records held out for the perplexity gate.
    heldout_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    # The split hashes "salt:id": the same documents land in held-out on every machine and run.
    split_salt: str = "flywheel"

    @model_validator(mode="after")
    def _path_for_file(self) -> TextConfig:
        if self.source == "file" and not self.path:
            raise ValueError("source 'file' needs 'path' (a .json or .jsonl file of objects)")
        return self


class LoraConfig(_Strict):
    # The adapter's rank.
    r: int = Field(default=8, ge=1, le=512)
    # LoRA's scaling numerator (scale = alpha / r).
    alpha: float = Field(default=16, gt=0)
    # Dropout on the adapter's input.
    dropout: float = Field(default=0.05, ge=0, lt=1)
    # The base model's modules that get an adapter.
    target_modules: list[str] = Field(default=["q_proj", "v_proj"], min_length=1)


class FinetuneTrainingConfig(_Strict):
    # Optimizer steps.
    steps: int = Field(default=100, ge=1, le=1_000_000)
    # Blocks of tokens per step.
    batch_size: int = Field(default=4, ge=1, le=4096)
    # Documents are packed into blocks of this many tokens (no padding is trained on).
    max_seq_length: int = Field(default=128, ge=8, le=32_768)
    # The peak learning rate (linear warm-up, then linear decay).
    learning_rate: float = Field(default=5e-4, gt=0, le=1)
    # Steps of linear warm-up.
    warmup_steps: int = Field(default=10, ge=0)
    # AdamW's weight decay.
    weight_decay: float = Field(default=0.0, ge=0)
    # Seed of the data order and the adapter's initial weights.
    seed: int = 42
    # Held-out perplexity over at most this many tokens (None: all of them), before and after.
    eval_max_tokens: int | None = Field(default=None, ge=8)
    # auto (CUDA when there is one), cpu or cuda.
    device: Literal["auto", "cpu", "cuda"] = "auto"


class GenerationSamples(_Strict):
    """Fixed prompts generated greedily before and after training, logged side by side."""

    # Prompts generated greedily before and after training, shown side by side.
    prompts: list[str] = []
    # Tokens generated for each.
    max_new_tokens: int = Field(default=40, ge=1, le=2048)


class LlmGateConfig(_Strict):
    """The gate of a LoRA project: held-out perplexity, lower is better.

    `floor` is the worst acceptable perplexity (a ceiling); `min_improvement` is how much lower
    than the champion's (on the same held-out text) a challenger must be. When the llama.cpp
    runtime serves the model, `max_export_cost` is how much higher (a fraction) the served GGUF's
    held-out perplexity may be than the full-precision model's: a quantisation that costs more
    fails the gate (None: measured and logged, never refused).
    """

    # Held-out perplexity: lower is better.
    metric: Literal["perplexity"] = "perplexity"
    # The highest perplexity a version may have and be promoted.
    floor: float = Field(gt=1)
    # How much lower than the champion's a challenger's perplexity must be.
    min_improvement: float = Field(default=0.0, ge=0)
    # On llama.cpp: how much higher, as a fraction, the served GGUF's perplexity may be than the full
    # model's (none: measure only).
    max_export_cost: float | None = Field(default=0.02, ge=0)
    require_schema_compatible: bool = False  # prompts in, text out: nothing to compare


class GenerateServingConfig(ServerConfig):
    # Larger request bodies get 413.
    max_body_bytes: int = Field(default=65_536, ge=1024)
    # The longest prompt, in characters.
    max_prompt_chars: int = Field(default=4_000, ge=1)
    # The longest prompt, in tokens.
    max_prompt_tokens: int = Field(default=1_024, ge=1)
    max_new_tokens: int = Field(default=256, ge=1)        # the largest a request may ask for
    # Tokens generated when a request does not say.
    default_max_new_tokens: int = Field(default=64, ge=1)
    # The highest sampling temperature a request may ask for.
    max_temperature: float = Field(default=2.0, gt=0, le=10)
    # Generations run at once per worker; more wait (up to max_waiting), beyond that 429.
    max_concurrent: int = Field(default=1, ge=1, le=64)
    # Generations that may wait for a slot; more get 429.
    max_waiting: int = Field(default=8, ge=0, le=10_000)
    # Of those, the most one client address may hold, running or waiting (None: all but one).
    max_per_client: int | None = Field(default=None, ge=1, le=10_064)
    # CPU threads of one generation (torch's or llama.cpp's); None: the CPUs this process may use.
    threads: int | None = Field(default=None, ge=1,
                                validation_alias=AliasChoices("threads", "torch_threads"))
    # transformers: the merged model in PyTorch. llama.cpp: the merged model as a GGUF file at
    # `precision` (written at fine-tuning, hash-checked), decoded by llama-cpp-python.
    runtime: Literal["transformers", "llama.cpp"] = "transformers"
    # On llama.cpp: the GGUF's weights (f32, f16, q8_0, q4_0, q4_k_m).
    precision: Literal["f32", "f16", "q8_0", "q4_0", "q4_k_m", "iq4_nl"] = "f16"

    @model_validator(mode="after")
    def _default_within_bound(self) -> GenerateServingConfig:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens")
        return self


class LlmConfig(CommonConfig):
    """A LoRA fine-tuning project: a base causal LM, documents, an adapter, the same gate."""

    # lora: a LoRA fine-tuning project.
    kind: Literal["lora"]
    # The built-in SmolLM2-135M-Instruct (a PyPI wheel), a local model folder, or a hub id.
    base_model: str = BUILTIN_BASE_MODEL
    # The hub revision of base_model, when it is a hub id.
    base_revision: str | None = None
    # The documents to train on and how they become text.
    text: TextConfig = TextConfig()
    # The adapter's shape.
    lora: LoraConfig = LoraConfig()
    # The fine-tuning run.
    training: FinetuneTrainingConfig = FinetuneTrainingConfig()
    # Generations shown before and after training.
    samples: GenerationSamples = GenerationSamples()
    # What a version must reach to be promoted.
    gate: LlmGateConfig
    # The generation server.
    serving: GenerateServingConfig = GenerateServingConfig()


class ProjectBase(BaseModel):
    """A validated config plus where it lives: the folders and store URLs it resolves to."""

    model_config = ConfigDict(frozen=True)

    config: CommonConfig
    path: Path
    home: Path

    @property
    def source_url(self) -> str:
        return self._url(self.config.stores.source, "source.db")

    @property
    def tracking_url(self) -> str:
        return self._url(self.config.stores.tracking, "mlflow.db")

    @property
    def state_url(self) -> str:
        return self._url(self.config.stores.state, "state.db")

    @property
    def artifact_root(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def snapshot_dir(self) -> Path:
        return self.home / "snapshots"

    @property
    def pipeline_dir(self) -> Path:
        return self.home / "pipeline"

    @property
    def monitoring_dir(self) -> Path:
        return self.home / "monitoring"

    def config_hash(self) -> str:
        canonical = json.dumps(self.config.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def resolve_path(self, value: str) -> Path:
        """A path from the config: relative paths are relative to the config file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    def _url(self, url: str | None, filename: str) -> str:
        if url is None:
            return f"sqlite:///{self.home / filename}"
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            rel = url.removeprefix("sqlite:///")
            return f"sqlite:///{(self.path.parent / rel).resolve()}"
        return url


class Project(ProjectBase):
    """A tabular project."""

    config: Config


class LlmProject(ProjectBase):
    """A LoRA fine-tuning project."""

    config: LlmConfig

    @property
    def finetune_dir(self) -> Path:
        return self.home / "finetune"


def cache_dir() -> Path:
    """Where downloads are cached: FLYWHEEL_CACHE_DIR, else the user's cache folder."""
    override = os.environ.get("FLYWHEEL_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flywheel"


def load_any_project(path: str | Path, env: dict[str, str] | None = None) -> Project | LlmProject:
    """Read, override from FLYWHEEL_* variables, and validate a flywheel.yaml of either kind."""
    path = Path(path)
    env = dict(os.environ) if env is None else env
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file (pass --config PATH to a flywheel.yaml)")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields")
    kind = env.get("FLYWHEEL_KIND", raw.get("kind", "tabular"))
    if kind not in ("tabular", "lora"):
        raise ConfigError(f"{path.name}: kind: must be 'tabular' (default) or 'lora' (got {kind!r})")
    raw = apply_env_overrides(raw, env, LlmConfig if kind == "lora" else Config)
    home = Path(env["FLYWHEEL_HOME"]) if env.get("FLYWHEEL_HOME") else path.parent / ".flywheel"
    try:
        if kind == "lora":
            return LlmProject(config=LlmConfig.model_validate(raw), path=path.resolve(),
                              home=home.resolve())
        return Project(config=Config.model_validate(raw), path=path.resolve(), home=home.resolve())
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently: a second `serving:` block would replace the first without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key]} and {line}); "
                    "keep one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A config file's YAML: UTF-8 text, no anchors or aliases (a few lines of them can expand to
    gigabytes), no .inf or .nan; anything else is a ConfigError that says what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise ConfigError(f"{path}:{line}: YAML aliases (*{event.anchor}) are not "
                                  "accepted in a config; write the value out")
        raw = yaml.load(text, Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    bad = first_path(raw, lambda v: isinstance(v, float) and not math.isfinite(v))
    if bad is not None:
        raise ConfigError(f"{path}: {'.'.join(map(str, bad)) or 'the document'}: .inf and .nan are "
                          "not accepted; give a finite number")
    return raw


def load_project(path: str | Path, env: dict[str, str] | None = None) -> Project:
    """A tabular project; a LoRA project's config is refused with what to run instead."""
    project = load_any_project(path, env)
    if not isinstance(project, Project):
        raise ConfigError(f"{Path(path).name}: a LoRA fine-tuning project (kind: lora); this command "
                          "works on tabular projects. For this one use: finetune, serve, status, "
                          "promote, rollback, export, publish.")
    return project


def load_llm_project(path: str | Path, env: dict[str, str] | None = None) -> LlmProject:
    project = load_any_project(path, env)
    if not isinstance(project, LlmProject):
        raise ConfigError(f"{Path(path).name}: not a LoRA fine-tuning project; set `kind: lora` "
                          "(see examples/constitution-lora/flywheel.yaml)")
    return project


def apply_env_overrides(raw: dict[str, Any], env: dict[str, str],
                        model: type[CommonConfig] | None = None) -> dict[str, Any]:
    """FLYWHEEL_A__B=value sets field a.b of `model`'s fields; values are read as YAML scalars or lists."""
    fields = (model or Config).model_fields
    merged = json.loads(json.dumps(raw, default=str))
    for key, value in sorted(with_file_secrets(env).items()):
        if not key.startswith("FLYWHEEL_") or key in _NOT_CONFIG_ENV:
            continue
        parts = [p.lower() for p in key.removeprefix("FLYWHEEL_").split("__") if p]
        if not parts or parts[0] not in fields:
            continue
        node = merged
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: cannot set a field inside '{part}', which is not a mapping")
        node[parts[-1]] = yaml.safe_load(value)
    return merged


def format_validation_error(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for i, p in enumerate(err["loc"]) if not _is_tag(err["loc"], i))
        msg = err["msg"].removeprefix("Value error, ")
        got = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
        if err["type"] == "extra_forbidden":
            msg, got = "unknown field; check its spelling and indentation", ""
        lines.append(f"{path.name}: {loc or '(top level)'}: {msg}{got}")
    return "\n".join(lines)


_TAGS = {"numeric", "ratio", "flag", "bucket", "category", "performance_window", "column"}


def _is_tag(loc: tuple[int | str, ...], i: int) -> bool:
    # pydantic puts a union's tag ("ratio") after the list index or field; it is noise to a user.
    prev = loc[i - 1] if i else None
    return loc[i] in _TAGS and (isinstance(prev, int) or prev == "target")
