"""The served model: loaded from the registry (hash-checked ONNX), warmed, and hot-swapped.

A `LoadedModel` is immutable. The runtime holds a reference to the current one; a request takes
that reference once and finishes on it, so a swap (one reference assignment) never disturbs
requests in flight, and the old model is freed when the last of them is done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from flywheel.core.times import EventTimes
from flywheel.data.features import FeatureSpec, RowFn, row_function
from flywheel.registry import Registry
from flywheel.serving.tabular.answers import TaskAnswers
from flywheel.serving.tabular.validation import RecordValidator
from flywheel.training.onnx import ONNX_INPUT, TASK_OUTPUT, new_session

log = logging.getLogger("flywheel.serving")


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    run_id: str
    spec: FeatureSpec
    session: Any  # onnxruntime.InferenceSession
    features_of: RowFn
    validator: RecordValidator
    lineage: dict[str, Any]
    answers: TaskAnswers
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def output(self) -> list[str]:
        return [TASK_OUTPUT.get(self.spec.task, TASK_OUTPUT["binary"])]

    def predict(self, records: list[dict[str, Any]]) -> np.ndarray:
        """The model's output for valid records (raw input fields): P(positive), the value, or
        (records, classes) probabilities."""
        features_of = self.features_of
        X = np.array([features_of(r) for r in records], dtype=np.float32)
        return self.session.run(self.output, {ONNX_INPUT: X})[0]

    def predict_matrix(self, X: np.ndarray) -> np.ndarray:
        return self.session.run(self.output, {ONNX_INPUT: np.ascontiguousarray(X, np.float32)})[0]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "run_id": self.run_id,
            "loaded_at": self.loaded_at.isoformat(), "lineage": self.lineage,
            "inputs": [{"name": n, "type": t, "nullable": n in self.spec.nullable_inputs}
                       for n, t in self.spec.input_types.items()],
            "features": self.spec.names,
            "task": self.spec.task, **({"classes": self.spec.classes} if self.spec.classes else {}),
        }


def load_version(registry: Registry, version: int, max_records: int = 1000,
                 max_string_length: int = 1000, threshold: float = 0.5,
                 times: EventTimes | None = None) -> LoadedModel:
    """Download, verify hashes, build the session and warm it up."""
    info = registry.version(version)
    artifacts = registry.load_artifacts(version)  # refuses a file whose hash does not match
    spec = FeatureSpec.from_json(artifacts.feature_spec)
    model = LoadedModel(
        name=registry.model_name, version=version, run_id=info.run_id, spec=spec,
        session=new_session(artifacts.onnx), features_of=row_function(spec),
        validator=RecordValidator(spec, max_records, max_string_length, times),
        lineage={
            "run_id": info.run_id, "model_type": info.run_tags.get("model_type"),
            "data_hash": info.run_tags.get("data_hash"), "git_sha": info.run_tags.get("git_sha"),
            "trained_on": {"from": info.run_tags.get("window_start"),
                           "to": info.run_tags.get("window_end"),
                           "as_of": info.run_tags.get("as_of"),
                           "rows": int(info.run_tags.get("rows") or 0)},
            "gate": info.tags.get("gate"),
        },
        answers=TaskAnswers.of(spec, threshold),
    )
    warm_up(model)
    return model


def warm_up(model: LoadedModel, rounds: int = 20) -> None:
    """Run the first predictions before the model takes traffic (ORT allocates lazily)."""
    record = {n: (0.0 if t == "number" else "") for n, t in model.spec.input_types.items()}
    for size in (1, 8):
        for _ in range(rounds):
            model.predict([record] * size)
