"""The SBA replay: history after the training window, sent quarter by quarter as live traffic.

Three models are compared on every replayed quarter, each using only labels known at its time
(a 24-month performance window: a loan's label is known 24 months after approval):
- static: the first champion (trained on FY1995-2001 with labels known by 2001-10-01), never changed;
- loop:   whatever the server answered with: monitoring on the prediction log, triggers, the
          retraining pipeline and its gate decide; its AUC is computed from the logged predictions;
- oracle: retrained at the start of every quarter on the same lookback window the loop uses
          (same features, trainer and parameters), trained in memory, no gate.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import sqlalchemy as sa

from flywheel.config import MonitorWindow, Project, load_project
from flywheel.core.cpus import CPUS_ENV, compute_budget, usable_cpus
from flywheel.core.errors import FlywheelError
from flywheel.data import features as feats
from flywheel.data.sources import LABEL_KNOWN_AT, TARGET, extract_window
from flywheel.lifecycle.evaluation import score_version
from flywheel.lifecycle.features import prepare_frame
from flywheel.lifecycle.rollout import RolloutCheck
from flywheel.monitoring.monitor import MonitorVerdict
from flywheel.pipeline.runs import EvaluateResult, PipelineRun, list_runs
from flywheel.pipeline.scheduler import check_once
from flywheel.pipeline.steps import training_window
from flywheel.pipeline.triggers import TriggerDecision
from flywheel.registry import CHAMPION, Registry
from flywheel.serving.http.client import post_with_retry
from flywheel.serving.process import ServerProcess
from flywheel.state import rollouts
from flywheel.state.db import open_state, predictions
from flywheel.training.onnx import onnx_predict
from flywheel.training.trainers import train_model

FIRST_QUARTER = date(2001, 10, 1)  # FY2002 Q1
BATCH = 1000


@dataclass(frozen=True)
class Quarter:
    index: int
    start: date
    end: date

    @property
    def label(self) -> str:
        fy = self.start.year + (1 if self.start.month >= 10 else 0)
        q = {10: 1, 1: 2, 4: 3, 7: 4}[self.start.month]
        return f"FY{fy}Q{q}"


def quarters(first: date, n: int) -> list[Quarter]:
    starts = [(pd.Timestamp(first) + pd.DateOffset(months=3 * i)).date() for i in range(n + 1)]
    return [Quarter(i, starts[i], starts[i + 1]) for i in range(n)]


@dataclass
class Retrain:
    quarter: str
    clock: str
    trigger: str
    reason: str
    pipeline_run: str
    status: str
    version: int | None
    gate_passed: bool | None
    gate: str
    promoted: bool
    seconds: float


@dataclass
class Promotion:
    """A new champion, and how it did on the next quarter against the champion it replaced, on
    the same rows (every label known): `lost` when its ROC-AUC there was lower."""

    quarter: str  # promoted at this quarter's end
    index: int
    version: int
    previous: int | None
    via: str  # gate (promoted by the pipeline) or rollout (by a shadow rollout's decision)
    next_auc: float | None = None
    previous_next_auc: float | None = None
    lost: bool | None = None


@dataclass
class RolloutDecision:
    quarter: str
    rollout: int
    challenger: int
    champion: int | None
    decision: str
    reason: str
    evidence: dict[str, Any]


@dataclass
class QuarterResult:
    quarter: str
    start: str
    rows: int
    refused: int
    positive_rate: float
    served_versions: list[int]
    static_auc: float | None = None
    loop_auc: float | None = None
    oracle_auc: float | None = None
    drift_share: float | None = None
    drift_detected: bool | None = None
    drifted_features: list[str] = field(default_factory=list)
    prediction_drift: float | None = None
    labelled_window_auc: float | None = None
    labels_fed: int = 0
    # the quarter's ROC-AUC estimated when it was served, from its answers alone, and the band;
    # then, with every label known, whether the band held the realized value (the audit's flag
    # is its opposite) and the two naive forecasts the estimate is judged against
    estimated_auc: float | None = None
    estimated_low: float | None = None
    estimated_high: float | None = None
    estimate_note: str | None = None
    covered: bool | None = None
    audit_flag: bool | None = None
    promised_auc: float | None = None  # the serving version's holdout ROC-AUC, carried forward


def auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(y) == 0 or y.min() == y.max():
        return None
    return float(roc_auc_score(y, p))


# ---- the oracle (runs in a second process while the loop replays) -------------------------------


def oracle_aucs(config_path: str, home: str, first: date, n: int,
                which: list[int] | None = None) -> dict[int, float | None]:
    """Retrain at the start of each quarter (`which`, default all) on the loop's lookback window;
    ROC-AUC on that quarter, by quarter index."""
    project = load_project(config_path, env={"FLYWHEEL_HOME": home})
    data = project.config.data
    qs = quarters(first, n)
    cols = feats.input_columns(project.config.features)
    lo = training_window(project, qs[0].start)[0]
    folder = project.snapshot_dir / f"oracle-{os.getpid()}"
    everything = extract_window(project.source_url, data, cols, folder,
                                window=(lo, qs[-1].end), as_of=date(2200, 1, 1)).frame()
    when = everything[data.time_column]
    out: dict[int, float | None] = {}
    for q in qs:
        if which is not None and q.index not in which:
            continue
        start, end = training_window(project, q.start)
        known = everything[LABEL_KNOWN_AT] <= pd.Timestamp(q.start)
        train = everything[(when >= pd.Timestamp(start)) & (when < pd.Timestamp(end)) & known]
        test = everything[(when >= pd.Timestamp(q.start)) & (when < pd.Timestamp(q.end))]
        prepared = prepare_frame(project, train.reset_index(drop=True))
        fitted = train_model(project.config.model, prepared.training_data())
        p = onnx_predict(fitted.onnx, feats.build_matrix(prepared.spec, test))
        out[q.index] = auc(test[TARGET].to_numpy(), p)
    return out


# ---- the loop ----------------------------------------------------------------------------------


def records_of(rows: pd.DataFrame, inputs: list[str], id_col: str, time_col: str) -> list[dict[str, Any]]:
    """JSON request records: the model inputs plus a meta block (entity id, event time)."""
    frame = rows[inputs].astype(object).where(rows[inputs].notna(), None)  # type: ignore[call-overload]
    out = frame.to_dict("records")
    for rec, entity, when in zip(out, rows[id_col].tolist(), rows[time_col].tolist(), strict=True):
        rec["meta"] = {"entity_id": str(entity), "event_time": pd.Timestamp(when).date().isoformat()}
    return out


def send_quarter(client: Any, url: str, records: list[dict[str, Any]]) -> tuple[dict[str, str], int]:
    """POST records in batches; records the server refuses (422) are dropped and counted."""
    record_ids: dict[str, str] = {}
    refused = 0
    for start in range(0, len(records), BATCH):
        batch = records[start:start + BATCH]
        while batch:
            r = post_with_retry(client, f"{url}/v1/predict", json=batch)
            if r.status_code == 200:
                for rec, pred in zip(batch, r.json()["predictions"], strict=True):
                    record_ids[rec["meta"]["entity_id"]] = pred["record_id"]
                break
            if r.status_code != 422:
                raise RuntimeError(f"server answered {r.status_code}: {r.text[:500]}")
            bad = {e["loc"][1] for e in r.json()["detail"]
                   if len(e["loc"]) > 1 and isinstance(e["loc"][1], int)}
            if not bad:
                raise RuntimeError(f"422 without a record index: {r.text[:500]}")
            refused += len(bad)
            batch = [rec for i, rec in enumerate(batch) if i not in bad]
    return record_ids, refused


def feed_labels(client: Any, url: str, due: pd.DataFrame, record_ids: dict[str, str], id_col: str) -> int:
    labels = [{"record_id": record_ids[str(e)], "label": int(y), "observed_at": pd.Timestamp(k).isoformat()}
              for e, y, k in zip(due[id_col], due[TARGET], due[LABEL_KNOWN_AT], strict=True)
              if str(e) in record_ids]
    for start in range(0, len(labels), 5000):
        r = post_with_retry(client, f"{url}/v1/feedback", json={"labels": labels[start:start + 5000]})
        if r.status_code != 200:  # 503/429 only after the retries' budget is spent
            raise RuntimeError(f"feedback refused: {r.status_code} {r.text[:300]}")
    return len(labels)


def wait_for_log(engine: sa.Engine, model_name: str, expected: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            n = conn.execute(sa.select(sa.func.count()).select_from(predictions)
                             .where(predictions.c.model_name == model_name)).scalar() or 0
        if n >= expected:
            return
        time.sleep(0.2)
    raise RuntimeError(f"prediction log has fewer than {expected} rows after {timeout:.0f}s")


Progress = Callable[[str], None]


class ReplayError(FlywheelError):
    """The project is not in the state the replay starts from."""


def replayed_before(project: Project) -> str | None:
    """Why this project cannot be replayed again (its loop already ran), or None."""
    runs = list_runs(project)
    if runs:
        return f"this project already has {len(runs)} retraining run(s)"
    engine = open_state(project.state_url)
    with engine.connect() as conn:
        logged = conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar() or 0
    return f"its prediction log already holds {logged:,} predictions" if logged else None


@dataclass
class _Replay:
    """The replay's state as it walks the quarters."""

    project: Project
    registry: Registry
    frame: pd.DataFrame  # every replayed row, with its quarter, static score and label quarter
    inputs: list[str]
    server: ServerProcess
    client: httpx.Client
    say: Progress
    results: list[QuarterResult] = field(default_factory=list)
    retrains: list[Retrain] = field(default_factory=list)
    sent_ids: dict[str, str] = field(default_factory=dict)
    total_sent: int = 0
    promotions: list[Promotion] = field(default_factory=list)
    decisions: list[RolloutDecision] = field(default_factory=list)


