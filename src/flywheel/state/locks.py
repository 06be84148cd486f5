"""A named lock in the state database, so that two pipeline processes never both promote.

A row in `locks` is the lock: inserting it acquires, the primary key refuses a second holder on
SQLite and PostgreSQL alike. A holder that died (SIGKILL) leaves its row behind; the row is
broken when it has expired or when its holder is a process on this host that no longer exists.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import sqlalchemy as sa

from flywheel.core.errors import FlywheelError
from flywheel.state.db import locks, now


class LockBusy(FlywheelError):
    """Another process holds the lock."""


def holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _holder_dead(holder: str) -> bool:
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def try_acquire(engine: sa.Engine, name: str, holder: str, ttl_s: float) -> bool:
    """Take the lock if it is free (or stale); never blocks for long."""
    with engine.begin() as conn:
        row = conn.execute(sa.select(locks).where(locks.c.name == name)).mappings().first()
        if row is not None:
            expires = row["expires_at"]
            if expires.tzinfo is None:  # SQLite returns naive datetimes (stored as UTC)
                expires = expires.replace(tzinfo=now().tzinfo)
            if expires > now() and not _holder_dead(row["holder"]):
                return False
            conn.execute(locks.delete().where(locks.c.name == name, locks.c.holder == row["holder"]))
    try:
        with engine.begin() as conn:
            at = now()
            conn.execute(locks.insert().values(name=name, holder=holder, acquired_at=at,
                                               expires_at=at + timedelta(seconds=ttl_s)))
        return True
    except sa.exc.IntegrityError:
        return False
    except sa.exc.OperationalError as exc:  # SQLite: the other writer held the file too long
        if "locked" in str(exc):
            return False
        raise


def release(engine: sa.Engine, name: str, holder: str) -> None:
    with engine.begin() as conn:
        conn.execute(locks.delete().where(locks.c.name == name, locks.c.holder == holder))


@contextlib.contextmanager
def state_lock(engine: sa.Engine, name: str, ttl_s: float = 600, wait_s: float = 0) -> Iterator[str]:
    """Hold lock `name` for the block; raise LockBusy if it stays taken for `wait_s` seconds."""
    holder = holder_id()
    deadline = time.monotonic() + wait_s
    while not try_acquire(engine, name, holder, ttl_s):
        if time.monotonic() >= deadline:
            raise LockBusy(f"lock '{name}' is held by another process")
        time.sleep(0.2)
    try:
        yield holder
    finally:
        release(engine, name, holder)
