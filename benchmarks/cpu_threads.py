"""LightGBM training time by thread count and OpenMP waiting, on an idle and a busy machine.

Rows (each fit in a fresh process, so OpenMP reads its settings as it loads):
- old:      `num_threads: 2` whatever the process may use, OpenMP's default wait (spin up to
            300,000 times between parallel regions, then sleep);
- passive:  threads from the usable CPUs (`core.cpus`), `OMP_WAIT_POLICY=PASSIVE` (never spin);
- Flywheel: threads from the usable CPUs, `GOMP_SPINCOUNT=1000` (a short spin), what importing
            flywheel sets unless you set either variable;
- 1 thread: OpenMP's default wait.
Data: random (n x 17 features, a binary label), 300 rounds, at 30,000 and 300,000 rows. "Busy"
runs Debian's `stress-ng --cpu N` beside it (N = the machine's cores): a laptop running a build,
or a shared CI host. Also printed: the CPU a process burns in the 2 s after a fit, waiting (an
idle pool worker's cost). Prints medians over interleaved rounds and each row's ratio to "old".

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

from flywheel.core.cpus import usable_cpus

FIT = r"""
import json, sys, time
import numpy as np
import lightgbm as lgb
from flywheel.core.cpus import usable_cpus

n = int(sys.argv[2])
threads = usable_cpus() if sys.argv[1] == "usable" else int(sys.argv[1])
rng = np.random.default_rng(0)
X = rng.normal(size=(n, 17))
y = (X[:, 0] + 0.5 * X[:, 1] * X[:, 2] + rng.normal(size=n) > 0).astype(int)
data = lgb.Dataset(X, y)
t0, c0 = time.perf_counter(), time.process_time()
lgb.train({"objective": "binary", "verbose": -1, "num_threads": threads, "min_data_in_leaf": 100,
           "seed": 42, "deterministic": True}, data, num_boost_round=300)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
idle0 = time.process_time()
time.sleep(2.0)
print(json.dumps({"wall": wall, "cpu": cpu, "threads": threads, "idle_cpu": time.process_time() - idle0}))
"""

# name: (threads, environment); an empty OMP_WAIT_POLICY keeps flywheel's import from choosing
SETTINGS = {
    "old: 2 threads, default spin": ("2", {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": ""}),
    "passive: usable CPUs, no spin": ("usable", {"OMP_WAIT_POLICY": "PASSIVE"}),
    "Flywheel: usable CPUs, spin 1000": ("usable", {}),
    "1 thread, default spin": ("1", {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": ""}),
}


def fit(threads: str, extra: dict[str, str], rows: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update({k: v for k, v in extra.items()})
    code = "import flywheel\n" + FIT  # the package's own settings, as any flywheel process has them
    done = subprocess.run([sys.executable, "-c", code, threads, str(rows)], capture_output=True,
                          text=True, env=env, timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-busy", action="store_true")
    args = ap.parse_args()
    cores = usable_cpus()  # the hog fills the CPUs this run may use, as the trainers see them
    loads = ["idle"] + ([] if args.no_busy or not shutil.which("stress-ng") else ["busy"])
    print(f"{cores} cores; LightGBM 300 rounds; median of {args.rounds} interleaved rounds")
    for rows in (30_000, 300_000):
        for load in loads:
            hog = subprocess.Popen(["stress-ng", "--cpu", str(cores), "--quiet"]) if load == "busy" else None
            try:
                time.sleep(1 if hog else 0)
                got: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
                for _ in range(args.rounds):
                    for name, (threads, extra) in SETTINGS.items():
                        got[name].append(fit(threads, extra, rows))
            finally:
                if hog:
                    hog.terminate()
                    hog.wait()
            old = statistics.median(r["wall"] for r in got[next(iter(SETTINGS))])
            for name, rs in got.items():
                wall = statistics.median(r["wall"] for r in rs)
                print(f"  {rows:>7,} rows {load:4}  {name:34} {wall:6.2f} s  (x{old / wall:4.2f} of old)  "
                      f"threads {rs[0]['threads']}, cpu {statistics.median(r['cpu'] for r in rs):6.2f} s, "
                      f"2 s idle after: {statistics.median(r['idle_cpu'] for r in rs) * 1000:.0f} ms cpu")


if __name__ == "__main__":
    main()
