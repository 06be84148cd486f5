"""The rollouts' records in the state database: the state machine's rows (`rollouts`) and the
challenger's shadow answers (`shadow_predictions`), and the paired read that compares the two
versions on the same labelled records. The policy (when to start, what to decide) is in
`flywheel.lifecycle.rollout`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from flywheel.state.db import feedback, predictions, rollouts, shadow_predictions

RUNNING, PROMOTED, ABORTED = "running", "promoted", "aborted"


@dataclass(frozen=True)
class Rollout:
    id: int
    model_name: str
    mode: str
    champion_version: int | None
    challenger_version: int
    status: str
    started_at: datetime
    ended_at: datetime | None
    reason: str
    evidence: dict[str, Any] | None
    share: float | None = None  # canary: the challenger's share of the traffic
    after_prediction_id: int | None = None  # canary: the log's last id when it started
    serving_from: datetime | None = None  # canary: every worker follows it from then (wall clock)
    failed: int = 0  # shadow: the records the challenger could not score
    failure: str | None = None  # the latest failure of the challenger (loading or scoring)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "mode": self.mode, "share": self.share,
                "champion_version": self.champion_version,
                "challenger_version": self.challenger_version, "status": self.status,
                "started_at": self.started_at.isoformat(),
                "ended_at": self.ended_at.isoformat() if self.ended_at else None,
                "reason": self.reason, "evidence": self.evidence, "failed": self.failed,
                "failure": self.failure}


def _aware(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def _rollout(row: Any) -> Rollout:
    started = _aware(row["started_at"])
    assert started is not None
    return Rollout(row["id"], row["model_name"], row["mode"], row["champion_version"],
                   row["challenger_version"], row["status"], started, _aware(row["ended_at"]),
                   row["reason"], json.loads(row["evidence"]) if row["evidence"] else None,
                   row["share"], row["after_prediction_id"], _aware(row["serving_from"]),
                   row["failed"] or 0, row["failure"])


def start(engine: sa.Engine, model_name: str, mode: str, champion: int | None, challenger: int,
          at: datetime, reason: str, share: float | None = None,
          follow_s: float = 0.0) -> tuple[Rollout, list[Rollout]]:
    """A new running rollout, in one transaction with the abort of any that was running (a new
    challenger replaces it); the new one and those aborted. `follow_s`: how long the servers take
    to follow it (a canary's answers count from then on)."""
    with engine.begin() as conn:
        last_id = conn.execute(sa.select(sa.func.max(predictions.c.id))
                               .where(predictions.c.model_name == model_name)).scalar()
        running = [_rollout(r) for r in conn.execute(
            sa.select(rollouts).where(rollouts.c.model_name == model_name,
                                      rollouts.c.status == RUNNING)).mappings()]
        for old in running:
            conn.execute(rollouts.update().where(rollouts.c.id == old.id).values(
                status=ABORTED, ended_at=at,
                reason=f"replaced by the rollout of v{challenger} (was: {old.reason})"))
        new_id = conn.execute(rollouts.insert().returning(rollouts.c.id).values(
            model_name=model_name, mode=mode, champion_version=champion,
            challenger_version=challenger, status=RUNNING, started_at=at, reason=reason,
            share=share, after_prediction_id=last_id or 0,
            serving_from=datetime.now(UTC) + timedelta(seconds=follow_s),
        )).scalar_one()
        row = conn.execute(sa.select(rollouts).where(rollouts.c.id == new_id)).mappings().one()
    return _rollout(row), running


def running(engine: sa.Engine | sa.Connection, model_name: str) -> Rollout | None:
    query = (sa.select(rollouts).where(rollouts.c.model_name == model_name, rollouts.c.status == RUNNING)
             .order_by(rollouts.c.id.desc()).limit(1))
    if isinstance(engine, sa.Connection):
        row = engine.execute(query).mappings().first()
    else:
        with engine.connect() as conn:
            row = conn.execute(query).mappings().first()
    return _rollout(row) if row is not None else None


def history(engine: sa.Engine, model_name: str, limit: int = 20) -> list[Rollout]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(rollouts).where(rollouts.c.model_name == model_name)
                            .order_by(rollouts.c.id.desc()).limit(limit)).mappings().all()
    return [_rollout(r) for r in rows]


