"""Serving benchmark: flywheel serve vs mlflow models serve vs a constant Starlette endpoint.

One run, one machine, printed as ratios. Each server runs one worker pinned to CPU 0; wrk (Debian
package `wrk`) is pinned to CPU 1 with 8 connections and single-record bodies. Flywheel runs with
its prediction log and metrics on, twice: its log-sink process sharing CPU 0 with the worker, and
moved to CPU 1 (FLYWHEEL_LOG_SINK_CPUS=1). Then a hot-swap run (promotions and rollbacks under
load; failed requests must be 0) and a logging run (requests answered vs rows stored, after
SIGTERM and after SIGKILL).

    .venv/bin/python benchmarks/serve_vs_mlflow.py [--seconds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SAMPLE = REPO / "tests" / "fixtures" / "sba_sample.parquet"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def wrk(url: str, body_file: Path, seconds: int) -> dict[str, float]:
    lua = body_file.with_suffix(".lua")
    lua.write_text(f'wrk.method = "POST"\nwrk.body = io.open("{body_file}"):read("*a")\n'
                   'wrk.headers["Content-Type"] = "application/json"\n')
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c8", f"-d{seconds}s", "-s", str(lua),
                          "--latency", url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": rps, "p50_ms": _ms(out, "50%"), "p99_ms": _ms(out, "99%"), "requests": total,
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0}


def _ms(out: str, pct: str) -> float:
    value, unit = re.search(rf"{pct}\s+([\d.]+)(us|ms|s)", out).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


class Server:
    def __init__(self, cmd: list[str], env: dict[str, str], ready_url: str, cwd: Path | None = None):
        self.proc = subprocess.Popen(["taskset", "-c", "0", *cmd], env=env, cwd=cwd,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_ready(ready_url)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def setup(home: Path) -> tuple[Path, dict[str, str], dict, list[float]]:
    """A project on the committed SBA sample with two versions: v1 LightGBM, v2 scikit-learn."""
    cfg = yaml.safe_load((REPO / "examples" / "sba-loans" / "flywheel.yaml").read_text())
    cfg["serving"]["reload_interval_s"] = 0.5
    config = home / "flywheel.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "FLYWHEEL_HOME": str(home / ".flywheel"), "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    run = lambda *a: subprocess.run([str(BIN / "flywheel"), *a, "--config", str(config)],  # noqa: E731
                                    env=env, check=True, capture_output=True)
    run("ingest", "--input", str(SAMPLE))
    run("train")
    run("train", "--model-type", "sklearn")
    sys.path.insert(0, str(REPO / "src"))
    os.environ["FLYWHEEL_HOME"] = env["FLYWHEEL_HOME"]
    from flywheel.config import load_project
    from flywheel.data.features import FeatureSpec, build_matrix
    from flywheel.pipeline.steps import open_registry

    project = load_project(config)
    registry = open_registry(project)
    spec = FeatureSpec.from_json(registry.load_artifacts(1).feature_spec)
    frame = pd.read_parquet(SAMPLE).iloc[[5]]
    record = {c: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v)
              for c, v in frame[spec.input_columns].iloc[0].items()}
    vector = [float(x) for x in build_matrix(spec, frame)[0]]
    register_lightgbm_flavor(registry, spec.names)
    return config, env, record, vector


def register_lightgbm_flavor(registry, names: list[str]) -> None:  # type: ignore[no-untyped-def]
    """The issue's anchor: v1's own booster as an MLflow LightGBM model (pandas + booster.predict)."""
    import lightgbm as lgb
    import mlflow

    run_id = registry.version(1).run_id
    path = registry.client.download_artifacts(run_id, "native/model.lgb.txt", tempfile.mkdtemp())
    booster = lgb.Booster(model_file=path)
    with mlflow.start_run(experiment_id=registry.experiment_id):
        mlflow.lightgbm.log_model(booster, name="model", registered_model_name="sba-loans-lightgbm",
                                  pip_requirements=["lightgbm"])
    LGB_COLUMNS.extend(names)


LGB_COLUMNS: list[str] = []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=15)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    home = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    config, env, record, vector = setup(home)
    body_fw = home / "record.json"
    body_fw.write_text(json.dumps(record))
    # MLflow takes the model's own input: the 17-value feature vector (it has no feature step).
    # DataFrame input is how MLflow is usually called (the anchor); tensor input skips
    # pandas and is MLflow's fastest path.
    body_df = home / "mlflow-dataframe.json"
    body_df.write_text(json.dumps({"dataframe_split": {
        "columns": [f"f{i}" for i in range(len(vector))], "data": [vector]}}))
    body_tensor = home / "mlflow-tensor.json"
    body_tensor.write_text(json.dumps({"inputs": [vector]}))
    body_lgb = home / "mlflow-lightgbm.json"
    body_lgb.write_text(json.dumps({"dataframe_split": {"columns": LGB_COLUMNS, "data": [vector]}}))
    results: dict[str, dict[str, float]] = {}

    port = free_port()
    tracking = f"sqlite:///{home / '.flywheel' / 'mlflow.db'}"
    srv = Server([str(BIN / "mlflow"), "models", "serve", "-m", "models:/sba-loans/1", "--env-manager",
                  "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                 {**env, "MLFLOW_TRACKING_URI": tracking}, f"http://127.0.0.1:{port}/ping")
    for label, body in (("mlflow models serve (ONNX, DataFrame input)", body_df),
                        ("mlflow models serve (ONNX, tensor input)", body_tensor)):
        check = httpx.post(f"http://127.0.0.1:{port}/invocations", content=body.read_text(),
                           headers={"content-type": "application/json"})
        assert check.status_code == 200, check.text
        results[label] = wrk(f"http://127.0.0.1:{port}/invocations", body, args.seconds)
    srv.stop()
    port = free_port()
    srv = Server([str(BIN / "mlflow"), "models", "serve", "-m", "models:/sba-loans-lightgbm/1",
                  "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                 {**env, "MLFLOW_TRACKING_URI": tracking}, f"http://127.0.0.1:{port}/ping")
    check = httpx.post(f"http://127.0.0.1:{port}/invocations", content=body_lgb.read_text(),
                       headers={"content-type": "application/json"})
    assert check.status_code == 200, check.text
    results["mlflow models serve (LightGBM flavor, DataFrame)"] = wrk(
        f"http://127.0.0.1:{port}/invocations", body_lgb, args.seconds)
    srv.stop()

    for label, extra in (("flywheel serve (log sink on CPU 0)", {}),
                         ("flywheel serve (log sink on CPU 1)", {"FLYWHEEL_LOG_SINK_CPUS": "1"})):
        port = free_port()
        srv = Server([str(BIN / "flywheel"), "serve", "--config", str(config), "--port", str(port)],
                     {**env, **extra}, f"http://127.0.0.1:{port}/ready")
        results[label] = wrk(f"http://127.0.0.1:{port}/v1/predict", body_fw, args.seconds)
        depth = re.search(r"^flywheel_prediction_log_queue_depth (\S+)",
                          httpx.get(f"http://127.0.0.1:{port}/metrics").text, re.M)
        # A large depth would mean the log sink did not keep up and the buffer flattered the run.
        results[label]["log_backlog"] = float(depth.group(1)) if depth else float("nan")
        srv.stop()

    port = free_port()
    floor_proc = subprocess.Popen(
        ["taskset", "-c", "0", str(BIN / "uvicorn"), "floor_app:app", "--port", str(port), "--loop",
         "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"],
        env=env, cwd=REPO / "benchmarks", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port)
    results["constant Starlette endpoint (floor)"] = wrk(f"http://127.0.0.1:{port}/v1/predict",
                                                         body_fw, args.seconds)
    floor_proc.terminate()
    floor_proc.wait()

    lgb = results["mlflow models serve (LightGBM flavor, DataFrame)"]["rps"]
    base = results["mlflow models serve (ONNX, DataFrame input)"]["rps"]
    tensor = results["mlflow models serve (ONNX, tensor input)"]["rps"]
    floor = results["constant Starlette endpoint (floor)"]["rps"]
    print(f"\nThroughput and latency, one worker on CPU 0, wrk -c8 on CPU 1, {args.seconds}s each. "
          "Ratios: x lgb = vs MLflow's LightGBM flavor (the issue's anchor), x onnx-df / x onnx-t = "
          "vs MLflow serving the same registered ONNX version with DataFrame / tensor input.")
    print(f"{'server':50} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'x lgb':>6} {'x onnx-df':>9} "
          f"{'x onnx-t':>8} {'% floor':>8} {'errors':>6} {'log backlog':>11}")
    for name, r in results.items():
        backlog = f"{r['log_backlog']:11.0f}" if "log_backlog" in r else f"{'-':>11}"
        print(f"{name:50} {r['rps']:7.0f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} {r['rps'] / lgb:6.1f} "
              f"{r['rps'] / base:9.1f} {r['rps'] / tensor:8.1f} {100 * r['rps'] / floor:7.1f}% "
              f"{r['non2xx'] + r['socket_errors']:6.0f} {backlog}")

    hot_swap(config, env, body_fw)
    logging_run(config, env, record, home)
    print(f"\n(work folder: {home})")


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"port {port} never opened")


def hot_swap(config: Path, env: dict[str, str], body: Path, moves: int = 6) -> None:
    """wrk for long enough for 50,000+ requests while champion moves between v1 and v2."""
    from flywheel.config import load_project
    from flywheel.pipeline.steps import promote

    port = free_port()
    srv = Server([str(BIN / "flywheel"), "serve", "--config", str(config), "--port", str(port)], env,
                 f"http://127.0.0.1:{port}/ready")
    project = load_project(config)
    seconds = 20

    def mover() -> None:
        time.sleep(2)
        for i in range(moves):
            promote(project, 2 if i % 2 == 0 else 1, reason=f"benchmark move {i + 1}")
            time.sleep((seconds - 4) / moves)

    thread = threading.Thread(target=mover)
    thread.start()
    result = wrk(f"http://127.0.0.1:{port}/v1/predict", body, seconds)
    thread.join()
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    swaps = float(re.search(r"^flywheel_model_swaps_total (\S+)", metrics, re.M).group(1))
    served = re.findall(r'^flywheel_predictions_total\{model_version="(\d+)"\} (\S+)', metrics, re.M)
    srv.stop()
    print(f"\nHot swap: {result['requests']:,} requests over 8 connections in {seconds}s, "
          f"{moves} alias moves (promote/rollback), {swaps:.0f} swaps seen by the worker; "
          f"failed requests: {result['non2xx'] + result['socket_errors']}; "
          f"predictions by version: {dict(served)}")


def logging_run(config: Path, env: dict[str, str], record: dict, home: Path, n: int = 20_000) -> None:
    """Requests answered vs rows stored, after a graceful stop and after a SIGKILL under load."""
    db = home / ".flywheel" / "state.db"

    def rows() -> int:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT count(*) FROM predictions").fetchone()[0]

    def send(port: int, stop_after: int | None, stop: threading.Event) -> int:
        ok = 0
        lock = threading.Lock()

        def worker() -> None:
            nonlocal ok
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                while not stop.is_set():
                    with lock:
                        if stop_after is not None and ok >= stop_after:
                            return
                    try:
                        r = client.post("/v1/predict", json=record)
                    except httpx.HTTPError:
                        return
                    if r.status_code == 200:
                        with lock:
                            ok += 1
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return ok

    for sig, label in ((signal.SIGTERM, "SIGTERM after the last answer"),
                       (signal.SIGKILL, "SIGKILL in the middle of traffic")):
        before = rows()
        port = free_port()
        srv = Server([str(BIN / "flywheel"), "serve", "--config", str(config), "--port", str(port)], env,
                     f"http://127.0.0.1:{port}/ready")
        stop = threading.Event()
        if sig == signal.SIGTERM:
            answered = send(port, n, stop)
            srv.stop(sig)
        else:
            box: list[int] = []
            t = threading.Thread(target=lambda b=box, p=port, s=stop: b.append(send(p, None, s)))
            t.start()
            time.sleep(4)
            srv.proc.send_signal(sig)
            t.join()
            answered = box[0]
        time.sleep(3)  # the sink drains what it received and exits
        stored = rows() - before
        print(f"Logging, {label}: {answered:,} answered, {stored:,} rows stored, "
              f"lost {answered - stored:,} ({100 * (answered - stored) / max(answered, 1):.2f}%)")


if __name__ == "__main__":
    main()
