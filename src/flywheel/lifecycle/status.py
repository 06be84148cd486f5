"""What `flywheel status` shows: champion and challenger with metrics and lineage, alias history."""

from __future__ import annotations

from typing import Any

from flywheel.config import ProjectBase
from flywheel.core.secrets import redact
from flywheel.registry import CHALLENGER, CHAMPION, Registry, VersionInfo
from flywheel.state.aliases import alias_moves
from flywheel.state.db import open_state

_LORA_METRICS = ("perplexity_before", "perplexity_after", "champion_perplexity", "seconds_per_step",
                 "tokens_per_second")


def project_status(project: ProjectBase) -> dict[str, Any]:
    registry = Registry.for_project(project)
    out: dict[str, Any] = {"model": registry.model_name, "project": project.config.project,
                           "kind": project.config.kind,  # type: ignore[attr-defined]
                           "gate_metric": project.config.gate.metric,  # type: ignore[attr-defined]
                           "tracking_uri": redact(project.tracking_url)}
    for alias in (CHAMPION, CHALLENGER):
        version = registry.alias_version(alias)
        out[alias] = describe(registry.version(version)) if version is not None else None
    try:
        state = open_state(project.state_url)
        out["champion_history"] = [
            {"version": m.version, "previous_version": m.previous_version, "action": m.action,
             "reason": m.reason, "moved_at": m.moved_at.isoformat(), "actor": m.actor,
             "applied": m.applied}
            for m in alias_moves(state, registry.model_name, CHAMPION)
        ]
    except Exception as exc:  # status must still answer when the state DB is unreachable
        out["champion_history_error"] = str(exc)
    return out


def describe(info: VersionInfo) -> dict[str, Any]:
    metrics = {k.removeprefix("holdout_"): v for k, v in info.metrics.items() if k.startswith("holdout_")}
    for name in ("train_seconds", *_LORA_METRICS):
        if name in info.metrics:
            metrics[name] = info.metrics[name]
    return {
        "version": info.version,
        "run_id": info.run_id,
        "aliases": info.aliases,
        "model_type": info.run_tags.get("model_type"),
        "metrics": metrics,
        "gate": info.tags.get("gate"),
        "gate_reasons": info.tags.get("gate_reasons"),
        "data_hash": info.run_tags.get("data_hash"),
        "git_sha": info.run_tags.get("git_sha"),
        "config_hash": info.run_tags.get("config_hash"),
        "trained_on": {"from": info.run_tags.get("window_start"), "to": info.run_tags.get("window_end"),
                       "as_of": info.run_tags.get("as_of"), "rows": _int(info.run_tags.get("rows")),
                       "rows_from": info.run_tags.get("rows_from", "source"),
                       "feedback_rows": _int(info.run_tags.get("feedback_rows")) or 0},
    }


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None
