"""The loop's steps as plain functions with explicit inputs and outputs.

Orchestrators (the CLI now; Prefect and Airflow later) call these and nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from flywheel.config import CategoryFeature, LlmProject, Project, ProjectBase
from flywheel.data import features as feats
from flywheel.data.checks import DataCheckError, DataCheckReport, run_data_checks
from flywheel.data.sources import TARGET, Snapshot, extract_window
from flywheel.registry import CHALLENGER, CHAMPION, Registry, RegistryError, VersionInfo
from flywheel.state.db import AliasMove, alias_moves, now, open_state, record_alias_move
from flywheel.training.evaluate import (
    GateDecision,
    calibration_plot,
    decide_gate,
    holdout_metrics,
    onnx_predict,
)
from flywheel.training.split import TimeSplit, split_by_time
from flywheel.training.trainers import FittedModel, TrainingData, train_model

ONNX_PARITY_TOLERANCE = 1e-4
# ONNX tree ensembles hold split thresholds as float32, LightGBM as float64: a row whose feature
# value lies between the two roundings of a threshold takes the other branch. That is a property
# of the format, not a broken export, and touches a handful of rows; a broken export moves most of
# them. So: at most this share of rows may differ by more than the tolerance, and none by more
# than ONNX_MAX_DIFF.
ONNX_PARITY_MAX_SHARE = 0.001
ONNX_MAX_DIFF = 0.01


class Reporter(Protocol):
    """Where steps report progress; the CLI shows it with Rich, tests pass `QuietReporter`."""

    def step(self, name: str, total: int | None = None) -> contextlib.AbstractContextManager[
        Callable[[int, int], None]]: ...


class QuietReporter:
    @contextlib.contextmanager
    def step(self, name: str, total: int | None = None) -> Iterator[Callable[[int, int], None]]:
        yield lambda done, total: None


class PipelineError(RuntimeError):
    """A step could not complete; the message says which and why."""


@dataclass(frozen=True)
class PreparedData:
    """A snapshot turned into model inputs: the fitted feature spec, matrix, target and split."""

    snapshot: Snapshot
    frame: pd.DataFrame
    spec: feats.FeatureSpec
    X: np.ndarray
    y: np.ndarray
    split: TimeSplit

    def training_data(self) -> TrainingData:
        s = self.split
        return TrainingData(
            X_train=self.X[s.train], y_train=self.y[s.train],
            X_val=self.X[s.validation], y_val=self.y[s.validation],
            feature_names=self.spec.names, cardinalities=cardinalities(self.spec),
        )


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    version: int
    model_type: str
    metrics: dict[str, float]
    champion_version: int | None
    champion_metrics: dict[str, float] | None
    gate: GateDecision
    promoted: bool
    prepared: PreparedData
    checks: DataCheckReport
    fitted: FittedModel
    onnx_max_abs_diff: float


def cardinalities(spec: feats.FeatureSpec) -> dict[int, int]:
    return {i: len(spec.vocabularies.get(f.name, [])) + 1
            for i, f in enumerate(spec.features) if isinstance(f, CategoryFeature)}


def open_registry(project: ProjectBase) -> Registry:
    return Registry(project.tracking_url, project.artifact_root, project.config.project,
                    project.config.registered_model)


# ---- steps -------------------------------------------------------------------------------------


def extract_training_window(project: Project, extra_columns: Sequence[str] = ()) -> Snapshot:
    """The configured window from the source database, labels known by `as_of` only."""
    cols = feats.input_columns(project.config.features) + list(extra_columns)
    return extract_window(project.source_url, project.config.data, list(dict.fromkeys(cols)),
                          project.snapshot_dir)


def prepare_features(project: Project, snapshot: Snapshot) -> PreparedData:
    """Split by time, learn vocabularies on the training slice only, compute every feature."""
    frame = snapshot.frame()
    split = split_by_time(frame[project.config.data.time_column], project.config.split)
    spec = feats.fit_spec(project.config.features, frame.iloc[split.train])
    X = feats.build_matrix(spec, frame)
    y = frame[TARGET].to_numpy(dtype=np.int64)
    return PreparedData(snapshot, frame, spec, X, y, split)


def check_data(project: Project, prepared: PreparedData) -> DataCheckReport:
    """Run the data checks; raise DataCheckError naming every failure."""
    report = run_data_checks(prepared.X, prepared.y, prepared.spec.names, project.config.checks)
    if not report.passed:
        raise DataCheckError("data checks failed, training stopped:\n  - " + "\n  - ".join(report.failures))
    return report


def score_version(registry: Registry, version: int, frame: pd.DataFrame) -> np.ndarray:
    """P(positive) of a registered version on raw rows, with that version's own feature spec."""
    artifacts = registry.load_artifacts(version)
    spec = feats.FeatureSpec.from_json(artifacts.feature_spec)
    missing = [c for c in spec.input_columns if c not in frame.columns]
    if missing:
        raise PipelineError(f"v{version} needs input column(s) {', '.join(missing)} absent here")
    return onnx_predict(artifacts.onnx, feats.build_matrix(spec, frame))