def run_replay(project: Project, n_quarters: int = 36, out_dir: Path | None = None,
               progress: Progress | None = None) -> dict[str, Any]:
    """Replay, monitor, retrain, and write report.json / report.md / PNGs; return the report."""
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    registry = Registry.for_project(project)
    static_version = registry.alias_version(CHAMPION)
    if static_version is None:
        raise ReplayError("the replay needs a champion: train one first (flywheel demo does)")
    already = replayed_before(project)
    if already:
        raise ReplayError(f"{already}; the replay starts from the first FY1995-2001 champion: "
                          f"start from a clean state (make clean-state, or another FLYWHEEL_HOME)")
    out_dir = out_dir or project.home / "replay"
    out_dir.mkdir(parents=True, exist_ok=True)
    qs = quarters(FIRST_QUARTER, n_quarters)
    budget = ThreadBudget.for_cpus(usable_cpus())
    say(budget.describe())
    # "spawn", not fork: a child forked after LightGBM has used OpenMP in this process hangs in it.
    pool = multiprocessing.get_context("spawn").Pool(
        max(1, budget.oracle_processes), initializer=_oracle_worker, initargs=(budget.oracle_threads,))
    parts = max(1, budget.oracle_processes)
    oracle: list[AsyncResult[dict[int, float | None]]] = []
    try:
        if budget.oracle_processes:  # beside the loop; on one CPU only after it
            oracle = _start_oracle(pool, project, n_quarters, parts)
        frame = _replay_frame(project, registry, static_version, qs)
        server = ServerProcess(project, env={"FLYWHEEL_SERVING__RELOAD_INTERVAL_S": "0.5"})
        try:
            server.wait_ready()
            with httpx.Client(timeout=120) as client, compute_budget(budget.retrain_threads):
                replay = _Replay(project, registry, frame, feats.input_columns(project.config.features),
                                 server, client, say)
                for q in qs:
                    _replay_quarter(replay, q)
        finally:
            server.stop()
        oracle = oracle or _start_oracle(pool, project, n_quarters, parts)
        oracle_values, oracle_error = _oracle_results(oracle, say)
        pool.close()
    finally:
        pool.terminate()  # a failed replay stops the oracle's processes now, not after their work
        pool.join()
    _score_quarters(replay, qs, oracle_values)
    report = _report(project, replay.results, replay.retrains, n_quarters,
                     time.perf_counter() - started, replay.promotions, replay.decisions)
    report["oracle_error"] = oracle_error
    report["rollouts"] = rollout_history(project)
    write_report(report, out_dir)
    return report


