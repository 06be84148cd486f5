"""Pipeline run records in the state database: what each step produced, so that a step can run in
another process than the one before it (`flywheel step NAME --run-id ID`, what Airflow calls)."""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass, fields
from datetime import date
from typing import Any, TypeVar

import sqlalchemy as sa

from flywheel.alerts import Alert, send_alert
from flywheel.config import Project
from flywheel.core.errors import PipelineError
from flywheel.core.secrets import redact
from flywheel.state.db import PIPELINE_STEPS, now, open_state, pipeline_runs, watermarks

STEPS = PIPELINE_STEPS
R = TypeVar("R")


@dataclass(frozen=True)
class ExtractResult:
    snapshot: str
    rows: int
    window_start: str
    window_end: str
    as_of: str
    positive_rate: float
    previous_watermark: str | None = None
    champion_version: int | None = None  # the champion whose inputs were extracted too
    rows_from: str = "source"  # retraining.train_from
    feedback_rows: int = 0  # of `rows`, those learnt from labels posted back


@dataclass(frozen=True)
class FeaturesResult:
    features: list[str]
    train_rows: int
    holdout_rows: int
    checks_passed: bool
    folder: str = ""  # the prepared matrix, split and spec that train and evaluate load
    feature_spec: str = ""


@dataclass(frozen=True)
class TrainStepResult:
    mlflow_run_id: str
    version: int
    metrics: dict[str, float]
    train_seconds: float


@dataclass(frozen=True)
class EvaluateResult:
    version: int
    passed: bool
    reasons: list[str]
    summary: str
    metrics: dict[str, float]
    champion_version: int | None
    champion_metrics: dict[str, float] | None
    holdout_rows: int


@dataclass(frozen=True)
class PromoteResult:
    promoted: bool
    reason: str
    version: int | None = None
    previous: int | None = None
    rollout: int | None = None  # the shadow rollout started instead of promoting (rollout.mode)


@dataclass(frozen=True)
class AlertResult:
    sent_to: str
    title: str


# What one step returns (and stores as JSON in the run's record).
StepResult = ExtractResult | FeaturesResult | TrainStepResult | EvaluateResult | PromoteResult | AlertResult

RESULT_TYPES: dict[str, type] = {"extract": ExtractResult, "features": FeaturesResult,
                                 "train": TrainStepResult, "evaluate": EvaluateResult,
                                 "promote": PromoteResult, "alert": AlertResult}


