"""From the source database to model inputs: extract a window, split by time, build and check the
features. `PreparedData` is computed once per run; the pipeline's `features` step saves it and
the `train` and `evaluate` steps load it, so nothing is rebuilt or checked twice."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from flywheel.config import CategoryFeature, Project
from flywheel.data import features as feats
from flywheel.data import spark as spark_engine
from flywheel.data.checks import DataCheckError, DataCheckReport, run_data_checks
from flywheel.data.sources import FROM_FEEDBACK, TARGET, Snapshot, extract_window, target_values
from flywheel.training.model import TrainingData
from flywheel.training.split import TimeSplit, cap_feedback, split_by_time

ARRAYS_FILE = "features.npz"
SPEC_FILE = "feature_spec.json"
CHECKS_FILE = "data_checks.json"
META_FILE = "prepared.json"


@dataclass(frozen=True)
class PreparedData:
    """A snapshot turned into model inputs: the fitted feature spec, matrix, target and split."""

    snapshot: Snapshot | None  # None for a frame prepared in memory (the replay's oracle)
    frame: pd.DataFrame
    spec: feats.FeatureSpec
    X: np.ndarray
    y: np.ndarray
    split: TimeSplit

    def training_data(self) -> TrainingData:
        s = self.split
        return TrainingData(
            X_train=self.X[s.train], y_train=self.y[s.train],
            X_val=self.X[s.validation], y_val=self.y[s.validation],
            feature_names=self.spec.names, cardinalities=cardinalities(self.spec),
            task=self.spec.task, classes=tuple(self.spec.classes),
        )

    def save(self, folder: Path, checks: DataCheckReport) -> Path:
        """Write the matrix, split and spec beside the snapshot's path (atomically: a reader never
        sees half of it)."""
        if self.snapshot is None:
            raise ValueError("only data prepared from a snapshot can be saved")
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{ARRAYS_FILE}.{os.getpid()}.partial.npz"
        s = self.split
        np.savez(partial, X=self.X, y=self.y, train=s.train, validation=s.validation,
                 holdout=s.holdout)
        (folder / SPEC_FILE).write_text(self.spec.to_json())
        (folder / CHECKS_FILE).write_text(json.dumps(checks.__dict__, default=str))
        (folder / META_FILE).write_text(json.dumps({
            "snapshot": str(self.snapshot.path), "validation_from": s.validation_from.isoformat(),
            "holdout_from": s.holdout_from.isoformat(), "holdout_feedback_rows": s.holdout_feedback_rows,
            "feedback_left_out": s.feedback_left_out}))
        os.replace(partial, folder / ARRAYS_FILE)
        return folder

    @classmethod
    def load(cls, folder: Path) -> PreparedData:
        """What `save` wrote; the snapshot's rows are read back from its parquet file."""
        if not (folder / ARRAYS_FILE).is_file():
            raise DataCheckError(f"{folder} holds no prepared features; run the features step again")
        meta = json.loads((folder / META_FILE).read_text())
        snapshot = Snapshot.load(Path(meta["snapshot"]))
        with np.load(folder / ARRAYS_FILE) as arrays:
            split = TimeSplit(arrays["train"], arrays["validation"], arrays["holdout"],
                              pd.Timestamp(meta["validation_from"]), pd.Timestamp(meta["holdout_from"]),
                              meta.get("holdout_feedback_rows", 0), meta.get("feedback_left_out", 0))
            X, y = arrays["X"], arrays["y"]
        spec = feats.FeatureSpec.from_json((folder / SPEC_FILE).read_text())
        return cls(snapshot, snapshot.frame(), spec, X, y, split)


def cardinalities(spec: feats.FeatureSpec) -> dict[int, int]:
    return {i: len(spec.vocabularies.get(f.name, [])) + 1
            for i, f in enumerate(spec.features) if isinstance(f, CategoryFeature)}


def extract_training_window(project: Project, extra_columns: Sequence[str] = (),
                            window: tuple[object, object] | None = None,
                            as_of: object | None = None) -> Snapshot:
    """The window (default: the configured one) from the source database, labels known by `as_of`."""
    cols = feats.input_columns(project.config.features) + list(extra_columns)
    return extract_window(project.source_url, project.config.data, list(dict.fromkeys(cols)),
                          project.snapshot_dir, window=window, as_of=as_of)  # type: ignore[arg-type]


def prepare_features(project: Project, snapshot: Snapshot) -> PreparedData:
    """Split by time, learn vocabularies on the training slice only, compute every feature."""
    return prepare_frame(project, snapshot.frame(), snapshot)


def prepare_frame(project: Project, frame: pd.DataFrame, snapshot: Snapshot | None = None) -> PreparedData:
    """`prepare_features` for rows already in memory."""
    split = split_by_time(frame[project.config.data.time_column], project.config.split)
    if FROM_FEEDBACK in frame.columns:
        split = cap_feedback(split, frame[FROM_FEEDBACK].fillna(False).to_numpy(dtype=bool),
                             project.config.split.max_feedback_share)
    task = project.config.task
    classes = task_classes(project, frame[TARGET]) if task == "multiclass" else []
    data = project.config.data
    if data.engine == "spark":
        spec, X = spark_engine.fit_and_build(data.spark, project.config.features,
                                             frame[feats.input_columns(project.config.features)],
                                             split.train)
        spec = dataclasses.replace(spec, task=task, classes=classes)
    else:
        spec = dataclasses.replace(feats.fit_spec(project.config.features, frame.iloc[split.train]),
                                   task=task, classes=classes)
        X = feats.build_matrix(spec, frame)
    y = target_values(frame[TARGET], task, classes)
    return PreparedData(snapshot, frame, spec, X, y, split)


def task_classes(project: Project, target: pd.Series) -> list[str]:
    """A multiclass model's classes: as configured, else every class of the rows, sorted."""
    configured = getattr(project.config.data.target, "classes", None)
    return list(configured) if configured else sorted({str(v) for v in target.dropna()})


def check_data(project: Project, prepared: PreparedData) -> DataCheckReport:
    """Run the data checks; raise DataCheckError naming every failure."""
    report = run_data_checks(prepared.X, prepared.y, prepared.spec.names, project.config.checks,
                             prepared.spec.task, prepared.spec.classes,
                             unknown_classes(prepared))
    if not report.passed:
        raise DataCheckError("data checks failed, training stopped:\n  - " + "\n  - ".join(report.failures))
    return report


def unknown_classes(prepared: PreparedData) -> dict[str, int]:
    """Multiclass rows whose class is not among the model's classes: their count by class."""
    if prepared.spec.task != "multiclass":
        return {}
    known = set(prepared.spec.classes)
    counts = prepared.frame[TARGET].astype(str).value_counts()
    return {str(c): int(n) for c, n in counts.items() if c not in known}


def load_checks(folder: Path) -> DataCheckReport:
    return DataCheckReport(**json.loads((folder / CHECKS_FILE).read_text()))
