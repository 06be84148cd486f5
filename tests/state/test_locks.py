"""The alias lock under real failures: a PostgreSQL advisory lock freed when its holder dies, and
a renewed SQLite lease that is broken only when its holder is provably gone or has expired."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from flywheel.state.db import close_state, locks, now, open_state
from flywheel.state.locks import (
    LockBusy,
    _pid_namespace,
    _start_time,
    holder_id,
    renew,
    state_lock,
    try_acquire,
)

HOLD = """
import sys, time
from flywheel.state.db import open_state
from flywheel.state.locks import state_lock
with state_lock(open_state(sys.argv[1]), "alias:m", ttl_s=float(sys.argv[2])):
    print("held", flush=True)
    time.sleep(120)
"""


# A holder "on another host": its own hostname and PID namespace (as in another container), made
# with an unprivileged user namespace.
ELSEWHERE = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child", "--mount-proc",
             "--uts", "sh", "-c", 'hostname elsewhere && exec "$0" "$@"']


def hold_in_child(url: str, ttl_s: float = 30, elsewhere: bool = False) -> subprocess.Popen:
    child = subprocess.Popen([*(ELSEWHERE if elsewhere else []), sys.executable, "-c", HOLD, url,
                              str(ttl_s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "held", child.stderr
    return child


def seconds_until_acquired(engine: sa.Engine, limit: float) -> float:
    started = time.monotonic()
    with state_lock(engine, "alias:m", wait_s=limit):
        return time.monotonic() - started


@pytest.fixture
def sqlite_engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    yield open_state(url), url
    close_state(url)


def test_postgresql_lock_is_freed_the_moment_its_holder_on_another_host_is_killed(postgres_url):
    engine = open_state(postgres_url)
    try:
        child = hold_in_child(postgres_url, elsewhere=True)
        with pytest.raises(LockBusy):
            seconds_until_acquired(engine, 0.5)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert seconds_until_acquired(engine, 10) < 3  # no lease to wait out
        # released on a normal exit too, and the pooled connection does not keep it
        assert seconds_until_acquired(engine, 0) < 1
    finally:
        close_state(postgres_url)


def test_postgresql_lock_excludes_a_second_holder_in_the_same_process(postgres_url):
    engine = open_state(postgres_url)
    inside = threading.Event()
    leave = threading.Event()

    def hold() -> None:
        with state_lock(engine, "alias:m"):
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert inside.wait(10)
        with pytest.raises(LockBusy):
            seconds_until_acquired(engine, 0.3)
    finally:
        leave.set()
        thread.join()
    assert seconds_until_acquired(engine, 5) < 2
    close_state(postgres_url)


def test_sqlite_lease_is_renewed_while_held(sqlite_engine):
    engine, _ = sqlite_engine
    stolen = []
    with state_lock(engine, "alias:m", ttl_s=0.6):
        for _ in range(20):  # 2 s, over three times the lease
            stolen.append(try_acquire(engine, "alias:m", holder_id(), 0.6))
            time.sleep(0.1)
    assert not any(stolen)
    assert try_acquire(engine, "alias:m", holder_id(), 30)  # released at the end of the block


def test_sqlite_lease_of_a_killed_holder_on_this_machine_is_broken_at_once(sqlite_engine):
    engine, url = sqlite_engine
    child = hold_in_child(url, ttl_s=600)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert seconds_until_acquired(engine, 5) < 2


def test_sqlite_lease_of_a_killed_holder_in_another_container_expires(sqlite_engine):
    """Its PID 1 lives in its own namespace: judging it by this machine's PID 1 would keep the
    lease forever (or break a live one); the lease runs out instead."""
    engine, url = sqlite_engine
    child = hold_in_child(url, ttl_s=2, elsewhere=True)
    time.sleep(2.5)  # renewed meanwhile: still held
    with pytest.raises(LockBusy):
        seconds_until_acquired(engine, 0)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert 0.5 < seconds_until_acquired(engine, 10) < 4


def insert_holder(engine: sa.Engine, holder: str, expires_in: float) -> None:
    with engine.begin() as conn:
        conn.execute(locks.delete().where(locks.c.name == "alias:m"))
        conn.execute(locks.insert().values(name="alias:m", holder=holder, acquired_at=now(),
                                           expires_at=now() + timedelta(seconds=expires_in)))


def test_sqlite_lease_is_judged_by_pid_only_in_this_pid_namespace_and_start_time(sqlite_engine):
    engine, _ = sqlite_engine
    host, pid, ns = socket.gethostname(), os.getpid(), _pid_namespace()
    dead_pid = 4_000_000  # above Linux's pid_max
    # A process in another container (another PID namespace) is never judged by our PIDs.
    insert_holder(engine, f"{host}:{dead_pid}:{int(ns) + 1}:123:abcd", 60)
    assert not try_acquire(engine, "alias:m", holder_id(), 30)
    # Another host: its lease is waited out, then broken.
    insert_holder(engine, f"elsewhere:{dead_pid}:{ns}:123:abcd", 0.5)
    assert not try_acquire(engine, "alias:m", holder_id(), 30)
    time.sleep(0.6)
    assert try_acquire(engine, "alias:m", holder_id(), 30)
    # This namespace: a live holder stays; a dead one, or a reused PID (other start time), goes.
    insert_holder(engine, f"{host}:{pid}:{ns}:{_start_time(pid)}:abcd", 60)
    assert not try_acquire(engine, "alias:m", holder_id(), 30)
    insert_holder(engine, f"{host}:{dead_pid}:{ns}:123:abcd", 60)
    assert try_acquire(engine, "alias:m", holder_id(), 30)
    insert_holder(engine, f"{host}:{pid}:{ns}:1:abcd", 60)
    assert try_acquire(engine, "alias:m", holder_id(), 30)


def test_a_lease_taken_after_it_expired_cannot_be_renewed_by_its_old_holder(sqlite_engine):
    engine, _ = sqlite_engine
    insert_holder(engine, "elsewhere:1:1:1:old", -1)
    assert try_acquire(engine, "alias:m", "elsewhere:2:1:1:new", 30)
    assert not renew(engine, "alias:m", "elsewhere:1:1:1:old", 30)
    assert renew(engine, "alias:m", "elsewhere:2:1:1:new", 30)
