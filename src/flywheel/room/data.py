"""What the control room shows, read from the registry and the state database.

Each function answers one section of the page (and one JSON endpoint) with plain dicts. The
state database's queries aggregate in SQL over indexed columns (monitor_runs by model and id,
monitor_columns by run, predictions by model and time, pipeline_runs by model and start,
traffic_minutes by model and minute), so each stays fast with a long history; the room calls
them in a thread, never in a serving event loop.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import sqlalchemy as sa

from flywheel.config import ProjectBase
from flywheel.core.jsonable import jsonable
from flywheel.core.secrets import redact
from flywheel.lifecycle.status import VersionStatus, project_status
from flywheel.registry import CHALLENGER, CHAMPION, Registry
from flywheel.state.aliases import alias_moves
from flywheel.state.db import (
    PIPELINE_STEPS,
    monitor_columns,
    monitor_runs,
    open_state,
    pipeline_runs,
    predictions,
)
from flywheel.state.traffic import traffic_series, traffic_totals

RANGES = {"hour": (timedelta(hours=1), timedelta(minutes=1)),
          "day": (timedelta(days=1), timedelta(minutes=15))}
MAX_WINDOWS = 100
MAX_RUNS = 50
DISTRIBUTION_ROWS = 10_000


def header(project: ProjectBase) -> dict[str, Any]:
    """What the page's title says: from the config alone (no store needs to answer)."""
    cfg = project.config
    return {"project": cfg.project, "model": cfg.registered_model,
            "kind": getattr(cfg, "kind", "tabular"), "gate_metric": cfg.gate.metric}  # type: ignore[attr-defined]


def models(project: ProjectBase) -> dict[str, Any]:
    """Champion and challenger (metrics, window, data hash, run, gate) and both aliases' moves."""
    status = project_status(project)
    engine = _state(project)
    name = status.model
    history = [{"alias": m.alias, "version": m.version, "previous_version": m.previous_version,
                "action": m.action, "reason": m.reason, "moved_at": _iso(m.moved_at), "actor": m.actor,
                "applied": m.applied}
               for alias in (CHAMPION, CHALLENGER) for m in alias_moves(engine, name, alias)]
    history.sort(key=lambda m: str(m["moved_at"]), reverse=True)
    return {"model": name, "project": status.project, "kind": status.kind,
            "gate_metric": status.gate_metric, "champion": jsonable(status.champion),
            "challenger": jsonable(status.challenger), "history": history,
            "same_holdout": _same_holdout(project, status.challenger), "rollout": status.rollout}


def _same_holdout(project: ProjectBase, challenger: VersionStatus | None) -> dict[str, Any] | None:
    """The challenger's holdout metrics beside those of the champion it was gated against, scored
    on the same rows at evaluation (recorded on the challenger's run as `champion_*`)."""
    if challenger is None:
        return None
    info = Registry.for_project(project).version(challenger.version)
    champion = {k.removeprefix("champion_"): v for k, v in info.metrics.items() if k.startswith("champion_")}
    against = info.tags.get("champion_at_evaluation")
    if not champion or against in (None, "none"):
        return None
    own = {k.removeprefix("holdout_"): v for k, v in info.metrics.items() if k.startswith("holdout_")}
    return {"challenger_version": challenger.version, "champion_version": int(against),
            "metrics": {k: {"challenger": own[k], "champion": v} for k, v in sorted(champion.items())
                        if k in own and k != "rows"},
            "rows": own.get("rows")}


def traffic(project: ProjectBase, range_: str = "hour", now: datetime | None = None) -> dict[str, Any]:
    """Per version, per minute (hour) or per quarter hour (day): requests/s, p50/p99, errors."""
    if range_ not in RANGES:
        raise ValueError(f"range must be one of {', '.join(RANGES)}")
    span, step = RANGES[range_]
    until = _minute(now or datetime.now(UTC)) + timedelta(minutes=1)
    since = until - span
    series = traffic_series(_state(project), project.config.registered_model, since, until, step)
    return {"range": range_, "since": since.isoformat(), "until": until.isoformat(),
            "step_s": step.total_seconds(), "series": series,
            "totals": {str(v): t for v, t in traffic_totals(series).items()}}


