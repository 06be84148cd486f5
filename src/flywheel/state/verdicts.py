"""The latest monitoring verdict and the pipeline runs' outcomes, as stored in the state database
(for /metrics and status)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from flywheel.state.db import monitor_columns, monitor_runs, pipeline_runs


def latest_verdict(engine: sa.Engine, model_name: str) -> dict[str, Any] | None:
    """The newest monitoring run with its per-column scores (for /metrics and status)."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(monitor_runs).where(monitor_runs.c.model_name == model_name)
                           .order_by(monitor_runs.c.id.desc()).limit(1)).mappings().first()
        if row is None:
            return None
        cols = conn.execute(sa.select(monitor_columns).where(monitor_columns.c.run_id == row["id"])
                            ).mappings().all()
    return {**dict(row), "columns": [dict(c) for c in cols]}


def pipeline_summary(engine: sa.Engine, model_name: str) -> dict[str, Any]:
    """How many pipeline runs ended each way, and the status of the newest (for /metrics)."""
    with engine.connect() as conn:
        counts: dict[str, int] = dict(conn.execute(sa.select(pipeline_runs.c.status, sa.func.count())
                                   .where(pipeline_runs.c.model_name == model_name)
                                   .group_by(pipeline_runs.c.status)).all())
        last = conn.execute(sa.select(pipeline_runs.c.status, pipeline_runs.c.trigger)
                            .where(pipeline_runs.c.model_name == model_name)
                            .order_by(pipeline_runs.c.started_at.desc()).limit(1)).first()
    return {"counts": counts, "last_status": last[0] if last else None,
            "last_trigger": last[1] if last else None}
