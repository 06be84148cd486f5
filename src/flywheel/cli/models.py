"""Commands on a project's data and models: init, ingest, train, import, evaluate, promote,
rollback, abort-rollout, status, card."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from flywheel import api
from flywheel.cli import render
from flywheel.cli.common import ConfigOpt, command, out, print_json, reporter


def register(app: typer.Typer) -> None:
    """The commands of this module, on the `flywheel` app (in the order --help lists them)."""
    for name, fn in (("init", init), ("ingest", ingest), ("train", train), ("import", import_model),
                     ("evaluate", evaluate), ("promote", promote), ("rollback", rollback),
                     ("abort-rollout", abort_rollout),
                     ("status", status), ("card", card)):
        command(app, name)(fn)


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
    with reporter() as rep:
        made = api.init(source, target, output, task=task, time=time, table=table, id_column=id_column,
                        project=project_name, force=force, reporter=rep)
    render.proposal(made.proposal)
    # soft_wrap: paths stay whole, to be copied
    out.print(f"Wrote {output}" + (f"; loaded {made.loaded:,} rows into {made.proposal.table}"
                                    if made.loaded else "") + ". Next:", soft_wrap=True)
    out.print(f"  flywheel train --config {output}\n  flywheel serve --config {output}", soft_wrap=True)


def ingest(
    config: ConfigOpt,
    input: Annotated[Path, typer.Option("--input", "-i", help="A .parquet or .csv file.")],
    append: Annotated[bool, typer.Option(
        "--append", help="Add the rows, replacing those whose data.id_column they carry, instead of "
                         "replacing the table.")] = False,
) -> None:
    """Load a parquet or CSV file into the source table (data.table): replace it, or --append."""
    project = api.load(config)
    with reporter() as rep:
        done = api.ingest(project, input, append=append, reporter=rep)
    what = (f"added {done.added:,} and replaced {done.replaced:,} rows of" if append
            else f"loaded {done.rows:,} rows into")
    out.print(f"Ingest {what} {done.table} ({project.config.data.time_column} "
              f"{done.time_from} .. {done.time_to}).")


def train(
    config: ConfigOpt,
    model_type: Annotated[str | None, typer.Option(help="Override model.type.")] = None,
) -> None:
    """Train a challenger on the configured window, register it, and promote it if the gate passes."""
    overrides = {"FLYWHEEL_MODEL__TYPE": model_type} if model_type else {}
    project = api.load(config, env={**os.environ, **overrides})
    with reporter() as rep:
        result = api.train(project, rep)
    render.trained(project, result)


def import_model(
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
    project = api.load(config)
    with reporter() as rep:
        result = api.import_model(project, model, rep, allow_pickle=allow_pickle)
    render.trained(project, result)


def evaluate(
    config: ConfigOpt,
    version: Annotated[int | None, typer.Option(help="Version to evaluate (default: challenger).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Score a version and the champion on the current holdout and show the gate's decision."""
    ev = api.evaluate(api.load(config), version)
    print_json(ev) if as_json else render.evaluation(ev)


def promote(
    config: ConfigOpt,
    version: Annotated[int, typer.Option(help="The model version to point the alias at.")],
    alias: Annotated[str, typer.Option(help="Alias to move (champion = Production).")] = "champion",
    reason: Annotated[str, typer.Option(help="Why, for the alias history.")] = "manual promotion",
) -> None:
    """Move an alias to a version by hand (no gate); recorded in the alias history."""
    move = api.promote(api.load_any(config), version, alias, reason)
    prev = f"v{move.previous_version}" if move.previous_version else "none"
    out.print(f"{move.model_name}@{move.alias}: {prev} → v{move.version}")


def rollback(config: ConfigOpt) -> None:
    """Return champion to the version it replaced."""
    move = api.rollback(api.load_any(config))
    out.print(f"{move.model_name}@champion: v{move.previous_version} → v{move.version} (rollback)")


def abort_rollout(
    config: ConfigOpt,
    reason: Annotated[str, typer.Option(help="Why, for the rollout's record.")] = "aborted by hand",
) -> None:
    """End the running shadow or canary rollout without promoting its challenger (the champion stays)."""
    ended = api.abort_rollout(api.load(config), reason)
    out.print(f"rollout {ended.id} of v{ended.challenger_version} aborted" if ended else
              "no rollout is running")


def status(
    config: ConfigOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The champion and challenger with their metrics and lineage."""
    st = api.status(api.load_any(config))
    print_json(st) if as_json else render.status(st)


def card(
    config: ConfigOpt,
    version: Annotated[int | None, typer.Option(help="Version (default: champion).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Also write model_card.md, model_card.html and the plots here.")] = None,
) -> None:
    """A version's model card, made again from its run with the monitoring it has seen so far,
    and logged to the run (card/model_card.md and .html)."""
    made = api.card(api.load_any(config), version, output)
    out.print(f"Model card of v{made.version} logged to its run (card/model_card.md, card/model_card.html)")
    for path in made.files:
        out.print(f"  {path}")
