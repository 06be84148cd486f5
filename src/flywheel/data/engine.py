"""SQLAlchemy engines for the source and state databases (importable without pandas: a server
opens the state database and needs nothing of the data tooling)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa


def make_engine(url: str) -> sa.Engine:
    """An engine for any SQLAlchemy URL; plain postgresql:// uses psycopg 3, which we ship."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if not url.startswith("sqlite:///"):
        # hide_parameters: an error's text never carries the rows it was writing
        return sa.create_engine(url, pool_pre_ping=True, hide_parameters=True)
    Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

    @sa.event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        # WAL lets readers and one writer work at once (several server workers share the file).
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    return engine