def champion_inputs(registry: Registry, version: int | None) -> dict[str, str] | None:
    if version is None:
        return None
    return feats.FeatureSpec.from_json(registry.load_artifacts(version).feature_spec).input_types


def train_challenger(
    project: Project, reporter: Reporter | None = None, registry: Registry | None = None
) -> TrainResult:
    """The whole training step: extract, check, train, log, evaluate, register, gate, promote."""
    reporter = reporter or QuietReporter()
    registry = registry or open_registry(project)
    champion = registry.alias_version(CHAMPION)
    champ_inputs = champion_inputs(registry, champion)
    with reporter.step("Extract the training window"):
        snapshot = extract_training_window(project, list(champ_inputs or {}))
    result = train_on_snapshot(project, snapshot, reporter, registry)
    promoted = False
    if result.gate.passed:
        with reporter.step("Promote: move alias champion"):
            move_champion(registry, open_state(project.state_url), result.version, "promote",
                          result.gate.summary())
            promoted = True
    return dataclasses.replace(result, promoted=promoted)


def train_on_snapshot(project: Project, snapshot: Snapshot, reporter: Reporter | None = None,
                      registry: Registry | None = None) -> TrainResult:
    """Check, train, log, register as `challenger`, and gate against the champion; no promotion."""
    reporter = reporter or QuietReporter()
    registry = registry or open_registry(project)
    cfg = project.config
    champion = registry.alias_version(CHAMPION)
    champ_inputs = champion_inputs(registry, champion)
    with reporter.step("Build features on DuckDB"):
        prepared = prepare_features(project, snapshot)
    with reporter.step("Data checks and leakage screen"):
        report = check_data(project, prepared)

    tags = {**snapshot.lineage(), "git_sha": git_sha(project.path.parent),
            "config_hash": project.config_hash(), "model_type": cfg.model.type}
    with registry.run(f"{cfg.model.type}-{snapshot.window_start}-{snapshot.window_end}", tags) as run_id:
        total = _expected_iterations(cfg.model.type, cfg.model.params)
        with reporter.step(f"Train challenger ({cfg.model.type})", total=total) as advance:
            fitted = train_model(cfg.model, prepared.training_data(), advance)
        with reporter.step("Evaluate on the holdout, log to MLflow"):
            hold = prepared.split.holdout
            X_hold, y_hold = prepared.X[hold], prepared.y[hold]
            native = fitted.predict(X_hold)
            exported = onnx_predict(fitted.onnx, X_hold)
            diff = np.abs(native - exported)
            max_diff = float(np.max(diff)) if len(hold) else 0.0
            share_over = float(np.mean(diff > ONNX_PARITY_TOLERANCE)) if len(hold) else 0.0
            if share_over > ONNX_PARITY_MAX_SHARE or max_diff > ONNX_MAX_DIFF:
                raise PipelineError(
                    f"ONNX export differs from the native model: {share_over:.2%} of holdout rows by "
                    f"more than {ONNX_PARITY_TOLERANCE} (allowed {ONNX_PARITY_MAX_SHARE:.1%}), at most by "
                    f"{max_diff:.2e} (allowed {ONNX_MAX_DIFF}); not registering it")
            metrics = holdout_metrics(y_hold, exported)
            _log_training(registry, run_id, project, prepared, report, fitted, metrics, max_diff,
                          share_over)
            _log_reference(registry, run_id, prepared, exported)
        with reporter.step("Register; score the champion; gate"):
            version = registry.register_onnx(run_id, fitted.onnx, prepared.spec.to_json(),
                                             {**tags, "run_id": run_id})
            registry.set_alias(CHALLENGER, version)
            champ_metrics = None
            if champion is not None:
                p_champ = score_version(registry, champion, prepared.frame.iloc[hold])
                champ_metrics = holdout_metrics(y_hold, p_champ)
                registry.log_metrics(run_id, {f"champion_{k}": v for k, v in champ_metrics.items()})
            gate = decide_gate(cfg.gate, metrics, champ_metrics, prepared.spec.input_types, champ_inputs)
            registry.set_version_tags(version, {
                "gate": "passed" if gate.passed else "failed", "gate_reasons": " | ".join(gate.reasons),
                "champion_at_evaluation": str(champion) if champion else "none",
            })
            registry.set_run_tags(run_id, {"gate": "passed" if gate.passed else "failed"})
    return TrainResult(run_id, version, cfg.model.type, metrics, champion, champ_metrics, gate,
                       False, prepared, report, fitted, max_diff)


