"""The control room with a long history: each data request's latency over HTTP.

A project trained on the committed SBA sample (a real registry), then its state database filled
the way a year of serving would: `--predictions` logged predictions (default 1,000,000) over 30
days, `--windows` monitoring windows (default 100) with every feature's score, 200 pipeline runs,
an alias history, and 30 days of per-minute traffic rollups for two versions. `flywheel room`
serves it; each JSON endpoint and the page are requested `--repeat` times (after one warm-up):
median, p95 and max milliseconds, against the goal of 200 ms for each data request. The tables
are ANALYZEd after the bulk load, as PostgreSQL's autovacuum does after such inserts: without
statistics its planner reads the whole log for the latest predictions.

    .venv/bin/python benchmarks/room_queries.py [--predictions 1000000] [--windows 100]
        [--state postgresql://postgres@127.0.0.1:5432/DB]  # default: the embedded SQLite file
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pandas as pd
import sqlalchemy as sa
import yaml

from flywheel.config import load_project
from flywheel.data.sources import write_table
from flywheel.demo.sba import SOURCE_TYPES
from flywheel.lifecycle.train import train_challenger
from flywheel.serving.process import free_port
from flywheel.state.db import (
    alias_history,
    monitor_columns,
    monitor_runs,
    open_state,
    pipeline_runs,
    predictions,
)
from flywheel.state.traffic import BUCKETS, Minute, add_minutes

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "sba-loans" / "flywheel.yaml"
SAMPLE = REPO / "tests" / "fixtures" / "sba_sample.parquet"
NOW = datetime.now(UTC).replace(second=0, microsecond=0)
GOAL_MS = 200.0


def make_project(folder: Path, state: str | None):
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["model"] = {**cfg.get("model", {}), "params": {"num_boost_round": 20}}
    if state:
        cfg.setdefault("stores", {})["state"] = state
    folder.mkdir(parents=True)
    (folder / "flywheel.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    project = load_project(folder / "flywheel.yaml", env={"FLYWHEEL_HOME": str(folder / ".flywheel")})
    sample = pd.read_parquet(SAMPLE)
    for col in ("approval_date", "chgoff_date", "disbursement_date"):
        sample[col] = pd.to_datetime(sample[col]).dt.date
    write_table(sample, project.source_url, project.config.data.table, SOURCE_TYPES,
                index_columns=("approval_date",))
    assert train_challenger(project).promoted
    more = load_project(project.path, env={"FLYWHEEL_HOME": str(project.home),
                                           "FLYWHEEL_MODEL__PARAMS": "{num_boost_round: 40}"})
    assert train_challenger(more).version == 2  # the history below is of two versions
    return project


def fill_predictions(engine: sa.Engine, name: str, n: int, chunk: int = 50_000) -> None:
    rng = random.Random(0)
    start = NOW - timedelta(days=30)
    step = timedelta(days=30) / n
    record = json.dumps({"gr_appv": 50000.0, "state": "CA", "term_months": 84})
    for first in range(0, n, chunk):
        rows = [{"record_id": f"r{i:09d}", "request_id": f"q{i // 4:09d}", "created_at": start + step * i,
                 "model_name": name, "model_version": 1 if i < n // 2 else 2, "inputs": record, "meta": None,
                 "probability": rng.random() ** 3, "decision": False, "latency_ms": 1.5}
                for i in range(first, min(n, first + chunk))]
        with engine.begin() as conn:
            conn.execute(predictions.insert(), rows)
        print(f"  predictions {min(n, first + chunk):,}/{n:,}", end="\r", flush=True)
    print()


def fill_history(engine: sa.Engine, name: str, features: list[str], windows: int) -> None:
    rng = random.Random(1)
    with engine.begin() as conn:
        for w in range(windows):
            at = NOW - timedelta(days=30) + timedelta(hours=7 * w)
            run_id = conn.execute(monitor_runs.insert().values(
                model_name=name, model_version=1 + (w >= windows // 2), window_kind="count",
                window_start=at - timedelta(hours=7), window_end=at, rows=10_000,
                drift_share=rng.random(), drift_detected=rng.random() > 0.7,
                prediction_drift=rng.random() / 5,
                labelled_rows=800, performance_drop=False, seconds=2.0, created_at=at, metric="roc_auc",
                metric_value=0.7 + rng.random() / 10, metrics="{}")).inserted_primary_key[0]
            conn.execute(monitor_columns.insert(), [
                {"run_id": run_id, "column_name": f, "stattest": "wasserstein", "score": rng.random() / 4,
                 "threshold": 0.1, "drifted": rng.random() > 0.6, "unseen_rows": None} for f in features])
        conn.execute(pipeline_runs.insert(), [
            {"id": f"run-{i:04d}", "model_name": name, "trigger": rng.choice(["drift", "schedule"]),
             "reason": "benchmark", "status": "succeeded", "step": "alert",
             "started_at": NOW - timedelta(hours=3 * i), "finished_at": NOW - timedelta(hours=3 * i - 1),
             "outputs": json.dumps({"evaluate": {"passed": i % 3 == 0, "reasons": ["floor holds"]},
                                    "promote": {"promoted": i % 3 == 0, "version": 2},
                                    "alert": {"title": "benchmark", "sent_to": "log"},
                                    "timings": {s: {"started": NOW.isoformat(), "finished": NOW.isoformat()}
                                                for s in ("extract", "features", "train", "evaluate")}}),
             "error": None} for i in range(200)])
        conn.execute(alias_history.insert(), [
            {"model_name": name, "alias": "champion", "version": 1 + i % 2, "previous_version": 2 - i % 2,
             "action": "promote", "reason": "benchmark", "moved_at": NOW - timedelta(days=30 - i),
             "token": None, "actor": "bench", "applied": True} for i in range(20)])


def fill_traffic(engine: sa.Engine, name: str, days: int = 30) -> None:
    minutes = {}
    for m in range(days * 24 * 60):
        t = int((NOW - timedelta(minutes=m)).timestamp())
        for version in (1, 2):
            minute = Minute(requests=600, client_errors=3, server_errors=0, latency_ms=900.0,
                            buckets=[0, 100, 300, 150, 40, 10] + [0] * (BUCKETS - 6))
            minutes[(t, "predict", version)] = minute
        if len(minutes) >= 20_000:
            add_minutes(engine, name, minutes)
            minutes = {}
    add_minutes(engine, name, minutes)


def measure(url: str, repeat: int) -> list[tuple[str, list[float]]]:
    paths = ["/api/models", "/api/traffic?range=hour", "/api/traffic?range=day", "/api/drift",
             "/api/distribution", "/api/performance", "/api/pipelines", "/"]
    out = []
    with httpx.Client(timeout=60) as client:
        for path in paths:
            client.get(url + path).raise_for_status()  # warm-up
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                client.get(url + path).raise_for_status()
                times.append((time.perf_counter() - start) * 1000)
            out.append((path, times))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--predictions", type=int, default=1_000_000)
    ap.add_argument("--windows", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--state", help="a PostgreSQL URL for the state database (default: SQLite)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp) / "proj", args.state)
        engine, name = open_state(project.state_url), project.config.registered_model
        features = [f.name for f in project.config.features]
        started = time.perf_counter()
        fill_predictions(engine, name, args.predictions)
        fill_history(engine, name, features, args.windows)
        fill_traffic(engine, name)
        with engine.begin() as conn:  # table statistics, as autovacuum (PostgreSQL) would gather them
            conn.exec_driver_sql("ANALYZE")
        print(f"history written in {time.perf_counter() - started:.0f} s "
              f"({engine.dialect.name} state database)")
        port = free_port()
        room = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "room", "--config", str(project.path),
                                 "--port", str(port)], env={**os.environ, "FLYWHEEL_HOME": str(project.home)})
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(120):
                try:
                    httpx.get(url + "/api/served", timeout=2)
                    break
                except httpx.HTTPError:
                    time.sleep(0.5)
            results = measure(url, args.repeat)
        finally:
            room.terminate()
            room.wait()
    print(f"\n{args.predictions:,} predictions, {args.windows} monitoring windows, 200 pipeline runs, "
          f"30 days of per-minute traffic; {args.repeat} requests each over HTTP")
    print(f"{'request':<28}{'median ms':>11}{'p95 ms':>9}{'max ms':>9}  goal {GOAL_MS:.0f} ms")
    for path, times in results:
        p95 = sorted(times)[int(0.95 * (len(times) - 1))]
        verdict = "" if path == "/" else ("ok" if p95 <= GOAL_MS else "OVER")
        print(f"{path:<28}{statistics.median(times):>11.1f}{p95:>9.1f}{max(times):>9.1f}  {verdict}")


if __name__ == "__main__":
    main()
