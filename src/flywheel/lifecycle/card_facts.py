"""What a version's model card needs from the training process, logged to its run under `card/`
(the card itself is rendered by `flywheel.lifecycle.card`, which needs no training library)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from flywheel.config import Project
from flywheel.data.checks import DataCheckReport
from flywheel.lifecycle.card import CARD_DIR, FACTS, CardFacts
from flywheel.lifecycle.features import PreparedData
from flywheel.registry import Registry
from flywheel.training.evaluate import (
    IMPORTANCE_METRIC,
    holdout_plot,
    importance_plot,
    permutation_importance,
    roc_pr_plot,
)
from flywheel.training.model import FittedModel
from flywheel.training.onnx import onnx_predict


def log_card_facts(registry: Registry, run_id: str, project: Project, prepared: PreparedData,
                   checks: DataCheckReport, fitted: FittedModel, metrics: dict[str, float],
                   holdout_out: np.ndarray) -> CardFacts:
    """What the card needs from the training process, logged to the run under `card/`; returned
    too, so that the card made next in this process is rendered from memory."""
    spec, split, cfg = prepared.spec, prepared.split, project.config
    hold = split.holdout
    importance = permutation_importance(lambda X: onnx_predict(fitted.onnx, X), prepared.X[hold],
                                        prepared.y[hold], spec.task, spec.names, spec.classes or None)
    threshold = (cfg.checks.leakage_r2_threshold if spec.task == "regression"
                 else cfg.checks.leakage_auc_threshold)
    facts = {
        "task": spec.task, "classes": list(spec.classes), "table": cfg.data.table,
        "target": cfg.data.target.model_dump(mode="json"), "time_column": cfg.data.time_column,
        "id_column": cfg.data.id_column, "features": [f.model_dump(mode="json") for f in cfg.features],
        "inputs": spec.names,
        "sizes": {"train": len(split.train), "validation": len(split.validation), "holdout": len(hold),
                  "validation_from": str(split.validation_from.date()),
                  "holdout_from": str(split.holdout_from.date())},
        "leakage": {"metric": checks.standalone_metric, "threshold": threshold,
                    "accepted": checks.accepted,
                    "top": dict(sorted(checks.standalone_auc.items(), key=lambda kv: -kv[1])[:10])},
        "importance": {"metric": IMPORTANCE_METRIC[spec.task], "values": importance},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        kind = fitted.kind
        plots = [holdout_plot(spec.task, prepared.y[hold], holdout_out, folder, kind, metrics,
                              list(spec.classes))]
        if spec.task == "binary":
            plots.append(roc_pr_plot(prepared.y[hold], holdout_out, folder / "roc_pr.png",
                                     f"{kind} on the holdout"))
        plots.append(importance_plot(importance, IMPORTANCE_METRIC[spec.task], folder / "importance.png"))
        facts["plots"] = [p.name for p in plots]
        (folder / FACTS).write_text(json.dumps(facts, indent=2, default=str))
        for path in [*plots, folder / FACTS]:
            registry.log_artifact(run_id, path, CARD_DIR)
        # as the card reads them back: JSON (dates as text), the images by name
        return CardFacts(json.loads((folder / FACTS).read_text()), {p.name: p.read_bytes() for p in plots})
