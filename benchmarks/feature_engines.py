"""Feature computation on DuckDB and on Spark, and training, at the size of the full SBA data and
at a synthetic enlargement; one run, one machine, printed with ratios.

- features (learn the vocabularies on the first 70% of rows, then compute every feature of every
  row) on DuckDB in this process, on Spark `local[2]`, and on a standalone cluster (a master and
  one 2-core worker started here from pyspark's launcher), at 1x (the cleaned SBA data, ~900k
  rows) and 10x (rows resampled with jitter on the numbers, ~9M); wall time and the peak resident
  memory of the whole process tree (Python, and Spark's JVMs);
- LightGBM training (the example project's parameters) on the 1x, 5x and 10x matrices: wall time
  and peak memory, and the row count at which one 24 GiB machine would stop, extrapolated
  linearly from the measured growth (not run to exhaustion).

Each measurement runs in a child process of its own, so peak memory is that measurement's.
Usage: python benchmarks/feature_engines.py [--scales 1,10] [--skip-cluster]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
MACHINE_BYTES = 24 * 2**30


def enlarged(frame: pd.DataFrame, factor: int, seed: int = 0) -> pd.DataFrame:
    """`factor` times the rows: resampled with replacement, numbers jittered by up to 5%."""
    if factor == 1:
        return frame
    rng = np.random.default_rng(seed)
    out = frame.iloc[rng.integers(0, len(frame), len(frame) * factor)].reset_index(drop=True)
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = out[col] * rng.uniform(0.95, 1.05, len(out))
    return out


def peak_rss(proc: subprocess.Popen, samples: list[int]) -> None:
    """Sample the resident memory of `proc` and all its children until it exits."""
    try:
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            for p in [parent, *parent.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            samples.append(total)
            time.sleep(0.1)
    except psutil.Error:
        pass


def measure(task: dict) -> dict:
    """Run one measurement in a child process; its result, wall time and peak memory."""
    samples: list[int] = []
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(task)], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    watcher = threading.Thread(target=peak_rss, args=(proc, samples), daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{task} failed ({proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_gb"] = max(samples, default=0) / 2**30
    return result


def child(task: dict) -> None:
    from flywheel.config import SparkConfig
    from flywheel.data import features as feats
    from flywheel.data import spark as spark_engine

    if task["kind"] != "train":
        frame = pd.read_parquet(task["data"])
        features = feats_from_config()
        train = np.arange(int(len(frame) * 0.7))
    started = time.perf_counter()
    if task["kind"] == "duckdb":
        spec = feats.fit_spec(features, frame.iloc[train])
        X = feats.build_matrix(spec, frame)
    elif task["kind"] == "spark":
        cfg = SparkConfig(master=task["master"], conf={"spark.driver.memory": "8g",
                                                       "spark.executor.memory": "6g",
                                                       "spark.sql.shuffle.partitions": "8"})
        spark_engine.session(cfg)  # started before the clock: a JVM start is not the engine's work
        started = time.perf_counter()
        spec, X = spark_engine.fit_and_build(cfg, features, frame, train)
    else:  # train
        import lightgbm as lgb

        X = np.load(task["matrix"])
        y = (np.random.default_rng(0).random(len(X)) < 0.15).astype(np.int32)
        started = time.perf_counter()
        params = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 100,
                  "verbose": -1, "num_threads": 2, "seed": 42}
        lgb.train(params, lgb.Dataset(X, y), num_boost_round=100)
        print(json.dumps({"seconds": time.perf_counter() - started, "rows": len(X)}))
        return
    seconds = time.perf_counter() - started
    if task.get("save"):
        np.save(task["save"], X)
    print(json.dumps({"seconds": seconds, "rows": len(X), "checksum": float(np.nansum(X[:, :4]))}))


def feats_from_config() -> list:
    import yaml
    from pydantic import TypeAdapter

    from flywheel.data import features as feats

    cfg = yaml.safe_load((REPO / "examples" / "sba-loans" / "flywheel.yaml").read_text())
    return TypeAdapter(list[feats.Feature]).validate_python(cfg["features"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cluster(folder: Path) -> tuple[str, list[subprocess.Popen]]:
    import pyspark

    spark_class = Path(pyspark.__file__).parent / "bin" / "spark-class"
    port = free_port()
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(folder),
           "SPARK_WORKER_DIR": str(folder / "work"), "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false"}
    log = open(folder / "master.log", "w")  # noqa: SIM115
    master = subprocess.Popen([str(spark_class), "org.apache.spark.deploy.master.Master", "--host",
                               "127.0.0.1", "--port", str(port), "--webui-port", str(free_port())],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    time.sleep(5)
    url = f"spark://127.0.0.1:{port}"
    worker = subprocess.Popen([str(spark_class), "org.apache.spark.deploy.worker.Worker", url, "--host",
                               "127.0.0.1", "--cores", "2", "--memory", "8g",
                               "--webui-port", str(free_port())],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while "Registering worker" not in (folder / "master.log").read_text():
        if time.monotonic() > deadline:
            raise RuntimeError("the Spark worker did not register")
        time.sleep(0.5)
    return url, [worker, master]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="1,10")
    parser.add_argument("--skip-cluster", action="store_true")
    parser.add_argument("--spark-scales", default="1,10", help="the scales Spark runs at (DuckDB runs "
                                                                "at every scale)")
    parser.add_argument("--train-from", type=Path, help="only the training part, on the matrices a "
                                                         "previous run left in this folder")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    from flywheel.config import cache_dir
    from flywheel.data import features as feats
    from flywheel.demo.sba import load_clean

    if args.train_from:
        report_training(training(args.train_from))
        return
    work = Path(tempfile.mkdtemp(prefix="flywheel-engines-"))
    base, _ = load_clean(cache_dir())
    base = base[feats.input_columns(feats_from_config())]
    scales = [int(s) for s in args.scales.split(",")]
    cluster_url, cluster = (None, []) if args.skip_cluster else start_cluster(work)
    rows: list[tuple[str, int, dict]] = []
    try:
        for scale in sorted(set(scales) | {1}):
            data = work / f"x{scale}.parquet"
            enlarged(base, scale).to_parquet(data)
            runs = [("duckdb", {"kind": "duckdb", "data": str(data), "save": str(work / f"X{scale}.npy")})]
            if str(scale) in args.spark_scales.split(","):
                runs.append(("spark local[2]", {"kind": "spark", "master": "local[2]", "data": str(data)}))
            if cluster_url and str(scale) in args.spark_scales.split(","):
                runs.append(("spark standalone (1 worker, 2 cores)",
                             {"kind": "spark", "master": cluster_url, "data": str(data)}))
            for label, task in runs:
                rows.append((label, scale, measure(task)))
                print(f"  features x{scale} {label}: {rows[-1][2]}", flush=True)
        train = training(work)
    finally:
        for proc in cluster:
            proc.terminate()
            proc.wait(30)
    print(f"\nFeature computation ({len(base):,} rows at 1x; vocabularies on the first 70%):")
    for scale in sorted({s for _, s, _ in rows}):
        duck = next(r for label, s, r in rows if s == scale and label == "duckdb")
        for label, s, r in rows:
            if s == scale:
                ratio = r["seconds"] / duck["seconds"]
                print(f"  x{scale:<3} {label:38s} {r['seconds']:8.1f} s  x{ratio:6.2f}  "
                      f"peak {r['peak_gb']:.2f} GiB  rows {r['rows']:,}")
    report_training(train)


def training(work: Path) -> list[tuple[int, dict]]:
    train: list[tuple[int, dict]] = []
    for scale in (1, 5, 10):
        matrix = work / f"X{scale}.npy"
        if not matrix.exists():
            X1 = np.load(work / "X1.npy")
            np.save(matrix, np.concatenate([X1] * scale))
        train.append((scale, measure({"kind": "train", "matrix": str(matrix)})))
        print(f"  train x{scale}: {train[-1][1]}", flush=True)
    return train


def report_training(train: list[tuple[int, dict]]) -> None:
    print("\nLightGBM training, 100 rounds, 2 threads:")
    for scale, r in train:
        print(f"  x{scale:<3} {r['rows']:>11,} rows {r['seconds']:8.1f} s  peak {r['peak_gb']:.2f} GiB")
    r1, r10 = train[0][1], train[-1][1]
    per_row = (r10["peak_gb"] - r1["peak_gb"]) * 2**30 / (r10["rows"] - r1["rows"])
    fixed = r1["peak_gb"] * 2**30 - per_row * r1["rows"]
    print(f"  memory grows {per_row:.0f} bytes per row; a 24 GiB machine stops near "
          f"{(MACHINE_BYTES - fixed) / per_row / 1e6:,.0f} M rows (extrapolated, not run)")


if __name__ == "__main__":
    main()
