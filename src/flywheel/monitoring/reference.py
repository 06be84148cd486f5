"""The training reference that monitoring compares windows with, saved next to each model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from flywheel.data.features import FeatureSpec
from flywheel.monitoring.drift import ReferenceProfile, build_profile

PREDICTION = "prediction"
PROFILE_FILE = "profile.json"
SAMPLE_FILE = "sample.parquet"
SAMPLE_ROWS = 20_000


def feature_frame(spec: FeatureSpec, X: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(X, columns=spec.names)


def categorical_features(spec: FeatureSpec) -> list[str]:
    return [spec.names[i] for i in spec.categorical_indices]


def prediction_column(task: str, out: np.ndarray) -> np.ndarray:
    """What prediction drift is measured on: P(positive) (binary), the value (regression), the
    predicted class's index, a category (multiclass: the class shares)."""
    out = np.asarray(out, dtype=np.float64)
    return out.argmax(axis=1).astype(np.float64) if task == "multiclass" and out.ndim == 2 else out


def reference_artifacts(spec: FeatureSpec, X_train: np.ndarray, holdout_out: np.ndarray,
                        folder: Path, seed: int = 0) -> list[Path]:
    """profile.json (every training row summarised) and a sample for Evidently's reports."""
    frame = feature_frame(spec, X_train)
    profile = build_profile(frame, categorical_features(spec))
    holdout_p = prediction_column(spec.task, holdout_out)
    pred = build_profile(pd.DataFrame({PREDICTION: holdout_p}),
                         [PREDICTION] if spec.task == "multiclass" else [])
    full = ReferenceProfile(profile.columns + pred.columns, profile.rows)
    profile_path = folder / PROFILE_FILE
    profile_path.write_text(json.dumps(full.to_dict()))
    rng = np.random.default_rng(seed)
    take = rng.choice(len(frame), size=min(SAMPLE_ROWS, len(frame)), replace=False)
    sample = frame.iloc[np.sort(take)].reset_index(drop=True)
    pred_take = rng.choice(len(holdout_p), size=len(sample), replace=len(holdout_p) < len(sample))
    sample[PREDICTION] = holdout_p[pred_take] if len(holdout_p) else np.nan
    sample_path = folder / SAMPLE_FILE
    sample.to_parquet(sample_path, index=False)
    return [profile_path, sample_path]
