"""Flywheel's own state database: created and migrated with Alembic; alias history lives here."""

from __future__ import annotations

import os
import secrets
import threading
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig

from flywheel.data.engine import make_engine

MIGRATIONS = Path(__file__).parent / "migrations"
# Not alembic's default name: the state tables may share a PostgreSQL database with MLflow's.
VERSION_TABLE = "flywheel_alembic_version"

metadata = sa.MetaData()
alias_history = sa.Table(
    "alias_history",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("alias", sa.String(50), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("previous_version", sa.Integer, nullable=True),
    sa.Column("action", sa.String(20), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("moved_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("token", sa.Integer, nullable=True),  # the alias_state token this move set
    sa.Column("actor", sa.String(300), nullable=True),  # user@host:pid
    sa.Column("applied", sa.Boolean, nullable=False, server_default=sa.true()),  # MLflow followed
    sa.Index("ix_alias_history_model_alias", "model_name", "alias"),
)
alias_state = sa.Table(
    "alias_state",
    metadata,
    sa.Column("model_name", sa.String(200), primary_key=True),
    sa.Column("alias", sa.String(50), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("token", sa.Integer, nullable=False),  # fencing token: +1 on every move
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
# The key of a logged prediction's `meta` that names the declared client who asked for it (set by
# the server, never by the caller): learning from feedback keeps each client's rows apart.
CLIENT_META = "_client"

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("record_id", sa.String(100), nullable=False),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("model_version", sa.Integer, nullable=False),
    # JSON text of the inputs (and `meta`) in rows logged before the columnar log; '' (and NULL)
    # since: a row's inputs and meta are in the segment written with it (prediction_segments).
    sa.Column("inputs", sa.Text, nullable=False),
    sa.Column("meta", sa.Text, nullable=True),
    # binary: probability and decision; regression: value; multiclass: label, scores (JSON of
    # every class's probability) and probability (the label's)
    sa.Column("probability", sa.Float, nullable=True),
    sa.Column("decision", sa.Boolean, nullable=True),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("value", sa.Float, nullable=True),
    sa.Column("label", sa.String(200), nullable=True),
    sa.Column("scores", sa.Text, nullable=True),
    # (record_id, created_at): a partitioned table's unique key holds its partition key (0009).
    sa.Index("ix_predictions_record_id", "record_id", "created_at", unique=True),
    sa.Index("ix_predictions_model_time", "model_name", "created_at"),
    # the rows whose inputs are still JSON text (logged before the columnar log; see 0011)
    sa.Index("ix_predictions_json", "model_name", "id", sqlite_where=sa.text("inputs <> ''"),
             postgresql_where=sa.text("inputs <> ''")),
)
# The log's columns, one row per log-sink batch (flywheel.state.segments has the blob's format),
# written in the transaction that inserts the batch's `predictions` rows.
prediction_segments = sa.Table(
    "prediction_segments",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("first_id", sa.BigInteger, nullable=False),  # the smallest and largest prediction id
    sa.Column("last_id", sa.BigInteger, nullable=False),
    sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),  # the earliest created_at
    sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),  # the latest created_at
    sa.Column("columns", sa.LargeBinary, nullable=False),
    sa.Index("ix_prediction_segments_time", "model_name", "last_at"),
    sa.Index("ix_prediction_segments_last_id", "model_name", "last_id"),
)
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("record_id", sa.String(100), primary_key=True),
    sa.Column("label", sa.Integer, nullable=True),  # binary: 0/1
    sa.Column("observed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("value", sa.Float, nullable=True),  # regression: the true value
    sa.Column("label_text", sa.String(200), nullable=True),  # multiclass: the true class
)


monitor_runs = sa.Table(
    "monitor_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("model_version", sa.Integer, nullable=True),
    sa.Column("window_kind", sa.String(10), nullable=False),
    sa.Column("window_start", sa.DateTime(timezone=True), nullable=True),
    sa.Column("window_end", sa.DateTime(timezone=True), nullable=True),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("drift_share", sa.Float, nullable=False),
    sa.Column("drift_detected", sa.Boolean, nullable=False),
    sa.Column("prediction_drift", sa.Float, nullable=True),
    sa.Column("labelled_rows", sa.Integer, nullable=False),
    sa.Column("roc_auc", sa.Float, nullable=True),
    sa.Column("pr_auc", sa.Float, nullable=True),
    sa.Column("brier", sa.Float, nullable=True),
    sa.Column("performance_drop", sa.Boolean, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("report_path", sa.Text, nullable=True),
    sa.Column("mlflow_run_id", sa.String(64), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # the task's performance metric over the window (roc_auc for binary, rmse, macro_f1, ...)
    sa.Column("metric", sa.String(50), nullable=True),
    sa.Column("metric_value", sa.Float, nullable=True),
    sa.Column("metrics", sa.Text, nullable=True),  # JSON: every metric of the window
    # the gate's metric estimated from the window's outputs alone (see monitoring.estimation)
    sa.Column("estimated_metric", sa.String(50), nullable=True),
    sa.Column("estimated_value", sa.Float, nullable=True),
    sa.Column("estimated_low", sa.Float, nullable=True),
    sa.Column("estimated_high", sa.Float, nullable=True),
    sa.Column("estimate_note", sa.Text, nullable=True),  # why there is no estimate
    sa.Column("estimated_drop", sa.Boolean, nullable=True),
    # the audit, once the window's labels are in: the estimate for the labelled rows, the realized
    # value on them, and whether it fell outside the band (a probable concept shift)
    sa.Column("audit_rows", sa.Integer, nullable=True),
    sa.Column("audit_realized", sa.Float, nullable=True),
    sa.Column("audit_estimate", sa.Float, nullable=True),
    sa.Column("audit_low", sa.Float, nullable=True),
    sa.Column("audit_high", sa.Float, nullable=True),
    sa.Column("concept_shift", sa.Boolean, nullable=True),
    sa.Index("ix_monitor_runs_model", "model_name", "id"),
)
monitor_columns = sa.Table(
    "monitor_columns",
    metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("monitor_runs.id"), primary_key=True),
    sa.Column("column_name", sa.String(200), primary_key=True),
    sa.Column("stattest", sa.String(50), nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("drifted", sa.Boolean, nullable=False),
    # category features: rows whose value the model never learnt (unseen in training, or too rare)
    sa.Column("unseen_rows", sa.Integer, nullable=True),
)
# The steps of a pipeline run, in order: `pipeline_runs.outputs` holds each one's result by name.
PIPELINE_STEPS = ("extract", "features", "train", "evaluate", "promote", "alert")
pipeline_runs = sa.Table(
    "pipeline_runs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("trigger", sa.String(50), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # running | succeeded | failed
    sa.Column("step", sa.String(50), nullable=True),  # the step running now, or the last one
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("outputs", sa.Text, nullable=False),  # JSON: each finished step's outputs
    sa.Column("error", sa.Text, nullable=True),
    sa.Index("ix_pipeline_runs_model", "model_name", "started_at"),
)
# Rollouts between the gate and the promotion (lifecycle/rollout.py): a state machine, one row per
# rollout; `status` running | promoted | aborted. At most one runs per model (started under the
# alias lock; a new challenger aborts the running one).
rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("mode", sa.String(20), nullable=False),  # shadow | canary
    sa.Column("champion_version", sa.Integer, nullable=True),
    sa.Column("challenger_version", sa.Integer, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),  # the project's clock
    sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("reason", sa.Text, nullable=False),  # why it started, then why it ended
    sa.Column("evidence", sa.Text, nullable=True),  # JSON: the latest evidence (see Evidence)
    # canary: the share of traffic the challenger answers, the log's last id when the rollout
    # started, and the wall-clock time from which every worker has followed it
    sa.Column("share", sa.Float, nullable=True),
    sa.Column("after_prediction_id", sa.BigInteger, nullable=True),
    sa.Column("serving_from", sa.DateTime(timezone=True), nullable=True),
    # the guard rail on the challenger's failures: the records a shadow's could not score, and
    # the latest failure's message (a shadow's or a canary worker's, loading or scoring)
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failure", sa.Text, nullable=True),
    sa.Index("ix_rollouts_model_status", "model_name", "status"),
)
# The challenger's answers in a shadow rollout: scored by the log sink on the same records the
# champion answered, never returned, and kept apart from `predictions` so that no reader of the
# log (drift, performance, traffic, training from feedback) ever counts them.
shadow_predictions = sa.Table(
    "shadow_predictions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("rollout_id", sa.Integer, nullable=False),
    sa.Column("record_id", sa.String(100), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model_version", sa.Integer, nullable=False),
    sa.Column("probability", sa.Float, nullable=True),  # as in `predictions`, per task
    sa.Column("value", sa.Float, nullable=True),
    sa.Column("label", sa.String(200), nullable=True),
    sa.Column("scores", sa.Text, nullable=True),
    sa.Index("ix_shadow_predictions_rollout_record", "rollout_id", "record_id", unique=True),
)
locks = sa.Table(
    "locks",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
)
server_keys = sa.Table(
    "server_keys",
    metadata,
    sa.Column("name", sa.String(50), primary_key=True),
    sa.Column("value", sa.String(128), nullable=False),  # hex
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
watermarks = sa.Table(
    "watermarks",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("value", sa.String(100), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# Per-minute traffic per endpoint and model version, summed over workers (state/traffic.py): the
# control room's traffic charts. Latency is a histogram: columns b00..b17 count requests per
# bucket (upper bounds in traffic.BOUNDS_MS).
traffic_minutes = sa.Table(
    "traffic_minutes",
    metadata,
    sa.Column("model_name", sa.String(200), primary_key=True),
    sa.Column("minute", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("endpoint", sa.String(50), primary_key=True),
    sa.Column("model_version", sa.Integer, primary_key=True),
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("client_errors", sa.Integer, nullable=False),
    sa.Column("server_errors", sa.Integer, nullable=False),
    sa.Column("log_dropped", sa.Integer, nullable=False),
    sa.Column("latency_ms_sum", sa.Float, nullable=False),
    *[sa.Column(f"b{i:02d}", sa.Integer, nullable=False, server_default="0") for i in range(18)],
)


_ENGINES: dict[tuple[int, str], sa.Engine] = {}
_MIGRATED: set[tuple[int, str]] = set()
_OPEN_LOCK = threading.Lock()


def open_state(url: str, migrate: bool = True) -> sa.Engine:
    """The engine on the state database: one per process and URL, migrated once.

    Everything that reads or writes Flywheel's own tables gets its engine here (or is handed it),
    so a process builds one connection pool per state database and runs Alembic's upgrade at most
    once. The key includes the process id: a forked child builds its own pool.
    """
    key = (os.getpid(), url)
    with _OPEN_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = make_engine(url)
        if migrate and key not in _MIGRATED:
            cfg = AlembicConfig()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["engine"] = engine
            command.upgrade(cfg, "head")
            _MIGRATED.add(key)
    return engine


def close_state(url: str) -> None:
    """Close this process's pool on `url` (a server worker stopping; a test dropping the database)."""
    with _OPEN_LOCK:
        engine = _ENGINES.pop((os.getpid(), url), None)
        _MIGRATED.discard((os.getpid(), url))
    if engine is not None:
        engine.dispose()


def head_revision() -> str:
    """The newest migration: what a fully migrated state database records."""
    from alembic.script import ScriptDirectory

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def server_key(engine: sa.Engine, name: str) -> bytes:
    """A random 256-bit key kept in the state database, made on first use: every worker and
    replica on the same database shares it, and it survives restarts."""
    for _ in range(2):
        with engine.begin() as conn:
            value = conn.execute(sa.select(server_keys.c.value)
                                 .where(server_keys.c.name == name)).scalar()
        if value is not None:
            return bytes.fromhex(value)
        try:
            with engine.begin() as conn:
                conn.execute(server_keys.insert().values(name=name, value=secrets.token_hex(32),
                                                         created_at=now()))
        except sa.exc.IntegrityError:
            pass  # another process made it first: read theirs
    raise RuntimeError(f"could not read or make the server key '{name}'")


def now() -> datetime:
    return datetime.now(UTC)
