"""A failing dependency under live traffic: the server's PostgreSQL (state database and MLflow
store) stops, then comes back; the state database's disk fills up, then gets room; another
process holds the SQLite state database's write lock, then lets go.

A throwaway cluster of its own (initdb on a free port; never the machine's shared server) holds
the state database and the MLflow store. While 4 clients send predictions, the cluster stops for
8 s: every request is still answered by the current model, /ready stays 200, /health answers at
once and says the prediction log is degraded, the watcher's registry checks fail and are
retried. The cluster starts again: the log drains, a promotion made after the outage is picked up
(hot swap), and after SIGTERM answered = stored + counted drops.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml

from flywheel.config import Project
from flywheel.data.sources import make_engine
from flywheel.lifecycle.aliases import promote
from flywheel.lifecycle.train import train_challenger
from flywheel.serving.process import free_port
from tests.conftest import SOURCE_TYPES, ServerProcess, example_config, load_project, write_table

pytestmark = pytest.mark.slow  # no shared fixture: each test may run on any worker


def pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    on_path = shutil.which("initdb")
    if found:
        return found[-1].parent
    if on_path:
        return Path(on_path).parent
    pytest.fail("PostgreSQL's server binaries (initdb, pg_ctl) are needed: apt install postgresql")


class Cluster:
    """A PostgreSQL cluster in a temporary folder on its own port, run as the postgres user when
    the tests run as root (the server refuses root)."""

    def __init__(self) -> None:
        self.bin = pg_bin()
        self.folder = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        os.chmod(self.folder, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def run(self, tool: str, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        done = subprocess.run([*prefix, str(self.bin / tool), *args], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{tool}: {done.stdout}{done.stderr}"

    def start(self, listen: str = "127.0.0.1", sockets: bool = True) -> None:
        """Listen on `listen` (comma-separated addresses); `sockets=False`: no Unix socket at all."""
        socket_dir = str(self.folder) if sockets else "''"
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "log"), "-w", "start", "-o",
                 f"-p {self.port} -k {socket_dir} -c listen_addresses={listen} -c fsync=off")

    def trust(self, network: str) -> None:
        """Let clients from `network` (CIDR) in without a password (a test network's hosts)."""
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {network} trust\n")

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        subprocess.run([*(["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []),
                        str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    c.start()
    yield c
    c.remove()


class Traffic:
    """Clients sending one record per request until stopped; each answer's status is kept."""

    def __init__(self, url: str, record: dict, clients: int = 4):
        self.url, self.record = url, record
        self.statuses: list[int] = []
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client) for _ in range(clients)]

    def client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop_event.is_set():
                status = c.post("/v1/predict", json=self.record).status_code
                with self.lock:
                    self.statuses.append(status)

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join()


def watch_health(url: str, seconds: float) -> tuple[float, set[str], set[int]]:
    """Poll /health and /ready for `seconds`: the slowest /health answer, the log states seen,
    and /ready's statuses."""
    slowest, states, ready = 0.0, set(), set()
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as c:
        while time.monotonic() < deadline:
            started = time.monotonic()
            health = c.get("/health").json()
            slowest = max(slowest, time.monotonic() - started)
            states.add(health["prediction_log"]["state"])
            ready.add(c.get("/ready").status_code)
            time.sleep(0.1)
    return slowest, states, ready


def accounting(server: ServerProcess, state_url: str) -> tuple[list[dict], int, int, int]:
    """After the server stopped: its JSON log events, the rows stored, and the drops counted by the
    workers' writers and by the log sinks (every sink that ran, restarted ones too)."""
    lines = server.log_path.read_text().splitlines()
    log = [json.loads(line) for line in lines if line.startswith("{")]
    writer_dropped = sum(e["dropped"] for e in log if e.get("event") == "worker_stopped")
    sink_dropped = sum(e["dropped"] for e in log if e.get("event") == "log_sink_stopped")
    with make_engine(state_url).connect() as conn:
        stored = int(conn.execute(sa.text("SELECT count(*) FROM predictions")).scalar() or 0)
    return log, stored, writer_dropped, sink_dropped


def trained(tmp_path: Path, sba_sample: Any, tracking: str, state: str) -> tuple[Project, dict]:
    """A project on these stores with v1 champion (v2 would not be promoted by the gate), a small
    log buffer (so an outage shows as backlog and counted drops), and one valid record."""
    from flywheel.registry import Registry
    from flywheel.serving.tabular.runtime import load_version

    cfg = example_config()
    cfg["model"]["params"] = {"num_boost_round": 30}
    cfg["gate"]["min_improvement"] = 0.5
    cfg["stores"] = {"source": f"sqlite:///{tmp_path / 'source.db'}", "tracking": tracking, "state": state}
    cfg["serving"].update({"reload_interval_s": 0.5, "log": {"queue_size": 2000, "queue_wait_s": 0.05}})
    (tmp_path / "flywheel.yaml").write_text(yaml.safe_dump(cfg))
    project = load_project(tmp_path / "flywheel.yaml", env={"FLYWHEEL_HOME": str(tmp_path / ".flywheel")})
    write_table(sba_sample, project.source_url, "loans", SOURCE_TYPES)
    assert train_challenger(project).promoted
    spec = load_version(Registry.for_project(project), 1).spec
    row = sba_sample[spec.input_columns].dropna().iloc[0]
    return project, {c: (v.item() if hasattr(v, "item") else v) for c, v in row.items()}


def test_postgresql_down_under_traffic_serving_goes_on_and_everything_adds_up(cluster, tmp_path,
                                                                              sba_sample):
    project, record = trained(tmp_path, sba_sample, tracking=cluster.url, state=cluster.url)
    assert not train_challenger(project).promoted  # v2, for the promotion after the outage

    server = ServerProcess(project)
    try:
        server.wait_ready()
        with Traffic(server.url, record) as traffic:
            time.sleep(2)
            cluster.stop()
            down_at = len(traffic.statuses)
            slowest, states, ready = watch_health(server.url, 8)
            during = traffic.statuses[down_at:]
            cluster.start()
            up_at = time.monotonic()
            deadline = time.monotonic() + 90
            while httpx.get(f"{server.url}/health").json()["prediction_log"]["queue_depth"] > 0:
                assert time.monotonic() < deadline, "the log did not drain after the database came back"
                time.sleep(0.2)
            drained_s = time.monotonic() - up_at
            promote(project, 2, reason="after the outage")
            server.wait_for_version(2, timeout=60)
            time.sleep(1)
        answered = traffic.statuses
        assert server.stop() in (0, -15)
    finally:
        server.stop()

    assert len(during) > 100 and set(during) == {200}  # served by the current model throughout
    assert set(answered) == {200}
    assert ready == {200}  # the load balancer keeps this replica
    assert slowest < 1.0  # /health never waits on the database (it took 4.75 s before)
    assert "degraded" in states
    log, stored, writer_dropped, sink_dropped = accounting(server, cluster.url)
    print(f"answered {len(answered)} (during the 8 s outage: {len(during)}), stored {stored}, dropped "
          f"{writer_dropped} by the writer and {sink_dropped} by the sink; log drained "
          f"{drained_s:.1f} s after the database came back; slowest /health {slowest * 1000:.0f} ms")
    assert stored + writer_dropped + sink_dropped == len(answered)
    events = [e.get("event") for e in log]
    assert "registry_error" in events and "registry_recovered" in events  # the watcher said so
    assert events.count("registry_error") <= 2  # once, not at every check
    lines = server.log_path.read_text().splitlines()
    assert all(line.startswith("{") for line in lines), [x for x in lines if not x.startswith("{")][:5]


IN_NAMESPACE = "FLYWHEEL_TEST_IN_MOUNT_NAMESPACE"


def test_full_disk_under_traffic_serving_goes_on_drops_are_counted_and_it_recovers(tmp_path, request,
                                                                                sba_sample):
    """The state database (SQLite) on a 64 MB tmpfs that a file fills up under traffic; the file goes.

    Mounting needs root: as another user the test runs itself again inside a user and mount
    namespace of its own (`unshare --user --map-root-user --mount`), where it is root."""
    if os.geteuid() != 0 and not os.environ.get(IN_NAMESPACE):
        done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-m",
                               "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                               request.node.nodeid], env={**os.environ, IN_NAMESPACE: "1"},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        return
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], check=True)
    try:
        _full_disk(tmp_path, disk, sba_sample)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _full_disk(tmp_path: Path, disk: Path, sba_sample) -> None:
    project, record = trained(tmp_path, sba_sample, tracking=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              state=f"sqlite:///{disk / 'state.db'}")
    filler = disk / "filler"
    server = ServerProcess(project)
    try:
        server.wait_ready()  # it has written its record-id key: now fill the disk
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 600_000))  # ~1,000 rows of room
        with Traffic(server.url, record) as traffic:
            slowest, states, ready = watch_health(server.url, 8)
            full_at = len(traffic.statuses)
            filler.unlink()  # room again: the sink's next retry goes through
            deadline = time.monotonic() + 90
            while httpx.get(f"{server.url}/health").json()["prediction_log"]["queue_depth"] > 0:
                assert time.monotonic() < deadline, "the log did not drain after the disk had room"
                time.sleep(0.2)
            time.sleep(1)
        answered = traffic.statuses
        assert server.stop() in (0, -15)
    finally:
        server.stop()
    log, stored, writer_dropped, sink_dropped = accounting(server, project.state_url)
    print(f"answered {len(answered)} ({full_at} while the disk was full), stored {stored}, dropped "
          f"{writer_dropped} by the writer and {sink_dropped} by the sink; slowest /health "
          f"{slowest * 1000:.0f} ms")
    assert set(answered) == {200} and ready == {200} and slowest < 1.0
    assert "degraded" in states
    assert any("full" in str(e.get("error", "")) for e in log if e.get("event") == "prediction_log_error")
    assert stored + writer_dropped + sink_dropped == len(answered)
    assert stored > 1000  # what came after the disk had room was stored