def _replay_frame(project: Project, registry: Registry, static_version: int,
                  qs: list[Quarter]) -> pd.DataFrame:
    """Every replayed row with its quarter, the static model's score, and the quarter whose end
    first sees its label (labels of the last quarters arrive after the replay)."""
    data = project.config.data
    frame = extract_window(project.source_url, data, feats.input_columns(project.config.features),
                           project.snapshot_dir, window=(qs[0].start, qs[-1].end),
                           as_of=date(2200, 1, 1)).frame()
    when = frame[data.time_column]
    frame["__quarter__"] = -1
    for q in qs:
        frame.loc[(when >= pd.Timestamp(q.start)) & (when < pd.Timestamp(q.end)), "__quarter__"] = q.index
    frame["__static__"] = score_version(registry, static_version, frame)
    known = frame[LABEL_KNOWN_AT]
    frame["__label_quarter__"] = len(qs)
    for q in reversed(qs):
        frame.loc[known <= pd.Timestamp(q.end), "__label_quarter__"] = q.index
    frame["__fed__"] = False
    return frame


def _replay_quarter(r: _Replay, q: Quarter) -> None:
    """Send the quarter's loans, return the labels that matured, then one tick of the loop on the
    simulated clock (monitor this quarter's predictions, check the triggers, maybe retrain)."""
    data, frame = r.project.config.data, r.frame
    t_quarter = time.perf_counter()
    rows = frame[frame["__quarter__"] == q.index]
    served = r.server.served_version()
    ids, refused = send_quarter(r.client, r.server.url,
                                records_of(rows, r.inputs, data.id_column, data.time_column))
    r.sent_ids.update(ids)
    r.total_sent += len(ids)
    due = frame[(frame["__label_quarter__"] <= q.index) & ~frame["__fed__"]]
    n_fed = feed_labels(r.client, r.server.url, due, r.sent_ids, data.id_column)
    frame.loc[due.index, "__fed__"] = True
    wait_for_log(open_state(r.project.state_url), r.registry.model_name, r.total_sent)
    t_sent = time.perf_counter() - t_quarter
    result = QuarterResult(q.label, q.start.isoformat(), len(ids), refused,
                           float(rows[TARGET].mean()) if len(rows) else math.nan,
                           [served] if served else [], labels_fed=n_fed)
    t0 = time.perf_counter()
    # the simulated clock: labels the source DB holds count only once known by then
    tick = check_once(r.project, q.end, say=lambda msg: None,
                      window=MonitorWindow(by="count", size=max(len(ids), 100)),
                      monitor_at=datetime.combine(q.end, datetime.min.time(), tzinfo=UTC),
                      report=(q.index % 4 == 3))
    _record_verdict(result, tick.verdict)
    r.results.append(result)
    if tick.rollout is not None and tick.rollout.decision != "continue":
        _record_decision(r, q, tick.rollout)
    r.say(f"{q.label}: {len(ids):,} loans, v{served}; "
          + (tick.verdict.summary() if tick.verdict else "no verdict")
          + (f"; trigger {tick.decision.trigger}" if tick.decision else "")
          + f" [{t_sent:.1f}s traffic+labels, {time.perf_counter() - t0:.1f}s monitor+retrain]")
    if tick.decision is not None and tick.run is not None:
        _record_retrain(r, q, tick.decision, tick.run, time.perf_counter() - t0)


