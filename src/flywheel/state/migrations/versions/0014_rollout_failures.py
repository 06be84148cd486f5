"""A rollout's guard rail on the challenger's failures: the records it could not score (a shadow's)
and the latest failure's message (a shadow's or a canary worker's, loading or scoring)

Revision ID: 0014
Revises: 0013
"""
import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"


def upgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("failed", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("failure", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("failure")
        batch.drop_column("failed")
