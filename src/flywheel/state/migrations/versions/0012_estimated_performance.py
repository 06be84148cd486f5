"""Performance estimated before the labels arrive: per monitoring run, the estimated value of the
gate's metric, its band, why there is none when there is none, whether it dropped, and the audit
once the window's labels are in (realized against the estimate for the same rows)

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
        batch.add_column(sa.Column("estimated_drop", sa.Boolean, nullable=True))
        batch.add_column(sa.Column("audit_rows", sa.Integer, nullable=True))
        for name in ("audit_realized", "audit_estimate", "audit_low", "audit_high"):
            batch.add_column(sa.Column(name, sa.Float, nullable=True))
        batch.add_column(sa.Column("concept_shift", sa.Boolean, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("monitor_runs") as batch:
        for name in ("concept_shift", "audit_high", "audit_low", "audit_estimate", "audit_realized",
                     "audit_rows", "estimated_drop", "estimate_note", "estimated_high", "estimated_low",
                     "estimated_value", "estimated_metric"):
            batch.drop_column(name)