def _record_decision(r: _Replay, q: Quarter, check: RolloutCheck) -> None:
    ro = check.rollout
    r.decisions.append(RolloutDecision(q.label, ro.id, ro.challenger_version, ro.champion_version,
                                       check.decision, check.reason, check.evidence.to_dict()))
    r.say(f"  rollout {ro.id} of v{ro.challenger_version}: {check.decision.upper()} ({check.reason}; "
          f"{check.evidence.describe()})")
    if check.decision == "promote":
        r.promotions.append(Promotion(q.label, q.index, ro.challenger_version, ro.champion_version,
                                      "rollout"))
        r.server.wait_for_version(ro.challenger_version)


def _record_verdict(result: QuarterResult, verdict: MonitorVerdict | None) -> None:
    if verdict is None:
        return
    result.drift_share = verdict.drift.share
    result.drift_detected = verdict.drift.detected
    result.drifted_features = verdict.drift.drifted_columns
    result.prediction_drift = verdict.prediction_drift
    result.labelled_window_auc = verdict.performance.roc_auc if verdict.performance else None
    estimate = verdict.estimate
    if estimate is not None and estimate.metric == "roc_auc":
        result.estimated_auc, result.estimated_low, result.estimated_high = \
            estimate.value, estimate.low, estimate.high
        result.estimate_note = estimate.reason


def _record_retrain(r: _Replay, q: Quarter, decision: TriggerDecision, run: PipelineRun,
                    seconds: float) -> None:
    evaluation = run.result("evaluate", EvaluateResult)
    summary = evaluation.summary if evaluation else (run.error or "")
    r.retrains.append(Retrain(q.label, q.end.isoformat(), decision.trigger, decision.reason, run.id,
                              run.status, run.version, evaluation.passed if evaluation else None,
                              summary, run.promoted, seconds))
    r.say(f"  retrain -> v{run.version}: {'PROMOTED' if run.promoted else 'not promoted'} ({summary})")
    if run.promoted and run.version is not None:
        r.promotions.append(Promotion(q.label, q.index, run.version,
                                      evaluation.champion_version if evaluation else None, "gate"))
        r.server.wait_for_version(run.version)


