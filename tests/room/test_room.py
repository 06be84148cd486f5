"""The control room as a person uses it: Debian's Chromium (headless, driven by Playwright) on a
project with real history: a champion trained, traffic served and labelled, two monitoring
windows, a retrain that promoted, one the gate refused, more traffic on the new champion.

Screenshots land in `test-artifacts/room/` at the repository root (look at them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import sqlalchemy as sa

from flywheel.config import MonitorWindow, Project, load_project
from flywheel.data import features as feats
from flywheel.data.sources import extract_window
from flywheel.demo.replay import BATCH, feed_labels, records_of, wait_for_log
from flywheel.lifecycle.train import train_challenger
from flywheel.monitoring.monitor import run_monitor
from flywheel.pipeline.orchestrate import orchestrate
from flywheel.registry import CHALLENGER, CHAMPION, Registry
from flywheel.serving.process import ServerProcess, free_port
from flywheel.state.db import open_state, traffic_minutes
from tests.conftest import load_sample, new_project

pytestmark = pytest.mark.xdist_group("room-test_room")

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-artifacts" / "room"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ADMIN, VIEWER = "admin-secret-1", "viewer-secret-1"
WEAK = {"model": {"params": {"num_boost_round": 2}}, "gate": {"floor": 0.5}}
INVALID = 3  # requests the server refuses (422), besides the sample's bad records


@dataclass
class History:
    project: Project
    server: ServerProcess
    sent_requests: int  # to /v1/predict, refused ones included
    refused_requests: int


def with_env(project: Project, **overrides: str) -> Project:
    env = {"FLYWHEEL_HOME": str(project.home), **{f"FLYWHEEL_{k}": v for k, v in overrides.items()}}
    return load_project(project.path, env=env)


def serve_quarters(project: Project, url: str, start: date, end: date) -> tuple[int, int]:
    """Send the loans approved in [start, end) in batches and their labels; the predict requests
    sent and how many of them the server refused (422: a record the sample holds bad values in)."""
    data = project.config.data
    inputs = feats.input_columns(project.config.features)
    frame = extract_window(project.source_url, data, inputs, project.snapshot_dir,
                           window=(start, end), as_of=date(2200, 1, 1)).frame()
    records = records_of(frame, inputs, data.id_column, data.time_column)
    ids: dict[str, str] = {}
    sent = refused = 0
    with httpx.Client(timeout=60) as client:
        for first in range(0, len(records), BATCH):
            batch = records[first:first + BATCH]
            while batch:
                r = client.post(f"{url}/v1/predict", json=batch)
                sent += 1
                if r.status_code == 200:
                    ids.update({rec["meta"]["entity_id"]: p["record_id"]
                                for rec, p in zip(batch, r.json()["predictions"], strict=True)})
                    break
                assert r.status_code == 422, r.text
                refused += 1
                bad = {e["loc"][1] for e in r.json()["detail"]}
                batch = [rec for i, rec in enumerate(batch) if i not in bad]
        feed_labels(client, url, frame, ids, data.id_column)
    wait_for_log(open_state(project.state_url), project.config.registered_model, len(ids))
    return sent, refused


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory, sba_sample: pd.DataFrame) -> Iterator[History]:
    project = load_sample(new_project(tmp_path_factory.mktemp("room") / "proj", WEAK), sba_sample)
    assert train_challenger(project).promoted
    server = ServerProcess(project, env={"FLYWHEEL_SERVING__RELOAD_INTERVAL_S": "0.3",
                                         "FLYWHEEL_ROOM__MOUNT_ON_SERVE": "true"})
    try:
        server.wait_ready()
        counts = [serve_quarters(project, server.url, date(2002, 1, 1), date(2004, 1, 1)),
                  serve_quarters(project, server.url, date(2004, 1, 1), date(2006, 10, 1))]
        for _ in range(INVALID):
            assert httpx.post(f"{server.url}/v1/predict", json=[{"no_such_field": 1}]).status_code == 422
        for start, end, report in ((date(2002, 1, 1), date(2004, 1, 1), False),
                                   (date(2004, 1, 1), date(2006, 10, 1), True)):
            run_monitor(project, window=MonitorWindow(by="event", start=start, end=end), report=report)
        promoted = orchestrate(with_env(project, MODEL__PARAMS="{num_boost_round: 60}"), "drift",
                               "drift in the latest window", date(2006, 10, 1), "local")
        assert promoted.promoted and promoted.version == 2
        refused = orchestrate(with_env(project, GATE__MIN_IMPROVEMENT="0.5"), "schedule",
                              "weekly", date(2006, 10, 1), "local")
        assert not refused.promoted and refused.version == 3
        server.wait_for_version(2)
        counts.append(serve_quarters(project, server.url, date(2006, 10, 1), date(2007, 1, 1)))
        sent, refused = sum(c[0] for c in counts) + INVALID, sum(c[1] for c in counts) + INVALID
        wait_for_rollups(project, sent)
        yield History(project, server, sent, refused)
    finally:
        server.stop()


def wait_for_rollups(project: Project, at_least: int, timeout: float = 30) -> None:
    """The workers add their per-minute counts every few seconds."""
    engine = open_state(project.state_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            n = conn.execute(sa.select(sa.func.sum(traffic_minutes.c.requests)).where(
                traffic_minutes.c.endpoint == "predict")).scalar() or 0
        if n >= at_least:
            return
        time.sleep(0.5)
    raise AssertionError(f"the traffic rollups count {n} predict requests, expected {at_least}")


class RoomProcess:
    """`flywheel room` in a subprocess."""

    def __init__(self, project: Project, host: str = "127.0.0.1", env: dict[str, str] | None = None,
                 serving_url: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = {k: v for k, v in os.environ.items() if k != "FLYWHEEL_VIEWER_TOKEN"}
        full.update({"FLYWHEEL_HOME": str(project.home), "FLYWHEEL_ADMIN_TOKEN": ADMIN, **(env or {})})
        if serving_url:
            full["FLYWHEEL_ROOM__SERVING_URL"] = serving_url
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flywheel.cli", "room", "--config", str(project.path), "--host", host,
             "--port", str(self.port)], env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait(self, timeout: float = 60) -> RoomProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read() if self.proc.stdout else ""
            try:
                httpx.get(f"{self.url}/api/served", timeout=2)
                return self
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError("the room did not answer")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # a request still waiting on a store that never answers
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def room(history: History) -> Iterator[RoomProcess]:
    r = RoomProcess(history.project, serving_url=history.server.url).wait()
    yield r
    r.stop()


def status_json(project: Project) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "flywheel.cli", "status", "--config", str(project.path),
                           "--json"], capture_output=True, text=True, env={
                               **os.environ, "FLYWHEEL_HOME": str(project.home)}, check=True)
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser: Any, url: str, width: int = 1280, height: int = 900) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    return page, errors


def test_every_section_shows_the_projects_history_with_drawn_charts(
        history: History, room: RoomProcess, browser: Any) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page, errors = open_page(browser, room.url + "/")
    models = page.locator("#models")
    assert "v2" in models.locator(".card").nth(0).inner_text()  # champion
    assert "v3" in models.locator(".card").nth(1).inner_text()  # challenger, refused by the gate
    assert "serving v2" in page.locator("#served").inner_text()
    same = page.locator("#same-holdout").inner_text()  # v3 and the champion it was gated against
    assert "v3" in same and "v2" in same and "roc_auc" in same
    moves = models.locator("table").last.inner_text()
    assert "— → v1" in moves and "v1 → v2" in moves  # the alias history, newest first
    assert page.locator("#traffic .pt").count() > 0
    assert page.locator("#traffic").inner_text().count("v2") >= 1
    assert page.locator("#drift .cell").count() >= 2 * 5  # two windows, every feature
    assert page.locator("#drift .verdict").count() == 2
    assert page.locator("#drift .bar").count() > 0
    assert page.locator("#drift a", has_text="report").count() == 1
    assert page.locator("#performance .pt").count() == 2
    assert page.locator("#performance .ref").count() >= 1  # v1's promise
    assert page.locator("#performance .mark").count() >= 3  # two retrains, the promotions
    pipelines = page.locator("#pipelines").inner_text()
    assert all(word in pipelines for word in ("drift", "schedule", "passed", "failed"))
    page.screenshot(path=str(SHOTS / "room-laptop.png"), full_page=True)
    assert errors == []

    phone, phone_errors = open_page(browser, room.url + "/", 390, 844)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390 + 1  # no sideways page
    phone.screenshot(path=str(SHOTS / "room-phone.png"), full_page=True)
    assert phone_errors == []

    report = page.context.request.get(room.url + page.locator("#drift a", has_text="report")
                                      .get_attribute("href").removeprefix(room.url))
    assert report.ok and "<html" in report.text().lower()
    window = (history.project.monitoring_dir / report.url.rsplit("/", 1)[1].zfill(6))
    snapshot = json.loads((window / "report.json").read_text())
    # the report carries the project's thresholds, not Evidently's defaults
    assert '"drift_share": 0.75' in json.dumps(snapshot) or "0.75" in report.text()


def test_model_cards_open_from_the_room_and_render_in_the_browser(history: History, room: RoomProcess,
                                                                  browser: Any, tmp_path: Path) -> None:
    page, errors = open_page(browser, room.url + "/")
    page.locator("#models .card").nth(0).get_by_text("model card").click()
    page.wait_for_load_state()
    assert page.url.endswith("/cards/2")
    text = page.locator("body").inner_text()
    for heading in ("Problem and target", "Data and lineage", "Features", "Leakage screen", "Holdout metrics",
                    "Feature importance", "Gate decision", "Monitoring", "Intended use and known limits"):
        assert heading in text, heading
    assert "Not monitored yet" in text  # v2 was promoted after the two windows
    images = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
    assert len(images) == 3 and all(images)  # calibration, ROC + precision-recall, importance
    page.screenshot(path=str(SHOTS / "model-card.png"), full_page=True)
    assert errors == []

    done = subprocess.run([sys.executable, "-m", "flywheel.cli", "card", "--config",
                           str(history.project.path), "--version", "1", "--output", str(tmp_path / "card")],
                          capture_output=True, text=True,
                          env={**os.environ, "FLYWHEEL_HOME": str(history.project.home)})
    assert done.returncode == 0, done.stdout + done.stderr
    card = (tmp_path / "card" / "model_card.md").read_text()
    assert "2 monitoring windows scored this version" in card  # v1 served both windows
    written = {p.name for p in (tmp_path / "card").iterdir()}
    assert written >= {"model_card.md", "model_card.html", "calibration.png", "roc_pr.png", "importance.png"}
    assert httpx.get(f"{room.url}/cards/99").status_code == 404


def test_traffic_counts_every_request_by_version_and_the_refusals(history: History,
                                                                   room: RoomProcess) -> None:
    day = httpx.get(f"{room.url}/api/traffic", params={"range": "day"}).json()
    totals = day["totals"]
    assert set(totals) >= {"1", "2"}
    assert sum(t["client_errors"] for t in totals.values()) == history.refused_requests
    assert sum(t["server_errors"] for t in totals.values()) == 0
    engine = open_state(history.project.state_url)
    with engine.connect() as conn:
        predicts = conn.execute(sa.select(sa.func.sum(traffic_minutes.c.requests)).where(
            traffic_minutes.c.endpoint == "predict")).scalar()
    assert predicts == history.sent_requests
    hour = httpx.get(f"{room.url}/api/traffic", params={"range": "hour"}).json()
    assert all(s["p99_ms"] >= s["p50_ms"] > 0 for s in hour["series"] if s["requests"])
    assert httpx.get(f"{room.url}/api/traffic", params={"range": "year"}).status_code == 422


def test_promote_refuses_without_the_admin_token_and_with_it_moves_champion_and_the_page_follows(
        history: History, room: RoomProcess, browser: Any) -> None:
    page, errors = open_page(browser, room.url + "/")
    page.on("dialog", lambda d: d.accept())
    page.locator("button[data-action=promote]").click()
    page.locator("#action-result.fail").wait_for()
    assert "refused (401)" in page.locator("#action-result").inner_text()
    assert status_json(history.project)["champion"]["version"] == 2

    page.fill("#admin-token", ADMIN)
    with page.expect_navigation(timeout=60_000):  # reloads once the server answers with v3
        page.locator("button[data-action=promote]").click()
    assert status_json(history.project)["champion"]["version"] == 3
    assert Registry.for_project(history.project).alias_version(CHAMPION) == 3
    assert "serving v3" in page.locator("#served").inner_text()
    assert "control room" in page.locator("#models table").last.inner_text()  # the move's reason
    page.screenshot(path=str(SHOTS / "room-after-promote.png"), full_page=True)
    # Chromium logs the refused request itself; nothing else went wrong
    assert len(errors) == 1 and "401" in errors[0], errors
    assert Registry.for_project(history.project).alias_version(CHALLENGER) == 3


def test_the_prediction_server_shows_the_room_at_room_when_enabled(history: History) -> None:
    page = httpx.get(f"{history.server.url}/room", follow_redirects=True)
    assert page.status_code == 200 and "Pipeline runs" in page.text
    assert "serving v" in page.text  # the worker's own version
    drift = httpx.get(f"{history.server.url}/room/api/drift").json()
    assert len(drift["windows"]) == 2
    assert httpx.post(f"{history.server.url}/room/api/rollback", json={}).status_code in (401, 403)


def test_a_store_that_does_not_answer_blanks_only_its_sections(history: History, browser: Any) -> None:
    """MLflow unreachable: the models section says so; traffic, drift and pipelines still show."""
    down = RoomProcess(history.project, env={"FLYWHEEL_STORES__TRACKING": "http://127.0.0.1:9/"}).wait()
    try:
        started = time.monotonic()
        page, _ = open_page(browser, down.url + "/")
        assert time.monotonic() - started < 15  # the sections that answer do not wait for it
        assert "could not be read" in page.locator("#models").inner_text()
        assert page.locator("#traffic .pt").count() > 0 and page.locator("#drift .cell").count() > 0
        assert "drift" in page.locator("#pipelines").inner_text()
        r = httpx.get(f"{down.url}/api/models", timeout=30)
        assert r.status_code == 503 and "models could not be read" in r.json()["detail"]
    finally:
        down.stop()


def test_reading_needs_the_viewer_token_beyond_localhost(history: History) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "flywheel.cli", "room", "--config", str(history.project.path), "--host",
         "0.0.0.0", "--port", str(free_port())], capture_output=True, text=True, timeout=60,
        env={k: v for k, v in {**os.environ, "FLYWHEEL_HOME": str(history.project.home)}.items()
             if k != "FLYWHEEL_VIEWER_TOKEN"})
    assert refused.returncode != 0 and "FLYWHEEL_VIEWER_TOKEN" in refused.stdout + refused.stderr

    guarded = RoomProcess(history.project, host="0.0.0.0", env={"FLYWHEEL_VIEWER_TOKEN": VIEWER})
    try:
        guarded.wait()
        assert httpx.get(f"{guarded.url}/").status_code == 401
        assert httpx.get(f"{guarded.url}/api/models").status_code == 401
        bearer = {"authorization": f"Bearer {VIEWER}"}
        assert httpx.get(f"{guarded.url}/api/models", headers=bearer).is_success
        with httpx.Client(follow_redirects=True) as client:  # ?token= once, then the cookie
            assert client.get(f"{guarded.url}/", params={"token": VIEWER}).status_code == 200
            assert client.get(f"{guarded.url}/api/drift").status_code == 200
        # actions need the admin token, not the viewer's
        r = httpx.post(f"{guarded.url}/api/rollback", json={}, headers=bearer)
        assert r.status_code == 401
    finally:
        guarded.stop()
