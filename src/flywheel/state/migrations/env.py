"""Alembic environment for Flywheel's state database; the engine is handed in by open_state."""

from alembic import context

from flywheel.state.db import VERSION_TABLE, metadata

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()