@dataclass(frozen=True)
class ThreadBudget:
    """How the replay shares the CPUs: the oracle's processes (each one compute thread) beside the
    loop's retrains, so that the compute threads running at once never exceed the usable CPUs.
    With one CPU the oracle runs after the loop instead of beside it."""

    cpus: int
    oracle_processes: int
    oracle_threads: int
    retrain_threads: int

    @classmethod
    def for_cpus(cls, cpus: int) -> ThreadBudget:
        oracle = min(2, cpus // 2) if cpus > 1 else 0
        return cls(cpus, oracle, 1, max(1, cpus - oracle))

    def describe(self) -> str:
        if not self.oracle_processes:
            return (f"CPU budget: {self.cpus} usable CPU; retrains use 1 thread; the oracle runs "
                    "after the loop")
        return (f"CPU budget: {self.cpus} usable CPUs; retrains use {self.retrain_threads} "
                f"thread(s), the oracle {self.oracle_processes} process(es) of "
                f"{self.oracle_threads} thread beside them")


def _oracle_worker(threads: int) -> None:
    os.environ[CPUS_ENV] = str(threads)  # read by usable_cpus() in this process's trainings


def _start_oracle(pool: Any, project: Project, n: int,
                  parts: int) -> list[AsyncResult[dict[int, float | None]]]:
    return [pool.apply_async(oracle_aucs, (str(project.path), str(project.home), FIRST_QUARTER, n,
                                           list(range(part, n, parts)))) for part in range(parts)]


def _oracle_results(oracle: list[AsyncResult[dict[int, float | None]]],
                    say: Progress) -> tuple[dict[int, float | None], str | None]:
    say("waiting for the oracle's retrains")
    values: dict[int, float | None] = {}
    error = None
    for f in oracle:
        try:
            values.update(f.get())
        except Exception as exc:  # report what the loop measured even if the comparison failed
            error = f"{type(exc).__name__}: {exc}"
            say(f"the oracle failed: {error}")
    return values, error


def _score_quarters(r: _Replay, qs: list[Quarter], oracle: dict[int, float | None]) -> None:
    """Each quarter's AUC of the static model, of the loop (from the logged predictions), and of
    the oracle."""
    frame, data = r.frame, r.project.config.data
    logged = _logged(open_state(r.project.state_url), r.registry.model_name, set(r.sent_ids.values()))
    frame["__record__"] = frame[data.id_column].astype(str).map(r.sent_ids)
    joined = frame.merge(logged, left_on="__record__", right_on="record_id", how="inner")
    for q, res in zip(qs, r.results, strict=True):
        part = joined[joined["__quarter__"] == q.index]
        all_rows = frame[frame["__quarter__"] == q.index]
        res.loop_auc = auc(part[TARGET].to_numpy(), part["probability"].to_numpy())
        res.static_auc = auc(all_rows[TARGET].to_numpy(), all_rows["__static__"].to_numpy())
        res.oracle_auc = oracle.get(q.index)
        res.served_versions = sorted(set(part["model_version"].astype(int)))
        promised = [r.registry.version(v).metrics.get("holdout_roc_auc") for v in res.served_versions]
        known = [a for a in promised if a is not None]
        res.promised_auc = float(np.mean(known)) if known else None
        low, high, realized = res.estimated_low, res.estimated_high, res.loop_auc
        if low is not None and high is not None and realized is not None:
            res.covered = bool(low <= realized <= high)
            res.audit_flag = not res.covered
    for promotion in r.promotions:  # each new champion against the one it replaced, next quarter
        after = frame[frame["__quarter__"] == promotion.index + 1]
        if promotion.previous is None or after.empty:
            continue
        y = after[TARGET].to_numpy()
        promotion.next_auc = auc(y, score_version(r.registry, promotion.version, after))
        promotion.previous_next_auc = auc(y, score_version(r.registry, promotion.previous, after))
        if promotion.next_auc is not None and promotion.previous_next_auc is not None:
            promotion.lost = promotion.next_auc < promotion.previous_next_auc


def _logged(engine: sa.Engine, model_name: str, wanted: set[str]) -> pd.DataFrame:
    query = sa.select(predictions.c.record_id, predictions.c.probability, predictions.c.model_version) \
        .where(predictions.c.model_name == model_name)
    with engine.connect() as conn:
        df = pd.DataFrame(conn.execute(query).all(), columns=["record_id", "probability", "model_version"])
    return df[df["record_id"].isin(wanted)]


def rollout_history(project: Project) -> list[dict[str, Any]]:
    """Every rollout of the replay, oldest first, as the state database recorded it: how it ended
    (decided, replaced by a newer challenger, or still running), its shadow answers, its pairs."""
    engine = open_state(project.state_url)
    out = []
    for r in reversed(rollouts.history(engine, project.config.registered_model, limit=1_000)):
        out.append({"rollout": r.id, "mode": r.mode, "challenger": r.challenger_version,
                    "champion": r.champion_version, "status": r.status,
                    "started": r.started_at.date().isoformat(),
                    "ended": r.ended_at.date().isoformat() if r.ended_at else None,
                    "reason": r.reason, "shadow_answers": rollouts.shadow_count(engine, r.id),
                    "labelled_pairs": (r.evidence or {}).get("pairs", 0)})
    return out


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(kept)) if kept else None


