"""Commands that serve and score: serve, room, predict, the `log` group and the `image` group."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from flywheel import api
from flywheel.cli.common import ConfigOpt, command, console, out, parse_date

log_app = typer.Typer(help="The prediction log: export a window of it, apply its retention, compact it.",
                      no_args_is_help=True)
image_app = typer.Typer(help="Container images: the slim serving image and the full one.",
                        no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """The commands of this module, on the `flywheel` app (in the order --help lists them)."""
    for name, fn in (("serve", serve), ("room", room), ("predict", predict)):
        command(app, name)(fn)
    command(log_app, "export")(log_export)
    command(log_app, "prune")(log_prune)
    command(log_app, "compact")(log_compact)
    command(image_app, "build")(image_build)
    app.add_typer(log_app, name="log")
    app.add_typer(image_app, name="image")


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
    api.serve(api.load_any(config), host, port, workers, log_level)


def room(
    config: ConfigOpt,
    host: Annotated[str | None, typer.Option(help="Bind address (default room.host, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default room.port, 8090).")] = None,
) -> None:
    """The control room: one page with the models, alias history, traffic, drift, performance and
    pipeline runs, with promote/rollback (admin token). Beyond 127.0.0.1: FLYWHEEL_VIEWER_TOKEN."""
    api.room(api.load_any(config), host, port, say=out.print)


def predict(
    config: ConfigOpt,
    input: Annotated[str, typer.Option("--input", "-i", help="A .parquet/.csv file or a source table.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write (.parquet or .csv).")],
    version: Annotated[int | None, typer.Option(help="Version to use (default: champion).")] = None,
    keep: Annotated[list[str] | None, typer.Option(
        "--keep", help="A column to copy to the output besides the id and time (repeat it).")] = None,
) -> None:
    """Score a batch with the served runtime and features (backfills, offline evaluation)."""
    res = api.predict_file(api.load(config), input, output, version, tuple(keep or ()))
    out.print(f"Scored {res.rows:,} rows with v{res.version} -> {res.output}")


def log_export(
    config: ConfigOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="The Parquet file to write.")],
    start: Annotated[str, typer.Option("--from", help="First day served (UTC), YYYY-MM-DD.")],
    end: Annotated[str, typer.Option("--to", help="Day after the last one (UTC), YYYY-MM-DD.")],
) -> None:
    """Write the predictions served in [--from, --to) with their labels to a Parquet file."""
    first, after = parse_date(start, "--from"), parse_date(end, "--to")
    done = api.log_export(api.load(config), first, after, output)
    out.print(f"{done.rows:,} predictions ({done.labelled:,} with a label) served "
              f"{done.start:%Y-%m-%d} .. {done.end:%Y-%m-%d} → {done.path}")


def log_prune(
    config: ConfigOpt,
    days: Annotated[int | None, typer.Option(
        min=1, help="Keep this many days (default: serving.log.retention_days).")] = None,
) -> None:
    """Remove the predictions (and labels) older than the retention; `flywheel run` does it on each check."""
    done = api.log_prune(api.load(config), days)
    out.print(f"{done.rows:,} predictions and {done.feedback:,} labels older than "
              f"{done.cutoff:%Y-%m-%d %H:%M} UTC removed"
              + (f" ({len(done.partitions)} day partitions dropped)" if done.partitions else ""))


def log_compact(config: ConfigOpt) -> None:
    """Rewrite predictions logged as JSON text (older versions) into segments; merge small ones."""
    project = api.load(config)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=16),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                label = "rewriting JSON rows" if stage == "rewrite" else "merging small segments"
                tasks[stage] = bar.add_task(label, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        done = api.log_compact(project, progress)
    out.print(f"{done.rewritten_rows:,} predictions rewritten from JSON text, {done.merged_segments:,} "
              f"small segments merged; the log of '{project.config.registered_model}' is "
              f"{done.segments:,} segments")


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
    with console.status(f"building the {kind} image (wheels, then docker build)"):
        built = api.build_image(kind, tag, base, config)
    out.print(f"{built.tag}: {built.size_bytes / 1e6:,.0f} MB on {built.base}, built in "
              f"{built.seconds:.0f} s")
    out.print('run it: docker run -p 8080:8080 -v "$PWD:$PWD" -e FLYWHEEL_CONFIG="$PWD/flywheel.yaml" '
              f'-e FLYWHEEL_HOME="$PWD/.flywheel" {built.tag}')