def _log_reference(registry: Registry, run_id: str, prepared: PreparedData, holdout_p: np.ndarray) -> None:
    """The training reference for monitoring: a profile of every feature and of the predictions."""
    from flywheel.monitoring.reference import reference_artifacts

    with tempfile.TemporaryDirectory() as tmp:
        for path in reference_artifacts(prepared.spec, prepared.X[prepared.split.train], holdout_p,
                                        Path(tmp)):
            registry.log_artifact(run_id, path, "reference")


def _log_training(registry: Registry, run_id: str, project: Project, prepared: PreparedData,
                  report: DataCheckReport, fitted: FittedModel, metrics: dict[str, float],
                  max_diff: float, share_over: float) -> None:
    params = {**{f"model.{k}": v for k, v in fitted.params.items()},
              **{f"split.{k}": v for k, v in prepared.split.describe().items()},
              "model.type": fitted.kind, "features": ",".join(prepared.spec.names),
              "target": project.config.data.target.model_dump_json()}
    registry.log_params(run_id, params)
    registry.log_history(run_id, fitted.history)
    registry.log_metrics(run_id, {
        **{f"holdout_{k}": v for k, v in metrics.items()},
        "best_iteration": fitted.best_iteration, "train_seconds": fitted.train_seconds,
        "onnx_max_abs_diff": max_diff, "onnx_share_over_tolerance": share_over,
        "snapshot_rows": prepared.snapshot.rows,
        "immature_rows_dropped": prepared.snapshot.immature_dropped,
    })
    registry.log_text(run_id, json.dumps(report.__dict__, indent=2, default=str), "data_checks.json")
    with tempfile.TemporaryDirectory() as tmp:
        png = calibration_plot(prepared.y[prepared.split.holdout],
                               onnx_predict(fitted.onnx, prepared.X[prepared.split.holdout]),
                               Path(tmp) / "calibration.png",
                               f"{fitted.kind} on the holdout (ROC-AUC {metrics['roc_auc']:.3f})")
        registry.log_artifact(run_id, png)
        for name, data in fitted.native_files.items():
            path = Path(tmp) / name
            path.write_bytes(data)
            registry.log_artifact(run_id, path, "native")


def _expected_iterations(model_type: str, params: dict[str, Any]) -> int:
    if model_type == "lightgbm":
        return int(params.get("num_boost_round", 300))
    if model_type == "torch-mlp":
        return int(params.get("max_epochs", 30))
    return 1


# ---- evaluate, promote, rollback, status -------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    version: int
    metrics: dict[str, float]
    champion_version: int | None
    champion_metrics: dict[str, float] | None
    gate: GateDecision
    holdout_rows: int


def evaluate_version(project: Project, version: int | None = None,
                     registry: Registry | None = None, snapshot: Snapshot | None = None) -> Evaluation:
    """Score a version (default: the challenger) and the champion on one holdout; gate it.

    The holdout is the latest slice of `snapshot` (default: today's extract of the configured window).
    """
    registry = registry or open_registry(project)
    version = version if version is not None else registry.alias_version(CHALLENGER)
    if version is None:
        raise PipelineError("no version given and no challenger registered: run flywheel train first")
    champion = registry.alias_version(CHAMPION)
    inputs = feats.FeatureSpec.from_json(registry.load_artifacts(version).feature_spec).input_types
    champ_inputs = champion_inputs(registry, champion) if champion not in (None, version) else None
    if snapshot is None:
        snapshot = extract_training_window(project, list(inputs) + list(champ_inputs or {}))
    frame = snapshot.frame()
    split = split_by_time(frame[project.config.data.time_column], project.config.split)
    hold = frame.iloc[split.holdout]
    y = hold[TARGET].to_numpy(dtype=np.int64)
    metrics = holdout_metrics(y, score_version(registry, version, hold))
    champ_metrics = None
    if champ_inputs is not None and champion is not None:
        champ_metrics = holdout_metrics(y, score_version(registry, champion, hold))
    gate = decide_gate(project.config.gate, metrics, champ_metrics, inputs, champ_inputs)
    return Evaluation(version, metrics, champion if champ_inputs is not None else None,
                      champ_metrics, gate, len(hold))


