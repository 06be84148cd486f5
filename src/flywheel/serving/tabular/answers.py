"""What a served model answers, by task: the JSON of `/v1/predict`, the prediction log's columns,
the Open Inference Protocol's outputs, `flywheel predict`'s columns and the OpenAPI schema.

- binary: `probability` (P(positive)) and `decision` (probability >= serving.threshold);
- regression: `value`;
- multiclass: `label` (the most probable class), `probability` (the label's) and `probabilities`
  (every class's, by class name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flywheel.data.features import FeatureSpec


@dataclass(frozen=True)
class TaskAnswers:
    task: str
    classes: list[str]
    threshold: float

    @classmethod
    def of(cls, spec: FeatureSpec, threshold: float) -> TaskAnswers:
        return cls(spec.task, list(spec.classes), threshold)

    @property
    def top_level(self) -> dict[str, Any]:
        """The response's fields beside the predictions: the threshold a decision used, or the task."""
        return {"threshold": self.threshold} if self.task == "binary" else {"task": self.task}

    def log_fields(self, outs: list[Any]) -> list[tuple[Any, ...]]:
        """Per record, what the log stores after the record: probability, decision and (for
        regression and multiclass) (value, label, scores); see `predlog.Row`."""
        if self.task == "regression":
            return [(None, None, (v, None, None)) for v in outs]
        if self.task == "multiclass":
            classes = self.classes
            rows = []
            for p in outs:
                best = max(range(len(p)), key=p.__getitem__)
                rows.append((p[best], None, (None, classes[best], dict(zip(classes, p, strict=True)))))
            return rows
        threshold = self.threshold
        return [(p, p >= threshold) for p in outs]

    def predictions(self, ids: list[str], fields: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """The `predictions` list of a `/v1/predict` answer."""
        if self.task == "regression":
            return [{"record_id": r, "value": f[2][0]} for r, f in zip(ids, fields, strict=True)]
        if self.task == "multiclass":
            return [{"record_id": r, "label": f[2][1], "probability": f[0], "probabilities": f[2][2]}
                    for r, f in zip(ids, fields, strict=True)]
        return [{"record_id": r, "probability": f[0], "decision": f[1]}
                for r, f in zip(ids, fields, strict=True)]

    def oip_outputs(self, fields: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """The Open Inference Protocol's output tensors (see `oip_declared` for their shapes)."""
        n = len(fields)
        if self.task == "regression":
            return [{"name": "value", "shape": [n], "datatype": "FP64", "data": [f[2][0] for f in fields]}]
        if self.task == "multiclass":
            k = len(self.classes)
            flat = [f[2][2][c] for f in fields for c in self.classes]
            return [{"name": "label", "shape": [n], "datatype": "BYTES", "data": [f[2][1] for f in fields]},
                    {"name": "probabilities", "shape": [n, k], "datatype": "FP64", "data": flat,
                     "parameters": {"classes": self.classes}}]
        return [{"name": "probability", "shape": [n], "datatype": "FP64", "data": [f[0] for f in fields]},
                {"name": "decision", "shape": [n], "datatype": "BOOL", "data": [f[1] for f in fields]}]

    def oip_declared(self) -> list[dict[str, Any]]:
        if self.task == "regression":
            return [{"name": "value", "datatype": "FP64", "shape": [-1]}]
        if self.task == "multiclass":
            return [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP64", "shape": [-1, len(self.classes)]}]
        return [{"name": "probability", "datatype": "FP64", "shape": [-1]},
                {"name": "decision", "datatype": "BOOL", "shape": [-1]}]

    def prediction_schema(self) -> dict[str, Any]:
        """The OpenAPI schema of one item of `predictions`."""
        props: dict[str, Any] = {"record_id": {"type": "string"},
                                 # during a canary rollout, in a request both versions answered
                                 "version": {"type": "integer"}}
        if self.task == "regression":
            props["value"] = {"type": "number"}
        elif self.task == "multiclass":
            props.update(label={"type": "string", "enum": self.classes}, probability={"type": "number"},
                         probabilities={"type": "object", "properties": {
                             c: {"type": "number"} for c in self.classes}})
        else:
            props.update(probability={"type": "number"}, decision={"type": "boolean"})
        return {"type": "object", "properties": props}

    def columns(self, outs: np.ndarray) -> dict[str, Any]:
        """`flywheel predict`'s output columns, named as the log's."""
        if self.task == "regression":
            return {"value": np.asarray(outs, dtype=np.float64)}
        if self.task == "multiclass":
            P = np.asarray(outs, dtype=np.float64)
            best = P.argmax(axis=1)
            cols: dict[str, Any] = {"label": np.asarray(self.classes, dtype=object)[best],
                                    "probability": P[np.arange(len(P)), best]}
            cols.update({f"probability_{c}": P[:, i] for i, c in enumerate(self.classes)})
            return cols
        p = np.asarray(outs, dtype=np.float64)
        return {"probability": p, "decision": p >= self.threshold}
