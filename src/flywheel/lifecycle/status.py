"""What `flywheel status` shows: champion and challenger with metrics and lineage, alias history."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flywheel.config import ProjectBase
from flywheel.core.secrets import redact
from flywheel.registry import CHALLENGER, CHAMPION, Registry, VersionInfo
from flywheel.state import rollouts
from flywheel.state.aliases import alias_moves
from flywheel.state.db import open_state

_LORA_METRICS = ("perplexity_before", "perplexity_after", "champion_perplexity", "seconds_per_step",
                 "tokens_per_second")


@dataclass(frozen=True)
class TrainedOn:
    """The data a version learnt from: its window, when its labels were known, its rows."""

    start: str | None = field(metadata={"json": "from"})
    end: str | None = field(metadata={"json": "to"})
    as_of: str | None
    rows: int | None
    rows_from: str = "source"  # source, or feedback: the labels posted back
    feedback_rows: int = 0


@dataclass(frozen=True)
class VersionStatus:
    """One registered version: its metrics, gate verdict and lineage (run, data hash, git SHA)."""

    version: int
    run_id: str
    aliases: list[str]
    model_type: str | None
    metrics: dict[str, float]
    gate: str | None
    gate_reasons: str | None
    data_hash: str | None
    git_sha: str | None
    config_hash: str | None
    trained_on: TrainedOn


@dataclass(frozen=True)
class ChampionMove:
    """One move of the champion alias, from the alias history."""

    version: int
    previous_version: int | None
    action: str
    reason: str
    moved_at: str
    actor: str | None
    applied: bool


@dataclass(frozen=True)
class ProjectStatus:
    """What `flywheel status` shows (and prints with --json)."""

    model: str
    project: str
    kind: str  # tabular or lora
    gate_metric: str
    tracking_uri: str
    champion: VersionStatus | None
    challenger: VersionStatus | None
    champion_history: list[ChampionMove]
    champion_history_error: str | None = None  # the state database could not be read
    # the running (or latest) rollout: mode, versions, status, evidence so far, decision
    rollout: dict[str, Any] | None = None


def project_status(project: ProjectBase) -> ProjectStatus:
    """Champion, challenger and the champion's alias history of a project (either kind)."""
    registry = Registry.for_project(project)
    found = {}
    for alias in (CHAMPION, CHALLENGER):
        version = registry.alias_version(alias)
        found[alias] = describe(registry.version(version)) if version is not None else None
    history: list[ChampionMove] = []
    rollout: dict[str, Any] | None = None
    error = None
    try:
        state = open_state(project.state_url)
        history = [ChampionMove(m.version, m.previous_version, m.action, m.reason, m.moved_at.isoformat(),
                                m.actor, m.applied)
                   for m in alias_moves(state, registry.model_name, CHAMPION)]
        latest = rollouts.history(state, registry.model_name, limit=1)
        if latest:
            rollout = {**latest[0].to_dict(), "shadow_answers": rollouts.shadow_count(state, latest[0].id)}
    except Exception as exc:  # status must still answer when the state DB is unreachable
        error = str(exc)
    return ProjectStatus(registry.model_name, project.config.project,
                         project.config.kind,  # type: ignore[attr-defined]
                         project.config.gate.metric,  # type: ignore[attr-defined]
                         redact(project.tracking_url), found[CHAMPION], found[CHALLENGER], history, error,
                         rollout)


def describe(info: VersionInfo) -> VersionStatus:
    """A registered version as `status` shows it."""
    metrics = {k.removeprefix("holdout_"): v for k, v in info.metrics.items() if k.startswith("holdout_")}
    for name in ("train_seconds", *_LORA_METRICS):
        if name in info.metrics:
            metrics[name] = info.metrics[name]
    tags = info.run_tags
    return VersionStatus(
        info.version, info.run_id, list(info.aliases), tags.get("model_type"), metrics,
        info.tags.get("gate"), info.tags.get("gate_reasons"), tags.get("data_hash"), tags.get("git_sha"),
        tags.get("config_hash"),
        TrainedOn(tags.get("window_start"), tags.get("window_end"), tags.get("as_of"), _int(tags.get("rows")),
                  tags.get("rows_from", "source"), _int(tags.get("feedback_rows")) or 0))


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None
