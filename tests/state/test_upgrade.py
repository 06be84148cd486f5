"""A project made by an earlier release opens, migrates and serves with today's code.

`tests/fixtures/upgrade/*.tar.gz` each hold a project's state database and MLflow store as a
release left them (made by scripts/make_upgrade_fixture.py through the CLI only: ingest, train,
serve + traffic + feedback, monitor, retrain, promote, rollback). A later change to the schema adds
its migration and extends these checks; it never edits an archive.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import httpx
import pandas as pd
import pytest
import sqlalchemy as sa

from flywheel.config import Project, load_project
from flywheel.lifecycle.aliases import rollback
from flywheel.lifecycle.status import project_status
from flywheel.pipeline.runs import EvaluateResult, PromoteResult, list_runs
from flywheel.registry import CHAMPION, Registry
from flywheel.state.aliases import alias_moves, pointer
from flywheel.state.db import VERSION_TABLE, head_revision, open_state
from tests.conftest import SAMPLE, ServerProcess, repoint_mlflow

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "upgrade"
MADE_UNDER = "/tmp/flywheel-upgrade-fixture/.flywheel"  # where the release wrote it
ARCHIVES = sorted(FIXTURES.glob("*.tar.gz"))


def unpack(archive: Path, folder: Path) -> Project:
    """Unpack beside a config, and point MLflow's recorded artifact paths at the new place."""
    home = folder / ".flywheel"
    home.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(home, filter="data")
    (home / "flywheel.yaml").rename(folder / "flywheel.yaml")
    repoint_mlflow(home / "mlflow.db", MADE_UNDER, str(home))
    return load_project(folder / "flywheel.yaml", env={"FLYWHEEL_HOME": str(home)})


@pytest.fixture(params=ARCHIVES, ids=[a.name.removesuffix(".tar.gz") for a in ARCHIVES])
def upgraded(request, tmp_path) -> Project:
    return unpack(request.param, tmp_path / "project")


def test_there_is_a_fixture_of_the_first_schema():
    assert any(a.name.startswith("state-0004-") for a in ARCHIVES)


