"""Serving benchmark: flywheel serve vs mlflow models serve vs a constant Starlette endpoint.

One run, one machine, printed as ratios. Each server runs one worker pinned to CPU 0; wrk (Debian
package `wrk`) is pinned to CPU 1 with 8 connections and single-record bodies. All servers are
started first and then measured in interleaved rounds (the order rotates each round); the table
gives each server's median over the rounds, and each ratio is the median of the per-round ratios,
so a slow minute of this shared machine lands on every server alike.

MLflow is measured three ways: the registered version itself (ONNX with its signature, DataFrame
input: "the same registered version"), v1's LightGBM booster logged the usual way (with a
signature), and the same booster without a signature (MLflow's fastest DataFrame path we found).
Flywheel runs with its prediction log and metrics on, twice: its log-sink process sharing CPU 0
with the worker, and moved to CPU 1 (FLYWHEEL_LOG_SINK_CPUS=1). Then a hot-swap run (promotions
and rollbacks under load; failed requests must be 0) and a logging run (requests answered vs
rows stored, after SIGTERM and after SIGKILL).

    .venv/bin/python benchmarks/serve_vs_mlflow.py [--seconds 10] [--rounds 3] [--baseline SRC]

`--tasks` adds a regression (the flights example) and a multiclass (the bikeshare example) project,
each trained on its committed sample and served like the binary one (log sink on CPU 0), measured in
the same rounds; their req/s and p99 are printed against the binary server's.

`--baseline SRC` adds two rows served by another source tree of Flywheel (its `src` folder, e.g. a
checkout of the previous release) on the same project, store and settings, measured in the same
interleaved rounds: a before/after of a change in one run.
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
import statistics
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
    """A server pinned to CPU 0, in its own process group so that it can be paused whole."""

    def __init__(self, cmd: list[str], env: dict[str, str], ready_url: str | None, cwd: Path | None = None,
                 port: int | None = None):
        self.proc = subprocess.Popen(["taskset", "-c", "0", *cmd], env=env, cwd=cwd, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if ready_url:
            wait_ready(ready_url)
        elif port:
            _wait_port(port)

    def pause(self) -> None:
        """SIGSTOP the server and its children (workers, log sink): an idle server's background
        threads (alias watcher, metrics) then take nothing from the one being measured."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.resume()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def setup(home: Path) -> tuple[Path, dict[str, str], dict, list[float]]:
    """A project on the committed SBA sample with two versions: v1 LightGBM, v2 scikit-learn."""
    cfg = yaml.safe_load((REPO / "examples" / "sba-loans" / "flywheel.yaml").read_text())
    (home / "flywheel-throughput.yaml").write_text(yaml.safe_dump(cfg))  # alias checked every 2 s
    cfg["serving"]["reload_interval_s"] = 0.5  # the hot-swap run: swaps within half a second
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
    from flywheel.registry import Registry

    project = load_project(config)
    registry = Registry.for_project(project)
    spec = FeatureSpec.from_json(registry.load_artifacts(1).feature_spec)
    frame = pd.read_parquet(SAMPLE).iloc[[5]]
    record = {c: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v)
              for c, v in frame[spec.input_columns].iloc[0].items()}
    vector = [float(x) for x in build_matrix(spec, frame)[0]]
    sample = pd.DataFrame(build_matrix(spec, pd.read_parquet(SAMPLE).iloc[:200]), columns=spec.names)
    register_lightgbm_flavor(registry, sample)
    COLUMNS.extend(spec.names)
    return config, env, record, vector


def register_lightgbm_flavor(registry, sample: pd.DataFrame) -> None:  # type: ignore[no-untyped-def]
    """v1's own booster as an MLflow LightGBM model, with a signature and without one."""
    import lightgbm as lgb
    import mlflow
    from mlflow.models import infer_signature

    run_id = registry.version(1).run_id
    path = registry.client.download_artifacts(run_id, "native/model.lgb.txt", tempfile.mkdtemp())
    booster = lgb.Booster(model_file=path)
    for name, signature in (("sba-loans-lightgbm", infer_signature(sample, booster.predict(sample))),
                            ("sba-loans-lightgbm-unsigned", None)):
        with mlflow.start_run(experiment_id=registry.experiment_id):
            mlflow.lightgbm.log_model(booster, name="model", registered_model_name=name,
                                      signature=signature, pip_requirements=["lightgbm"])


COLUMNS: list[str] = []