def drift(project: ProjectBase, limit: int = MAX_WINDOWS) -> dict[str, Any]:
    """The latest `limit` monitoring windows, oldest first: dataset verdict, share, prediction
    drift, and every feature's score over its threshold (the heat map)."""
    engine, name = _state(project), project.config.registered_model
    r = monitor_runs
    with engine.connect() as conn:
        runs = conn.execute(sa.select(
            r.c.id, r.c.model_version, r.c.window_kind, r.c.window_start, r.c.window_end, r.c.rows,
            r.c.drift_share, r.c.drift_detected, r.c.prediction_drift, r.c.report_path, r.c.created_at)
            .where(r.c.model_name == name).order_by(r.c.id.desc()).limit(limit)).mappings().all()
        ids = [row["id"] for row in runs]
        cells = conn.execute(sa.select(monitor_columns).where(monitor_columns.c.run_id.in_(ids))
                             ).mappings().all() if ids else []
    windows = [_window(row) for row in reversed(runs)]
    features = sorted({c["column_name"] for c in cells})
    scores: dict[str, dict[int, dict[str, Any]]] = {f: {} for f in features}
    for c in cells:
        scores[c["column_name"]][c["run_id"]] = {
            "score": c["score"], "threshold": c["threshold"], "drifted": c["drifted"],
            "unseen_rows": c["unseen_rows"]}
    monitoring = getattr(project.config, "monitoring", None)
    return {"windows": windows, "features": features,
            "cells": {f: {str(k): v for k, v in by_run.items()} for f, by_run in scores.items()},
            "drift_threshold": getattr(monitoring, "drift_threshold", None),
            "drift_share": getattr(monitoring, "drift_share", None)}


def _window(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "model_version": row["model_version"], "kind": row["window_kind"],
            "start": _iso(row["window_start"]), "end": _iso(row["window_end"]), "rows": row["rows"],
            "drift_share": row["drift_share"], "drifted": row["drift_detected"],
            "prediction_drift": row["prediction_drift"], "has_report": bool(row["report_path"]),
            "at": _iso(row["created_at"])}


def prediction_distribution(project: ProjectBase, rows: int = DISTRIBUTION_ROWS) -> dict[str, Any]:
    """The latest `rows` logged predictions: a histogram of the probability (binary) or value
    (regression), or each class's count (multiclass). One column is read, newest first on the
    (model_name, created_at) index."""
    engine, name = _state(project), project.config.registered_model
    p = predictions
    newest = sa.select(p.c.probability, p.c.value, p.c.label).where(p.c.model_name == name) \
        .order_by(p.c.created_at.desc())
    with engine.connect() as conn:
        first = conn.execute(newest.limit(1)).first()
        if first is None:
            return {"kind": "none", "rows": 0}
        column = p.c.label if first[2] is not None else p.c.probability if first[0] is not None else p.c.value
        got = conn.execute(sa.select(column).where(p.c.model_name == name)
                           .order_by(p.c.created_at.desc()).limit(rows)).scalars().all()
    if column is p.c.label:
        counts: dict[str, int] = {}
        for label in got:
            counts[str(label)] = counts.get(str(label), 0) + 1
        return {"kind": "classes", "rows": len(got), "counts": dict(sorted(counts.items()))}
    values = np.array([v for v in got if v is not None], dtype=float)
    bins = np.linspace(0, 1, 21) if column is p.c.probability else np.histogram_bin_edges(values, 20)
    hist, edges = np.histogram(values, bins=bins)
    return {"kind": "probability" if column is p.c.probability else "value", "rows": len(got),
            "edges": [float(e) for e in edges], "counts": [int(h) for h in hist]}


