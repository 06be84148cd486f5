"""LightGBM training time under the old thread rule and the new one, on an idle and a busy machine.

Old: `num_threads: 2` whatever the process may use, and OpenMP's default waiting (its threads spin
between parallel regions). New: threads from the CPUs the process may use (`core.cpus`) and
`OMP_WAIT_POLICY=PASSIVE`. Each configuration trains the SBA sample's model (300 rounds, no early
stop) in a fresh process, so OpenMP reads its settings as it loads; prints wall and CPU seconds
and the ratio old / new. "Busy" runs Debian's `stress-ng --cpu N` beside it (N = the machine's
cores), which is how a laptop running a build, or a shared CI host, looks to the trainer.
Also measured: an idle process pool's CPU time (a spawned worker that trained once, then waits).

    .venv/bin/python benchmarks/cpu_threads.py [--rounds 3] [--no-busy]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TRAIN = r"""
import json, sys, time
import lightgbm as lgb
import pandas as pd
import sqlalchemy as sa
from flywheel.config import load_project
from flywheel.core.cpus import usable_cpus
from flywheel.data.sources import write_table
from flywheel.demo.sba import SOURCE_TYPES
from flywheel.lifecycle.features import extract_training_window, prepare_features

project = load_project(sys.argv[1], env={"FLYWHEEL_HOME": sys.argv[2]})
if not sa.inspect(sa.create_engine(project.source_url)).has_table("loans"):
    sample = pd.read_parquet(sys.argv[3])
    for col in ("approval_date", "chgoff_date", "disbursement_date"):
        sample[col] = pd.to_datetime(sample[col]).dt.date
    write_table(sample, project.source_url, "loans", SOURCE_TYPES)
data = prepare_features(project, extract_training_window(project)).training_data()
threads = usable_cpus() if sys.argv[4] == "usable" else int(sys.argv[4])
params = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 100,
          "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "verbose": -1,
          "num_threads": threads, "seed": 42, "deterministic": True}
train = lgb.Dataset(data.X_train, data.y_train, categorical_feature=sorted(data.cardinalities))
t0, c0 = time.perf_counter(), time.process_time()
lgb.train(params, train, num_boost_round=300)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
idle0 = time.process_time()
time.sleep(2.0)  # a pool worker between tasks: what does it cost while it waits?
print(json.dumps({"wall": wall, "cpu": cpu, "threads": threads, "idle_cpu": time.process_time() - idle0}))
"""


def run(policy: str | None, threads: str, config: Path, home: Path, sample: Path) -> dict[str, float]:
    # The old rule had no policy: an empty value keeps flywheel's import from setting PASSIVE and
    # leaves OpenMP on its default (spin, then sleep).
    env = {**os.environ, "OMP_WAIT_POLICY": policy or ""}
    done = subprocess.run([sys.executable, "-c", TRAIN, str(config), str(home), str(sample), threads],
                          capture_output=True, text=True, env=env, timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-busy", action="store_true")
    args = ap.parse_args()
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"cpu-threads-{os.getpid()}"
    home.mkdir(parents=True, exist_ok=True)
    config = REPO / "examples" / "sba-loans" / "flywheel.yaml"
    sample = REPO / "tests" / "fixtures" / "sba_sample.parquet"
    cores = os.cpu_count() or 1
    settings = {"old (2 threads, OpenMP's default wait)": (None, "2"),
                "new (usable CPUs, passive wait)": ("PASSIVE", "usable")}
    loads = ["idle"] + ([] if args.no_busy or not shutil.which("stress-ng") else ["busy"])
    print(f"{cores} cores; LightGBM, 300 rounds on the SBA sample; median of {args.rounds}, "
          "rounds interleaved")
    for load in loads:
        hog = subprocess.Popen(["stress-ng", "--cpu", str(cores), "--quiet"]) if load == "busy" else None
        try:
            time.sleep(1 if hog else 0)
            got: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
            for _ in range(args.rounds):
                for name, (policy, threads) in settings.items():
                    got[name].append(run(policy, threads, config, home, sample))
        finally:
            if hog:
                hog.terminate()
                hog.wait()
        walls = {n: statistics.median(r["wall"] for r in rs) for n, rs in got.items()}
        for name, rs in got.items():
            print(f"  {load:5} {name:40} wall {walls[name]:7.2f} s  cpu "
                  f"{statistics.median(r['cpu'] for r in rs):7.2f} s  threads {rs[0]['threads']}  "
                  f"idle 2 s after: cpu {statistics.median(r['idle_cpu'] for r in rs) * 1000:.0f} ms")
        old, new = walls.values()
        print(f"  {load:5} old / new wall: {old / new:.2f}x")
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
