"""The flywheel turning on labels posted back: traffic whose rows are not in the source table is
served, labelled through /v1/feedback, retrained on alone, promoted and hot-swapped; the lineage
says where the rows came from. Also: label timing, and `both` learning each row once."""

from __future__ import annotations

import json
from datetime import date, timedelta

import httpx
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import yaml

from flywheel import api
from flywheel.config import MonitorWindow, load_project
from flywheel.data.sources import TARGET, make_engine
from flywheel.demo.replay import wait_for_log
from flywheel.lifecycle.learning import extract_retraining_rows
from flywheel.lifecycle.status import project_status
from flywheel.monitoring.monitor import MonitorError, run_monitor
from flywheel.pipeline.steps import labelled_rows_since
from flywheel.serving.process import ServerProcess
from flywheel.state.db import monitor_runs, open_state
from flywheel.state.verdicts import latest_verdict
from tests.lifecycle.test_own_data import cli, config, customers

FED = 3000  # served rows with a label posted back


def drifted(n: int, first_id: int, seed: int) -> pd.DataFrame:
    """Customers whose churn now follows the opposite age effect: the first champion is wrong."""
    rows = customers(n, first_id=first_id, seed=seed)
    rng = np.random.default_rng(seed + 100)
    score = -1.0 + 0.06 * (rows["age"] - 50) + rng.normal(0, 1.0, n)
    rows["churned"] = (score > -1.0).astype(int)
    return rows


def post(client: httpx.Client, url: str, rows: pd.DataFrame, days: list[str]) -> list[str]:
    """Predict every row (meta: its id and event time); return the record ids in row order."""
    records = [{"age": int(r.age), "monthly_spend": float(r.monthly_spend), "plan": str(r.plan),
                "meta": {"entity_id": str(r.customer_id), "event_time": day}}
               for r, day in zip(rows.itertuples(), days, strict=True)]
    ids: list[str] = []
    for start in range(0, len(records), 500):
        answer = client.post(f"{url}/v1/predict", json=records[start:start + 500])
        assert answer.status_code == 200, answer.text[:500]
        ids += [p["record_id"] for p in answer.json()["predictions"]]
    return ids


