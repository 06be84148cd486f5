"""Shadow and canary rollouts between the gate and the promotion: the rollouts' state machine
and a shadow challenger's answers, kept apart from the prediction log

Revision ID: 0013
Revises: 0012
"""
import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("mode", sa.String(20), nullable=False),
        sa.Column("champion_version", sa.Integer, nullable=True),
        sa.Column("challenger_version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("evidence", sa.Text, nullable=True),
        sa.Column("share", sa.Float, nullable=True),
        sa.Column("after_prediction_id", sa.BigInteger, nullable=True),
        sa.Column("serving_from", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_rollouts_model_status", "rollouts", ["model_name", "status"])
    op.create_table(
        "shadow_predictions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("rollout_id", sa.Integer, nullable=False),
        sa.Column("record_id", sa.String(100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("probability", sa.Float, nullable=True),
        sa.Column("value", sa.Float, nullable=True),
        sa.Column("label", sa.String(200), nullable=True),
        sa.Column("scores", sa.Text, nullable=True),
    )
    op.create_index("ix_shadow_predictions_rollout_record", "shadow_predictions",
                    ["rollout_id", "record_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_shadow_predictions_rollout_record", "shadow_predictions")
    op.drop_table("shadow_predictions")
    op.drop_index("ix_rollouts_model_status", "rollouts")
    op.drop_table("rollouts")
