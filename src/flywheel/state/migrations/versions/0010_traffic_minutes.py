"""Per-minute traffic rollups (requests, 4xx, 5xx, log drops, a latency histogram) per endpoint
and model version, written by the server workers for the control room.

Revision ID: 0010
Revises: 0009
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    op.create_table(
        "traffic_minutes",
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


def downgrade() -> None:
    op.drop_table("traffic_minutes")
