"""The retraining pipeline: extract -> features -> train -> evaluate -> promote -> alert.

Each step is a plain function of the project, the pipeline run's id and the earlier steps'
outputs, and returns its own outputs (JSON-able: paths, run ids, versions). The outputs are kept
in the state database (`pipeline_runs`), so a step can run in another process than the one
before it: `flywheel step NAME --run-id ID` (what the Airflow DAG calls), the Prefect flow and the
local runner all call the same functions.

Crash safety: promotion happens under a lock in the state database and is compare-and-set (the
champion must still be the one the challenger was evaluated against). Before moving the alias the
step records its intent; `reconcile` (run at the start of every pipeline run and of every promote)
finishes or abandons an intent left by a process that died.
"""

from __future__ import annotations

import json
import os
import signal
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

from flywheel.alerts import Alert, send_alert
from flywheel.config import PerformanceWindowTarget, Project
from flywheel.data import features as feats
from flywheel.data.sources import Snapshot, extract_window, make_engine
from flywheel.pipeline.steps import (
    PipelineError,
    Reporter,
    champion_inputs,
    check_data,
    evaluate_version,
    open_registry,
    prepare_features,
    train_on_snapshot,
)
from flywheel.registry import CHAMPION
from flywheel.state.db import (
    AliasMove,
    alias_moves,
    now,
    open_state,
    pipeline_runs,
    record_alias_move,
    watermarks,
)
from flywheel.state.locks import state_lock

STEPS = ("extract", "features", "train", "evaluate", "promote", "alert")
CRASH_ENV = "FLYWHEEL_CRASH_AT"  # fault injection for the crash tests: SIGKILL at this point


def crash_point(name: str) -> None:
    """Die here, as a SIGKILL would, when the crash tests ask for it."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class PipelineRun:
    id: str
    trigger: str
    reason: str
    status: str
    step: str | None
    outputs: dict[str, Any]
    error: str | None

    @property
    def promoted(self) -> bool:
        return bool(self.outputs.get("promote", {}).get("promoted"))

    @property
    def version(self) -> int | None:
        v = self.outputs.get("train", {}).get("version")
        return int(v) if v is not None else None


# ---- run records -------------------------------------------------------------------------------


def start_run(project: Project, trigger: str, reason: str, at: date, run_id: str | None = None) -> str:
    """Create (or find) the pipeline run record; `at` is the run's clock (simulated in the replay)."""
    engine = open_state(project.state_url)
    run_id = run_id or f"{at.isoformat()}-{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        exists = conn.execute(sa.select(pipeline_runs.c.id).where(pipeline_runs.c.id == run_id)).first()
        if exists is None:
            conn.execute(pipeline_runs.insert().values(
                id=run_id, model_name=project.config.registered_model, trigger=trigger, reason=reason,
                status="running", step=None, started_at=now(),
                outputs=json.dumps({"clock": at.isoformat()}), error=None))
    return run_id


def load_run(project: Project, run_id: str) -> PipelineRun:
    engine = open_state(project.state_url)
    with engine.connect() as conn:
        row = conn.execute(sa.select(pipeline_runs).where(pipeline_runs.c.id == run_id)).mappings().first()
    if row is None:
        raise PipelineError(f"no pipeline run '{run_id}' in the state database")
    return PipelineRun(row["id"], row["trigger"], row["reason"], row["status"], row["step"],
                       json.loads(row["outputs"]), row["error"])


def list_runs(project: Project) -> list[PipelineRun]:
    engine = open_state(project.state_url)
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(
            sa.select(pipeline_runs.c.id).where(pipeline_runs.c.model_name == project.config.registered_model)
            .order_by(pipeline_runs.c.started_at))]
    return [load_run(project, i) for i in ids]


def _save_step(project: Project, run_id: str, step: str, outputs: dict[str, Any],
               status: str = "running", error: str | None = None) -> None:
    engine = open_state(project.state_url)
    with engine.begin() as conn:
        row = conn.execute(sa.select(pipeline_runs.c.outputs).where(pipeline_runs.c.id == run_id)).first()
        merged = json.loads(row[0]) if row else {}
        if outputs:
            merged[step] = outputs
        values: dict[str, Any] = {"outputs": json.dumps(merged, default=str), "step": step,
                                  "status": status, "error": error}
        if status != "running":
            values["finished_at"] = now()
        conn.execute(pipeline_runs.update().where(pipeline_runs.c.id == run_id).values(**values))