def move_champion(registry: Registry, state: Any, version: int, action: str, reason: str) -> AliasMove:
    """Point `champion` at `version` and record the move (with the previous champion)."""
    registry.version(version)  # raises RegistryError for an unknown version
    previous = registry.alias_version(CHAMPION)
    registry.set_alias(CHAMPION, version)
    move = AliasMove(registry.model_name, CHAMPION, version, previous, action, reason, now())
    record_alias_move(state, move)
    return move


def promote(project: ProjectBase, version: int, alias: str = CHAMPION, reason: str = "manual") -> AliasMove:
    """Move an alias by hand (no gate): `champion` is recorded in the alias history."""
    registry = open_registry(project)
    state = open_state(project.state_url)
    if alias.lower() in ("champion", "production"):
        return move_champion(registry, state, version, "manual", reason)
    registry.version(version)
    previous = registry.alias_version(alias)
    registry.set_alias(alias, version)
    move = AliasMove(registry.model_name, alias, version, previous, "manual", reason, now())
    record_alias_move(state, move)
    return move


def rollback(project: ProjectBase) -> AliasMove:
    """Return `champion` to the version it replaced, from the alias history."""
    registry = open_registry(project)
    state = open_state(project.state_url)
    current = registry.alias_version(CHAMPION)
    if current is None:
        raise PipelineError("nothing to roll back: no version has alias champion")
    # The move that made the current champion champion, not a rollback onto it: rolling back
    # twice walks further back instead of bouncing between two versions.
    moves = [m for m in alias_moves(state, registry.model_name, CHAMPION)
             if m.version == current and m.action != "rollback"]
    if not moves or moves[-1].previous_version is None:
        raise PipelineError(f"v{current} is the first champion of {registry.model_name}: "
                            "there is no earlier champion to return to")
    target = moves[-1].previous_version
    return move_champion(registry, state, target, "rollback", f"rollback from v{current}")


def project_status(project: Project | LlmProject) -> dict[str, Any]:
    registry = open_registry(project)
    out: dict[str, Any] = {"model": registry.model_name, "project": project.config.project,
                           "kind": project.config.kind, "gate_metric": project.config.gate.metric,
                           "tracking_uri": project.tracking_url}
    for alias in (CHAMPION, CHALLENGER):
        version = registry.alias_version(alias)
        out[alias] = _describe(registry.version(version)) if version is not None else None
    try:
        state = open_state(project.state_url)
        out["champion_history"] = [
            {"version": m.version, "previous_version": m.previous_version, "action": m.action,
             "reason": m.reason, "moved_at": m.moved_at.isoformat()}
            for m in alias_moves(state, registry.model_name, CHAMPION)
        ]
    except Exception as exc:  # status must still answer when the state DB is unreachable
        out["champion_history_error"] = str(exc)
    return out


_LORA_METRICS = ("perplexity_before", "perplexity_after", "champion_perplexity", "seconds_per_step",
                 "tokens_per_second")


def _describe(info: VersionInfo) -> dict[str, Any]:
    metrics = {k.removeprefix("holdout_"): v for k, v in info.metrics.items() if k.startswith("holdout_")}
    for name in ("train_seconds", *_LORA_METRICS):
        if name in info.metrics:
            metrics[name] = info.metrics[name]
    return {
        "version": info.version,
        "run_id": info.run_id,
        "aliases": info.aliases,
        "model_type": info.run_tags.get("model_type"),
        "metrics": metrics,
        "gate": info.tags.get("gate"),
        "gate_reasons": info.tags.get("gate_reasons"),
        "data_hash": info.run_tags.get("data_hash"),
        "git_sha": info.run_tags.get("git_sha"),
        "config_hash": info.run_tags.get("config_hash"),
        "trained_on": {"from": info.run_tags.get("window_start"), "to": info.run_tags.get("window_end"),
                       "as_of": info.run_tags.get("as_of"), "rows": _int(info.run_tags.get("rows"))},
    }


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def git_sha(where: Path) -> str:
    """The commit the code was trained from, '+dirty' if the tree has changes, or 'unknown'."""
    try:
        found = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        sha = found.stdout.strip()
        if found.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


__all__ = ["RegistryError"]
