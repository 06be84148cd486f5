"""Structured logs: one JSON object per line on stderr, with the event's fields."""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime

import orjson

from flywheel.core.secrets import redact

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(entry, default=str).decode())  # no URL's password in a log


LOG_LEVEL_ENV = "FLYWHEEL_LOG_LEVEL"  # what `flywheel serve --log-level` passes to its workers
LEVELS = ("debug", "info", "warning", "error")


def configure_json_logging(level: int | None = None, access_log: bool = False) -> None:
    """JSON lines on stderr for every logger; the level from `level`, else FLYWHEEL_LOG_LEVEL, else
    info."""
    if level is None:
        name = os.environ.get(LOG_LEVEL_ENV, "info").lower()
        level = getattr(logging, name.upper()) if name in LEVELS else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = name != "uvicorn.access" or access_log
    for name in ("mlflow", "alembic", "urllib3"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        logger.handlers[:] = []  # MLflow adds a plain-text handler of its own: JSON lines only
        logger.propagate = True
    # MLflow logs a full traceback for every failed store query (each registry check while its
    # database is down); the watcher says it once, as `registry_error`, and when it recovers.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