def test_state_migrates_to_head_and_keeps_its_rows(upgraded):
    engine = open_state(upgraded.state_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar() == \
            head_revision()
        assert conn.execute(sa.text("SELECT count(*) FROM predictions")).scalar() == 300
        assert conn.execute(sa.text("SELECT count(*) FROM feedback")).scalar() == 300
        assert conn.execute(sa.text("SELECT count(*) FROM monitor_runs")).scalar() == 1
        # 0008 (every task's outputs): the binary rows are kept as they were, beside room for a
        # regression value and a multiclass label
        rows = conn.execute(sa.text("SELECT count(*) FROM predictions WHERE probability IS NOT NULL "
                                    "AND decision IS NOT NULL AND value IS NULL AND label IS NULL")).scalar()
        assert rows == 300
        labels = conn.execute(sa.text("SELECT count(*) FROM feedback WHERE label IN (0, 1) "
                                      "AND value IS NULL AND label_text IS NULL")).scalar()
        assert labels == 300
        inspector = sa.inspect(conn)
        nullable = {c["name"]: c["nullable"] for c in inspector.get_columns("predictions")}
        assert nullable["probability"] and nullable["decision"] and not nullable["record_id"]
        runs = {c["name"] for c in inspector.get_columns("monitor_runs")}
        assert {"metric", "metric_value", "metrics"} <= runs
    moves = alias_moves(engine, "sba-loans", CHAMPION)
    assert [(m.version, m.action, m.applied) for m in moves] == \
        [(1, "promote", True), (2, "promote", True), (1, "manual", True), (2, "rollback", True)]
    [run] = list_runs(upgraded)  # an older run's outputs read as today's typed results
    assert run.status == "succeeded" and run.version == 2
    assert run.result("evaluate", EvaluateResult).passed
    assert run.result("promote", PromoteResult).promoted


def test_status_and_the_alias_path_work_on_the_upgraded_store(upgraded):
    status = project_status(upgraded)
    assert status.champion.version == 2 and status.champion.model_type == "lightgbm"
    assert len(status.champion_history) == 4
    back = rollback(upgraded)  # the state DB has no alias row yet: it adopts MLflow's champion
    assert (back.version, back.previous_version, back.action) == (1, 2, "rollback")
    assert Registry.for_project(upgraded).alias_version(CHAMPION) == 1
    assert pointer(open_state(upgraded.state_url), "sba-loans", CHAMPION).version == 1


def test_the_upgraded_project_serves_its_champion(upgraded):
    record = pd.read_parquet(SAMPLE).iloc[0]
    fields = ["gr_appv", "sba_appv", "no_emp", "create_job", "retained_job", "new_exist",
              "franchise_code", "state", "bank_state", "urban_rural", "rev_line_cr", "low_doc",
              "naics", "bank"]
    body = {f: (None if pd.isna(record[f]) else record[f].item() if hasattr(record[f], "item")
                else record[f]) for f in fields}
    with ServerProcess(upgraded) as server:
        answer = httpx.post(f"{server.url}/v1/predict", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == 2
        model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"][0]
        assert model["lineage"]["gate"] == "passed"
        # 0007 (server_keys): the upgraded server signs its record ids and takes labels for them;
        # an id the release issued before (unsigned) needs serving.accept_unsigned_feedback.
        with open_state(upgraded.state_url).connect() as conn:
            old_id = conn.execute(sa.text("SELECT record_id FROM predictions ORDER BY id LIMIT 1")).scalar()
        new_id = answer.json()["predictions"][0]["record_id"]
        labels = {"labels": [{"record_id": new_id, "label": 1}]}
        assert httpx.post(f"{server.url}/v1/feedback", json=labels, timeout=30).status_code == 200
        labels = {"labels": [{"record_id": old_id, "label": 1}]}
        refused = httpx.post(f"{server.url}/v1/feedback", json=labels, timeout=30)
        assert refused.status_code == 422 and refused.json()["detail"][0]["type"] == "unknown_record"
    with open_state(upgraded.state_url).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM predictions")).scalar() == 301
        assert conn.execute(sa.text("SELECT count(*) FROM server_keys")).scalar() == 1


def test_the_release_log_moves_into_day_partitions_on_postgresql(tmp_path, postgres_url):
    """The archive's prediction log and labels, put in a PostgreSQL state database at the
    archive's own revision, migrate to head: partitioned by day, not a row lost or changed."""
    from alembic import command
    from alembic.config import Config

    from flywheel.state.db import MIGRATIONS
    from flywheel.state.partitions import DEFAULT, day_partitions, is_partitioned

    project = unpack(ARCHIVES[0], tmp_path / "project")
    release = sa.create_engine(project.state_url)
    with release.connect() as conn:
        revision = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
        log = pd.read_sql("SELECT * FROM predictions ORDER BY id", conn)
        labels = pd.read_sql("SELECT * FROM feedback", conn)
    release.dispose()
    log["created_at"] = pd.to_datetime(log["created_at"], utc=True)
    log["decision"] = log["decision"].astype(bool)
    for col in ("observed_at", "received_at"):
        labels[col] = pd.to_datetime(labels[col], utc=True)
    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    command.upgrade(cfg, revision)
    log.to_sql("predictions", engine, if_exists="append", index=False)
    labels.to_sql("feedback", engine, if_exists="append", index=False)
    command.upgrade(cfg, "head")
    with engine.connect() as conn:
        assert is_partitioned(conn)
        assert len(day_partitions(conn)) >= log["created_at"].dt.date.nunique()
        assert conn.exec_driver_sql(f"SELECT count(*) FROM {DEFAULT}").scalar() == 0
        after = pd.read_sql("SELECT id, record_id, created_at, inputs, probability, decision "
                            "FROM predictions ORDER BY id", conn)
        joined = conn.exec_driver_sql("SELECT count(*) FROM predictions p JOIN feedback f "
                                      "ON f.record_id = p.record_id").scalar()
    assert len(after) == 300 and joined == 300
    before = log[["id", "record_id", "created_at", "inputs", "probability", "decision"]]
    pd.testing.assert_frame_equal(after, before.reset_index(drop=True), check_dtype=False)
    engine.dispose()


def test_the_release_log_reads_as_written_and_compacts_into_segments(upgraded):
    """0011 (the columnar log): the release's rows keep their inputs as JSON text and every reader
    reads them as before; `log compact` rewrites them into segments (the explicit step, never the
    migration) and they read back the same, the monitor's window too."""
    import orjson

    from flywheel import api
    from flywheel.config import MonitorWindow
    from flywheel.monitoring.monitor import read_window
    from flywheel.state.logread import read_log

    engine = open_state(upgraded.state_url)
    with engine.connect() as conn:
        texts = conn.execute(sa.text("SELECT inputs, meta FROM predictions ORDER BY id")).all()
        before = read_log(conn, "sba-loans")
    parsed = pd.DataFrame.from_records([orjson.loads(t.inputs) for t in texts])
    assert len(before) == 300 and texts[0].inputs != ""
    pd.testing.assert_frame_equal(before.inputs, parsed)
    window = read_window(engine, "sba-loans", MonitorWindow(by="count", size=300))
    done = api.log_compact(upgraded)
    assert done.rewritten_rows == 300 and done.segments == 1
    with engine.connect() as conn:
        after = read_log(conn, "sba-loans")
        assert conn.execute(sa.text("SELECT count(*) FROM predictions WHERE inputs <> ''")).scalar() == 0
    pd.testing.assert_frame_equal(after.inputs, before.inputs)
    pd.testing.assert_frame_equal(after.base, before.base)
    again = read_window(engine, "sba-loans", MonitorWindow(by="count", size=300))
    pd.testing.assert_frame_equal(again, window, check_categorical=False)  # the same texts
