"""The closed loop end to end: real server, prediction log, monitoring, pipeline, alerts, Prefect.

A weak first champion (2 trees on FY1995-2001) serves FY2002-2006 traffic from the committed
sample; labels come back as feedback; monitoring finds the drift; the pipeline retrains on the
newer data, a strict gate refuses, a normal gate promotes and the server hot-swaps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import date
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from flywheel.config import MonitorWindow, Project, load_project
from flywheel.data import features as feats
from flywheel.data.sources import extract_window
from flywheel.demo.replay import feed_labels, records_of, send_quarter, wait_for_log
from flywheel.lifecycle.train import train_challenger
from flywheel.monitoring.monitor import run_monitor
from flywheel.pipeline.orchestrate import orchestrate
from flywheel.pipeline.prefect_flow import flow_run_states
from flywheel.pipeline.runs import list_runs
from flywheel.registry import CHAMPION, Registry
from flywheel.serving.process import ServerProcess, free_port
from flywheel.state.db import open_state
from flywheel.state.logread import read_log
from flywheel.state.verdicts import latest_verdict

WEAK = {"model": {"params": {"num_boost_round": 2}}, "gate": {"floor": 0.5}}
RETRAIN_AT = date(2006, 10, 1)


class Receiver:
    """A local stand-in for Slack's incoming webhook: records every JSON body posted to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers["content-length"])
                outer.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.http = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/services/T/B/X"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def titles(self) -> list[str]:
        return [b["text"] for b in self.bodies]