def fail_run(project: Project, run_id: str, error: str) -> None:
    """Mark a run failed from outside its steps (the orchestrator itself failed), and alert."""
    run = load_run(project, run_id)
    _save_step(project, run_id, run.step or "start", {}, "failed", error)
    send_alert(Alert(f"{project.config.registered_model}: pipeline run failed", f"`{run_id}`: {error}",
                     "error"))


def get_watermark(project: Project) -> date | None:
    engine = open_state(project.state_url)
    with engine.connect() as conn:
        row = conn.execute(sa.select(watermarks.c.value).where(
            watermarks.c.name == project.config.registered_model)).first()
    return date.fromisoformat(row[0]) if row else None


def set_watermark(project: Project, value: date) -> None:
    engine = open_state(project.state_url)
    name = project.config.registered_model
    with engine.begin() as conn:
        conn.execute(watermarks.delete().where(watermarks.c.name == name))
        conn.execute(watermarks.insert().values(name=name, value=value.isoformat(), updated_at=now()))


# ---- the steps ---------------------------------------------------------------------------------


def training_window(project: Project, at: date) -> tuple[date, date]:
    """[start, at): `lookback_months` of rows whose labels are known at `at`."""
    months = project.config.retraining.lookback_months
    target = project.config.data.target
    if isinstance(target, PerformanceWindowTarget):
        months += target.months
    start = (pd.Timestamp(at) - pd.DateOffset(months=months)).date()
    return start, at


def labelled_rows_since(project: Project, since: date | None, at: date) -> int:
    """Rows whose label became known after `since` and by `at` (what 'new data' means)."""
    data = project.config.data
    shift = data.target.months if isinstance(data.target, PerformanceWindowTarget) else 0
    upper = (pd.Timestamp(at) - pd.DateOffset(months=shift)).date()
    lower = (pd.Timestamp(since) - pd.DateOffset(months=shift)).date() if since else date(1, 1, 1)
    engine = make_engine(project.source_url)
    tbl = sa.Table(data.table, sa.MetaData(), autoload_with=engine)
    col = tbl.c[data.time_column]
    with engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).select_from(tbl)
                         .where(col >= lower, col < upper)).scalar()
    engine.dispose()
    return int(n or 0)


def step_extract(project: Project, run_id: str, at: date) -> dict[str, Any]:
    registry = open_registry(project)
    champ = champion_inputs(registry, registry.alias_version(CHAMPION))
    cols = list(dict.fromkeys(feats.input_columns(project.config.features) + list(champ or {})))
    window = training_window(project, at)
    snap = extract_window(project.source_url, project.config.data, cols, project.snapshot_dir,
                          window=window, as_of=at)
    if snap.rows < project.config.checks.min_rows:
        raise PipelineError(f"only {snap.rows:,} rows with known labels in {window[0]}..{window[1]} "
                            f"(checks.min_rows is {project.config.checks.min_rows:,}): nothing to retrain on")
    return {"snapshot": str(snap.path), "rows": snap.rows, "window_start": window[0].isoformat(),
            "window_end": window[1].isoformat(), "as_of": at.isoformat(),
            "positive_rate": snap.positive_rate, "previous_watermark": _iso(get_watermark(project))}


def step_features(project: Project, run_id: str, extract: dict[str, Any]) -> dict[str, Any]:
    snapshot = Snapshot.load(Path(extract["snapshot"]))
    prepared = prepare_features(project, snapshot)
    report = check_data(project, prepared)
    folder = project.pipeline_dir / run_id
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "feature_spec.json"
    spec_path.write_text(prepared.spec.to_json())
    return {"feature_spec": str(spec_path), "features": prepared.spec.names,
            "train_rows": int(len(prepared.split.train)), "holdout_rows": int(len(prepared.split.holdout)),
            "checks_passed": report.passed}


def step_train(project: Project, run_id: str, extract: dict[str, Any],
               reporter: Reporter | None = None) -> dict[str, Any]:
    result = train_on_snapshot(project, Snapshot.load(Path(extract["snapshot"])), reporter)
    return {"mlflow_run_id": result.run_id, "version": result.version, "metrics": result.metrics,
            "train_seconds": result.fitted.train_seconds}


