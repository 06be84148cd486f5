"""The one way an alias moves: `move_alias`, used by train, promote, rollback, finetune, the
retraining pipeline and the replay.

A move, under the model's alias lock in the state database:
1. reconcile: finish what a dead mover left (see below);
2. compare-and-set in the state database, in one transaction: the alias must still point at the
   version the caller expected; it now points at the new one, its fencing token grows by one, and
   the history row (actor, reason, token) is written as an intent (`applied = false`);
3. move MLflow's alias (MLflow has no conditional write: it follows the state database);
4. mark the history row applied. If the token changed meanwhile (this mover's lock expired and
   another mover went ahead), MLflow is set to the newer move's version instead: the fence.

Reconciliation (at the start of every move, of every pipeline run, of `flywheel serve`): where an
intent is pending, MLflow is brought to the state database's version (the move finishes); where
MLflow was moved outside Flywheel (its UI, its API), the state database adopts that version and
records it as an `adopt` move.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from flywheel.config import ProjectBase
from flywheel.core.errors import AliasConflict, PipelineError
from flywheel.core.lineage import actor, crash_point
from flywheel.registry import CHAMPION, STAGE_ALIASES, Registry
from flywheel.state import aliases as records
from flywheel.state import rollouts
from flywheel.state.aliases import ANY, AliasMove
from flywheel.state.db import open_state
from flywheel.state.locks import state_lock

LOCK_TTL_S = 30  # a lease renewed every 10 s (SQLite); PostgreSQL: advisory, no TTL
LOCK_WAIT_S = 120


def move_alias(registry: Registry, engine: sa.Engine, alias: str, version: int, *,
               expected: Any = ANY, action: str, reason: str) -> AliasMove:
    """Point `alias` at `version` if it still points at `expected`; raise AliasConflict if not."""
    alias = STAGE_ALIASES.get(alias.lower(), alias)
    registry.version(version)  # raises RegistryError for a version the registry does not have
    with state_lock(engine, _lock_name(registry), ttl_s=LOCK_TTL_S, wait_s=LOCK_WAIT_S):
        _reconcile_locked(registry, engine)
        move = records.claim_move(engine, registry.model_name, alias, version, expected, action,
                                  reason, actor(), adopt=registry.alias_version(alias))
        crash_point("alias:after-claim")
        registry.set_alias(alias, version)
        crash_point("alias:after-mlflow")
        now_at = records.pointer(engine, registry.model_name, alias)
        if now_at is not None and now_at.token != move.token:
            registry.set_alias(alias, now_at.version)  # fenced: a later move owns the alias
        records.mark_applied(engine, [move.id] if move.id is not None else [])
    return move


def reconcile_aliases(registry: Registry, engine: sa.Engine) -> list[str]:
    """Make MLflow's aliases and the state database agree; say what was fixed."""
    with state_lock(engine, _lock_name(registry), ttl_s=LOCK_TTL_S, wait_s=LOCK_WAIT_S):
        return _reconcile_locked(registry, engine)


def _reconcile_locked(registry: Registry, engine: sa.Engine) -> list[str]:
    # Only under the alias lock: a pending intent seen here belongs to a mover that died.
    name = registry.model_name
    pending = records.pending_moves(engine, name)
    fixed: list[str] = []
    for alias, here in records.aliases_of(engine, name).items():
        in_mlflow = registry.alias_version(alias)
        if in_mlflow == here.version:
            continue
        if in_mlflow is None or any(m.alias == alias for m in pending):
            registry.set_alias(alias, here.version)
            fixed.append(f"{name}@{alias}: finished the interrupted move to v{here.version}")
        else:
            records.record_adopted(engine, name, alias, in_mlflow, here.version,
                                   "moved in MLflow outside Flywheel; adopted", actor())
            fixed.append(f"{name}@{alias}: adopted v{in_mlflow}, set in MLflow outside Flywheel")
    records.mark_applied(engine, [m.id for m in pending if m.id is not None])
    return fixed


def _lock_name(registry: Registry) -> str:
    return f"alias:{registry.model_name}"


# ---- the moves users ask for ---------------------------------------------------------------------


def promote(project: ProjectBase, version: int, alias: str = CHAMPION, reason: str = "manual",
            registry: Registry | None = None) -> AliasMove:
    """Move an alias by hand (no gate); recorded in the alias history with who did it."""
    registry = registry or Registry.for_project(project)
    engine = open_state(project.state_url)
    move = move_alias(registry, engine, alias, version, action="manual", reason=reason)
    if move.alias == CHAMPION:
        _manual_move_wins(engine, registry, version, "promote")
    return move


def _manual_move_wins(engine: sa.Engine, registry: Registry, version: int, action: str) -> None:
    """A champion moved by hand ends the running rollout: promoted when its challenger was moved
    to, aborted otherwise."""
    running = rollouts.running(engine, registry.model_name)
    if running is None:
        return
    status = rollouts.PROMOTED if version == running.challenger_version else rollouts.ABORTED
    rollouts.end(engine, running.id, status, datetime.now(UTC),
                 f"manual {action} to v{version} (wins over the rollout)")


def rollback(project: ProjectBase, registry: Registry | None = None) -> AliasMove:
    """Return `champion` to the version it replaced, from the alias history."""
    registry = registry or Registry.for_project(project)
    engine = open_state(project.state_url)
    reconcile_aliases(registry, engine)
    current = registry.alias_version(CHAMPION)
    if current is None:
        raise PipelineError("nothing to roll back: no version has alias champion")
    # The move that made the current champion champion, not a rollback onto it: rolling back
    # twice walks further back instead of bouncing between two versions.
    moves = [m for m in records.alias_moves(engine, registry.model_name, CHAMPION)
             if m.version == current and m.action != "rollback"]
    if not moves or moves[-1].previous_version is None:
        raise PipelineError(f"v{current} is the first champion of {registry.model_name}: "
                            "there is no earlier champion to return to")
    move = move_alias(registry, engine, CHAMPION, moves[-1].previous_version, expected=current,
                      action="rollback", reason=f"rollback from v{current}")
    _manual_move_wins(engine, registry, move.version, "rollback")
    return move


@dataclass(frozen=True)
class PromotionOutcome:
    """What became of a gated challenger."""

    promoted: bool
    reason: str
    move: AliasMove | None = None


def promote_if_passed(registry: Registry, engine: sa.Engine, version: int, passed: bool,
                      summary: str, evaluated_against: int | None) -> PromotionOutcome:
    """Make `version` champion if its gate passed and the champion is still the one it beat."""
    if not passed:
        return PromotionOutcome(False, "gate failed: " + summary)
    try:
        move = move_alias(registry, engine, CHAMPION, version, expected=evaluated_against,
                          action="promote", reason=summary)
    except AliasConflict as exc:
        return PromotionOutcome(False, f"champion moved since evaluation: {exc}; not promoting "
                                       "over a champion it was not compared with")
    return PromotionOutcome(True, summary, move)
