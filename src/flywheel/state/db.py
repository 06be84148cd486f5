"""Flywheel's own state database: created and migrated with Alembic; alias history lives here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig

from flywheel.data.sources import make_engine

MIGRATIONS = Path(__file__).parent / "migrations"
# Not alembic's default name: the state tables may share a PostgreSQL database with MLflow's.
VERSION_TABLE = "flywheel_alembic_version"

metadata = sa.MetaData()
alias_history = sa.Table(
    "alias_history",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("alias", sa.String(50), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("previous_version", sa.Integer, nullable=True),
    sa.Column("action", sa.String(20), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("moved_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_alias_history_model_alias", "model_name", "alias"),
)
predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("record_id", sa.String(100), nullable=False),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("model_version", sa.Integer, nullable=False),
    sa.Column("inputs", sa.Text, nullable=False),
    sa.Column("meta", sa.Text, nullable=True),
    sa.Column("probability", sa.Float, nullable=False),
    sa.Column("decision", sa.Boolean, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Index("ix_predictions_record_id", "record_id", unique=True),
    sa.Index("ix_predictions_created_at", "created_at"),
    sa.Index("ix_predictions_model_version", "model_name", "model_version"),
)
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("record_id", sa.String(100), primary_key=True),
    sa.Column("label", sa.Integer, nullable=False),
    sa.Column("observed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class AliasMove:
    model_name: str
    alias: str
    version: int
    previous_version: int | None
    action: str  # "promote" (gate passed), "manual" (flywheel promote), "rollback"
    reason: str
    moved_at: datetime


def open_state(url: str, migrate: bool = True) -> sa.Engine:
    """An engine on the state database, migrated to the latest schema unless told not to."""
    engine = make_engine(url)
    if not migrate:
        return engine
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    command.upgrade(cfg, "head")
    return engine


def head_revision() -> str:
    """The newest migration: what a fully migrated state database records."""
    from alembic.script import ScriptDirectory

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def record_alias_move(engine: sa.Engine, move: AliasMove) -> None:
    with engine.begin() as conn:
        conn.execute(alias_history.insert().values(**move.__dict__))


def alias_moves(engine: sa.Engine, model_name: str, alias: str) -> list[AliasMove]:
    """Every move of `alias`, oldest first."""
    query = (
        sa.select(alias_history)
        .where(alias_history.c.model_name == model_name, alias_history.c.alias == alias)
        .order_by(alias_history.c.id)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [AliasMove(**{k: v for k, v in r.items() if k != "id"}) for r in rows]


def now() -> datetime:
    return datetime.now(UTC)
