"""The model lifecycle as plain functions: the use cases the CLI, the pipeline, the servers and a
notebook call. Train a challenger, evaluate it against the champion, promote, roll back, show the
status; every alias move goes through `move_alias`.

    from flywheel.config import load_project
    from flywheel import lifecycle

    project = load_project("flywheel.yaml")
    result = lifecycle.train_challenger(project)
    lifecycle.project_status(project)["champion"]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flywheel.lifecycle.aliases import (
        PromotionOutcome,
        move_alias,
        promote,
        promote_if_passed,
        reconcile_aliases,
        rollback,
    )
    from flywheel.lifecycle.challenger import Challenger, train_on_features
    from flywheel.lifecycle.evaluation import (
        Evaluation,
        evaluate_against_champion,
        evaluate_version,
        load_champion,
        score_version,
    )
    from flywheel.lifecycle.features import (
        PreparedData,
        check_data,
        extract_training_window,
        prepare_features,
        prepare_frame,
    )
    from flywheel.lifecycle.importing import import_challenger
    from flywheel.lifecycle.init import Proposal, propose_project, render_config
    from flywheel.lifecycle.intake import IngestResult, ingest
    from flywheel.lifecycle.status import project_status
    from flywheel.lifecycle.train import TrainResult, train_challenger

# Each name is imported on first use, so that a process which needs only the alias path (a server
# reconciling aliases before its workers start) does not import the training stack.
_HOME = {
    "Challenger": "challenger",
    "Evaluation": "evaluation",
    "IngestResult": "intake",
    "Proposal": "init",
    "PreparedData": "features",
    "PromotionOutcome": "aliases",
    "TrainResult": "train",
    "check_data": "features",
    "evaluate_against_champion": "evaluation",
    "evaluate_version": "evaluation",
    "extract_training_window": "features",
    "import_challenger": "importing",
    "ingest": "intake",
    "load_champion": "evaluation",
    "move_alias": "aliases",
    "prepare_features": "features",
    "prepare_frame": "features",
    "project_status": "status",
    "propose_project": "init",
    "render_config": "init",
    "promote": "aliases",
    "promote_if_passed": "aliases",
    "reconcile_aliases": "aliases",
    "rollback": "aliases",
    "score_version": "evaluation",
    "train_challenger": "train",
    "train_on_features": "challenger",
}

__all__ = [
    "Challenger", "Evaluation", "IngestResult", "PreparedData", "Proposal", "PromotionOutcome", "TrainResult",
    "check_data",
    "evaluate_against_champion", "evaluate_version", "extract_training_window", "import_challenger",
    "ingest",
    "load_champion",
    "move_alias", "prepare_features", "prepare_frame", "project_status", "promote", "propose_project",
    "render_config",
    "promote_if_passed", "reconcile_aliases", "rollback", "score_version", "train_challenger",
    "train_on_features",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'flywheel.lifecycle' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"flywheel.lifecycle.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
