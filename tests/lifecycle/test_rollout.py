"""Shadow rollouts: the sequential test's declared error rate holds under repeated looks, a gated
challenger starts a rollout instead of being promoted, the log sink scores it on served traffic
into a table no log reader sees, and the daemon's check promotes or aborts on the evidence."""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import orjson
import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from flywheel.lifecycle.aliases import promote
from flywheel.lifecycle.rollout import check_rollout, confidence_sequence
from flywheel.lifecycle.status import project_status
from flywheel.lifecycle.train import train_challenger
from flywheel.registry import CHAMPION, Registry
from flywheel.serving.tabular import shadow
from flywheel.serving.tabular.app import create_app
from flywheel.serving.tabular.predlog import store_feedback
from flywheel.serving.tabular.runtime import load_version
from flywheel.serving.tabular.shadow import ShadowFeed, ShadowTarget
from flywheel.state import rollouts
from flywheel.state.db import open_state, predictions, shadow_predictions
from flywheel.state.logread import read_log
from tests.conftest import load_sample, new_project

pytestmark = pytest.mark.xdist_group("lifecycle-test_rollout")  # one module fixture, in order

WEAK = {"model": {"params": {"num_boost_round": 1}}, "gate": {"floor": 0.5},
        "rollout": {"mode": "shadow", "min_pairs": 50, "max_days": 30}}


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_the_confidence_sequence_keeps_its_false_promotion_rate_however_often_it_is_looked_at(alpha):
    """No difference between the versions, heavy-tailed per-record differences, a look after every
    50 labelled pairs up to 5,000: the share of sequences that ever claim the challenger better
    stays below the declared rate (a fixed-sample interval looked at 100 times would not)."""
    rng = np.random.default_rng(1)
    runs, looks = 400, range(50, 5_001, 50)
    false_claims = naive_claims = 0
    for _ in range(runs):
        d = rng.standard_t(3, 5_000) * 0.05
        false_claims += any(confidence_sequence(d[:t], alpha)[0] > 0 for t in looks)
        naive_claims += any(d[:t].mean() - 1.96 * d[:t].std(ddof=1) / np.sqrt(t) > 0 for t in looks)
    assert false_claims / runs <= alpha
    assert naive_claims / runs > 0.1  # what repeated looks do to a fixed-sample test


def test_a_real_difference_is_found():
    rng = np.random.default_rng(2)
    found = 0
    for _ in range(100):
        d = rng.normal(0.02, 0.1, 5_000)  # the challenger's loss lower by a fifth of the spread
        found += confidence_sequence(d, 0.05)[0] > 0
    assert found >= 90


@pytest.fixture(scope="module")
def shadowed(tmp_path_factory, sba_sample):
    """v1 champion; v2 (more trees) passes the gate and starts a shadow rollout instead."""
    project = load_sample(new_project(tmp_path_factory.mktemp("rollout") / "p", WEAK), sba_sample)
    assert train_challenger(project).promoted
    strong = project.model_copy(update={"config": project.config.model_copy(update={
        "model": project.config.model.model_copy(update={"params": {"num_boost_round": 8}})})})
    second = train_challenger(strong)
    assert not second.promoted and "shadow rollout" in second.promotion, second.promotion
    return project


def test_a_gated_challenger_starts_a_shadow_rollout_and_the_champion_stays(shadowed):
    engine = open_state(shadowed.state_url)
    running = rollouts.running(engine, shadowed.config.registered_model)
    assert running is not None and running.mode == "shadow"
    assert (running.champion_version, running.challenger_version) == (1, 2)
    assert Registry.for_project(shadowed).alias_version(CHAMPION) == 1
    st = project_status(shadowed)
    assert st.rollout is not None and st.rollout["status"] == "running"


