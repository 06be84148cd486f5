"""The production path: source, tracking and state stores all on the PostgreSQL server."""

import pytest
import sqlalchemy as sa

from flywheel.data.sources import make_engine
from flywheel.lifecycle.aliases import rollback
from flywheel.lifecycle.status import project_status
from flywheel.lifecycle.train import train_challenger
from flywheel.registry import Registry
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
    reg = Registry.for_project(project)
    reg.set_alias("champion", 2)  # a move outside Flywheel is still a valid registry state
    status = project_status(project)
    assert status.champion.version == 2
    assert status.champion.trained_on.rows == first.prepared.snapshot.rows
    with make_engine(postgres_url).connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        n_loans = conn.execute(sa.text("SELECT count(*) FROM loans")).scalar()
        ours = conn.execute(sa.text("SELECT version_num FROM flywheel_alembic_version")).scalar()
        moves = conn.execute(sa.text("SELECT count(*) FROM alias_history")).scalar()
    assert {"loans", "alias_history", "predictions", "feedback", "registered_models",
            "model_versions", "runs"} <= tables
    assert n_loans > 30000 and ours == head_revision() and moves == 1
    # v2 became champion outside Flywheel: the next move adopts it into the history first, so a
    # rollback returns to the champion it replaced
    back = rollback(project)
    assert (back.version, back.previous_version) == (1, 2)
    history = [(m.version, m.action) for m in project_status(project).champion_history]
    assert history == [(1, "promote"), (2, "adopt"), (1, "rollback")]


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
            # the log's day partitions are tables of PostgreSQL's own making, not declared ones
            context = MigrationContext.configure(conn, opts={
                "version_table": VERSION_TABLE,
                "include_name": lambda name, kind, parent: not (kind == "table" and name and
                                                               name.startswith("predictions_"))})
            return compare_metadata(context, metadata)

    assert differences() == []
    with engine.connect() as conn:
        indexes = {i["name"] for i in sa.inspect(conn).get_indexes("predictions")}
    assert indexes == {"ix_predictions_record_id", "ix_predictions_model_time", "ix_predictions_json"}
    if backend == "postgresql":  # the log's segments compressed with lz4 (this server has it)
        with engine.connect() as conn:
            assert conn.exec_driver_sql(
                "SELECT attcompression FROM pg_attribute WHERE attrelid = "
                "'prediction_segments'::regclass AND attname = 'columns'").scalar_one() == "l"
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


def test_log_sink_stores_the_same_rows_in_postgresql_and_sqlite_and_skips_duplicates(postgres_url,
                                                                                     tmp_path):
    """PostgreSQL takes the log by COPY, SQLite by executemany: same rows back, duplicates skipped."""
    from datetime import UTC

    import orjson

    from flywheel.serving.tabular.logsink import write
    from flywheel.serving.tabular.predlog import insert_sql
    from flywheel.state.db import open_state, predictions
    from flywheel.state.logread import read_log

    def frame(ids: list[int]) -> list[list]:
        text = 'tab\there "quoted" back\\slash'
        return [[f"req{i}-0", f"req{i}", 1_764_000_000_123_456 + i, "m", 3,
                 {"a": 1.5, "s": text, **({"meta": {"entity_id": i}} if i % 2 else {})},
                 0.25 + i / 100, i % 2 == 0, 0.5] for i in ids]

    stored = {}
    for url in (postgres_url, f"sqlite:///{tmp_path / 'state.db'}"):
        engine = open_state(url)
        dialect = engine.dialect.name
        sql = insert_sql(dialect)
        assert write(engine, sql, [orjson.dumps(frame([1, 2])), orjson.dumps(frame([3]))]) == (3, 0)
        # a frame that repeats a stored record id: the others are still stored, nothing twice
        assert write(engine, sql, [orjson.dumps(frame([3, 4]))]) == (1, 0)
        with engine.connect() as conn:
            rows = conn.execute(sa.select(predictions).order_by(predictions.c.id)).all()
            logged = read_log(conn, "m")
        inputs = logged.inputs.to_dict("records")
        stored[dialect] = [(r.record_id, r.created_at.astimezone(UTC).replace(tzinfo=None)
                            if r.created_at.tzinfo else r.created_at, r.model_version, inputs[i],
                            logged.meta_values("entity_id")[i], r.probability, r.decision, r.latency_ms)
                           for i, r in enumerate(rows)]
        engine.dispose()
    assert [r[0] for r in stored["postgresql"]] == ["req1-0", "req2-0", "req3-0", "req4-0"]
    assert stored["postgresql"] == stored["sqlite"]
    assert stored["sqlite"][0][1].isoformat() == "2025-11-24T16:00:00.123457"
    assert stored["sqlite"][0][3] == {"a": 1.5, "s": 'tab\there "quoted" back\\slash'}
    assert stored["sqlite"][0][4] == 1 and stored["sqlite"][1][4] is None
