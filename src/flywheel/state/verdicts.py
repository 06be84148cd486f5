"""The latest monitoring verdict, as stored in the state database (for /metrics and status)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from flywheel.state.db import monitor_columns, monitor_runs


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