def test_retrain_from_feedback_alone_promotes_and_hot_swaps(tmp_path):
    path = config(tmp_path / "churn")
    raw = yaml.safe_load(path.read_text())
    raw["retraining"] = {"train_from": "feedback", "lookback_months": 240, "orchestrator": "local"}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    home = tmp_path / "churn" / ".flywheel"
    history = tmp_path / "history.csv"
    customers(4000).to_csv(history, index=False)
    assert cli("ingest", "--config", str(path), "--input", str(history), home=home)[0] == 0
    code, said = cli("train", "--config", str(path), home=home)
    assert code == 0 and "champion → v1" in said, said
    project = load_project(path, env={"FLYWHEEL_HOME": str(home)})

    new = drifted(FED, first_id=100_000, seed=7)  # ids the source table does not hold
    known = customers(4000).iloc[:200]  # ids it does hold: learnt once under `both`
    days = [(date(2021, 1, 1) + timedelta(days=int(d))).isoformat()
            for d in np.linspace(0, 700, FED + len(known))]
    with ServerProcess(project) as server, httpx.Client(timeout=60) as client:
        server.wait_ready(90)
        ids = post(client, server.url, new, days[:FED]) + post(client, server.url, known, days[FED:])
        wait_for_log(open_state(project.state_url), project.config.registered_model, len(ids))
        # monitored before any label: an estimate, nothing to audit yet
        early = run_monitor(project, window=MonitorWindow(by="count", size=len(ids)), report=False)
        assert early.estimate.value is not None and early.audit is None and early.earlier_audits == []
        unlabelled = 150  # served, never labelled: not learnt from
        # labels for the new rows but the last 150, and the opposite of the source's label for
        # the rows the source holds (so it shows which side a row was learnt from)
        ys = new["churned"].tolist()[: FED - unlabelled] + (1 - known["churned"]).tolist()
        kept = ids[: FED - unlabelled] + ids[FED:]
        labels = [{"record_id": rid, "label": int(y)} for rid, y in zip(kept, ys, strict=True)]
        answer = client.post(f"{server.url}/v1/feedback", json={"labels": labels})
        assert answer.status_code == 200, answer.text

        yesterday = (date.today() - timedelta(days=1)).isoformat()
        code, said = cli("retrain", "--config", str(path), "--at", yesterday, home=home)
        assert code == 1 and "no served prediction" in said and "received by the end of" in said, said

        code, said = cli("retrain", "--config", str(path), home=home)
        assert code == 0, said
        total = len(kept)
        assert f"{total:,} rows" in said and f"({total:,} from feedback)" in said, said
        assert "PROMOTED" in said, said
        server.wait_for_version(2, timeout=60)
        one = client.post(f"{server.url}/v1/predict", json=[{"age": 30, "monthly_spend": 10.0,
                                                             "plan": "basic"}])
        assert one.json()["version"] == 2

    # monitoring by event time: the rows whose meta.event_time lies in the first half of 2021,
    # however recently they were served, and the labels among them
    code, said = cli("monitor", "--config", str(path), "--from", "2021-01-01", "--to", "2021-07-01",
                     "--no-report", "--json", home=home)
    assert code == 0, said
    verdict = json.loads(said)
    inside = [d for d in days if "2021-01-01" <= d < "2021-07-01"]
    assert verdict["rows"] == len(inside) and verdict["performance"]["rows"] == len(inside)
    # the gate's metric estimated from the answers alone, each row calibrated by the version that
    # answered it (v1 here: the window was served before the retrain), stored with the run. These
    # customers churn by the opposite age effect (a concept shift): the scores cannot show it, so
    # the realized value lands far outside the band, which is what the estimate is audited for.
    estimated = verdict["estimate"]
    assert estimated["metric"] == "roc_auc" and estimated["rows"] == len(inside), estimated
    assert estimated["low"] <= estimated["value"] <= estimated["high"] <= 1.0
    assert verdict["performance"]["value"] < estimated["low"] - 0.1, (estimated, verdict["performance"])
    # every row of the window is labelled: the audit compares them and flags the shift
    audit = verdict["audit"]
    assert audit["rows"] == len(inside) and audit["labelled_share"] == 1.0 and audit["shift"] is True
    assert audit["realized"] == pytest.approx(verdict["performance"]["value"])
    stored = latest_verdict(open_state(project.state_url), project.config.registered_model)
    assert stored["estimated_value"] == pytest.approx(estimated["value"]) and stored["estimate_note"] is None
    assert stored["concept_shift"] is True and stored["audit_rows"] == len(inside)
    # the window monitored before its labels came back was audited by the next run, once they had
    [[run_id, earlier]] = verdict["earlier_audits"]
    assert run_id == early.id and earlier["shift"] is True and earlier["rows"] == len(kept)
    with open_state(project.state_url).connect() as conn:
        flagged = sa.select(monitor_runs.c.concept_shift).where(monitor_runs.c.id == early.id)
        assert conn.execute(flagged).scalar() is True
    same = api.monitor(project, start="2021-01-01", end="2021-07-01")  # the Python API's way
    assert same.drift.rows == len(inside) and same.window_kind == "event"
    code, said = cli("monitor", "--config", str(path), "--from", "2021-07-01", home=home)
    assert code == 1 and "needs both a start and an end (--from and --to)" in said
    with pytest.raises(MonitorError, match="needs both a start and an end"):  # the API refuses alike
        api.monitor(project, start="2021-07-01")
    # this project's time column is a year: a window's bounds may be years too
    code, said = cli("monitor", "--config", str(path), "--from", "2021", "--to", "2022", "--no-report",
                     "--json", home=home)
    assert code == 0, said
    assert json.loads(said)["rows"] == len([d for d in days if "2021-01-01" <= d < "2022-01-01"])
    code, said = cli("monitor", "--config", str(path), "--from", "2030-01-01", "--to", "2031-01-01",
                     "--no-report", home=home)
    assert code == 1 and "only 0 predictions in the window (event time in [2030-01-01, 2031-01-01))" in said

    # the new_labelled_rows trigger counts labels received after the watermark's day
    today = date.today()
    assert labelled_rows_since(project, None, today) == total
    assert labelled_rows_since(project, today - timedelta(days=1), today) == total
    assert labelled_rows_since(project, today, today) == 0  # the retrain's watermark: all consumed

    champion = project_status(project).champion
    assert champion.version == 2
    trained = champion.trained_on
    assert trained.rows_from == "feedback" and trained.rows == total
    assert trained.feedback_rows == total
    assert trained.start == (date.today() - pd.DateOffset(months=240)).date().isoformat()
    engine = make_engine(project.source_url)
    with engine.connect() as conn:  # the learnt rows never entered the source table
        assert conn.execute(sa.text("SELECT count(*) FROM customers WHERE customer_id >= 100000")
                            ).scalar() == 0
    engine.dispose()

    both = load_project(_with(path, train_from="both"), env={"FLYWHEEL_HOME": str(home)})
    window = (date(2000, 1, 1), date.today())
    snap = extract_retraining_rows(both, [], window, date.today())
    frame = snap.frame()
    assert snap.origin == "both" and snap.rows == 4000 + FED - unlabelled
    assert snap.feedback_rows == FED - unlabelled
    assert frame["customer_id"].is_unique
    # a source row sent as traffic is learnt from the source table, with its own label
    row = frame.loc[frame["customer_id"] == 5].iloc[0]
    assert row["signup_year"] < pd.Timestamp("2021-01-01") and row[TARGET] == known.loc[5, "churned"]
    served = frame.loc[frame["customer_id"] >= 100_000]
    assert served["signup_year"].min() >= pd.Timestamp("2021-01-01")  # the meta event time
    assert served[TARGET].tolist() == new["churned"].iloc[: FED - unlabelled].tolist()