def performance(project: ProjectBase, limit: int = MAX_WINDOWS) -> dict[str, Any]:
    """The task's metric per monitoring window (when it had labels), its estimate before labels
    with the band, the windows the audit flagged, what the versions served then promised (their
    holdout value), and the retrains and promotions on the same time axis."""
    engine, name = _state(project), project.config.registered_model
    r = monitor_runs
    with engine.connect() as conn:
        rows = conn.execute(sa.select(r.c.id, r.c.created_at, r.c.model_version, r.c.metric,
                                      r.c.metric_value, r.c.labelled_rows, r.c.performance_drop,
                                      r.c.estimated_metric, r.c.estimated_value, r.c.estimated_low,
                                      r.c.estimated_high, r.c.concept_shift)
                            .where(r.c.model_name == name).order_by(r.c.id.desc()).limit(limit)
                            ).mappings().all()
        retrains = conn.execute(sa.select(pipeline_runs.c.started_at, pipeline_runs.c.trigger,
                                          pipeline_runs.c.status)
                                .where(pipeline_runs.c.model_name == name)
                                .order_by(pipeline_runs.c.started_at.desc()).limit(MAX_RUNS)).all()
    points = [{"at": _iso(x["created_at"]), "version": x["model_version"], "metric": x["metric"],
               "value": x["metric_value"], "labelled": x["labelled_rows"], "drop": x["performance_drop"]}
              for x in reversed(rows) if x["metric_value"] is not None]
    estimates = [{"at": _iso(x["created_at"]), "version": x["model_version"], "metric": x["estimated_metric"],
                  "value": x["estimated_value"], "low": x["estimated_low"], "high": x["estimated_high"]}
                 for x in reversed(rows) if x["estimated_value"] is not None]
    shifts = [{"at": _iso(x["created_at"]), "version": x["model_version"]}
              for x in reversed(rows) if x["concept_shift"]]
    metric = next((p["metric"] for p in points), None) or next((e["metric"] for e in estimates), None)
    promotions = [{"at": _iso(m.moved_at), "version": m.version, "action": m.action}
                  for m in alias_moves(engine, name, CHAMPION)]
    return {"metric": metric, "points": points, "estimates": estimates, "concept_shifts": shifts,
            "promised": _promised(project, metric, points),
            "promotions": promotions,
            "retrains": [{"at": _iso(t[0]), "trigger": t[1], "status": t[2]} for t in reversed(retrains)]}


def _promised(project: ProjectBase, metric: str | None, points: list[dict[str, Any]]) -> dict[str, float]:
    """Each served version's holdout value of the window metric (what it promised at training)."""
    if metric is None:
        return {}
    registry = Registry.for_project(project)
    out = {}
    known = set(registry.versions())  # a version deleted from the registry promised nothing we can read
    for version in sorted({p["version"] for p in points if p["version"] in known}):
        value = registry.version(version).metrics.get(f"holdout_{metric}")
        if value is not None:
            out[str(version)] = float(value)
    return out


def pipelines(project: ProjectBase, limit: int = MAX_RUNS) -> dict[str, Any]:
    """The latest pipeline runs: trigger, each step's status and duration, gate, alert."""
    engine, name = _state(project), project.config.registered_model
    with engine.connect() as conn:
        rows = conn.execute(sa.select(pipeline_runs).where(pipeline_runs.c.model_name == name)
                            .order_by(pipeline_runs.c.started_at.desc()).limit(limit)).mappings().all()
    return {"runs": [_pipeline_run(row) for row in rows]}


def _pipeline_run(row: Any) -> dict[str, Any]:
    outputs = json.loads(row["outputs"] or "{}")
    # runs recorded before step timings: the steps that left a result, without durations
    timings = outputs.get("timings") or {s: {"finished": None} for s in PIPELINE_STEPS if s in outputs}
    steps = []
    for step, times in timings.items():
        seconds = None
        if times.get("started") and times.get("finished"):
            seconds = (datetime.fromisoformat(times["finished"])
                       - datetime.fromisoformat(times["started"])).total_seconds()
        failed = row["status"] == "failed" and row["step"] == step
        steps.append({"step": step, "status": "failed" if failed else
                      ("done" if "finished" in times else "running"), "seconds": seconds})
    evaluate, alert = outputs.get("evaluate") or {}, outputs.get("alert") or {}
    promote = outputs.get("promote") or {}
    return {"id": row["id"], "trigger": row["trigger"], "reason": row["reason"], "status": row["status"],
            "started_at": _iso(row["started_at"]), "finished_at": _iso(row["finished_at"]),
            "steps": steps, "error": redact(row["error"]) if row["error"] else None,
            "gate": None if not evaluate else {"passed": evaluate.get("passed"),
                                                "reasons": evaluate.get("reasons", [])},
            "promoted": promote.get("promoted"), "version": promote.get("version"),
            "alert": alert.get("title"), "alert_to": alert.get("sent_to")}


def report_path(project: ProjectBase, window_id: int) -> str | None:
    """The Evidently report of a monitoring window, if it has one."""
    with _state(project).connect() as conn:
        return conn.execute(sa.select(monitor_runs.c.report_path).where(
            monitor_runs.c.id == window_id,
            monitor_runs.c.model_name == project.config.registered_model)).scalar()


def _state(project: ProjectBase) -> sa.Engine:
    return open_state(project.state_url)


def _minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
