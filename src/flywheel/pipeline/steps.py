"""The retraining pipeline's steps: extract -> features -> train -> evaluate -> promote -> alert.

Each step is a plain function of the project and the earlier steps' typed results, and returns
its own result. Each piece of work happens once per run: `features` builds and checks the matrix
and saves it; `train` and `evaluate` load it; the champion is loaded once per process (its input
columns shape the extract, its ONNX session scores the holdout in `evaluate`); the gate is decided
once, in `evaluate`; `promote` moves the alias through the one compare-and-set path.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd
import sqlalchemy as sa

from flywheel.alerts import Alert, send_alert
from flywheel.config import PerformanceWindowTarget, Project
from flywheel.core.errors import PipelineError
from flywheel.core.progress import Reporter
from flywheel.data.sources import EmptyWindowError, Snapshot, make_engine
from flywheel.data.timecol import sql_bounds, to_timestamps
from flywheel.lifecycle.challenger import train_on_features
from flywheel.lifecycle.evaluation import evaluate_against_champion, load_champion
from flywheel.lifecycle.features import (
    PreparedData,
    check_data,
    load_checks,
    prepare_features,
)
from flywheel.lifecycle.learning import extract_retraining_rows, feedback_labels_between
from flywheel.lifecycle.rollout import promote_or_roll_out
from flywheel.pipeline.runs import (
    AlertResult,
    EvaluateResult,
    ExtractResult,
    FeaturesResult,
    PipelineRun,
    PromoteResult,
    TrainStepResult,
    get_watermark,
    set_watermark,
)
from flywheel.registry import Registry


def training_window(project: Project, at: date) -> tuple[date, date]:
    """[start, at): `lookback_months` of rows whose labels are known at `at`."""
    months = project.config.retraining.lookback_months
    target = project.config.data.target
    if isinstance(target, PerformanceWindowTarget):
        months += target.months
    start = (pd.Timestamp(at) - pd.DateOffset(months=months)).date()
    return start, at


def labelled_rows_since(project: Project, since: date | None, at: date) -> int:
    """Rows whose label became known after `since` and by `at` (what 'new data' means): in the
    source table, the labels posted back, or both (`retraining.train_from`)."""
    origin = project.config.retraining.train_from
    fed = feedback_labels_between(project, since, at) if origin != "source" else 0
    return fed + (_source_rows_since(project, since, at) if origin != "feedback" else 0)


def _source_rows_since(project: Project, since: date | None, at: date) -> int:
    data = project.config.data
    shift = data.target.months if isinstance(data.target, PerformanceWindowTarget) else 0
    upper = (pd.Timestamp(at) - pd.DateOffset(months=shift)).date()
    lower = (pd.Timestamp(since) - pd.DateOffset(months=shift)).date() if since else date(1, 1, 1)
    engine = make_engine(project.source_url)
    tbl = sa.Table(data.table, sa.MetaData(), autoload_with=engine)
    col = tbl.c[data.time_column]
    bounds = sql_bounds(lower, upper, data)
    with engine.connect() as conn:
        if bounds is not None:
            n = conn.execute(sa.select(sa.func.count()).select_from(tbl)
                             .where(col >= bounds[0], col < bounds[1])).scalar()
        else:  # dates as text in a format SQL cannot compare
            when = to_timestamps(pd.read_sql(sa.select(col), conn)[data.time_column], data)
            n = int(((when >= pd.Timestamp(lower)) & (when < pd.Timestamp(upper))).sum())
    engine.dispose()
    return int(n or 0)


def step_extract(project: Project, registry: Registry, at: date, data_time: bool = False) -> ExtractResult:
    champion = load_champion(registry)
    window = training_window(project, at)
    try:
        snap = extract_retraining_rows(project, list(champion.inputs) if champion else [], window, at,
                                       data_time)
    except EmptyWindowError as exc:
        raise PipelineError(f"nothing to retrain on: {exc}") from None
    if snap.rows < project.config.checks.min_rows:
        origin = {"source": "", "feedback": " (from feedback)",
                  "both": f" ({snap.feedback_rows:,} from feedback)"}[snap.origin]
        raise PipelineError(f"only {snap.rows:,} rows with known labels{origin} in "
                            f"{window[0]}..{window[1]} (checks.min_rows is "
                            f"{project.config.checks.min_rows:,}): nothing to retrain on")
    watermark = get_watermark(project)
    return ExtractResult(str(snap.path), snap.rows, window[0].isoformat(), window[1].isoformat(),
                         at.isoformat(), snap.positive_rate,
                         watermark.isoformat() if watermark else None,
                         champion.version if champion else None, snap.origin, snap.feedback_rows)


def step_features(project: Project, run_id: str, extract: ExtractResult) -> FeaturesResult:
    prepared = prepare_features(project, Snapshot.load(Path(extract.snapshot)))
    checks = check_data(project, prepared)
    folder = prepared.save(project.pipeline_dir / run_id / "features", checks)
    return FeaturesResult(prepared.spec.names, int(len(prepared.split.train)),
                          int(len(prepared.split.holdout)), checks.passed, str(folder),
                          str(folder / "feature_spec.json"))


def step_train(project: Project, registry: Registry, features: FeaturesResult,
               reporter: Reporter | None = None) -> TrainStepResult:
    folder = Path(features.folder)
    prepared = PreparedData.load(folder)
    challenger = train_on_features(project, prepared, load_checks(folder), registry, reporter)
    return TrainStepResult(challenger.run_id, challenger.version, challenger.metrics,
                           challenger.fitted.train_seconds)


def step_evaluate(project: Project, registry: Registry, extract: ExtractResult,
                  features: FeaturesResult, train: TrainStepResult) -> EvaluateResult:
    """The gate, decided once: the challenger's holdout metrics (from training) against the
    champion the extract was made for, scored on the same holdout rows."""
    prepared = PreparedData.load(Path(features.folder))
    champion = load_champion(registry, extract.champion_version) \
        if extract.champion_version is not None else None
    ev = evaluate_against_champion(project, registry, prepared, train.version, train.metrics,
                                   train.mlflow_run_id, champion)
    return EvaluateResult(ev.version, ev.gate.passed, ev.gate.reasons, ev.gate.summary(), ev.metrics,
                          ev.champion_version, ev.champion_metrics, ev.holdout_rows)


def step_promote(project: Project, registry: Registry, extract: ExtractResult,
                 evaluate: EvaluateResult) -> PromoteResult:
    """Move `champion` if the gate passed and the champion is still the one evaluated against."""
    set_watermark(project, date.fromisoformat(extract.as_of))  # trained on, promoted or not
    outcome, rollout = promote_or_roll_out(project, registry, evaluate.version, evaluate.passed,
                                           evaluate.summary, evaluate.champion_version,
                                           date.fromisoformat(extract.as_of))
    return PromoteResult(outcome.promoted, outcome.reason, evaluate.version,
                         evaluate.champion_version, rollout.id if rollout else None)


def step_alert(project: Project, run: PipelineRun) -> AlertResult:
    promote = run.result("promote", PromoteResult)
    version = run.version
    name = project.config.registered_model
    title = (f"{name}: v{version} promoted to champion" if promote and promote.promoted else
             f"{name}: v{version} in a shadow rollout against the champion"
             if promote and promote.rollout else f"{name}: retrained v{version}, champion unchanged")
    text = (f"pipeline run `{run.id}` (trigger: {run.trigger}: {run.reason})\n"
            f"{promote.reason if promote else ''}")
    return AlertResult(send_alert(Alert(title, text, "info")), title)
