"""The prediction log's columns: one `prediction_segments` row per log-sink batch

New rows keep their inputs and meta in the segment written with them (`predictions.inputs` is ''
and `meta` NULL). Rows logged before stay as they are, JSON text, and stay readable: every
reader of the log reads both. `flywheel log compact` rewrites them into segments when the user
chooses (in batches, each its own transaction), never this migration: on a large log it would
hold the table for as long as it takes to rewrite every row. A downgrade writes the segments'
rows back as JSON text. The index on the rows still in
JSON text (a partial index) is what lets a reader find none cheaply once they are rewritten.

Revision ID: 0011
Revises: 0010
"""
import orjson
import sqlalchemy as sa
from alembic import op

from flywheel.state.segments import decode, rows_of

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    op.create_table(
        "prediction_segments",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("first_id", sa.BigInteger, nullable=False),
        sa.Column("last_id", sa.BigInteger, nullable=False),
        sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("columns", sa.LargeBinary, nullable=False),
    )
    bind = op.get_bind()
    if bind.dialect.name == "postgresql" and bind.exec_driver_sql(
            "SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' "
            "AND 'lz4' = ANY(enumvals)").first():
        # A segment (about 160 kB a thousand rows) is compressed by the server when stored; lz4
        # where the server has it (PostgreSQL 14+ built with it), else its default pglz: a
        # 1M-row window read back in 0.24-0.38 s instead of 0.35-0.45, and the sink's inserts
        # cost the server less.
        op.execute("ALTER TABLE prediction_segments ALTER COLUMN columns SET COMPRESSION lz4")
    op.create_index("ix_prediction_segments_time", "prediction_segments", ["model_name", "last_at"])
    op.create_index("ix_prediction_segments_last_id", "prediction_segments", ["model_name", "last_id"])
    op.create_index("ix_predictions_json", "predictions", ["model_name", "id"],
                    sqlite_where=sa.text("inputs <> ''"), postgresql_where=sa.text("inputs <> ''"))


def downgrade() -> None:
    """Every row logged in a segment gets its inputs and meta back as JSON text (nothing is lost),
    then the segments go."""
    conn = op.get_bind()
    segments = sa.table("prediction_segments", sa.column("id"), sa.column("columns"))
    predictions = sa.table("predictions", sa.column("id"), sa.column("inputs"), sa.column("meta"))
    update = sa.update(predictions).where(predictions.c.id == sa.bindparam("row_id")).values(
        inputs=sa.bindparam("json_inputs"), meta=sa.bindparam("json_meta"))
    for sid in list(conn.execute(sa.select(segments.c.id)).scalars()):
        blob = conn.execute(sa.select(segments.c.columns).where(segments.c.id == sid)).scalar_one()
        rows, columns = decode(bytes(blob))
        conn.execute(update, [
            {"row_id": r[0], "json_inputs": orjson.dumps(r[6]).decode(),
             "json_meta": None if r[7] is None else orjson.dumps(r[7]).decode()}
            for r in rows_of(columns, rows)])
    op.drop_index("ix_predictions_json", "predictions")
    op.drop_table("prediction_segments")
