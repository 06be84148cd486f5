"""Outputs and labels of every task, not only binary: a regression value, a multiclass label and
its class probabilities; the task's own performance metric per monitoring run

Binary rows keep `probability` and `decision` (now nullable: a regression row has neither);
feedback keeps its integer `label` for binary targets (nullable) beside `value` (regression) and
`label_text` (a class name). Monitoring runs keep roc_auc/pr_auc/brier and add the task's metric.

On SQLite the nullability change rebuilds `predictions` and `feedback` (one copy, at upgrade).
Downgrading fails if rows of another task exist (their probability or label is NULL).

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.alter_column("probability", existing_type=sa.Float, nullable=True)
        batch.alter_column("decision", existing_type=sa.Boolean, nullable=True)
        batch.add_column(sa.Column("value", sa.Float, nullable=True))
        batch.add_column(sa.Column("label", sa.String(200), nullable=True))
        batch.add_column(sa.Column("scores", sa.Text, nullable=True))
    with op.batch_alter_table("feedback") as batch:
        batch.alter_column("label", existing_type=sa.Integer, nullable=True)
        batch.add_column(sa.Column("value", sa.Float, nullable=True))
        batch.add_column(sa.Column("label_text", sa.String(200), nullable=True))
    with op.batch_alter_table("monitor_runs") as batch:
        batch.add_column(sa.Column("metric", sa.String(50), nullable=True))
        batch.add_column(sa.Column("metric_value", sa.Float, nullable=True))
        batch.add_column(sa.Column("metrics", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("monitor_runs") as batch:
        batch.drop_column("metrics")
        batch.drop_column("metric_value")
        batch.drop_column("metric")
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("label_text")
        batch.drop_column("value")
        batch.alter_column("label", existing_type=sa.Integer, nullable=False)
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("scores")
        batch.drop_column("label")
        batch.drop_column("value")
        batch.alter_column("decision", existing_type=sa.Boolean, nullable=False)
        batch.alter_column("probability", existing_type=sa.Float, nullable=False)
