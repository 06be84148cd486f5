"""Where each alias points, as the state database records it: the authority for alias moves.

MLflow has no conditional alias write, so the compare-and-set happens here: `claim_move` checks
the expected version, bumps the alias's fencing token and writes the history row (as an intent,
`applied = false`) in one transaction. The caller then moves MLflow's alias and marks the row
applied. A process that dies in between leaves an intent that reconciliation finishes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from flywheel.core.errors import AliasConflict
from flywheel.state.db import alias_history, alias_state, now

ANY = object()  # `expected=ANY`: move whatever the alias points at now


@dataclass(frozen=True)
class AliasMove:
    """One move of an alias, as recorded in the alias history."""

    model_name: str
    alias: str
    version: int
    previous_version: int | None
    action: str  # "promote" (gate passed), "manual" (flywheel promote), "rollback", "adopt"
    reason: str
    moved_at: datetime
    token: int | None = None
    actor: str | None = None
    applied: bool = True
    id: int | None = None


@dataclass(frozen=True)
class AliasPointer:
    """Where the state database says an alias points, and the fencing token of that move."""

    version: int
    token: int


def current(conn: sa.Connection, model_name: str, alias: str) -> AliasPointer | None:
    row = conn.execute(sa.select(alias_state.c.version, alias_state.c.token).where(
        alias_state.c.model_name == model_name, alias_state.c.alias == alias)).first()
    return AliasPointer(int(row.version), int(row.token)) if row else None


def pointer(engine: sa.Engine, model_name: str, alias: str) -> AliasPointer | None:
    with engine.connect() as conn:
        return current(conn, model_name, alias)


@contextlib.contextmanager
def _write_transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A transaction that holds the write lock from its first statement (SQLite: BEGIN IMMEDIATE;
    PostgreSQL: the alias_state table locked), committed when the block ends, rolled back if it
    raises."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.begin()
            conn.execute(sa.text("LOCK TABLE alias_state IN SHARE ROW EXCLUSIVE MODE"))
        try:
            yield conn
            conn.commit()
        except BaseException:
            conn.rollback()
            raise


def claim_move(engine: sa.Engine, model_name: str, alias: str, version: int, expected: Any,
               action: str, reason: str, actor: str, adopt: int | None) -> AliasMove:
    """Compare-and-set in one transaction: check `expected`, point the alias at `version`, bump the
    token, and record the move as an intent. `adopt` is where MLflow's alias points now, taken as
    the starting point when the state database has no record of this alias yet (an older store).
    Raises AliasConflict when the alias is not at `expected`."""
    with _write_transaction(engine) as conn:
        here = current(conn, model_name, alias)
        previous = here.version if here else adopt
        if expected is not ANY and expected != previous:
            raise AliasConflict(
                f"{model_name}@{alias} moved: it points at {_v(previous)}, the move expected "
                f"{_v(expected)}; not moving it to v{version}")
        token, at = _point(conn, model_name, alias, version, here)
        move = AliasMove(model_name, alias, version, previous, action, reason, at, token, actor, False)
        row_id = conn.execute(alias_history.insert().values(
            **{k: v for k, v in move.__dict__.items() if k != "id"})).inserted_primary_key[0]  # type: ignore[index]
    return AliasMove(**{**move.__dict__, "id": int(row_id)})


def _point(conn: sa.Connection, model_name: str, alias: str, version: int,
           here: AliasPointer | None) -> tuple[int, datetime]:
    """Point the alias at `version` with the next fencing token; return the token and the time."""
    token, at = (here.token if here else 0) + 1, now()
    values = {"version": version, "token": token, "updated_at": at}
    if here is None:
        conn.execute(alias_state.insert().values(model_name=model_name, alias=alias, **values))
    else:
        conn.execute(alias_state.update().where(alias_state.c.model_name == model_name,
                                                alias_state.c.alias == alias).values(**values))
    return token, at


def mark_applied(engine: sa.Engine, move_ids: list[int]) -> None:
    """MLflow's alias now matches these moves."""
    if move_ids:
        with engine.begin() as conn:
            conn.execute(alias_history.update().where(alias_history.c.id.in_(move_ids))
                         .values(applied=True))


def record_adopted(engine: sa.Engine, model_name: str, alias: str, version: int,
                   previous: int | None, reason: str, actor: str) -> None:
    """Take MLflow's alias as it is (moved outside Flywheel, or never recorded here)."""
    with _write_transaction(engine) as conn:
        token, at = _point(conn, model_name, alias, version, current(conn, model_name, alias))
        if previous != version:
            conn.execute(alias_history.insert().values(
                model_name=model_name, alias=alias, version=version, previous_version=previous,
                action="adopt", reason=reason, moved_at=at, token=token, actor=actor, applied=True))


def pending_moves(engine: sa.Engine, model_name: str) -> list[AliasMove]:
    """Intents whose MLflow side is not confirmed yet, oldest first."""
    return _moves(engine, model_name, None, pending=True)


def alias_moves(engine: sa.Engine, model_name: str, alias: str) -> list[AliasMove]:
    """Every move of `alias`, oldest first (intents included: the state database's view)."""
    return _moves(engine, model_name, alias, pending=False)


def aliases_of(engine: sa.Engine, model_name: str) -> dict[str, AliasPointer]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(alias_state).where(alias_state.c.model_name == model_name)).all()
    return {r.alias: AliasPointer(int(r.version), int(r.token)) for r in rows}


def _moves(engine: sa.Engine, model_name: str, alias: str | None, pending: bool) -> list[AliasMove]:
    query = sa.select(alias_history).where(alias_history.c.model_name == model_name)
    if alias is not None:
        query = query.where(alias_history.c.alias == alias)
    if pending:
        query = query.where(alias_history.c.applied == sa.false())
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(alias_history.c.id)).mappings().all()
    return [AliasMove(**dict(r)) for r in rows]


def _v(version: Any) -> str:
    return "nothing" if version is None else f"v{version}"
