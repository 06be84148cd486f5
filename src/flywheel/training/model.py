"""What a trainer takes (a time-split feature matrix) and gives back (a fitted, exported model)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TrainingData:
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    feature_names: list[str]
    # index of each categorical feature -> number of codes it can take (vocabulary + "other")
    cardinalities: dict[int, int]
    task: str = "binary"  # binary: y is 0/1; regression: y is the value; multiclass: a class index
    classes: tuple[str, ...] = ()  # multiclass: the class of each index

    def __post_init__(self) -> None:
        if self.task == "multiclass":
            absent = sorted(set(range(len(self.classes))) - set(np.unique(self.y_train).tolist()))
            if absent:
                raise ValueError(
                    "class(es) " + ", ".join(repr(self.classes[i]) for i in absent) + " never occur "
                    "in the training slice, so no model can learn them: widen data.window, or list "
                    "only the classes the data holds in data.target.classes")


@dataclass
class FittedModel:
    """A trained model: native scoring, its ONNX bytes, and what to log about its training."""

    kind: str
    predict: Callable[[np.ndarray], np.ndarray]
    onnx: bytes
    params: dict[str, Any]
    history: dict[str, list[float]] = field(default_factory=dict)
    best_iteration: int = 0
    native_files: dict[str, bytes] = field(default_factory=dict)
    train_seconds: float = 0.0
