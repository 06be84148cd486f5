"""Performance estimated before the labels arrive: per monitoring run, the estimated value of the
gate's metric, its band, and why there is none when there is none

Revision ID: 0012
Revises: 0011
"""
import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"


def upgrade() -> None:
    with op.batch_alter_table("monitor_runs") as batch:
        batch.add_column(sa.Column("estimated_metric", sa.String(50), nullable=True))
        batch.add_column(sa.Column("estimated_value", sa.Float, nullable=True))
        batch.add_column(sa.Column("estimated_low", sa.Float, nullable=True))
        batch.add_column(sa.Column("estimated_high", sa.Float, nullable=True))
        batch.add_column(sa.Column("estimate_note", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("monitor_runs") as batch:
        for name in ("estimate_note", "estimated_high", "estimated_low", "estimated_value",
                     "estimated_metric"):
            batch.drop_column(name)
