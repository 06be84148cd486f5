"""The compose stack's observability, checked for real: the alert rules by `promtool test rules`,
the Prometheus config by `promtool check config`, and every query of the Grafana dashboard run
against a real Prometheus server that scrapes a real Flywheel server (traffic, labels, a
monitoring verdict, a pipeline run). Grafana itself cannot run here (no image can be pulled);
what it would draw is what these queries return.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import httpx
import pytest
import yaml

from flywheel.config import load_project
from flywheel.lifecycle.train import train_challenger
from flywheel.monitoring.monitor import run_monitor
from flywheel.pipeline.runs import list_runs
from flywheel.serving.process import ServerProcess, free_port
from tests.conftest import REPO
from tests.pipeline.test_loop import WEAK, send_traffic
from tests.pipeline.test_loop import wait_until as _wait_until

PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "flywheel.json"

pytestmark = pytest.mark.slow


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        done = subprocess.run([str(REPO / "scripts" / "ensure-docker.sh")], capture_output=True, text=True,
                              timeout=900)
        found = shutil.which(name)
        assert found is not None, f"{name} not installed: {done.stderr[-2000:]}"
    return found


def test_alert_rules_pass_their_unit_tests_and_the_config_is_valid():
    done = subprocess.run([tool("promtool"), "test", "rules", "flywheel.rules.test.yml"], cwd=PROMETHEUS,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    done = subprocess.run([tool("promtool"), "check", "config", "prometheus.yml"], cwd=PROMETHEUS,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "9 rules found" in done.stdout, done.stdout + done.stderr


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


def test_every_dashboard_query_returns_data_from_a_real_prometheus(loaded_project, tmp_path):
    project = loaded_project({**WEAK, "monitoring": {"evidently_report": False, "min_labelled": 10,
                                                     "performance_rows": 50, "min_positives": 1}})
    assert train_challenger(project).promoted
    # A failed pipeline run (the wall clock is years past the sample: nothing to retrain on).
    subprocess.run([sys.executable, "-m", "flywheel.cli", "retrain", "--config", str(project.path)],
                   env={**os.environ, "FLYWHEEL_HOME": str(project.home)}, capture_output=True, timeout=300)
    assert list_runs(project) and list_runs(project)[-1].status == "failed"
    with ServerProcess(project, workers=2) as server:
        server.wait_ready()
        sent = send_traffic(project, server.url, date(2002, 1, 1), date(2003, 1, 1))
        run_monitor(project, report=False)
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 2s, scrape_timeout: 2s, evaluation_interval: 2s}\n"
            f"rule_files: [{PROMETHEUS / 'flywheel.rules.yml'}]\n"
            "scrape_configs:\n  - job_name: flywheel\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n")
        prometheus = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        api = f"http://127.0.0.1:{port}/api/v1"
        try:
            _wait_until(lambda: _up(api), 60)
            # traffic while Prometheus scrapes (a month at a time), until the last 30 s hold several
            # good scrapes: rates over them have data
            # (the months of 2003 again and again: a later month may hold categories or empties
            # the model refuses, which is not what this test is about)
            months = [date(2003, m, 1) for m in range(1, 13)] + [date(2004, 1, 1)]
            deadline = time.monotonic() + 300
            while _scrapes(api) < 6:
                for start, end in zip(months, months[1:], strict=False):
                    send_traffic(project, server.url, start, end, feedback=False)
                    if _scrapes(api) >= 6:
                        break
                assert time.monotonic() < deadline, "Prometheus does not scrape the server"
            empty = []
            for title, expr in dashboard_queries():
                query = expr.replace("$__rate_interval", "30s")
                result = httpx.get(f"{api}/query", params={"query": query}, timeout=10).json()
                assert result["status"] == "success", (title, query, result)
                if not result["data"]["result"]:
                    empty.append((title, query))
            assert empty == [], empty
            rules = httpx.get(f"{api}/rules", timeout=10).json()["data"]["groups"]
            assert sum(len(g["rules"]) for g in rules) == 9
            assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
            # the failed run is already an alert (the rule has no `for`)
            _wait_until(lambda: "FlywheelPipelineRunFailed" in _firing(api), 30)
        finally:
            prometheus.terminate()
            prometheus.wait(30)
    assert sent > 0


def _scrapes(api: str) -> float:
    result = httpx.get(f"{api}/query", params={"query": "sum_over_time(up[30s])"}, timeout=10).json()
    return float(result["data"]["result"][0]["value"][1]) if result["data"]["result"] else 0.0


def _up(api: str) -> bool:
    try:
        result = httpx.get(f"{api}/query", params={"query": "up"}, timeout=2).json()["data"]["result"]
    except (httpx.HTTPError, KeyError, ValueError):
        return False
    return bool(result) and result[0]["value"][1] == "1"


def _firing(api: str) -> set[str]:
    alerts = httpx.get(f"{api}/alerts", timeout=10).json()["data"]["alerts"]
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def test_the_dashboard_covers_what_operators_watch():
    exprs = " ".join(e for _, e in dashboard_queries())
    for metric in ("flywheel_predictions_total", "flywheel_request_latency_seconds_bucket",
                   "flywheel_prediction_log_dropped_total", "flywheel_model_version",
                   "flywheel_feature_drift_score", "flywheel_window_metric", "flywheel_pipeline_runs_total"):
        assert metric in exprs, metric
    assert re.search(r"histogram_quantile\(0\.99", exprs)


def test_compose_file_is_valid_and_its_overrides_are_real_config_fields(tmp_path):
    """Secrets reach the containers as files (NAME_FILE), never as environment variables: the
    stack's config holds no password, and the secret files the script writes load as the config's
    stores."""
    deploy = tmp_path / "deploy"
    shutil.copytree(REPO / "deploy", deploy, ignore=shutil.ignore_patterns("secrets"))
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "compose-secrets.sh", tmp_path / "scripts")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin"}
    made = subprocess.run(["bash", str(tmp_path / "scripts" / "compose-secrets.sh")], capture_output=True,
                          text=True, env=env, timeout=60)
    assert made.returncode == 0, made.stderr
    done = subprocess.run([tool("docker-compose"), "-f", str(deploy / "compose.yaml"), "config"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    stack = yaml.safe_load(done.stdout)
    services = stack["services"]
    assert set(services) == {"postgres", "mlflow", "api", "runner", "prometheus", "grafana"}
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["runner"]["command"][:2] == ["run", "--no-serve"]
    assert "--serve-artifacts" in services["mlflow"]["command"][0]
    secrets = deploy / "secrets"
    password = (secrets / "db-password").read_text()
    assert password not in done.stdout  # no secret in any container's environment or command
    assert oct((secrets).stat().st_mode)[-3:] == "700"
    for name, service in services.items():
        for key in service.get("environment") or {}:
            assert not any(word in key for word in ("PASSWORD", "TOKEN", "WEBHOOK")) \
                or key.endswith("_FILE"), (name, key)
    # the FLYWHEEL_* overrides load against the example project's config, read from the files
    overrides = {k: str(secrets / Path(v).name) for k, v in services["api"]["environment"].items()
                 if k.startswith("FLYWHEEL_STORES") and k.endswith("_FILE")}
    overrides["FLYWHEEL_STORES__TRACKING"] = services["api"]["environment"]["FLYWHEEL_STORES__TRACKING"]
    project = load_project(REPO / "examples" / "sba-loans" / "flywheel.yaml",
                           env={**overrides, "FLYWHEEL_HOME": str(tmp_path)})
    assert project.tracking_url == "http://mlflow:5000"
    assert project.state_url == f"postgresql://flywheel:{password}@postgres:5432/flywheel"
    again = subprocess.run(["bash", str(tmp_path / "scripts" / "compose-secrets.sh")], capture_output=True,
                           text=True, env=env, timeout=60)
    assert again.returncode == 0 and (secrets / "db-password").read_text() == password  # kept