def save_evidence(engine: sa.Engine, rollout_id: int, evidence: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(rollouts.update().where(rollouts.c.id == rollout_id, rollouts.c.status == RUNNING)
                     .values(evidence=json.dumps(evidence)))


def end(engine: sa.Engine, rollout_id: int, status: str, at: datetime, reason: str,
        evidence: dict[str, Any] | None = None) -> bool:
    """End a running rollout (compare-and-set on `running`); False when it had already ended."""
    values: dict[str, Any] = {"status": status, "ended_at": at, "reason": reason}
    if evidence is not None:
        values["evidence"] = json.dumps(evidence)
    with engine.begin() as conn:
        done = conn.execute(rollouts.update().where(rollouts.c.id == rollout_id,
                                                    rollouts.c.status == RUNNING).values(**values))
    return bool(done.rowcount)


def end_running(engine: sa.Engine, model_name: str, status: str, at: datetime, reason: str) -> list[int]:
    """End whatever rollout of the model is running (a manual promote or rollback wins over it)."""
    with engine.begin() as conn:
        ids = list(conn.execute(sa.select(rollouts.c.id).where(
            rollouts.c.model_name == model_name, rollouts.c.status == RUNNING)).scalars())
        if ids:
            conn.execute(rollouts.update().where(rollouts.c.id.in_(ids)).values(
                status=status, ended_at=at, reason=reason))
    return ids


def insert_shadow(conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
    """The challenger's answers, in the caller's transaction; a record already answered in the
    rollout (a batch the sink forwarded twice after a retry) keeps its first answer."""
    if not rows:
        return
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    conn.execute(insert(shadow_predictions).on_conflict_do_nothing(), rows)


def note_failure(engine: sa.Engine, rollout_id: int, records: int, message: str) -> None:
    """The challenger failed: on `records` records (0: it could not be loaded), with `message`.
    The rollout's check reads it as a guard rail (see `flywheel.lifecycle.rollout.decide`)."""
    with engine.begin() as conn:
        conn.execute(rollouts.update().where(rollouts.c.id == rollout_id, rollouts.c.status == RUNNING)
                     .values(failed=rollouts.c.failed + records, failure=message[:2000]))


def shadow_count(engine: sa.Engine, rollout_id: int) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(shadow_predictions)
                                .where(shadow_predictions.c.rollout_id == rollout_id)).scalar_one())


def paired(engine: sa.Engine, rollout: Rollout) -> list[dict[str, Any]]:
    """The records both versions answered in this rollout that have a label: per record the
    champion's answer (`c_*`), the challenger's (`s_*`) and the label, in the order served."""
    sp, p, f = shadow_predictions, predictions, feedback
    query = (sa.select(sp.c.record_id, p.c.id.label("prediction_id"),
                       p.c.probability.label("c_probability"),
                       p.c.value.label("c_value"), p.c.label.label("c_label"),
                       p.c.scores.label("c_scores"), sp.c.probability.label("s_probability"),
                       sp.c.value.label("s_value"), sp.c.label.label("s_label"),
                       sp.c.scores.label("s_scores"), f.c.label.label("y"),
                       f.c.value.label("y_value"), f.c.label_text.label("y_text"))
             .join(p, sa.and_(p.c.record_id == sp.c.record_id, p.c.model_name == rollout.model_name))
             .join(f, f.c.record_id == sp.c.record_id)
             .where(sp.c.rollout_id == rollout.id)
             .order_by(sp.c.id))
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def answered(engine: sa.Engine, rollout: Rollout, limit: int = 200_000) -> list[dict[str, Any]]:
    """Both versions' answers to the latest `limit` records of the rollout, labelled or not (for
    each version's metric estimated before the labels)."""
    sp, p = shadow_predictions, predictions
    query = (sa.select(p.c.probability.label("c_probability"), p.c.scores.label("c_scores"),
                       sp.c.probability.label("s_probability"), sp.c.scores.label("s_scores"))
             .join(p, sa.and_(p.c.record_id == sp.c.record_id, p.c.model_name == rollout.model_name))
             .where(sp.c.rollout_id == rollout.id).order_by(sp.c.id.desc()).limit(limit))
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def canary_answers(engine: sa.Engine, rollout: Rollout) -> list[dict[str, Any]]:
    """A canary's labelled answers, by either version, since every server followed it: per record
    the version that answered, its answer and the label, in the order served."""
    p, f = predictions, feedback
    versions = [v for v in (rollout.champion_version, rollout.challenger_version) if v is not None]
    query = (sa.select(p.c.id.label("prediction_id"), p.c.model_version, p.c.probability,
                       p.c.value, p.c.label, p.c.scores, f.c.label.label("y"),
                       f.c.value.label("y_value"), f.c.label_text.label("y_text"))
             .join(f, f.c.record_id == p.c.record_id)
             .where(p.c.model_name == rollout.model_name, p.c.id > (rollout.after_prediction_id or 0),
                    p.c.model_version.in_(versions))
             .order_by(p.c.id))
    if rollout.serving_from is not None:
        query = query.where(p.c.created_at >= rollout.serving_from)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]