@pytest.fixture
def slack(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    receiver = Receiver()
    monkeypatch.setenv("FLYWHEEL_SLACK_WEBHOOK", receiver.url)
    yield receiver
    receiver.http.shutdown()


def with_env(project: Project, **overrides: str) -> Project:
    """The same project folder with FLYWHEEL_* overrides (another gate, another orchestrator)."""
    env = {"FLYWHEEL_HOME": str(project.home), **{f"FLYWHEEL_{k}": v for k, v in overrides.items()}}
    return load_project(project.path, env=env)


def send_traffic(project: Project, url: str, start: date, end: date, feedback: bool = True) -> int:
    data = project.config.data
    inputs = feats.input_columns(project.config.features)
    frame = extract_window(project.source_url, data, inputs, project.snapshot_dir,
                           window=(start, end), as_of=date(2200, 1, 1)).frame()
    with httpx.Client(timeout=60) as client:
        ids, refused = send_quarter(client, url, records_of(frame, inputs, data.id_column,
                                                                    data.time_column))
        assert refused < len(frame) * 0.05
        if feedback:
            assert feed_labels(client, url, frame, ids, data.id_column) == len(ids)
    wait_for_log(open_state(project.state_url), project.config.registered_model, len(ids))
    return len(ids)


def test_monitor_then_a_strict_gate_refuses_and_a_normal_gate_promotes_and_the_server_swaps(
        loaded_project, slack):
    project = loaded_project(WEAK)
    assert train_challenger(project).promoted
    registry = Registry.for_project(project)
    server = ServerProcess(project, env={"FLYWHEEL_SERVING__RELOAD_INTERVAL_S": "0.3"})
    try:
        server.wait_ready()
        sent = send_traffic(project, server.url, date(2002, 1, 1), date(2006, 10, 1))

        verdict = run_monitor(project, window=MonitorWindow(by="count", size=sent), report=True)
        assert verdict.drift.rows == sent and verdict.model_version == 1
        assert "gr_appv" in verdict.drift.drifted_columns  # loan sizes moved after 2001
        assert verdict.performance is not None and verdict.performance.rows >= 500
        stored = latest_verdict(open_state(project.state_url), "sba-loans")
        assert stored["id"] == verdict.id and len(stored["columns"]) == len(verdict.drift.columns)
        assert verdict.report_path.is_file() and (verdict.report_path.parent / "report.json").is_file()
        logged = registry.client.list_artifacts(verdict.mlflow_run_id, "evidently")
        assert {Path(a.path).name for a in logged} == {"report.html", "report.json"}
        metrics = httpx.get(f"{server.url}/metrics").text
        assert f'flywheel_drift_share{{model_version="1"}} {verdict.drift.share}' in metrics
        assert 'flywheel_feature_drifted{feature="gr_appv"} 1' in metrics
        # the sample's validation slice holds too few charge-offs to calibrate on: no estimate,
        # and the verdict, the stored run and the summary say why instead of giving a number
        estimated = verdict.estimate
        assert estimated is not None and estimated.metric == "roc_auc" and estimated.value is None
        assert "could not be calibrated" in estimated.reason and "positive" in estimated.reason
        assert stored["estimate_note"] == estimated.reason and stored["estimated_value"] is None
        assert "estimated roc_auc: none (" in verdict.summary()
        assert "flywheel_window_estimated_metric" not in metrics

        strict = orchestrate(with_env(project, GATE__MIN_IMPROVEMENT="0.5"), "drift",
                             verdict.summary(), RETRAIN_AT, "local")
        assert strict.status == "succeeded" and not strict.promoted
        assert strict.outputs["promote"]["reason"].startswith("gate failed")
        assert registry.alias_version(CHAMPION) == 1

        normal = orchestrate(with_env(project, MODEL__PARAMS="{num_boost_round: 60}"), "drift",
                             verdict.summary(), RETRAIN_AT, "local")
        assert normal.status == "succeeded" and normal.promoted, normal.outputs.get("evaluate")
        assert normal.outputs["extract"]["window_end"] == "2006-10-01"
        assert registry.alias_version(CHAMPION) == normal.version == 3
        server.wait_for_version(3)
        r = httpx.post(f"{server.url}/v1/predict", json=records_of(
            extract_window(project.source_url, project.config.data,
                           feats.input_columns(project.config.features), project.snapshot_dir,
                           window=(date(2006, 10, 1), date(2007, 1, 1)), as_of=date(2200, 1, 1))
            .frame().head(3), feats.input_columns(project.config.features), "loan_nr", "approval_date"))
        assert r.status_code == 200 and r.json()["version"] == 3
    finally:
        assert server.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a clean shutdown
    assert any("champion unchanged" in t for t in slack.titles())
    assert any("v3 promoted to champion" in t for t in slack.titles())


def test_a_failed_step_alerts_and_the_run_is_recorded_as_failed(loaded_project, slack):
    project = loaded_project(WEAK)
    train_challenger(project)
    run = orchestrate(project, "schedule", "test", date(1980, 1, 1), "local")  # no rows back then
    assert run.status == "failed" and run.step == "extract" and "nothing to retrain on" in run.error
    [alert] = [b for b in slack.bodies if "failed" in b["text"]]
    assert "extract" in alert["text"] and run.id in json.dumps(alert)


def test_prefect_flow_runs_the_same_steps_and_keeps_its_state_under_the_project(loaded_project):
    project = loaded_project({**WEAK, "retraining": {"orchestrator": "prefect"}})
    train_challenger(project)
    env = {**os.environ, "FLYWHEEL_HOME": str(project.home)}
    env.pop("PREFECT_HOME", None)
    done = subprocess.run([sys.executable, "-m", "flywheel.cli", "retrain", "--config", str(project.path),
                           "--at", RETRAIN_AT.isoformat(), "--trigger", "schedule"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    [flow_run] = flow_run_states(project)
    assert flow_run["state_type"] == "COMPLETED" and flow_run["name"] == f"schedule-{RETRAIN_AT}"
    [run] = list_runs(project)
    assert run.status == "succeeded" and run.trigger == "schedule"
    assert list(run.outputs) == ["clock", "pid", "host", "timings", "extract", "features", "train",
                                 "evaluate", "promote", "alert"]
    assert list(run.outputs["timings"]) == ["extract", "features", "train", "evaluate", "promote", "alert"]
    assert (project.home / "prefect" / "prefect.db").is_file()


# A one-second timer whose only trigger is the schedule.
ON_A_TIMER = {**WEAK, "monitoring": {"evidently_report": False}, "retraining": {
    "orchestrator": "local", "check_interval_s": 1,
    "triggers": {"drift": False, "performance_drop": False, "schedule_days": 30, "min_days_between": 0}}}


def test_flywheel_run_serves_monitors_and_triggers_on_its_timer(loaded_project, slack):
    project = loaded_project(ON_A_TIMER)
    train_challenger(project)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FLYWHEEL_HOME": str(project.home), "FLYWHEEL_SERVING__PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "run", "--config", str(project.path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: _ready(url), 120)
        send_traffic(project, url, date(2002, 1, 1), date(2003, 1, 1))
        wait_until(lambda: bool(list_runs(project)), 120)
        run = list_runs(project)[0]
        assert run.trigger == "schedule"
        # the wall clock is 2026: the sample has no loans with known labels in the last six years,
        # so the run fails at extract, alerts, and the server goes on serving
        wait_until(lambda: list_runs(project)[0].status == "failed", 60)
        assert "nothing to retrain on" in list_runs(project)[0].error
        assert latest_verdict(open_state(project.state_url), "sba-loans") is not None
        assert httpx.get(f"{url}/ready").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "monitor:" in out and "trigger schedule" in out
    assert any("failed" in t for t in slack.titles())


def test_flywheel_run_no_serve_is_the_pipeline_runner_alone(loaded_project, slack):
    """Beside servers deployed on their own (compose replicas, a Kubernetes Deployment)."""
    project = loaded_project(ON_A_TIMER)
    train_challenger(project)
    port = free_port()
    env = {**os.environ, "FLYWHEEL_HOME": str(project.home), "FLYWHEEL_SERVING__PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "run", "--no-serve", "--config",
                             str(project.path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_until(lambda: bool(list_runs(project)), 120)
        assert list_runs(project)[0].trigger == "schedule"
        assert not _ready(f"http://127.0.0.1:{port}")  # nothing serves
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "not serving; checking triggers every 1s" in " ".join(out.split()), out

    once = subprocess.run([sys.executable, "-m", "flywheel.cli", "run", "--once", "--config",
                           str(project.path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert once.returncode == 0, once.stdout + once.stderr
    assert "monitor:" in once.stdout + once.stderr  # one check ran, then the command exited
    assert not _ready(f"http://127.0.0.1:{port}")


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s")
        time.sleep(0.3)


def test_new_labelled_rows_are_counted_past_the_watermark(loaded_project, sba_sample):
    from flywheel.pipeline.runs import get_watermark, set_watermark
    from flywheel.pipeline.steps import labelled_rows_since

    project = loaded_project(WEAK)
    assert get_watermark(project) is None
    at = date(2006, 10, 1)
    everything = labelled_rows_since(project, None, at)  # approvals before 2004-10-01
    approved = sba_sample["approval_date"]
    assert everything == int((approved < date(2004, 10, 1)).sum())
    set_watermark(project, date(2005, 10, 1))  # labels known up to there were trained on
    assert get_watermark(project) == date(2005, 10, 1)
    new = labelled_rows_since(project, get_watermark(project), at)
    assert new == int(((approved >= date(2003, 10, 1)) & (approved < date(2004, 10, 1))).sum()) > 0


def test_without_feedback_performance_comes_from_labels_the_source_db_knows_by_then(loaded_project):
    from datetime import UTC, datetime

    from sklearn.metrics import roc_auc_score

    project = loaded_project({**WEAK, "monitoring": {"evidently_report": False}})
    train_challenger(project)
    with ServerProcess(project) as server:
        server.wait_ready()
        sent = send_traffic(project, server.url, date(2002, 1, 1), date(2004, 1, 1), feedback=False)
    window = MonitorWindow(by="count", size=sent)
    early = run_monitor(project, window=window, at=datetime(2003, 6, 1, tzinfo=UTC))
    assert early.performance is None  # approved 2002-2003: no 24-month label known in mid-2003
    late = run_monitor(project, window=window, at=datetime(2006, 6, 1, tzinfo=UTC))
    assert late.performance is not None
    assert late.performance.rows == min(sent, project.config.monitoring.performance_rows)
    # the same AUC computed by hand from the log and the source's labels
    frame = extract_window(project.source_url, project.config.data, ["loan_nr"], project.snapshot_dir,
                           window=(date(2002, 1, 1), date(2004, 1, 1)), as_of=date(2006, 6, 1)).frame()
    with open_state(project.state_url).connect() as conn:
        logged = read_log(conn, project.config.registered_model, last=late.performance.rows)
    truth = dict(zip(frame["loan_nr"].astype(str), frame["__target__"], strict=True))
    y = [truth[entity] for entity in logged.meta_values("entity_id")]
    assert late.performance.roc_auc == pytest.approx(roc_auc_score(y, logged.base["probability"]))
