"""Make an upgrade fixture: a small project's state database and MLflow store, as a released
Flywheel leaves them, for the test that opens, migrates and serves them with today's code.

It drives only the `flywheel` command (ingest, train, serve + HTTP traffic and feedback, monitor,
retrain, promote, rollback), so it runs against whichever Flywheel is on the path: check out the
release, put its `src` first on PYTHONPATH and run this script, then commit the archive.

    PYTHONPATH=/path/to/release/src .venv/bin/python scripts/make_upgrade_fixture.py NAME

The project lives at a fixed absolute path while it is made (MLflow records absolute artifact
paths); the test rewrites that prefix to wherever it unpacks the archive.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "fixtures" / "sba_sample.parquet"
WORK = Path("/tmp/flywheel-upgrade-fixture")  # the absolute prefix the test rewrites
FLYWHEEL = [sys.executable, "-m", "flywheel.cli"]


def cli(*args: str, check: bool = True) -> str:
    env = {**os.environ, "FLYWHEEL_HOME": str(WORK / ".flywheel")}
    done = subprocess.run([*FLYWHEEL, *args], capture_output=True, text=True, env=env)
    if check and done.returncode != 0:
        raise SystemExit(f"flywheel {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def copy_sqlite(src: Path, dst: Path) -> None:
    """A consistent single-file copy (WAL folded in) through SQLite's backup API."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    with sqlite3.connect(dst) as b:
        b.execute("PRAGMA journal_mode=DELETE")


def main() -> None:
    name = sys.argv[1]
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    config = yaml.safe_load((REPO / "examples" / "sba-loans" / "flywheel.yaml").read_text())
    config["retraining"]["orchestrator"] = "local"
    config["monitoring"]["evidently_report"] = False
    (WORK / "flywheel.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cfg = str(WORK / "flywheel.yaml")
    sample = pd.read_parquet(SAMPLE)
    sample.to_parquet(WORK / "loans.parquet", index=False)
    cli("ingest", "--config", cfg, "--input", str(WORK / "loans.parquet"))
    cli("train", "--config", cfg)

    port = free_port()
    env = {**os.environ, "FLYWHEEL_HOME": str(WORK / ".flywheel")}
    server = subprocess.Popen([*FLYWHEEL, "serve", "--config", cfg, "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        rows = sample[sample["approval_date"].astype(str) >= "2002-01-01"].head(300)
        fields = ["gr_appv", "sba_appv", "no_emp", "create_job", "retained_job", "new_exist",
                  "franchise_code", "state", "bank_state", "urban_rural", "rev_line_cr", "low_doc",
                  "naics", "bank"]
        records = rows[fields].astype(object).where(rows[fields].notna(), None).to_dict("records")
        for rec, loan in zip(records, rows["loan_nr"], strict=True):
            rec["meta"] = {"entity_id": str(loan)}
        ids = []
        for start in range(0, len(records), 100):
            r = httpx.post(f"{url}/v1/predict", json=records[start:start + 100], timeout=30)
            r.raise_for_status()
            ids += [p["record_id"] for p in r.json()["predictions"]]
        labels = [{"record_id": rid, "label": int(i % 7 == 0)} for i, rid in enumerate(ids)]
        httpx.post(f"{url}/v1/feedback", json={"labels": labels}, timeout=30).raise_for_status()
        time.sleep(1)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    cli("monitor", "--config", cfg, "--size", "100", "--no-report")
    cli("retrain", "--config", cfg, "--at", "2003-10-01", check=False)  # promoted or not: recorded
    cli("promote", "--config", cfg, "--version", "1", "--reason", "fixture: back to v1")
    cli("rollback", "--config", cfg, check=False)

    out = REPO / "tests" / "fixtures" / "upgrade"
    out.mkdir(parents=True, exist_ok=True)
    pack = WORK / "pack"
    pack.mkdir()
    shutil.copy(WORK / "flywheel.yaml", pack / "flywheel.yaml")
    copy_sqlite(WORK / ".flywheel" / "state.db", pack / "state.db")
    copy_sqlite(WORK / ".flywheel" / "mlflow.db", pack / "mlflow.db")
    shutil.copytree(WORK / ".flywheel" / "mlartifacts", pack / "mlartifacts")
    archive = out / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(pack.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(pack)), recursive=False)
    print(f"{archive}: {archive.stat().st_size / 1024:.0f} KiB, made under {WORK}")


if __name__ == "__main__":
    main()
