"""What a shadow rollout costs the answered requests: one server, shadow scoring on and off.

One run, one machine, printed as ratios. `flywheel serve` (one worker) and its log sink share
CPU 0, as by default; the load generator runs on CPU 1. The project is the SBA sample with two
versions: v1 (LightGBM) is champion, v2 (scikit-learn) is the challenger of a shadow rollout that
is started and aborted between rounds (the sink follows the state database within 5 s), so the
same server is measured both ways in interleaved rounds (the order rotates each round):

- at saturation (wrk, 8 connections): throughput and p99 with the sink also scoring v2 on every
  record, against the sink logging alone; the goal is at least 70% of the shadow-off throughput;
- at a fixed offered load of 70% of the shadow-off maximum (Debian's `hey` in rate mode, 8
  workers): the champion's p99 with and without the shadow; the goal is at most 10% higher.

Each round also counts the shadow answers stored, so a run whose sink never scored says so.

    .venv/bin/python benchmarks/shadow_cost.py [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SAMPLE = REPO / "tests" / "fixtures" / "sba_sample.parquet"
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "src"))

from serve_vs_mlflow import Server, free_port, wrk  # noqa: E402

FOLLOW_S = 6.0  # the sink looks the running rollout up every 5 s


def hey(url: str, body: Path, seconds: int, rate: float, workers: int = 8) -> dict[str, float]:
    out = subprocess.run(["taskset", "-c", "1", "hey", "-z", f"{seconds}s", "-c", str(workers),
                          "-q", f"{rate / workers:.1f}", "-m", "POST", "-T", "application/json",
                          "-D", str(body), url], capture_output=True, text=True, check=True).stdout
    p99 = float(re.search(r"99% in ([\d.]+) secs", out).group(1)) * 1000
    p50 = float(re.search(r"50% in ([\d.]+) secs", out).group(1)) * 1000
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99,
            "non2xx": sum(int(n) for c, n in codes.items() if c != "200")}


def shadow_since(engine: Any, rollout_id: int, since: datetime) -> int:
    """The shadow answers stored for requests served since `since`."""
    import sqlalchemy as sa

    from flywheel.state.db import shadow_predictions as sp

    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(sp).where(
            sp.c.rollout_id == rollout_id, sp.c.created_at >= since)).scalar_one())


def setup(home: Path) -> tuple[Path, dict[str, str], Path]:
    cfg = yaml.safe_load((REPO / "examples" / "sba-loans" / "flywheel.yaml").read_text())
    config = home / "flywheel.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "FLYWHEEL_HOME": str(home / ".flywheel"), "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    run = lambda *a: subprocess.run([str(BIN / "flywheel"), *a, "--config", str(config)],  # noqa: E731
                                    env=env, check=True, capture_output=True)
    run("ingest", "--input", str(SAMPLE))
    run("train")
    run("train", "--model-type", "sklearn")
    os.environ["FLYWHEEL_HOME"] = env["FLYWHEEL_HOME"]
    import pandas as pd

    from flywheel.config import load_project
    from flywheel.data.features import FeatureSpec
    from flywheel.registry import Registry

    project = load_project(config)
    spec = FeatureSpec.from_json(Registry.for_project(project).load_artifacts(1).feature_spec)
    row = pd.read_parquet(SAMPLE)[spec.input_columns].iloc[5]
    record = {c: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v) for c, v in row.items()}
    body = home / "record.json"
    body.write_text(json.dumps(record))
    return config, env, body


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for tool in ("wrk", "hey"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install {tool}")
    home = Path(tempfile.mkdtemp(prefix="flywheel-shadow-"))
    config, env, body = setup(home)
    from flywheel.config import load_project
    from flywheel.state import rollouts
    from flywheel.state.db import open_state

    project = load_project(config)
    engine = open_state(project.state_url)
    name = project.config.registered_model

    def shadow(on: bool) -> int | None:
        if on:
            started, _ = rollouts.start(engine, name, "shadow", 1, 2, datetime.now(UTC), "benchmark")
            rid: int | None = started.id
        else:
            running = rollouts.running(engine, name)
            if running:
                rollouts.end(engine, running.id, rollouts.ABORTED, datetime.now(UTC), "benchmark")
            rid = None
        time.sleep(FOLLOW_S)
        wrk(url, body, 3)  # traffic for the sink to follow the change (it checks at a batch)
        return rid

    port = free_port()
    server = Server([str(BIN / "flywheel"), "serve", "--config", str(config), "--port", str(port)], env,
                    f"http://127.0.0.1:{port}/ready")
    url = f"http://127.0.0.1:{port}/v1/predict"
    saturated: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    paced: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    scored: list[int] = []
    coverage: list[float] = []
    try:
        wrk(url, body, 3)  # warm
        for r in range(args.rounds):
            for state in (("off", "on") if r % 2 == 0 else ("on", "off")):
                rid = shadow(state == "on")
                saturated[state].append(wrk(url, body, args.seconds))
                if rid is not None:
                    scored.append(rollouts.shadow_count(engine, rid))
        rate = 0.7 * statistics.median(x["rps"] for x in saturated["off"])
        for r in range(args.rounds):
            for state in (("off", "on") if r % 2 == 0 else ("on", "off")):
                rid = shadow(state == "on")
                since = datetime.now(UTC)
                paced[state].append(hey(url, body, args.seconds, rate))
                if rid is not None:  # the share of the round's requests the shadow scored
                    time.sleep(5.0)  # the server idle: the shadow process catches up
                    coverage.append(shadow_since(engine, rid, since)
                                    / (paced[state][-1]["rps"] * args.seconds))
    finally:
        shadow(False)
        server.stop()

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(x[key] for x in runs)

    print(f"\nShadow scoring's cost: one worker and its log sink on CPU 0, load on CPU 1, "
          f"{args.rounds} interleaved rounds of {args.seconds} s (medians)\n")
    print("| load | shadow off req/s | shadow on req/s | on / off | p99 off ms | p99 on ms | p99 on / off |")
    print("|---|---|---|---|---|---|---|")
    for label, runs in (("saturated (wrk, 8 connections)", saturated),
                        (f"fixed {rate:,.0f} req/s (70% of the maximum; hey)", paced)):
        off_rps, on_rps = med(runs["off"], "rps"), med(runs["on"], "rps")
        off_p99, on_p99 = med(runs["off"], "p99_ms"), med(runs["on"], "p99_ms")
        print(f"| {label} | {off_rps:,.0f} | {on_rps:,.0f} | {on_rps / off_rps:.2f} | {off_p99:.2f} | "
              f"{on_p99:.2f} | {on_p99 / off_p99:.2f} |")
    errors = sum(x["non2xx"] for runs in (*saturated.values(), *paced.values()) for x in runs)
    print(f"\nshadow answers stored per saturated round: {scored}; non-2xx answers: {errors}")
    print("share of the requests at 70% load that the shadow scored (within 5 s of the round): "
          + ", ".join(f"{c:.0%}" for c in coverage))
    print("goals: saturated throughput on / off >= 0.70; p99 at 70% load on / off <= 1.10")
    print(f"(work folder: {home})")


if __name__ == "__main__":
    main()