def step_evaluate(project: Project, run_id: str, extract: dict[str, Any],
                  train: dict[str, Any]) -> dict[str, Any]:
    evaluation = evaluate_version(project, int(train["version"]),
                                  snapshot=Snapshot.load(Path(extract["snapshot"])))
    return {"version": evaluation.version, "passed": evaluation.gate.passed,
            "reasons": evaluation.gate.reasons, "summary": evaluation.gate.summary(),
            "metrics": evaluation.metrics, "champion_version": evaluation.champion_version,
            "champion_metrics": evaluation.champion_metrics, "holdout_rows": evaluation.holdout_rows}


def step_promote(project: Project, run_id: str, evaluate: dict[str, Any],
                 extract: dict[str, Any] | None = None) -> dict[str, Any]:
    """Move `champion` if the gate passed and the champion is still the one evaluated against."""
    registry = open_registry(project)
    engine = open_state(project.state_url)
    version = int(evaluate["version"])
    with state_lock(engine, f"promote:{registry.model_name}", ttl_s=300, wait_s=120):
        _reconcile_locked(project)
        current = registry.alias_version(CHAMPION)
        if extract is not None:  # the data up to here has been trained on, promoted or not
            set_watermark(project, date.fromisoformat(extract["as_of"]))
        if not evaluate["passed"]:
            return {"promoted": False, "reason": "gate failed: " + evaluate["summary"]}
        if current != evaluate["champion_version"]:
            return {"promoted": False,
                    "reason": f"champion moved since evaluation (v{evaluate['champion_version']} -> "
                              f"v{current}); not promoting over a champion it was not compared with"}
        intent = {"intent": version, "previous": current, "reason": evaluate["summary"]}
        _save_step(project, run_id, "promote", intent)
        crash_point("promote:after-intent")
        registry.set_alias(CHAMPION, version)
        crash_point("promote:after-alias")
        record_alias_move(engine, AliasMove(registry.model_name, CHAMPION, version, current, "promote",
                                            evaluate["summary"], now()))
        return {**intent, "promoted": True, "reason": evaluate["summary"]}


def step_alert(project: Project, run_id: str) -> dict[str, Any]:
    run = load_run(project, run_id)
    promote = run.outputs.get("promote", {})
    train = run.outputs.get("train", {})
    title = (f"{project.config.registered_model}: v{train.get('version')} promoted to champion"
             if promote.get("promoted") else
             f"{project.config.registered_model}: retrained v{train.get('version')}, champion unchanged")
    text = (f"pipeline run `{run_id}` (trigger: {run.trigger}: {run.reason})\n"
            f"{promote.get('reason', '')}")
    return {"sent_to": send_alert(Alert(title, text, "info")), "title": title}


# ---- reconciliation ----------------------------------------------------------------------------


def reconcile(project: Project) -> list[str]:
    """Finish what a killed promote left: alias moved but not recorded, or an intent never acted on."""
    engine = open_state(project.state_url)
    with state_lock(engine, f"promote:{project.config.registered_model}", ttl_s=300, wait_s=120):
        return _reconcile_locked(project)


def _reconcile_locked(project: Project) -> list[str]:
    # Only called under the promote lock: an unfinished intent seen here belongs to a dead process.
    registry = open_registry(project)
    engine = open_state(project.state_url)
    fixed: list[str] = []
    with engine.connect() as conn:
        rows = conn.execute(sa.select(pipeline_runs).where(
            pipeline_runs.c.model_name == registry.model_name,
            pipeline_runs.c.status == "running")).mappings().all()
    current = registry.alias_version(CHAMPION)
    history = alias_moves(engine, registry.model_name, CHAMPION)
    recorded = history[-1].version if history else None
    for row in rows:
        outputs = json.loads(row["outputs"])
        intent = outputs.get("promote", {})
        if "intent" in intent and "promoted" not in intent:
            target = int(intent["intent"])
            if current == target and recorded != target:
                note = f"{intent.get('reason', '')} (recorded on recovery)"
                record_alias_move(engine, AliasMove(registry.model_name, CHAMPION, target,
                                                    intent.get("previous"), "promote", note, now()))
                recorded = target
                fixed.append(f"recorded the promotion of v{target} left by run {row['id']}")
                _save_step(project, row["id"], "promote", {**intent, "promoted": True}, "failed",
                           "the process died after moving the alias; the move was recorded on recovery")
                continue
            fixed.append(f"run {row['id']} died before moving the alias to v{target}")
            _save_step(project, row["id"], "promote", {**intent, "promoted": False}, "failed",
                       "the process died before moving the alias; nothing was promoted")
    return fixed


