"""monitor_columns.unseen_rows: rows of a window whose category the model never learnt

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    with op.batch_alter_table("monitor_columns") as batch:
        batch.add_column(sa.Column("unseen_rows", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("monitor_columns") as batch:
        batch.drop_column("unseen_rows")