def from_dict(cls: type[R], data: dict[str, Any]) -> R:
    """A result from its stored JSON; fields an older release did not write take their defaults."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class PipelineRun:
    id: str
    trigger: str
    reason: str
    status: str
    step: str | None
    outputs: dict[str, Any]  # as stored: each finished step's result, plus the run's clock
    error: str | None

    def result(self, step: str, cls: type[R]) -> R | None:
        """The typed result of a finished step, or None."""
        data = self.outputs.get(step)
        return from_dict(cls, data) if isinstance(data, dict) else None

    def need(self, step: str, cls: type[R], for_step: str) -> R:
        found = self.result(step, cls)
        if found is None:
            raise PipelineError(f"step '{for_step}' needs step '{step}' to have finished in run {self.id}")
        return found

    @property
    def clock(self) -> date | None:
        value = self.outputs.get("clock")
        return date.fromisoformat(str(value)) if value else None

    @property
    def promoted(self) -> bool:
        promote = self.result("promote", PromoteResult)
        return bool(promote and promote.promoted)

    @property
    def version(self) -> int | None:
        train = self.result("train", TrainStepResult)
        return int(train.version) if train else None


def start_run(project: Project, trigger: str, reason: str, at: date, run_id: str | None = None,
              data_time: bool = False) -> str:
    """Create (or find) the pipeline run record; `at` is the run's clock (simulated in the replay);
    `data_time`: the clock follows the data, and labels posted back count from when they were
    observed (else from the row's own time), not from when they were received."""
    engine = open_state(project.state_url)
    run_id = run_id or f"{at.isoformat()}-{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        exists = conn.execute(sa.select(pipeline_runs.c.id).where(pipeline_runs.c.id == run_id)).first()
        if exists is None:
            conn.execute(pipeline_runs.insert().values(
                id=run_id, model_name=project.config.registered_model, trigger=trigger, reason=reason,
                status="running", step=None, started_at=now(),
                outputs=json.dumps({"clock": at.isoformat(), **({"data_time": True} if data_time else {})}),
                error=None))
    return run_id


def load_run(project: Project, run_id: str) -> PipelineRun:
    engine = open_state(project.state_url)
    with engine.connect() as conn:
        row = conn.execute(sa.select(pipeline_runs).where(pipeline_runs.c.id == run_id)).mappings().first()
    if row is None:
        raise PipelineError(f"no pipeline run '{run_id}' in the state database")
    return _run_of(row)


def list_runs(project: Project) -> list[PipelineRun]:
    engine = open_state(project.state_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(pipeline_runs).where(
            pipeline_runs.c.model_name == project.config.registered_model)
            .order_by(pipeline_runs.c.started_at)).mappings().all()
    return [_run_of(r) for r in rows]


def _run_of(row: Any) -> PipelineRun:
    return PipelineRun(row["id"], row["trigger"], row["reason"], row["status"], row["step"],
                       json.loads(row["outputs"]), row["error"])


def save_step(project: Project, run_id: str, step: str, result: Any = None, status: str = "running",
              error: str | None = None, **extra: Any) -> None:
    """Record a step starting, finishing (with its result) or failing; `extra` goes beside the
    outputs (the owner's pid and host). An error is stored with URL passwords removed: the room
    and `flywheel status` show it to people who hold no secrets."""
    error = redact(error) if error else error
    engine = open_state(project.state_url)
    with engine.begin() as conn:
        row = conn.execute(sa.select(pipeline_runs.c.outputs).where(pipeline_runs.c.id == run_id)).first()
        merged = json.loads(row[0]) if row else {}
        if result is not None:
            merged[step] = asdict(result) if not isinstance(result, dict) else result
        merged.update(extra)
        _time_step(merged.setdefault("timings", {}), step, result is None and status == "running")
        values: dict[str, Any] = {"outputs": json.dumps(merged, default=str), "step": step,
                                  "status": status, "error": error}
        if status != "running":
            values["finished_at"] = now()
        conn.execute(pipeline_runs.update().where(pipeline_runs.c.id == run_id).values(**values))


def _time_step(timings: dict[str, Any], step: str, starting: bool) -> None:
    """When each step started and ended (UTC, ISO), for the control room's pipeline table."""
    stamp = now().isoformat()
    if starting:
        timings[step] = {"started": stamp}
    else:
        timings.setdefault(step, {})["finished"] = stamp


def owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def fail_run(project: Project, run_id: str, error: str) -> None:
    """Mark a run failed from outside its steps (the orchestrator itself failed), and alert."""
    run = load_run(project, run_id)
    save_step(project, run_id, run.step or "start", None, "failed", error)
    send_alert(Alert(f"{project.config.registered_model}: pipeline run failed", f"`{run_id}`: {error}",
                     "error"))


def fail_dead_runs(project: Project) -> list[str]:
    """Runs still 'running' whose process on this host is gone: mark them failed, say which."""
    failed = []
    for run in list_runs(project):
        pid, host = run.outputs.get("pid"), run.outputs.get("host", socket.gethostname())
        if run.status != "running" or not isinstance(pid, int) or host != socket.gethostname():
            continue
        if _alive(pid):
            continue
        save_step(project, run.id, run.step or "start", None, "failed",
                  f"the process running step '{run.step}' died; any alias move it began was "
                  "finished or undone by the alias reconciliation")
        failed.append(f"run {run.id} died during step '{run.step}'")
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