# ---- runners -----------------------------------------------------------------------------------


def run_step(project: Project, name: str, run_id: str, at: date | None = None,
             reporter: Reporter | None = None) -> dict[str, Any]:
    """Run one step of an existing pipeline run, reading earlier outputs from the state DB."""
    run = load_run(project, run_id)
    out = run.outputs
    clock = date.fromisoformat(str(out["clock"])) if out.get("clock") else (at or date.today())

    def need(step: str) -> dict[str, Any]:
        if step not in out:
            raise PipelineError(f"step '{name}' needs step '{step}' to have finished in run {run_id}")
        return dict(out[step])

    calls: dict[str, Callable[[], dict[str, Any]]] = {
        "extract": lambda: step_extract(project, run_id, clock),
        "features": lambda: step_features(project, run_id, need("extract")),
        "train": lambda: step_train(project, run_id, need("extract"), reporter),
        "evaluate": lambda: step_evaluate(project, run_id, need("extract"), need("train")),
        "promote": lambda: step_promote(project, run_id, need("evaluate"), need("extract")),
        "alert": lambda: step_alert(project, run_id),
    }
    if name not in calls:
        raise PipelineError(f"unknown step '{name}'; steps are: {', '.join(STEPS)}")
    _save_step(project, run_id, name, {})
    _mark_owner(project, run_id)
    try:
        result = calls[name]()
    except Exception as exc:
        _save_step(project, run_id, name, {}, "failed", f"{name}: {exc}")
        send_alert(Alert(f"{project.config.registered_model}: pipeline step '{name}' failed",
                         f"pipeline run `{run_id}`: {type(exc).__name__}: {exc}", "error"))
        raise
    final = name == STEPS[-1]
    _save_step(project, run_id, name, result, "succeeded" if final else "running")
    crash_point(f"after:{name}")
    return result


def _mark_owner(project: Project, run_id: str) -> None:
    engine = open_state(project.state_url)
    with engine.begin() as conn:
        row = conn.execute(sa.select(pipeline_runs.c.outputs).where(pipeline_runs.c.id == run_id)).first()
        merged = json.loads(row[0]) if row else {}
        merged["pid"] = os.getpid()
        conn.execute(pipeline_runs.update().where(pipeline_runs.c.id == run_id)
                     .values(outputs=json.dumps(merged, default=str)))


def run_pipeline(project: Project, trigger: str = "manual", reason: str = "requested",
                 at: date | None = None, reporter: Reporter | None = None) -> PipelineRun:
    """Every step in order, in this process (the `local` orchestrator)."""
    clock = at or date.today()
    reconcile(project)
    run_id = start_run(project, trigger, reason, clock)
    for name in STEPS:
        try:
            run_step(project, name, run_id, clock, reporter)
        except Exception:
            traceback.print_exc()
            break
    return load_run(project, run_id)


def _iso(d: date | datetime | None) -> str | None:
    return d.isoformat() if d else None


def orchestrate(project: Project, trigger: str, reason: str, at: date | None = None,
                orchestrator: str | None = None) -> PipelineRun:
    """Run the pipeline with the configured orchestrator (`prefect` embedded, or `local`)."""
    which = orchestrator or project.config.retraining.orchestrator
    if which == "prefect":
        from flywheel.pipeline.prefect_flow import run_prefect_pipeline

        run_id, _ = run_prefect_pipeline(project, trigger, reason, at)
        return load_run(project, run_id)
    if which != "local":
        raise PipelineError(f"unknown orchestrator '{which}': use local or prefect "
                            "(Airflow runs the steps itself: see deploy/airflow)")
    return run_pipeline(project, trigger, reason, at)