def test_locked_sqlite_state_database_under_traffic_serving_goes_on_and_everything_adds_up(tmp_path,
                                                                                        sba_sample):
    """Another process holds the state database's write lock for 8 s (a backup, a long manual
    transaction): requests are answered, labels get a quick 503, and it all recovers."""
    import sqlite3

    state = tmp_path / "state.db"
    project, record = trained(tmp_path, sba_sample, tracking=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              state=f"sqlite:///{state}")
    server = ServerProcess(project)
    try:
        server.wait_ready()
        rid = httpx.post(f"{server.url}/v1/predict", json=record).json()["predictions"][0]["record_id"]
        labels = {"labels": [{"record_id": rid, "label": 1}]}
        with Traffic(server.url, record) as traffic:
            time.sleep(1)
            locker = sqlite3.connect(state, isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            started = time.monotonic()
            refused = httpx.post(f"{server.url}/v1/feedback", json=labels, timeout=30)
            feedback_s = time.monotonic() - started
            slowest, states, ready = watch_health(server.url, 6)
            locker.execute("ROLLBACK")
            locker.close()
            unlocked = time.monotonic()
            deadline = unlocked + 90
            while httpx.get(f"{server.url}/health").json()["prediction_log"]["queue_depth"] > 0:
                assert time.monotonic() < deadline, "the log did not drain after the lock was released"
                time.sleep(0.2)
            drained_s = time.monotonic() - unlocked
        answered = traffic.statuses
        assert httpx.post(f"{server.url}/v1/feedback", json=labels, timeout=30).status_code == 200
        assert server.stop() in (0, -15)
    finally:
        server.stop()
    log, stored, writer_dropped, sink_dropped = accounting(server, project.state_url)
    print(f"answered {len(answered) + 1}, stored {stored}, dropped {writer_dropped} by the writer and "
          f"{sink_dropped} by the sink; feedback refused in {feedback_s:.1f} s; log drained "
          f"{drained_s:.1f} s after the lock was released; slowest /health {slowest * 1000:.0f} ms")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5" and feedback_s < 5
    assert set(answered) == {200} and ready == {200} and slowest < 1.0 and "degraded" in states
    assert stored + writer_dropped + sink_dropped == len(answered) + 1  # + the request before
