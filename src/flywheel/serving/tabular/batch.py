"""`flywheel predict`: score a file or a source table with the served runtime and features."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import sqlalchemy as sa

from flywheel.config import Project
from flywheel.core.errors import PipelineError
from flywheel.data.features import build_matrix
from flywheel.data.sources import SourceError, make_engine
from flywheel.registry import CHAMPION, Registry
from flywheel.serving.tabular.answers import TaskAnswers
from flywheel.serving.tabular.runtime import load_version


@dataclass(frozen=True)
class BatchResult:
    rows: int
    version: int
    output: Path


def predict_batch(project: Project, source: str, output: Path, version: int | None = None,
                  keep: tuple[str, ...] = ()) -> BatchResult:
    """Score every row of a parquet/CSV file, or of a table in the source database; the output has
    the id and time columns, the `keep` columns (a label to evaluate with, say) and the scores."""
    scored = score_frame(project, _read(project, source), version, keep, source)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".csv":
        scored.to_csv(output, index=False)
    else:
        scored.to_parquet(output, index=False)
    return BatchResult(rows=len(scored), version=int(scored.attrs["model_version"]), output=output)


def score_frame(project: Project, frame: pd.DataFrame, version: int | None = None,
                keep: tuple[str, ...] = (), what: str = "the frame") -> pd.DataFrame:
    """The rows of `frame` scored by `version` (default: the champion), exactly as the server
    scores them: the id and time columns (where present), the `keep` columns, the task's answer
    (probability and decision; value; label, probability and probability_<class> for each class)
    and model_version. `attrs["model_version"]` names the version."""
    registry = Registry.for_project(project)
    version = version if version is not None else registry.alias_version(CHAMPION)
    if version is None:
        raise PipelineError("no champion to predict with: run flywheel train first")
    model = load_version(registry, version)
    absent = [c for c in keep if c not in frame.columns]
    if absent:
        raise SourceError(f"{what}: no column(s) {', '.join(absent)} to keep; it has: "
                          f"{', '.join(map(str, frame.columns))}")
    missing = [c for c in model.spec.input_columns if c not in frame.columns]
    if missing:
        raise SourceError(f"{what}: missing input column(s) {', '.join(missing)} that "
                          f"{model.name} v{version} needs")
    # The batch path (DuckDB SQL) gives exactly the per-row path's features (tested).
    outs = model.predict_matrix(build_matrix(model.spec, frame))
    data = project.config.data
    columns = [c for c in dict.fromkeys((data.id_column, data.time_column, *keep)) if c in frame]
    out = frame[columns].copy()
    for name, values in TaskAnswers.of(model.spec, project.config.serving.threshold).columns(outs).items():
        out[name] = values
    out["model_version"] = version
    out.attrs["model_version"] = version
    return out


def _read(project: Project, source: str) -> pd.DataFrame:
    path = Path(source)
    if path.is_file():
        return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    engine = make_engine(project.source_url)
    try:
        if not sa.inspect(engine).has_table(source):
            raise SourceError(f"{source}: neither a file nor a table of the source database")
        with engine.connect() as conn:
            return pd.read_sql_table(source, conn)
    finally:
        engine.dispose()