ANCHOR = "mlflow: registered version (ONNX + signature)"
LGB = "mlflow: LightGBM booster + signature"
FASTEST = "mlflow: LightGBM booster, no signature"
SINK0 = "flywheel serve, log sink on CPU 0"
SINK1 = "flywheel serve, log sink on CPU 1"
SINKPG = "flywheel serve, PostgreSQL log, sink on CPU 0"
REGRESSION = "flywheel serve, regression (flights)"
MULTICLASS = "flywheel serve, multiclass (bikeshare)"
BASE0 = "baseline tree, log sink on CPU 0"
BASE1 = "baseline tree, log sink on CPU 1"
FLOOR = "constant Starlette endpoint (floor)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per server per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another Flywheel src folder to measure too")
    parser.add_argument("--tasks", action="store_true", help="serve a regression and a multiclass "
                                                               "project too")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    home = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    config, env, record, vector = setup(home)
    body_fw = home / "record.json"
    body_fw.write_text(json.dumps(record))
    # MLflow takes the model's own input, the feature vector (it has no feature step), as the
    # DataFrame its signature names; Flywheel takes the raw record and builds the features.
    body_df = home / "mlflow-dataframe.json"
    body_df.write_text(json.dumps({"dataframe_split": {"columns": COLUMNS, "data": [vector]}}))
    tracking = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{home / '.flywheel' / 'mlflow.db'}"}
    throughput_config = home / "flywheel-throughput.yaml"
    servers: dict[str, tuple[Server, str, Path]] = {}
    try:
        for label, model in ((ANCHOR, "models:/sba-loans/1"), (LGB, "models:/sba-loans-lightgbm/1"),
                             (FASTEST, "models:/sba-loans-lightgbm-unsigned/1")):
            port = free_port()
            srv = Server([str(BIN / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local",
                          "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], tracking,
                         f"http://127.0.0.1:{port}/ping")
            url = f"http://127.0.0.1:{port}/invocations"
            check = httpx.post(url, content=body_df.read_text(), headers={"content-type": "application/json"})
            assert check.status_code == 200, check.text
            servers[label] = (srv, url, body_df)
        # Each server logs to a state database of its own: a paused server's sink must not hold
        # a lock or an old snapshot (which stops checkpoints) of the database being measured.
        flywheels: list[tuple[str, dict[str, str]]] = [
            (SINK0, {"FLYWHEEL_STORES__STATE": f"sqlite:///{home / 'state-sink0.db'}"}),
            (SINK1, {"FLYWHEEL_STORES__STATE": f"sqlite:///{home / 'state-sink1.db'}",
                     "FLYWHEEL_LOG_SINK_CPUS": "1"})]
        pg = postgres_database()
        if pg:  # the production path: the database server does the inserts, the sink only COPYs
            flywheels.append((SINKPG, {"FLYWHEEL_STORES__STATE": pg}))
        if args.baseline:  # the same two setups served by the other source tree
            base = {"PYTHONPATH": str(args.baseline.resolve())}
            flywheels += [
                (BASE0, {**base, "FLYWHEEL_STORES__STATE": f"sqlite:///{home / 'state-base0.db'}"}),
                (BASE1, {**base, "FLYWHEEL_STORES__STATE": f"sqlite:///{home / 'state-base1.db'}",
                         "FLYWHEEL_LOG_SINK_CPUS": "1"})]
        for label, extra in flywheels:
            port = free_port()
            srv = Server([str(BIN / "flywheel"), "serve", "--config", str(throughput_config), "--port",
                          str(port)], {**env, **extra}, f"http://127.0.0.1:{port}/ready")
            servers[label] = (srv, f"http://127.0.0.1:{port}/v1/predict", body_fw)
        if args.tasks:
            for label, name in ((REGRESSION, "flights"), (MULTICLASS, "bikeshare")):
                task_config, task_env, task_body = task_project(home, name)
                port = free_port()
                srv = Server([str(BIN / "flywheel"), "serve", "--config", str(task_config), "--port",
                              str(port)], task_env, f"http://127.0.0.1:{port}/ready")
                servers[label] = (srv, f"http://127.0.0.1:{port}/v1/predict", task_body)
        port = free_port()
        floor = Server([str(BIN / "uvicorn"), "floor_app:app", "--port", str(port), "--loop", "uvloop",
                        "--http", "httptools", "--no-access-log", "--log-level", "warning"],
                       env, None, cwd=REPO / "benchmarks", port=port)
        servers[FLOOR] = (floor, f"http://127.0.0.1:{port}/v1/predict", body_fw)
        rounds = measure(servers, args.seconds, args.rounds)
    finally:
        for srv, _, _ in servers.values():
            srv.stop()
    report(rounds, args.seconds)
    hot_swap(config, env, body_fw)
    logging_run(config, env, record, home)
    print(f"\n(work folder: {home})")


def task_project(home: Path, name: str) -> tuple[Path, dict[str, str], Path]:
    """An example project (flights: regression, bikeshare: multiclass) trained on its committed
    sample's history; its config, environment and a one-record body from the later rows."""
    folder = home / name
    folder.mkdir()
    config = folder / "flywheel.yaml"
    shutil.copy(REPO / "examples" / name / "flywheel.yaml", config)
    env = {**os.environ, "FLYWHEEL_HOME": str(folder / ".flywheel"), "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    sample = REPO / "tests" / "fixtures" / ("flights_sample.parquet" if name == "flights"
                                            else "bikeshare.parquet")
    frame = pd.read_parquet(sample)
    cfg = yaml.safe_load(config.read_text())
    time_col, end = cfg["data"]["time_column"], pd.Timestamp(cfg["data"]["window"]["end"])
    history = folder / "history.parquet"
    frame[frame[time_col] < end].to_parquet(history)
    for args in (("ingest", "--input", str(history)), ("train",)):
        subprocess.run([str(BIN / "flywheel"), *args, "--config", str(config)], env=env, check=True,
                       capture_output=True)
    sys.path.insert(0, str(REPO / "src"))
    from flywheel.config import load_project
    from flywheel.data.features import input_columns

    inputs = input_columns(load_project(config, env=env).config.features)
    row = frame[frame[time_col] >= end].iloc[5]
    body = folder / "record.json"
    body.write_text(json.dumps({c: (None if pd.isna(row[c]) else row[c].item() if hasattr(row[c], "item")
                                    else row[c]) for c in inputs}))
    return config, env, body


def postgres_database() -> str | None:
    """A fresh database on the local PostgreSQL server (127.0.0.1:5432), or None without one."""
    import sqlalchemy as sa

    name = f"flywheel_bench_{os.getpid()}_{int(time.time())}"
    try:
        admin = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                                 isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        print(f"no PostgreSQL on 127.0.0.1:5432 ({exc.orig}); the PostgreSQL row is left out")
        return None
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def measure(servers: dict[str, tuple[Server, str, Path]], seconds: int, n_rounds: int
            ) -> list[dict[str, dict[str, float]]]:
    names = list(servers)
    rounds = []
    for srv, _, _ in servers.values():
        srv.pause()
    for r in range(n_rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        result: dict[str, dict[str, float]] = {}
        for name in order:
            srv, url, body = servers[name]
            srv.resume()
            time.sleep(1)  # let it catch up on what its timers missed while paused
            result[name] = wrk(url, body, seconds)
            if name in (SINK0, SINK1, SINKPG, BASE0, BASE1, REGRESSION, MULTICLASS):
                depth = re.search(r"^flywheel_prediction_log_queue_depth (\S+)",
                                  httpx.get(url.replace("/v1/predict", "/metrics")).text, re.M)
                # A large backlog would mean the log sink did not keep up: the buffer flattered the run.
                result[name]["log_backlog"] = float(depth.group(1)) if depth else float("nan")
                time.sleep(1)  # the sink writes its last frames before the server is paused
            srv.pause()
        print(f"round {r + 1}: " + ", ".join(f"{n.split(':')[0].split(',')[0]} "
                                               f"{result[n]['rps']:.0f}/s p99 {result[n]['p99_ms']:.2f}"
                                               for n in names), flush=True)
        rounds.append(result)
    return rounds


def report(rounds: list[dict[str, dict[str, float]]], seconds: int) -> None:
    def med(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    def ratio(name: str, over: str) -> float:
        return statistics.median(r[name]["rps"] / r[over]["rps"] for r in rounds)

    print(f"\nOne worker on CPU 0, wrk -t1 -c8 on CPU 1, {seconds} s per server per round, "
          f"{len(rounds)} interleaved rounds; medians. x anchor = vs MLflow serving the same "
          "registered version; x lgb = vs the booster logged the usual way; x fastest = vs the "
          "booster without a signature.")
    print(f"{'server':42} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'p99 max':>7} {'x anchor':>8} "
          f"{'x lgb':>6} {'x fastest':>9} {'% floor':>8} {'errors':>6} {'backlog':>7}")
    for name in rounds[0]:
        errors = sum(r[name]["non2xx"] + r[name]["socket_errors"] for r in rounds)
        backlog = (f"{max(r[name]['log_backlog'] for r in rounds):7.0f}" if "log_backlog" in rounds[0][name]
                   else f"{'-':>7}")
        print(f"{name:42} {med(name, 'rps'):7.0f} {med(name, 'p50_ms'):7.2f} {med(name, 'p99_ms'):7.2f} "
              f"{max(r[name]['p99_ms'] for r in rounds):7.2f} {ratio(name, ANCHOR):8.1f} "
              f"{ratio(name, LGB):6.1f} {ratio(name, FASTEST):9.1f} {100 * ratio(name, FLOOR):7.1f}% "
              f"{errors:6.0f} {backlog}")
    for task in (REGRESSION, MULTICLASS):
        if task in rounds[0]:
            rps = statistics.median(r[task]["rps"] / r[SINK0]["rps"] for r in rounds)
            p99 = statistics.median(r[task]["p99_ms"] / r[SINK0]["p99_ms"] for r in rounds)
            print(f"{task.split(', ')[-1]} / binary (log sink on CPU 0): req/s x{rps:.3f}, p99 x{p99:.3f}")
    for now, before in ((SINK0, BASE0), (SINK1, BASE1)):
        if before in rounds[0]:
            rps = statistics.median(r[now]["rps"] / r[before]["rps"] for r in rounds)
            p99 = statistics.median(r[now]["p99_ms"] / r[before]["p99_ms"] for r in rounds)
            print(f"this tree / baseline tree ({now.split(', ')[-1]}): req/s x{rps:.3f}, "
                  f"p99 x{p99:.3f} (medians of per-round ratios)")


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
    from flywheel.lifecycle.aliases import promote

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