def test_the_shadow_process_runs_at_idle_priority_and_the_sink_never_waits_for_it(shadowed, monkeypatch):
    """The sink forwards committed batches to the shadow process without blocking: with the shadow
    process stopped (a saturated core gives it no time), sends return at once and what does not
    fit is skipped and counted; the process itself runs under SCHED_IDLE."""
    monkeypatch.setattr(shadow, "MAX_PENDING_BYTES", 256 << 10)
    engine = open_state(shadowed.state_url)
    target = ShadowTarget(shadowed.tracking_url, str(shadowed.artifact_root), shadowed.config.project,
                          shadowed.config.registered_model)
    skipped: list[int] = []
    feed = ShadowFeed(shadowed.state_url, target.to_env(), on_skip=skipped.append)
    body = orjson.dumps([[f"r{i}", "q", 0, "m", 1, {"x": "y" * 200}, 0.5, 1, 1.0] for i in range(100)])
    try:
        feed.send(engine, [body])  # a shadow rollout runs: the process starts
        assert feed.proc is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and os.sched_getscheduler(feed.proc.pid) != os.SCHED_IDLE:
            time.sleep(0.05)
        assert os.sched_getscheduler(feed.proc.pid) == os.SCHED_IDLE
        os.kill(feed.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        for _ in range(200):  # ~5 MB: more than the pipe and the pending allowance hold
            feed.send(engine, [body])
        assert time.monotonic() - started < 5
        assert feed.skipped_frames > 0 and len(feed.pending) >= shadow.MAX_PENDING_BYTES
        assert sum(skipped) == feed.skipped_frames  # what flywheel_shadow_skipped_total counts
    finally:
        if feed.proc is not None:
            os.kill(feed.proc.pid, signal.SIGCONT)
        feed.close(wait_s=10)
    assert feed.proc is not None and feed.proc.returncode is not None  # stopped, one way or another


def test_the_sink_scores_the_challenger_and_no_reader_of_the_log_sees_it(shadowed, sba_sample):
    columns = load_version(Registry.for_project(shadowed), 1).spec.input_columns
    records = json.loads(sba_sample[columns].tail(300).to_json(orient="records"))  # NaN: null
    switch = sys.getswitchinterval()
    try:
        with TestClient(create_app(shadowed), base_url="http://testserver") as client:
            for start in range(0, len(records), 30):
                answer = client.post("/v1/predict", json=records[start:start + 30])
                assert answer.status_code == 200, answer.text
                assert answer.json()["version"] == 1  # the champion answers
    finally:
        gc.unfreeze()
        sys.setswitchinterval(switch)
    engine = open_state(shadowed.state_url)
    with engine.connect() as conn:
        logged = conn.execute(sa.select(predictions.c.record_id, predictions.c.model_version,
                                        predictions.c.probability)).all()
        shadow = conn.execute(sa.select(shadow_predictions.c.record_id, shadow_predictions.c.model_version,
                                        shadow_predictions.c.probability)).all()
        log = read_log(conn, shadowed.config.registered_model)
    assert len(logged) == len(records) and {v for _, v, _ in logged} == {1}
    assert len(log) == len(records)  # the log's reader: the champion's answers only
    assert len(shadow) == len(records) and {v for _, v, _ in shadow} == {2}
    assert {r for r, _, _ in shadow} == {r for r, _, _ in logged}  # the same records, paired
    champion = dict((r, p) for r, _, p in logged)
    assert any(abs(champion[r] - p) > 1e-6 for r, _, p in shadow)  # scored by another model

    # labels come back: where the two disagree, the truth sides with the challenger
    running = rollouts.running(engine, shadowed.config.registered_model)
    assert running is not None
    labels = [{"record_id": r, "label": int(p > champion[r])} for r, _, p in shadow]
    store_feedback(engine, labels)
    check = check_rollout(shadowed, running.started_at + timedelta(days=3))
    assert check is not None and check.evidence.pairs == len(records)
    before = check.evidence.estimated  # each version's ROC-AUC estimated from its own calibration
    assert before is not None and before["metric"] == "roc_auc" and before["rows"] == len(records)
    for side in ("champion", "challenger"):  # a value, or why there is none
        assert (before[side] is None) != (before[f"{side}_note"] is None), before
    assert check.decision == "promote", check.summary()
    assert Registry.for_project(shadowed).alias_version(CHAMPION) == 2
    ended = rollouts.history(engine, shadowed.config.registered_model, limit=1)[0]
    assert ended.status == "promoted" and ended.evidence and ended.evidence["pairs"] == len(records)
    assert check_rollout(shadowed, running.started_at + timedelta(days=4)) is None  # nothing runs


def test_a_segment_made_worse_aborts_a_rollout_that_is_better_on_average(shadowed):
    """The served records and their labels from the test above, shadow answers made for a new
    rollout: far better than the champion's for full-documentation loans (low_doc N), worse for the
    low-documentation ones (Y), a third as many."""
    from flywheel.config import SegmentConfig

    engine = open_state(shadowed.state_url)
    name = shadowed.config.registered_model
    champion = Registry.for_project(shadowed).alias_version(CHAMPION)
    with engine.connect() as conn:
        served = conn.execute(sa.text("SELECT p.record_id, p.id, f.label, p.probability FROM predictions p "
                                      "JOIN feedback f ON f.record_id = p.record_id")).all()
        log = read_log(conn, name, ids=sorted(i for _, i, _, _ in served), inputs=["low_doc"])
    low_doc = dict(zip(log.base["id"].astype(int), log.inputs["low_doc"], strict=True))
    assert len(served) >= 200 and {"N", "Y"} <= set(low_doc.values())  # both kinds, labelled
    started, _ = rollouts.start(engine, name, "shadow", champion, 3 - champion,
                                rollouts.history(engine, name, 1)[0].started_at, "segments")
    good = lambda y: 0.98 if y else 0.02  # noqa: E731
    # the champion's probability moved the wrong way: worse on every such record
    bad = lambda y, p: min(max(p + (-0.3 if y else 0.3), 0.01), 0.99)  # noqa: E731
    with engine.begin() as conn:
        rollouts.insert_shadow(conn, [
            {"rollout_id": started.id, "record_id": rid, "created_at": started.started_at,
             "model_version": 3 - champion, "probability": good(y) if low_doc[i] == "N" else bad(y, p),
             "value": None, "label": None, "scores": None} for rid, i, y, p in served])
    cfg = shadowed.config.model_copy(update={
        "segments": [SegmentConfig(name="low_doc", column="low_doc")],
        "rollout": shadowed.config.rollout.model_copy(update={"min_segment_pairs": 30})})
    check = check_rollout(shadowed.model_copy(update={"config": cfg}), started.started_at + timedelta(days=1))
    assert check is not None and check.decision == "abort", check.summary()
    assert check.evidence.low > 0  # better on average: without the guard rail, promoted
    assert "low_doc Y" in check.reason
    cells = {c["group"]: c for c in check.evidence.segments}
    assert cells["N"]["tested"] and cells["N"]["low"] > 0
    assert cells["Y"]["tested"] and cells["Y"]["high"] < 0
    assert Registry.for_project(shadowed).alias_version(CHAMPION) == champion


def test_an_undecided_rollout_ends_at_max_days_and_a_manual_promote_wins(shadowed):
    engine = open_state(shadowed.state_url)
    name = shadowed.config.registered_model
    champion = Registry.for_project(shadowed).alias_version(CHAMPION)
    other = 1 if champion == 2 else 2
    started, _ = rollouts.start(engine, name, "shadow", champion, other,
                                rollouts.history(engine, name, 1)[0].started_at, "test")
    check = check_rollout(shadowed, started.started_at + timedelta(days=31))
    assert check is not None and check.decision == "abort" and "max_days" in check.reason
    assert Registry.for_project(shadowed).alias_version(CHAMPION) == champion

    again, _ = rollouts.start(engine, name, "shadow", champion, other, started.started_at, "test")
    third, replaced = rollouts.start(engine, name, "shadow", champion, other, started.started_at, "new")
    assert [r.id for r in replaced] == [again.id]  # a new challenger replaces the running rollout
    promote(shadowed, other, reason="by hand")
    ended = rollouts.history(engine, name, 1)[0]
    assert ended.id == third.id and ended.status == "promoted" and "manual" in ended.reason


def test_the_room_shows_the_rollout_and_its_evidence(shadowed):
    from flywheel.room import data, page

    models = data.models(shadowed)
    html = page.models_section(models, {"version": 2}, None)
    rollout = models["rollout"]
    assert rollout is not None and f'rollout {rollout["id"]}: challenger' in html
    assert '<table id="rollout">' in html and "labelled pairs" in html and rollout["status"] in html


def test_a_canary_answers_its_share_of_entities_always_the_same_and_counts_its_labels(shadowed):
    """A canary rollout on the served project: each entity is answered by the version its hash
    sends it to, on every request; a request with several entities names the version of each
    prediction; the logged answers and their labels make the evidence."""
    from flywheel.serving.tabular.canary import BUCKETS, bucket

    engine = open_state(shadowed.state_url)
    name = shadowed.config.registered_model
    champion = Registry.for_project(shadowed).alias_version(CHAMPION)
    challenger = 3 - champion
    started, _ = rollouts.start(engine, name, "canary", champion, challenger,
                                rollouts.history(engine, name, 1)[0].started_at, "canary", share=0.3)
    cfg = shadowed.config.model_copy(update={"rollout": shadowed.config.rollout.model_copy(
        update={"mode": "canary", "canary_share": 0.3, "min_pairs": 20})})
    canary = shadowed.model_copy(update={"config": cfg})
    columns = load_version(Registry.for_project(shadowed), 1).spec.input_columns
    base = json.loads(sba_sample_row(columns))
    entities = [f"loan-{i}" for i in range(120)]
    routed = {e: challenger if bucket(e) < 0.3 * BUCKETS else champion for e in entities}
    answered: dict[str, set[int]] = {}
    record_version: dict[str, int] = {}
    switch = sys.getswitchinterval()
    try:
        with TestClient(create_app(canary), base_url="http://testserver") as client:
            for _ in range(2):
                for e in entities:
                    got = client.post("/v1/predict", json={**base, "meta": {"entity_id": e}}).json()
                    answered.setdefault(e, set()).add(got["version"])
                    record_version[got["predictions"][0]["record_id"]] = got["version"]
            mixed = client.post("/v1/predict", json=[{**base, "meta": {"entity_id": e}}
                                                     for e in entities[:20]]).json()
    finally:
        gc.unfreeze()
        sys.setswitchinterval(switch)
    assert all(answered[e] == {routed[e]} for e in entities)  # sticky, and where the hash says
    assert 0.15 < sum(v == challenger for v in routed.values()) / len(entities) < 0.45
    assert [p["version"] for p in mixed["predictions"]] == [routed[e] for e in entities[:20]]
    with engine.connect() as conn:
        logged = dict(conn.execute(sa.select(predictions.c.record_id, predictions.c.model_version)
                                   .where(predictions.c.record_id.in_(list(record_version)))).all())
    assert logged == record_version  # each answer logged with the version that gave it

    store_feedback(engine, [{"record_id": r, "label": int(v == challenger)} for r, v in logged.items()])
    check = check_rollout(canary, started.started_at + timedelta(days=1))
    assert check is not None and check.evidence.pairs == len(logged)
    # labels 1 exactly where the challenger answered: its log loss is the mean -log(p) there
    assert check.evidence.challenger_loss > 0 and check.evidence.champion_loss > 0
    # the guard rails' view: each version's requests from the traffic rollup (the mixed request
    # counts for the challenger), none failed; by whole minutes, so the champion's may include the
    # requests of the minute before the canary
    op = check.evidence.operation
    n_challenger = sum(v == challenger for v in routed.values())
    assert op["answers"] == 2 * n_challenger + 1 and op["error_rate"] == 0.0, op
    assert op["champion_answers"] >= 2 * (len(entities) - n_challenger) and op["p99_ms"] > 0, op
    rollouts.end(engine, started.id, rollouts.ABORTED, started.started_at, "test over")


def sba_sample_row(columns: list[str]) -> str:
    import pandas as pd

    frame = pd.read_parquet(Path(__file__).parents[1] / "fixtures" / "sba_sample.parquet")
    return frame[columns].iloc[[7]].to_json(orient="records")[1:-1]


@pytest.mark.parametrize("share", [0.1, 0.5])
def test_the_canary_test_keeps_its_error_rate_and_finds_a_real_difference(share):
    """The canary's weighted answers, simulated: with no difference between the versions, 300
    rollouts looked at every 200 answers up to 6,000 promote fewer than the declared 5%; with a
    challenger that knows what the champion does not, most find it within 20,000 answers."""
    from flywheel.lifecycle.rollout import canary_differences, confidence_sequence
    from flywheel.state.rollouts import Rollout

    rng = np.random.default_rng(3)
    ro = Rollout(1, "m", "canary", 1, 2, "running", None, None, "", None, share)  # type: ignore[arg-type]

    def differences(n: int, better: bool) -> np.ndarray:
        q = rng.choice([0.1, 0.5], n)  # each record's true chance; the champion answers the mean
        y = rng.random(n) < q
        by_challenger = rng.random(n) < share
        p = np.where(by_challenger & better, q, 0.3)
        rows = [{"model_version": 2 if c else 1, "probability": float(a), "value": None, "label": None,
                 "scores": None, "y": int(t), "y_value": None, "y_text": None}
                for c, a, t in zip(by_challenger, p, y, strict=True)]
        return canary_differences("binary", rows, ro)[4]

    looks = range(200, 6_001, 200)
    nulls = [differences(6_000, better=False) for _ in range(300)]
    false = sum(any(confidence_sequence(d[:t], 0.05)[0] > 0 for t in looks) for d in nulls)
    assert false / 300 <= 0.05
    assert abs(np.mean([d.mean() for d in nulls])) < 0.01  # the weighting is unbiased
    found = sum(confidence_sequence(differences(20_000, better=True), 0.05)[0] > 0 for _ in range(20))
    assert found >= 15


def _seen(**operation):
    from flywheel.lifecycle.rollout import Evidence

    return Evidence(50, "log_loss", 0.5, 0.4, 0.1, 0.05, 0.15, 0.05, 0.1, operation=operation)


@pytest.mark.parametrize(("operation", "verdict"), [
    ({"answers": 0, "failure": "could not load v2: no such file", "error_rate": None}, "cannot serve"),
    ({"answers": 400, "error_rate": 0.05, "failure": "v2 could not score: boom"}, "failed on 5.0%"),
    ({"answers": 400, "error_rate": 0.05, "champion_error_rate": 0.06}, None),  # no worse than the champion
    ({"answers": 50, "error_rate": 0.2}, None),  # too few answers to judge
    ({"answers": 400, "error_rate": 0.0, "p99_ms": 9.0, "champion_answers": 4000,
      "champion_p99_ms": 3.0}, "p99 latency is 9 ms"),
    ({"answers": 400, "error_rate": 0.0, "p99_ms": 4.0, "champion_answers": 4000,
      "champion_p99_ms": 3.0}, None),
])
def test_the_guard_rails_abort_on_failures_and_latency_whatever_the_losses_say(operation, verdict):
    from flywheel.config import RolloutConfig
    from flywheel.lifecycle.rollout import decide

    decision, reason = decide(_seen(**operation), RolloutConfig(min_pairs=20), days=1)
    if verdict is None:
        assert decision == "promote", reason  # the losses decide: the challenger is better
    else:
        assert decision == "abort" and verdict in reason, reason


def test_a_shadow_challenger_that_fails_is_aborted_by_the_next_check(shadowed):
    """The shadow process counts the records the challenger could not score with the rollout;
    the daemon's check reads them and aborts."""
    engine = open_state(shadowed.state_url)
    name = shadowed.config.registered_model
    champion = Registry.for_project(shadowed).alias_version(CHAMPION)
    started, _ = rollouts.start(engine, name, "shadow", champion, 3 - champion,
                                rollouts.history(engine, name, 1)[0].started_at, "shadow")
    rollouts.note_failure(engine, started.id, 150, "v2 could not score 150 records: out of memory")
    check = check_rollout(shadowed, started.started_at + timedelta(hours=1))
    assert check is not None and check.decision == "abort", check.summary()
    assert "failed on 100.0% of 150" in check.reason and "out of memory" in check.reason
    ended = rollouts.history(engine, name, 1)[0]
    assert ended.status == rollouts.ABORTED and ended.failed == 150
    assert Registry.for_project(shadowed).alias_version(CHAMPION) == champion


def test_rollouts_start_and_end_under_load_with_no_failed_request(shadowed):
    """A real server under steady load while a canary starts, answers its share, is aborted, and a
    shadow rollout starts and is aborted: every request is answered (200), by the champion or, while
    the canary runs, by the challenger."""
    import threading

    import httpx

    from flywheel.serving.process import ServerProcess

    engine = open_state(shadowed.state_url)
    name = shadowed.config.registered_model
    at = rollouts.history(engine, name, 1)[0].started_at  # the project's clock: any time will do
    rollouts.end_running(engine, name, rollouts.ABORTED, at, "test")
    registry = Registry.for_project(shadowed)
    champion = registry.alias_version(CHAMPION)
    challenger = 3 - champion
    body = json.loads(sba_sample_row(load_version(registry, 1).spec.input_columns))
    statuses: list[int] = []
    versions: set[int] = set()
    stop = threading.Event()

    def load(url: str) -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not stop.is_set():
                i += 1
                answer = client.post(url, json=[{**body, "meta": {"entity_id": f"e{i}"}}])
                statuses.append(answer.status_code)
                if answer.status_code == 200:
                    versions.add(answer.json()["version"])

    server = ServerProcess(shadowed, env={"FLYWHEEL_SERVING__RELOAD_INTERVAL_S": "0.3"})
    try:
        server.wait_ready()
        worker = threading.Thread(target=load, args=(f"{server.url}/v1/predict",))
        worker.start()
        time.sleep(1)
        canary, _ = rollouts.start(engine, name, "canary", champion, challenger, at, "test", share=0.5)
        deadline = time.monotonic() + 20
        while challenger not in versions and time.monotonic() < deadline:
            time.sleep(0.1)
        assert challenger in versions  # the canary answered its share
        rollouts.end(engine, canary.id, rollouts.ABORTED, at, "test")
        time.sleep(1)
        served = len(statuses)
        time.sleep(1)
        shadow_run, _ = rollouts.start(engine, name, "shadow", champion, challenger, at, "test")
        time.sleep(2)
        rollouts.end(engine, shadow_run.id, rollouts.ABORTED, at, "test")
        time.sleep(1)
        stop.set()
        worker.join(timeout=30)
    finally:
        stop.set()
        server.stop()
    assert len(statuses) > served > 50 and set(statuses) == {200}, sorted(set(statuses))