def _report(project: Project, results: list[QuarterResult], retrains: list[Retrain], n: int,
            seconds: float, promotions: list[Promotion] | None = None,
            decisions: list[RolloutDecision] | None = None) -> dict[str, Any]:
    cfg = project.config
    promotions = promotions or []
    mean_static = _mean([r.static_auc for r in results])
    mean_loop = _mean([r.loop_auc for r in results])
    mean_oracle = _mean([r.oracle_auc for r in results])
    return {
        "estimation": estimation_summary(results),
        "generated_at": datetime.now().isoformat(timespec="seconds"),
        "quarters": [asdict(r) for r in results],
        "mean_static_auc": mean_static,
        "mean_loop_auc": mean_loop,
        "mean_oracle_auc": mean_oracle,
        "loop_vs_oracle": (mean_loop / mean_oracle) if mean_loop and mean_oracle else None,
        "loop_retrains": len(retrains),
        "loop_promotions": len(promotions) if promotions else sum(r.promoted for r in retrains),
        "policy": cfg.rollout.mode,
        "promotions": [asdict(p) for p in promotions],
        "promotions_lost": sum(bool(p.lost) for p in promotions),
        "rollout": [asdict(d) for d in decisions or []],
        "oracle_retrains": n,
        "retrains": [asdict(r) for r in retrains],
        "rules": {
            "label": f"charged off within {cfg.data.target.months} months of approval; known "
                     f"{cfg.data.target.months} months after approval; every model trains only on "
                     "labels known at its training time" if hasattr(cfg.data.target, "months") else "column",
            "lookback_months": cfg.retraining.lookback_months,
            "triggers": cfg.retraining.triggers.model_dump(),
            "drift_threshold": cfg.monitoring.drift_threshold,
            "drift_share": cfg.monitoring.drift_share,
            "max_auc_drop": cfg.monitoring.max_auc_drop,
            "gate": cfg.gate.model_dump(),
            "rollout": cfg.rollout.model_dump(),
            "thresholds_fixed": "from data before FY2002 (scripts/calibrate_triggers.py), committed "
                                "in flywheel.yaml before any replay ran; not tuned on the replay",
        },
        "seconds": seconds,
    }


