"""The production path: source, tracking and state stores all on the PostgreSQL server."""

import pytest
import sqlalchemy as sa

from flywheel.data.sources import make_engine
from flywheel.pipeline.steps import open_registry, project_status, rollback, train_challenger
from flywheel.state.db import head_revision

pytestmark = pytest.mark.postgres


def test_all_three_stores_on_one_postgresql_database(loaded_project, postgres_url):
    project = loaded_project({"stores": {"source": postgres_url, "tracking": postgres_url,
                                         "state": postgres_url},
                              "model": {"params": {"num_boost_round": 60}}})
    first = train_challenger(project)
    assert first.promoted
    second = train_challenger(project, registry=None)
    assert second.version == 2 and not second.promoted
    reg = open_registry(project)
    reg.set_alias("champion", 2)  # a move outside Flywheel is still a valid registry state
    status = project_status(project)
    assert status["champion"]["version"] == 2
    assert status["champion"]["trained_on"]["rows"] == first.prepared.snapshot.rows
    with make_engine(postgres_url).connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        n_loans = conn.execute(sa.text("SELECT count(*) FROM loans")).scalar()
        ours = conn.execute(sa.text("SELECT version_num FROM flywheel_alembic_version")).scalar()
        moves = conn.execute(sa.text("SELECT count(*) FROM alias_history")).scalar()
    assert {"loans", "alias_history", "predictions", "feedback", "registered_models",
            "model_versions", "runs"} <= tables
    assert n_loans > 30000 and ours == head_revision() and moves == 1
    with pytest.raises(Exception, match="no earlier champion"):
        rollback(project)  # v2 became champion outside Flywheel: no history to return along


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrations_build_exactly_the_declared_schema_and_step_back(backend, postgres_url, tmp_path):
    """The Alembic chain and the tables the code declares (state/db.py) must not drift apart."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.migration import MigrationContext

    from flywheel.state.db import MIGRATIONS, VERSION_TABLE, metadata, open_state

    url = postgres_url if backend == "postgresql" else f"sqlite:///{tmp_path / 'state.db'}"
    engine = open_state(url)

    def differences() -> list:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            return compare_metadata(context, metadata)

    assert differences() == []
    with engine.connect() as conn:
        indexes = {i["name"] for i in sa.inspect(conn).get_indexes("predictions")}
    assert indexes == {"ix_predictions_record_id", "ix_predictions_model_time"}
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    command.downgrade(cfg, "0003")
    with engine.connect() as conn:
        indexes = {i["name"] for i in sa.inspect(conn).get_indexes("predictions")}
    assert indexes == {"ix_predictions_record_id", "ix_predictions_created_at",
                       "ix_predictions_model_version"}
    command.upgrade(cfg, "head")
    assert differences() == []
    engine.dispose()
