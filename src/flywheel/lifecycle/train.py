"""`flywheel train` as one call: extract, check, train, register, gate, promote.

Each piece runs once: the champion is loaded once (its input columns shape the extract, its
ONNX session scores the holdout), the features are built once, the gate is decided once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from flywheel.config import Project
from flywheel.core.jsonable import leave_out
from flywheel.core.progress import QuietReporter, Reporter
from flywheel.data.checks import DataCheckReport
from flywheel.lifecycle.challenger import train_on_features
from flywheel.lifecycle.evaluation import evaluate_against_champion, load_champion
from flywheel.lifecycle.features import (
    PreparedData,
    check_data,
    extract_training_window,
    prepare_features,
)
from flywheel.lifecycle.rollout import promote_or_roll_out
from flywheel.registry import Registry
from flywheel.training.evaluate import GateDecision
from flywheel.training.model import FittedModel


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
    prepared: PreparedData = field(metadata=leave_out())  # the frames: not in the JSON form
    checks: DataCheckReport
    fitted: FittedModel = field(metadata=leave_out())
    onnx_max_abs_diff: float
    promotion: str = ""  # why it was or was not promoted


# Gives the model to register instead of training one, the tags of its run, and the data it reads
# (the prepared data it was given, or that of its own inputs: a model over raw columns).
ModelSource = Callable[[PreparedData], tuple[FittedModel, dict[str, str], PreparedData]]


def train_challenger(project: Project, reporter: Reporter | None = None,
                     registry: Registry | None = None, model_from: ModelSource | None = None
                     ) -> TrainResult:
    """The whole training use case; see the module's docstring. `model_from` gives the model
    (and tags for its run) instead of training one: an imported model, gated the same way."""
    reporter = reporter or QuietReporter()
    registry = registry or Registry.for_project(project)
    champion = load_champion(registry)
    with reporter.step("Extract the training window"):
        snapshot = extract_training_window(project, list(champion.inputs) if champion else [])
    with reporter.step("Build features on DuckDB"):
        prepared = prepare_features(project, snapshot)
    with reporter.step("Data checks and leakage screen"):
        checks = check_data(project, prepared)
    fitted: FittedModel | None = None
    tags: dict[str, str] = {}
    if model_from is not None:
        fitted, tags, given = model_from(prepared)
        if given is not prepared:  # the model reads other inputs: check those
            prepared = given
            with reporter.step("Data checks and leakage screen on the model's own inputs"):
                checks = check_data(project, prepared)
    challenger = train_on_features(project, prepared, checks, registry, reporter, fitted, tags)
    with reporter.step("Score the champion on the same holdout; gate"):
        evaluation = evaluate_against_champion(project, registry, prepared, challenger.version,
                                               challenger.metrics, challenger.run_id, champion,
                                               challenger.card_facts)
    with reporter.step("Promote: move alias champion" if evaluation.gate.passed else "Gate failed"):
        outcome, _ = promote_or_roll_out(project, registry, challenger.version,
                                         evaluation.gate.passed, evaluation.gate.summary(),
                                         evaluation.champion_version, datetime.now(UTC))
    return TrainResult(challenger.run_id, challenger.version, challenger.model_type,
                       challenger.metrics, evaluation.champion_version, evaluation.champion_metrics,
                       evaluation.gate, outcome.promoted, prepared, checks, challenger.fitted,
                       challenger.onnx_max_abs_diff, outcome.reason)
