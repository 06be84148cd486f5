"""Two servers on two hosts follow one registry: each `flywheel serve` runs in a network namespace
of its own (a host reached over a veth pair), both on one PostgreSQL state database (a throwaway
cluster listening only on the veth addresses, with no Unix socket) and one MLflow tracking server.
A promotion reaches both; each logs to the shared log; monitoring sees both hosts' traffic; a
record id one host issued is accepted as feedback by the other (the MAC key is in the shared
database). Nothing reaches the servers' stores over a Unix socket or a loopback interface.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
import yaml

from flywheel.config import load_project
from flywheel.data.sources import make_engine, write_table
from flywheel.demo.sba import SOURCE_TYPES
from flywheel.lifecycle.aliases import promote
from flywheel.lifecycle.train import train_challenger
from flywheel.monitoring.monitor import run_monitor
from flywheel.registry import Registry
from flywheel.serving.tabular.runtime import load_version
from tests.conftest import example_config, mlflow_server
from tests.serving.test_failures import Cluster

pytestmark = [pytest.mark.serial, pytest.mark.postgres, pytest.mark.slow]
SUBNET = "10.231"


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"


@pytest.fixture
def hosts() -> Iterator[list[tuple[str, str, str]]]:
    """Two namespaces, each with a veth to this machine: (namespace, its address, our address)."""
    tag = uuid.uuid4().hex[:4]
    made = []
    try:
        for n in (1, 2):
            ns, here, there = f"fw{tag}{n}", f"fwh{tag}{n}", f"fwn{tag}{n}"
            ip("netns", "add", ns)
            made.append((ns, here))
            ip("link", "add", here, "type", "veth", "peer", "name", there)
            ip("link", "set", there, "netns", ns)
            ip("addr", "add", f"{SUBNET}.{n}.1/24", "dev", here)
            ip("link", "set", here, "up")
            ip("netns", "exec", ns, "ip", "addr", "add", f"{SUBNET}.{n}.2/24", "dev", there)
            ip("netns", "exec", ns, "ip", "link", "set", there, "up")
        yield [(ns, f"{SUBNET}.{n}.2", f"{SUBNET}.{n}.1") for n, (ns, _) in enumerate(made, start=1)]
    finally:
        for ns, here in made:
            subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=30)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def serve_in(ns: str, address: str, project, env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "flywheel.cli", "serve", "--config",
         str(project.path), "--host", address, "--port", "8000", "--workers", "1"],
        env={**os.environ, **env}, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115


def wait_version(url: str, version: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/ready", timeout=2).json().get("version") == version:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not serving v{version}:\n{log.read_text()[-3000:]}")


def test_two_hosts_share_one_registry_and_one_log(hosts, tmp_path, sba_sample):
    cluster = Cluster()
    cluster.trust(f"{SUBNET}.0.0/16")
    cluster.start(listen=",".join(ours for _, _, ours in hosts), sockets=False)
    procs: list[subprocess.Popen] = []
    try:
        first_host = hosts[0][2]
        admin = sa.create_engine(f"postgresql+psycopg://postgres@{first_host}:{cluster.port}/postgres",
                                 isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text("CREATE DATABASE flywheel"))
        admin.dispose()
        db = lambda host: f"postgresql://postgres@{host}:{cluster.port}/flywheel"  # noqa: E731
        with mlflow_server(tmp_path, backend=db(first_host), host="0.0.0.0") as tracking:
            port = tracking.rsplit(":", 1)[1]
            cfg = example_config()
            cfg["model"]["params"] = {"num_boost_round": 20}
            cfg["serving"]["reload_interval_s"] = 0.5
            cfg["monitoring"]["evidently_report"] = False
            cfg["stores"] = {"source": db(first_host), "state": db(first_host),
                             "tracking": f"http://{first_host}:{port}"}
            (tmp_path / "flywheel.yaml").write_text(yaml.safe_dump(cfg))
            project = load_project(tmp_path / "flywheel.yaml", env={"FLYWHEEL_HOME": str(tmp_path / "home")})
            write_table(sba_sample, project.source_url, "loans", SOURCE_TYPES)
            assert train_challenger(project).promoted

            urls, logs = [], []
            for n, (ns, address, ours) in enumerate(hosts, start=1):
                # each host reaches the stores at its own gateway address: over its veth
                env = {"FLYWHEEL_HOME": str(tmp_path / f"host{n}"),
                       "FLYWHEEL_STORES__STATE": db(ours), "FLYWHEEL_STORES__SOURCE": db(ours),
                       "FLYWHEEL_STORES__TRACKING": f"http://{ours}:{port}"}
                logs.append(tmp_path / f"host{n}.log")
                procs.append(serve_in(ns, address, project, env, logs[-1]))
                urls.append(f"http://{address}:8000")
            for url, proc, log in zip(urls, procs, logs, strict=True):
                wait_version(url, 1, proc, log)

            spec = load_version(Registry.for_project(project), 1).spec
            rows = sba_sample[spec.input_columns].head(300)
            records = [{c: (None if isinstance(v, float) and np.isnan(v) else
                            v.item() if hasattr(v, "item") else v) for c, v in r.items()}
                       for _, r in rows.iterrows()]
            ids = {}
            for n, url in enumerate(urls):
                answer = httpx.post(f"{url}/v1/predict", json=records[n * 150:(n + 1) * 150], timeout=30)
                assert answer.status_code == 200, answer.text
                ids[url] = [p["record_id"] for p in answer.json()["predictions"]]
            # a label for what host 1 served, posted to host 2
            labels = [{"record_id": rid, "label": 0} for rid in ids[urls[0]][:20]]
            fed = httpx.post(f"{urls[1]}/v1/feedback", json={"labels": labels}, timeout=30)
            assert fed.status_code == 200 and fed.json()["accepted"] == 20, fed.text

            second = load_project(project.path, env={"FLYWHEEL_HOME": str(tmp_path / "home"),
                                                     "FLYWHEEL_MODEL__PARAMS__NUM_BOOST_ROUND": "40"})
            result = train_challenger(second)
            if not result.promoted:
                promote(project, result.version, reason="two hosts test")
            for url, proc, log in zip(urls, procs, logs, strict=True):
                wait_version(url, result.version, proc, log)

            engine = make_engine(db(first_host))
            deadline = time.monotonic() + 30
            while True:
                with engine.connect() as conn:
                    logged = conn.execute(sa.text("SELECT count(*) FROM predictions")).scalar()
                if logged == 300 or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert logged == 300  # both hosts' records, in the one log
            verdict = run_monitor(project, report=False)
            assert verdict.drift.rows == 300  # monitoring sees both hosts' traffic
            engine.dispose()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)
        cluster.remove()