def estimation_summary(results: list[QuarterResult]) -> dict[str, Any]:
    """How well each forecast of a quarter's ROC-AUC, made when it was served, matched the value
    realized once every label was known: the estimate, the serving version's holdout ROC-AUC
    carried forward, and the last realized window (labels known at the time)."""
    def mae(forecast: str) -> float | None:
        pairs = [(getattr(r, forecast), r.loop_auc) for r in results if r.estimated_auc is not None]
        kept = [abs(f - t) for f, t in pairs if f is not None and t is not None and not math.isnan(f)]
        return float(np.mean(kept)) if kept else None

    estimated = [r for r in results if r.estimated_auc is not None and r.loop_auc is not None]
    return {"quarters_estimated": len(estimated), "quarters": len(results),
            "mae_estimate": mae("estimated_auc"), "mae_holdout_carried_forward": mae("promised_auc"),
            "mae_last_realized_window": mae("labelled_window_auc"),
            "covered": sum(bool(r.covered) for r in estimated),
            "flagged": sum(bool(r.audit_flag) for r in estimated),
            "why_not": sorted({r.estimate_note for r in results if r.estimate_note})[:5]}


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    qs = report["quarters"]
    x = np.arange(len(qs))
    labels = [q["quarter"] for q in qs]

    def series(key: str) -> list[float]:
        return [q[key] if q[key] is not None else np.nan for q in qs]

    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.plot(x, series("static_auc"),
            label=f"static FY1995-2001 model (mean {report['mean_static_auc']:.3f})",
            color="#999999")
    ax.plot(x, series("oracle_auc"),
            label=f"oracle, retrained every quarter (mean {report['mean_oracle_auc']:.3f})",
            color="#4C72B0", linestyle="--")
    ax.plot(x, series("loop_auc"),
            label=f"Flywheel loop, from logged predictions (mean {report['mean_loop_auc']:.3f})",
            color="#DD8452", linewidth=2)
    if any(q.get("estimated_auc") is not None for q in qs):
        ax.plot(x, series("estimated_auc"), label="the loop's ROC-AUC estimated when served (before labels)",
                color="#55A868", linewidth=1.2)
        ax.fill_between(x, series("estimated_low"), series("estimated_high"), color="#55A868", alpha=0.15)
    for r in report["retrains"]:
        i = labels.index(r["quarter"])
        ax.axvline(i + 0.5, color="#55A868" if r["promoted"] else "#C44E52", alpha=0.4, linestyle=":")
    ax.axhline(0.5, color="black", linewidth=0.5)
    ax.set_xticks(x[::2], labels[::2], rotation=60, fontsize=8)
    ax.set_ylabel("ROC-AUC on the quarter")
    ax.set_title("SBA loans FY2002-2010: ROC-AUC per quarter (dotted: retrain, green = promoted)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out_dir / "auc_per_quarter.png", dpi=110)
    plt.close(fig)

    fig, ax1 = plt.subplots(figsize=(11, 4))
    ax1.bar(x, series("drift_share"), color="#8172B3", alpha=0.7, label="share of features drifted")
    ax1.axhline(report["rules"]["drift_share"], color="#8172B3", linestyle="--", linewidth=1,
                label="dataset drift threshold")
    ax1.set_ylabel("share of features drifted")
    ax2 = ax1.twinx()
    ax2.plot(x, series("positive_rate"), color="#C44E52", label="charge-off rate (24 months)")
    ax2.set_ylabel("charge-off rate")
    ax1.set_xticks(x[::2], labels[::2], rotation=60, fontsize=8)
    ax1.set_title("Drift against the serving champion's training reference, and the real default rate")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out_dir / "drift_per_quarter.png", dpi=110)
    plt.close(fig)
    (out_dir / "report.md").write_text(markdown_report(report))