def _with(path, **retraining):
    raw = yaml.safe_load(path.read_text())
    raw["retraining"].update(retraining)
    out = path.with_name("both.yaml")
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def test_history_labelled_long_ago_is_named_and_learnt_with_the_datas_clock(tmp_path):
    """Labels for rows of 2012-2019 posted today: with the wall clock and 72 months of lookback
    nothing is in range, and the error says what exists and why; `--at data` learns from them."""
    path = config(tmp_path / "churn")
    raw = yaml.safe_load(path.read_text())
    raw["retraining"] = {"train_from": "feedback", "orchestrator": "local"}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    home = tmp_path / "churn" / ".flywheel"
    history = tmp_path / "history.csv"
    customers(2000).to_csv(history, index=False)
    assert cli("ingest", "--config", str(path), "--input", str(history), home=home)[0] == 0
    assert cli("train", "--config", str(path), home=home)[0] == 0
    project = load_project(path, env={"FLYWHEEL_HOME": str(home)})
    rows = customers(1600, first_id=50_000, seed=3)
    with ServerProcess(project) as server, httpx.Client(timeout=60) as client:
        server.wait_ready(90)
        records = [{"age": int(r.age), "monthly_spend": float(r.monthly_spend), "plan": str(r.plan),
                    "meta": {"entity_id": str(r.customer_id), "event_time": int(r.signup_year)}}
                   for r in rows.itertuples()]  # the year, as the time column holds it
        ids = []
        for start in range(0, len(records), 500):
            answer = client.post(f"{server.url}/v1/predict", json=records[start:start + 500])
            assert answer.status_code == 200, answer.text[:300]
            ids += [p["record_id"] for p in answer.json()["predictions"]]
        wait_for_log(open_state(project.state_url), project.config.registered_model, len(ids))
        labels = [{"record_id": rid, "label": int(y)} for rid, y in zip(ids, rows["churned"], strict=True)]
        assert client.post(f"{server.url}/v1/feedback", json={"labels": labels}).status_code == 200
    code, said = cli("retrain", "--config", str(path), home=home)
    first, last = rows["signup_year"].min(), rows["signup_year"].max()
    assert code == 1 and f"1,600 served predictions of 'churn' have labels, with event times from " \
        f"{first}-01-01 to {last}-01-01: outside the window" in said and "--at data" in said, said
    code, said = cli("retrain", "--config", str(path), "--at", "data", home=home)
    in_window = int((rows["signup_year"] > last - 6).sum())  # 72 months back from the data's clock
    assert code == 0 and f"extract {in_window:,} rows" in said and f"({in_window:,} from feedback)" in said
    assert f"..{last}-01-02" in said  # the window ends at the data's clock, the day after its last row
