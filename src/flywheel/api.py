"""Flywheel from Python: the CLI's use cases as functions, for notebooks and scripts.

    from flywheel import api

    project = api.load("flywheel.yaml")
    api.ingest(project, "customers.csv")
    result = api.train(project)                    # extract, check, train, register, gate, promote
    result = api.import_model(project, "model.txt")  # a model you have, gated like a trained one
    scored = api.predict(project, frame)           # a DataFrame, scored as the server scores it
    verdict = api.monitor(project, start="2021-01-01", end="2021-07-01")
    run = api.retrain(project)                     # the pipeline once: extract ... promote, alert
    api.status(project)["champion"]

Every function takes the project `load` returns, does what the command of the same name does, and
returns its result as an object instead of printing it. A failure raises `FlywheelError` (or a
subclass) with the message the CLI prints. These names are the stable surface; the modules under
them (`flywheel.lifecycle`, `flywheel.pipeline`, ...) may change between releases.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd

from flywheel import lifecycle
from flywheel.config import Project, load_project
from flywheel.core.errors import FlywheelError
from flywheel.core.progress import Reporter
from flywheel.monitoring.monitor import MonitorVerdict, choose_window, run_monitor
from flywheel.pipeline.orchestrate import orchestrate
from flywheel.pipeline.runs import PipelineRun
from flywheel.serving.batch import score_frame

__all__ = ["FlywheelError", "evaluate", "import_model", "ingest", "load", "monitor", "predict", "promote",
           "retrain", "rollback", "status", "train"]


def load(path: str | Path, env: dict[str, str] | None = None) -> Project:
    """The project of a flywheel.yaml (`FLYWHEEL_*` variables of `env`, default the process's,
    override its settings as they do for the CLI)."""
    return load_project(path, env)


def ingest(project: Project, path: str | Path, append: bool = False) -> lifecycle.IngestResult:
    """Load a CSV/parquet file into the source table (`append`: add rows, replacing by id)."""
    return lifecycle.ingest(project, Path(path), append=append)


def train(project: Project, reporter: Reporter | None = None) -> lifecycle.TrainResult:
    """Train a challenger on the configured window; promote it if the gate passes."""
    return lifecycle.train_challenger(project, reporter)


def import_model(project: Project, path: str | Path, reporter: Reporter | None = None,
                 allow_pickle: bool = False) -> lifecycle.TrainResult:
    """Register a model file (LightGBM, ONNX, or a pickled scikit-learn estimator over the
    project's feature vector: only with `allow_pickle`, since unpickling runs the file's code) as
    the challenger; gate it and promote it if it passes."""
    return lifecycle.import_challenger(project, Path(path), reporter, allow_pickle=allow_pickle)


def evaluate(project: Project, version: int | None = None) -> lifecycle.Evaluation:
    """Score a version (default: the challenger) and the champion on today's holdout."""
    return lifecycle.evaluate_version(project, version)


def predict(project: Project, frame: pd.DataFrame, version: int | None = None,
            keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """`frame` scored by `version` (default: the champion) with the served model and features:
    id and time columns, the `keep` columns, probability, decision, model_version."""
    return score_frame(project, frame, version, keep)


def monitor(project: Project, size: int | None = None, hours: float | None = None,
            start: str | date | None = None, end: str | date | None = None,
            report: bool | None = False) -> MonitorVerdict:
    """A monitoring verdict over the prediction log's latest `size` rows, latest `hours`, or event
    time in [start, end) (default: the configured window); stored like the CLI's."""
    window = choose_window(project, size, hours, start, end)  # the same rules as the CLI's
    return run_monitor(project, window=window, report=report)


def retrain(project: Project, at: date | None = None, orchestrator: str | None = "local",
            reason: str = "requested from Python") -> PipelineRun:
    """One pipeline run at clock `at` (default today); `status`, `promoted`, `version` and each
    step's result on the returned run."""
    return orchestrate(project, "manual", reason, at, orchestrator)


def promote(project: Project, version: int, reason: str = "manual") -> Any:
    """Make `version` the champion (no gate), recorded in the alias history."""
    return lifecycle.promote(project, version, reason=reason)


def rollback(project: Project) -> Any:
    """Return the champion to the version it replaced."""
    return lifecycle.rollback(project)


def status(project: Project) -> dict[str, Any]:
    """What `flywheel status --json` prints: champion, challenger, their lineage, alias history."""
    return lifecycle.project_status(project)
