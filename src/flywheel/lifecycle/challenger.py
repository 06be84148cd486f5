"""Train a challenger on prepared data: fit, check the ONNX export, log the run, register it."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.config import Project
from flywheel.core.errors import PipelineError
from flywheel.core.lineage import git_sha
from flywheel.core.progress import QuietReporter, Reporter
from flywheel.data.checks import DataCheckReport
from flywheel.lifecycle.card import CardFacts
from flywheel.lifecycle.card_facts import log_card_facts
from flywheel.lifecycle.features import PreparedData
from flywheel.monitoring.estimation import (
    CALIBRATION_FILE,
    ESTIMATION_ARTIFACT,
    EstimationError,
    fit_calibration,
    fit_loss_model,
)
from flywheel.monitoring.reference import reference_artifacts
from flywheel.registry import CHALLENGER, Registry
from flywheel.training.evaluate import holdout_plot, task_metrics
from flywheel.training.model import FittedModel
from flywheel.training.onnx import onnx_predict
from flywheel.training.trainers import train_model

ONNX_PARITY_TOLERANCE = 1e-4
# ONNX tree ensembles hold split thresholds as float32, LightGBM as float64: a row whose feature
# value lies between the two roundings of a threshold takes the other branch. That is a property
# of the format, not a broken export, and touches a handful of rows; a broken export moves most of
# them. So: at most this share of rows may differ by more than the tolerance, and none by more
# than ONNX_MAX_DIFF.
ONNX_PARITY_MAX_SHARE = 0.001
ONNX_MAX_DIFF = 0.01
# A regression's values are in the target's units: a difference counts against a tolerance of
# ONNX_PARITY_TOLERANCE + ONNX_PARITY_RTOL x |value| (float32 holds about 7 digits), and the
# largest may reach ONNX_MAX_DIFF / ONNX_PARITY_TOLERANCE (100) times that.
ONNX_PARITY_RTOL = 1e-5


@dataclass(frozen=True)
class Challenger:
    """A trained, registered model version with alias `challenger` (not gated yet)."""

    run_id: str
    version: int
    model_type: str
    metrics: dict[str, float]  # on the holdout, from the ONNX export
    holdout_p: np.ndarray
    fitted: FittedModel
    onnx_max_abs_diff: float
    card_facts: CardFacts | None = None  # what its model card is made from, kept from training


def training_tags(project: Project, prepared: PreparedData) -> dict[str, str]:
    """Lineage recorded on the run and the version: data snapshot, code, config, model type."""
    snapshot_tags = prepared.snapshot.lineage() if prepared.snapshot else {}
    return {**snapshot_tags, "git_sha": git_sha(project.path.parent),
            "config_hash": project.config_hash(), "model_type": project.config.model.type}


def train_on_features(project: Project, prepared: PreparedData, checks: DataCheckReport,
                      registry: Registry, reporter: Reporter | None = None,
                      fitted: FittedModel | None = None,
                      extra_tags: dict[str, str] | None = None) -> Challenger:
    """Train (or take the `fitted` model given: an imported one), check the export's parity, log
    everything to MLflow, register as `challenger`."""
    reporter = reporter or QuietReporter()
    cfg = project.config
    tags = {**training_tags(project, prepared), **(extra_tags or {})}
    window = f"{tags.get('window_start')}-{tags.get('window_end')}"
    with registry.run(f"{tags['model_type']}-{window}", tags) as run_id:
        if fitted is None:
            total = expected_iterations(cfg.model.type, cfg.model.params)
            with reporter.step(f"Train challenger ({cfg.model.type})", total=total) as advance:
                fitted = train_model(cfg.model, prepared.training_data(), advance)
        with reporter.step("Evaluate on the holdout, log to MLflow"):
            hold = prepared.split.holdout
            exported, max_diff, share_over = onnx_parity(fitted, prepared.X[hold], prepared.spec.task)
            metrics = task_metrics(prepared.spec.task, prepared.y[hold], exported, prepared.spec.classes)
            card_facts = log_training(registry, run_id, project, prepared, checks, fitted, metrics,
                                      exported, max_diff, share_over)
        with reporter.step("Register the challenger"):
            version = registry.register_onnx(run_id, fitted.onnx, prepared.spec.to_json(),
                                             {**tags, "run_id": run_id})
            attach_calibration(registry, version, prepared, fitted.onnx)
            registry.set_alias(CHALLENGER, version)
    return Challenger(run_id, version, tags["model_type"], metrics, exported, fitted, max_diff, card_facts)


def attach_calibration(registry: Registry, version: int, prepared: PreparedData, onnx: bytes) -> None:
    """What performance estimation needs, fitted on the validation slice (never the holdout the
    gate scores) from the export's outputs, as served: a classifier's calibration, a regression's
    loss models; attached to the version, hash-checked. A version that cannot have them gets the
    reason instead, which monitoring shows."""
    task = prepared.spec.task
    val = prepared.split.validation
    try:
        served = onnx_predict(onnx, prepared.X[val])
        calibration: dict[str, Any] = (
            fit_loss_model(prepared.X[val], prepared.y[val], served) if task == "regression"
            else fit_calibration(task, prepared.y[val], served, prepared.spec.classes)).to_dict()
    except EstimationError as exc:
        calibration = {"task": task, "refused": str(exc)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / CALIBRATION_FILE).write_text(json.dumps(calibration))
        registry.attach_folder(version, folder, ESTIMATION_ARTIFACT)


def onnx_parity(fitted: FittedModel, X_hold: np.ndarray, task: str = "binary"
                ) -> tuple[np.ndarray, float, float]:
    """The export's holdout predictions, its largest difference from the native model, and the
    share of rows over the tolerance; raises when the export is broken. Every output is compared:
    each class's probability of a multiclass model; a regression's value against a tolerance
    that grows with it (ONNX_PARITY_RTOL)."""
    native = np.asarray(fitted.predict(X_hold), dtype=np.float64)
    exported = onnx_predict(fitted.onnx, X_hold)
    if native.shape != exported.shape:
        raise PipelineError(f"ONNX export answers shape {exported.shape}, the native model "
                            f"{native.shape}; not registering it")
    diff = np.abs(native - exported)
    scale = ONNX_PARITY_TOLERANCE + (ONNX_PARITY_RTOL * np.abs(native) if task == "regression" else 0.0)
    ratio = diff / scale
    if ratio.ndim == 2:  # a row differs by its worst class
        ratio, diff = ratio.max(axis=1), diff.max(axis=1)
    max_diff = float(np.max(diff)) if len(X_hold) else 0.0
    share_over = float(np.mean(ratio > 1)) if len(X_hold) else 0.0
    worst = float(np.max(ratio)) if len(X_hold) else 0.0
    if share_over > ONNX_PARITY_MAX_SHARE or worst > ONNX_MAX_DIFF / ONNX_PARITY_TOLERANCE:
        allowed = (f"{ONNX_PARITY_TOLERANCE} + {ONNX_PARITY_RTOL} x |value|" if task == "regression"
                   else str(ONNX_PARITY_TOLERANCE))
        raise PipelineError(
            f"ONNX export differs from the native model: {share_over:.2%} of holdout rows by "
            f"more than {allowed} (allowed {ONNX_PARITY_MAX_SHARE:.1%}), at most by "
            f"{max_diff:.2e} ({worst:.0f} times the tolerance; allowed "
            f"{ONNX_MAX_DIFF / ONNX_PARITY_TOLERANCE:.0f}); not registering it")
    return exported, max_diff, share_over


def log_training(registry: Registry, run_id: str, project: Project, prepared: PreparedData,
                 checks: DataCheckReport, fitted: FittedModel, metrics: dict[str, float],
                 holdout_p: np.ndarray, max_diff: float, share_over: float) -> CardFacts:
    """Params, curves, metrics, data checks, calibration plot, native files, monitoring reference;
    the card's facts, as logged."""
    params = {**{f"model.{k}": v for k, v in fitted.params.items()},
              **{f"split.{k}": v for k, v in prepared.split.describe().items()},
              "model.type": fitted.kind, "features": ",".join(prepared.spec.names),
              "target": project.config.data.target.model_dump_json()}
    registry.log_params(run_id, params)
    registry.log_history(run_id, fitted.history)
    snapshot = prepared.snapshot
    registry.log_metrics(run_id, {
        **{f"holdout_{k}": v for k, v in metrics.items()},
        "best_iteration": fitted.best_iteration, "train_seconds": fitted.train_seconds,
        "onnx_max_abs_diff": max_diff, "onnx_share_over_tolerance": share_over,
        "snapshot_rows": snapshot.rows if snapshot else len(prepared.frame),
        "immature_rows_dropped": snapshot.immature_dropped if snapshot else 0,
    })
    registry.log_text(run_id, json.dumps(checks.__dict__, indent=2, default=str), "data_checks.json")
    card_facts = log_card_facts(registry, run_id, project, prepared, checks, fitted, metrics, holdout_p)
    with tempfile.TemporaryDirectory() as tmp:
        png = holdout_plot(prepared.spec.task, prepared.y[prepared.split.holdout], holdout_p,
                           Path(tmp), fitted.kind, metrics, prepared.spec.classes)
        registry.log_artifact(run_id, png)
        for name, data in fitted.native_files.items():
            path = Path(tmp) / name
            path.write_bytes(data)
            registry.log_artifact(run_id, path, "native")
        # the training reference that monitoring compares windows with
        folder = Path(tmp) / "reference"
        folder.mkdir()
        for path in reference_artifacts(prepared.spec, prepared.X[prepared.split.train], holdout_p,
                                        folder):
            registry.log_artifact(run_id, path, "reference")
    return card_facts


def expected_iterations(model_type: str, params: dict[str, Any]) -> int:
    if model_type == "lightgbm":
        return int(params.get("num_boost_round", 300))
    if model_type == "torch-mlp":
        return int(params.get("max_epochs", 30))
    return 1
