"""A named lock in the state database, so that two processes never move an alias at once.

On PostgreSQL it is a session-level advisory lock, held on a connection of its own for the block:
the server releases it the moment the holder's connection dies (a killed process, a lost host),
with nothing to wait out.

On SQLite (a file on one machine) it is a lease: a row in `locks` that the holder's thread renews
every third of its time to live. A holder that dies stops renewing, and its lease expires. A
holder that is visibly gone is broken at once: same host, same PID namespace (the holder id
records the namespace's inode, so a process in another container is never judged by this one's
PIDs) and no process with that PID and start time.

A lock alone cannot stop a holder that stalls past its lease; the alias move's compare-and-set on
the state database's fencing token is what keeps a late writer from winning.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import sqlalchemy as sa

from flywheel.core.errors import FlywheelError
from flywheel.state.db import locks, now

log = logging.getLogger("flywheel.state")


class LockBusy(FlywheelError):
    """Another process holds the lock."""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:  # not Linux: no PID is ever judged, leases expire instead
        return "0"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def holder_id() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_pid_namespace()}:{_start_time(pid) or 0}:{uuid.uuid4().hex[:8]}"


def _holder_dead(holder: str) -> bool:
    parts = holder.split(":")
    if len(parts) != 5 or parts[2] == "0" or not parts[1].isdigit():
        return False  # an older holder id, or one that cannot be judged: wait for its lease
    host, pid, namespace, started, _ = parts
    if host != socket.gethostname() or namespace != _pid_namespace():
        return False
    return _start_time(int(pid)) != started  # gone, or the PID now belongs to another process


def try_acquire(engine: sa.Engine, name: str, holder: str, ttl_s: float) -> bool:
    """Take the lease if it is free, expired or its holder is gone; never blocks for long."""
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


def renew(engine: sa.Engine, name: str, holder: str, ttl_s: float) -> bool:
    """Extend the lease; False when it is no longer this holder's (it expired and was taken)."""
    with engine.begin() as conn:
        result = conn.execute(locks.update().where(locks.c.name == name, locks.c.holder == holder)
                              .values(expires_at=now() + timedelta(seconds=ttl_s)))
    return result.rowcount == 1


def release(engine: sa.Engine, name: str, holder: str) -> None:
    with engine.begin() as conn:
        conn.execute(locks.delete().where(locks.c.name == name, locks.c.holder == holder))


class _Renewer(threading.Thread):
    def __init__(self, engine: sa.Engine, name: str, holder: str, ttl_s: float):
        super().__init__(name=f"lease-{name}", daemon=True)
        self.engine, self.lock_name, self.holder, self.ttl_s = engine, name, holder, ttl_s
        self.done = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.done.wait(self.ttl_s / 3):
            try:
                if not renew(self.engine, self.lock_name, self.holder, self.ttl_s):
                    self.lost = True
                    log.warning("lost the lease on lock '%s' (it expired and was taken)", self.lock_name)
                    return
            except sa.exc.OperationalError as exc:  # the file is busy or gone: try again next time
                log.warning("could not renew the lease on lock '%s': %s", self.lock_name, exc)


def advisory_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def _advisory_lock(engine: sa.Engine, name: str, wait_s: float) -> Iterator[str]:
    key, deadline, held = advisory_key(name), time.monotonic() + wait_s, False
    conn = engine.connect()
    try:
        while not held:
            held = bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            conn.commit()  # the lock belongs to the session, not to this transaction
            if not held and time.monotonic() >= deadline:
                raise LockBusy(f"lock '{name}' is held by another process")
            if not held:
                time.sleep(0.2)
        yield holder_id()
    finally:
        try:
            if held:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
                held = False
        finally:
            if held:  # never hand a connection that may still hold the lock back to the pool
                conn.invalidate()
            conn.close()


@contextlib.contextmanager
def state_lock(engine: sa.Engine, name: str, ttl_s: float = 30, wait_s: float = 0) -> Iterator[str]:
    """Hold lock `name` for the block; raise LockBusy if it stays taken for `wait_s` seconds."""
    if engine.dialect.name == "postgresql":
        with _advisory_lock(engine, name, wait_s) as holder:
            yield holder
        return
    holder = holder_id()
    deadline = time.monotonic() + wait_s
    while not try_acquire(engine, name, holder, ttl_s):
        if time.monotonic() >= deadline:
            raise LockBusy(f"lock '{name}' is held by another process")
        time.sleep(0.2)
    renewer = _Renewer(engine, name, holder, ttl_s)
    renewer.start()
    try:
        yield holder
    finally:
        renewer.done.set()
        renewer.join()
        release(engine, name, holder)
