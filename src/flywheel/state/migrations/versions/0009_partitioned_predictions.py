"""The prediction log partitioned by day on PostgreSQL; its unique key is (record_id, created_at)

PostgreSQL: `predictions` becomes a table partitioned by range of `created_at`, one partition
per UTC day plus a default partition (see flywheel/state/partitions.py). The rows move in one
transaction (DDL is transactional in PostgreSQL): the table is renamed aside, the partitioned
table made like it, a partition made for every day that has rows and the coming days, every row
copied with its id, the counts compared (a mismatch aborts the whole migration, the old table
untouched), the id sequence handed to the new table, the old table dropped. It copies the log
once, holding the table: on a large log, let the first command after the upgrade (any command
that opens the state database, `flywheel status` for one) run in a quiet hour.

Both databases: the unique key on record_id becomes (record_id, created_at), because a
partitioned table's unique index must hold the partition key; it refuses the same duplicates
(a record id is minted together with its time).

Revision ID: 0009
Revises: 0008
"""
from datetime import UTC, datetime

from alembic import op

from flywheel.state.partitions import DEFAULT, PARENT, make_partitions, window_days

revision = "0009"
down_revision = "0008"
OLD = "predictions_unpartitioned"


def upgrade() -> None:
    op.drop_index("ix_predictions_record_id", PARENT)
    if op.get_bind().dialect.name != "postgresql":
        op.create_index("ix_predictions_record_id", PARENT, ["record_id", "created_at"], unique=True)
        return
    conn = op.get_bind()
    op.execute(f"LOCK TABLE {PARENT} IN ACCESS EXCLUSIVE MODE")
    sequence = conn.exec_driver_sql(f"SELECT pg_get_serial_sequence('{PARENT}', 'id')").scalar()
    op.execute(f"ALTER TABLE {PARENT} RENAME TO {OLD}")
    op.execute(f"ALTER TABLE {OLD} RENAME CONSTRAINT predictions_pkey TO {OLD}_pkey")
    op.execute("ALTER INDEX ix_predictions_model_time RENAME TO ix_predictions_unpartitioned_time")
    op.execute(f"CREATE TABLE {PARENT} (LIKE {OLD} INCLUDING DEFAULTS INCLUDING CONSTRAINTS, "
               f"CONSTRAINT predictions_pkey PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at)")
    op.create_index("ix_predictions_record_id", PARENT, ["record_id", "created_at"], unique=True)
    op.create_index("ix_predictions_model_time", PARENT, ["model_name", "created_at"])
    op.execute(f"CREATE TABLE {DEFAULT} PARTITION OF {PARENT} DEFAULT")
    days = set(conn.exec_driver_sql(
        f"SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date FROM {OLD}").scalars())
    make_partitions(conn, days | set(window_days(datetime.now(UTC))))
    op.execute(f"INSERT INTO {PARENT} SELECT * FROM {OLD}")
    before = conn.exec_driver_sql(f"SELECT count(*) FROM {OLD}").scalar()
    after = conn.exec_driver_sql(f"SELECT count(*) FROM {PARENT}").scalar()
    if before != after:
        raise RuntimeError(f"partitioning the prediction log copied {after} of {before} rows; "
                           "nothing was changed")
    if sequence:
        op.execute(f"ALTER SEQUENCE {sequence} OWNED BY {PARENT}.id")
    op.execute(f"DROP TABLE {OLD}")


def downgrade() -> None:
    op.drop_index("ix_predictions_record_id", PARENT)
    if op.get_bind().dialect.name != "postgresql":
        op.create_index("ix_predictions_record_id", PARENT, ["record_id"], unique=True)
        return
    conn = op.get_bind()
    sequence = conn.exec_driver_sql(f"SELECT pg_get_serial_sequence('{PARENT}', 'id')").scalar()
    op.execute(f"CREATE TABLE {OLD} (LIKE {PARENT} INCLUDING DEFAULTS)")
    op.execute(f"INSERT INTO {OLD} SELECT * FROM {PARENT}")
    if sequence:
        op.execute(f"ALTER SEQUENCE {sequence} OWNED BY {OLD}.id")
    op.execute(f"DROP TABLE {PARENT} CASCADE")
    op.execute(f"ALTER TABLE {OLD} RENAME TO {PARENT}")
    op.execute(f"ALTER TABLE {PARENT} ADD CONSTRAINT predictions_pkey PRIMARY KEY (id)")
    op.create_index("ix_predictions_record_id", PARENT, ["record_id"], unique=True)
    op.create_index("ix_predictions_model_time", PARENT, ["model_name", "created_at"])
