"""predictions: one (model_name, created_at) index instead of created_at and (model_name, model_version)

The monitor reads a model's predictions by time window; no query looks rows up by model version.
One index fewer is one index fewer for the log sink to maintain on every insert.

Revision ID: 0004
Revises: 0003
"""
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.drop_index("ix_predictions_model_version", "predictions")
    op.drop_index("ix_predictions_created_at", "predictions")
    op.create_index("ix_predictions_model_time", "predictions", ["model_name", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_predictions_model_time", "predictions")
    op.create_index("ix_predictions_created_at", "predictions", ["created_at"])
    op.create_index("ix_predictions_model_version", "predictions", ["model_name", "model_version"])
