"""alias_state: the state database becomes the authority on where each alias points

One row per (model, alias): the version it points at and a fencing token that grows with every
move. alias_history rows gain the token, the actor (user@host:pid) and `applied` (false while the
move is only an intent: the state row changed, MLflow's alias not yet; reconciliation finishes it).

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "alias_state",
        sa.Column("model_name", sa.String(200), primary_key=True),
        sa.Column("alias", sa.String(50), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("token", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("alias_history") as batch:
        batch.add_column(sa.Column("token", sa.Integer, nullable=True))
        batch.add_column(sa.Column("actor", sa.String(300), nullable=True))
        batch.add_column(sa.Column("applied", sa.Boolean, nullable=False, server_default=sa.true()))


def downgrade() -> None:
    with op.batch_alter_table("alias_history") as batch:
        batch.drop_column("applied")
        batch.drop_column("actor")
        batch.drop_column("token")
    op.drop_table("alias_state")
