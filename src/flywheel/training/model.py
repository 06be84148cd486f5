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
