"""Challenger against champion on the same holdout: score both, decide the gate once, record it."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from flywheel.config import Project
from flywheel.core.errors import PipelineError
from flywheel.data import features as feats
from flywheel.data.sources import TARGET, Snapshot, target_values
from flywheel.lifecycle.card import CardFacts, publish_card
from flywheel.lifecycle.features import PreparedData, extract_training_window
from flywheel.registry import CHALLENGER, CHAMPION, Registry, VersionInfo
from flywheel.training.evaluate import GateDecision, decide_gate, task_metrics
from flywheel.training.onnx import new_session, session_predict
from flywheel.training.split import split_by_time

log = logging.getLogger("flywheel.lifecycle")


@dataclass(frozen=True)
class ScoredVersion:
    """A registered version ready to score raw rows with its own feature spec (hash-checked)."""

    version: int
    spec: feats.FeatureSpec
    session: Any

    @property
    def inputs(self) -> dict[str, str]:
        return self.spec.input_types

    def answers_like(self, spec: feats.FeatureSpec) -> None:
        """Refuse to compare with a model of another task or other classes: their metrics would
        not mean the same (a project that changes its target starts a new registered model)."""
        mine = (self.spec.task, self.spec.classes)
        if mine != (spec.task, spec.classes):
            raise PipelineError(
                f"champion v{self.version} is a {mine[0]} model" + (f" of classes {mine[1]}" if mine[1]
                                                                  else "")
                + f"; the challenger is a {spec.task} model" + (f" of classes {spec.classes}" if
                                                                spec.classes else "")
                + ": they cannot be compared. Give the project a new model_name for the new target.")

    def score(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.spec.input_columns if c not in frame.columns]
        if missing:
            raise PipelineError(f"v{self.version} needs input column(s) {', '.join(missing)} "
                                "absent here")
        return session_predict(self.session, feats.build_matrix(self.spec, frame))


def load_version_for_scoring(registry: Registry, version: int) -> ScoredVersion:
    artifacts = registry.load_artifacts(version)  # once per registry object; hash-checked
    return ScoredVersion(version, feats.FeatureSpec.from_json(artifacts.feature_spec),
                         new_session(artifacts.onnx))


def load_champion(registry: Registry, version: int | None = None) -> ScoredVersion | None:
    """The champion (or the given version), or None when there is none yet."""
    version = registry.alias_version(CHAMPION) if version is None else version
    return None if version is None else load_version_for_scoring(registry, version)


def score_version(registry: Registry, version: int, frame: pd.DataFrame) -> np.ndarray:
    """P(positive) of a registered version on raw rows, with that version's own feature spec."""
    return load_version_for_scoring(registry, version).score(frame)


@dataclass(frozen=True)
class Evaluation:
    """The gate's decision for one version against the champion, on one holdout."""

    version: int
    metrics: dict[str, float]
    champion_version: int | None
    champion_metrics: dict[str, float] | None
    gate: GateDecision
    holdout_rows: int


def evaluate_against_champion(project: Project, registry: Registry, prepared: PreparedData,
                              version: int, metrics: dict[str, float], run_id: str,
                              champion: ScoredVersion | None, card: CardFacts | None = None) -> Evaluation:
    """Score the champion on the challenger's holdout, decide the gate, record it on the version."""
    hold = prepared.split.holdout
    champ_metrics = None
    if champion is not None:
        champion.answers_like(prepared.spec)
        champ_metrics = task_metrics(prepared.spec.task, prepared.y[hold],
                                     champion.score(prepared.frame.iloc[hold]), prepared.spec.classes)
        registry.log_metrics(run_id, {f"champion_{k}": v for k, v in champ_metrics.items()})
    gate = decide_gate(project.config.gate, metrics, champ_metrics, prepared.spec.input_types,
                       champion.inputs if champion else None)
    note = prepared.split.feedback_note()
    if note:  # the verdict says how much of what it was decided on came from callers' labels
        gate = dataclasses.replace(gate, reasons=[*gate.reasons, note])
    verdict = "passed" if gate.passed else "failed"
    registry.set_version_tags(version, {
        "gate": verdict, "gate_reasons": " | ".join(gate.reasons),
        "champion_at_evaluation": str(champion.version) if champion else "none"})
    registry.set_run_tags(run_id, {"gate": verdict})
    try:  # the card states the gate's decision: made now that it is known
        publish_card(project, registry, version, card)
    except Exception as exc:  # a card that cannot be made must not undo a training
        log.warning("model card not written: %s: %s (flywheel card makes it later)",
                    type(exc).__name__, exc, extra={"event": "model_card_error", "version": version})
    return Evaluation(version, metrics, champion.version if champion else None, champ_metrics, gate,
                      len(hold))


def evaluate_version(project: Project, version: int | None = None, registry: Registry | None = None,
                     snapshot: Snapshot | None = None) -> Evaluation:
    """`flywheel evaluate`: score a version (default: the challenger) and the champion on today's
    holdout of the configured window (or of `snapshot`) and show the gate's decision; records
    nothing."""
    registry = registry or Registry.for_project(project)
    version = version if version is not None else registry.alias_version(CHALLENGER)
    if version is None:
        raise PipelineError("no version given and no challenger registered: run flywheel train first")
    candidate = load_version_for_scoring(registry, version)
    champion_version = registry.alias_version(CHAMPION)
    champion = load_champion(registry, champion_version) if champion_version not in (None, version) \
        else None
    if snapshot is None:
        snapshot = extract_training_window(project, list(candidate.inputs)
                                           + list(champion.inputs if champion else {}))
    frame = snapshot.frame()
    split = split_by_time(frame[project.config.data.time_column], project.config.split)
    hold = frame.iloc[split.holdout]
    spec = candidate.spec
    if champion:
        champion.answers_like(spec)
    y = target_values(hold[TARGET], spec.task, spec.classes)
    metrics = task_metrics(spec.task, y, candidate.score(hold), spec.classes)
    champ_metrics = task_metrics(spec.task, y, champion.score(hold), spec.classes) if champion else None
    gate = decide_gate(project.config.gate, metrics, champ_metrics, candidate.inputs,
                       champion.inputs if champion else None)
    seen = [note for v in (version, champion.version if champion else None) if v is not None
            if (note := saw_holdout(registry.version(v), split.holdout_from)) is not None]
    if seen:  # its score here is optimistic: the decision says so, next to the numbers
        gate = dataclasses.replace(gate, reasons=[*gate.reasons, *seen])
    return Evaluation(version, metrics, champion.version if champion else None, champ_metrics, gate,
                      len(hold))


def saw_holdout(info: VersionInfo, holdout_from: pd.Timestamp) -> str | None:
    """Why a version's score on a holdout starting at `holdout_from` is optimistic: it trained or
    early-stopped on rows after that start (its own holdout began later). None: it did not."""
    own = info.params.get("split.holdout_from")
    if not own:
        return None
    try:
        own_start = pd.Timestamp(own)
    except ValueError:
        return None
    if own_start <= holdout_from:
        return None
    return (f"caution: v{info.version} trained and early-stopped on rows up to {own_start.date()}, "
            f"inside this holdout (from {holdout_from.date()}): its score here is optimistic")