def _f(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def rollout_lines(report: dict[str, Any]) -> list[str]:
    """The report's promotions (each against the champion it replaced, next quarter), rollouts and
    rollout decisions, as Markdown."""
    lines: list[str] = []
    promotions = report.get("promotions") or []
    if promotions:
        lines += ["", "## Promotions, and how each did on the next quarter", "",
                  f"Policy: `{report.get('policy', 'direct')}`. {report.get('promotions_lost', 0)} of "
                  f"{len(promotions)} promotions lost: the new champion's ROC-AUC on the next quarter "
                  "below the replaced champion's on the same loans (every label known).", "",
                  "| quarter | version | replaced | via | next quarter: new | replaced | lost |",
                  "|---|---|---|---|---|---|---|"]
        for p in promotions:
            lost = "-" if p["lost"] is None else ("LOST" if p["lost"] else "no")
            lines.append(f"| {p['quarter']} | v{p['version']} | v{p['previous']} | {p['via']} | "
                         f"{_f(p['next_auc'])} | {_f(p['previous_next_auc'])} | {lost} |")
    if report.get("rollouts"):
        lines += ["", "## Rollouts", "", "| rollout | challenger | champion | started | ended | status | "
                  "shadow answers | labelled pairs | why it ended |", "|---|---|---|---|---|---|---|---|---|"]
        for ro in report["rollouts"]:
            lines.append(f"| {ro['rollout']} | v{ro['challenger']} | v{ro['champion']} | {ro['started']} | "
                         f"{ro['ended'] or '-'} | {ro['status']} | {ro['shadow_answers']:,} | "
                         f"{ro['labelled_pairs']:,} | {ro['reason'][:70]} |")
    if report.get("rollout"):
        lines += ["", "## Rollout decisions", "", "| quarter | rollout | challenger | champion | "
                  "decision | reason | labelled pairs | loss difference [bounds] |",
                  "|---|---|---|---|---|---|---|---|"]
        g = lambda v: "-" if v is None else f"{v:+.2g}"  # noqa: E731
        for d in report["rollout"]:
            ev = d["evidence"]
            lines.append(f"| {d['quarter']} | {d['rollout']} | v{d['challenger']} | v{d['champion']} | "
                         f"{d['decision']} | {d['reason'][:80]} | {ev.get('pairs', 0):,} | "
                         f"{g(ev.get('difference'))} [{g(ev.get('low'))}, {g(ev.get('high'))}] |")
    return lines


def markdown_report(report: dict[str, Any]) -> str:
    lines = [
        "# SBA replay: static model vs the Flywheel loop vs a quarterly oracle", "",
        f"Mean ROC-AUC over {len(report['quarters'])} quarters: static **{_f(report['mean_static_auc'])}**, "
        f"loop **{_f(report['mean_loop_auc'])}**, oracle **{_f(report['mean_oracle_auc'])}** "
        f"(loop / oracle = {_f(report['loop_vs_oracle'])}). Retrains: loop {report['loop_retrains']} "
        f"({report['loop_promotions']} promoted), oracle {report['oracle_retrains']}.", "",
        "![ROC-AUC per quarter](auc_per_quarter.png)", "", "![Drift per quarter](drift_per_quarter.png)", "",
        "## Rules (fixed before the replay)", "", "```json", json.dumps(report["rules"], indent=2), "```", "",
        "## Retrains", "", "| quarter | trigger | reason | version | gate | promoted |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["retrains"]:
        lines.append(f"| {r['quarter']} | {r['trigger']} | {r['reason'][:80]} | v{r['version']} | "
                     f"{r['gate'][:90]} | {'yes' if r['promoted'] else 'no'} |")
    lines += rollout_lines(report)
    e = report.get("estimation")
    if e:
        lines += ["", "## Performance estimated before the labels", "",
                  f"{e['quarters_estimated']} of {e['quarters']} quarters estimated when served. Mean "
                  f"absolute error against the ROC-AUC realized once every label was known: estimate "
                  f"**{_f(e['mae_estimate'])}**, the serving version's holdout ROC-AUC carried forward "
                  f"{_f(e['mae_holdout_carried_forward'])}, the last realized window "
                  f"{_f(e['mae_last_realized_window'])}. The band held the realized value in "
                  f"{e['covered']} quarters; the audit flags the other {e['flagged']}."
                  + (" Not estimated: " + "; ".join(e["why_not"]) if e["why_not"] else "")]
    lines += ["", "## Quarters", "",
              "| quarter | loans | charge-off rate | served | static | loop | oracle | drift share | "
              "estimated [band] | audit |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for q in report["quarters"]:
        band = (f"{_f(q.get('estimated_auc'))} [{_f(q.get('estimated_low'))}, {_f(q.get('estimated_high'))}]"
                if q.get("estimated_auc") is not None else "-")
        audit = "-" if q.get("audit_flag") is None else ("FLAG" if q["audit_flag"] else "ok")
        lines.append(f"| {q['quarter']} | {q['rows']:,} | {q['positive_rate']:.3f} | "
                     f"{','.join(f'v{v}' for v in q['served_versions'])} | {_f(q['static_auc'])} | "
                     f"{_f(q['loop_auc'])} | {_f(q['oracle_auc'])} | {_f(q['drift_share'])} | "
                     f"{band} | {audit} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ReplaySummary:
    """The headline of a replay's report (the whole of it is `folder`/report.json)."""

    quarters: int
    mean_static_auc: float | None
    mean_loop_auc: float | None
    mean_oracle_auc: float | None
    loop_retrains: int
    loop_promotions: int
    oracle_retrains: int
    oracle_error: str | None
    seconds: float
    folder: Path

    @classmethod
    def of(cls, report: dict[str, Any], folder: Path) -> ReplaySummary:
        return cls(len(report["quarters"]), report["mean_static_auc"], report["mean_loop_auc"],
                   report["mean_oracle_auc"], report["loop_retrains"], report["loop_promotions"],
                   report["oracle_retrains"], report.get("oracle_error"), report["seconds"], folder)
