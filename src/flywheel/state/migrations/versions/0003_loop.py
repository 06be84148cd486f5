"""monitoring verdicts, pipeline runs, locks and watermarks

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "monitor_runs",
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
    )
    op.create_index("ix_monitor_runs_model", "monitor_runs", ["model_name", "id"])
    op.create_table(
        "monitor_columns",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("monitor_runs.id"), primary_key=True),
        sa.Column("column_name", sa.String(200), primary_key=True),
        sa.Column("stattest", sa.String(50), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("drifted", sa.Boolean, nullable=False),
    )
    op.create_table(
        "pipeline_runs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("trigger", sa.String(50), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("step", sa.String(50), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outputs", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_index("ix_pipeline_runs_model", "pipeline_runs", ["model_name", "started_at"])
    op.create_table(
        "locks",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "watermarks",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("value", sa.String(100), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("watermarks")
    op.drop_table("locks")
    op.drop_index("ix_pipeline_runs_model", "pipeline_runs")
    op.drop_table("pipeline_runs")
    op.drop_table("monitor_columns")
    op.drop_index("ix_monitor_runs_model", "monitor_runs")
    op.drop_table("monitor_runs")
